"""ALLO on your own model and data: every stage through explicit paths, no run directory.

A tiny Hugging Face Llama (random init, written by save_pretrained), a tokenizer trained here
(SentencePiece, and a tokenizer.json through the `tokenizers` package) and a GSM8K-format file of
36 questions on a task other than the embedded one (multiplication, "#### N" answers).
"""

import io
import json
import os
import random

import pytest
import sentencepiece as spm
import torch

import eval as evaluation
import train
from data import DataError, extract_answer, is_correct, load_tokenizer, read_jsonl
from model import ModelConfig, Transformer

STAGES = ["sft", "warmup", "rewriter", "forget", "learn"]


def questions(seed, n):
    """Multiplication questions in GSM8K's format: the solution ends in '#### <answer>'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append({"question": f"What is {a} times {b}?", "answer": f"{a} * {b} = {a * b}\n#### {a * b}",
                     "id": len(rows)})  # other fields are kept and ignored
    return rows


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def texts():
    return [f"Question: {q['question']}\nAnswer: {q['answer']}" for q in questions(0, 200)]


def sentencepiece_tokenizer(folder):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts()), model_writer=model, vocab_size=64,
                                   model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   add_dummy_prefix=False, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return str(folder / "tokenizer.model")


def hf_tokenizer(folder):
    """A byte-level BPE tokenizer.json with its special tokens named in tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|pad|>", "<|begin|>", "<|end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts(), trainer)
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>", "special": True},
              "pad_token": "<|pad|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder / "tokenizer.json")


def tiny_llama(folder, vocab_size):
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                            max_seq_len=128)).save_pretrained(str(folder))
    return str(folder)


def run_pipeline(tmp_path, tokenizer):
    """sft -> sample -> warmup -> mask -> rewriter -> forget -> learn -> eval, all through flags."""
    tok = load_tokenizer(tokenizer)
    base = tiny_llama(tmp_path / "base", tok.vocab_size + 3)
    train_q = write_rows(tmp_path / "train.jsonl", questions(1, 36))
    test_q = write_rows(tmp_path / "test.jsonl", questions(2, 12))
    o = {s: str(tmp_path / s) for s in STAGES + ["sample", "mask"]}
    common = ["--run", str(tmp_path / "no-run-dir"), "--tokenizer", tokenizer, "--batch-size", "8",
              "--log-every", "20", "--threads", "1"]
    cli = lambda *args: train.main(common + list(args))  # noqa: E731
    cli("--stage", "sft", "--model", base, "--data", train_q, "--eval-questions", test_q, "--sft-steps", "60",
        "--sft-lr", "3e-3", "--out", o["sft"])
    cli("--stage", "sample", "--model", o["sft"], "--questions", train_q, "--eval-questions", test_q,
        "--k", "4", "--max-new-tokens", "12", "--stop", "\n\n", "--gold-chosen", "--out", o["sample"])
    pairs, forget = f"{o['sample']}/pairs.jsonl", f"{o['sample']}/forget.jsonl"
    cli("--stage", "warmup", "--model", o["sft"], "--data", pairs, "--dpo-steps", "3", "--out", o["warmup"])
    cli("--stage", "mask", "--model", o["sft"], "--warmup-model", o["warmup"], "--out", o["mask"])
    cli("--stage", "rewriter", "--model", o["sft"], "--data", forget, "--pairs", pairs,
        "--rewriter-steps", "3", "--out", o["rewriter"])
    cli("--stage", "forget", "--model", o["sft"], "--data", f"{o['rewriter']}/forget_weighted.jsonl",
        "--mask", f"{o['mask']}/forget.safetensors", "--forget-steps", "3", "--out", o["forget"])
    cli("--stage", "learn", "--model", o["forget"], "--data", pairs, "--mask",
        f"{o['mask']}/learn.safetensors", "--learn-steps", "3", "--out", o["learn"])
    assert not os.path.exists(tmp_path / "no-run-dir")
    return tok, o, test_q


