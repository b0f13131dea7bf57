"""Training data: JSONL readers, chat templates with assistant-only labels, packing, collation."""

from .records import DataError, Sample, detect_format, read_jsonl
from .tokenize import IGNORE, Encoded, Row, collate, encode_all, encode_sample, pad_token_id, render_chat, to_rows

__all__ = [
    "DataError", "Sample", "detect_format", "read_jsonl", "IGNORE", "Encoded", "Row", "collate",
    "encode_all", "encode_sample", "pad_token_id", "render_chat", "to_rows",
]
