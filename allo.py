"""ALLO (ALigning LLMs with Low-redundant Optimization) in plain PyTorch.

Chen, Zhou, Zhao, Wang, Wen: "Not Everything is All You Need: Toward Low-Redundant Optimization
for Large Language Model Alignment", EMNLP 2024 (arXiv 2406.12606). The places where this code
departs from the authors' release: the README's "How it differs from the paper and the release".
Each method function's docstring names its source: the part of the paper it implements (the stages of
Figure 2, the framework figure) or, where the formula or value is the release's (github RUCAIBox/ALLO),
the release file.

The file follows the method, top to bottom:
  0. Per-token log-probabilities, from which every loss is built: token_logps, sft_loss.
  1. Stage 1, key neurons (Figure 2: key neurons locating): score every parameter entry by how much
     a short vanilla-DPO run moves it (importance_from_delta) or by its accumulated DPO gradient
     (grad_importance); keep ONE global top-k% (select_masks); save_masks, mask_summary,
     mask_overlap, trained_fraction, format_table.
  2. Stage 2, forgetting unaligned knowledge (Figure 2: unaligned knowledge forgetting; token-level
     NPO): a rewriter scores each token of a wrong answer (rewriter_token_probs), the tokens it
     would edit get weight (unaligned_token_weights), and their probability is pushed down
     (npo_token_loss; NPO as published: npo_sequence_loss).
  3. Stage 3, learning aligned knowledge (Figure 2: alignment improving; DPO with key tokens): the
     rejected response counts only through its key tokens (key_token_mask, dpo_loss).
  4. The masked optimizer: AdamW that updates, and keeps state for, only the entries of a mask
     (MaskedAdamW, save_optimizer, load_optimizer, optimizer_state_bytes). Its multi-tensor step
     for GPUs, the same bits: bookkeeping/optim.py.

Notation: r_t = log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), the token log-ratio of the
policy pi against the frozen reference pi_ref (the model at the start of the stage).
Conventions: labels are pre-shifted (labels[b, t] is the token logits[b, t]
predicts, -100 = not scored); per-token tensors are [B,T] and 0 outside the response; a mask is a
dict parameter name -> bool tensor of the parameter's shape. "Fix:" marks a departure from the
authors' release. The only model API used is model(input_ids, attention_mask=..., keep=...) -> logits,
keep (bool [B,T]) selecting the positions whose logits are computed ([N,V]).
"""

import json
import re

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# 0. Per-token log-probabilities


def token_logps(logits, labels, chunk_rows=4096):
    """log pi(y_t | x, y_<t) of every label: logits [...,V], labels [...] -> [...] (e.g. [B,T]).

    Computed as logit[label] - logsumexp(logits), so no [B,T,V] log-softmax copy is made.
    Half-precision logits get a float32 logsumexp, chunk_rows rows at a time (without grad the
    extra memory is one chunk; with grad autograd keeps the float32 chunks for backward).
    Returns float32 (float64 for float64 logits), 0 and no gradient where labels == -100.
    """
    scored = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B,T]
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.logsumexp(logits, dim=-1)  # [B,T]
    else:
        rows = logits.reshape(-1, logits.shape[-1]).split(chunk_rows)  # chunks of [rows, V]
        lse = torch.cat([torch.logsumexp(r.float(), dim=-1) for r in rows]).view(labels.shape)
    return torch.where(scored, picked.to(lse.dtype) - lse, 0.0)


def scored_token_logps(logits, labels):
    """token_logps of the logits computed at the scored positions only (model(..., keep=labels !=
    -100) -> [N,V], so a prompt's positions cost no [D,V] matmul), laid back onto labels' shape:
    logits [N,V], labels [B,T] -> [B,T], 0 where labels == -100."""
    scored = labels != -100
    logps = token_logps(logits, labels[scored])  # [N]
    return logps.new_zeros(labels.shape).masked_scatter(scored, logps)


def sft_loss(logits, labels, weights=None, normalizer=None):
    """Token-weighted cross-entropy sum_t w_t * CE_t / sum_t w_t over the batch -> scalar.

    weights [B,T] default to 1 on every scored token (labels != -100); a batch whose weights are
    all 0 gives a loss of 0 with zero gradients, not NaN.
    normalizer (a number) replaces the batch's own sum_t w_t as the denominator, e.g. the total
    weight of every micro-batch of an optimizer step on every process: the micro-batch losses
    then add up to the loss of the whole step. A normalizer <= 0 counts as 1.
    """
    return nll_loss(token_logps(logits, labels), labels, weights, normalizer)


