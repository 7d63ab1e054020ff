"""Hugging Face Llama interop without transformers: tests/fixtures/hf_llama_tiny is a sharded,
untied, grouped-query checkpoint written by transformers' LlamaForCausalLM.save_pretrained,
with the logits transformers computed for it, and tests/fixtures/hf_llama3_rope_tiny a tied
grouped-query one with Llama 3 RoPE scaling (rope_type "llama3"), likewise (see their README.md;
regenerate with `python -m tools.check_hf_interop --write-fixture`, in a venv that has transformers)."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import LLAMA3_ROPE_KEYS, ModelConfig, Transformer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hf_llama_tiny"
FIXTURE3 = Path(__file__).resolve().parent / "fixtures" / "hf_llama3_rope_tiny"
TOL = 1e-4


def expected(fixture=FIXTURE):
    e = load_file(str(fixture / "expected.safetensors"))
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


def copy_fixture(tmp_path, fixture=FIXTURE, drop=(), **changes):
    d = tmp_path / "ckpt"
    shutil.copytree(fixture, d)
    cfg = read_json(d / "config.json")
    for key in drop:
        del cfg[key]
    cfg.update(changes)
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    return d


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),  # transformers < 5 layout
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),  # its older key name
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}),  # transformers >= 5
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 2.0}),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 500000.0, "short_factor": [1.0] * 4,
                         "long_factor": [2.0] * 4, "original_max_position_embeddings": 32}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0, "factor": 2.0}),  # a key ignored
    # llama3 that this model would get wrong: rotary on part of head_dim, a missing key, an empty middle band
    ("rope_parameters", {**LLAMA3, "partial_rotary_factor": 0.5}),
    ("rope_parameters", {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}),
    ("rope_scaling", {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
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


# ------------------------------------------------------------------ Llama 3 RoPE scaling

def to_transformers4_layout(d, key="rope_type"):
    """Rewrite d/config.json as transformers < 5 and Meta's Llama 3.x checkpoints lay it out: rope_theta
    at the top level and the scaling under rope_scaling (key "type": the name before "rope_type")."""
    cfg = read_json(d / "config.json")
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {key: rope.pop("rope_type"), **rope}
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="module")
def loaded3():
    return Transformer.from_pretrained(str(FIXTURE3)).eval()


def test_llama3_fixture_is_what_it_claims():
    """llama3 rope_parameters whose rotary frequencies fall in all three bands (kept, interpolated,
    divided by factor), GQA, and sequences longer than original_max_position_embeddings."""
    cfg = read_json(FIXTURE3 / "config.json")
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "llama3" and "rope_scaling" not in cfg  # the transformers 5 layout
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["tie_word_embeddings"] is True
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    wavelen = [2 * math.pi * rope["rope_theta"] ** (i / hd) for i in range(0, hd, 2)]
    L = rope["original_max_position_embeddings"]
    kept = [w for w in wavelen if w < L / rope["high_freq_factor"]]
    divided = [w for w in wavelen if w > L / rope["low_freq_factor"]]
    assert kept and divided and len(kept) + len(divided) < len(wavelen), wavelen
    ids, mask, logits = expected(FIXTURE3)
    assert ids.shape[1] > L and mask[0].all() and not mask[1].all()
    assert logits.shape == (*ids.shape, cfg["vocab_size"])


def test_llama3_config_mapping(loaded3):
    rope = read_json(FIXTURE3 / "config.json")["rope_parameters"]
    assert loaded3.cfg.rope_theta == rope["rope_theta"]
    assert loaded3.cfg.rope_scaling == {k: rope[k] for k in LLAMA3_ROPE_KEYS}


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformers5", "transformers4", "transformers4-type"])
def test_llama3_logits_match_transformers(tmp_path, layout):
    """Both config.json layouts load the scaling; logits match transformers', padded and not."""
    d = FIXTURE3
    if layout != "transformers5":
        key = "type" if layout.endswith("-type") else "rope_type"
        d = to_transformers4_layout(copy_fixture(tmp_path, FIXTURE3), key)
    m = Transformer.from_pretrained(str(d)).eval()
    ids, mask, want = expected(FIXTURE3)
    real = mask.bool()
    diff = (m(ids, attention_mask=mask)[real] - want[real]).abs().max().item()
    assert diff < TOL, f"max abs logits difference vs transformers {diff:.3e}"
    diff0 = (m(ids[:1]) - want[:1]).abs().max().item()
    assert diff0 < TOL, f"unpadded row, no mask: max abs difference {diff0:.3e}"
    m.cfg.rope_scaling = None  # the fixture tells scaled from plain RoPE
    assert (m(ids[:1]) - want[:1]).abs().max().item() > 100 * TOL


