"""Training data: JSONL readers, chat templates with assistant-only labels, packing, collation."""

from .records import DataError, PromptRecord, Example, detect_format, read_jsonl, read_prompts
from .tokenize import (IGNORE, Encoded, Row, collate, collect_eos_ids, check_vocab, encode_all, encode_example, pad_token_id,
                       render_chat, to_rows)

__all__ = [
    "DataError", "PromptRecord", "Example", "detect_format", "read_jsonl", "read_prompts", "IGNORE", "Encoded", "Row", "check_vocab", "collate",
    "collect_eos_ids", "encode_all", "encode_example", "pad_token_id", "render_chat", "to_rows",
]
