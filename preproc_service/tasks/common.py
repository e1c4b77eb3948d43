"""Small helpers shared by the task handlers."""

from __future__ import annotations

import numpy as np

from splitserve_common.errors import InvalidArgument


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: 1 / inf is the right 0
        return 1.0 / (1.0 + np.exp(-x))


def require_texts(texts, what: str = "texts") -> None:
    if len(texts) == 0:
        raise InvalidArgument(f"{what} is empty: send at least one input")


def check_top_k(top_k) -> None:
    if top_k is not None and top_k <= 0:
        raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
