"""Token-by-token detokenization that never emits broken UTF-8."""

from __future__ import annotations

import codecs

from .base import Tokenizer


class StreamDecoder:
    """Feed generated ids one at a time; get back the text each one completes.

    Works on token bytes, so a character split over several byte-level tokens comes out whole
    once its last byte arrives. Bytes that can never form a character become U+FFFD exactly as in
    `tokenizer.decode`; the bytes of a character that is still unfinished when the text ends (cut by a
    token budget or a stop) are dropped, so the text is always a prefix of the longer generation's.
    Each push costs O(len(token)), independent of how much came before.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = self.tokenizer.strip_leading_space

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        data = self.tokenizer.id_to_token_bytes(token_id)
        if self._at_start and data:
            self._at_start = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End the text: an unfinished character held back is dropped (never U+FFFD); starts afresh.
        Returns what remains to emit, which is always "" (only unfinished characters are held)."""
        self.reset()
        return ""

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self._utf8.getstate()[0])
