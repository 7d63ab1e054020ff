"""Accelerator memory of every ALLO stage of train.py, item by item, from a Llama config.json.

    python -m tools.memory_plan configs/llama-3.2-1b.json     # batch 4 x 512 tokens, ratios 0.1, 24 GiB
    python -m tools.memory_plan configs/llama-2-7b.json --batch-size 2 --gpu-gib 80 --checkpointing on
    python -m tools.memory_plan path/to/hf_model_dir --device cpu   # the float32 CPU path
    python -m tools.memory_plan --check                             # the formulas against measurements

Items of a stage (bytes on the accelerator; trainer.fit and train.py's stage functions):
  weights       float32 master weights as train.py loads them (--weights-dtype bfloat16: a what-if)
  grads         dense: every parameter has requires_grad; the masks act in the optimizer only
  optimizer     MaskedAdamW: int32 index + two moments (param dtype) per selected entry, 12 B per
                entry in float32; a full mask keeps dense moments and no index (8 B, as AdamW). A
                mask is one global top-k: per tensor the count varies, in total round(ratio * N)
  masks         bool, 1 B per entry: the stage's mask, and trainer.full_masks' all-True masks in the
                full-parameter stages, alive for the whole fit()
  scoring       the mask stage: the float32 scores (importance_from_delta keeps no autograd graph),
                select_masks' int32 keys and bool lists
  activations   what autograd saves for one micro-batch of `rows` sequences of T tokens (DPO stages:
                2 x --batch-size rows, chosen and rejected) in trainer.sft/dpo/npo_batch_loss, op by
                op in activation_bytes. The blocks see every position; the final norm, the head, the
                logits and token_logps only the scored ones, --response-len a row (model(..., keep=
                labels != -100) -> [n, V]; allo.scored_token_logps scatters them back into [rows, T]).
                Training passes no attention mask, so SDPA runs a fused kernel (see
                attention_kernel); with --grad-checkpoint: each block's input, plus one block
                recomputed during backward
  bf16 copies   autocast casts every float32 linear weight to bf16 once per forward and caches it
                until the autocast region exits (saved for backward without checkpointing)
  logit grads   backward of token_logps' logsumexp: three float32 [n (<= 4096 chunked), V]
                temporaries at once, n = rows x --response-len, while every activation is still
                saved. Every loss (SFT, the rewriter's, DPO with --nll) is built on token_logps: no
                float32 logits copy. Past model.HEAD_CHUNK (2^24) logit entries the head runs chunk
                by chunk (model.HeadLogps): no logits saved, and its backward holds one chunk's
                logit gradient and the head's [V, D] weight gradient (logit_grad_bytes)
  no-grad pass  trainer.reference_logps (--ref-batch-size rows a batch, one batch at a time) or the
                rewriter's scoring (--batch-size rows a batch), both unmasked as in training, with
                only weights (and masks) resident: the largest of the forward's peak (one block's
                tensors over rows x T), the head's, and the scored positions' logits with
                token_logps' float32 chunk; autocast's bf16 copies (cached without autograd too)
                live until the autocast region exits: before token_logps in trainer.forward_logps,
                after it in the rewriter's scoring (train.score_tokens' region covers
                allo.rewriter_token_probs); see no_grad_pass_bytes
  KV cache      model.generate's keys and values, [n_layers, --gen-batch-size, n_kv_heads,
                --prompt-len + --new-tokens, head_dim] each, in the weights' dtype (float32 under
                autocast too); row "sample / eval (generate)": the sample stage, the SFT validation
                and eval.py, with the prefill's peak (a masked forward over the prompts, the last
                position's logits, sample_next) in column no-grad pass; see generation_bytes
total = the largest of these moments (column "at"): end of forward, first backward op (logit
grads), end of backward (all gradients + the first block), optimizer step, no-grad pass, mask
selection, generation. Gradients are freed after every step (zero_grad(set_to_none)), so with
--grad-accum 1 they never coexist with a forward's activations. The rewriter trains and scores 3 x
--seq-len tokens (train.py's rewriter max_len) with responses of --response-len. Not counted: the
CUDA context and allocator slack (~0.5-1 GiB), the fused attention kernels' workspaces.

--check measures on tiny models (CPU), through trainer.py's, allo.py's and model.py's own
functions, with torch.autocast("cpu", bfloat16) standing in for their CUDA autocast (a region that
does nothing on a CPU but under --cpu-bf16, whose float32 attention the stand-in leaves out):
trainer.py's functions get the model wrapped in StandIn, whose forward runs under the stand-in, so
the region covers the model's forward as trainer.py's own does;
the rewriter's scoring runs under the stand-in as train.score_tokens runs it under autocast; and
model.generate, whose own autocast region wraps its call of the model, runs on a
StandInTransformer, a Transformer whose forward runs under the stand-in (nothing is patched). It
measures the parameter, gradient, optimizer and mask bytes exactly (a real MaskedAdamW at a real
global mask), and the KVCache model.generate allocates (float32 weights with and without the
stand-in, bfloat16 weights); what autograd saves in trainer.sft/dpo/npo_batch_loss with
saved_tensors_hooks (distinct storages, by data_ptr), in float32, under the autocast stand-in and
with bfloat16 weights, with and without checkpointing; and, where glibc's mallinfo2 is available,
the allocator's peak in the logit gradients, trainer.reference_logps (where the logits dominate,
and where the forward does), the rewriter's scoring (allo.rewriter_token_probs as
train.score_tokens calls it), model.generate (sampling; float32, under the stand-in, bfloat16
weights) and an optimizer step (sampled after every aten op: temporaries inside one op are not
seen), and the memory importance_from_delta's scores hold.
"""

import argparse
import ctypes
import json
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import allo
import model as modelpy  # its HEAD_CHUNK, set by head_chunked (functions here name their models `model`)
import trainer
from model import HEAD_CHUNK, ModelConfig, Transformer
from trainer import Norms

GiB = 2**30
CHUNK_ROWS = 4096  # allo.token_logps' chunk_rows for half-precision logits