def nll_loss(logps, labels, weights=None, normalizer=None):
    """sft_loss from the token log-probs logps (token_logps' [B,T], or [N] of N scored labels)."""
    w = (labels != -100).to(logps.dtype)
    if weights is not None:
        w = w * weights.to(logps.dtype)
    total = w.sum() if normalizer is None else torch.tensor(normalizer, dtype=logps.dtype,
                                                            device=logps.device)
    return -(w * logps).sum() / torch.where(total > 0, total, 1.0)


# -----------------------------------------------------------------------------
# 1. Stage 1: locating key neurons


@torch.no_grad()
def importance_from_delta(before, after):
    """Stage 1, the release's scorer: I_i = |theta'_i - theta_i|, theta' = theta after a short
    vanilla-DPO run (the dpo stage). Figure 2 writes I_i ~= (theta'_i - theta_i) / alpha (alpha:
    presumably the learning rate); one alpha for every entry, so dividing by it leaves the ranking
    of |I_i| as it is.
    {name: tensor} x 2 -> {name: float32 tensor}.
    Source: ALLO Figure 2, stage 1 (key neurons locating); the absolute value is the release's
    preprocess/gen_neuron_mask/gen_neuron_mask.py."""
    return {name: (after[name].float() - before[name].float()).abs() for name in before}


def grad_importance(model, loss_fn, batches, mode="abs_sum"):
    """Stage 1 without a second model copy: the importance of entry i accumulated over N batches,

        "abs_sum":  I_i = |sum_n g_n,i|   (SGD's weight change over the batches, to first order:
                                           Figure 2's (theta' - theta) / alpha)
        "sum_abs":  I_i = sum_n |g_n,i|

    g_n = gradient of loss_fn(model, batch_n) -> scalar (e.g. the DPO loss of a batch of pairs).
    The model is left as it was: weights untouched, every .grad None (grads present on entry are
    discarded), train/eval mode restored; scoring runs in eval mode (no dropout). Memory: one
    float32 accumulator per trainable parameter on top of one backward's gradients.
    Returns {name: float32 tensor} for every parameter with requires_grad.
    Source: ALLO Figure 2, stage 1 (key neurons locating), read as a summed gradient; the release
    scores a DPO run's weight change instead (importance_from_delta).
    """
    if mode not in ("abs_sum", "sum_abs"):
        raise ValueError(f"mode must be 'abs_sum' or 'sum_abs', not {mode!r}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss_fn(model, batch).backward()
        for name, p in params.items():
            if p.grad is not None:
                scores[name].add_(p.grad if mode == "abs_sum" else p.grad.abs())
                p.grad = None
    model.train(was_training)
    if mode == "abs_sum":
        for s in scores.values():
            s.abs_()
    return scores


def _order_keys(x):
    """float tensor -> int32 tensor in the same order (x_a < x_b iff key_a < key_b), flat."""
    k = (x.float() + 0.0).contiguous().view(torch.int32).reshape(-1)  # + 0.0: -0.0 becomes +0.0
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k)  # negative floats: reverse the magnitude order


