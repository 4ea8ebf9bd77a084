"""Weights packed into one huge-page region (engine/host_memory.py) keep their values and
sharing; without the kernel's huge-page advice the region is still ordinary memory."""

from __future__ import annotations

import mmap

import torch
from torch import nn

from engine import host_memory
from engine.models.loader import load_model


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 3, bias=True)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's LM head is


def test_packing_keeps_values_and_ties():
    module = Tied().requires_grad_(False)
    before = {name: p.clone() for name, p in module.named_parameters()}
    moved = host_memory.pack_parameters(module)
    assert moved == sum(p.numel() * 4 for p in before.values())  # the tied weight counted once
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name
    assert module.head.weight is module.embed.weight
    ptrs = sorted(p.data_ptr() for p in module.parameters())
    assert all(ptr % host_memory.ALIGN == 0 for ptr in ptrs)
    assert ptrs[-1] - ptrs[0] < moved + 3 * host_memory.ALIGN  # one region, back to back
    x = torch.tensor([3, 7])
    assert torch.equal(module.head(module.embed(x)), module.embed(x) @ module.embed.weight.T)


def test_without_huge_page_advice_the_memory_still_works(monkeypatch):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)  # as on a kernel without THP
    region = host_memory.empty_bytes(3 << 20)
    assert region.shape == (3 << 20,) and region.dtype == torch.uint8
    region.fill_(7)
    assert int(region.sum()) == 7 * (3 << 20)


def test_a_loaded_cpu_model_lies_in_one_region():
    loaded = load_model("tiny", torch.device("cpu"), torch.bfloat16, seed=0)
    params = list(loaded.model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    ptrs = sorted(p.data_ptr() for p in params)
    assert ptrs[-1] - ptrs[0] < total + len(params) * host_memory.ALIGN
    assert not any(p.requires_grad for p in params)


def test_when_no_region_can_be_mapped_the_weights_stay(monkeypatch):
    module = Tied().requires_grad_(False)
    before = {name: (p.data_ptr(), p.clone()) for name, p in module.named_parameters()}

    def refuse(nbytes):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(host_memory, "empty_bytes", refuse)
    assert host_memory.pack_parameters(module) == 0
    for name, p in module.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
