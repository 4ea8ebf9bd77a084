"""transformers as the test oracle: raw greedy continuation of token ids."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, prompt: list[int], new_tokens: int,
              device: torch.device | str = "cpu") -> list[int]:
    """Plain argmax loop: generate() would stop at EOS or, with min_new_tokens, suppress it,
    while the engine under test (ignore_eos) takes the raw argmax every step."""
    with torch.inference_mode():
        out = hf_model(torch.tensor([prompt], device=device), use_cache=True)
        ids: list[int] = []
        for _ in range(new_tokens):
            ids.append(int(out.logits[0, -1].argmax()))
            out = hf_model(torch.tensor([[ids[-1]]], device=device),
                           past_key_values=out.past_key_values, use_cache=True)
    return ids