def _top_prefix(keys, sizes, budget):
    """The longest prefix of all units ranked by key (descending; ties: earlier tensor first,
    then lower index) whose total size is <= budget. keys: list of int32 [n_j] (one per tensor),
    sizes: entries per unit of each tensor -> list of bool [n_j]. Exact: bisection over the
    32-bit keys, each step counting the units above a candidate threshold."""

    def size_at_least(m):  # total size of the units with key >= m
        return sum(s * int(torch.count_nonzero(k >= m)) for k, s in zip(keys, sizes))

    lo, hi = -(2**31), 2**31  # find the smallest threshold m with size_at_least(m) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if size_at_least(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    keep = [k >= lo for k in keys]
    room = budget - size_at_least(lo)
    if lo > -(2**31):  # units tied at key lo - 1 straddle the budget: take them in order while they fit
        for k, s, kept in zip(keys, sizes, keep):
            tied = k == lo - 1
            n_tied = int(torch.count_nonzero(tied))
            take = min(n_tied, room // s)
            if take:
                kept |= tied & (tied.cumsum(0) <= take)
                room -= take * s
            if take < n_tied:
                break
    return keep


def select_masks(scores, ratio, granularity="entry", exclude_top=0.0):
    """Stage 1: the key neurons, the global top-`ratio` of all entries by importance.

    Source: ALLO Figure 2, stage 1 (key neurons locating); the one global threshold, the ratio 5%
    (R_PER) and exclude_top (L_PER) are the release's preprocess/gen_neuron_mask/gen_neuron_mask.py
    and preprocess/gen_neuron_mask/scripts/run_gen.sh.
    ONE threshold across every tensor (not one per tensor). `exclude_top` first drops the very
    top band of that fraction (the release's l_per): the kept ranks are
    [round(exclude_top * N), round(exclude_top * N) + round(ratio * N)), N = total entries.
    granularity "entry" (the release) keeps exactly round(ratio * N) entries; ties at the
    threshold go to the earlier tensor in `scores` order, then the lower flat index.
    Fix: the release approximates the threshold in bfloat16 from per-tensor candidates.
    granularity "neuron" (the paper's word): a neuron is a row of a weight (one output unit;
    for embed_tokens one token's embedding) scored by the sum of its entries; a 1-D tensor
    (norm gains) has one neuron per entry. Whole neurons are kept in rank order while the entry
    count stays <= round(ratio * N), so the count can fall short by less than one row.
    Scores are compared in float32. scores {name: tensor} -> masks {name: bool tensor of the same shape}.
    The same as one torch.topk over all entries: with skip = round(exclude_top * N) and
    n_keep = round(ratio * N), "entry" computes

        flat = torch.cat([s.float().flatten() for s in scores.values()])
        threshold = flat.topk(skip + n_keep).values[-1]

    and keeps every entry above threshold and, of the entries equal to it, the first in flat order
    until skip + n_keep are kept, less the first skip in that ranking: exactly the flat indices
    flat.sort(descending=True, stable=True).indices[skip:skip + n_keep]. "neuron" ranks the units
    (row sums, or entries of 1-D tensors) the same way and keeps the longest rank prefix of units
    with <= skip + n_keep entries, less the one with <= skip entries.
    Why a bisection instead: topk needs all N scores concatenated into one more float32 copy
    (28 GB for 7e9 entries) plus its workspace (measured on CPU at 5e7 entries: about 21 bytes an
    entry at peak, against about 9 here, masks included), and leaves the ties it returns unspecified.
    The bisection is exact and memory-sane at ~1e8 entries: one int32 key per entry, kept tensor by
    tensor, never concatenated, and 33 counting passes over them (about 1 s for 5e7 entries on 2
    CPU cores).
    """
    if granularity not in ("entry", "neuron"):
        raise ValueError(f"granularity must be 'entry' or 'neuron', not {granularity!r}")
    if not (0.0 <= ratio <= 1.0 and 0.0 <= exclude_top <= 1.0 and ratio + exclude_top <= 1.0):
        raise ValueError(f"ratio {ratio} and exclude_top {exclude_top} must lie in [0, 1], with a sum <= 1")
    nan = next((name for name, s in scores.items() if torch.isnan(s).any()), None)
    if nan is not None:
        raise ValueError(f"the scores of {nan} hold NaN: no entry can be ranked against it")
    keys, sizes = [], []
    for s in scores.values():
        s = s.detach()
        if granularity == "neuron" and s.dim() >= 2:
            keys.append(_order_keys(s.float().reshape(s.shape[0], -1).sum(1)))  # [rows]
            sizes.append(s[0].numel())
        else:
            keys.append(_order_keys(s))  # [numel]
            sizes.append(1)
    total = sum(s.numel() for s in scores.values())
    skip, n_keep = round(exclude_top * total), round(ratio * total)
    top = _top_prefix(keys, sizes, skip + n_keep)
    band = _top_prefix(keys, sizes, skip) if skip else [torch.zeros_like(t) for t in top]
    return {name: (t & ~b).view(-1, 1).expand(-1, n).reshape(s.shape)
            for (name, s), t, b, n in zip(scores.items(), top, band, sizes)}


def save_masks(path, masks):
    """Write masks (bool tensors keyed by parameter name) as safetensors."""
    save_file({name: m.contiguous() for name, m in masks.items()}, path)


def module_type(name):
    """Hugging Face Llama parameter name -> attn.q/k/v/o, mlp.gate/up/down, embed, norm, lm_head."""
    m = re.search(r"(self_attn|mlp)\.(\w+)_proj\.", name)
    if m:
        return ("attn." if m[1] == "self_attn" else "mlp.") + m[2]
    if "embed_tokens" in name:
        return "embed"
    if "norm" in name:
        return "norm"
    return "lm_head" if "lm_head" in name else "other"


def mask_summary(masks):
    """Density of a mask overall, per layer and per module type -> list of rows
    {"by": "all"|"layer"|"type", "group", "selected", "total", "density"}; layers are
    layers.{i} and the modules outside them (embed_tokens, norm, lm_head)."""
    counts = {}
    for name, m in masks.items():
        layer = re.match(r"layers\.\d+", name)
        for key in (("all", "all"), ("layer", layer[0] if layer else name.split(".")[0]),
                    ("type", module_type(name))):
            c = counts.setdefault(key, [0, 0])
            c[0] += int(m.sum())
            c[1] += m.numel()
    order = {"all": 0, "layer": 1, "type": 2}
    return [{"by": by, "group": group, "selected": sel, "total": n, "density": sel / max(n, 1)}
            for (by, group), (sel, n) in sorted(counts.items(), key=lambda kv: order[kv[0][0]])]


def mask_overlap(a, b):
    """Overlap of two masks: sizes, intersection, union, Jaccard |A&B|/|A|B| and |A&B|/|A|.
    A name missing from one mask counts as an empty mask there."""
    n_a = sum(int(m.sum()) for m in a.values())
    n_b = sum(int(m.sum()) for m in b.values())
    both = sum(int((m & b[name]).sum()) for name, m in a.items() if name in b)
    either = n_a + n_b - both
    return {"a": n_a, "b": n_b, "both": both, "either": either,
            "jaccard": both / max(either, 1), "a_in_b": both / max(n_a, 1)}


def trained_fraction(masks, model=None):
    """The fraction of entries the masks train: of the model's parameters (a parameter without a
    mask is frozen), or without a model of the entries the masks cover."""
    total = sum(t.numel() for t in (model.parameters() if model is not None else masks.values()))
    return sum(int(m.sum()) for m in masks.values()) / total


def format_table(rows):
    """List of dicts with the same keys -> markdown table."""
    cols = list(rows[0])

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 2. Stage 2: forgetting unaligned knowledge (token-level NPO)


@torch.no_grad()
def rewriter_token_probs(rewriter, batch):
    """Stage 2, the token-level reward model: p_t = p_rewriter(y_t | question, reference
    solution, wrong response y, y_<t), teacher-forced on the wrong response y itself; high where
    the rewriter would keep y_t, low where it would edit it.

    batch: collated dict (input_ids, pre-shifted labels, optional attention_mask) with the
    rewriter prompt as prompt and the wrong response as response; right-padded rows (as
    data.collate makes them) need no attention_mask, and without one the attention can run a fused
    kernel. Returns float32 [B,T], 0 where labels == -100. Runs in eval mode without gradient; the
    rewriter's mode is restored.
    Source: ALLO Figure 2, stage 2 (unaligned knowledge forgetting), its small-LLM rewriter; p_t as
    the release's preprocess/gen_forgetting_data/gen_tlr.py computes it.
    """
    was_training = rewriter.training
    rewriter.eval()
    labels = batch["labels"]
    logits = rewriter(batch["input_ids"], attention_mask=batch.get("attention_mask"), keep=labels != -100)
    rewriter.train(was_training)
    logps = scored_token_logps(logits, labels)
    return torch.where(labels != -100, logps.exp(), 0.0)  # [B,T]


def unaligned_token_weights(probs, labels, tau=0.5, mode="hard"):
    """Stage 2: forgetting weight w_t of each token of a wrong response from the rewriter's p_t,
    hard w_t = 1[p_t < tau] (Figure 2: only the unaligned tokens are forgotten) or soft
    w_t = 1 - p_t; 0 where labels == -100. probs, labels [B,T] -> float32 [B,T].
    Fix: the release passes p_t itself as the weight (its 1[p_t < 0.5] is commented out).
    Source: ALLO Figure 2, stage 2 (unaligned knowledge forgetting); tau = 0.5 and the release's
    weights: preprocess/gen_forgetting_data/gen_tlr.py."""
    if mode == "hard":
        w = (probs < tau).float()
    elif mode == "soft":
        w = 1.0 - probs.float()
    else:
        raise ValueError(f"mode must be 'hard' or 'soft', not {mode!r}")
    return torch.where(labels != -100, w, 0.0)


def npo_token_loss(policy_logps, ref_logps, weights, beta=0.1, normalizer=None):
    """Stage 2, the forgetting loss (token-level NPO, as in the release):

        L = sum_t -w_t * log sigmoid(-beta * r_t)  /  #{t : w_t != 0}     (over the whole batch)

    Its gradient lowers log pi(y_t) of the weighted tokens, bounded (unlike gradient ascent).
    Inputs [B,T] (log-probs 0 outside the response). Tokens with w_t = 0 get exactly zero
    gradient; a batch without any weighted token gives 0, not NaN.
    normalizer (a count) replaces the batch's own #{t : w_t != 0}, e.g. the weighted tokens of
    every micro-batch of an optimizer step on every process: the micro-batch losses then add up
    to the loss of the whole step. A normalizer below 1 counts as 1.
    Source: ALLO Figure 2, stage 2 (unaligned knowledge forgetting, NPO); the token-level form, the
    mean over the tokens with w_t != 0 and beta 0.1 are the release's train/train_forgetting.py.
    NPO: Zhang et al. 2024 (arXiv 2404.05868).
    """
    r = policy_logps - ref_logps  # [B,T]
    losses = -weights * F.logsigmoid(-beta * r)  # [B,T]
    count = (weights != 0).sum() if normalizer is None else torch.tensor(normalizer, device=losses.device)
    return losses.sum() / count.clamp(min=1)


def npo_sequence_loss(policy_logps, ref_logps, beta=0.1):
    """NPO as published (Zhang et al. 2024, arXiv 2404.05868), the sequence-level alternative to
    npo_token_loss:

        L = mean_b -(2 / beta) * log sigmoid(-beta * sum_t r_t)

    Inputs [B,T] (0 outside the response) -> scalar.
    """
    r = (policy_logps - ref_logps).sum(-1)  # [B]
    return (-2.0 / beta * F.logsigmoid(-beta * r)).mean()


# -----------------------------------------------------------------------------
# 3. Stage 3: learning aligned knowledge (DPO with key tokens)


def key_token_mask(rejected_logratios, response_mask, eps):
    """Stage 3: the key tokens m_t of a rejected response, per sequence the ceil(eps * T_b)
    tokens with the largest -r_t (those whose probability the policy pushes down the most),
    T_b = that sequence's number of response tokens. Ties go to the earlier token, so exactly
    ceil(eps * T_b) are kept. Padding and prompt are never kept. When every r_t of a sequence is
    0 (policy == reference, e.g. the first step) all its response tokens are kept, whatever eps.
    Fix: the release uses k = int(eps * T) with T the padded batch length, keeps every tie at
    the threshold and drops exact zeros.
    rejected_logratios [B,T], response_mask [B,T] bool -> bool [B,T] (no gradient).
    Source: ALLO Figure 2, stage 3 (alignment improving: noisy tokens of the rejected response);
    ranking by the policy's -r_t is the release's train/train_improving.py gen_mask.
    """
    r = rejected_logratios.detach()
    resp = response_mask.bool()
    k = torch.ceil(eps * resp.sum(-1).double() - 1e-9).clamp(min=0)  # [B]; 1e-9: 0.3 * 10 -> 3
    key = torch.where(resp, -r, float("-inf"))  # padding ranks last
    order = key.sort(dim=-1, descending=True, stable=True).indices  # [B,T]; stable: earlier first
    positions = torch.arange(r.shape[-1], device=r.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank of every token
    keep = (rank < k[:, None]) & resp
    unmoved = ((r == 0) | ~resp).all(-1, keepdim=True)  # [B,1]
    return keep | (unmoved & resp)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
             rejected_token_mask=None):
    """Stage 3, DPO (Rafailov et al. 2023) where the rejected response counts only through its
    key tokens m_t (key_token_mask):

        L = -log sigmoid(beta * (sum_t r^c_t - sum_t m_t r^r_t)),
        r_t = log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)

    Inputs: per-token log-probs [B,T] (0 outside the response); rejected_token_mask [B,T] bool,
    None = every rejected token counts (vanilla DPO). Every chosen token counts.
    Returns losses [B], chosen_rewards [B], rejected_rewards [B]; the rewards are DPO's implicit
    rewards beta * sum_t r_t over ALL response tokens (not masked, so reward margins compare
    with vanilla DPO), detached.
    Source: DPO, Eq. 7 of arXiv 2305.18290; the key-token mask: ALLO Figure 2, stage 3 (alignment
    improving), in the form of the release's train/train_improving.py dpo_loss.
    """
    chosen_r = policy_chosen - ref_chosen  # [B,T]
    rejected_r = policy_rejected - ref_rejected  # [B,T]
    kept_rejected_r = rejected_r if rejected_token_mask is None else torch.where(
        rejected_token_mask.bool(), rejected_r, 0.0)
    # Eq. 7 of arXiv 2305.18290, the rejected sum over its key tokens only (all without a mask)
    losses = -F.logsigmoid(beta * (chosen_r.sum(-1) - kept_rejected_r.sum(-1)))  # [B]
    return losses, beta * chosen_r.sum(-1).detach(), beta * rejected_r.sum(-1).detach()


# -----------------------------------------------------------------------------
# 4. The masked optimizer


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (as torch.optim.AdamW) on the masked entries only: the optimizer of Stages 2 and 3.

    Source: ALLO Figure 2 (stages 2 and 3 update only the located key neurons); the release's
    MaskAdamW_HF in train/train_forgetting.py and train/train_improving.py; AdamW: arXiv 1711.05101.

    - Entries outside the mask are never written: they stay bit-identical after any number of
      steps, also with weight decay. Fix: the release keeps dense moments, masks only the first
      moment and decays every entry.
    - State per parameter: the flat int32 indices of its selected entries and their two moments
      (12 bytes per selected float32 entry: 15% of AdamW's state at a 10% mask). A full mask keeps
      dense moments and no indices, so the full-parameter stages use this optimizer at AdamW's
      cost, plus one kept buffer the size of the largest full-mask tensor (update()). Parameters
      with an empty mask, or absent from `masks`, get no state.
    - The step count is one per group; a parameter without .grad at a step is skipped.
    - Decoupled weight decay only on parameters with >= 2 dims (not on norm gains).
    - Reads p.grad at the selected entries only, so clipping the dense gradients first keeps the
      release's clip (max norm 1.0); reads the weights afresh at every step.
    - lr, betas, eps, weight_decay live in param_groups: lr schedulers work as usual.
    - state_dict() = {"state": {name: {"idx", "exp_avg", "exp_avg_sq"}} (1-D tensors),
      "param_groups": [JSON-able dicts]}; save_optimizer / load_optimizer keep it as safetensors.
    """

    def __init__(self, named_parameters, masks, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        params = dict(named_parameters)
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"masks name no parameter of the model: {unknown[:5]}")
        names = [name for name in params if name in masks]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, step=0)
        self.scratch = None  # update()'s buffer for the full masks' denominators, kept between steps
        super().__init__([{"params": [params[n] for n in names], "names": names}], defaults)
        for name in names:
            p, mask = params[name], masks[name]
            if mask.shape != p.shape or not p.is_contiguous() or p.numel() >= 2**31:
                raise ValueError(f"{name}: mask {tuple(mask.shape)} for a parameter "
                                 f"{tuple(p.shape)} (must match, contiguous, < 2**31 entries)")
            if mask.all():  # a full mask needs no indices: dense moments, as torch.optim.AdamW
                self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                continue
            idx = mask.reshape(-1).nonzero().squeeze(1).to(device=p.device, dtype=torch.int32)
            if idx.numel():
                self.state[p] = {"idx": idx, "exp_avg": p.new_zeros(idx.numel()),
                                 "exp_avg_sq": p.new_zeros(idx.numel())}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] += 1
            self.update([p for p in group["params"] if p.grad is not None and p in self.state], group)
        return loss

    def update(self, params, group):
        """One AdamW step of the selected entries of `params` (each has .grad and state), tensor by
        tensor (bookkeeping/optim.py's subclass runs it as multi-tensor ops). The full-mask tensors'
        denominators go into one buffer the size of the largest of them, made at the first step and
        kept: a fresh tensor per parameter at every step is fresh memory, whose pages the system maps
        in anew each time (on 2 CPU cores a full step over SmolLM2-135M's tensors took 0.50 s that
        way, 0.23 s with the buffer kept)."""
        full = [p for p in params if "idx" not in self.state[p]]
        largest = max(full, key=torch.numel, default=None)
        if largest is not None and (self.scratch is None or self.scratch.numel() < largest.numel()):
            self.scratch = torch.empty_like(largest).view(-1)
        for p in params:
            self._update_one(p, group, self.scratch)

    def _update_one(self, p, group, scratch=None):
        """One AdamW step of the selected entries of p, as torch.optim.AdamW's loop makes it (the
        same ops on the same values: the same bits). scratch: a flat buffer of at least p's size
        and dtype for a full mask's denominator, else a new tensor."""
        lr, (beta1, beta2), eps, wd = (group[k] for k in ("lr", "betas", "eps", "weight_decay"))
        bias_correction1 = 1 - beta1 ** group["step"]
        bias_correction2_sqrt = (1 - beta2 ** group["step"]) ** 0.5
        state = self.state[p]
        idx, exp_avg, exp_avg_sq = state.get("idx"), state["exp_avg"], state["exp_avg_sq"]
        if idx is None:  # full mask: update in place
            grad, theta = p.grad, p
        else:
            idx = idx.long()  # int32 at rest (compact state), int64 for the indexing kernels
            flat = p.view(-1)
            grad = p.grad.reshape(-1).index_select(0, idx)  # [n_sel] gathered gradient
            theta = flat.index_select(0, idx)  # [n_sel] gathered weights
        if wd != 0 and p.dim() >= 2:
            theta.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if idx is None and scratch is not None and scratch.dtype == p.dtype:
            denom = torch.sqrt(exp_avg_sq, out=scratch[:p.numel()].view_as(p))
        else:
            denom = exp_avg_sq.sqrt()
        denom.div_(bias_correction2_sqrt).add_(eps)  # in place: torch's `sqrt() / c` makes one more tensor
        theta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if idx is not None:
            flat.index_copy_(0, idx, theta)  # scatter back: only the selected entries are written

    def state_dict(self):
        state = {name: {k: v.view(-1) for k, v in self.state[p].items()}  # full-mask moments flat
                 for g in self.param_groups for name, p in zip(g["names"], g["params"]) if p in self.state}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        saved_groups = state_dict["param_groups"]
        if [g["names"] for g in saved_groups] != [g["names"] for g in self.param_groups]:
            raise ValueError("the saved optimizer covers other parameters than this one")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update(saved, betas=tuple(saved["betas"]))
            for name, p in zip(group["names"], group["params"]):
                self.state.pop(p, None)
                if name in state_dict["state"]:
                    s = {k: v.to(p.device, copy=True) for k, v in state_dict["state"][name].items()}
                    if "idx" not in s:  # full mask: the moments take the parameter's shape
                        s = {k: v.view(p.shape) for k, v in s.items()}
                    self.state[p] = s


def optimizer_state_bytes(opt):
    """Bytes of every tensor in an optimizer's state (works for any torch optimizer)."""
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def save_optimizer(path, opt):
    """Write a MaskedAdamW's state_dict as safetensors: tensors as "<parameter name>/<key>",
    param_groups as JSON in the file's metadata."""
    sd = opt.state_dict()
    tensors = {f"{name}/{k}": v.contiguous() for name, s in sd["state"].items() for k, v in s.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(path, opt):
    """Restore a MaskedAdamW from save_optimizer's file (same parameter names)."""
    state = {}
    with safe_open(path, framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            name, k = key.rsplit("/", 1)
            state.setdefault(name, {})[k] = f.get_tensor(key)
    opt.load_state_dict({"state": state, "param_groups": groups})
