#!/usr/bin/env python3
"""Cross-check model.Transformer against Hugging Face transformers' LlamaForCausalLM.

This script needs `transformers`, which is NOT a dependency of this project (model.py never
imports it, and neither do the tests). Run it with the python of a throwaway venv kept outside the
repository, from the repository root (so that `-m` finds tools/ and model.py):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    cd path/to/this/repository
    /tmp/hfvenv/bin/python -m tools.check_hf_interop            # the checks below
    /tmp/hfvenv/bin/python -m tools.check_hf_interop --write-fixture tests/fixtures/hf_llama_tiny
    /tmp/hfvenv/bin/python -m tools.check_hf_interop --write-fixture tests/fixtures/hf_llama3_rope_tiny

What it checks, all in float32 on CPU, with random tiny GQA models whose weights are drawn
large enough that logits are O(1) (HF's own 0.02-std init gives logits ~1e-3, which would hide
errors under the 1e-4 tolerance):
  * HF -> ours: LlamaForCausalLM.save_pretrained (single file and sharded with an index;
    tied and untied embeddings; default and non-default rope_theta) -> Transformer.from_pretrained,
    logits on random ids without a mask and with left padding (HF gets the same attention_mask
    and the padding-aware position_ids that its generate() would use; only real positions are
    compared).
  * ours -> HF: Transformer(cfg) -> save_pretrained -> LlamaForCausalLM.from_pretrained, same
    comparisons.
  * Llama 3 RoPE scaling (rope_type "llama3"), both directions, on 48-token sequences with
    original_max_position_embeddings 32 and a rope_theta and factors chosen so that the rotary
    frequencies fall in all three bands (kept, interpolated, divided by factor); HF -> ours also
    with config.json rewritten to the transformers-4 layout (top-level rope_theta + rope_scaling,
    as Meta's Llama 3.x checkpoints ship). Also compares HF's rotary inv_freq with ours.
  * negative controls: a wrong rope_theta, swapped kv heads, and a llama3 checkpoint run without
    its scaling must all be caught.
  * refusals: configs this model does not implement must make from_pretrained raise a
    ValueError naming config.json and the offending field.
Exit status 1 if any logits difference is >= 1e-4 or any refusal check fails.

--write-fixture DIR writes one of the committed test fixtures that tests/test_hf_interop.py checks
without transformers, picked by DIR's last component (see FIXTURES): hf_llama_tiny (a sharded,
untied, GQA checkpoint) or hf_llama3_rope_tiny (single-file, tied, GQA, Llama 3 RoPE scaling),
each written by transformers with expected.safetensors holding HF's logits.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

from model import ModelConfig, Transformer, rope_inv_freq

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
except ImportError:
    sys.exit("check_hf_interop.py needs transformers (not a project dependency): "
             "run it in a throwaway venv, see the docstring at the top of this file")

TOL = 1e-4

# Llama 3 RoPE scaling for the tiny models: with head_dim 16 and rope_theta 100 the rotary
# wavelengths 2*pi*100^(i/8) are 6.3 | 11.2 19.9 | 35.3 62.8 ... 353, i.e. below L/4 = 8 (kept),
# between 8 and L/1 = 32 (interpolated) and above 32 (divided by 8); sequences of 48 > L tokens.
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
LLAMA3_THETA, LLAMA3_T = 100.0, 48


def hf_config(vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, inter=160, theta=10000.0,
              tie=False, max_pos=128, llama3=None, **extra) -> "LlamaConfig":
    """llama3: Llama 3 RoPE scaling parameters, passed the transformers-4 way (rope_scaling), which
    transformers 5 also accepts (it moves them and rope_theta under rope_parameters)."""
    if llama3:
        extra["rope_scaling"] = {"rope_type": "llama3", **llama3}
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=inter, rope_theta=theta, rms_norm_eps=1e-6,
                       tie_word_embeddings=tie, max_position_embeddings=max_pos, **extra)


def rope_bands(head_dim, theta, llama3):
    """How many rotary frequencies Llama 3 scaling keeps, interpolates, divides by factor."""
    wavelen = 2 * torch.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    L = llama3["original_max_position_embeddings"]
    kept, divided = wavelen < L / llama3["high_freq_factor"], wavelen > L / llama3["low_freq_factor"]
    return int(kept.sum()), int((~kept & ~divided).sum()), int(divided.sum())


def hf_rope_params(hf_cfg):
    """transformers >= 5: rope_parameters (with rope_theta); older: rope_scaling (may be None)."""
    return getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}


def to_transformers4_layout(d):
    """Rewrite d/config.json as transformers < 5 (and Meta's Llama 3.x checkpoints) lay it out:
    rope_theta at the top level, scaling under rope_scaling, no rope_parameters."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    with open(path, "w") as f:
        json.dump(c, f)


@torch.no_grad()
def randomize_(module: torch.nn.Module, gen: torch.Generator):
    """Draw weights so that activations and logits are O(1): matrices N(0, 1/fan_in),
    embeddings N(0, 1), norm weights 1 + N(0, 0.2^2). Tied parameters are drawn once."""
    seen = set()
    for name, p in module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def make_batch(vocab: int, T: int, pads: list[int], gen: torch.Generator):
    """Random ids [B,T] and a left-padding mask [B,T] with pads[i] padding slots in row i."""
    B = len(pads)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate(pads):
        mask[i, :n] = 0
        ids[i, :n] = 0  # pad id; its value must not matter
    return ids, mask


def hf_position_ids(mask):
    """What transformers' generate() passes for a left-padded batch: real tokens count 0, 1, ..."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def hf_logits(hf, ids, mask=None):
    if mask is None:
        return hf(input_ids=ids).logits.float()
    return hf(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits.float()


@torch.no_grad()
def compare(hf, ours, vocab, gen, T=16):
    """(unpadded max abs diff, padded max abs diff at real positions, max |logit|) on [3,T] batches."""
    ids, mask = make_batch(vocab, T, [0, 5, T - 5], gen)
    a, b = hf_logits(hf, ids), ours(ids).float()
    d_plain = (a - b).abs().max().item()
    a, b = hf_logits(hf, ids, mask), ours(ids, attention_mask=mask).float()
    real = mask.bool()
    d_pad = (a[real] - b[real]).abs().max().item()
    return d_plain, d_pad, a[real].abs().max().item()


def check_same_rope(hf, ours):
    """HF's rotary inverse frequencies must be ours (Llama 3 scaling included), to float32 rounding."""
    want = ours.cfg.rope_scaling
    got = {k: v for k, v in hf_rope_params(hf.config).items() if k in LLAMA3} or None
    if got != want:
        raise AssertionError(f"HF's RoPE scaling {hf_rope_params(hf.config)} != ours {want}")
    ours_f = rope_inv_freq(ours.cfg.head_dim, ours.cfg.rope_theta, ours.cfg.rope_scaling)
    d = ((hf.model.rotary_emb.inv_freq - ours_f).abs() / ours_f).max().item()
    if d > 1e-6:
        raise AssertionError(f"rotary inv_freq differs from HF's: max relative difference {d:.2e}")


def hf_to_ours(tie: bool, sharded: bool, theta: float, seed: int, attn: str = "sdpa", llama3=None,
               transformers4_layout=False):
    gen = torch.Generator().manual_seed(seed)
    hf = LlamaForCausalLM(hf_config(theta=theta, tie=tie, llama3=llama3)).float().eval()
    hf.set_attn_implementation(attn)
    randomize_(hf, gen)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, max_shard_size="40KB" if sharded else "100GB")
        shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        has_index = os.path.exists(os.path.join(d, "model.safetensors.index.json"))
        assert ((len(shards) > 1 and has_index) if sharded
                else (shards == ["model.safetensors"] and not has_index)), shards
        if transformers4_layout:
            to_transformers4_layout(d)
        ours = Transformer.from_pretrained(d).eval()
    check_same_rope(hf, ours)
    return compare(hf, ours, hf.config.vocab_size, gen, T=LLAMA3_T if llama3 else 16) + (len(shards),)


