"""`python -m boothkit` is the `boothkit` command."""
from .cli import main

main()