def load_config(path):
    """Hugging Face Llama, Qwen2 or Qwen3 config.json (the file or its directory) -> ModelConfig.
    RoPE scaling does not change memory, so unlike model.config_from_hf this takes any and ignores
    it."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(file) as f:
        hf = json.load(f)
    heads, arch = hf["num_attention_heads"], hf.get("model_type", "llama")
    head_size = hf.get("head_dim") if hf.get("head_dim") != hf["hidden_size"] // heads else None
    return ModelConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                       hidden_dim=hf["intermediate_size"],
                       tie_embeddings=hf.get("tie_word_embeddings", False),
                       arch=arch if arch in ("qwen2", "qwen3") else "llama", qkv_bias=arch == "qwen2",
                       qk_norm=arch == "qwen3", head_size=head_size)


# ----------------------------------------------------------------------------- the formulas


def param_counts(cfg):
    """Entries of model.Transformer: all, the ones autocast casts (every linear weight and the
    head; embedding lookup and norm gains stay float32), per block, the largest tensor."""
    D, q, kv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = 2 * D * q + 2 * D * kv + 3 * D * cfg.hidden_dim  # q, o; k, v; gate, up, down
    layer += (q + 2 * kv) * cfg.qkv_bias  # Qwen2's q, k, v biases (autocast casts them too)
    head = cfg.vocab_size * D
    norms = 2 * D + 2 * cfg.head_dim * cfg.qk_norm  # Qwen3's q and k norms
    total = head * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * (layer + norms) + D
    return {"total": total, "cast": cfg.n_layers * layer + head, "layer_cast": layer,
            "bias": cfg.n_layers * (q + 2 * kv) * cfg.qkv_bias,  # cast, but saved by no product
            "largest": max(head, D * max(D, cfg.hidden_dim))}


def optimizer_bytes(n, ratio, wbytes):
    """allo.MaskedAdamW's state for a global mask of round(ratio * n) of n entries."""
    if ratio >= 1:
        return 2 * wbytes * n  # full mask: dense exp_avg and exp_avg_sq, no index
    return (4 + 2 * wbytes) * round(ratio * n)  # int32 index + two moments per selected entry


def step_bytes(largest, n, ratio, wbytes):
    """Memory of MaskedAdamW.step beyond its state, on the largest tensor: denom's sqrt (divided in
    place); with a partial mask also int64 indices and the gathered grad and weights, for at most all
    of the tensor or all round(ratio * n) selected entries (per-tensor counts of a global mask vary).
    With a full mask the sqrt goes into one buffer the size of the largest tensor: the multi-tensor
    step (CUDA) makes it per bucket, as counted here; the CPU's per-tensor loop makes it at its first
    step and keeps it, so on a CPU every later phase holds these bytes too (not counted)."""
    if ratio >= 1:
        return wbytes * largest
    return (8 + 3 * wbytes) * min(largest, round(ratio * n))


def attention_kernel(device):
    """The scaled_dot_product_attention kernel torch 2.13 picks for model.Attention (enable_gqa=True).

    Training, trainer.reference_logps and the rewriter's scoring pass no mask (data.collate pads on
    the right: causal attention alone is exact), so SDPA runs with is_causal=True, and on CUDA
    (sm80 and newer, bf16 under autocast, head_dim <= 256) the flash kernel takes it, GQA included:
    it reads the grouped k and v as they are (no repeat), so GQA and MHA models alike get "flash".
    It saves q, k, v, the output and a float32 logsumexp [rows, H, T], as do the CPU flash kernel
    and cuDNN's, which recent torch tries first on sm90/sm100 with cuDNN > 9.15. model.generate
    alone passes a mask (its prompts are left-padded), which SDPA turns into a bias in q's dtype
    for the kernel that takes it (CUDA: cuDNN or memory-efficient; CPU: flash); no autograd there."""
    return "flash-cpu" if device == "cpu" else "flash"