def ours_to_hf(tie: bool, theta: float, seed: int, llama3=None):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                      norm_eps=1e-6, rope_theta=theta, max_seq_len=128, tie_embeddings=tie,
                      rope_scaling=llama3)
    ours = Transformer(cfg).eval()
    randomize_(ours, gen)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if hf.config.tie_word_embeddings != tie:
        raise AssertionError(f"HF read tie_word_embeddings={hf.config.tie_word_embeddings}, saved {tie}")
    check_same_rope(hf, ours)
    return compare(hf, ours, cfg.vocab_size, gen, T=LLAMA3_T if llama3 else 16) + (1,)


# ------------------------------------------------------------------------------ refusals

def refusal_cases():
    """(label, how the config.json is made, field the error must name). Real transformers
    configs where transformers can write them, hand edits of a valid config.json otherwise."""
    def real(**extra):
        return lambda d: (LlamaForCausalLM(hf_config(vocab=32, hidden=32, inter=64, **extra))
                          .save_pretrained(d))

    def mistral(d):
        from transformers import MistralConfig, MistralForCausalLM
        MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64)).save_pretrained(d)

    def edited(**fields):
        def make(d):
            real()(d)
            path = os.path.join(d, "config.json")
            with open(path) as f:
                c = json.load(f)
            c.update(fields)
            with open(path, "w") as f:
                json.dump(c, f)
        return make

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}
    return [
        ("rope_scaling linear (transformers writes rope_parameters)",
         real(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
        ("rope_parameters dynamic", real(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
         "rope_parameters"),
        ("rope_parameters yarn",
         real(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
         "rope_parameters"),
        ("rope_parameters longrope",
         real(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                               "original_max_position_embeddings": 32}), "rope_parameters"),
        ("rope_scaling (old-style key, hand edit)",
         edited(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        ("rope_scaling yarn (transformers-4 layout, hand edit)",
         edited(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
         "rope_scaling"),
        ("rope_parameters llama3 + partial_rotary_factor (hand edit)",
         edited(rope_parameters={**llama3, "partial_rotary_factor": 0.5}), "rope_parameters"),
        ("rope_parameters llama3 without original_max_pos (hand edit)",
         edited(rope_parameters={k: v for k, v in llama3.items() if k != "original_max_position_embeddings"}),
         "rope_parameters"),
        ("rope_parameters llama3, high_freq_factor < low (hand edit)",
         edited(rope_parameters={**llama3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
         "rope_parameters"),
        ("attention_bias true", real(attention_bias=True), "attention_bias"),
        ("mlp_bias true", real(mlp_bias=True), "mlp_bias"),
        ("model_type mistral (MistralForCausalLM)", mistral, "model_type"),
        ("model_type qwen2 (hand edit)", edited(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
         "model_type"),
        ("hidden_act gelu", real(hidden_act="gelu"), "hidden_act"),
    ]


def check_refusal(make, field):
    with tempfile.TemporaryDirectory() as d:
        make(d)
        try:
            Transformer.from_pretrained(d)
        except ValueError as e:
            msg = str(e)
            ok = "config.json" in msg and field in msg
            return ok, f"ValueError: {msg}"
        except Exception as e:  # noqa: BLE001 - report whatever else it raised
            return False, f"{type(e).__name__} (not ValueError): {e}"
        return False, "accepted (no error)"


# ------------------------------------------------------------------------------ fixture

FIXTURES = {  # --write-fixture DIR: DIR's last component -> what to write
    "hf_llama_tiny": dict(cfg=dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, inter=64,
                                   theta=500000.0, tie=False, max_pos=64),
                          max_shard_size="40KB", T=10, pads=[0, 4]),
    # Llama 3 RoPE scaling; head_dim 8, rope_theta 100: wavelengths 6.3 | 19.9 | 62.8 198.7 against
    # L/4 = 8 and L = 32, so one frequency is kept, one interpolated, two divided by 8
    "hf_llama3_rope_tiny": dict(cfg=dict(vocab=16, hidden=32, layers=1, heads=4, kv_heads=2, inter=16,
                                         theta=100.0, tie=True, max_pos=128, llama3=LLAMA3),
                                max_shard_size="100GB", T=40, pads=[0, 6]),
    # Qwen2: biases on q, k, v; tied embeddings and rope_theta 1e6, as Qwen2/2.5-0.5B
    "hf_qwen2_tiny": dict(arch="qwen2", cfg=dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, inter=64,
                                                 theta=1000000.0, tie=True, max_pos=64),
                          max_shard_size="100GB", T=10, pads=[0, 4]),
    # Qwen3: RMSNorm on each head's queries and keys, head_dim 16 though hidden / heads is 8
    "hf_qwen3_tiny": dict(arch="qwen3", cfg=dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, inter=64,
                                                 theta=1000000.0, tie=True, max_pos=64, head_dim=16),
                          max_shard_size="100GB", T=10, pads=[0, 4]),
}


def hf_model(arch, c):
    """A random-init transformers model of family `arch` (llama, qwen2, qwen3) from FIXTURES' cfg c."""
    if arch == "llama":
        return LlamaForCausalLM(hf_config(**c))
    import transformers as t
    config, model = {"qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
                     "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM)}[arch]
    extra = {"head_dim": c["head_dim"]} if "head_dim" in c else {}
    return model(config(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                        intermediate_size=c["inter"], rope_theta=c["theta"], rms_norm_eps=1e-6,
                        tie_word_embeddings=c["tie"], max_position_embeddings=c["max_pos"],
                        use_sliding_window=False, **extra))


def fixture_readme(name, spec, seed, files):
    c, B, T = spec["cfg"], len(spec["pads"]), spec["T"]
    head = (f"# {name}\n\n"
            f"Generated by `python -m tools.check_hf_interop --write-fixture tests/fixtures/{name}` "
            f"(seed {seed}) with transformers {transformers.__version__} and torch {torch.__version__}, "
            "float32, in a throwaway venv (transformers is not a project dependency).\n\n")
    tail = (f"expected.safetensors: `input_ids` [{B},{T}] (row 1 left-padded by {spec['pads'][1]}), "
            f"`attention_mask` [{B},{T}], and `logits` [{B},{T},{c['vocab']}] from transformers, given the "
            "attention_mask and position_ids = cumsum(mask) - 1 (as its generate() does); logits at padding "
            "slots are zeroed (compare real positions only).\n")
    if "arch" in spec:
        what = {"qwen2": "biases on q, k and v",
                "qwen3": f"an RMSNorm on each head's queries and keys, head_dim {c.get('head_dim')} "
                         f"(hidden / heads is {c['hidden'] // c['heads']})"}[spec["arch"]]
        return head + (
            f"A random {spec['arch'].capitalize()}ForCausalLM: vocab {c['vocab']}, hidden {c['hidden']}, "
            f"{c['layers']} layers, {c['heads']} heads, {c['kv_heads']} kv heads (GQA), intermediate "
            f"{c['inter']}, rope_theta {c['theta']}, tied embeddings, {what}; weights drawn so logits are "
            "O(1); saved by `save_pretrained()` into a single model.safetensors.\n\n") + tail
    if name == "hf_llama_tiny":
        shards = [f for f in files if f.startswith("model-")]
        return head + (
            f"A random LlamaForCausalLM: vocab {c['vocab']}, hidden {c['hidden']}, "
            f"{c['layers']} layers, {c['heads']} heads, {c['kv_heads']} kv heads (GQA), "
            f"intermediate {c['inter']}, rope_theta {c['theta']} (stored by transformers 5 under "
            "rope_parameters), untied embeddings, weights drawn so logits are O(1); saved by "
            f"`save_pretrained(max_shard_size=\"40KB\")` into {len(shards)} shards + "
            "model.safetensors.index.json.\n\n"
        ) + tail
    r = c["llama3"]
    kept, mid, divided = rope_bands(c["hidden"] // c["heads"], c["theta"], r)
    return head + (
        f"A random LlamaForCausalLM with Llama 3 RoPE scaling: vocab {c['vocab']}, hidden {c['hidden']}, "
        f"{c['layers']} layer, {c['heads']} heads, {c['kv_heads']} kv heads (GQA, head_dim "
        f"{c['hidden'] // c['heads']}), intermediate {c['inter']}, tied embeddings, max_position_embeddings "
        f"{c['max_pos']}, rope_parameters {{rope_type llama3, rope_theta {c['theta']}, factor {r['factor']}, "
        f"low_freq_factor {r['low_freq_factor']}, high_freq_factor {r['high_freq_factor']}, "
        f"original_max_position_embeddings {r['original_max_position_embeddings']}}} (transformers 5 layout; "
        "the tests also rewrite it to the transformers 4 one). Of the "
        f"{kept + mid + divided} rotary frequencies, {kept} is kept, {mid} interpolated and {divided} "
        f"divided by the factor, so all three bands of the scaling matter, and the {T}-token sequences "
        "run past original_max_position_embeddings. Weights drawn so logits are O(1); saved by "
        "`save_pretrained()` into a single model.safetensors.\n\n"
    ) + tail


@torch.no_grad()
def write_fixture(out: str, seed: int = 0):
    name = os.path.basename(os.path.normpath(out))
    if name not in FIXTURES:
        sys.exit(f"--write-fixture: the directory must be named one of {sorted(FIXTURES)}, got {name!r}")
    spec = FIXTURES[name]
    c = spec["cfg"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hf = hf_model(spec.get("arch", "llama"), c).float().eval()
    randomize_(hf, gen)
    if os.path.exists(out):
        shutil.rmtree(out)
    hf.save_pretrained(out, max_shard_size=spec["max_shard_size"])
    ids, mask = make_batch(c["vocab"], spec["T"], spec["pads"], gen)
    logits = hf_logits(hf, ids, mask)
    logits[mask == 0] = 0.0  # padding slots are not compared; zero them rather than store HF's values
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "logits": logits.contiguous()},
              os.path.join(out, "expected.safetensors"),
              metadata={"transformers_version": transformers.__version__})
    files = sorted(os.listdir(out))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(fixture_readme(name, spec, seed, files))
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {', '.join(files)}; {total} bytes, transformers {transformers.__version__}")
    # check it against our loader right away
    ours = Transformer.from_pretrained(out).eval()
    check_same_rope(hf, ours)
    real = mask.bool()
    d = (ours(ids, attention_mask=mask)[real] - logits[real]).abs().max().item()
    print(f"ours vs fixture logits (real positions): max abs diff {d:.3e}")
    ok = d < TOL
    if ours.cfg.rope_scaling is not None:  # the fixture must tell scaled RoPE from plain RoPE
        ours.cfg.rope_scaling = None
        d0 = (ours(ids, attention_mask=mask)[real] - logits[real]).abs().max().item()
        print(f"ours without the RoPE scaling vs fixture: max abs diff {d0:.3e} (must be >= {TOL:g})")
        ok &= d0 >= TOL
    return ok


# ------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-fixture", metavar="DIR", help="write the test fixture to DIR and exit")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    if args.write_fixture:
        sys.exit(0 if write_fixture(args.write_fixture) else 1)

    rows, failed = [], False
    seed = 0
    for theta in (10000.0, 500000.0):
        for tie in (False, True):
            for sharded in (False, True):
                seed += 1
                label = (f"HF->ours {'sharded' if sharded else 'single '} {'tied  ' if tie else 'untied'} "
                         f"theta={theta:g}")
                try:
                    rows.append((label,) + hf_to_ours(tie, sharded, theta, seed))
                except Exception as e:  # noqa: BLE001
                    rows.append((label, float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {e}"))
        for tie in (False, True):
            seed += 1
            label = f"ours->HF single  {'tied  ' if tie else 'untied'} theta={theta:g}"
            try:
                rows.append((label,) + ours_to_hf(tie, theta, seed))
            except Exception as e:  # noqa: BLE001
                rows.append((label, float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {e}"))
    seed += 1
    label = "HF(eager attn)->ours sharded untied theta=5e5"
    try:
        rows.append((label,) + hf_to_ours(False, True, 500000.0, seed, attn="eager"))
    except Exception as e:  # noqa: BLE001
        rows.append((label, float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {e}"))
    bands = rope_bands(64 // 4, LLAMA3_THETA, LLAMA3)
    assert min(bands) > 0, f"LLAMA3 test config must hit all three bands, got {bands}"
    print(f"llama3 rope scaling cases: {LLAMA3}, rope_theta {LLAMA3_THETA:g}, T={LLAMA3_T}; "
          f"rotary frequencies kept / interpolated / divided: {bands}")
    for label, run, kw in (
            ("HF->ours llama3 single  untied (tf5 rope_parameters)", hf_to_ours,
             dict(tie=False, sharded=False)),
            ("HF->ours llama3 sharded tied   (tf5 rope_parameters)", hf_to_ours,
             dict(tie=True, sharded=True)),
            ("HF->ours llama3 single  untied (tf4 rope_scaling)", hf_to_ours,
             dict(tie=False, sharded=False, transformers4_layout=True)),
            ("HF(eager attn)->ours llama3 single tied", hf_to_ours,
             dict(tie=True, sharded=False, attn="eager")),
            ("ours->HF llama3 single  untied", ours_to_hf, dict(tie=False)),
            ("ours->HF llama3 single  tied", ours_to_hf, dict(tie=True))):
        seed += 1
        try:
            rows.append((label,) + run(theta=LLAMA3_THETA, seed=seed, llama3=LLAMA3, **kw))
        except Exception as e:  # noqa: BLE001
            rows.append((label, float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {e}"))

    print(f"\n{'direction / checkpoint':52s} {'files':>5s} {'unpadded':>10s} {'padded':>10s} "
          f"{'max|logit|':>10s}  result")
    for label, d_plain, d_pad, scale, files in rows:
        ok = d_plain < TOL and d_pad < TOL  # NaN compares False
        failed |= not ok
        extra = "" if isinstance(files, int) else f"  {files}"
        files = files if isinstance(files, int) else "-"
        print(f"{label:52s} {files!s:>5s} {d_plain:10.3e} {d_pad:10.3e} {scale:10.3f}  "
              f"{'ok' if ok else 'FAIL'}{extra}")

    # negative controls: the comparison must notice real mismatches of the kind it guards
    # against (a wrong rope_theta; k/v heads grouped the wrong way for GQA; RoPE scaling ignored)
    gen = torch.Generator().manual_seed(1234)
    hf = LlamaForCausalLM(hf_config(theta=500000.0)).float().eval()
    randomize_(hf, gen)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        wrong_theta = Transformer.from_pretrained(d).eval()
        wrong_gqa = Transformer.from_pretrained(d).eval()
    wrong_theta.cfg.rope_theta = 10000.0
    for layer in wrong_gqa.layers:  # swap the two kv heads: query heads now read the other group
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.view(2, -1, proj.weight.shape[1])
            proj.weight.data = w.flip(0).reshape(proj.weight.shape).contiguous()
    hf3 = LlamaForCausalLM(hf_config(theta=LLAMA3_THETA, llama3=LLAMA3)).float().eval()
    randomize_(hf3, gen)
    with tempfile.TemporaryDirectory() as d:
        hf3.save_pretrained(d)
        no_scaling = Transformer.from_pretrained(d).eval()
    no_scaling.cfg.rope_scaling = None
    for name, ref, ours, T in (("rope_theta 1e4 on a 5e5 checkpoint", hf, wrong_theta, 16),
                               ("kv heads swapped", hf, wrong_gqa, 16),
                               ("llama3 checkpoint without its scaling", hf3, no_scaling, LLAMA3_T)):
        d_plain, d_pad, _ = compare(ref, ours, 96, gen, T=T)
        ok = d_plain >= TOL and d_pad >= TOL
        failed |= not ok
        print(f"{'control: ' + name + ' (must differ)':64s} {d_plain:10.3e} {d_pad:10.3e}  "
              f"{'ok' if ok else 'FAIL'}")

    print(f"\n{'config that must be refused':60s} result")
    for label, make, field in refusal_cases():
        ok, what = check_refusal(make, field)
        failed |= not ok
        print(f"{label:60s} {'ok' if ok else 'FAIL'}: {what[:160]}")

    print(f"\n{'FAILED' if failed else 'all ok'} (tolerance {TOL:g} max abs logits difference)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
