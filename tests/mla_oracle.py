"""transformers' DeepseekV2ForCausalLM as the MLA oracle: tiny random models saved as folders.

Weights are drawn here (not transformers' init, whose std 0.02 makes every logit ~0): every
matrix N(0, 0.15), norms 1 + N(0, 0.1), so the comparison has signal and the norms' weights
are really checked. Vocabulary 49152 (the bundled tokenizer's), so the folder loads without a
tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49152

# Dense MLPs, a query LoRA and YaRN RoPE (mscale in the softmax scale)
DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
             v_head_dim=16, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, max_position_embeddings=512,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 128, "mscale": 0.707,
                              "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0})
# MoE from layer 1 (shared + routed experts, group-limited top-k, scaled), no query LoRA
MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
           n_shared_experts=1, moe_intermediate_size=32, topk_method="group_limited_greedy",
           n_group=4, topk_group=2, routed_scaling_factor=2.0, max_position_embeddings=512)
# DeepSeek-V3: sigmoid routing with a score-correction bias (noaux_tc), normalised top-k,
# query LoRA, RoPE in the half-split layout (rope_interleave False)
V3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
          v_head_dim=16, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
          n_shared_experts=1, moe_intermediate_size=32, n_group=4, topk_group=2,
          routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=False,
          max_position_embeddings=512, model_type="deepseek_v3")


def make_deepseek(folder: Path, shapes: dict, seed: int = 0):
    """Save a random DeepseekV2ForCausalLM (or V3) to `folder`; return it (fp32, eval)."""
    import transformers

    shapes = dict(shapes)
    v3 = shapes.pop("model_type", "deepseek_v2") == "deepseek_v3"
    name = "DeepseekV3" if v3 else "DeepseekV2"
    config = getattr(transformers, name + "Config")(
        vocab_size=VOCAB, num_key_value_heads=shapes["num_attention_heads"],
        attn_implementation="eager", **shapes)
    model = getattr(transformers, name + "ForCausalLM")(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(folder)
    return model


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits (len, V) of one sequence, no cache: every position at once."""
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()
