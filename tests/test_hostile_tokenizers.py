"""Hostile tokenizers (#32): a user's tokenizer.json, its tokenizer_config.json and a folder with two
tokenizers. Each case, through train.py as a user meets it (`--tokenizer DIR` on a finished smoke
run), is one line on stderr naming the file, exit status 2, and nothing written; or, where the
tokenizer is usable, it is used and says so."""

import json
import os

import pytest
from test_failsafe import dpo_stage

tokenizers = pytest.importorskip("tokenizers")


def bpe(folder, config=None, post=True, added=(), vocab_extra=None):
    """A small byte-level BPE tokenizer.json (EOS </s>) with its tokenizer_config.json."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["Question: what is 3 + 4?\nAnswer: 3 + 4 = 7\n#### 7"] * 20, trainer)
    if post:
        tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A",
                                                                     special_tokens=[("<s>", 1)])
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] += list(added)
    if vocab_extra:
        spec["model"]["vocab"].update(vocab_extra)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = config or {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def run_dpo(run, tmp_path, tokenizer, capsys):
    """The dpo stage with this tokenizer (these tokenizers' rows run long: --max-len 1024)."""
    return dpo_stage(run, tmp_path, capsys, "--tokenizer", tokenizer, "--max-len", "1024")


def test_a_tokenizer_json_that_is_not_json(run, tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    code, err, _ = run_dpo(run, tmp_path, str(folder), capsys)
    assert code == 2 and len(err) == 1 and f"{folder}/tokenizer.json: not a tokenizer.json (" in err[0]


def test_a_tokenizer_json_without_a_model(run, tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": []}))
    code, err, _ = run_dpo(run, tmp_path, str(folder), capsys)
    assert code == 2 and len(err) == 1 and f"{folder}/tokenizer.json: not a tokenizer.json (" in err[0]


def test_a_tokenizer_json_without_a_post_processor_adds_no_bos(tmp_path):
    """Usable: without a post-processor its own encoding adds no BOS, so no prompt gets one."""
    from data import load_tokenizer
    folder = bpe(tmp_path / "tok", post=False)
    assert load_tokenizer(folder).prefix == []
    assert load_tokenizer(bpe(tmp_path / "with", post=True)).prefix == [1]


def test_special_tokens_the_vocabulary_lacks(run, tmp_path, capsys):
    folder = bpe(tmp_path / "tok", config={"eos_token": "<|end_of_everything|>"})
    code, err, _ = run_dpo(run, tmp_path, folder, capsys)
    assert code == 2 and err == [f"error: {folder}/tokenizer.json: no EOS token ('<|end_of_everything|>' is "
                                 "not one of its tokens); name one with --eos-token"]


def test_added_tokens_that_overlap(run, tmp_path, capsys):
    """Two added tokens on one id: the Rust library would silently give the second another id (here
    259, beyond what the file says); refused, naming it."""
    clash = {"id": 2, "content": "<also-eos>", "special": True, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False}
    folder = bpe(tmp_path / "tok", added=[clash])
    code, err, _ = run_dpo(run, tmp_path, folder, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {folder}/tokenizer.json: added token {{'id': 2, 'content': ")
    assert err[0].endswith("is declared with id 2 but gets 259: two added tokens share an id or a text")


def test_ids_beyond_the_models_embedding(run, tmp_path, capsys):
    folder = bpe(tmp_path / "tok", vocab_extra={"far-away": 100000})
    code, err, _ = run_dpo(run, tmp_path, folder, capsys)
    assert code == 2 and len(err) == 1 and "is smaller than the tokenizer's 100001" in err[0]


def test_a_tokenizer_model_and_json_that_disagree_use_the_model_and_say_so(run, tmp_path, capsys):
    """The smoke run's own tokenizer.model beside a tokenizer.json that is another tokenizer: the
    .model is used (the stage runs), with one warning naming both."""
    import shutil
    folder = bpe(tmp_path / "tok")
    shutil.copy(os.path.join(run, "sft", "tokenizer.model"), folder)  # both name <s>, </s>, <pad>
    code, err, out = run_dpo(run, tmp_path, folder, capsys)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1
    assert "tokenizer.model and tokenizer.json encode 'Question: Tom has 1'... into other ids" in warnings[0]
