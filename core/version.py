"""The semedge version, written into every package manifest and build record."""

__version__ = "0.1.0"
