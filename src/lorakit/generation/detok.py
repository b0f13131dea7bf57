"""Per-request output state: incremental detokenisation, stop strings and streaming hold-back."""

from __future__ import annotations

from typing import Any


class TextState:
    """The text of a growing token list, decoded incrementally.

    Each new token is decoded together with the few tokens before it (a window that starts at the
    last complete boundary), so a step costs a few tokens of decoding however long the completion
    is; a token that ends mid-character ("\\ufffd") waits for the rest. ``stop`` strings end the
    text (left out of it); the last ``max(len(stop)) - 1`` characters are held back from streaming
    because a stop string may still be completing.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0  # characters already streamed
        self._prefix = 0  # window start: tokens before it are in ``text`` for good
        self._read = 0  # tokens up to here are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, token: int) -> bool:
        """Add ``token``; returns True when a stop string appeared (``text`` is then cut before it)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix:self._read])
        now = self._decode(self.tokens[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # nothing new yet, or a character still incomplete
        old = len(self.text)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        return self._cut_at_stop(old)

    def finish(self) -> None:
        """Decode whatever is pending (an incomplete character stays as "\\ufffd", as a full decode gives)."""
        if self._read < len(self.tokens):
            before = self._decode(self.tokens[self._prefix:self._read])
            now = self._decode(self.tokens[self._prefix:])
            old = len(self.text)
            self.text += now[len(before):]
            self._read = len(self.tokens)
            self._cut_at_stop(old)

    def _cut_at_stop(self, old: int) -> bool:
        hits = [at for s in self.stop if (at := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def stream_delta(self) -> str:
        """New text safe to stream now (not held back, no incomplete character at its end)."""
        safe = len(self.text) - self.holdback
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        """Everything not streamed yet (at the end of the request)."""
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return rest

