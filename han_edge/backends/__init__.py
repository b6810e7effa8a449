"""Backends: one class per way of running a model, chosen from the file through ``han_edge.formats``."""
from __future__ import annotations

from han_edge.backends.base import Backend

__all__ = ["Backend", "open_backend"]


def open_backend(source, **options) -> Backend:
    """The backend for a model file (or ``grpc://`` URI), chosen by the format table."""
    from han_edge.formats import format_of

    return format_of(source).open(source, **options)
