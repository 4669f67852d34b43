"""CPU threads: one default, set once when `cache_core` is imported, overridable.

On a small CPU, torch's default of one intra-op thread per core makes the small matrix products of a partial forward
spin-wait: measured on a 2-core machine, the built-in benchmark and the README snippet ran 5-18x slower with 2
threads than with 1. So on machines with at most `SMALL_CPU` cores the engine runs 1 thread; on larger ones it
leaves torch's choice. `BLOCKREUSE_THREADS=<n>` in the environment (or `threads=<n>` for `train.py`, which sets that
variable so worker processes inherit it) fixes the count; `set_threads(n)` does it in a running process.
"""

from __future__ import annotations

import os

import torch

THREADS_ENV = "BLOCKREUSE_THREADS"
SMALL_CPU = 4


def default_threads() -> int | None:
    """Threads the engine runs with: $BLOCKREUSE_THREADS if set (0 = torch's default), else 1 on a small CPU, else
    None (torch's default)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={value!r} must be a whole number (0 = torch's default)") from None
        if n < 0:
            raise ValueError(f"{THREADS_ENV}={value!r} must be >= 0 (0 = torch's default)")
        return n or None
    return 1 if (os.cpu_count() or 1) <= SMALL_CPU else None


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (None: `default_threads()`); returns the count in effect."""
    n = default_threads() if threads is None else int(threads)
    if n is not None:
        if n < 1:
            raise ValueError(f"threads={threads} must be >= 1 (or null for the default)")
        torch.set_num_threads(n)
    return torch.get_num_threads()
