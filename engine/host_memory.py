"""CPU memory on 2 MiB pages for what a decode step streams: the model's weights, and the
bandwidth probe whose figure bounds that step (engine/roofline.py).

Why: a decode step reads every weight once. On 4 KiB pages SmolLM2's 270 MB of bf16 weights
are ~66,000 pages, each a TLB miss, and in a VM each miss is a two-level (guest and host) page
walk. Linux gives transparent huge pages only where asked (`madvise` mode, the default on the
lab's VMs), so PyTorch's allocations never get them. Measured on the 2-core EPYC VM: a plain
read of 256 MiB 27 -> 31 GB/s, and batch-1 bf16 decode steps 10.7-11.4 -> 9.9-10.7 ms
(bench/cpu_decode.py; 17.0 -> 15.1 ms before the decode layers were fused).

Where the kernel refuses (no THP, another OS) the memory is still an ordinary anonymous
mapping: everything works, only without the speed-up.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

ALIGN = 64  # bytes between packed tensors: a cache line, so no tensor shares one


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes`, on huge pages where the OS grants them.
    The tensor keeps its mapping alive; the memory is committed as it is first written."""
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:  # THP disabled ("never") or not built into the kernel
            pass
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes)


def pack_parameters(module: nn.Module) -> int:
    """Move every CPU parameter of `module` into one huge-page region (values and sharing
    unchanged: tied weights stay one tensor). Returns the bytes moved: 0 when no region could
    be mapped, and the parameters then stay where they are."""
    params = [p for p in {id(p): p for p in module.parameters()}.values()
              if p.device.type == "cpu" and p.numel()]
    sizes = [p.numel() * p.element_size() for p in params]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ALIGN) * ALIGN
    if not params:
        return 0
    try:
        region = empty_bytes(total)
    except (OSError, ValueError, MemoryError):  # no anonymous mapping here: keep torch's memory
        return 0
    for p, offset, size in zip(params, offsets, sizes, strict=True):
        packed = region[offset: offset + size].view(p.dtype).view(p.shape)
        packed.copy_(p.data)
        p.data = packed  # the old storage is freed with its last reference
    return sum(sizes)
