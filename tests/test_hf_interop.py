"""Hugging Face Llama interop without transformers: tests/fixtures/hf_llama_tiny is a sharded,
untied, grouped-query checkpoint written by transformers' LlamaForCausalLM.save_pretrained,
with the logits transformers computed for it (see its README.md; regenerate with
scripts/check_hf_interop.py --write-fixture, in a venv that has transformers)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hf_llama_tiny"
TOL = 1e-4


def expected():
    e = load_file(str(FIXTURE / "expected.safetensors"))
    return e["input_ids"], e["attention_mask"], e["logits"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rope_theta(hf_cfg):
    """transformers >= 5 writes rope_theta under rope_parameters, older ones at the top level."""
    return (hf_cfg.get("rope_parameters") or {}).get("rope_theta", hf_cfg.get("rope_theta"))


@pytest.fixture(scope="module")
def loaded():
    return Transformer.from_pretrained(str(FIXTURE)).eval()


def test_fixture_is_what_it_claims():
    """Sharded with an index, GQA, untied, a non-default rope_theta: what the other tests rely on."""
    cfg = read_json(FIXTURE / "config.json")
    index = read_json(FIXTURE / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((FIXTURE / s).exists() for s in shards)
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in index["weight_map"]
    assert rope_theta(cfg) not in (None, 10000.0)  # a loader that ignores it must fail below
    ids, mask, logits = expected()
    assert ids.shape == mask.shape == logits.shape[:2] and logits.shape[2] == cfg["vocab_size"]
    assert mask[0].all() and not mask[1].all() and mask[1, -1] == 1  # row 1 left-padded


def test_config_mapping(loaded):
    hf = read_json(FIXTURE / "config.json")
    assert loaded.cfg == ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"],
        hidden_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"], rope_theta=rope_theta(hf),
        max_seq_len=hf["max_position_embeddings"], tie_embeddings=False)


@torch.no_grad()
def test_logits_match_transformers(loaded):
    ids, mask, want = expected()
    real = mask.bool()
    got = loaded(ids, attention_mask=mask)
    assert torch.isfinite(got[real]).all()
    diff = (got[real] - want[real]).abs().max().item()
    assert diff < TOL, f"max abs logits difference vs transformers {diff:.3e}"
    # the unpadded row also matches without any mask (the is_causal fast path)
    diff0 = (loaded(ids[:1]) - want[:1]).abs().max().item()
    assert diff0 < TOL, f"unpadded row, no mask: max abs difference {diff0:.3e}"


@torch.no_grad()
def test_save_then_load_is_bit_identical(loaded, tmp_path):
    ids, mask, _ = expected()
    loaded.save_pretrained(str(tmp_path))
    again = Transformer.from_pretrained(str(tmp_path)).eval()
    assert again.cfg == loaded.cfg
    a, b = loaded.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded(ids, attention_mask=mask), again(ids, attention_mask=mask))
    src, out = read_json(FIXTURE / "config.json"), read_json(tmp_path / "config.json")
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "architectures"):
        assert out[key] == src[key], key
    assert rope_theta(out) == rope_theta(src)
    # stored in HF names ("model." prefix, lm_head at the top), loadable without our code
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(read_json(FIXTURE / "model.safetensors.index.json")["weight_map"])


def copy_fixture(tmp_path, **changes):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    cfg = read_json(d / "config.json")
    cfg.update(changes)
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    return d


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),  # transformers < 5 layout
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),  # transformers >= 5
    ("attention_bias", True),
    ("mlp_bias", True),
    ("model_type", "mistral"),
    ("hidden_act", "gelu"),
])
def test_unsupported_config_is_refused(tmp_path, field, value):
    d = copy_fixture(tmp_path, **{field: value})
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(str(d))
    msg = str(err.value)
    assert "config.json" in msg and field in msg, msg


def test_missing_tensor_is_a_clear_error(tmp_path):
    d = copy_fixture(tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    index = read_json(d / "model.safetensors.index.json")
    shard = d / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with open(d / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.self_attn\.k_proj\.weight"):
        Transformer.from_pretrained(str(d))


def test_missing_shard_file_is_an_error(tmp_path):
    d = copy_fixture(tmp_path)
    shard = sorted(set(read_json(d / "model.safetensors.index.json")["weight_map"].values()))[-1]
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=shard.replace(".", r"\.")):
        Transformer.from_pretrained(str(d))
