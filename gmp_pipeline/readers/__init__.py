"""Source readers, one module per format, behind one protocol (:mod:`.base`)."""
from .base import Reader, get_reader_class, open_reader, reader_names, register_reader

__all__ = ["Reader", "get_reader_class", "open_reader", "reader_names", "register_reader"]
