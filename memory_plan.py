"""Accelerator memory of every ALLO stage of train.py, item by item, from a Llama config.json.

    python memory_plan.py configs/llama-3.2-1b.json                 # batch 4 x 512 tokens, ratios 0.1, 24 GiB
    python memory_plan.py configs/llama-2-7b.json --batch-size 2 --gpu-gib 80 --checkpointing on
    python memory_plan.py path/to/hf_model_dir --device cpu           # the float32 CPU path
    python memory_plan.py configs/llama-3.2-1b.json --attention flash  # what-if: no padding mask
    python memory_plan.py --check                                    # the formulas against measurements

Items of a stage (bytes on the accelerator; train.py's fit() and stage functions):
  weights       float32 master weights as train.py loads them (--weights-dtype bfloat16: a what-if)
  grads         dense: every parameter has requires_grad; the masks act in the optimizer only
  optimizer     MaskedAdamW: int32 index + two moments (param dtype) per selected entry, 12 B per
                entry in float32; a full mask keeps dense moments and no index (8 B, as AdamW). A
                mask is one global top-k: per tensor the count varies, in total round(ratio * N)
  masks         bool, 1 B per entry: the stage's mask, and train.full_masks' all-True masks in the
                full-parameter stages, alive for the whole fit()
  scoring       Stage 1: the float32 scores, select_masks' int32 keys and bool lists
  activations   what autograd saves for one micro-batch of `rows` sequences of T tokens (DPO stages:
                2 x --batch-size rows, chosen and rejected), op by op in activation_bytes; with
                checkpointing: each block's input, plus one block recomputed during backward
  bf16 copies   autocast casts every float32 linear weight to bf16 once per forward and caches it
                until the autocast region exits (saved for backward without checkpointing)
  logit grads   backward of token_logps' logsumexp: three float32 [rows*T (<= 4096 chunked), V]
                temporaries at once, while every activation is still saved
  no-grad pass  reference log-probs (train.reference_logps, 64 rows a batch; it holds the previous
                batch's logits in `_` while computing the next) or the rewriter's scoring pass
                (64 rows, no autocast: float32 logits), with only weights (and masks) resident
total = the largest of these moments (column "at"): end of forward, first backward op (logit
grads), end of backward (all gradients + the first block), optimizer step, no-grad pass, mask
selection. Gradients are freed after every step (zero_grad(set_to_none)), so with --grad-accum 1
they never coexist with a forward's activations. The rewriter trains and scores 3 x --seq-len
tokens (train.py's rewriter max_len). Attention: see attention_kernel (CUDA: the math kernel for
GQA models). Not counted: the CUDA context and allocator slack (~0.5-1 GiB), attention's own
temporaries, generation (sample stage, evaluation).

--check measures on tiny models (CPU): the parameter, gradient, optimizer and mask bytes exactly
(a real MaskedAdamW at a real global mask); the saved activations with saved_tensors_hooks
(distinct storages, by data_ptr) in float32, under torch.autocast("cpu", bfloat16) as the
stand-in for CUDA's, and with bfloat16 weights, for the fused and the math attention kernel,
with and without checkpointing and without the padding mask; and, where glibc's mallinfo2 is
available, the allocator's peak in the logit gradients, train.reference_logps and an optimizer
step (sampled after every aten op: temporaries inside one op are not seen).
"""

import argparse
import ctypes
import json
import math
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import allo
from model import ModelConfig, Transformer

GiB = 2**30
NO_GRAD_ROWS = 64  # batch of train.reference_logps and of the rewriter's scoring loop
CHUNK_ROWS = 4096  # allo.token_logps' chunk_rows for half-precision logits


