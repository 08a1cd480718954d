"""An EnOS-compatible server for development, demos and tests (`enosfs emulator`)."""
