"""--compile: a torch.compile'd model gives the losses and gradients of the eager one (CPU,
inductor), and a training stage runs with it."""

import pytest
import torch

import train
from model import ModelConfig, Transformer
from trainer import Norms, dpo_batch_loss, npo_batch_loss

pytestmark = pytest.mark.native_kernels  # see tests/conftest.py


def test_compiled_and_eager_losses_and_gradients_agree(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = Transformer(cfg)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (4, 12), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    labels[:, -1] = -100
    b = {"input_ids": ids, "labels": labels, "ref": torch.randn(4, 12, generator=g) * (labels != -100),
         "weights": (torch.rand(4, 12, generator=g) < 0.5).float() * (labels != -100)}
    cpu = torch.device("cpu")
    losses = [lambda m: dpo_batch_loss(m, b, Norms(pairs=2, chosen_tokens=10), cpu, 0.1, 0.5, nll=0.5),
              lambda m: npo_batch_loss(m, b, Norms(weighted_tokens=int((b["weights"] != 0).sum())), cpu, 0.1)]
    for loss_fn in losses:
        results = []
        for net in (model, compiled):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(net)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (eager, eager_grads), (comp, comp_grads) = results
        assert eager != 0 and any(g.abs().sum() > 0 for g in eager_grads.values())
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
        for n in eager_grads:
            torch.testing.assert_close(comp_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_stage_trains_with_compile(smoke_run, tmp_path):
    out = tmp_path / "learn"
    train.main(["--preset", "smoke", "--run", smoke_run, "--stage", "learn", "--compile", "--out", str(out)])
    assert (out / "stage.json").exists()
