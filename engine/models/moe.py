"""DeepSeekMoE: shared experts every token passes through, plus top-k routed experts.

Routing as DeepSeek's own code does it (and transformers 5.24 for the cases both cover):
- V2 (`scoring_func` softmax): softmax over the experts' logits; `greedy` takes the top k,
  `group_limited_greedy` first keeps the `topk_group` groups with the best single expert. The
  top-k weights are normalised when `norm_topk_prob` (DeepSeek's V2 code; transformers' V2
  ignores the flag, which no released V2 sets), else scaled by `routed_scaling_factor`.
- V3 (`sigmoid`, `noaux_tc`): sigmoid scores plus a per-expert bias choose the experts (groups
  ranked by the sum of their two best), the unbiased scores weigh them, normalised when
  `norm_topk_prob`, then scaled by `routed_scaling_factor`.
Router logits are computed in fp32 whatever the weights' dtype (transformers keeps the gate
in fp32). Experts run over the tokens routed to them only (a loop over the experts hit).

Shapes: T tokens, C hidden, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.llama import linear
from engine.models.mla_config import MLAConfig


class GatedMLP(nn.Module):
    """SiLU(x W_gate) * (x W_up) W_down, gate and up fused into one Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)  # (T, I) each
        return linear(F.silu(gate) * up, self.down_proj.weight)  # (T, C)


class Router(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, C) -> expert ids (T, K), weights (T, K) fp32."""
        c, k = self.config, self.config.num_experts_per_tok
        logits = F.linear(x.float(), self.weight.float())  # (T, E)
        if c.scoring_func == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()  # (T, E)
            group = choice.view(len(x), c.n_group, -1).topk(2, dim=-1)[0].sum(-1)  # (T, G)
            choice = _keep_groups(choice, group, c.topk_group, float("-inf"))
            ids = choice.topk(k, dim=-1, sorted=False)[1]  # (T, K)
            weights = scores.gather(1, ids)
            if c.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return ids, weights * c.routed_scaling_factor
        scores = logits.softmax(dim=-1, dtype=torch.float32)  # (T, E)
        if c.topk_method == "group_limited_greedy":
            group = scores.view(len(x), c.n_group, -1).max(dim=-1).values  # (T, G)
            scores = _keep_groups(scores, group, c.topk_group, 0.0)
        weights, ids = scores.topk(k, dim=-1, sorted=False)  # (T, K)
        if k > 1 and c.norm_topk_prob:
            return ids, weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * c.routed_scaling_factor


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep: int, fill: float
                 ) -> torch.Tensor:
    """scores (T, E) with experts outside each token's best `keep` groups set to `fill`."""
    t, groups = group_scores.shape
    best = group_scores.topk(keep, dim=-1, sorted=False)[1]  # (T, keep)
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (T, G)
    mask = mask.unsqueeze(-1).expand(t, groups, scores.shape[1] // groups).reshape(t, -1)
    return scores.masked_fill(~mask, fill)


class Experts(nn.Module):
    """E routed experts as stacked weights (transformers' layout)."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        e, c, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, c))
        self.down_proj = nn.Parameter(torch.empty(e, c, i))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
        """x (T, C), ids/weights (T, K) -> (T, C): each token's weighted sum of its experts."""
        out = torch.zeros_like(x)  # (T, C)
        for expert in ids.unique().tolist():
            token, slot = (ids == expert).nonzero(as_tuple=True)  # (n,), (n,)
            gate, up = linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n, I)
            y = linear(F.silu(gate) * up, self.down_proj[expert])  # (n, C)
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out


class MoE(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)  # (T, K) each
        out = self.experts(x, ids, weights)  # (T, C)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