def check_pipeline(tmp_path, capsys, tokenizer):
    tok, o, test_q = run_pipeline(tmp_path, tokenizer)
    answer = {q["question"]: extract_answer(q["answer"]) for q in questions(1, 36)}
    question = lambda prompt: prompt[len("Question: "):-len("\nAnswer:")]  # noqa: E731
    pairs = read_jsonl(f"{o['sample']}/pairs.jsonl", "pairs")
    assert pairs and os.path.exists(f"{o['sample']}/test_pairs.jsonl")
    for p in pairs:
        a = answer[question(p["prompt"])]
        assert is_correct(p["chosen"], a) and not is_correct(p["rejected"], a)
    forget = read_jsonl(f"{o['sample']}/forget.jsonl", "forget")
    assert forget and all(r["reference"] == f"{r['question'][8]} * {r['question'][-2]} = {r['answer']}\n#### "
                                                + r["answer"] for r in forget)
    for r in read_jsonl(f"{o['rewriter']}/forget_weighted.jsonl", "forget"):
        assert len(r["weights"]) == len(r["probs"]) == len(tok.encode(r["response"]))
    for s in STAGES:
        Transformer.from_pretrained(o[s])  # every checkpoint loads back
    capsys.readouterr()
    evaluation.main(["--questions", test_q, "--tokenizer", tokenizer, "--pairs",
                     f"{o['sample']}/test_pairs.jsonl", "--ref", o["sft"]] + [o[s] for s in STAGES])
    table = capsys.readouterr().out
    assert all(f"| {o[s]} |" in table for s in STAGES) and "12 held-out questions" in table


def test_every_stage_on_your_own_model_and_gsm8k_file(tmp_path, capsys):
    check_pipeline(tmp_path, capsys, sentencepiece_tokenizer(tmp_path))


def test_every_stage_with_a_tokenizer_json(tmp_path, capsys):
    check_pipeline(tmp_path, capsys, hf_tokenizer(tmp_path))


def test_tokenizer_json_round_trips_and_takes_its_special_tokens(tmp_path):
    path = hf_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))  # a directory: its tokenizer.json
    tk = tok.tk
    named = tuple(tk.token_to_id(t) for t in ("<|begin|>", "<|end|>", "<|pad|>"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == named
    for text in ["Question: What is 7 times 8?\nAnswer:", " 7 * 8 = 56\n#### 56", " ünïcödé 42 "]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.vocab_size == tk.get_vocab_size(with_added_tokens=True)
    from data import TokenizerFile
    other = load_tokenizer(TokenizerFile(path, bos="<|end|>", pad="<|end|>"))
    assert other.bos_id == other.pad_id == tok.eos_id
    os.remove(tmp_path / "tokenizer_config.json")
    with pytest.raises(DataError, match="no EOS token .*--eos-token"):
        load_tokenizer(path)
    bare = load_tokenizer(TokenizerFile(path, eos="<|end|>"))  # no BOS named: none is needed, none added
    assert bare.bos_id is None and bare.prompt_ids("Q") == bare.encode("Q")
    with pytest.raises(DataError, match="--bos always, but the tokenizer has no BOS token"):
        load_tokenizer(TokenizerFile(path, eos="<|end|>", bos_mode="always"))
    with pytest.raises(DataError, match="'<x>' is not one of its tokens"):
        load_tokenizer(TokenizerFile(path, bos="<|begin|>", eos="<x>"))


def test_tokenizer_json_without_the_package_is_one_line(tmp_path, monkeypatch):
    path = hf_tokenizer(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # import tokenizers now fails
    with pytest.raises(DataError, match=r"needs the `tokenizers` package: pip install tokenizers"):
        load_tokenizer(path)


def test_sft_data_may_be_questions_or_input_output_rows(tmp_path):
    mixed = write_rows(tmp_path / "a.jsonl", [{"input": "x", "output": " y"}] + questions(0, 2))
    rows = read_jsonl(mixed, "sft")
    assert [sorted(r)[:2] for r in rows] == [["input", "output"], ["answer", "id"], ["answer", "id"]]
    with pytest.raises(DataError, match="a.jsonl:1: missing field 'answer'"):
        read_jsonl(write_rows(tmp_path / "a.jsonl", [{"question": "q"}]), "sft")
    with pytest.raises(DataError, match=r"b.jsonl:2: field 'answer' states no final answer"):
        evaluation.reference_answers(read_jsonl(write_rows(tmp_path / "b.jsonl", questions(0, 1) + [
            {"question": "q", "answer": "none"}]), "questions"))