def load_config(path):
    """Hugging Face Llama config.json (the file or its directory) -> ModelConfig. RoPE scaling
    does not change memory, so unlike model.config_from_hf this does not refuse it."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(file) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise ValueError(f"{file}: head_dim * num_attention_heads != hidden_size (model.py needs it)")
    return ModelConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                       hidden_dim=hf["intermediate_size"], tie_embeddings=hf.get("tie_word_embeddings", False))


# ----------------------------------------------------------------------------- the formulas


def param_counts(cfg):
    """Entries of model.Transformer: all, the ones autocast casts (every linear weight and the
    head; embedding lookup and norm gains stay float32), per block, the largest tensor."""
    D, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    layer = 2 * D * D + 2 * D * kv + 3 * D * cfg.hidden_dim  # q, o; k, v; gate, up, down
    head = cfg.vocab_size * D
    total = head * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * (layer + 2 * D) + D
    return {"total": total, "cast": cfg.n_layers * layer + head, "layer_cast": layer,
            "largest": max(head, D * max(D, cfg.hidden_dim))}


def optimizer_bytes(n, ratio, wbytes):
    """allo.MaskedAdamW's state for a global mask of round(ratio * n) of n entries."""
    if ratio >= 1:
        return 2 * wbytes * n  # full mask: dense exp_avg and exp_avg_sq, no index
    return (4 + 2 * wbytes) * round(ratio * n)  # int32 index + two moments per selected entry


def step_bytes(largest, n, ratio, wbytes):
    """Temporaries of MaskedAdamW.step on the largest tensor: denom's sqrt and division results;
    with a partial mask also int64 indices and the gathered grad and weights, for at most all of
    the tensor or all round(ratio * n) selected entries (per-tensor counts of a global mask vary)."""
    if ratio >= 1:
        return 2 * wbytes * largest
    return (8 + 4 * wbytes) * min(largest, round(ratio * n))


def attention_kernel(cfg, device, choice="auto"):
    """The scaled_dot_product_attention kernel of training. train.py always passes the padding
    mask: CUDA's flash kernel takes no mask, the memory-efficient one no GQA, so a GQA model
    falls back to the math kernel. The CPU flash kernel takes both. "flash" is a what-if:
    data.collate pads on the right, where the causal mask alone gives the real tokens the same
    logits, so training could pass no mask and get the flash kernel on CUDA."""
    if choice != "auto":
        return choice
    if device == "cpu":
        return "flash-cpu"
    return "math" if cfg.n_kv_heads != cfg.n_heads else "efficient"


def activation_bytes(cfg, rows, T, *, autocast, wbytes=4, ckpt=False, attn="flash-cpu", loss="dpo"):
    """Bytes autograd saves in one micro-batch: model.py op by op, allo.token_logps, the loss.

    autocast: bf16 autocast (CUDA path; with wbytes 4 it casts); wbytes: 4 float32, 2 bfloat16
    weights. attn: "flash-cpu", "efficient" (CUDA: padded lse and mask), "math", or "flash" (no
    padding mask, see attention_kernel; CPU or CUDA flash kernel). loss: "sft"
    (logits.float() first, as train.py's SFT and rewriter), "dpo" or "npo". Returns "layer" (one
    block), "layers" (what the blocks keep), "recompute", "other" (embedding, RoPE, final norm),
    "head" (logits, token_logps, loss) and "cast_saved" (bf16 weight copies autograd saves).
    """
    N, D, H, hd, V = rows * T, cfg.dim, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    kv = cfg.n_kv_heads * hd
    c = 2 if autocast or wbytes == 2 else 4  # dtype of the linears' outputs
    r = wbytes  # residual stream (embedding dtype; float32 + bf16 promotes to float32)

    def rmsnorm(consumers):  # x in float32 (pow, mul), rsqrt [.,1], x * rsqrt in x's dtype
        # (weight * .), and the linears' input: with autocast and a float32 residual every
        # consumer casts its own bf16 copy (autocast caches only leaf tensors), else one shared
        return N * (4 * D + 4 + r * D + (consumers * 2 * D if autocast and r == 4 else r * D))

    if attn == "math":  # _scaled_dot_product_attention_math: q, k, v upcast to float32, scaled,
        # k and v repeated to every head; float32 probabilities; o_proj's input (a copy)
        attention = N * (3 * 4 * H * hd + 4 * H * T + c * D)
    else:  # fused: rotated q, k, v; the output (o_proj reads a view); float32 logsumexp
        # [rows, H, T]; the bool mask converted to an additive one in c, new in every layer
        pad = {"efficient": (32 * math.ceil(T / 32), 16 * math.ceil(T / 16)), "flash": (T, 0)}
        lse_T, mask_T = pad.get(attn, (T, T))
        attention = N * c * (2 * D + 2 * kv) + rows * H * lse_T * 4 + rows * T * mask_T * c
    mlp = N * 4 * c * cfg.hidden_dim  # gate, up, silu(gate), silu(gate) * up
    layer = rmsnorm(3) + attention + rmsnorm(2) + mlp
    other = N * (8 + 2 * 4 * hd) + rmsnorm(1)  # int64 ids (embedding), float32 cos and sin, final norm
    if ckpt:  # checkpoint() keeps each block's input and the bool mask [rows, 1, T, T]
        layers, recompute = cfg.n_layers * N * r * D, layer
        other += 0 if attn == "flash" else rows * T * T
    else:
        layers, recompute = cfg.n_layers * layer, 0
    # gather saves the logits and logsumexp its float32 input: the same tensor for float32
    # logits; half logits + float32 chunk copies; SFT's logits.float(): only the copy
    logits = 4 * V if c == 4 or loss == "sft" else (2 + 4) * V
    loss_bytes = {"sft": 4, "dpo": 0.5, "npo": 12}[loss]  # sft: weights; dpo: the rejected
    # half's key-token mask; npo: weights, logsigmoid's input and buffer
    head = int(N * (logits + 8 + 4 + 1 + loss_bytes))  # + int64 gather index, logsumexp, where's mask
    n_cast = param_counts(cfg)["cast"] if not ckpt else cfg.vocab_size * D  # ckpt: only the head's
    cast_saved = 2 * n_cast if autocast and wbytes == 4 else 0
    return {"layer": layer, "layers": layers, "recompute": recompute, "other": other, "head": head,
            "cast_saved": cast_saved}


