"""Per-request sizes a caller chooses, each bounded by a flag and checked before any work.

Refusals are INVALID_ARGUMENT naming the limit and its flag. Work that needs more model rows
than model_service's whole queue holds (its --max-queue-rows, from the metadata) can never
run, so Deployment.forward refuses it before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve_common.errors import InvalidArgument
from splitserve_common.settings import Option

LIMIT_OPTIONS = [
    Option("max-texts", 1024, "most inputs in one request (texts, question/context pairs, tokenized texts)", int),
    Option("max-text-chars", 100_000, "most characters in one text (prompts and chat messages too)", int),
    Option("max-zero-shot-pairs", 4096, "zero-shot-classification: most texts x candidate labels in one request",
           int),
    Option("max-qa-windows", 1024, "question-answering: most context windows (doc_stride overflow) in one request",
           int),
]


@dataclass(frozen=True)
class RequestLimits:
    max_texts: int = 1024
    max_text_chars: int = 100_000
    max_zero_shot_pairs: int = 4096
    max_qa_windows: int = 1024

    @classmethod
    def from_args(cls, args) -> RequestLimits:
        return cls(args.max_texts, args.max_text_chars, args.max_zero_shot_pairs, args.max_qa_windows)

    def check_inputs(self, inputs, what: str = "texts") -> None:
        """A request's inputs (strings, or tuples of strings): how many, and how long each is."""
        if len(inputs) == 0:
            raise InvalidArgument(f"{what} is empty: send at least one input")
        if len(inputs) > self.max_texts:
            raise InvalidArgument(f"{len(inputs)} {what} in one request, more than the limit of {self.max_texts} "
                                  "(--max-texts)")
        for i, item in enumerate(inputs):
            for text in (item,) if isinstance(item, str) else item:
                self.check_text(text, f"input {i}")

    def check_text(self, text: str, what: str = "the text") -> None:
        if len(text) > self.max_text_chars:
            raise InvalidArgument(f"{what} has {len(text)} characters, more than the limit of "
                                  f"{self.max_text_chars} per text (--max-text-chars)")

    def check_zero_shot_pairs(self, texts: int, labels: int) -> None:
        if texts * labels > self.max_zero_shot_pairs:
            raise InvalidArgument(f"{texts} texts x {labels} candidate labels = {texts * labels} pairs, more than the "
                                  f"limit of {self.max_zero_shot_pairs} (--max-zero-shot-pairs)")

    def check_qa_windows(self, windows: int) -> None:
        if windows > self.max_qa_windows:
            raise InvalidArgument(f"the contexts make {windows} windows of max_seq_len tokens, more than the limit "
                                  f"of {self.max_qa_windows} per request (--max-qa-windows): send shorter contexts, "
                                  "fewer questions or a larger doc_stride")
