"""enosfs: the files of an Envision EnOS organisation as a read-only folder."""

__version__ = "0.1.0"
