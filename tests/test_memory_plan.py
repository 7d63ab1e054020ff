"""memory_plan.py's formulas against measurements on tiny models (CPU, one thread), through
train.py's own loss functions and passes.

Exact: parameters, gradients, MaskedAdamW state at a real global mask, masks. Within 0.1%: the
activations autograd saves (measured with saved_tensors_hooks; the formulas are exact up to a
few bytes of [B]-sized loss tensors, 0.005% at most here). Within 5-10%: allocator peaks of the
transients (glibc only; measured within 7.1%). The attention kernel: what torch picks here."""

import os

import pytest
import torch
from torch.nn.attention import SDPBackend

from tools import memory_plan as mp
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_param_counts_match_the_model_and_public_sizes():
    for cfg in mp.CHECK_CONFIGS:
        assert mp.param_counts(cfg)["total"] == Transformer(cfg).num_params()
    fixture = os.path.join(ROOT, "tests", "fixtures", "hf_llama_tiny")
    n = Transformer.from_pretrained(fixture).num_params()
    assert mp.param_counts(mp.load_config(fixture))["total"] == n
    public = {"llama-3.2-1b": 1_235_814_400, "tinyllama-1.1b": 1_100_048_384, "llama-2-7b": 6_738_415_616}
    for name, n in public.items():
        assert mp.param_counts(mp.load_config(os.path.join(ROOT, "configs", name + ".json")))["total"] == n


@pytest.mark.parametrize("cfg", mp.CHECK_CONFIGS)
def test_parameter_gradient_optimizer_and_mask_bytes_are_exact(cfg):
    for ratio, dtype in [(r, d) for d in (torch.float32, torch.bfloat16) for r in (0.1, 1.0)]:
        for name, predicted, measured in mp.check_exact(cfg, ratio, dtype):
            assert predicted == measured, (name, ratio, dtype)


@pytest.mark.parametrize("cfg", mp.CHECK_CONFIGS)
def test_saved_activations_match_within_a_tenth_of_a_percent(cfg):
    for autocast, wbytes in mp.MODES:
        for ckpt in (False, True):
            for loss in ("sft", "dpo", "npo"):
                predicted, measured = mp.check_activations(cfg, 4, 24, autocast, wbytes, ckpt, loss)
                assert abs(predicted - measured) <= 0.001 * measured, (autocast, wbytes, ckpt, loss)


def test_attention_kernel_is_what_torch_picks():
    """The call of every modelled pass (no mask, is_causal, GQA), as model.Attention makes it: on
    CPU always; on CUDA where there is one (cuDNN, where torch tries it first, saves what flash
    saves)."""
    B = SDPBackend
    picks = {"flash-cpu": {B.FLASH_ATTENTION}, "flash": {B.FLASH_ATTENTION, B.CUDNN_ATTENTION}}
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CUDA: under autocast
        for cfg in mp.CHECK_CONFIGS[:2]:  # GQA, MHA
            q = torch.randn(2, cfg.n_heads, 64, cfg.head_dim, device=device, dtype=dtype)
            kv = torch.randn(2, cfg.n_kv_heads, 64, cfg.head_dim, device=device, dtype=dtype)
            picked = torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=True)
            assert B(picked) in picks[mp.attention_kernel(device)], (device, cfg)


@pytest.mark.skipif(mp.malloc_in_use() is None, reason="needs glibc's mallinfo2")
def test_allocator_peaks():
    """Logit gradients, train.reference_logps (one batch of logits), the rewriter's scoring (its
    logits inside autocast, with the cached bf16 weight copies), MaskedAdamW.step,
    importance_from_delta's scores (no autograd graph kept)."""
    for name, predicted, measured, tolerance in mp.check_peaks():
        assert abs(predicted - measured) <= tolerance * measured, (name, predicted, measured)


def test_plan_table_for_a_1b_config(capsys):
    assert mp.main([os.path.join(ROOT, "configs", "llama-3.2-1b.json")]) == 0
    out = capsys.readouterr().out
    assert "attention kernel: flash (no pass has a mask)" in out
    learn = "| learn | 8 x 512 | 4.60 | 4.60 | 1.38 | 1.15 | - |"
    assert f"{learn} 10.90 | 2.30 | 5.87 | 11.74 | **26.21** | logit grads | no |" in out
    assert "### with gradient checkpointing" in out
    assert f"{learn} 4.01 | 2.30 | 5.87 | 11.74 | **17.50** | no-grad pass | yes |" in out
