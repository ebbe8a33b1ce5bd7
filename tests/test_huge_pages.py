"""The KV cache's memory: large CPU caches on transparent huge pages, as ordinary zero tensors."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_model
from model import huge_pages
from model.kv_cache import BatchLayout, KVCache

THP = Path("/sys/kernel/mm/transparent_hugepage")


def thp_setting(name: str) -> str:
    """The selected value of a transparent-huge-page setting ("" where it cannot be read)."""
    try:
        text = (THP / name).read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """How many bytes of the mapping that holds `tensor`'s data are on huge pages (Linux; 0
    where that cannot be read)."""
    address = tensor.data_ptr()
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                head = line.split()[0] if line.strip() else ""
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    low, high = (int(x, 16) for x in head.split("-"))
                    inside = low <= address < high
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def huge_pages_offered() -> bool:
    """Whether this kernel gives huge pages at fault time to memory marked MADV_HUGEPAGE."""
    return thp_setting("enabled") in ("always", "madvise") and thp_setting("defrag") in (
        "always",
        "madvise",
        "defer+madvise",
    )


def test_small_tensors_are_plain_zeros() -> None:
    small = huge_pages.zeros((4, 8), torch.float32, "cpu")
    assert torch.equal(small, torch.zeros(4, 8))
    if thp_setting("enabled") == "madvise":  # under "always" the heap itself may be huge
        assert huge_page_bytes(small) == 0


def test_large_tensors_are_zeros_on_aligned_huge_pages() -> None:
    shape = (3, 1024, 1024)  # 12 MiB of float32
    tensor = huge_pages.zeros(shape, torch.float32, "cpu")
    assert tensor.shape == shape and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert not tensor.any()
    assert tensor.data_ptr() % huge_pages.HUGE_PAGE == 0
    if huge_pages_offered():
        assert huge_page_bytes(tensor) >= tensor.numel() * 4 // 2
    # the mapping lives as long as the tensor: nothing else holds it here
    gc.collect()
    tensor[2, 1023, 1023] = 5.0
    assert float(tensor.sum()) == 5.0
    view = tensor[1:]
    del tensor
    gc.collect()
    assert float(view.sum()) == 5.0


@pytest.mark.skipif(not huge_pages_offered(), reason="transparent huge pages are off here")
def test_a_large_cache_sits_on_huge_pages_and_gives_the_same_logits() -> None:
    model = make_model(seed=7)
    slots = 130  # 8.1 MiB of keys: above the size from which huge pages are used
    cache = KVCache(TINY, slots, TINY.block_size)
    assert cache.k.numel() * 4 >= huge_pages.MIN_BYTES
    assert huge_page_bytes(cache.k) > 0 and huge_page_bytes(cache.v) > 0
    plain = KVCache(TINY, slots, TINY.block_size)
    plain.k, plain.v = torch.zeros_like(plain.k), torch.zeros_like(plain.v)
    prompts = [[5, 6, 7], list(range(40)), [9] * 17]
    where = [0, 64, 129]  # slots spread over the whole cache
    width = max(len(p) for p in prompts)
    layout = BatchLayout.build(where, [0, 0, 0], [len(p) for p in prompts], TINY.block_size)
    idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        expected = model.forward_cached(idx, plain, layout)
        got = model.forward_cached(idx, cache, layout)
    assert torch.equal(got, expected)
    assert torch.equal(cache.k, plain.k) and torch.equal(cache.v, plain.v)
