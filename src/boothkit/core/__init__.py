"""The small mechanisms every wing shares: errors, atomic files and folders, locks, progress, precision and devices,
the config schema and named recipes (presets), interrupts, pickle safety, the hub-id table and the report page.
Imports nothing above it."""
