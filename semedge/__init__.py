"""semedge: an edge deployment runtime for large-model semantic communication."""

__version__ = "0.1.0"
