"""CPU runtime settings."""

import sys

import pytest
import torch

from mtbert.cpu import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_is_accepted_and_harmless():
    assert keep_freed_memory() is True
    big = torch.zeros(30522, 384)  # a word-embedding-sized block, over glibc's mmap threshold
    del big
    again = torch.zeros(30522, 384)  # reused memory still comes back zeroed
    assert not again.any()
