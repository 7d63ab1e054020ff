"""Hostile run records (#32): a run.json or a stage.json cut short, edited into another shape or
written by another version, and eval.py R on a run with stages missing or its files changed: one
line naming the file for every reader, nothing written, and --force writes the record anew."""

import json
import os
import shutil

import pytest
from test_failsafe import SMOKE, fails_cleanly

import eval as evaluation
import train


def record_edits(record, text):
    """run.json made hostile: (name, new file bytes)."""
    future = {**record, "written_by": "a later version"}
    no_eval = {k: v for k, v in record.items() if k != "eval"}
    return [("truncated", text[:len(text) // 2]), ("empty", b""), ("a list", b"[1, 2]"),
            ("missing key", json.dumps(no_eval).encode()), ("extra key", json.dumps(future).encode()),
            ("inputs a string", json.dumps({**record, "inputs": "task"}).encode()),
            ("inputs short", json.dumps({**record, "inputs": {"embedded": True}}).encode())]


@pytest.mark.parametrize("case", range(7))
def test_a_hostile_run_record_is_one_line_for_every_reader(run, capsys, case):
    """A run.json cut short, of another shape or from another version: train.py's stages, the one
    command and eval.py each stop with one line naming the file, and nothing is written; --force
    writes the record anew."""
    path = os.path.join(run, "run.json")
    text = open(path, "rb").read()
    name, edited = record_edits(json.loads(text), text)[case]
    with open(path, "wb") as f:
        f.write(edited)
    for args in (SMOKE + ["--run", run, "--stage", "dpo"], SMOKE + ["--run", run]):
        fails_cleanly(capsys, run, args, f"{path}: ", "--force to write it anew")
    with pytest.raises(SystemExit) as e:
        evaluation.main([run])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and path in err, (name, err)
    train.main(SMOKE + ["--run", run, "--stage", "sft", "--force"])
    assert json.load(open(path))["inputs"]["embedded"] is True


def test_eval_of_a_run_says_what_it_leaves_out_and_what_changed(run, capsys):
    """eval.py R with a stage missing names the row it leaves out; an evaluation file edited after
    the sample stage drew its held-out pairs is scored with a warning that the pairs are the old
    file's."""
    shutil.rmtree(os.path.join(run, "forget"))
    evaluation.main([run])
    out = capsys.readouterr().out
    assert f"eval: NPO forgetting only ({run}/forget) is not finished: its row is left out" in out
    assert "| NPO forgetting only |" not in out and "| ALLO (forget + learn) |" in out
    assert "changed after the sample stage" not in out
    with open(os.path.join(run, "task", "test.jsonl"), "a") as f:
        f.write('{"question": "What is 1 + 1?", "answer": "1 + 1 = 2. The answer is 2."}\n')
    evaluation.main([run])
    assert f"warning: {run}/task/test.jsonl changed after the sample stage drew" in capsys.readouterr().out


@pytest.mark.parametrize("cut", ["half", "empty", "a list"])
def test_a_torn_stage_record_names_itself_and_force_redoes_the_stage(run, capsys, cut):
    """A finished stage whose stage.json was cut short or edited: one line naming it (not "a model's
    folder"), nothing written; --force redoes the stage and leaves a whole record."""
    path = os.path.join(run, "learn", "stage.json")
    text = open(path, "rb").read()
    open(path, "wb").write({"half": text[:len(text) // 2], "empty": b"", "a list": b"[]"}[cut])
    args = SMOKE + ["--run", run, "--stage", "learn"]
    fails_cleanly(capsys, run, args, f"{path}: not a whole stage record (cut short or edited); --force")
    train.main(args + ["--force"])
    assert json.load(open(path))["stage"] == "learn"
