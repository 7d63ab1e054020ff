"""memory_plan.py's formulas against measurements on tiny models (CPU, one thread).

Exact: parameters, gradients, MaskedAdamW state at a real global mask, masks. Within 1%: the
activations autograd saves (measured with saved_tensors_hooks; the formulas are exact up to a
few bytes of [B]-sized loss tensors, 0.005% at most here). Within 5-10%: allocator peaks of the
transients (glibc only; measured within 4%)."""

import os

import pytest
import torch

import memory_plan as mp
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_param_counts_match_the_model_and_public_sizes():
    for cfg in mp.CHECK_CONFIGS:
        assert mp.param_counts(cfg)["total"] == Transformer(cfg).num_params()
    fixture = os.path.join(ROOT, "tests", "fixtures", "hf_llama_tiny")
    assert mp.param_counts(mp.load_config(fixture))["total"] == Transformer.from_pretrained(fixture).num_params()
    public = {"llama-3.2-1b": 1_235_814_400, "tinyllama-1.1b": 1_100_048_384, "llama-2-7b": 6_738_415_616}
    for name, n in public.items():
        assert mp.param_counts(mp.load_config(os.path.join(ROOT, "configs", name + ".json")))["total"] == n


@pytest.mark.parametrize("cfg", mp.CHECK_CONFIGS)
def test_parameter_gradient_optimizer_and_mask_bytes_are_exact(cfg):
    for ratio, dtype in ((0.1, torch.float32), (1.0, torch.float32), (0.1, torch.bfloat16), (1.0, torch.bfloat16)):
        for name, predicted, measured in mp.check_exact(cfg, ratio, dtype):
            assert predicted == measured, (name, ratio, dtype)


@pytest.mark.parametrize("cfg", mp.CHECK_CONFIGS)
def test_saved_activations_match_within_one_percent(cfg):
    for autocast, wbytes, attn in mp.MODES:
        for ckpt in (False, True):
            for loss in ("sft", "dpo", "npo"):
                predicted, measured = mp.check_activations(cfg, 4, 24, autocast, wbytes, attn, ckpt, loss)
                assert abs(predicted - measured) <= 0.01 * measured, (autocast, wbytes, attn, ckpt, loss)


def test_efficient_kernel_pads_logsumexp_and_mask():
    cfg = mp.CHECK_CONFIGS[1]
    kw = dict(autocast=True, loss="dpo")
    assert mp.activation_bytes(cfg, 2, 64, attn="efficient", **kw) == mp.activation_bytes(cfg, 2, 64, **kw)
    layer = {attn: mp.activation_bytes(cfg, 2, 40, attn=attn, **kw)["layer"] for attn in ("efficient", "flash-cpu")}
    pad = layer["efficient"] - layer["flash-cpu"]
    assert pad == 2 * cfg.n_heads * (64 - 40) * 4 + 2 * 40 * (48 - 40) * 2  # lse to 32s, mask to 16s


@pytest.mark.skipif(mp.malloc_in_use() is None, reason="needs glibc's mallinfo2")
def test_logit_gradient_reference_pass_and_step_peaks():
    cfg, rows, T = mp.CHECK_CONFIGS[2], 4, 32
    model = Transformer(cfg)
    for autocast in (False, True):
        predicted = mp.logit_grad_bytes(cfg.vocab_size, rows * T, chunked=autocast)
        measured = mp.measure_logit_grads(model, mp.tiny_batch(cfg, rows, T), "dpo", autocast)
        assert abs(predicted - measured) <= 0.05 * measured
        # two batches' logits (the previous one held in `_`) and the float32 chunk copy
        predicted = mp.no_grad_pass_bytes(cfg.vocab_size, rows * T, autocast, held=2) - 4 * cfg.vocab_size * rows * T
        measured = mp.measure_reference_pass(model, rows, T, autocast)
        assert abs(predicted - measured) <= 0.1 * measured
    for ratio in (1.0, 0.5):  # dense denom temporaries; gathered entries of a partial mask
        predicted = mp.step_bytes(mp.param_counts(cfg)["largest"], mp.param_counts(cfg)["total"], ratio, 4)
        assert abs(predicted - mp.measure_step(cfg, ratio)) <= 0.1 * predicted


def test_plan_table_for_a_1b_config(capsys):
    assert mp.main([os.path.join(ROOT, "configs", "llama-3.2-1b.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("| learn | 8 x 512 | 4.60 | 4.60 | 1.38 | 1.15 |") == 2  # without and with checkpointing
    assert "attention kernel: math" in out and "### with gradient checkpointing" in out
