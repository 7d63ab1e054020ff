"""--cpu-bf16: bf16 autocast on a CPU with bf16 products (AMX, AVX512-BF16), refused elsewhere.

Where this machine lacks them the tests stand the probe in (model.cpu_multiplies_bf16): the
autocast then runs on emulated bf16, slow but the same numbers, on models small enough for that."""

import json

import pytest
import torch
import torch.nn.functional as F

import model
import train
import trainer
from model import ModelConfig, Transformer
from trainer import Norms

CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that multiplies bf16 (stood in), with the autocast switched off again afterwards."""
    monkeypatch.setattr(model, "cpu_multiplies_bf16", lambda: True)
    yield
    model.use_cpu_bf16(False)


def test_refused_on_a_cpu_without_bf16_products(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(model, "cpu_multiplies_bf16", lambda: False)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--cpu-bf16", "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "error: --cpu-bf16: this CPU has neither AMX nor AVX512-BF16: its bf16 matrix products are emulated, "
        "about 100x slower than float32's"]
    assert not (tmp_path / "run").exists() and not model.CPU_BF16


def test_a_step_under_cpu_bf16_multiplies_in_bf16_and_keeps_float32_state(bf16_cpu):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, :4] = labels[:, -1] = -100
    b = {"input_ids": ids, "labels": labels}
    norms = Norms(scored_tokens=int((labels != -100).sum()))
    exact = trainer.sft_batch_loss(m, b, norms, CPU)
    model.use_cpu_bf16(True)
    products = []
    m.layers[0].mlp.up_proj.register_forward_hook(lambda mod, i, out: products.append(out.dtype))
    loss = trainer.sft_batch_loss(m, b, norms, CPU)
    loss.backward()
    assert products == [torch.bfloat16] and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in m.parameters())
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per product): the loss within 1%
    assert abs(loss.item() - exact.item()) < 0.01 * exact.item() and loss.item() != exact.item()


def test_a_stage_under_cpu_bf16_records_its_precision(bf16_cpu, smoke_run, tmp_path):
    out = tmp_path / "sft"
    train.main(["--preset", "smoke", "--cpu-bf16", "--run", smoke_run, "--stage", "sft", "--out", str(out)])
    assert json.load(open(out / "stage.json"))["precision"] == "bf16 autocast"
    model.use_cpu_bf16(False)
    plain = tmp_path / "plain"
    train.main(["--preset", "smoke", "--run", smoke_run, "--stage", "sft", "--out", str(plain)])
    assert json.load(open(plain / "stage.json"))["precision"] == "float32"


def test_the_study_applies_the_machine_flags_as_train_py_does(monkeypatch, capsys, tmp_path):
    """python -m study --cpu-bf16 on a CPU without bf16 products: the same one line, before any arm."""
    from study import study
    monkeypatch.setattr(model, "cpu_multiplies_bf16", lambda: False)
    with pytest.raises(SystemExit) as e:
        study.main(["--run", str(tmp_path / "run"), "--preset", "smoke", "--cpu-bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --cpu-bf16: this CPU has neither AMX nor")
    assert not (tmp_path / "run").exists() and not model.CPU_BF16


def test_the_slots_loop_decodes_under_cpu_bf16(bf16_cpu):
    """SlotCache.update writes a bf16 product's keys into the float32 cache: CPU autocast, unlike
    CUDA's, does not promote index_put, so the cast is explicit (the loop once stopped there)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))
    prompts = [[1, 5, 9], [1, 7], [1, 5, 9, 11]]
    model.use_cpu_bf16(True)
    out = m.generate_refill(prompts, 6, eos_id=2, slots=2)
    assert len(out) == 3 and max(len(r) for r in out) > 1 and all(len(r) <= 6 for r in out)


def test_attention_runs_in_float32_on_a_cpu_under_cpu_bf16(bf16_cpu):
    """model.attend under --cpu-bf16: the float32 kernel on float32 copies of q, k, v, bit for bit
    (torch's CPU kernel is no faster in bf16, and 5x slower for one query); a plain CPU autocast (the
    memory plan's stand-in for CUDA's) keeps CUDA's bf16 attention."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g).bfloat16()  # as a bf16 product leaves it
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)  # a float32 cache
    mask = torch.rand(2, 1, 5, 7, generator=g) < 0.7
    mask[..., 0] = True
    for m, kk, vv in ((mask, k, v), (None, k[:, :, :5], v[:, :, :5])):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.attend(q, kk, vv, m).dtype == torch.bfloat16  # the stand-in: as on CUDA
            model.use_cpu_bf16(True)
            y = model.attend(q, kk, vv, m)
            model.use_cpu_bf16(False)
        exact = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=m, is_causal=m is None, enable_gqa=True)
        assert y.dtype == torch.float32 and torch.equal(y, exact)


@pytest.mark.parametrize("loop", ["batches", "slots"])
def test_generation_under_cpu_bf16_casts_each_weight_once_a_call(bf16_cpu, loop):
    """Both decode loops run in one autocast context, whose cache casts each weight to bf16 once for
    the call, not once per new token (on SmolLM2 the casts took a quarter of a bf16 decode step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))
    weights = {p.data_ptr(): name for name, p in m.named_parameters()}
    casts = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                casts[weights[args[0].data_ptr()]] = casts.get(weights[args[0].data_ptr()], 0) + 1
            return func(*args, **(kwargs or {}))

    model.use_cpu_bf16(True)
    prompts = [[1, 5, 9], [1, 7], [1, 5, 9, 11]]
    with Count():
        if loop == "batches":
            out = m.generate(prompts, 6, eos_id=2, pad_id=0)
        else:
            out = m.generate_refill(prompts, 6, eos_id=2, slots=2)
    assert len(out) == 3 and max(len(r) for r in out) > 1  # several decode steps
    assert "layers.0.mlp.up_proj.weight" in casts and set(casts.values()) == {1}
