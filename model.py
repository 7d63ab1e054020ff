"""A Llama-style decoder in plain PyTorch, compatible with Hugging Face Llama, Qwen2 and Qwen3
checkpoints.

Architecture (Touvron et al. 2023): token embedding, n_layers x [RMSNorm -> grouped-query
causal self-attention with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP ->
residual], final RMSNorm, linear head. Parameter names mirror Hugging Face's LlamaForCausalLM
(without its "model." prefix), so a checkpoint directory loads and saves without renaming.
Qwen2 (Qwen Team 2024) is this with biases on the q, k and v projections; Qwen3 (2025) with an
RMSNorm over each head's queries and keys before RoPE, and a head size of its own (head_dim): two
options of the one config (ModelConfig.qkv_bias, qk_norm, head_size), written back under their
model_type. Sliding-window attention and mixture-of-experts variants are refused when loading.

Rotary layout: Hugging Face checkpoints store q/k projections permuted so that rotary pairs are
(i, i + head_dim/2) ("rotate half"), not Meta's interleaved (2i, 2i+1). This model uses the
rotate-half layout itself, so HF weights are used exactly as stored.

RoPE scaling: plain RoPE, or Llama 3's ("llama3", used by Llama 3.1 and 3.2), which lowers the
rotary frequencies whose wavelength is long compared with the pretraining context; see
`rope_inv_freq`. Other scaling schemes are refused when loading.
"""

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # < n_heads: grouped-query attention
    hidden_dim: int = 704  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = True
    # None: plain RoPE. Llama 3 RoPE scaling: a dict with exactly the keys of LLAMA3_ROPE_KEYS
    rope_scaling: dict | None = None
    # the family's options (Hugging Face model_type): llama; qwen2 (biases on q, k, v); qwen3
    # (an RMSNorm on each head's queries and keys, and its own head size)
    arch: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    head_size: int | None = None  # None: dim // n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def __post_init__(self):
        if (self.head_size is None and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "dim must divide by n_heads and n_heads by n_kv_heads")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r}: one of {', '.join(ARCHITECTURES)}")
        if self.rope_scaling is not None and (why := llama3_rope_problem(self.rope_scaling)):
            raise ValueError(f"rope_scaling {self.rope_scaling}: {why}")


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_rope_problem(r: dict) -> str | None:
    """Why r is not a Llama 3 RoPE scaling this model implements, or None if it is."""
    if set(r) != set(LLAMA3_ROPE_KEYS):
        return f"Llama 3 RoPE scaling needs exactly the keys {', '.join(LLAMA3_ROPE_KEYS)}"
    if not (r["factor"] > 0 and r["original_max_position_embeddings"] > 0
            and 0 < r["low_freq_factor"] < r["high_freq_factor"]):
        return "Llama 3 RoPE scaling needs positive values and low_freq_factor < high_freq_factor"
    return None


CPU_BF16 = False  # bf16 autocast on the CPU too: set once, by use_cpu_bf16 (train.py and eval.py --cpu-bf16)


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA, and on a CPU after use_cpu_bf16(True); plain float32 elsewhere
    (MPS, and the CPU by default). Weights, optimizer state and losses stay float32: autocast casts
    a matrix product's inputs to bf16, and allo.token_logps takes bf16 logits in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocasts(device) else nullcontext()


