"""The head's log-probs chunk by chunk (model.HeadLogps; #34 item 5): the log-probs and gradients of
the whole-logits path, without ever holding the batch's [N,V] logits.

Float64 models: "equal" is up to float64 rounding (1e-12; the chunked path sums the same terms in
another order). Under the CPU bf16 autocast, both paths round the head's products to bf16 the same
way, so they agree to float32 rounding of those products (1e-5)."""

import pytest
import torch
import torch.nn.functional as F

import allo
import model
import trainer
from model import HeadLogps, ModelConfig, Transformer
from trainer import Norms

CPU = torch.device("cpu")


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100])
def test_head_logps_equal_the_whole_logits_and_their_gradients(chunk_rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g, dtype=torch.float64)  # the gradient flowing in
    whole = allo.token_logps(F.linear(h, w), targets)
    chunked = HeadLogps.apply(h, w, targets, chunk_rows)
    assert chunked.dtype == torch.float64 and (chunked - whole).abs().max() < 1e-12
    grads = [torch.autograd.grad((out * up).sum(), [h, w]) for out in (whole, chunked)]
    assert max((a - b).abs().max() for a, b in zip(*grads)) < 1e-12


def test_head_logps_under_autocast_round_as_the_whole_logits():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(64, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = allo.token_logps(F.linear(h, w), targets)
        chunked = HeadLogps.apply(h, w, targets, 7)
    assert chunked.dtype == torch.float32 and (chunked - whole).abs().max() < 1e-5
    a, b = torch.autograd.grad(whole.sum(), [h, w]), torch.autograd.grad(chunked.sum(), [h, w])
    assert all((x - y).abs().max() < 1e-2 * x.abs().max() for x, y in zip(a, b))  # bf16 products: 2^-8


V = 200  # the head's logits [N,V] outgrow every tensor of the model's body


def batch(B=6, T=20):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, V, (B, T), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :6] = -100
    labels[:, -1] = -100
    labels[1, 12:] = -100  # rows of different lengths
    weights = torch.rand(B, T, generator=g, dtype=torch.float64).round() * (labels != -100)
    return {"input_ids": ids, "labels": labels, "weights": weights,
            "ref": torch.randn(B, T, generator=g, dtype=torch.float64) * (labels != -100)}


@pytest.mark.parametrize("loss", ["sft", "npo", "dpo"])
def test_a_batch_past_head_chunk_trains_as_the_whole_logits(monkeypatch, loss):
    """Past HEAD_CHUNK logit entries trainer.scored_logps asks the model for chunked log-probs: the
    losses and gradients are the whole-logits path's, and autograd saves no [N,V] tensor."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32))
    m = m.double()
    b = batch()
    n = int((b["labels"] != -100).sum())
    norms = {"sft": Norms(scored_tokens=n), "npo": Norms(weighted_tokens=int((b["weights"] != 0).sum())),
             "dpo": Norms(pairs=3, chosen_tokens=int((b["labels"][:3] != -100).sum()))}[loss]
    fn = {"sft": lambda: trainer.sft_batch_loss(m, b, norms, CPU),
          "npo": lambda: trainer.npo_batch_loss(m, b, norms, CPU, 0.1),
          "dpo": lambda: trainer.dpo_batch_loss(m, b, norms, CPU, 0.1, 0.5, nll=0.2)}[loss]
    results = []
    for head_chunk in (n * V, n * V - 1):  # whole (exactly at the bound), then chunked: 8 rows a chunk
        monkeypatch.setattr(trainer, "HEAD_CHUNK", head_chunk)
        monkeypatch.setattr(model, "HEAD_CHUNK", 8 * V)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            value = fn()
        m.zero_grad()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in m.parameters()], max(saved)))
    (a, ga, big), (c, gc, small) = results
    assert abs(a - c) < 1e-12 and max((x - y).abs().max() for x, y in zip(ga, gc)) < 1e-12
    assert big >= n * V > small  # the whole path saves the [N,V] logits; the chunked path nothing as large