def activation_bytes(cfg, rows, T, *, autocast, wbytes=4, ckpt=False, loss="dpo", scored=None,
                     head_chunk=None):
    """Bytes autograd saves in one micro-batch: model.py op by op, allo.token_logps, the loss.

    autocast: bf16 autocast (CUDA path; with wbytes 4 it casts); wbytes: 4 float32, 2 bfloat16
    weights. loss: "sft" (trainer.sft_batch_loss, also the rewriter's), "dpo" (dpo_batch_loss;
    --nll saves nothing more) or "npo" (npo_batch_loss). scored: the positions with a label (of
    rows * T, the default), the only ones the final norm and the head see (model(..., keep=)).
    Returns "layer" (one block), "layers" (what the blocks keep), "recompute", "other"
    (embedding, RoPE, the keep index, final norm), "head" (logits, token_logps, loss) and
    "cast_saved" (bf16 weight copies autograd saves). Past head_chunk (model.HEAD_CHUNK) logit
    entries the head runs chunk by chunk (model.HeadLogps): it saves the final norm's output, the
    targets and their logsumexp, and no logits, and no bf16 copy of the head's weight.
    """
    N, D, H, hd, V = rows * T, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    n = N if scored is None else scored
    chunked = n * V > (HEAD_CHUNK if head_chunk is None else head_chunk)  # trainer.scored_logps' rule
    kv = cfg.n_kv_heads * hd
    c = 2 if autocast or wbytes == 2 else 4  # dtype of the linears' outputs and of the logits
    r = wbytes  # residual stream (embedding dtype; float32 + bf16 promotes to float32)

    def rmsnorm(positions, consumers):  # x in float32 (pow, mul), rsqrt [.,1], x * rsqrt in x's
        # dtype (weight * .), and the linears' input: with autocast and a float32 residual every
        # consumer casts its own bf16 copy (autocast caches only leaf tensors), else one shared
        return positions * (4 * D + 4 + r * D + (consumers * 2 * D if autocast and r == 4 else r * D))

    # fused kernel without a mask (attention_kernel): rotated q, k, v, the output (o_proj reads
    # a view), float32 logsumexp [rows, H, T]
    q = H * hd  # D, but for a head size of its own (Qwen3)
    attention = N * c * (2 * q + 2 * kv) + rows * H * T * 4
    mlp = N * 4 * c * cfg.hidden_dim  # gate, up, silu(gate), silu(gate) * up
    # Qwen3's RMSNorm of each head's queries and keys: per entry its float32 input and normed
    # values (and its output in the linears' dtype under a cast), per head row the rsqrt (measured
    # with --check's saved_tensors_hooks, exact)
    qk_norm = N * ((q + kv) * (6 if c == 2 else 8) + (H + cfg.n_kv_heads) * 4) if cfg.qk_norm else 0
    layer = rmsnorm(N, 3) + attention + qk_norm + rmsnorm(N, 2) + mlp
    # int64 ids (embedding), float32 cos and sin; the int64 index [n] of the kept positions (keep=,
    # trainer.scored_logps; the same tensor as the scatter's index in trainer.forward_logps); the
    # final norm of the n kept positions (chunked: HeadLogps saves the norm's output itself, in the
    # residual's dtype, and casts inside)
    other = N * (8 + 2 * 4 * hd) + 8 * n + (n * (4 * D + 4 + 2 * r * D) if chunked else rmsnorm(n, 1))
    # checkpoint() keeps only each block's input
    layers, recompute = (cfg.n_layers * N * r * D, layer) if ckpt else (cfg.n_layers * layer, 0)
    # gather saves the logits [n, V], logsumexp its float32 input: the same tensor for float32
    # logits, bf16 logits + their float32 chunk copies
    logits = 4 * V if c == 4 else (2 + 4) * V
    # sft: the weights [n]; dpo: the rejected half's key-token mask [rows / 2, T]; npo: weights,
    # logsigmoid's input and buffer [rows, T] (dpo and npo work on forward_logps' scattered [rows, T])
    loss_bytes = {"sft": 4 * n, "dpo": N // 2, "npo": 12 * N}[loss]
    head = n * (logits + 8 + 4 + 1) + loss_bytes  # + int64 gather index, logsumexp, where's mask
    if chunked:  # HeadLogps: int64 targets, float32 logsumexp
        head = n * (8 + 4) + loss_bytes
    n_cast = param_counts(cfg)["cast"] - param_counts(cfg)["bias"] if not ckpt else V * D  # ckpt: the head's
    n_cast -= V * D if chunked else 0  # HeadLogps saves the float32 weight itself
    cast_saved = 2 * n_cast if autocast and wbytes == 4 else 0
    return {"layer": layer, "layers": layers, "recompute": recompute, "other": other, "head": head,
            "cast_saved": cast_saved}


def logit_grad_bytes(V, n, chunked, D=0, head_chunk=HEAD_CHUNK):
    """allo.token_logps' backward: logsumexp_backward = grad * (x - lse).exp(), three float32
    [n, V] tensors alive at once; n = the scored positions (the head's rows), one chunk of them
    for half-precision logits. Past head_chunk logit entries (model.HeadLogps' backward; D: the
    model's width): one chunk's logit gradient, float32 [c, V] with c = head_chunk // V rows, made
    in place from its recomputed logits (and under autocast the bf16 copies of it and of its
    transpose that the two products cast), beside the weight gradient it accumulates, float32
    [V, D], and one product's [V, D] (under autocast bf16, with the weight's bf16 copy)."""
    if n * V > head_chunk:
        return 4 * V * min(n, max(1, head_chunk // V)) * (2 if chunked else 1) + 8 * V * D
    return 3 * 4 * V * (min(n, CHUNK_ROWS) if chunked else n)


def cast_copies(cfg, autocast, wbytes):
    """autocast's bf16 copies of the float32 linear weights and the head (0 without a cast), and
    those of the blocks only: the cache fills layer by layer, the head's last."""
    if not autocast or wbytes != 4:
        return 0, 0
    return 2 * param_counts(cfg)["cast"], 2 * cfg.n_layers * param_counts(cfg)["layer_cast"]


def forward_bytes(cfg, rows, T, *, autocast, wbytes, masked=False, cached=False):
    """model.Transformer.forward's own tensors without autograd over rows x T tokens, weights,
    autocast's copies and the logits aside: "base", the inputs and what lives through the forward
    (int64 ids and labels or attention mask, float32 cos and sin [rows, 1, T, hd]; masked, as
    model.generate calls it: the bool valid, int64 positions and the bool mask [rows, 1, T, T]),
    and "peak", base plus the largest moment of one block, beside its input x (the forward still
    holds it) and the normed x:
      rope    q, k, v, then apply_rope(q): x * cos and rotated * sin in float32 (cos is), rotated,
              their float32 sum
      sdpa    q, k, v (cached: views of the cache, cast to bf16 under autocast when it is float32),
              the output and a float32 logsumexp [rows, H, T]; masked: the mask as a bias in q's dtype
      mlp     the residual after attention (the input is still held), silu(gate), up and their
              product (gate is freed by then)
    Temporaries inside one op (the attention kernel's own buffers) are not counted."""
    N, D, H, hd, F = rows * T, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.hidden_dim
    kv = cfg.n_kv_heads * hd
    c = 2 if autocast or wbytes == 2 else 4  # the linears' outputs
    r = wbytes  # the residual stream and the norms' outputs
    base = N * (16 + 2 * 4 * hd) + (N * (1 + 8 + T) if masked else 0)
    kv_sdpa = (4 * kv if autocast and wbytes == 4 else 0) if cached else 2 * c * kv
    moments = {"rope": N * (c * D + 2 * c * kv + 4 * D + c * D + 4 * D + 4 * D),
               "sdpa": N * (c * D + kv_sdpa + c * D + 4 * H) + (N * T * c if masked else 0),
               "mlp": N * (r * D + 3 * c * F)}
    return {"base": base, "peak": base + N * 2 * r * D + max(moments.values())}


def no_grad_pass_bytes(cfg, rows, T, scored, *, autocast, wbytes, logps_in_autocast=False,
                       inside_ops=True, head_chunk=HEAD_CHUNK):
    """Peak of trainer.reference_logps' or the rewriter's scoring's forward without autograd over
    rows x T tokens (no mask) and token_logps over its `scored` positions (allo.scored_token_logps),
    weights aside. The largest of: the forward's (forward_bytes, with the blocks' bf16 copies); the
    head's matmul, the [scored, V] logits beside its input x[keep] and the normed x (and their
    bf16 copy under autocast), with every bf16 copy; token_logps': half precision: the logits, their
    float32 chunk copy and the (x - max) temporary inside logsumexp (ATen's logsumexp_out_impl), one
    chunk; float32: the logits and that temporary. autocast's bf16 weight copies are cached even
    without autograd and live until the autocast region exits: trainer.forward_logps' covers the
    model only, so they are freed before token_logps; train.score_tokens' covers
    allo.rewriter_token_probs, token_logps included (logps_in_autocast). inside_ops False: without
    logsumexp's temporary, what --check's sampler sees. Past head_chunk logit entries the reference
    pass runs the head chunk by chunk (model.HeadLogps), inside the model's autocast region: one
    chunk's logits instead of the batch's (the rewriter's scoring keeps the whole logits)."""
    V, D, half = cfg.vocab_size, cfg.dim, autocast or wbytes == 2
    copies, block_copies = cast_copies(cfg, autocast, wbytes)
    fwd = forward_bytes(cfg, rows, T, autocast=autocast, wbytes=wbytes)
    chunk = min(scored, CHUNK_ROWS) if half else scored
    logits = (2 if half else 4) * V * scored
    x_kept = scored * (2 * wbytes * D + (2 * D if autocast and wbytes == 4 else 0))  # x[keep], normed, bf16
    head = logits + copies + fwd["base"] + x_kept
    after = (logits + 16 * rows * T + 4 * V * chunk * (half + inside_ops)  # + the batch's ids and labels
             + (copies if logps_in_autocast else 0))
    if scored * V > head_chunk and not logps_in_autocast:  # trainer.forward_logps' chunked head:
        c = min(scored, max(1, head_chunk // V))  # one chunk's float32 logits, their bf16 original, and
        head = copies + fwd["base"] + x_kept + V * c * (4 + 4 + 2 * half)  # logsumexp's (x - max), seen
        return max(block_copies + fwd["peak"], head)
    return max(block_copies + fwd["peak"], head, after)


def generation_bytes(cfg, prompts, P, new, *, autocast, wbytes):
    """model.generate for `prompts` rows left-padded to P tokens and up to `new` new tokens, weights
    aside: "kv cache", its KVCache (keys and values [n_layers, prompts, n_kv_heads, P + new, hd] in
    the embedding's dtype: float32 under autocast too), exact; "peak", with the cache, the largest
    moment of the prefill: its forward (forward_bytes with a mask, keys and values from the cache,
    and the blocks' bf16 copies), its head inside autocast (keep = the last position: the [prompts,
    V] logits, every bf16 copy), then sample_next outside it (the logits, their float32 copy,
    logits / temperature and its softmax: sampling at top-p 1, as the sample stage by default;
    greedy holds less, top-p a logit's probability more, its nucleus; on a CPU model.draw's race
    holds 12 bytes for each of at most model.DRAW_CHUNK logits after the softmax); or a
    later step's, one position a row attending over up to P + new keys: every bf16 copy, the
    int64 ids and attention mask so far, the bool mask and its bias, one layer's keys and values
    cast to bf16 (under autocast, from a float32 cache), the logits (below the prefill's unless
    new is far above P). Repeated prompts (the sample stage's K a question) are prefilled once:
    the forward runs on the distinct ones, whose cache is then copied to every row, a moment that
    holds both caches (at most 1.5x this cache where every prompt repeats)."""
    V, kv = cfg.vocab_size, cfg.n_kv_heads * cfg.head_dim
    c = 2 if autocast or wbytes == 2 else 4
    copies, block_copies = cast_copies(cfg, autocast, wbytes)
    kv_cache = 2 * cfg.n_layers * prompts * kv * (P + new) * wbytes
    fwd = forward_bytes(cfg, prompts, P, autocast=autocast, wbytes=wbytes, masked=True, cached=True)
    head = copies + fwd["base"] + prompts * c * V
    sample = prompts * (c * V + (4 * V if c == 2 else 0) + 2 * 4 * V)
    kv_cast = 2 * 2 * kv if autocast and wbytes == 4 else 0
    step = copies + prompts * ((P + new) * (16 + 1 + 1 + c + kv_cast) + c * V)
    return {"kv cache": kv_cache, "peak": kv_cache + max(block_copies + fwd["peak"], head, sample, step)}


def plan(cfg, a, ckpt):
    """[(stage, "rows x T", items, phases)] for train.py's stages; a: the parsed flags."""
    pc = param_counts(cfg)
    n, w, V, cuda = pc["total"], a.wbytes, cfg.vocab_size, a.device == "cuda"
    half = cuda or w == 2  # bf16 logits
    copies = cast_copies(cfg, cuda, w)[0]
    block_copies = 2 * pc["layer_cast"] if copies else 0  # the first block's, at the end of backward
    B, T, resp = a.batch_size, a.seq_len, a.response_len  # resp: the scored targets of a row
    R = a.ref_batch_size  # trainer.reference_logps' rows a batch
    no_grad = no_grad_pass_bytes(cfg, R, T, R * resp, autocast=cuda, wbytes=w)

    def train(rows, T, loss, ratio, scorer=False):
        act = activation_bytes(cfg, rows, T, autocast=cuda, wbytes=w, ckpt=ckpt, loss=loss,
                               scored=rows * resp)
        saved = act["layers"] + act["other"] + act["head"]
        it = {"weights": w * n, "grads": w * n, "optimizer": 0 if scorer else optimizer_bytes(n, ratio, w),
              "masks": 0 if scorer else n, "scoring": 4 * n if scorer else 0,  # grad_importance's accumulator
              "activations": saved + act["recompute"], "bf16 copies": copies,
              "logit grads": logit_grad_bytes(V, rows * resp, chunked=half, D=cfg.dim)}
        resident = it["weights"] + it["optimizer"] + it["masks"] + it["scoring"]
        kept = it["grads"] if a.grad_accum > 1 else 0  # gradients of the earlier micro-batches
        phases = {"forward": resident + kept + saved + copies,
                  "logit grads": resident + kept + saved + act["cast_saved"] + it["logit grads"],
                  "backward end": resident + it["grads"] + act["layer"] + act["other"] + block_copies}
        if not scorer:
            phases["optimizer step"] = resident + it["grads"] + step_bytes(pc["largest"], n, ratio, w)
        return it, phases

    def with_no_grad(it, phases, extra, resident):
        it["no-grad pass"] = extra
        phases["no-grad pass"] = resident + extra
        return it, phases

    def select(it, phases, resident):  # select_masks: int32 keys, bool top-k and band lists, its
        # result and the other ratio's masks (still referenced in stage_mask's loop)
        it.update(scoring=it["scoring"] + 4 * n + 2 * n, masks=2 * n)
        phases["mask selection"] = resident + 4 * n + 2 * n + 2 * n
        return it, phases

    rows = f"{B} x {T}"
    dpo = f"{2 * B} x {T}"
    stages = [("sft", rows, *train(B, T, "sft", 1.0))]
    # the sample stage, the SFT validation and eval.py: model.generate, --gen-batch-size prompts
    # of --prompt-len tokens a batch, the policy's weights only
    G, P, new = a.gen_batch_size, a.prompt_len, a.new_tokens
    gen = generation_bytes(cfg, G, P, new, autocast=cuda, wbytes=w)
    it = {"weights": w * n, "bf16 copies": copies, "KV cache": gen["kv cache"],
          "no-grad pass": gen["peak"] - gen["kv cache"]}
    stages.append(("sample / eval (generate)", f"{G} x {P}+{new}", it, {"generate": w * n + gen["peak"]}))
    stages.append(("dpo", dpo, *with_no_grad(*train(2 * B, T, "dpo", 1.0), no_grad, w * n + n)))
    # delta scorer: sft and dpo models, the float32 scores (importance_from_delta runs without
    # autograd; its one-tensor temporaries stay below select_masks')
    it = {"weights": 2 * w * n, "scoring": 4 * n}
    stages.append(("mask (delta)", "-", *select(it, {}, 2 * w * n + 4 * n)))
    it, phases = with_no_grad(*train(2 * B, T, "dpo", 1.0, scorer=True), no_grad, w * n)
    stages.append(("mask (grad)", dpo, *select(it, phases, w * n + 4 * n)))  # + the float32 scores
    # train.py gives the rewriter 3 x --max-len (its prompt holds the response it rewrites), for
    # responses as long as the others; it scores --batch-size rows at a time
    Tr = 3 * T
    rw = no_grad_pass_bytes(cfg, B, Tr, B * resp, autocast=cuda, wbytes=w, logps_in_autocast=True)
    stages.append(("rewriter", f"{B} x {Tr}", *with_no_grad(*train(B, Tr, "sft", 1.0), rw, w * n)))
    stages.append(("forget", rows, *with_no_grad(*train(B, T, "npo", a.forget_ratio), no_grad, w * n + n)))
    stages.append(("learn", dpo, *with_no_grad(*train(2 * B, T, "dpo", a.learn_ratio), no_grad, w * n + n)))
    return stages


COLUMNS = ["weights", "grads", "optimizer", "masks", "scoring", "activations", "bf16 copies", "logit grads",
           "no-grad pass", "KV cache"]


def print_plan(path, cfg, a):
    pc = param_counts(cfg)
    how = "float32 weights, bf16 autocast" if a.wbytes == 4 else "bfloat16 weights"
    if a.device == "cpu":
        how = "float32" if a.wbytes == 4 else "bfloat16 weights"
    print(f"## {os.path.basename(path)}: {pc['total'] / 1e9:.3f}B parameters, {a.device} ({how}), batch "
          f"{a.batch_size} x {a.seq_len} tokens ({a.response_len} scored a row), ratios forget "
          f"{a.forget_ratio} / learn {a.learn_ratio}, grad-accum {a.grad_accum}, reference batch "
          f"{a.ref_batch_size} rows, generation {a.gen_batch_size} prompts x {a.prompt_len} + "
          f"{a.new_tokens} tokens, attention kernel: {attention_kernel(a.device)} (no training or scoring "
          f"pass has a mask; generation's has)\n")
    for ckpt in {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]:
        print(f"### {'with' if ckpt else 'without'} gradient checkpointing (GiB)\n")
        print("| stage | rows x T | " + " | ".join(COLUMNS) + f" | total | at | fits {a.gpu_gib:g} GiB |")
        print("|---|---|" + "---:|" * (len(COLUMNS) + 1) + "---|---|")
        for stage, shape, it, phases in plan(cfg, a, ckpt):
            at = max(phases, key=phases.get)
            cells = [f"{it[c] / GiB:.2f}" if it.get(c) else "-" for c in COLUMNS]
            fits = "yes" if phases[at] <= a.gpu_gib * GiB else "no"
            print(f"| {stage} | {shape} | " + " | ".join(cells)
                  + f" | **{phases[at] / GiB:.2f}** | {at} | {fits} |")
        print()
    resp = a.response_len
    print(f"Host memory, the cached reference log-probs (float32 per response token, {resp} tokens per "
          f"response): {2 * a.examples * resp * 4 / GiB:.3f} GiB for {a.examples} pairs (dpo, learn, "
          f"mask grad), {a.examples * resp * 4 / GiB:.3f} GiB for {a.examples} wrong responses (forget).\n")


# ----------------------------------------------------------------------------- measurements


def tiny_batch(cfg, rows, T, seed=0):
    """A batch as data.collate makes it (right-padded: the last row half padding; labels on the
    second half), with the zero reference log-probs and unit weights train.py's stages add."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
    attn = torch.ones(rows, T, dtype=torch.long)
    attn[-1, T // 2:] = 0
    labels = ids.roll(-1, 1)
    labels[:, : T // 2] = -100
    labels[attn == 0] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "ref": torch.zeros(rows, T),
            "weights": (labels != -100).float()}


def n_scored(batch):
    """Positions of a batch with a label (labels != -100): the head's rows."""
    return int((batch["labels"] != -100).sum())


def cuda_stand_in(autocast):
    """torch.autocast("cpu", bfloat16) standing in on the CPU for the CUDA autocast if autocast,
    else plain float32 (trainer.py's own autocast does nothing on a CPU)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()


class StandIn(torch.nn.Module):
    """The seam of the training and reference measurements: the model whose forward runs under
    cuda_stand_in, handed to trainer.py's own functions where they run the model under their (CUDA)
    autocast; their regions hold the model's call only (token_logps and the losses run after)."""

    def __init__(self, model, autocast):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, *args, **kwargs):
        with cuda_stand_in(self.autocast):
            return self.model(*args, **kwargs)


class StandInTransformer(Transformer):
    """The seam of the generation measurements: model.generate runs its own autocast(device) region
    around its call of the model (plus a bool mask and a slice, which autocast does not touch), so
    a Transformer whose forward runs under cuda_stand_in gets the same region, the bf16 copies freed
    at its end as there (were generate's region to cover more, e.g. sample_next, this seam would no
    longer match it). It records the bytes of the KVCache generate hands its first call."""

    def __init__(self, cfg, autocast):
        super().__init__(cfg)
        self.autocast, self.kv_cache_bytes = autocast, None

    def forward(self, input_ids, attention_mask=None, cache=None, keep=None):
        if cache is not None and self.kv_cache_bytes is None:
            self.kv_cache_bytes = cache.k.nbytes + cache.v.nbytes
        with cuda_stand_in(self.autocast):
            return super().forward(input_ids, attention_mask, cache, keep)


def batch_loss(model, batch, loss, autocast=False):
    """One micro-batch's loss by trainer.py's own function (DPO: key tokens, eps 0.5, --nll 1)."""
    cpu, scored, net = torch.device("cpu"), n_scored(batch), StandIn(model, autocast)
    if loss == "sft":
        return trainer.sft_batch_loss(net, batch, Norms(scored_tokens=scored), cpu)
    if loss == "npo":
        return trainer.npo_batch_loss(net, batch, Norms(weighted_tokens=scored), cpu, beta=0.1)
    pairs = len(batch["labels"]) // 2
    return trainer.dpo_batch_loss(net, batch, Norms(pairs=pairs, chosen_tokens=scored), cpu, beta=0.1,
                                  eps=0.5, nll=1.0)


def measure_saved(model, batch, loss, autocast):
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = batch_loss(model, batch, loss, autocast)
    out.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_in_use():
    """Bytes glibc's malloc has handed out (arena + mmap), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


class PeakMemory(TorchDispatchMode):
    """Highest malloc_in_use() after any aten op (temporaries inside one op are not seen)."""

    def __enter__(self):
        self.peak = malloc_in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, malloc_in_use())
        return out


def allocator_peak(run, prepare=lambda: None):
    """Highest malloc_in_use() during run(prepare()) over its start (twice: the first warms up)."""
    for _ in range(2):
        x = prepare()
        start = malloc_in_use()
        with PeakMemory() as peak:
            run(x)
        del x
    return peak.peak - start


def measure_logit_grads(model, batch, loss, autocast):
    """Peak of the backward of trainer.py's loss over the memory in use at its start."""
    def forward():
        model.zero_grad(set_to_none=True)
        return batch_loss(model, batch, loss, autocast)

    return allocator_peak(lambda out: out.backward(), forward)


def head_chunked(chunk, measure):
    """measure() with the head chunked past `chunk` logit entries, `chunk` entries a chunk
    (trainer.HEAD_CHUNK and model.HEAD_CHUNK set to it meanwhile)."""
    kept = trainer.HEAD_CHUNK, modelpy.HEAD_CHUNK
    trainer.HEAD_CHUNK = modelpy.HEAD_CHUNK = chunk
    try:
        return measure()
    finally:
        trainer.HEAD_CHUNK, modelpy.HEAD_CHUNK = kept


def reference_scored(rows, T):
    """Scored targets of one of measure_reference_pass' batches: each row a BOS, a prompt of T // 2
    tokens, a response of T - T // 2 - 2 tokens and its EOS (the targets: response and EOS)."""
    return rows * (T - T // 2 - 1)


def measure_reference_pass(model, rows, T, autocast):
    """Peak of trainer.reference_logps over 3 batches of `rows` sequences of T tokens."""
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, prompt_ids=lambda ids: [1] + list(ids))
    prompts, responses = [[5] * (T // 2)] * 3 * rows, [[6] * (T - T // 2 - 2)] * 3 * rows

    return allocator_peak(lambda _: trainer.reference_logps(StandIn(model, autocast), tok, prompts, responses,
                                                            T, torch.device("cpu"), batch_size=rows))


def measure_scoring_pass(model, batch, autocast):
    """Peak of allo.rewriter_token_probs as train.score_tokens calls it: under autocast (its
    region covers token_logps), given input_ids and labels only (no attention mask)."""
    batch = {k: batch[k] for k in ("input_ids", "labels")}
    def score(_):
        with cuda_stand_in(autocast):
            allo.rewriter_token_probs(model, batch)

    return allocator_peak(score)


def gen_prompts(prompts, P):
    """`prompts` token lists of P, P - 1 and P - 2 tokens (model.generate left-pads them to P)."""
    return [[5 + i % 7] * (P - i % 3) for i in range(prompts)]


def run_generate(model, prompts, P, new):
    """model.generate of a StandInTransformer (its autocast stand-in chosen there), sampling
    (temperature 1, a seeded generator: greedy holds less), no row ending early (eos_id -1);
    returns the bytes of the KVCache it allocated."""
    model.kv_cache_bytes = None
    model.generate(gen_prompts(prompts, P), new, eos_id=-1, pad_id=0, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    return model.kv_cache_bytes


def measure_generation(model, prompts, P, new):
    """Peak of run_generate over its start."""
    return allocator_peak(lambda _: run_generate(model, prompts, P, new))


def measure_delta_scores(cfg):
    """Memory that allo.importance_from_delta's result holds, for two models' parameters."""
    before, after = (dict(Transformer(cfg).named_parameters()) for _ in range(2))
    start = malloc_in_use()
    scores = allo.importance_from_delta(before, after)
    held = malloc_in_use() - start
    del scores  # alive while measured
    return held


def measure_step(cfg, ratio):
    """Peak of MaskedAdamW.step over its start, with the mask's entries all in the largest tensor
    (the embedding) where they fit: the case step_bytes bounds. A new optimizer each time: its
    first step, the one that also makes the full masks' kept buffer."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    scores = {name: torch.rand(p.shape) + (name == "embed_tokens.weight")
              for name, p in model.named_parameters()}
    masks = allo.select_masks(scores, ratio)
    batch_loss(model, tiny_batch(cfg, 2, 8), "sft").backward()
    return allocator_peak(lambda opt: opt.step(), lambda: allo.MaskedAdamW(model.named_parameters(), masks))


CHECK_CONFIGS = [  # tiny: GQA tied; MHA untied; one GQA layer with a wide vocabulary
    ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160),
    ModelConfig(vocab_size=1000, dim=96, n_layers=3, n_heads=6, n_kv_heads=6, hidden_dim=256,
                tie_embeddings=False),
    ModelConfig(vocab_size=4096, dim=64, n_layers=1, n_heads=8, n_kv_heads=2, hidden_dim=128),
]
MODES = [(False, 4), (True, 4), (True, 2)]  # (autocast, weight bytes)


def check_exact(cfg, ratio, wdtype=torch.float32):
    """(name, predicted, measured) of parameter, gradient, MaskedAdamW state and mask bytes."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(wdtype)
    w = torch.finfo(wdtype).bits // 8
    scores = {name: torch.rand(p.shape) for name, p in model.named_parameters()}
    masks = allo.select_masks(scores, ratio)
    opt = allo.MaskedAdamW(model.named_parameters(), masks)
    batch_loss(model, tiny_batch(cfg, 2, 8), "sft").backward()
    opt.step()  # the state exists from the constructor; a step must not change its size
    n = param_counts(cfg)["total"]
    return [("parameters", w * n, sum(p.nbytes for p in model.parameters())),
            ("gradients", w * n, sum(p.grad.nbytes for p in model.parameters())),
            (f"MaskedAdamW at {ratio}", optimizer_bytes(n, ratio, w), allo.optimizer_state_bytes(opt)),
            ("masks", n, sum(m.nbytes for m in masks.values()))]


def check_activations(cfg, rows, T, autocast, wbytes, ckpt, loss, head_chunk=HEAD_CHUNK):
    """(predicted, measured) saved bytes of one micro-batch; a head_chunk below the batch's logit
    entries measures the chunked head (trainer.HEAD_CHUNK set to it for the measurement)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.float32 if wbytes == 4 else torch.bfloat16)
    model.grad_checkpointing = ckpt
    batch = tiny_batch(cfg, rows, T)
    p = activation_bytes(cfg, rows, T, autocast=autocast, wbytes=wbytes, ckpt=ckpt, loss=loss,
                         scored=n_scored(batch), head_chunk=head_chunk)
    predicted = p["layers"] + p["other"] + p["head"] + p["cast_saved"]
    return predicted, head_chunked(head_chunk, lambda: measure_saved(model, batch, loss, autocast))


def check_kv_cache(cfg, wdtype=torch.float32, autocast=False):
    """(name, predicted, measured) of the KVCache model.generate allocates (3 prompts of 5 tokens
    or fewer, 2 new tokens)."""
    torch.manual_seed(0)
    model = StandInTransformer(cfg, autocast).to(wdtype)
    predicted = generation_bytes(cfg, 3, 5, 2, autocast=autocast, wbytes=torch.finfo(wdtype).bits // 8)
    return ("KV cache, 3 x 5+2", predicted["kv cache"], run_generate(model, 3, 5, 2))


GEN_CHECK = (16, 48, 8)  # prompts, prompt tokens, new tokens of check_peaks' generate calls


def check_generation(i, autocast, wdtype):
    """(name, predicted, measured, tolerance) of model.generate's peak, config i."""
    torch.manual_seed(0)
    model = StandInTransformer(CHECK_CONFIGS[i], autocast).to(wdtype)
    how = ("bf16 autocast" if autocast else "float32") if wdtype == torch.float32 else "bf16 weights"
    wbytes = torch.finfo(wdtype).bits // 8
    gen = generation_bytes(CHECK_CONFIGS[i], *GEN_CHECK, autocast=autocast, wbytes=wbytes)["peak"]
    return (f"generate {GEN_CHECK[0]} x {GEN_CHECK[1]}+{GEN_CHECK[2]}, config {i}, {how}", gen,
            measure_generation(model, *GEN_CHECK), 0.1)  # within 5% alone, 5.2% after other tests ran


def check_peaks():
    """(name, predicted, measured, tolerance) of the allocator peaks (glibc's mallinfo2)."""
    cfg, rows, T = CHECK_CONFIGS[2], 8, 64  # large enough for the host's own allocations to matter little
    V, n = cfg.vocab_size, param_counts(cfg)["total"]
    model, out = Transformer(cfg), []
    for autocast in (False, True):
        how = "bf16 autocast" if autocast else "float32"
        for loss in ("sft", "dpo"):
            batch = tiny_batch(cfg, rows, T)
            out.append((f"logit grads, {loss}, {how}", logit_grad_bytes(V, n_scored(batch), chunked=autocast),
                        measure_logit_grads(model, batch, loss, autocast), 0.05))
        for rows_a_chunk in (16, 64):  # the chunked head (model.HeadLogps), its chunk set small
            batch, chunk = tiny_batch(cfg, rows, T), rows_a_chunk * V
            out.append((f"logit grads, sft, {how}, chunks of {rows_a_chunk} rows",
                        logit_grad_bytes(V, n_scored(batch), chunked=autocast, D=cfg.dim, head_chunk=chunk),
                        head_chunked(chunk, lambda: measure_logit_grads(model, batch, "sft", autocast)), 0.1))
        for i, r, t in ((2, rows, T), (0, 16, 64)):  # config 2: its logits dominate; 0: its forward
            torch.manual_seed(0)
            out.append((f"reference_logps {r} x {t}, config {i}, {how}",
                        no_grad_pass_bytes(CHECK_CONFIGS[i], r, t, reference_scored(r, t), autocast=autocast,
                                           wbytes=4, inside_ops=False),
                        measure_reference_pass(Transformer(CHECK_CONFIGS[i]), r, t, autocast),
                        0.05 if i == 2 else 0.08))  # config 0's 3 MB peak: the heap that earlier tests
        # left moves it by ~1% (2-core AMD EPYC: 4.1-4.9% off alone, 5.3% after tests/test_bench_train.py)
        chunk = 16 * V  # the chunked head in the reference pass, 16 rows a chunk
        out.append((f"reference_logps {rows} x {T}, config 2, {how}, chunks of 16 rows",
                    no_grad_pass_bytes(cfg, rows, T, reference_scored(rows, T), autocast=autocast, wbytes=4,
                                       inside_ops=False, head_chunk=chunk),
                    head_chunked(chunk, lambda: measure_reference_pass(Transformer(cfg), rows, T, autocast)),
                    0.1))
        # 16 x 16 (under autocast only): the bf16 copies as large as the logits' float32 chunk, so
        # holding them through token_logps (train.score_tokens' region) shows, by about 20%
        for r, t in ((rows, 3 * T),) + ((16, 16),) * autocast:
            batch = tiny_batch(cfg, r, t)
            out.append((f"rewriter scoring {r} x {t}, {how}",
                        no_grad_pass_bytes(cfg, r, t, n_scored(batch), autocast=autocast, wbytes=4,
                                           logps_in_autocast=True, inside_ops=False),
                        measure_scoring_pass(model, batch, autocast), 0.05))
        out += [check_generation(i, autocast, torch.float32) for i in (0, 2)]
    out += [check_generation(i, False, torch.bfloat16) for i in (0, 2)]
    for ratio in (1.0, 0.5):
        out.append((f"MaskedAdamW.step at {ratio}", step_bytes(param_counts(cfg)["largest"], n, ratio, 4),
                    measure_step(cfg, ratio), 0.1))
    out.append(("importance_from_delta's scores", 4 * n, measure_delta_scores(cfg), 0.01))
    return out


def run_check(tolerance=0.001):
    """Print predicted vs measured; False if an exact count differs or an estimate misses."""
    torch.set_num_threads(1)
    ok = True
    print("| exact | config | predicted | measured |\n|---|---|---:|---:|")
    for i, cfg in enumerate(CHECK_CONFIGS):
        for ratio, wdtype in ((0.1, torch.float32), (1.0, torch.float32), (0.1, torch.bfloat16)):
            for name, pred, got in check_exact(cfg, ratio, wdtype):
                ok &= pred == got
                print(f"| {name}, {str(wdtype)[6:]} weights | {i} | {pred} | {got} |")
        for autocast, wdtype in ((False, torch.float32), (True, torch.float32), (False, torch.bfloat16)):
            name, pred, got = check_kv_cache(cfg, wdtype, autocast)
            ok &= pred == got
            how = ", bf16 autocast" if autocast else ""
            print(f"| {name}, {str(wdtype)[6:]} weights{how} | {i} | {pred} | {got} |")
    print("\n| saved activations | ckpt | config | measured (dpo) | error sft | error dpo | error npo |")
    print("|---|---|---|---:|---:|---:|---:|")
    errors = []
    for autocast, wbytes in MODES:
        mode = f"{'bf16 autocast' if autocast else 'float32'}{', bf16 weights' if wbytes == 2 else ''}"
        for ckpt in (False, True):
            for i, cfg in enumerate(CHECK_CONFIGS):
                row = {loss: check_activations(cfg, 4, 24, autocast, wbytes, ckpt, loss)
                       for loss in ("sft", "dpo", "npo")}
                errs = [(pred - got) / got for pred, got in row.values()]
                errors += errs
                print(f"| {mode} | {'on' if ckpt else 'off'} | {i} | {row['dpo'][1]} | "
                      + " | ".join(f"{e:+.4%}" for e in errs) + " |")
    print(f"\nlargest relative error of the saved activations: {max(map(abs, errors)):.4%} "
          f"over {len(errors)} cases")
    ok &= max(map(abs, errors)) <= tolerance
    if malloc_in_use() is None:
        print("\n(no glibc mallinfo2: the allocator peaks are not measured)")
        return ok
    print("\n| allocator peak (temporaries inside one op aside) | predicted | measured | rel. error |")
    print("|---|---:|---:|---:|")
    for name, pred, got, tol in check_peaks():
        print(f"| {name} | {pred} | {got} | {(pred - got) / got:+.2%} |")
        ok &= abs(pred - got) <= tol * got
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="HF Llama config.json files or model directories")
    p.add_argument("--check", action="store_true",
                   help="compare the formulas with measurements on tiny models")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: bf16 autocast (default); cpu: float32")
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="master weights (train.py: float32)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples (or pairs) per micro-batch (default 4)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per sequence, train.py's --max-len (default 512)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step (default 1, as train.py)")
    p.add_argument("--forget-ratio", type=float, default=0.1, help="forgetting mask fraction (default 0.1)")
    p.add_argument("--learn-ratio", type=float, default=0.1, help="learning mask fraction (default 0.1)")
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"],
                   help="train.py's --grad-checkpoint: tables without, with, or both (default)")
    p.add_argument("--gpu-gib", type=float, default=24, help="accelerator memory to fit in (default 24)")
    p.add_argument("--examples", type=int, default=10000, help="pairs / wrong responses, for host memory")
    p.add_argument("--response-len", type=int, default=0,
                   help="response tokens of a sequence, the scored positions: the head's rows "
                   "(default seq-len / 2)")
    p.add_argument("--ref-batch-size", type=int, default=64,
                   help="rows per batch of trainer.reference_logps, train.py's --ref-batch-size (default 64)")
    p.add_argument("--gen-batch-size", type=int, default=256,
                   help="prompts per generation batch, train.py's and eval.py's --gen-batch-size "
                   "(default 256)")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="prompt tokens of a generation (default seq-len / 2)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="generated tokens, train.py's and eval.py's --max-new-tokens (default 64)")
    a = p.parse_args(argv)
    if a.check:
        ok = run_check()
        print("\ncheck:", "ok" if ok else "FAILED")
        return 0 if ok else 1
    if not a.configs:
        p.error("give config.json paths, or --check")
    a.wbytes = 4 if a.weights_dtype == "float32" else 2
    a.response_len, a.prompt_len = a.response_len or a.seq_len // 2, a.prompt_len or a.seq_len // 2
    for flag in ("batch_size", "seq_len", "grad_accum", "ref_batch_size", "gen_batch_size", "prompt_len",
                 "new_tokens", "examples"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 1 <= a.response_len <= a.seq_len:
        p.error("--response-len must be between 1 and --seq-len")
    for path in a.configs:
        print_plan(path, load_config(path), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
