"""Floating-point settings for the networks' CPU work.

Small CNNs on a CPU can run 50x slower on denormal floats, so feature extraction and synthesis treat
them as zero. That flag is processor state of the calling thread (threads started inside inherit
it), so it is set only for the duration of that work and cleared afterwards: the rest of the
process (scalar inference, property tests, numpy code) keeps IEEE arithmetic.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_depth = threading.local()


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Denormal floats count as zero inside the block, on this thread; blocks nest (the outermost
    one clears the flag when it ends)."""
    depth = getattr(_depth, "n", 0)
    if depth == 0:
        torch.set_flush_denormal(True)
    _depth.n = depth + 1
    try:
        yield
    finally:
        _depth.n = depth
        if depth == 0:
            torch.set_flush_denormal(False)


def without_denormals(function: F) -> F:
    """Run `function` inside :func:`flushed_denormals`."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with flushed_denormals():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