def logit_grad_bytes(V, n, chunked):
    """allo.token_logps' backward: logsumexp_backward = grad * (x - lse).exp(), three float32
    [n, V] tensors alive at once; n = rows of one chunk for half-precision logits."""
    return 3 * 4 * V * (min(n, CHUNK_ROWS) if chunked else n)


def no_grad_pass_bytes(V, n, half, held):
    """A no-grad forward of n tokens: `held` batches of logits (train.reference_logps keeps the
    previous batch's in `_`: 2), token_logps' float32 chunk copy (half logits) and the (x - max)
    temporary inside logsumexp (ATen's logsumexp_out_impl), one chunk or all rows."""
    if half:
        return held * 2 * V * n + (4 + 4) * V * min(n, CHUNK_ROWS)
    return held * 4 * V * n + 4 * V * n


def plan(cfg, a, ckpt):
    """[(stage, "rows x T", items, phases)] for train.py's stages; a: the parsed flags."""
    pc = param_counts(cfg)
    n, w, V, cuda = pc["total"], a.wbytes, cfg.vocab_size, a.device == "cuda"
    half, kernel = cuda or w == 2, attention_kernel(cfg, a.device, a.attention)
    copies = 2 * pc["cast"] if cuda and w == 4 else 0
    B, T = a.batch_size, a.seq_len
    no_grad = no_grad_pass_bytes(V, NO_GRAD_ROWS * T, half, held=2)

    def train(rows, T, loss, ratio, scorer=False):
        act = activation_bytes(cfg, rows, T, autocast=cuda, wbytes=w, ckpt=ckpt, attn=kernel, loss=loss)
        saved = act["layers"] + act["other"] + act["head"]
        it = {"weights": w * n, "grads": w * n, "optimizer": 0 if scorer else optimizer_bytes(n, ratio, w),
              "masks": 0 if scorer else n, "scoring": 4 * n if scorer else 0,  # grad_importance's accumulator
              "activations": saved + act["recompute"], "bf16 copies": copies,
              "logit grads": logit_grad_bytes(V, rows * T, chunked=half and loss != "sft")}
        resident = it["weights"] + it["optimizer"] + it["masks"] + it["scoring"]
        kept = it["grads"] if a.grad_accum > 1 else 0  # gradients of the earlier micro-batches
        block_copies = 2 * pc["layer_cast"] if copies else 0
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
    stages.append(("warmup", dpo, *with_no_grad(*train(2 * B, T, "dpo", 1.0), no_grad, w * n + n)))
    # delta scorer: sft and warmup models; float32 scores and the float32 difference that autograd
    # keeps for abs() (importance_from_delta runs on parameters with grad enabled)
    it = {"weights": 2 * w * n, "scoring": 4 * n + 4 * n}
    stages.append(("mask (delta)", "-", *select(it, {}, 2 * w * n + 8 * n)))
    it, phases = with_no_grad(*train(2 * B, T, "dpo", 1.0, scorer=True), no_grad, w * n)
    stages.append(("mask (grad)", dpo, *select(it, phases, w * n + 4 * n)))  # + the float32 scores
    Tr = 3 * T  # train.py gives the rewriter 3 x --max-len; it scores 64 rows without autocast
    rw = no_grad_pass_bytes(V, NO_GRAD_ROWS * Tr, w == 2, held=1)
    stages.append(("rewriter", f"{B} x {Tr}", *with_no_grad(*train(B, Tr, "sft", 1.0), rw, w * n)))
    stages.append(("forget", rows, *with_no_grad(*train(B, T, "npo", a.forget_ratio), no_grad, w * n + n)))
    stages.append(("learn", dpo, *with_no_grad(*train(2 * B, T, "dpo", a.learn_ratio), no_grad, w * n + n)))
    return stages


