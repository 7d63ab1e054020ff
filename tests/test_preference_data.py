"""#31 item 1: ALLO on a preference dataset in one command (train.py --pairs, --eval-pairs): TRL's string and
conversational rows, rendered as the pipeline reads them, the rows that cannot train counted, every stage
but sampling on them, and a table of what pairs can measure."""

import json
import os

import pytest

import eval as evaluation
import train
from data import DataError, load_tokenizer, preference_pairs, read_jsonl
from test_own_data import CHATML, bpe_tokenizer, questions, tiny_llama, write_rows

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chatml(folder):
    """A SmolLM2-like tokenizer: ChatML, its EOS the turn's end."""
    return load_tokenizer(bpe_tokenizer(folder, False, {"chat_template": CHATML, "eos_token": "<|im_end|>"}))


def rows_of(tmp_path, rows, name="p.jsonl"):
    return read_jsonl(write_rows(tmp_path / name, rows), "preferences")


def test_string_rows_go_through_the_prompt_template(tmp_path):
    tok = chatml(tmp_path)
    rows = rows_of(tmp_path, [{"prompt": "What is 2 times 3?", "chosen": " 6 ", "rejected": "5\n"}])
    pairs, _ = preference_pairs(rows, tok, "Question: {question}\nAnswer:", None, 128)
    assert pairs == [{"prompt": "Question: What is 2 times 3?\nAnswer:", "chosen": " 6", "rejected": " 5",
                      "question": "What is 2 times 3?"}]
    pairs, _ = preference_pairs(rows, tok, "chat", "Be brief.", 128)  # a user turn, after the system one
    assert pairs[0]["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                  "What is 2 times 3?<|im_end|>\n<|im_start|>assistant\n")
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("6", "5")  # nothing leads after "assistant\n"


def test_conversational_rows_keep_the_prompts_own_turns(tmp_path):
    tok = chatml(tmp_path)
    turns = [SYSTEM, user("What is 2 times 3?"), assistant("6"), user("And times 4?")]
    explicit = {"prompt": turns, "chosen": [assistant("24")], "rejected": [assistant("12")]}
    implicit = {"chosen": turns + [assistant("24")], "rejected": turns + [assistant("12")]}  # TRL's implicit
    pairs, _ = preference_pairs(rows_of(tmp_path, [explicit, implicit]), tok, "chat", None, 128)
    head = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 times 3?<|im_end|>\n"
            "<|im_start|>assistant\n6<|im_end|>\n<|im_start|>user\nAnd times 4?<|im_end|>\n"
            "<|im_start|>assistant\n")
    # the turn's end (<|im_end|>, this tokenizer's EOS) is the EOS that collate puts after every response
    assert pairs == [{"prompt": head, "chosen": "24", "rejected": "12", "question": "And times 4?"}]
    assert len(pairs) == 1  # the implicit row is the explicit one again: a duplicate
    # --system goes first where the prompt has no system turn, and only there
    pairs, _ = preference_pairs(rows_of(tmp_path, [{**explicit, "prompt": turns[1:]}, explicit]), tok, "chat",
                                "Be long.", 128)
    assert pairs[0]["prompt"].startswith("<|im_start|>system\nBe long.<|im_end|>\n<|im_start|>user\nWhat")
    assert pairs[1]["prompt"] == head


def test_rows_that_cannot_train_are_dropped_and_counted(tmp_path):
    tok = chatml(tmp_path)
    good = {"prompt": "What is 2 times 3?", "chosen": "6", "rejected": "5"}
    rows = [good, good, {**good, "chosen": " "}, {**good, "rejected": "6"}, {**good, "rejected": "5 " * 60},
            {**good, "prompt": "What is 3 times 3?"}]
    pairs, dropped = preference_pairs(rows_of(tmp_path, rows), tok, "Question: {question}\nAnswer:", None, 40)
    assert [p["prompt"][10:28] for p in pairs] == ["What is 2 times 3?", "What is 3 times 3?"]
    assert dropped == {"empty": 1, "chosen = rejected": 1, "duplicates": 1, "over --max-len 40": 1}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Q", "chosen": "a"}, ":1: missing field 'rejected'"),
    ({"prompt": "Q", "chosen": "a", "rejected": [assistant("b")]}, "must both be strings or both lists"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string"),
    ({"prompt": [user("Q")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]},
     "field 'chosen' must be a non-empty list of"),
    ({"chosen": [user("Q"), assistant("a")], "rejected": [user("R"), assistant("b")]}, "no prompt"),
])
def test_a_malformed_row_names_its_line_and_field(tmp_path, row, expected):
    tok = chatml(tmp_path)
    with pytest.raises(DataError, match=expected):
        preference_pairs(rows_of(tmp_path, [row]), tok, "chat", None, 128)


