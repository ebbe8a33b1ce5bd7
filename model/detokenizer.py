"""Streaming detokenisation: turn generated token ids into text pieces as soon as they are whole."""

from __future__ import annotations

import codecs

from model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a character (an emoji or CJK character often
    spans several tokens), so bytes that could still start a valid character are held back until
    it completes. Bytes that can never become valid are emitted at once as U+FFFD, exactly as
    `Tokenizer.decode` would replace them, so the concatenation of every `add` piece plus `flush()`
    always equals `tokenizer.decode(all_ids)`. At most 3 bytes are ever held back.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # The stdlib incremental decoder keeps only the incomplete tail and replaces invalid
        # sequences the same way bytes.decode(errors="replace") does over the whole input.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self._num_tokens = 0
        self._is_flushed = False

    def add(self, token_id: int) -> str:
        """Feed one token id; return the newly completed text (may be "")."""
        if self._is_flushed:
            raise RuntimeError("IncrementalDetokenizer.add() called after flush()")
        piece = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        self._num_tokens += 1
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End the stream: return the held-back bytes decoded with replacement (often "")."""
        if self._is_flushed:
            return ""
        self._is_flushed = True
        piece = self._decoder.decode(b"", final=True)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            # Collapse once so repeated reads stay cheap.
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def num_pending_bytes(self) -> int:
        """How many bytes are held back waiting for the rest of a character (0 to 3)."""
        pending, _ = self._decoder.getstate()
        return len(pending)

    @property
    def num_tokens(self) -> int:
        """How many token ids have been added."""
        return self._num_tokens

    @property
    def is_flushed(self) -> bool:
        """Whether `flush()` has ended the stream."""
        return self._is_flushed
