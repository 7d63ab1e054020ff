#!/usr/bin/env python3
"""Cross-check model.Transformer against Hugging Face transformers' LlamaForCausalLM.

This script needs `transformers`, which is NOT a dependency of this project (model.py never
imports it, and neither do the tests). Run it in a throwaway venv outside the repository:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfvenv/bin/python scripts/check_hf_interop.py            # the checks below
    /tmp/hfvenv/bin/python scripts/check_hf_interop.py --write-fixture tests/fixtures/hf_llama_tiny

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
  * refusals: configs this model does not implement must make from_pretrained raise a
    ValueError naming config.json and the offending field.
Exit status 1 if any logits difference is >= 1e-4 or any refusal check fails.

--write-fixture DIR writes the committed test fixture (a sharded, untied, GQA checkpoint written
by transformers, plus expected.safetensors with HF's logits) that tests/test_hf_interop.py
checks without transformers.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
except ImportError:
    sys.exit("check_hf_interop.py needs transformers (not a project dependency): "
             "run it in a throwaway venv, see the docstring at the top of this file")

from safetensors.torch import save_file  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402

TOL = 1e-4


def hf_config(vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, inter=160, theta=10000.0,
              tie=False, max_pos=128, **extra) -> "LlamaConfig":
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=inter, rope_theta=theta, rms_norm_eps=1e-6,
                       tie_word_embeddings=tie, max_position_embeddings=max_pos, **extra)


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
def compare(hf, ours, vocab, gen):
    """(unpadded max abs diff, padded max abs diff at real positions, max |logit|)."""
    ids, mask = make_batch(vocab, 16, [0, 5, 11], gen)
    a, b = hf_logits(hf, ids), ours(ids).float()
    d_plain = (a - b).abs().max().item()
    a, b = hf_logits(hf, ids, mask), ours(ids, attention_mask=mask).float()
    real = mask.bool()
    d_pad = (a[real] - b[real]).abs().max().item()
    return d_plain, d_pad, a[real].abs().max().item()


def hf_to_ours(tie: bool, sharded: bool, theta: float, seed: int, attn: str = "sdpa"):
    gen = torch.Generator().manual_seed(seed)
    hf = LlamaForCausalLM(hf_config(theta=theta, tie=tie)).float().eval()
    hf.set_attn_implementation(attn)
    randomize_(hf, gen)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, max_shard_size="40KB" if sharded else "100GB")
        shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        has_index = os.path.exists(os.path.join(d, "model.safetensors.index.json"))
        assert (len(shards) > 1 and has_index) if sharded else (shards == ["model.safetensors"] and not has_index), shards
        ours = Transformer.from_pretrained(d).eval()
    return compare(hf, ours, hf.config.vocab_size, gen) + (len(shards),)


def ours_to_hf(tie: bool, theta: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                      norm_eps=1e-6, rope_theta=theta, max_seq_len=128, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    randomize_(ours, gen)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if hf.config.tie_word_embeddings != tie:
        raise AssertionError(f"HF read tie_word_embeddings={hf.config.tie_word_embeddings}, saved {tie}")
    return compare(hf, ours, cfg.vocab_size, gen) + (1,)


# ------------------------------------------------------------------------------ refusals

def refusal_cases():
    """(label, how the config.json is made, field the error must name). Real transformers
    configs where transformers can write them, hand edits of a valid config.json otherwise."""
    def real(**extra):
        return lambda d: LlamaForCausalLM(hf_config(vocab=32, hidden=32, inter=64, **extra)).save_pretrained(d)

    def mistral(d):
        from transformers import MistralConfig, MistralForCausalLM
        MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).save_pretrained(d)

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

    return [
        ("rope_scaling linear (transformers writes rope_parameters)",
         real(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
        ("rope_parameters llama3",
         real(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}), "rope"),
        ("rope_scaling (old-style key, hand edit)",
         edited(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        ("attention_bias true", real(attention_bias=True), "attention_bias"),
        ("mlp_bias true", real(mlp_bias=True), "mlp_bias"),
        ("model_type mistral (MistralForCausalLM)", mistral, "model_type"),
        ("model_type qwen2 (hand edit)", edited(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "model_type"),
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

FIXTURE_CFG = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, inter=64, theta=500000.0,
                   tie=False, max_pos=64)


@torch.no_grad()
def write_fixture(out: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config(**FIXTURE_CFG)).float().eval()
    randomize_(hf, gen)
    if os.path.exists(out):
        shutil.rmtree(out)
    hf.save_pretrained(out, max_shard_size="40KB")
    ids, mask = make_batch(FIXTURE_CFG["vocab"], 10, [0, 4], gen)
    logits = hf_logits(hf, ids, mask)
    logits[mask == 0] = 0.0  # padding slots are not compared; zero them rather than store HF's values
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(), "logits": logits.contiguous()},
              os.path.join(out, "expected.safetensors"), metadata={"transformers_version": transformers.__version__})
    shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            "# hf_llama_tiny\n\n"
            f"Generated by `python scripts/check_hf_interop.py --write-fixture tests/fixtures/hf_llama_tiny` "
            f"(seed {seed}) with transformers {transformers.__version__} and torch {torch.__version__}, float32, "
            "in a throwaway venv (transformers is not a project dependency).\n\n"
            f"A random LlamaForCausalLM: vocab {FIXTURE_CFG['vocab']}, hidden {FIXTURE_CFG['hidden']}, "
            f"{FIXTURE_CFG['layers']} layers, {FIXTURE_CFG['heads']} heads, {FIXTURE_CFG['kv_heads']} kv heads (GQA), "
            f"intermediate {FIXTURE_CFG['inter']}, rope_theta {FIXTURE_CFG['theta']} (stored by transformers 5 under "
            "rope_parameters), untied embeddings, weights drawn so logits are O(1); saved by "
            f"`save_pretrained(max_shard_size=\"40KB\")` into {len(shards)} shards + model.safetensors.index.json.\n\n"
            "expected.safetensors: `input_ids` [2,10] (row 1 left-padded by 4), `attention_mask` [2,10], and "
            "`logits` [2,10,64] from transformers, given the attention_mask and position_ids = cumsum(mask) - 1 "
            "(as its generate() does); logits at padding slots are zeroed (compare real positions only).\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {len(shards)} shards, {total} bytes, transformers {transformers.__version__}")
    # check it against our loader right away
    ours = Transformer.from_pretrained(out).eval()
    d = (ours(ids, attention_mask=mask)[mask.bool()] - logits[mask.bool()]).abs().max().item()
    print(f"ours vs fixture logits (real positions): max abs diff {d:.3e}")
    return d < TOL


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
                label = f"HF->ours {'sharded' if sharded else 'single '} {'tied  ' if tie else 'untied'} theta={theta:g}"
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

    print(f"\n{'direction / checkpoint':52s} {'files':>5s} {'unpadded':>10s} {'padded':>10s} {'max|logit|':>10s}  result")
    for label, d_plain, d_pad, scale, files in rows:
        ok = d_plain < TOL and d_pad < TOL  # NaN compares False
        failed |= not ok
        extra = "" if isinstance(files, int) else f"  {files}"
        files = files if isinstance(files, int) else "-"
        print(f"{label:52s} {files!s:>5s} {d_plain:10.3e} {d_pad:10.3e} {scale:10.3f}  {'ok' if ok else 'FAIL'}{extra}")

    # negative controls: the comparison must notice real mismatches of the kind it guards
    # against (a wrong rope_theta; k/v heads grouped the wrong way for GQA)
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
    for name, ours in (("rope_theta 1e4 on a 5e5 checkpoint", wrong_theta), ("kv heads swapped", wrong_gqa)):
        d_plain, d_pad, _ = compare(hf, ours, 96, gen)
        ok = d_plain >= TOL and d_pad >= TOL
        failed |= not ok
        print(f"{'control: ' + name + ' (must differ)':58s} {d_plain:10.3e} {d_pad:10.3e}  {'ok' if ok else 'FAIL'}")

    print(f"\n{'config that must be refused':56s} result")
    for label, make, field in refusal_cases():
        ok, what = check_refusal(make, field)
        failed |= not ok
        print(f"{label:56s} {'ok' if ok else 'FAIL'}: {what[:160]}")

    print(f"\n{'FAILED' if failed else 'all ok'} (tolerance {TOL:g} max abs logits difference)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
