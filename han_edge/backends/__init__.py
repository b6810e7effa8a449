"""Backends: one class per way of running a model, chosen from the file through ``han_edge.formats``."""
from __future__ import annotations

from han_edge.backends.base import Backend

__all__ = ["Backend", "open_backend"]


def open_backend(source, **options) -> Backend:
    """The backend for a model file (or ``grpc://`` URI), chosen by the format table.

    Metadata every backend relies on is checked here, naming the file: the normalisation form.
    """
    from han_edge.config import normalization_of
    from han_edge.formats import format_of

    backend = format_of(source).open(source, **options)
    try:
        normalization_of(backend.metadata, str(source))
    except Exception:
        backend.close()
        raise
    return backend