@torch.no_grad()
def test_llama3_save_then_load_keeps_the_scaling(loaded3, tmp_path):
    """save_pretrained writes the transformers 4 layout (rope_theta + rope_scaling llama3), which
    Meta's Llama 3.x checkpoints use and transformers 5 reads too; reloading changes nothing."""
    loaded3.save_pretrained(str(tmp_path))
    out = read_json(tmp_path / "config.json")
    rope = read_json(FIXTURE3 / "config.json")["rope_parameters"]
    assert out["rope_theta"] == rope["rope_theta"] and "rope_parameters" not in out
    assert out["rope_scaling"] == {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}
    again = Transformer.from_pretrained(str(tmp_path)).eval()
    assert again.cfg == loaded3.cfg
    ids, mask, want = expected(FIXTURE3)
    assert torch.equal(again(ids, attention_mask=mask), loaded3(ids, attention_mask=mask))
    real = mask.bool()
    assert (again(ids, attention_mask=mask)[real] - want[real]).abs().max().item() < TOL


def test_plain_rope_saves_no_scaling(loaded, tmp_path):
    loaded.save_pretrained(str(tmp_path))
    assert read_json(tmp_path / "config.json")["rope_scaling"] is None


@pytest.mark.parametrize("index", [{"weight_map": ["model-00001-of-00002.safetensors"]}, {"metadata": {}},
                                   ["weight_map"], {"weight_map": {"model.norm.weight": 3}},
                                   {"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}])
def test_a_malformed_shard_index_is_one_clear_error(tmp_path, index):
    """An index whose weight_map is not {tensor name: shard file beside it}: a ValueError naming the
    index (load_model turns it into one line and exit status 2), never a traceback."""
    d = copy_fixture(tmp_path)
    with open(d / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: .*shard"):
        Transformer.from_pretrained(str(d))


def test_an_absurd_layer_count_is_refused_before_anything_of_its_size(tmp_path):
    """num_hidden_layers 10**9 against a 2-layer checkpoint: one error at once (the count is compared
    before the layer names are enumerated, which would exhaust memory)."""
    d = copy_fixture(tmp_path, num_hidden_layers=10**9)
    with pytest.raises(ValueError, match=r"the checkpoint holds 2 layers, config\.json's num_hidden_layers"):
        Transformer.from_pretrained(str(d))


# ----------------------------------------------------------------------------- Qwen2 and Qwen3 (#30)

QWEN = {arch: Path(__file__).resolve().parent / "fixtures" / f"hf_{arch}_tiny" for arch in ("qwen2", "qwen3")}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_logits_match_transformers(arch):
    """Random Qwen2 (biases on q, k, v) and Qwen3 (q/k RMSNorm per head, head_dim 16 where
    hidden / heads is 8) checkpoints made by transformers: the same logits, padded or not."""
    model = Transformer.from_pretrained(str(QWEN[arch])).eval()
    assert (model.cfg.arch, model.cfg.qkv_bias, model.cfg.qk_norm) == (arch, arch == "qwen2", arch == "qwen3")
    hf = read_json(QWEN[arch] / "config.json")
    assert model.cfg.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    ids, mask, want = expected(QWEN[arch])
    real = mask.bool()
    with torch.no_grad():
        assert (model(ids, attention_mask=mask)[real] - want[real]).abs().max() < TOL
        assert (model(ids[:1]) - want[:1]).abs().max() < TOL
        for layer in model.layers:  # what each option does: without it the logits are others
            attn = layer.self_attn
            if arch == "qwen2":
                attn.q_proj.bias.zero_()
            else:
                attn.q_norm.weight.fill_(1.0)
        assert (model(ids[:1]) - want[:1]).abs().max() > 100 * TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_save_then_load_writes_its_own_model_type(arch, tmp_path):
    model = Transformer.from_pretrained(str(QWEN[arch])).eval()
    model.save_pretrained(str(tmp_path))
    src, out = read_json(QWEN[arch] / "config.json"), read_json(tmp_path / "config.json")
    for key in ("model_type", "architectures", "num_key_value_heads", "tie_word_embeddings",
                "use_sliding_window"):
        assert out[key] == src[key], key
    assert out["head_dim"] == src.get("head_dim", src["hidden_size"] // src["num_attention_heads"])
    assert rope_theta(out) == rope_theta(src)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        with safe_open(str(QWEN[arch] / "model.safetensors"), framework="pt") as g:
            assert set(f.keys()) == set(g.keys()) - {"lm_head.weight"}  # tied: the head is the embedding
    again = Transformer.from_pretrained(str(tmp_path)).eval()
    assert again.cfg == model.cfg
    ids, mask, _ = expected(QWEN[arch])
    assert torch.equal(again(ids, attention_mask=mask), model(ids, attention_mask=mask))


@pytest.mark.parametrize("arch, field, value", [
    ("qwen2", "use_sliding_window", True),
    ("qwen3", "layer_types", ["full_attention", "sliding_attention"]),
    ("qwen3", "attention_bias", True),  # Qwen3's bias covers o_proj too
    ("qwen2", "model_type", "qwen2_moe"),
    ("qwen3", "model_type", "qwen3_moe"),
    ("qwen2", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32}),
])
def test_what_qwen_has_and_this_model_lacks_is_refused(tmp_path, arch, field, value):
    d = copy_fixture(tmp_path, QWEN[arch], **{field: value})
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(str(d))
    msg = str(err.value)
    assert "config.json: unsupported config" in msg and (field in msg or "sliding" in msg), msg