COLUMNS = ["weights", "grads", "optimizer", "masks", "scoring", "activations", "bf16 copies", "logit grads",
           "no-grad pass"]


def print_plan(path, cfg, a):
    pc = param_counts(cfg)
    kernel = attention_kernel(cfg, a.device, a.attention)
    how = "float32 weights, bf16 autocast" if a.wbytes == 4 else "bfloat16 weights"
    if a.device == "cpu":
        how = "float32" if a.wbytes == 4 else "bfloat16 weights"
    print(f"## {os.path.basename(path)}: {pc['total'] / 1e9:.3f}B parameters, {a.device} ({how}), batch "
          f"{a.batch_size} x {a.seq_len} tokens, ratios forget {a.forget_ratio} / learn {a.learn_ratio}, "
          f"grad-accum {a.grad_accum}, attention kernel: {kernel}\n")
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
    resp = a.response_len or a.seq_len // 2
    print(f"Host memory, the cached reference log-probs (float32 per response token, {resp} tokens per "
          f"response): {2 * a.examples * resp * 4 / GiB:.3f} GiB for {a.examples} pairs (warmup, learn, "
          f"mask grad), {a.examples * resp * 4 / GiB:.3f} GiB for {a.examples} wrong responses (forget).\n")


# ----------------------------------------------------------------------------- measurements


def tiny_batch(cfg, rows, T, seed=0):
    """Right-padded rows like data.collate (the last one half padding), labels on the second half."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
    attn = torch.ones(rows, T, dtype=torch.long)
    attn[-1, T // 2:] = 0
    labels = ids.roll(-1, 1)
    labels[:, : T // 2] = -100
    labels[attn == 0] = -100
    return ids, attn, labels


def run_loss(model, batch, loss, autocast, mask=True):
    """One micro-batch's loss as train.py's loss_fn computes it (forward under autocast only);
    mask False: without the padding mask (exact for right-padded rows, see attention_kernel)."""
    ids, attn, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        logits = model(ids, attn if mask else None)
    if loss == "sft":
        return allo.sft_loss(logits.float(), labels)
    logps = allo.token_logps(logits, labels)
    ref = torch.zeros_like(logps)
    if loss == "npo":
        return allo.npo_token_loss(logps, ref, (labels != -100).float())
    (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
    keep = allo.key_token_mask((pr - rr).detach(), labels.chunk(2)[1] != -100, 0.5)
    return allo.dpo_loss(pc, pr, rc, rr, 0.1, keep)[0].mean()


def measure_saved(model, batch, loss, autocast, attn):
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with sdpa_kernel([SDPBackend.MATH]) if attn == "math" else nullcontext():  # also for the recompute
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_loss(model, batch, loss, autocast, mask=attn != "flash")
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


def measure_logit_grads(model, batch, loss, autocast):
    """Peak during backward over the memory in use at its start (run twice: the first warms up)."""
    for _ in range(2):
        out = run_loss(model, batch, loss, autocast)
        start = malloc_in_use()
        with PeakMemory() as peak:
            out.backward()
        del out
        model.zero_grad(set_to_none=True)
    return peak.peak - start


def measure_reference_pass(model, rows, T, autocast):
    """Peak of train.reference_logps over 3 batches of `rows` sequences of T tokens."""
    import train
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0)
    prompts, responses = [[5] * (T // 2)] * 3 * rows, [[6] * (T - T // 2 - 2)] * 3 * rows
    cuda_autocast = train.autocast  # bf16 on CUDA only: swap in the CPU stand-in
    if autocast:
        train.autocast = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        for _ in range(2):  # the first warms up
            start = malloc_in_use()
            with PeakMemory() as peak:
                train.reference_logps(model, tok, prompts, responses, T, torch.device("cpu"), batch_size=rows)
    finally:
        train.autocast = cuda_autocast
    return peak.peak - start


def measure_step(cfg, ratio):
    """Peak of MaskedAdamW.step over its start, with the mask's entries all in the largest tensor
    (the embedding) where they fit: the case step_bytes bounds."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    scores = {name: torch.rand(p.shape) + (name == "embed_tokens.weight") for name, p in model.named_parameters()}
    opt = allo.MaskedAdamW(model.named_parameters(), allo.select_masks(scores, ratio))
    run_loss(model, tiny_batch(cfg, 2, 8), "sft", autocast=False).backward()
    for _ in range(2):  # the first warms up
        start = malloc_in_use()
        with PeakMemory() as peak:
            opt.step()
    return peak.peak - start


