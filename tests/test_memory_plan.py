"""memory_plan.py's formulas against measurements on tiny models (CPU, one thread), through
train.py's own loss functions and passes and model.generate, with torch.autocast("cpu", bfloat16)
standing in for their CUDA autocast (memory_plan's StandIn and StandInTransformer: nothing patched).

Exact: parameters, gradients, MaskedAdamW state at a real global mask, masks, generate's KV
cache. Within 0.1%: the activations autograd saves (measured with saved_tensors_hooks; the
formulas are exact up to a few bytes of scalar loss tensors, 0.07% at most here). Within 5-10%:
allocator peaks of the transients, generation's included (glibc only; measured within 5%;
generation with bf16 weights within 5.2% after other tests ran, the smallest reference pass within
5.3%, the chunked head's within 7%). The attention kernel: what torch
picks here."""

import os

import pytest
import torch
from torch.nn.attention import SDPBackend

from tools import memory_plan as mp
from model import ModelConfig, Transformer

pytestmark = pytest.mark.native_kernels  # see tests/conftest.py

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
def test_generate_kv_cache_bytes_are_exact(cfg):
    for autocast, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.bfloat16)):
        name, predicted, measured = mp.check_kv_cache(cfg, dtype, autocast)
        assert predicted == measured, (name, autocast, dtype)


def test_stand_ins_run_the_model_under_the_cpu_autocast():
    """The seams: trainer.py's functions get StandIn(model); model.generate runs on a
    StandInTransformer, whose forward (the call inside generate's own autocast region) casts."""
    cfg = mp.CHECK_CONFIGS[0]
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    torch.manual_seed(0)
    model = mp.StandInTransformer(cfg, autocast=True)
    assert model(ids).dtype == torch.bfloat16
    assert mp.StandIn(Transformer(cfg), autocast=True)(ids).dtype == torch.bfloat16
    assert mp.StandIn(Transformer(cfg), autocast=False)(ids).dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # each region ends with the call
    assert mp.run_generate(model, 3, 5, 2) == mp.generation_bytes(cfg, 3, 5, 2, autocast=True,
                                                                   wbytes=4)["kv cache"]


@pytest.mark.parametrize("cfg", mp.CHECK_CONFIGS)
def test_saved_activations_match_within_a_tenth_of_a_percent(cfg):
    for autocast, wbytes in mp.MODES:
        for ckpt in (False, True):
            for loss in ("sft", "dpo", "npo"):
                predicted, measured = mp.check_activations(cfg, 4, 24, autocast, wbytes, ckpt, loss)
                assert abs(predicted - measured) <= 0.001 * measured, (autocast, wbytes, ckpt, loss)
                # the chunked head (model.HeadLogps, every batch past a head chunk of 1 entry): the
                # same formulas but for the head; the loss's scalars (up to 112 B, also left by the
                # whole-logits path) are a larger share of these smaller totals
                predicted, measured = mp.check_activations(cfg, 4, 24, autocast, wbytes, ckpt, loss,
                                                           head_chunk=1)
                assert abs(predicted - measured) <= max(0.001 * measured, 128), (autocast, wbytes, ckpt, loss)


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
    """Logit gradients (of the scored positions), train.reference_logps (one batch of logits, the
    bf16 weight copies freed before token_logps; a batch where the forward's own peak is larger),
    the rewriter's scoring (token_logps inside autocast, with the cached bf16 weight copies),
    model.generate (KV cache and the prefill; float32, under autocast, bf16 weights),
    MaskedAdamW.step, importance_from_delta's scores (no autograd graph kept)."""
    for name, predicted, measured, tolerance in mp.check_peaks():
        assert abs(predicted - measured) <= tolerance * measured, (name, predicted, measured)


def test_plan_table_for_a_1b_config(capsys):
    assert mp.main([os.path.join(ROOT, "configs", "llama-3.2-1b.json")]) == 0
    out = capsys.readouterr().out
    assert "attention kernel: flash (no training or scoring pass has a mask; generation's has)" in out
    learn = "| learn | 8 x 512 | 4.60 | 4.60 | 1.38 | 1.15 | - |"
    # 8 x 256 scored positions x 128,256 entries: the head runs chunk by chunk (model.HeadLogps), so
    # no logits are saved (7.93), and its backward (2.08) holds a chunk of 130 rows' logit gradient
    # and the head's [V, D] weight gradient with one product's and the weight's bf16 copies
    assert f"{learn} 7.93 | 2.30 | 2.08 | 4.08 | - | **18.96** | logit grads | yes |" in out
    assert "### with gradient checkpointing" in out
    assert f"{learn} 1.04 | 2.30 | 2.08 | 4.08 | - | **14.04** | optimizer step | yes |" in out
    # the reference pass's 4.08: the forward's own peak with the blocks' bf16 weight copies; its head
    # chunk by chunk too. The rewriter's scoring keeps its whole logits (3.52, with the copies)
    assert "| rewriter | 4 x 1536 |" in out and "| 2.08 | 3.52 | - |" in out


def test_plan_generation_row(capsys):
    """The sample / eval row: the KV cache of 256 prompts x (256 + 64) positions, 16 layers, 8 KV
    heads of 64, float32 (the embedding's dtype), 5.00 GiB; and the flags that size it."""
    path = os.path.join(ROOT, "configs", "llama-3.2-1b.json")
    assert 2 * 16 * 256 * 8 * (256 + 64) * 64 * 4 / 2**30 == 5.0
    assert mp.main([path, "--checkpointing", "off"]) == 0
    row = "| sample / eval (generate) | 256 x 256+64 | 4.60 | - | - | - | - | - | 2.30 | - |"
    assert f"{row} 6.36 | 5.00 | **15.96** | generate | yes |" in capsys.readouterr().out
    assert mp.main([path, "--checkpointing", "off", "--gen-batch-size", "64", "--prompt-len", "128",
                    "--new-tokens", "128", "--ref-batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "| sample / eval (generate) | 64 x 128+128 | 4.60 |" in out  # a fifth of the positions
    assert "| 2.38 | 1.00 | **7.98** | generate | yes |" in out
    assert "reference batch 16 rows" in out and "| 2.08 | 2.54 | - | **18.96** |" in out  # 16 x 512 tokens


QWEN_CONFIGS = [  # #30: Qwen2's q/k/v biases; Qwen3's q/k norms and a head size of its own, tied and untied
    ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, arch="qwen2",
                qkv_bias=True),
    ModelConfig(vocab_size=300, dim=48, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=96, arch="qwen3",
                qk_norm=True, head_size=16, tie_embeddings=False),
]


@pytest.mark.parametrize("cfg", QWEN_CONFIGS)
def test_qwen_parameters_and_saved_activations(cfg):
    assert mp.param_counts(cfg)["total"] == Transformer(cfg).num_params()
    for autocast, wbytes in mp.MODES:
        for ckpt in (False, True):
            for loss in ("sft", "dpo"):
                predicted, measured = mp.check_activations(cfg, 4, 24, autocast, wbytes, ckpt, loss)
                assert abs(predicted - measured) <= 0.001 * measured, (autocast, wbytes, ckpt, loss)
