"""CPU runtime settings: how mtbert trains fast on a few cores.

These change the whole process (thread count, the allocator), so library code never calls
them: the command line does, once, before training (`configure_process`).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def configure_process(threads: int | None = None, device: str = "auto") -> None:
    """Process-wide settings for training: `threads` for torch's CPU kernels (None: all
    cores), and on CPUs an allocator that keeps large freed blocks (`keep_freed_memory`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed blocks of up to `limit_bytes` instead of unmapping them.

    By default glibc serves blocks over 32 MiB with a fresh `mmap` and returns them on free, so
    every training step page-faults through new memory for the word-embedding gradient (47 MB
    for MiniLM, 94 MB for bert-base) and other large temporaries: allocating and zeroing one
    47 MB tensor takes ~15 ms that way and ~1.3 ms from reused memory. Measured on a MiniLM
    multitask step on 2 cores: ~9% more tokens/s. The cost is that freed memory up to
    `limit_bytes` stays with the process. Returns False where malloc is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        accepted = (libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes)
                    and libc.mallopt(_M_TRIM_THRESHOLD, limit_bytes))
    except (OSError, AttributeError):  # musl or another libc
        return False
    if not accepted:
        log.debug("glibc refused mallopt(%d); allocator left as is", limit_bytes)
    return bool(accepted)
