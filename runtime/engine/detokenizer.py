"""Incremental detokenization and stop-string matching for one request.

Decoding only a short window of recent tokens keeps each step O(1) in the output length; text is
held back while the window ends in an incomplete UTF-8 sequence (shown as U+FFFD).
"""
from __future__ import annotations

from typing import Any

_WINDOW = 6  # tokens of left context decoded again, so merges across token boundaries come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str], include_stop_str: bool, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop_str = include_stop_str
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.matched_stop: str | None = None  # the stop string that ended the output

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (new text, whether a stop string ended the output)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return "", False
        new_text = full[len(prefix):]
        self._prefix_offset = max(self._read_offset, len(self.token_ids) - _WINDOW)
        self._read_offset = len(self.token_ids)
        return self._append_checking_stop(new_text)

    def _append_checking_stop(self, new_text: str) -> tuple[str, bool]:
        before = len(self.text)
        self.text += new_text
        if not self.stop:
            return new_text, False
        search_from = max(0, before - self._max_stop_len + 1)
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return new_text, False
        index, stop = min(hits)
        self.matched_stop = stop
        end = index + len(stop) if self.include_stop_str else index
        self.text = self.text[:end]
        return self.text[before:], True