def test_conversational_rows_need_the_chat_template(tmp_path):
    row = {"prompt": [user("Q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    with pytest.raises(DataError, match=r":1: conversational rows \(lists of messages\) need --prompt"):
        preference_pairs(rows_of(tmp_path, [row]), chatml(tmp_path), "{question}", None, 128)


# ----------------------------------------------------------------------------- the one command

def preference_rows(seed, n, conversational):
    """Pairs made from multiplication questions: the right product chosen, a wrong one rejected."""
    out = []
    for q in questions(seed, n):
        right = q["answer"]
        wrong = right.rsplit("#### ", 1)[0] + f"#### {int(right.rsplit(' ', 1)[1]) + 1}"
        if conversational:
            out.append({"prompt": [user(q["question"])], "chosen": [assistant(right)],
                        "rejected": [assistant(wrong)]})
        else:
            out.append({"prompt": q["question"], "chosen": right, "rejected": wrong})
    return out


def distinct(seed, n, conversational):
    return len({json.dumps(r) for r in preference_rows(seed, n, conversational)})


def pairs_command(tmp_path, conversational, *extra):
    model = tmp_path / "model"
    chatml(model)
    tiny_llama(model, load_tokenizer(str(model / "tokenizer.json")).vocab_size)
    train_p = write_rows(tmp_path / "train.jsonl", preference_rows(1, 36, conversational))
    val_p = write_rows(tmp_path / "val.jsonl", preference_rows(3, 8, conversational))
    test_p = write_rows(tmp_path / "test.jsonl", preference_rows(2, 12, conversational))
    run = str(tmp_path / "run")
    args = ["--model", str(model), "--pairs", train_p, "--eval-pairs", val_p, test_p, "--run-dir", run,
            "--batch-size", "8", "--threads", "1", "--log-every", "20", "--sft-steps", "10",
            "--sft-lr", "3e-3",
            "--dpo-steps", "2", "--rewriter-steps", "2", "--forget-steps", "2", *extra]
    if conversational:
        args += ["--prompt-template", "chat"]
    return run, args


@pytest.mark.parametrize("conversational, skip_sft", [(False, False), (True, True)])
def test_one_command_runs_alignment_on_preference_pairs(tmp_path, capsys, conversational, skip_sft):
    run, args = pairs_command(tmp_path, conversational, *(["--skip-sft"] if skip_sft else []))
    train.main(args)
    out = capsys.readouterr().out
    n = distinct(1, 36, conversational)  # a question drawn twice makes a duplicate pair
    assert f"{tmp_path / 'train.jsonl'}: 36 rows, {n} pairs; dropped: {36 - n} duplicates\n" in out
    skipped = ("sample", "sft") if skip_sft else ("sample",)  # no sampling; SFT unless --skip-sft
    for stage in train.STAGES:
        assert (f"{stage}: done in" in out) == (stage not in skipped), stage
    assert not os.path.exists(os.path.join(run, "sample"))
    pairs = read_jsonl(os.path.join(run, "pairs", "pairs.jsonl"), "pairs")
    if conversational:
        assert pairs[0]["prompt"].startswith("<|im_start|>user\nWhat is")
        assert not pairs[0]["chosen"].startswith(" ")
    sft = read_jsonl(os.path.join(run, "pairs", "sft.jsonl"), "sft")
    assert [r["output"] for r in sft] == [p["chosen"] for p in pairs]  # SFT on the chosen responses
    forget = read_jsonl(os.path.join(run, "pairs", "forget.jsonl"), "forget")
    assert [(r["response"], r["reference"]) for r in forget] == [(p["rejected"], p["chosen"].lstrip())
                                                                 for p in pairs]
    weighted = read_jsonl(os.path.join(run, "rewriter", "forget_weighted.jsonl"), "forget")
    assert [r["response"] for r in weighted] == [p["rejected"] for p in pairs]  # the forgetting set: rejected
    # the stages read the run's pairs: dpo's data and the learn stage's are pairs/pairs.jsonl
    dpo = json.load(open(os.path.join(run, "dpo", "stage.json")))["fingerprint"]["inputs"]["data"]
    assert dpo == json.load(open(os.path.join(run, "learn", "stage.json")))["fingerprint"]["inputs"]["data"]
    table = out[out.index("| model |"):]
    assert "| model | chosen log-prob/token | pair accuracy | margin |" in table
    assert f"{distinct(2, 12, conversational)} test held-out pairs" in table
    start = "start (--skip-sft)" if skip_sft else "SFT"
    for label in (start, "DPO (full parameters)", "NPO forgetting only", "ALLO (forget + learn)"):
        assert f"| {label} | -" in table, label  # a log-likelihood, a negative number
    evaluation.main([run])  # eval.py prints the same table again
    again = capsys.readouterr().out
    assert again[again.index("| model |"):again.index("margin =")] == table[:table.index("margin =")]
    train.main(args)  # finished alike: every stage skipped
    assert " loss " not in capsys.readouterr().out


def test_preference_run_flags_are_checked(tmp_path, capsys):
    run, args = pairs_command(tmp_path, False)
    i = args.index("--eval-pairs")
    for argv, expected in ((args[2:], "--pairs: your pairs need your model too"),
                           (args[:i] + args[i + 3:], "--eval-pairs: the one command needs"),
                           (args + ["--questions", args[3]], "--pairs: a preference-data run takes no")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
        assert e.value.code == 2 and len(errors) == 1 and expected in errors[0], (argv, err)
        assert not os.path.exists(os.path.join(run, "run.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "Q"}\n')
    with pytest.raises(SystemExit) as e:
        train.main(args[:3] + [str(bad)] + args[4:])
    assert e.value.code == 2 and f"{bad}:2: missing field 'chosen'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "pairs"))  # nothing written
    train.main(args + ["--sft-steps", "1", "--dpo-steps", "1"])
    with pytest.raises(SystemExit) as e:
        train.main(["--run-dir", run, "--stage", "sample"])
    assert e.value.code == 2 and "samples nothing" in capsys.readouterr().err


def test_the_study_refuses_a_run_on_pairs(tmp_path, capsys):
    from study import study
    run, args = pairs_command(tmp_path, False, "--sft-steps", "1")
    train.main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        study.main(["--run", run, "--quick"])
    assert e.value.code == 2 and "has none of; compare its models with eval.py" in capsys.readouterr().err


@pytest.mark.parametrize("conversational", [False, True])
def test_task_pairs_are_deterministic_and_prefer_the_whole_right_solution(tmp_path, conversational):
    from data import extract_answer
    from tools import task_pairs
    flags = ["--n-train", "30", "--n-val", "4", "--n-test", "6"]
    flags += ["--conversational"] if conversational else []
    for folder in ("a", "b"):
        task_pairs.main([str(tmp_path / folder)] + flags)
    for name, n in (("train", 30), ("val", 4), ("test", 6)):
        text = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{name}.jsonl").read_text()
        pairs, dropped = preference_pairs(read_jsonl(str(tmp_path / "a" / f"{name}.jsonl"), "preferences"),
                                          chatml(tmp_path / "tok"), "chat", None, 512)
        assert len(pairs) == n and not any(dropped.values())
        for p in pairs:  # chosen: every step and the answer right; rejected: another final answer
            steps = p["chosen"].split(". ")[:-1]
            assert all(eval(s.split(" = ")[0]) == int(s.split(" = ")[1]) for s in steps)
            assert extract_answer(p["chosen"]) == steps[-1].split(" = ")[1] != extract_answer(p["rejected"])
