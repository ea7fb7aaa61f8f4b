"""Error types that the CLI turns into one-line messages (no traceback, exit code 2)."""


class BoothkitError(Exception):
    """A user-facing failure: the message names the file, flag or config key at fault."""

    exit_code = 2  # what the CLI exits with


class Interrupted(BoothkitError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130  # the shell's code for a SIGINT


class ConfigError(BoothkitError):
    """A config key or CLI flag is unknown, of the wrong type or out of range."""


class DataError(BoothkitError):
    """An input image or folder cannot be used."""


class ModelError(BoothkitError):
    """A model cannot be found or loaded."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): a library's error, said in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