CHECK_CONFIGS = [  # tiny: GQA tied; MHA untied; one GQA layer with a wide vocabulary
    ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160),
    ModelConfig(vocab_size=1000, dim=96, n_layers=3, n_heads=6, n_kv_heads=6, hidden_dim=256, tie_embeddings=False),
    ModelConfig(vocab_size=4096, dim=64, n_layers=1, n_heads=8, n_kv_heads=2, hidden_dim=128),
]
MODES = [  # (autocast, weight bytes, attention kernel)
    (False, 4, "flash-cpu"), (False, 4, "math"), (True, 4, "flash-cpu"), (True, 4, "math"),
    (True, 2, "flash-cpu"), (True, 2, "math"), (False, 4, "flash"), (True, 4, "flash")]


def check_exact(cfg, ratio, wdtype=torch.float32):
    """(name, predicted, measured) of parameter, gradient, MaskedAdamW state and mask bytes."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(wdtype)
    w = torch.finfo(wdtype).bits // 8
    scores = {name: torch.rand(p.shape) for name, p in model.named_parameters()}
    masks = allo.select_masks(scores, ratio)
    opt = allo.MaskedAdamW(model.named_parameters(), masks)
    run_loss(model, tiny_batch(cfg, 2, 8), "sft", autocast=False).backward()
    opt.step()  # the state exists from the constructor; a step must not change its size
    n = param_counts(cfg)["total"]
    return [("parameters", w * n, sum(p.nbytes for p in model.parameters())),
            ("gradients", w * n, sum(p.grad.nbytes for p in model.parameters())),
            (f"MaskedAdamW at {ratio}", optimizer_bytes(n, ratio, w), allo.optimizer_state_bytes(opt)),
            ("masks", n, sum(m.nbytes for m in masks.values()))]


def check_activations(cfg, rows, T, autocast, wbytes, attn, ckpt, loss):
    """(predicted, measured) saved bytes of one micro-batch."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.float32 if wbytes == 4 else torch.bfloat16)
    model.grad_checkpointing = ckpt
    p = activation_bytes(cfg, rows, T, autocast=autocast, wbytes=wbytes, ckpt=ckpt, attn=attn, loss=loss)
    predicted = p["layers"] + p["other"] + p["head"] + p["cast_saved"]
    return predicted, measure_saved(model, tiny_batch(cfg, rows, T), loss, autocast, attn)


