"""Hostile model folders (#32): a user's config.json and generation_config.json, through train.py as a
user meets them (`--model DIR` for the dpo stage of a finished smoke run). A config that cannot be
this model is one line on stderr naming config.json and the field, exit status 2, nothing written,
checked before a model of that size is built; a file the project does not read does not matter."""

import json
import os
import shutil

import pytest
from test_failsafe import dpo_stage


def edited(run, tmp_path, **changes):
    """A copy of the smoke run's SFT model with config.json fields changed (None: removed)."""
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(run, "sft"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def dpo(run, tmp_path, model, capsys):
    """The dpo stage from this model: (exit status, stderr lines)."""
    return dpo_stage(run, tmp_path, capsys, "--model", model)[:2]


@pytest.mark.parametrize("changes, says", [
    (dict(hidden_size="32"), "hidden_size"),  # a number as a string
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(intermediate_size=None), "intermediate_size"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings 'yes' (not true or false)"),
    (dict(rope_theta=-1.0), "rope_theta -1.0 (not a positive number)"),
    (dict(rms_norm_eps=[1e-5]), "rms_norm_eps [1e-05] (not a positive number)"),
    (dict(num_hidden_layers=10**12), "the checkpoint holds 1 layers, config.json's num_hidden_layers says"),
    (dict(model_type="mamba"), "model_type 'mamba' (only 'llama', 'qwen2', 'qwen3')"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "num_attention_heads 2 does not divide by num_key_value_heads 3"),
])
def test_a_config_this_model_cannot_be_is_one_line(run, tmp_path, capsys, changes, says):
    code, err = dpo(run, tmp_path, edited(run, tmp_path, **changes), capsys)
    assert code == 2 and len(err) == 1 and says in err[0] and "config.json" in err[0], err


def test_a_config_that_is_not_an_object(run, tmp_path, capsys):
    model = edited(run, tmp_path)
    for text, says in (("[1, 2]", "not a JSON object"), ('{"vocab_size": ', "not JSON"), ("", "not JSON")):
        with open(os.path.join(model, "config.json"), "w") as f:
            f.write(text)
        code, err = dpo(run, tmp_path, model, capsys)
        assert code == 2 and len(err) == 1 and f"{model}/config.json: {says}" in err[0], err


def test_a_vocabulary_smaller_than_the_tokenizers(run, tmp_path, capsys):
    code, err = dpo(run, tmp_path, edited(run, tmp_path, vocab_size=100), capsys)  # the tokenizer has 320
    assert code == 2 and len(err) == 1 and "embed_tokens.weight has shape" in err[0], err


def test_a_hostile_generation_config_does_not_matter(run, tmp_path, capsys):
    """generation_config.json is written for transformers' sake and never read here."""
    model = edited(run, tmp_path)
    with open(os.path.join(model, "generation_config.json"), "w") as f:
        f.write('{"eos_token_id": "nonsense", "max_length": -1, ')
    code, err = dpo(run, tmp_path, model, capsys)
    assert code == 0 and err == []
