"""JSONL readers: chat (``conversations`` / ``messages``), Alpaca, plain text; line-numbered errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "alpaca", "text")


class DataError(ValueError):
    """Bad training data; the message starts with ``path:line:``."""


@dataclass
class Example:
    """One training example as read from a file: a conversation, or plain text (not yet tokenized)."""

    source: str
    """Where it came from, as ``path:line``."""
    messages: Optional[list[dict[str, str]]] = None
    """Chat turns ``{"role", "content"}`` (chat and alpaca records)."""
    text: Optional[str] = None
    """Plain text (text records); all of it is trained on."""


def _json_object(line: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; ValueError says what is wrong (the caller adds path:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def detect_format(record: dict[str, Any]) -> Optional[str]:
    if "conversations" in record or "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _chat(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise ValueError("'conversations'/'messages' must be a list of {role, content} objects")
    if not turns:
        raise ValueError("empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        if "role" not in turn or "content" not in turn:
            missing = "role" if "role" not in turn else "content"
            raise ValueError(f"turn {i} has no '{missing}'")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise ValueError(f"turn {i} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i} content must be a string")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError("no assistant turn with content: nothing to learn from")
    return messages


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise ValueError(f"'{name}' must be a string")
    if not output:
        raise ValueError("empty 'output': nothing to learn from")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if isinstance(record.get("system"), str) and record["system"]:
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def read_jsonl(
    path: Union[str, Path],
    format: str = "auto",
    skip_invalid: bool = False,
    system_prompt: Optional[str] = None,
) -> tuple[list[Example], int]:
    """Read a JSONL dataset.

    Args:
        path: the file.
        format: "chat", "alpaca", "text", or "auto" (from the file's first record).
        skip_invalid: skip malformed lines instead of raising.
        system_prompt: a system turn added to conversations that have none.

    Returns:
        ``(samples, number of skipped lines)``.

    Raises:
        DataError: ``path:line: what is wrong`` for the first malformed line (unless skipped),
            or ``path: ...`` for a missing or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    samples: list[Example] = []
    skipped = 0
    fmt = None if format == "auto" else format
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format {format!r}; expected auto or one of {list(FORMATS)}")
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = _json_object(line)
                if fmt is None:
                    fmt = detect_format(record)
                    if fmt is None:
                        raise ValueError(
                            "cannot tell the format: expected 'conversations' or 'messages' (chat), "
                            f"'instruction'+'output' (alpaca) or 'text'; got keys {sorted(record)}"
                        )
                if fmt == "text":
                    text = record.get("text")
                    if not isinstance(text, str) or not text:
                        raise ValueError("'text' must be a non-empty string")
                    samples.append(Example(where, text=text))
                    continue
                messages = _chat(record) if fmt == "chat" else _alpaca(record)
                if system_prompt and messages[0]["role"] != "system":
                    messages.insert(0, {"role": "system", "content": system_prompt})
                samples.append(Example(where, messages=messages))
            except ValueError as err:
                if not skip_invalid:
                    raise DataError(f"{where}: {err}") from None
                skipped += 1
    if not samples:
        raise DataError(f"{path}: no usable samples" + (f" ({skipped} invalid lines skipped)" if skipped else ""))
    return samples, skipped


@dataclass
class PromptRecord:
    """One RL prompt and the fields its rewards read."""

    source: str
    """Where it came from, as ``path:line``."""
    prompt: str
    """The prompt text (for ``messages`` records, the last user turn), as rewards receive it."""
    messages: Optional[list[dict[str, str]]]
    """The chat turns of a ``messages`` record (no assistant reply at the end), else None."""
    fields: dict[str, Any]
    """Every other key of the record (``answer``, ``nums``, ``target`` ...)."""


def read_prompts(path: Union[str, Path], skip_invalid: bool = False) -> tuple[list[PromptRecord], int]:
    """Read RL prompts: JSONL records with ``prompt`` (a string) or ``messages`` (chat turns ending
    with a user turn), plus any fields the rewards read.

    Returns:
        ``(records, number of skipped lines)``.

    Raises:
        DataError: ``path:line: what is wrong`` (unless skipped), or ``path: ...`` for a missing or
            empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    records: list[PromptRecord] = []
    skipped = 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = _json_object(line)
                fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
                if "messages" in record:
                    turns = record["messages"]
                    if not isinstance(turns, list) or not turns:
                        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
                    messages = []
                    for i, turn in enumerate(turns):
                        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                            raise ValueError(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: string}}")
                        messages.append({"role": turn["role"], "content": turn["content"]})
                    if messages[-1]["role"] != "user":
                        raise ValueError("the last message must be the user's (the model writes the reply)")
                    records.append(PromptRecord(where, messages[-1]["content"], messages, fields))
                elif isinstance(record.get("prompt"), str) and record["prompt"]:
                    records.append(PromptRecord(where, record["prompt"], None, fields))
                else:
                    raise ValueError(f"expected a non-empty 'prompt' string or 'messages'; got keys {sorted(record)}")
            except ValueError as err:
                if not skip_invalid:
                    raise DataError(f"{where}: {err}") from None
                skipped += 1
    if not records:
        raise DataError(f"{path}: no usable prompts" + (f" ({skipped} invalid lines skipped)" if skipped else ""))
    return records, skipped