def run_check(tolerance=0.01):
    """Print predicted vs measured; False if an exact count differs or an estimate misses."""
    torch.set_num_threads(1)
    ok = True
    print("| exact | config | predicted | measured |\n|---|---|---:|---:|")
    for i, cfg in enumerate(CHECK_CONFIGS):
        for ratio, wdtype in ((0.1, torch.float32), (1.0, torch.float32), (0.1, torch.bfloat16)):
            for name, pred, got in check_exact(cfg, ratio, wdtype):
                ok &= pred == got
                print(f"| {name}, {str(wdtype)[6:]} weights | {i} | {pred} | {got} |")
    print("\n| saved activations | ckpt | config | measured (dpo) | error sft | error dpo | error npo |")
    print("|---|---|---|---:|---:|---:|---:|")
    errors = []
    for autocast, wbytes, attn in MODES:
        mode = f"{'bf16 autocast' if autocast else 'float32'}{', bf16 weights' if wbytes == 2 else ''}, {attn}"
        for ckpt in (False, True):
            for i, cfg in enumerate(CHECK_CONFIGS):
                row = {loss: check_activations(cfg, 4, 24, autocast, wbytes, attn, ckpt, loss)
                       for loss in ("sft", "dpo", "npo")}
                errs = [(pred - got) / got for pred, got in row.values()]
                errors += errs
                print(f"| {mode} | {'on' if ckpt else 'off'} | {i} | {row['dpo'][1]} | "
                      + " | ".join(f"{e:+.4%}" for e in errs) + " |")
    print(f"\nlargest relative error of the saved activations: {max(map(abs, errors)):.4%} "
          f"over {len(errors)} cases")
    ok &= max(map(abs, errors)) <= tolerance
    if malloc_in_use() is None:
        print("\n(no glibc mallinfo2: the transients are not measured)")
        return ok
    cfg, rows, T = CHECK_CONFIGS[2], 4, 32
    model = Transformer(cfg)
    print("\n| allocator peak | predicted | measured | rel. error |\n|---|---:|---:|---:|")
    for autocast in (False, True):
        how = "bf16 autocast" if autocast else "float32"
        for loss in ("sft", "dpo"):
            pred = logit_grad_bytes(cfg.vocab_size, rows * T, chunked=autocast and loss != "sft")
            got = measure_logit_grads(model, tiny_batch(cfg, rows, T), loss, autocast)
            print(f"| logit grads, {loss}, {how} | {pred} | {got} | {(pred - got) / got:+.2%} |")
            ok &= abs(pred - got) <= 0.05 * got
        # what an op-level sampler sees: both batches' logits and the float32 chunk copy, not the
        # temporary inside logsumexp
        pred = no_grad_pass_bytes(cfg.vocab_size, rows * T, autocast, held=2) - 4 * cfg.vocab_size * rows * T
        got = measure_reference_pass(model, rows, T, autocast)
        print(f"| reference_logps, {how}, w/o logsumexp's temporary | {pred} | {got} | {(pred - got) / got:+.2%} |")
        ok &= abs(pred - got) <= 0.1 * got
    for ratio in (1.0, 0.5):
        pred = step_bytes(param_counts(cfg)["largest"], param_counts(cfg)["total"], ratio, 4)
        got = measure_step(cfg, ratio)
        print(f"| MaskedAdamW.step at {ratio} | {pred} | {got} | {(pred - got) / got:+.2%} |")
        ok &= abs(pred - got) <= 0.1 * got
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="HF Llama config.json files or model directories")
    p.add_argument("--check", action="store_true", help="compare the formulas with measurements on tiny models")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: bf16 autocast (default); cpu: float32")
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="master weights (train.py: float32)")
    p.add_argument("--batch-size", type=int, default=4, help="examples (or pairs) per micro-batch (default 4)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per sequence, train.py's --max-len (default 512)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1, as train.py)")
    p.add_argument("--forget-ratio", type=float, default=0.1, help="forgetting mask fraction (default 0.1)")
    p.add_argument("--learn-ratio", type=float, default=0.1, help="learning mask fraction (default 0.1)")
    p.add_argument("--checkpointing", default="both", choices=["off", "on", "both"],
                   help="gradient checkpointing: tables without, with, or both (default)")
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "efficient", "math", "flash-cpu"],
                   help="attention kernel (default auto: what train.py gets, see attention_kernel)")
    p.add_argument("--gpu-gib", type=float, default=24, help="accelerator memory to fit in (default 24)")
    p.add_argument("--examples", type=int, default=10000, help="pairs / wrong responses, for host memory")
    p.add_argument("--response-len", type=int, default=0, help="response tokens (default seq-len / 2)")
    a = p.parse_args(argv)
    if a.check:
        ok = run_check()
        print("\ncheck:", "ok" if ok else "FAILED")
        return 0 if ok else 1
    if not a.configs:
        p.error("give config.json paths, or --check")
    a.wbytes = 4 if a.weights_dtype == "float32" else 2
    for path in a.configs:
        print_plan(path, load_config(path), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
