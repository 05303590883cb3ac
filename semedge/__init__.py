"""semedge: an edge deployment runtime for large-model semantic communication."""

from semedge.core.version import __version__  # noqa: F401