def autocasts(device: torch.device) -> bool:
    """Whether autocast(device) casts to bf16."""
    return device.type == "cuda" or (device.type == "cpu" and CPU_BF16)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions, AMX or AVX512-BF16, which oneDNN runs bf16
    products on. Without them a bf16 product is emulated: a 2-core AMD EPYC with AVX2 multiplied
    1024x576 by 576x1536 at 1 GFLOP/s in bf16 against 137 in float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU probes (inductor's)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_cpu_bf16(on: bool):
    """bf16 autocast on the CPU from now on (on=True), for every forward of this process: training,
    reference passes, scoring, sampling, evaluation. ValueError where the CPU lacks bf16 products."""
    global CPU_BF16
    if on and not cpu_multiplies_bf16():
        raise ValueError("this CPU has neither AMX nor AVX512-BF16: its bf16 matrix products are emulated, "
                         "about 100x slower than float32's")
    CPU_BF16 = on


def pick_device(name: str = "auto") -> torch.device:
    """auto: cuda > mps > cpu; otherwise the named device, which must exist (ValueError)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"{name!r} names no device (cpu, cuda, cuda:1, mps, ...)") from None
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise ValueError(f"{name}: no such CUDA device here ({visible} visible)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{name}: MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 computed in float32, float64 kept
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None):
    """Rotary inverse frequencies [hd/2], float32: theta^(-2i/hd), i = 0 .. hd/2 - 1.

    With Llama 3 RoPE scaling (Meta's llama3 `apply_scaling`; transformers' rope_type "llama3"),
    each frequency is judged by its wavelength 2*pi/f against the pretraining context
    L = original_max_position_embeddings: shorter than L/high_freq_factor, kept; longer than
    L/low_freq_factor, divided by factor; in between, s*f + (1-s)*f/factor with
    s = (L/wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor), which runs
    from 0 to 1 across the band, so the rescaling is continuous.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    L = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((L / wavelen - low) / (high - low)).clamp(0, 1)  # 1: wavelen <= L/high, 0: wavelen >= L/low
    return smooth * inv_freq + (1 - smooth) * inv_freq / factor


def rope_cos_sin(positions, head_dim: int, theta: float, scaling: dict | None = None):
    """positions [B,T] -> cos, sin [B,1,T,head_dim] in the rotate-half layout."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # [hd/2]
    freqs = positions.float()[..., None] * inv_freq  # [B,T,hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B,1,T,hd]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hd/2) of x [B,H,T,hd] by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


HEAD_CHUNK = 2**24  # logit entries one chunk of HeadLogps holds: 64 MB in float32


class HeadLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] of N positions -> [N] float32 (float64 for float64 h), chunk_rows
    rows at a time: the head's product and logsumexp run per chunk, and backward recomputes each
    chunk's logits from h instead of keeping them, so neither pass ever holds more than one chunk's
    [chunk_rows, V] (the fused linear cross-entropy of Liger Kernel, and of Cut Cross-Entropy,
    Wijmans et al. 2024, here in plain PyTorch ops). One more head product than the unchunked path,
    in backward. Under autocast the products are bf16 in both passes; logsumexp and the gradient
    float32. h [N,D], weight [V,D], targets [N] int64."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        kind, acc = h.device.type, torch.promote_types(h.dtype, torch.float32)
        ctx.amp = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        out, lse = (torch.empty(len(h), device=h.device, dtype=acc) for _ in range(2))
        for s in range(0, len(h), chunk_rows):
            rows = slice(s, s + chunk_rows)
            logits = F.linear(h[rows], weight).to(acc)  # [chunk, V]
            lse[rows] = logits.logsumexp(-1)
            out[rows] = logits.gather(1, targets[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        kind, enabled, dtype = ctx.amp
        grad_h, grad_w = torch.empty_like(h), torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype)
        with torch.autocast(kind, dtype=dtype, enabled=enabled):  # the products as in forward
            for s in range(0, len(h), ctx.chunk_rows):
                rows = slice(s, s + ctx.chunk_rows)
                hs, g = h[rows], grad[rows]
                d = F.linear(hs, weight).to(lse.dtype)  # the chunk's logits again, then in place:
                d.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -softmax * g
                d[torch.arange(len(hs), device=h.device), targets[rows]] += g  # + onehot(target) * g
                grad_h[rows] = d @ weight
                grad_w += d.T @ hs
        return grad_h, grad_w.to(weight.dtype), None, None


class KVCache:
    """Pre-allocated keys and values of every layer: [n_layers, B, n_kv_heads, max_len, hd]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0  # positions filled so far

    def update(self, layer: int, k, v):
        """Append k, v [B,Hkv,T,hd] at the current length; return all keys/values so far."""
        end = self.len + k.shape[2]
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SlotCache:
    """Keys and values of `batch` slots, each holding one sequence at its own length:
    [n_layers, batch, n_kv_heads, max_len, hd], lens [batch]. Transformer.prefill (re)fills slots,
    Transformer.decode writes one position per slot at its length; every shape is fixed, so a
    decode step can be captured once as a CUDA graph and replayed (gpt-fast's static cache)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)  # positions each slot holds
        self.rows = torch.arange(batch, device=device)

    def update(self, layer: int, k, v):
        """Write each slot's one new key and value (k, v [B,Hkv,1,hd]) at the slot's own length;
        return every position's [B,Hkv,max_len,hd] (the decode mask hides the unwritten ones)."""
        # advanced indices: one position per row; the cast, which CPU autocast does not make for index_put
        self.k[layer, self.rows, :, self.lens] = k[:, :, 0].to(self.k.dtype)
        self.v[layer, self.rows, :, self.lens] = v[:, :, 0].to(self.v.dtype)
        return self.k[layer], self.v[layer]


def distinct(prompts: list[list[int]], device):
    """The rows of the first occurrence of each distinct prompt, and for every prompt the index of
    its own among those: long tensors [U] and [len(prompts)] (two slice(None) when no prompt
    repeats). Sampling K responses to a question repeats its prompt K times; the prompts' pass then
    runs on the U distinct ones and each row copies its keys and values (generation's prefix
    sharing, as vLLM's prefix caching does)."""
    seen = {}
    copy = [seen.setdefault(tuple(p), i) for i, p in enumerate(prompts)]  # first occurrence's row
    first = list(seen.values())
    if len(first) == len(prompts):  # nothing repeats: every row as it is, no copies made
        return slice(None), slice(None)
    where = {row: j for j, row in enumerate(first)}
    return (torch.tensor(first, dtype=torch.long, device=device),
            torch.tensor([where[row] for row in copy], dtype=torch.long, device=device))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # Qwen3: each head's queries and keys RMS-normalized before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B,H,T,hd], [B,Hkv,T,hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B,Hkv,S,hd], S = cached + T
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask):
    """scaled_dot_product_attention of q [B,H,T,hd] over k, v [B,Hkv,S,hd] (grouped-query heads),
    mask None: a fresh unpadded causal pass; otherwise a bool [B,1,T,S], True = may attend. Under
    --cpu-bf16 (use_cpu_bf16) it runs in float32 on a CPU: torch's CPU kernel ran bf16 no faster on
    training shapes (SmolLM2's heads, 8 x 256 tokens: forward and backward 1.08-1.2x float32's time)
    and 5x slower for one query over a float32 KV cache (64 rows decoding: 5.1 against 1.0 ms), on 2
    cores of an AMD EPYC with AVX512-BF16. (Any other autocast, CUDA's or tools/memory_plan.py's
    CPU stand-in for it, runs attention in bf16.)"""
    in_float32 = q.device.type == "cpu" and CPU_BF16
    if in_float32:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", enabled=False) if in_float32 else nullcontext():  # else autocast's bf16
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # True: keep only each block's input for backward, recompute the rest
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def head_weight(self):
        return self.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, keep=None, doc_ids=None,
                branch_ids=None, positions=None, targets=None):
        """input_ids [B,T] -> logits [B,T,V], or with keep (bool [B,T]) the logits [N,V] of its N
        True positions in row-major order: the head, a [D,V] matmul per position, runs only where
        logits are used (the scored targets in training, the last position in generation). keep may
        also be those N positions' flat indices into the B*T (long [N], found on the host): then no
        step of the forward waits on the device to learn N.

        attention_mask [B,S] (1 = real token, 0 = padding; S = cached + T) makes left- or
        right-padded rows give the same logits at their real positions as unpadded ones:
        positions count real tokens only, and padding is never attended to.
        doc_ids, branch_ids, positions [B,T] (packed rows, data.pack; no cache): several sequences
        laid end to end in a row, each token tagged with its group's number, its branch and its
        position in its own sequence. A row may begin with a prefix its groups share (group 0). A
        group is one sequence (branch 1 after an empty branch 0) or several that share a prompt: the
        prompt once (branch 0), then each continuation (branches 1, 2, ...). A token attends to the
        earlier tokens of the prefix, of its group's prompt and of its own branch: a causal mask over
        a tree, where id 0 at a level is shared by everything under it. So every sequence gets the
        logits it has alone.
        targets [N] (with keep): the log-probs [N] of these tokens at the kept positions instead of
        logits, from HeadLogps: at most HEAD_CHUNK logit entries held at once.
        """
        B, T = input_ids.shape
        past = cache.len if cache is not None else 0
        if doc_ids is not None:  # positions come with the packed rows
            key_doc, key_branch = doc_ids[:, None, :], branch_ids[:, None, :]  # [B,1,T]; queries [B,T,1]
            group = (key_doc == 0) | (key_doc == doc_ids[:, :, None])  # the prefix or my group
            mine = (key_branch == 0) | (key_branch == branch_ids[:, :, None])  # its prompt or my branch
            mask = (group & mine & torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril())[:, None]
        elif attention_mask is None and past == 0:
            positions, mask = torch.arange(T, device=input_ids.device).expand(B, T), None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            valid = attention_mask.bool()  # [B,S]
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B,T]
            S = past + T
            causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
            mask = causal & valid[:, None, None, :]  # [B,1,T,S]
            # a padding query that sees no real key would give NaN: let it see itself
            keys, queries = torch.arange(S, device=input_ids.device), torch.arange(T, device=input_ids.device)
            mask = mask | (keys == past + queries[:, None])
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        x = self.embed_tokens(input_ids)  # [B,T,D]
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.len += T
        if keep is not None:  # [N,D]; indices give N without reading the device, a bool mask does not
            x = x[keep] if keep.dtype == torch.bool else x.flatten(0, 1).index_select(0, keep)
        if targets is not None:
            return HeadLogps.apply(self.norm(x), self.head_weight(), targets,
                                   max(1, HEAD_CHUNK // self.cfg.vocab_size))
        return F.linear(self.norm(x), self.head_weight())  # [B,T,V] or [N,V]

    def prefill(self, prompts: list[list[int]], slots: list[int], cache: SlotCache):
        """Fill cache slots `slots` with `prompts` (token lists, right-padded into one batch), each
        at positions 0 .. len-1; returns the logits [n,V] at each prompt's last position."""
        device = self.embed_tokens.weight.device
        n, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        lens = torch.tensor([len(p) for p in prompts], device=device)
        attn = (torch.arange(P, device=device) < lens[:, None]).long()  # right padding
        last = torch.arange(P, device=device) == (lens - 1)[:, None]  # [n,P]: each prompt's last position
        logits, fresh = self.prompts_pass(prompts, ids.to(device), attn, last, P)  # [n,V]
        rows = torch.tensor(slots, device=device)
        cache.k[:, rows, :, :P] = fresh.k
        cache.v[:, rows, :, :P] = fresh.v
        cache.lens[rows] = lens
        return logits

    def prompts_pass(self, prompts, ids, attn, last, max_len):
        """The forward of the padded prompts ids [n,P] (attn: their attention mask; last: each one's
        last position) into a new KVCache of max_len positions. Each distinct prompt is computed
        once (distinct) and its row copied to every prompt that repeats it. Returns the logits
        [n,V] at the last positions and the cache."""
        first, copy = distinct(prompts, ids.device)
        x = ids[first]
        cache = KVCache(self.cfg, len(x), max_len, ids.device, self.embed_tokens.weight.dtype)
        logits = self(x, attn[first], cache, keep=last[first])
        if len(x) < len(ids):  # a repeated prompt's rows: copies of its one row
            logits, cache.k, cache.v = logits[copy], cache.k[:, copy], cache.v[:, copy]
        return logits, cache

    def decode(self, tokens, cache: SlotCache):
        """One token per slot at fixed shapes: tokens [B] at each slot's own position cache.lens,
        written into the cache; each slot attends to its positions 0 .. lens. Returns the logits
        [B,V]. No host synchronisation and no shape that changes: a CUDA graph replays it. The
        caller advances cache.lens."""
        S = cache.k.shape[3]
        mask = (torch.arange(S, device=tokens.device) <= cache.lens[:, None])[:, None, None, :]  # [B,1,1,S]
        cfg = self.cfg
        cos, sin = rope_cos_sin(cache.lens[:, None], cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        x = self.embed_tokens(tokens[:, None])  # [B,1,D]
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        return F.linear(self.norm(x[:, 0]), self.head_weight())  # [B,V]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, vocab_size: int | None = None, finished=None) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each row, its EOS not included.

        Prompts of different lengths are left-padded into one batch. A row ends at its own EOS or,
        given `finished` (a function of a row's new tokens so far, e.g. a stop string in their
        decoded tail), at the token that makes it true, which is kept; the batch ends when every row
        has. temperature 0 is greedy; otherwise softmax(logits / temperature), restricted to the
        top-p nucleus, sampled with `generator` (so a seed reproduces the samples: every row draws
        at every step, so a row's tokens do not depend on when the others end). vocab_size: only
        ids below it are generated (a tokenizer smaller than the model's embedding). With
        use_cache=False every step recomputes the whole prefix (the reference for the cache); with the
        cache, identical prompts are computed once (distinct).
        """
        device = self.embed_tokens.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        attn = torch.zeros(B, P, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = 1
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new, ends = [[] for _ in range(B)], [None] * B  # ends[b]: how many of row b's tokens it keeps
        step_ids, cache = ids, None
        with autocast(device):  # one context for the loop: autocast casts each weight once, not every step
            for t in range(max_new_tokens):
                x = step_ids if use_cache else ids
                last = torch.zeros_like(x, dtype=torch.bool)
                last[:, -1] = True  # only the last position's logits are computed
                if use_cache and cache is None:  # the prompts' pass, each distinct prompt once
                    logits, cache = self.prompts_pass(prompts, ids, attn, last, P + max_new_tokens)
                else:
                    logits = self(x, attn, cache, keep=last)  # [B,V]
                nxt = sample_next(logits[:, :vocab_size].float(), temperature, top_p, generator)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                for b, token in enumerate(nxt.tolist()):
                    if ends[b] is None:
                        new[b].append(token)
                        if token == eos_id:
                            ends[b] = t
                        elif finished is not None and finished(new[b]):
                            ends[b] = t + 1
                done = torch.tensor([e is not None for e in ends], device=device)
                if done.all():
                    break
                step_ids = nxt[:, None]
                ids = torch.cat([ids, step_ids], dim=1)
                attn = torch.cat([attn, torch.ones_like(step_ids)], dim=1)
        return [row[:end] for row, end in zip(new, ends)]

    @torch.no_grad()
    def generate_refill(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                        temperature: float = 0.0, top_p: float = 1.0, generator=None,
                        vocab_size: int | None = None, finished=None, slots: int = 64,
                        check_every: int | None = None, graphs: bool | None = None, progress=None):
        """generate()'s rows as a queue over `slots` fixed slots: a slot whose row ends takes the
        next prompt (prefill), so no slot decodes for a straggler. Returns the new tokens of each
        prompt, in order, its EOS not included; a row ends where generate() ends it (EOS, or the
        token that makes `finished` true, or max_new_tokens).

        Each step decodes every slot at fixed shapes (decode) and draws the next tokens on the device;
        the host reads the new tokens every `check_every` steps (default: 8 on CUDA, 1 elsewhere) to
        end rows at EOS or a stop string and refill their slots, so a row may decode a few tokens past
        its end, which are dropped. graphs (default: on CUDA) replays the decode step from a CUDA
        graph. Greedy rows equal a batch of one's (up to float rounding); sampled ones draw from
        `generator` in the order the slots run, so a seed reproduces them on one device and slot
        count. progress(n): called with the number of finished prompts."""
        if not prompts:
            return []
        device = self.embed_tokens.weight.device
        B, n = min(slots, len(prompts)), len(prompts)
        check_every = check_every or (8 if device.type == "cuda" else 1)
        cache = SlotCache(self.cfg, B, max(len(p) for p in prompts) + max_new_tokens, device,
                          self.embed_tokens.weight.dtype)
        tokens = torch.zeros(B, dtype=torch.long, device=device)  # each slot's latest token
        new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # each slot's new tokens
        count = torch.zeros(B, dtype=torch.long, device=device)  # how many of them
        alive = torch.zeros(B, dtype=torch.bool, device=device)  # still decoding (no EOS, room left)
        job, judged, out, queue = [None] * B, [0] * B, [None] * n, list(range(n))[::-1]

        def draw(logits):
            return sample_next(logits[:, :vocab_size].float(), temperature, top_p, generator)

        def fill(free):  # the next prompts into the free slots: prefill and their first token
            take = [(b, queue.pop()) for b in free[:len(queue)]]
            if not take:
                return
            rows = torch.tensor([b for b, _ in take], device=device)
            first = draw(self.prefill([prompts[j] for _, j in take], [b for b, _ in take], cache))
            tokens[rows], new[rows], count[rows] = first, 0, 1
            new[rows, 0] = first
            alive[rows] = (first != eos_id) & (max_new_tokens > 1)
            for b, j in take:
                job[b], judged[b] = j, 0

        with autocast(device):  # one context for the loop: autocast casts each weight once, not every step
            fill(list(range(B)))
            step = self._decode_step(tokens, cache, graphs)
            last = cache.k.shape[3] - 1
            while any(j is not None for j in job):
                for _ in range(check_every):
                    nxt = draw(step())
                    at = count.clamp(max=max_new_tokens - 1)
                    new[cache.rows, at] = torch.where(alive, nxt, new[cache.rows, at])  # only live rows record
                    count += alive
                    alive &= (nxt != eos_id) & (count < max_new_tokens)
                    tokens.copy_(nxt)
                    cache.lens.add_(1).clamp_(max=last)  # an ended slot keeps stepping until refilled
                free, live, counts = [], alive.tolist(), count.tolist()  # one transfer of the new tokens
                for b, row in enumerate(new.tolist()):
                    if job[b] is None:
                        continue
                    end = judge(row[:counts[b]], judged[b], eos_id, finished, live[b])
                    judged[b] = counts[b]
                    if end is not None:
                        out[job[b]], job[b] = row[:end], None
                        free.append(b)
                if free:
                    alive[torch.tensor(free, device=device)] = False
                    if progress:
                        progress(sum(o is not None for o in out))
                    fill(free)
        return out

    def _decode_step(self, tokens, cache: SlotCache, graphs: bool | None):
        """decode(tokens, cache) as a function of no arguments: eager, or replayed from a CUDA graph
        captured once (cuda_graphs says when); a capture that fails falls back to eager."""
        device = tokens.device

        def eager():
            with autocast(device):
                return self.decode(tokens, cache)

        if not cuda_graphs(device, graphs):
            return eager
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # casts inside the graph
            with torch.cuda.stream(side), amp:
                for _ in range(2):  # warm-up: keys written at the current lengths, rewritten by step 1
                    self.decode(tokens, cache)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), amp:
                logits = self.decode(tokens, cache)
        except RuntimeError as e:
            print(f"warning: decoding without CUDA graphs (the capture failed: {str(e).splitlines()[0]})")
            return eager

        def replay():
            graph.replay()
            return logits

        return replay

    # ------------------------------------------------------------ Hugging Face I/O

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "Transformer":
        """Load a Hugging Face Llama directory: config.json + model.safetensors, or shards
        listed in model.safetensors.index.json. The checkpoint's names and shapes are compared with
        the config's before any model is built; every weight must be a float tensor (float16 and
        bfloat16 are converted)."""
        cfg = config_from_hf(path)
        weights = read_hf_weights(path)
        if cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)  # some tied checkpoints still store the head
        layers = {k.split(".")[1] for k in weights if k.startswith("layers.")}
        # before anything of that size is made (an absurd num_hidden_layers is not even enumerated)
        if len(layers) != cfg.n_layers or layers != {str(i) for i in range(cfg.n_layers)}:
            raise ValueError(f"{path}: the checkpoint holds {len(layers)} layers, config.json's "
                             f"num_hidden_layers says {cfg.n_layers}")
        expected = parameter_shapes(cfg)
        missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the config: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for name, t in weights.items():
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the config says "
                                 f"{expected[name]}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{path}: {name} holds {t.dtype} values, not floating-point weights")
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({n: t.to(dtype) for n, t in weights.items()}, assign=True)
        return model

    def save_pretrained(self, path: str, **config):
        """Write config.json and model.safetensors in the Hugging Face Llama layout; `config` adds
        fields to config.json (bos_token_id, eos_token_id, pad_token_id). The files are written in
        place: write into a new folder and rename it when complete (runs.StageOutput does)."""
        os.makedirs(path, exist_ok=True)
        c = self.cfg
        hf = {"architectures": [ARCHITECTURES[c.arch]], "model_type": c.arch, "vocab_size": c.vocab_size,
              "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": str(self.embed_tokens.weight.dtype)[6:], **config}
        # the transformers 4 layout (as Meta's Llama 3.x checkpoints ship); transformers 5 reads it too
        hf["rope_scaling"] = None if c.rope_scaling is None else {"rope_type": "llama3", **c.rope_scaling}
        if c.arch != "llama":
            hf["use_sliding_window"] = False
        tensors = {("" if n == "lm_head.weight" else "model.") + n: p.detach().contiguous().cpu()
                   for n, p in self.named_parameters()}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


def cuda_graphs(device: torch.device, wanted: bool | None) -> bool:
    """Whether generate_refill replays its decode step from a CUDA graph: on CUDA unless wanted is
    False; never elsewhere (a CPU step costs little to launch, and graphs are CUDA's)."""
    return device.type == "cuda" and wanted is not False


def judge(row: list[int], start: int, eos_id: int, finished, live: bool) -> int | None:
    """Where a slot's row ends, judged from token `start` on, as generate() ends a row: at its EOS
    (not kept), at the token that makes finished(tokens so far) true (kept), or at its last token
    once it no longer decodes (live False: max_new_tokens reached); None: it goes on."""
    for t in range(start, len(row)):
        if row[t] == eos_id:
            return t
        if finished is not None and finished(row[:t + 1]):
            return t + 1
    return None if live else len(row)


def sample_next(logits, temperature: float, top_p: float, generator):
    """logits [B,V] -> next token [B]: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return draw(probs if top_p == 1.0 else nucleus(probs, top_p), generator)


DRAW_CHUNK = 2**14  # logits whose race model.draw runs at once: 12 bytes each (a float64 u, a float32 q)


def draw(probs, generator):
    """One token per row of probs [B,V] (weights >= 0), the token torch.multinomial(probs, 1) draws,
    with the generator left in the same state; faster on a CPU.

    torch draws one sample as a race: argmax over the row of probs / q, q ~ Exp(1) drawn for every
    entry (the Gumbel-max trick in exponential form; ATen's Distributions.cpp). On a CPU its
    exponential_ is a serial loop of q = -log1p(-u), u a float64 uniform per entry: 65 ms for 64
    rows of SmolLM2's 49,152 tokens on 2 cores, about as long as the model's products in a decode
    step (docs/benchmarks.md). Here uniform_ makes the same u, DRAW_CHUNK logits at a time (rows in
    order draw the generator's numbers in the order one call does), and vectorized ops the same q
    and race: 25 ms, top-p or not. This follows torch's CPU kernel (torch 2.13), and a test
    compares them token for token, so a torch that changed its kernel would fail it. Elsewhere
    torch.multinomial itself."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    picks = []
    for rows in probs.split(max(1, DRAW_CHUNK // probs.shape[-1])):  # the uniforms in row order, as one call
        q = torch.empty(rows.shape, dtype=torch.float64).uniform_(generator=generator)  # exponential_'s u
        q = q.neg_().log1p_().neg_().to(probs.dtype)  # -log1p(-u) in float64, as exponential_ computes it
        picks.append(torch.div(rows, q, out=q).argmax(-1))  # the race, p / q, in q
    return torch.cat(picks)


def nucleus(probs, top_p: float, k: int = 64):
    """probs [B,V] with 0 for every token outside its row's top-p nucleus (Holtzman et al. 2020):
    in descending order of probability, a token is kept while the mass before it is at most top_p.

    On a CPU, looked for among each row's k+1 likeliest tokens (torch.topk, sorted), k growing 4x
    until every row's (k+1)-th is dropped: the mass before a token only grows down the order, so
    every later token is dropped too. The kept set and values are those of sorting all V (cumsum is
    a sequential scan on a CPU, so its first k+1 sums are the whole row's), up to the order of
    exactly tied probabilities; once k+1 reaches V, every token is sorted, as before. Sorting
    SmolLM2's 49,152 tokens for 64 rows took 0.15 s of each decode step on 2 CPU cores
    (docs/benchmarks.md). Elsewhere every token is sorted at once: the test of the (k+1)-th would
    make the host wait for the device at every step."""
    V = probs.shape[-1]
    k = k if probs.device.type == "cpu" else V
    while True:
        top, order = probs.topk(k + 1, dim=-1) if k + 1 < V else probs.sort(dim=-1, descending=True)
        drop = top.cumsum(-1) - top > top_p  # the mass before each token, as in a full sort
        if k + 1 >= V or drop[:, -1].all():
            return torch.zeros_like(probs).scatter(-1, order, top.masked_fill(drop, 0.0))
        k *= 4


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The name and shape of every parameter of Transformer(cfg), without building it: one block's,
    built on the meta device, repeated for every layer."""
    with torch.device("meta"):
        block = {n: tuple(p.shape) for n, p in Block(cfg, 0).named_parameters()}
    shapes = {"embed_tokens.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{n}": s for n, s in block.items()})
    return shapes


def config_from_hf(path: str) -> ModelConfig:
    """Map a Hugging Face LlamaConfig to ModelConfig; refuse what this model does not implement."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        try:
            hf = json.load(f)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{file}: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: not a JSON object")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not positive_int(hf.get(k))]
    if missing:
        raise ValueError(f"{file}: missing or not a positive integer: {', '.join(missing)}")
    wrong = [f"{k} {hf[k]!r} (not a positive integer)"
             for k in ("num_key_value_heads", "max_position_embeddings", "head_dim")
             if hf.get(k) is not None and not positive_int(hf[k])]
    wrong += [f"{k} {hf[k]!r} (not a positive number)" for k in ("rms_norm_eps", "rope_theta")
              if k in hf and not positive_number(hf[k])]
    wrong += [f"{k} {hf[k]!r} (not true or false)" for k in ("tie_word_embeddings", "attention_bias",
                                                             "mlp_bias")
              if hf.get(k) is not None and not isinstance(hf[k], bool)]
    wrong += [f"{k} {hf[k]!r} (not an object)" for k in ("rope_scaling", "rope_parameters")
              if hf.get(k) is not None and not isinstance(hf[k], dict)]
    if wrong:
        raise ValueError(f"{file}: {'; '.join(wrong)}")
    refuse, arch = [], hf.get("model_type")
    if arch not in ARCHITECTURES:
        refuse.append(f"model_type {arch!r} (only {', '.join(map(repr, ARCHITECTURES))})")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        refuse.append("sliding-window attention (use_sliding_window true)")
    theta, scaling = hf.get("rope_theta", 10000.0), None
    # transformers < 5: rope_theta at the top level, scaling in rope_scaling; transformers >= 5
    # writes both under rope_parameters
    for field in ("rope_scaling", "rope_parameters"):
        rope = dict(hf.get(field) or {})
        kind = rope.pop("rope_type", rope.pop("type", "default"))  # "type": the older name; both popped
        theta = rope.pop("rope_theta", theta)
        why = llama3_rope_problem(rope) if kind == "llama3" else "only rope_type 'default' and 'llama3'"
        if why is None:
            scaling = rope
        elif kind != "default" or rope:
            refuse.append(f"{field} {hf[field]} ({why})")
    for key in ("attention_bias", "mlp_bias"):  # Llama's and Qwen3's also bias o_proj (mlp: the MLP)
        if hf.get(key):
            refuse.append(f"{key} true")
    if hf.get("hidden_act", "silu") != "silu":
        refuse.append(f"hidden_act {hf['hidden_act']!r}")
    heads = hf["num_attention_heads"]
    head_size = hf.get("head_dim") if hf.get("head_dim") != hf["hidden_size"] // heads else None
    if head_size is None and hf["hidden_size"] % heads:
        refuse.append(f"hidden_size {hf['hidden_size']} does not divide by num_attention_heads {heads}")
    if heads % (hf.get("num_key_value_heads") or heads):
        refuse.append(f"num_attention_heads {heads} does not divide by num_key_value_heads "
                      f"{hf['num_key_value_heads']}")
    if refuse:
        raise ValueError(f"{file}: unsupported config: " + "; ".join(refuse))
    return ModelConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                       hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                       rope_theta=theta, rope_scaling=scaling,
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=hf.get("tie_word_embeddings", False), arch=arch,
                       qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", head_size=head_size)


def positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    """Tensors of model.safetensors or of every shard in its index, named without "model."."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map each tensor name to its shard's file name")
        if any(os.path.basename(v) != v for v in weight_map.values()):
            raise ValueError(f"{index}: a shard's file name holds a directory; shards lie beside the index")
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
                    continue
                weights[key.removeprefix("model.")] = f.get_tensor(key)
    return weights
