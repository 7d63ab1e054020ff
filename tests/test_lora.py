"""#35 item 6: DPO through low-rank adapters (lora.py, --lora-rank, the study's "DPO LoRA" arm): as many
trainable parameters as the learning mask, the adapted model equal to its merged weights."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import allo
import lora
import train
from bookkeeping import trainlog
from model import ModelConfig, Transformer

SMOKE = ["--preset", "smoke"]


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                   max_seq_len=32, **kw))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3])
def test_the_rank_matches_the_masks_trainable_count_within_one_rank_step(ratio):
    model = tiny()
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    target = sum(int(m.sum()) for m in allo.select_masks(scores, ratio).values())
    rank = lora.rank_for(model, target)
    masks = lora.add_adapters(model, rank)
    count = sum(int(m.sum()) for m in masks.values())
    per_rank = 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64))  # 2 layers, [out, in] sums
    assert count == rank * per_rank and abs(count - target) <= per_rank  # within one rank step
    assert abs(count - target) <= per_rank / 2 or rank == 1  # the nearest, unless below one step
    assert set(masks) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B")) for n in masks) and len(masks) == 2 * 7 * 2


def test_adapters_start_as_the_model_and_merge_to_what_the_forward_used():
    model = tiny(qkv_bias=True)
    ids = torch.randint(0, 50, (2, 12))
    before = model(ids)
    lora.add_adapters(model, rank=3, alpha=6)
    assert torch.equal(model(ids), before)  # B = 0: the adapted model is the model
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.endswith((".A", ".B"))}
    layer = model.layers[0].self_attn.q_proj
    W, A, B = (layer.parametrizations.weight.original, layer.parametrizations.weight[0].A,
               layer.parametrizations.weight[0].B)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()  # as if trained
    # the adapted weight is W + (alpha / r) B A (Hu et al., Eq. 3), against float64
    assert torch.allclose(layer.weight.double(), W.double() + 2.0 * B.double() @ A.double(), atol=1e-5)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert all((p.grad is not None) == n.endswith((".A", ".B")) for n, p in model.named_parameters())
    adapted = model(ids).detach()
    lora.merge(model)
    assert torch.equal(model(ids), adapted)  # bit for bit: each weight is the tensor the forward used
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in tiny(qkv_bias=True).named_parameters()}  # a plain model again
    assert all(torch.equal(dict(model.named_parameters())[n], p) for n, p in frozen.items()
               if "parametrizations" not in n)  # embeddings, norms, biases untouched


def test_the_learn_stage_through_adapters(run, monkeypatch):
    args = SMOKE + ["--run", run, "--stage", "learn", "--lora-rank", "2", "--learn-ratio", "1",
                    "--learn-lr", "1e-3", "--learn-steps", "4", "--ckpt-every", "2"]
    train.main(args + ["--force"])
    start = load_file(os.path.join(run, "forget", "model.safetensors"))
    after = load_file(os.path.join(run, "learn", "model.safetensors"))
    assert after.keys() == start.keys()  # a plain Hugging Face folder
    for name, w in after.items():
        moved = not torch.equal(w, start[name])
        assert moved == name.endswith("proj.weight"), name  # only the adapted linear layers move
    model = Transformer.from_pretrained(os.path.join(run, "learn"))
    per_rank = sum(m.in_features + m.out_features for m in lora.adapted_layers(model))
    info = json.load(open(os.path.join(run, "learn", "stage.json")))
    assert info["trained_fraction"] == pytest.approx(2 * per_rank / model.num_params(), abs=1e-12)

    # killed after its step-2 checkpoint, the stage resumes (adapters and their moments) to the same weights
    real_save = trainlog.save_checkpoint

    def save_then_die(ckpt_dir, step, *state):
        real_save(ckpt_dir, step, *state)
        if step == 2:
            raise KeyboardInterrupt

    shutil.rmtree(os.path.join(run, "learn"))
    monkeypatch.setattr(trainlog, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        train.main(args)
    assert os.listdir(os.path.join(run, "learn.tmp", "ckpt")) == ["step-0000002"]
    monkeypatch.setattr(trainlog, "save_checkpoint", real_save)
    train.main(args)
    again = load_file(os.path.join(run, "learn", "model.safetensors"))
    assert all(torch.equal(after[n], again[n]) for n in after)


def test_adapters_and_a_mask_together_are_one_line(run, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(SMOKE + ["--run", run, "--stage", "learn", "--force", "--lora-rank", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: --lora-rank 2: the adapters are what trains; give no --mask "
                                         "(or --learn-ratio 1)\n")
