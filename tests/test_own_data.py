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
from safetensors import safe_open

import data
import eval as evaluation
import train
from bookkeeping import runs
from data import DataError, extract_answer, is_correct, load_tokenizer, read_jsonl
from model import ModelConfig, Transformer
from study import study

STAGES = ["sft", "dpo", "rewriter", "forget", "learn"]


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


ARCH = {"llama": {}, "qwen2": dict(arch="qwen2", qkv_bias=True),  # the family's options (model.py)
        "qwen3": dict(arch="qwen3", qk_norm=True, head_size=16)}


def tiny_llama(folder, vocab_size, arch="llama"):
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                            max_seq_len=128, **ARCH[arch])).save_pretrained(str(folder))
    return str(folder)


def run_pipeline(tmp_path, tokenizer, arch="llama"):
    """sft -> sample -> dpo -> mask -> rewriter -> forget -> learn -> eval, all through flags."""
    tok = load_tokenizer(tokenizer)
    base = tiny_llama(tmp_path / "base", tok.vocab_size + 3, arch)
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
    cli("--stage", "dpo", "--model", o["sft"], "--data", pairs, "--dpo-steps", "3", "--out", o["dpo"])
    cli("--stage", "mask", "--model", o["sft"], "--dpo-model", o["dpo"], "--out", o["mask"])
    cli("--stage", "rewriter", "--model", o["sft"], "--data", forget, "--pairs", pairs,
        "--rewriter-steps", "3", "--out", o["rewriter"])
    cli("--stage", "forget", "--model", o["sft"], "--data", f"{o['rewriter']}/forget_weighted.jsonl",
        "--mask", f"{o['mask']}/forget.safetensors", "--forget-steps", "3", "--out", o["forget"])
    cli("--stage", "learn", "--model", o["forget"], "--data", pairs, "--mask",
        f"{o['mask']}/learn.safetensors", "--learn-steps", "3", "--out", o["learn"])
    assert not os.path.exists(tmp_path / "no-run-dir")
    return tok, o, test_q


def check_pipeline(tmp_path, capsys, tokenizer, arch="llama"):
    tok, o, test_q = run_pipeline(tmp_path, tokenizer, arch)
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
    for s in STAGES:  # every checkpoint loads back, of its family
        assert Transformer.from_pretrained(o[s]).cfg.arch == arch
    capsys.readouterr()
    evaluation.main(["--questions", test_q, "--tokenizer", tokenizer, "--pairs",
                     f"{o['sample']}/test_pairs.jsonl", "--ref", o["sft"]] + [o[s] for s in STAGES])
    table = capsys.readouterr().out
    labels = ["| SFT |", "| DPO (full parameters) |", f"| {o['rewriter']} |", "| NPO forgetting only |",
              "| ALLO (forget + learn) |"]  # a run's stages by their labels, other folders by their path
    assert all(label in table for label in labels) and "12 held-out questions" in table


def test_every_stage_on_your_own_model_and_gsm8k_file(tmp_path, capsys):
    check_pipeline(tmp_path, capsys, sentencepiece_tokenizer(tmp_path))


def test_every_stage_with_a_tokenizer_json(tmp_path, capsys):
    check_pipeline(tmp_path, capsys, hf_tokenizer(tmp_path))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_every_stage_on_a_qwen_model(tmp_path, capsys, arch):
    """#30: a Qwen2 (q/k/v biases) or Qwen3 (q/k RMSNorm, its own head size) model through every
    stage, with a tokenizer.json as Qwen ships; the masks cover the biases and norms too."""
    check_pipeline(tmp_path, capsys, hf_tokenizer(tmp_path), arch)
    with safe_open(str(tmp_path / "mask" / "learn.safetensors"), framework="pt") as f:
        extra = "q_proj.bias" if arch == "qwen2" else "q_norm.weight"
        assert any(name.endswith(extra) for name in f.keys())


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
        data.reference_answers(read_jsonl(write_rows(tmp_path / "b.jsonl", questions(0, 1) + [
            {"question": "q", "answer": "none"}]), "questions"))


# ----------------------------------------------------------------------------- the tokenizer's own rules

