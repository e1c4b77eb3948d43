"""Incremental detokenization: token ids arrive one step at a time, text leaves as soon as it is whole.

Each new piece of text is the difference between decoding a short window of ids with
and without the newest ones (the window starts a few tokens back, so tokenizers that
drop a word's leading space at the start of a decode keep it). Text ending in U+FFFD is
held back: the bytes of one character may span several byte-level BPE tokens. At the end
`flush` returns whatever is left, so the pieces always add up to the full decode.
"""

from __future__ import annotations

# Prompt tokens kept as left context for the first generated tokens.
CONTEXT_TOKENS = 6
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids)[-CONTEXT_TOKENS:]
        self.prefix_offset = 0            # window start
        self.read_offset = len(self.ids)  # ids before this are already in the emitted text

    def _decode(self, ids) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust decoder directly: same text, far less overhead per token
            return backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_ids) -> str:
        """Text completed by `new_ids` ("" when the last character is still incomplete)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The rest of the text (a truncated character shows as U+FFFD, as a full decode would)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]
