"""Low-rank adapters (LoRA; Hu et al. 2021, arXiv 2106.09685, Eq. 3) on every linear layer of the attention
and MLP blocks: the baseline that trains as many parameters as an ALLO mask, as low-rank updates of whole
matrices instead of chosen entries (`python -m study`'s "DPO LoRA" arm, train.py's --lora-rank).

    W x  ->  (W + (alpha / r) B A) x,   A [r, in] drawn as nn.Linear draws its weight, B [out, r] = 0,

so the adapted model starts as the model itself; W, the embeddings, the norms and the head stay frozen.
Each adapter hangs on its weight as a parametrization (torch.nn.utils.parametrize): the forward reads
W + (alpha / r) B A, and merge() leaves in each weight that very tensor, so the merged model's outputs
are the adapted model's, bit for bit.
"""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LowRank(nn.Module):
    """The parametrization weight -> weight + (alpha / rank) B A."""

    def __init__(self, weight, rank, alpha):
        super().__init__()
        out_features, in_features = weight.shape
        self.A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's draw, as the LoRA authors' code
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + self.scale * (self.B @ self.A)


def adapted_layers(model):
    """The linear layers that get adapters: every one of the blocks (q, k, v, o; gate, up, down)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


def rank_for(model, n_params):
    """The rank whose adapters hold the number of parameters nearest to n_params (at least 1): an
    adapter of rank r on an [out, in] weight holds r (in + out)."""
    per_rank = sum(m.in_features + m.out_features for m in adapted_layers(model))
    return max(1, round(n_params / per_rank))


def add_adapters(model, rank, alpha=None):
    """Freeze every parameter of `model` and hang a rank-`rank` adapter (alpha default: rank, a scale of
    1) on each adapted layer; returns the adapters' all-True masks by parameter name, for MaskedAdamW."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapted_layers(model):
        parametrize.register_parametrization(m, "weight", LowRank(m.weight, rank, alpha or rank))
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.requires_grad}


def merge(model):
    """Put each adapted weight W + (alpha / r) B A in place of W and drop the adapters: a plain model again,
    every parameter trainable."""
    for m in adapted_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