def bpe_tokenizer(folder, bos_in_post_processor, config=None):
    """A byte-level BPE tokenizer.json whose post-processor adds its BOS (as Llama 3's) or none (as
    SmolLM2's), with tokenizer_config.json (its special tokens, and `config`)."""
    tokenizers = pytest.importorskip("tokenizers")
    folder.mkdir(exist_ok=True)
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|pad|>", "<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=140, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts() + ["system user assistant"] * 5, trainer)
    if bos_in_post_processor:
        tk.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B", special_tokens=[("<|begin|>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>", **(config or {})}))
    return str(folder / "tokenizer.json")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_bos_follows_the_tokenizer_json_post_processor(tmp_path, adds_bos):
    """A BOS goes in where the tokenizer's own encoding puts one: training rows, reference and eval
    rows (collate) and generation prompts (generate_ids); --bos always/never override."""
    Backend = pytest.importorskip("tokenizers").Tokenizer

    from data import TokenizerFile, collate
    path = bpe_tokenizer(tmp_path, adds_bos)
    tok = load_tokenizer(path)
    # as transformers encodes
    own = Backend.from_file(path).encode("Question: What is 2 times 3?\nAnswer:").ids
    assert tok.prompt_ids("Question: What is 2 times 3?\nAnswer:") == own
    assert (own[0] == tok.bos_id) == adds_bos
    b = collate(tok, ["Question: Q?\nAnswer:"], [" 6"], max_len=64)
    assert b["input_ids"][0, :len(own)].tolist()[:1] == ([tok.bos_id] if adds_bos else tok.encode("Q"))
    assert (b["input_ids"][0] == tok.bos_id).sum() == int(adds_bos)

    class Recorder:  # the model's generate, recording the prompt ids it is given
        embed_tokens = torch.nn.Embedding(1, 1)

        def eval(self):
            return self

        def generate(self, ids, *args, **kwargs):
            self.ids = ids
            return [[] for _ in ids]

    model = Recorder()
    data.generate_ids(model, tok, ["Question: Q?\nAnswer:"], 4)
    assert model.ids == [tok.prompt_ids("Question: Q?\nAnswer:")]
    assert (model.ids[0][0] == tok.bos_id) == adds_bos
    for mode, first in (("always", [tok.bos_id]), ("never", [])):
        other = load_tokenizer(TokenizerFile(path, bos_mode=mode))
        assert other.prompt_ids("Q") == first + tok.encode("Q")


def test_bos_of_a_tokenizer_model_follows_add_bos_token(tmp_path):
    path = sentencepiece_tokenizer(tmp_path)
    assert load_tokenizer(path).prompt_ids("Q") == [2] + load_tokenizer(path).encode("Q")  # Llama 2's default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_tokenizer(path).prompt_ids("Q") == load_tokenizer(path).encode("Q")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
          "'<|im_end|>\\n\\n' + message['content'] | trim + '<|end|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\\n\\n' }}{% endif %}")


