"""The small mechanisms every wing shares: errors, atomic files and folders, locks, progress, precision and devices,
the config schema, interrupts, pickle safety, the hub-id table and the report page. Imports nothing above it."""