def test_chat_templates_render_as_written_and_encode_their_special_tokens(tmp_path):
    """ChatML (no BOS; SmolLM2's kind) and a Llama-3-style template that writes its own BOS: the
    rendered prompt and its ids equal the hand-written ones; no second BOS on top."""
    from data import prompt_text
    path = bpe_tokenizer(tmp_path / "chatml", False, {"chat_template": CHATML})
    tok = load_tokenizer(path)
    text = prompt_text("What is 2 times 3?", "chat", tok, system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 times 3?<|im_end|>\n<|im_start|>assistant\n")
    start, end = tok.tk.token_to_id("<|im_start|>"), tok.tk.token_to_id("<|im_end|>")
    ids = tok.prompt_ids(text)
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
    tail = tok.encode("assistant\n")
    assert ids[-len(tail) - 1:] == [start] + tail
    assert ids == tok.tk.encode(text).ids  # as the tokenizer itself encodes the rendered text

    path = bpe_tokenizer(tmp_path / "llama3", True)
    (tmp_path / "llama3" / "chat_template.jinja").write_text(LLAMA3)  # the file beside it is read too
    tok = load_tokenizer(path)
    text = prompt_text(" What is 2 times 3? ", "chat", tok)
    assert text == ("<|begin|><|im_start|>user<|im_end|>\n\nWhat is 2 times 3?<|end|>"
                    "<|im_start|>assistant<|im_end|>\n\n")
    ids = tok.prompt_ids(text)
    assert ids[:2] == [tok.bos_id, tok.tk.token_to_id("<|im_start|>")] and ids.count(tok.bos_id) == 1
    assert prompt_text("Q", "{question}?") == "Q?"


def test_chat_template_without_jinja2_or_without_a_template_is_one_line(tmp_path, monkeypatch):
    from data import _RENDERERS, prompt_text
    path = bpe_tokenizer(tmp_path, False)
    with pytest.raises(DataError, match="no chat template"):
        prompt_text("Q", "chat", load_tokenizer(path))
    (tmp_path / "chat_template.jinja").write_text(CHATML + " ")  # a template not compiled yet
    _RENDERERS.clear()
    monkeypatch.setitem(__import__("sys").modules, "jinja2", None)
    with pytest.raises(DataError, match=r"needs the `jinja2` package: pip install jinja2"):
        prompt_text("Q", "chat", load_tokenizer(path))


# ----------------------------------------------------------------------------- one command

def one_command(tmp_path, *extra):
    tok = bpe_tokenizer(tmp_path / "model", False, {"chat_template": CHATML})
    base = tiny_llama(tmp_path / "model", load_tokenizer(tok).vocab_size)
    train_q = write_rows(tmp_path / "train.jsonl", questions(1, 36))
    val_q = write_rows(tmp_path / "val.jsonl", questions(3, 8))
    test_q = write_rows(tmp_path / "test.jsonl", questions(2, 12))
    run = str(tmp_path / "run")
    args = ["--model", base, "--questions", train_q, "--eval-questions", val_q, test_q, "--run-dir", run,
            "--batch-size", "8", "--threads", "1", "--log-every", "20", "--sft-steps", "20",
            "--sft-lr", "3e-3", "--k", "2", "--max-new-tokens", "12", "--gold-chosen", "--dpo-steps", "2",
            "--rewriter-steps", "2", "--forget-steps", "2", "--eval-n", "4", *extra]
    return run, args


def started_from(out):
    """The identity of the model a stage output started from (its stage.json fingerprint)."""
    return json.load(open(os.path.join(out, "stage.json")))["fingerprint"]["inputs"]["model"]


def table_of(out):
    return out[out.index("| model |"):out.index("held-out pairs")]


def test_one_command_runs_every_stage_resumes_and_eval_prints_the_same_table(tmp_path, capsys):
    run, args = one_command(tmp_path)
    train.main(args)
    first = capsys.readouterr().out
    for stage in train.STAGES:
        assert f"{stage}: done in" in first
    assert "12 test questions" in first  # the table of the last evaluation file
    for stage in ("sft", "dpo", "rewriter", "forget", "learn"):  # complete Hugging Face folders
        out = os.path.join(run, stage)
        Transformer.from_pretrained(out)
        tok = load_tokenizer(out)
        config = json.load(open(os.path.join(out, "config.json")))
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
            (tok.bos_id, tok.eos_id, tok.pad_id)
        assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == tok.eos_id
        assert tok.chat_template == CHATML and tok.prefix == []
    starts = {stage: started_from(os.path.join(run, stage)) for stage in train.STAGES}
    # each stage starts from the model PIPELINE names, not from --model (the run's starting model)
    for stage, made_by in (("sft", None), ("sample", "sft"), ("dpo", "sft"), ("mask", "sft"),
                           ("rewriter", "sft"), ("forget", "sft"), ("learn", "forget")):
        assert starts[stage] == runs.input_id(os.path.join(run, made_by) if made_by else args[1]), stage
    train.main(args)  # finished alike: every stage skipped
    again = capsys.readouterr().out
    assert all(f"{stage}: finished earlier with these settings, skipped" in again for stage in train.STAGES)
    assert " loss " not in again
    evaluation.main([run])
    assert table_of(capsys.readouterr().out) == table_of(first)
    evaluation.main([run, "--split", "val"])
    assert "8 val questions" in capsys.readouterr().out


def test_one_command_from_an_instruct_model_with_its_chat_template(tmp_path, capsys):
    run, args = one_command(tmp_path, "--skip-sft", "--prompt-template", "chat", "--system", "Be brief.")
    train.main(args)
    out = capsys.readouterr().out
    assert "sft:" not in out and "| start (--skip-sft) |" in out
    pair = read_jsonl(os.path.join(run, "sample", "pairs.jsonl"), "pairs")[0]
    assert pair["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is")
    assert not pair["chosen"].startswith(" ")  # after "assistant\n" a response starts as it is
    with pytest.raises(SystemExit):
        train.main(args[:-1] + ["Be long."])  # the run was started with other inputs
    assert "the run was started with other prompt" in capsys.readouterr().err


def test_a_refused_one_command_leaves_no_run_record_behind(tmp_path, capsys):
    """A bad questions file stops the first stage: nothing of the run stays (no run.json), so the
    corrected command runs without --force."""
    run, args = one_command(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 2 + 2?", "answer": "#### 4"}\n{"question": 3}\n')
    i = args.index("--questions")
    with pytest.raises(SystemExit) as e:
        train.main(args[:i + 1] + [str(bad)] + args[i + 2:] + ["--sft-steps", "1"])
    assert e.value.code == 2 and f"{bad}:2" in capsys.readouterr().err
    assert os.listdir(run) == []
    train.main(args + ["--sft-steps", "1"] + ["--dpo-steps", "1"])  # the corrected command, no --force
    assert "| ALLO (forget + learn) |" in capsys.readouterr().out


def test_one_command_flags_are_checked(tmp_path, capsys):
    for argv, expected in ((["--skip-sft"], "--skip-sft: starts from --model"),
                           (["--system", "x"], "--system: goes with --prompt-template chat"),
                           (["--bos-token", ""], "--bos-token: must not be empty"),
                           (["--model", str(tmp_path)], "--questions"),
                           (["--questions", "q.jsonl"], "--model"),
                           (["--preset", "pretrained", "--model", str(tmp_path), "--questions", "q.jsonl"],
                            "--eval-questions: the one command needs")):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--run-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, (argv, err)


def test_study_pipeline_seeds_on_your_own_model_start_each_stage_where_the_pipeline_says(tmp_path, capsys):
    run, args = one_command(tmp_path)
    i = args.index("--run-dir")
    args = args[:i] + args[i + 2:]
    for skip in (False, True):
        root = run + ("-skip" if skip else "")
        study.main(["--run", root, "--pipeline-seeds", "1", "--arms", "DPO full", "ALLO", "--n-eval", "4",
                    *args, *(["--skip-sft"] if skip else [])])
        seed = os.path.join(root, "seed0")
        start = args[1] if skip else os.path.join(seed, "sft")  # sample, rewriter and arms start here
        arms = os.path.join(seed, "study", "main", "seed0")
        for d in ("sample", "rewriter", os.path.join(arms, "dpo-full"),
                  os.path.join(arms, "forget-unaligned-top")):
            assert started_from(os.path.join(seed, d)) == runs.input_id(start), d
        assert os.path.exists(os.path.join(seed, "sft")) != skip
    capsys.readouterr()


def test_a_tokenizer_model_and_json_that_disagree_are_named(tmp_path, capsys):
    """#32: a folder holding a tokenizer.model and a tokenizer.json uses the .model; where the two
    are different tokenizers, one warning says so (a consistent pair, as Llama 2 ships, is silent:
    the same ids for the probe line and the same EOS)."""
    tokenizers = pytest.importorskip("tokenizers")
    sentencepiece_tokenizer(tmp_path)
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts(), trainer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    load_tokenizer(str(tmp_path))
    assert capsys.readouterr().out == ""  # the .model alone
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert tok.path.endswith("tokenizer.model") and len(out) == 1
    assert out[0].startswith(f"warning: {tmp_path}: tokenizer.model and tokenizer.json encode "
                             "'Question: Tom has 1'")
    assert out[0].endswith("tokenizer.model is used (name the other with --tokenizer)")
    load_tokenizer(str(tmp_path / "tokenizer.model"))  # named: no question which
    assert capsys.readouterr().out == ""
