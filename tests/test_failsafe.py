"""Fail safe: resume checks what it resumes, the NaN guard, one line and exit status 2 for every bad
file and flag, nothing half-written, torn checkpoints, one process per output directory.

Each error case asserts exit status 2, one line on stderr naming the path or flag, and the run
directory exactly as it was before (every file's bytes, no new file or directory)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import allo
import train
from bookkeeping import runs, trainlog

real_save = trainlog.save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke"]


def snapshot(root):
    """Every file's bytes and every directory under root (and root's siblings: <out>.lock, <out>.tmp)."""
    seen = {}
    parent = os.path.dirname(os.path.abspath(root))
    for folder, dirs, files in os.walk(parent):
        for d in dirs:
            seen[os.path.relpath(os.path.join(folder, d), parent)] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.isfile(path):  # a FIFO another test made: opening it would wait for a writer
                seen[os.path.relpath(path, parent)] = "special"
                continue
            with open(path, "rb") as fh:
                seen[os.path.relpath(path, parent)] = hashlib.sha256(fh.read()).hexdigest()
    return seen


def fails(capsys, args, *expected):
    """train.main(args) stops with exit status 2 and one line holding every expected string."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, (text, err)
    return err


def fails_cleanly(capsys, run, args, *expected):
    before = snapshot(run)
    err = fails(capsys, args, *expected)
    assert snapshot(run) == before
    return err


def dpo_stage(run, tmp_path, capsys, *flags):
    """The dpo stage of the smoke run `run` with these flags, into tmp_path/out: (exit status, stderr
    lines, stdout); a failure has written nothing there."""
    out = tmp_path / "out"
    try:
        train.main(SMOKE + ["--run", run, "--stage", "dpo", "--out", str(out), "--dpo-steps", "1", *flags])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    if code:
        assert not out.exists() and not (tmp_path / "out.tmp").exists()
    return code, captured.err.strip().splitlines(), captured.out


# ----------------------------------------------------------------------------- resume checks what it resumes

def kill_after_checkpoint(monkeypatch, at):
    real = trainlog.save_checkpoint

    def save_then_die(ckpt_dir, step, *state):
        real(ckpt_dir, step, *state)
        if step == at:
            raise KeyboardInterrupt  # killed right after this checkpoint

    monkeypatch.setattr(trainlog, "save_checkpoint", save_then_die)


@pytest.mark.parametrize("killed, rerun, difference", [
    (["--learn-ratio", "1"], [], "another mask (input)"),  # the unmasked checkpoint must not resume masked
    ([], ["--dpo-steps", "8"], "steps 6, not 8"),
    ([], ["--learn-lr", "1e-4"], "lr 3e-05, not 0.0001"),
    ([], ["--seed", "1"], "seed 0, not 1"),
    ([], ["--data", "{run}/sample/val_pairs.jsonl"], "another data (input)"),
])
def test_resume_with_other_settings_is_refused(run, capsys, monkeypatch, killed, rerun, difference):
    out = os.path.join(run, "x")
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "2", "--out", out]
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(args + killed)
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(out + ".tmp", "ckpt", "step-0000004"))
    rerun = [flag.format(run=run) for flag in rerun]
    fails_cleanly(capsys, run, args + rerun, f"{out}.tmp: holds an unfinished run with", difference,
                  "--force starts over")
    train.main(args + rerun + ["--force"])  # --force starts over
    assert not os.path.exists(out + ".tmp") and os.path.exists(os.path.join(out, "stage.json"))
    fails_cleanly(capsys, run, args + killed, f"{out}: finished earlier with", "--force redoes it")



def test_a_stage_finished_before_a_setting_existed_is_refused_naming_it(run, capsys):
    """A finished stage's record without a setting this version added (as sample/ before --held-out-k):
    the resume is refused, in one line that says the record is an older version's."""
    info_path = os.path.join(run, "sample", "stage.json")
    info = json.load(open(info_path))
    del info["fingerprint"]["held_out_k"]
    with open(info_path, "w") as f:
        json.dump(info, f)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "sample"], f"{run}/sample: finished earlier "
                  "with no held_out_k (an older version's settings; this one's held_out_k is 2)", "--force")

@pytest.mark.parametrize("cut", ["mid-row", "before-newline", "garbage", "empty-line", "not-a-row"])
def test_a_torn_metrics_log_is_dropped_and_the_stage_resumes(run, capsys, monkeypatch, tmp_path, cut):
    """Killed while appending to metrics.jsonl: the torn tail (or an edited line) is dropped with one
    warning, the stage resumes from its checkpoint and ends with the weights and per-step losses of
    an uninterrupted run."""
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "2",
                    "--log-every", "1"]
    out = str(tmp_path / "killed")
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(args + ["--out", out])
    monkeypatch.undo()
    log = os.path.join(out + ".tmp", "metrics.jsonl")
    text = open(log, "rb").read()
    last = text.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    torn = {"mid-row": text[:-len(last) // 2], "before-newline": text[:-1], "empty-line": text + b"\n",
            "garbage": text + b"\x00\xff{", "not-a-row": text.replace(last, b"[1, 2]")}[cut]
    open(log, "wb").write(torn)
    capsys.readouterr()
    train.main(args + ["--out", out])
    said = capsys.readouterr().out
    assert "learn: resumed from step 4/6" in said
    assert (f"warning: {log}: line" in said) == (cut != "before-newline")  # a row cut before "\n" is whole
    train.main(args + ["--out", str(tmp_path / "whole")])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (out, tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_at_most_one_per_ckpt_minutes_and_resume_to_the_same_weights(run, capsys, monkeypatch,
                                                                                  tmp_path):
    """--ckpt-every 1 --ckpt-minutes 60 with steps of 25 minutes: no checkpoint before the first hour
    (steps 1 and 2), one at step 3 (75 minutes), none in the hour after it (steps 4 and 5); killed at
    step 5, the stage resumes from step 3 and ends with the weights of an uninterrupted run."""
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "1",
                    "--ckpt-minutes", "60"]
    out = str(tmp_path / "killed")
    clock = [1000.0]  # the checkpoints' clock, in seconds
    real_step = trainlog.TrainLog.step
    saved = []

    def save(ckpt_dir, step, *state):
        saved.append(step)
        real_save(ckpt_dir, step, *state)

    def a_step_of_25_minutes_dies_at_5(self, done, *rest):
        clock[0] += 25 * 60
        real_step(self, done, *rest)
        if done == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainlog, "time", SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    monkeypatch.setattr(trainlog, "save_checkpoint", save)
    monkeypatch.setattr(trainlog.TrainLog, "step", a_step_of_25_minutes_dies_at_5)
    with pytest.raises(SystemExit):
        train.main(args + ["--out", out])
    assert saved == [3] and os.listdir(os.path.join(out + ".tmp", "ckpt")) == ["step-0000003"]
    monkeypatch.undo()
    capsys.readouterr()
    train.main(args + ["--out", out])
    assert "learn: resumed from step 3/6" in capsys.readouterr().out
    train.main(args + ["--out", str(tmp_path / "whole")])
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (out, tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_forced_redo_that_was_killed_resumes(run, capsys, monkeypatch):
    """Over a finished output, --force starts a redo; killed, it resumes without --force."""
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "2"]
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(args + ["--force"])
    monkeypatch.undo()
    capsys.readouterr()
    train.main(args)
    assert "learn: resumed from step 4/6" in capsys.readouterr().out
    assert json.load(open(os.path.join(run, "learn", "stage.json")))["steps"] == 6


def test_a_forget_checkpoint_is_not_resumed_by_learn(run, capsys, monkeypatch, tmp_path):
    out = str(tmp_path / "x")
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train.main(SMOKE + ["--run", run, "--stage", "forget", "--forget-steps", "4", "--out", out])
    monkeypatch.undo()
    fails_cleanly(capsys, str(tmp_path), SMOKE + ["--run", run, "--stage", "learn", "--out", out],
                  "x.tmp: holds a run of the forget stage, not a learn stage's output")


def test_a_finished_stage_asked_for_with_other_settings(run, capsys):
    args = SMOKE + ["--run", run, "--stage", "dpo"]
    fails_cleanly(capsys, run, args + ["--dpo-lr", "3e-5"],
                  f"{run}/dpo: finished earlier with lr 1e-05, not 3e-05", "--force redoes it")
    capsys.readouterr()
    train.main(args)  # the same settings: skipped
    assert "dpo: finished earlier with these settings, skipped" in capsys.readouterr().out
    train.main(args + ["--dpo-lr", "3e-5", "--force"])
    assert json.load(open(os.path.join(run, "dpo", "stage.json")))["lr"] == 3e-5


def test_a_redone_stage_changes_the_inputs_of_the_next(run, capsys):
    """A stage's output stands in the fingerprints of the stages after it by its content: redone
    alike (the same weights) it changes nothing; redone otherwise, the next stage sees another input."""
    train.main(SMOKE + ["--run", run, "--stage", "dpo", "--force"])
    train.main(SMOKE + ["--run", run, "--stage", "mask"])
    assert "mask: finished earlier with these settings, skipped" in capsys.readouterr().out
    train.main(SMOKE + ["--run", run, "--stage", "dpo", "--force", "--dpo-lr", "1e-3"])
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "mask"], "another dpo_model (input)")


def test_metrics_start_fresh_when_a_stage_starts_over_and_resume_drops_the_rows_after_the_checkpoint(
        run, monkeypatch):
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "2", "--force"]
    real_log = trainlog.log_progress

    def die_after_step_5(stage, done, *a):
        real_log(stage, done, *a)
        if done == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainlog, "log_progress", die_after_step_5)
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.undo()
    steps = lambda path: [json.loads(line)["step"] for line in open(path)]  # noqa: E731
    assert steps(os.path.join(run, "learn.tmp", "metrics.jsonl")) == [1, 2, 3, 4, 5]
    train.main(args[:-1])  # resumes from step 4: step 5 is logged again, once
    assert steps(os.path.join(run, "learn", "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
    train.main(args)  # --force: a fresh file
    assert steps(os.path.join(run, "learn", "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- the NaN guard

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_flag_finds_any_non_finite_entry(bad):
    """finite_flag (each tensor's aminmax on a CPU): 0 when any entry of any tensor, first or last,
    is NaN or an infinity, 1 when all are finite, however large; as the inf-norm of each tensor
    (its GPU path) says."""
    from trainer import finite_flag
    tensors = [torch.randn(5, 7), torch.full((3,), 3e38), torch.randn(11)]
    assert finite_flag(tensors).item() == 1.0
    for i in range(len(tensors)):
        for where in (0, -1):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[where] = bad
            by_norm = torch.stack(torch._foreach_norm(broken, float("inf"))).isfinite().all()
            assert finite_flag(broken).item() == 0.0 == float(by_norm)


def mapped_from(path, tensor):
    """Whether tensor's memory lies in a mapping of the file `path` (Linux's /proc/self/maps)."""
    at = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= at < high:
            return fields[-1] == path
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_trained_weights_are_copied_out_of_the_checkpoint_files_mapping(run):
    """A float32 checkpoint's weights load as pages of the file's mapping; trainer.own_memory gives
    the trained ones memory of their own (the first update would otherwise fault each page in,
    copy on write), bit for bit, and leaves the others where they are."""
    from model import Transformer
    from trainer import own_memory
    folder = os.path.realpath(os.path.join(run, "sft"))
    model = Transformer.from_pretrained(folder)
    file = os.path.join(folder, "model.safetensors")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(mapped_from(file, p) for p in model.parameters())
    trained = {n: torch.ones_like(p, dtype=torch.bool) for i, (n, p) in enumerate(model.named_parameters())
               if i % 2}
    own_memory(model, trained)
    for n, p in model.named_parameters():
        assert mapped_from(file, p) == (n not in trained)
        assert torch.equal(p, before[n])


def poison_at(monkeypatch, step):
    """MaskedAdamW writes a NaN into a trained entry at `step`."""
    real = allo.MaskedAdamW.step

    def step_then_poison(self, closure=None):
        out = real(self, closure)
        if self.param_groups[0]["step"] == step:
            p = next(p for p in self.param_groups[0]["params"] if p in self.state)
            i = self.state[p]["idx"][0] if "idx" in self.state[p] else 0
            with torch.no_grad():
                p.view(-1)[i] = float("nan")
        return out

    monkeypatch.setattr(allo.MaskedAdamW, "step", step_then_poison)


def test_nan_weights_at_the_last_step_write_nothing(run, capsys, monkeypatch):
    poison_at(monkeypatch, 3)
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "3", "--ckpt-every", "5", "--force"]
    fails_cleanly(capsys, run, args, "learn: non-finite weights after step 3", "no checkpoint yet")


def test_the_last_good_checkpoint_exists_and_is_finite(run, capsys, monkeypatch):
    poison_at(monkeypatch, 3)
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "4", "--ckpt-every", "1", "--force"]
    err = fails(capsys, args, "learn: non-finite weights after step 3", "the last good checkpoint is ")
    named = err.split("the last good checkpoint is ")[1].split(" (")[0].strip()
    assert named.endswith("step-0000002")
    weights = load_file(os.path.join(named, "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    monkeypatch.undo()
    train.main(args[:-1])  # resumes from it and finishes
    assert os.path.exists(os.path.join(run, "learn", "stage.json"))


def test_nan_weights_in_the_starting_model(run, capsys, tmp_path):
    model = str(shutil.copytree(os.path.join(run, "sft"), tmp_path / "bad"))
    w = load_file(os.path.join(model, "model.safetensors"))
    name = next(iter(w))
    w[name].view(-1)[:3] = float("nan")
    save_file(w, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "learn", "--model", model, "--out",
                                        str(tmp_path / "o")], f"{model}: 3 non-finite weights")


# ----------------------------------------------------------------------------- bad files, one line each

def damaged_model(run, tmp_path, damage):
    model = str(shutil.copytree(os.path.join(run, "sft"), tmp_path / "model"))
    damage(model)
    return model


def write_config(model, text):
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write(text)


def edit_config(model, **changes):
    cfg = json.load(open(os.path.join(model, "config.json")))
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del cfg[k]
    write_config(model, json.dumps(cfg))


def truncate(path, keep=100):
    with open(path, "r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize("damage, expected", [
    (lambda m: write_config(m, "{not json"), "config.json"),
    (lambda m: write_config(m, ""), "config.json"),
    (lambda m: edit_config(m, model_type="gpt2"), "model_type 'gpt2'"),
    (lambda m: edit_config(m, num_attention_heads=None), "num_attention_heads"),
    (lambda m: os.remove(os.path.join(m, "model.safetensors")), "model.safetensors"),
    (lambda m: truncate(os.path.join(m, "model.safetensors")), "cannot load the model"),
])
def test_a_bad_model_directory(run, capsys, tmp_path, damage, expected):
    model = damaged_model(run, tmp_path, damage)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "dpo", "--model", model, "--out",
                                        str(tmp_path / "o")], model, expected)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("content, expected", [
    (b"", "not a SentencePiece model (empty)"),
    (b"\x00\x01garbage" * 50, "not a SentencePiece model"),
])
def test_a_bad_tokenizer(run, capsys, tmp_path, content, expected):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(content)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "dpo", "--tokenizer", str(tok), "--out",
                                        str(tmp_path / "o")], str(tok), expected)


def test_a_tokenizer_without_bos(run, capsys, tmp_path):
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f"] * 20), model_writer=model,
                                   vocab_size=12, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    (tmp_path / "t.model").write_bytes(model.getvalue())
    args = ["--run", run, "--stage", "dpo", "--tokenizer", str(tmp_path / "t.model"),
            "--out", str(tmp_path / "o")]
    fails_cleanly(capsys, run, SMOKE + args, "has no BOS piece", "--bos-token")


def mask_file(run, tmp_path, kind):
    path = tmp_path / "mask.safetensors"
    masks = load_file(os.path.join(run, "mask", "learn.safetensors"))
    if kind == "truncated":
        shutil.copy(os.path.join(run, "mask", "learn.safetensors"), path)
        truncate(path, 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(os.urandom(300))
    elif kind == "float values":
        save_file({n: torch.rand(m.shape) for n, m in masks.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "not a mask file"), ("empty", "not a mask file"), ("random bytes", "not a mask file"),
    ("float values", "a mask is bool, or exact 0 and 1"),
])
def test_a_bad_mask(run, capsys, tmp_path, kind, expected):
    mask = mask_file(run, tmp_path, kind)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "learn", "--mask", mask, "--out",
                                        str(tmp_path / "o")], mask, expected)


def test_a_partial_mask_reports_its_true_fraction_and_01_masks_are_accepted(run, tmp_path):
    masks = load_file(os.path.join(run, "mask", "learn.safetensors"))
    kept = dict(list(masks.items())[:2])
    path = str(tmp_path / "two.safetensors")
    save_file({n: m.to(torch.float32) for n, m in kept.items()}, path)  # exact 0/1 values in float32
    out = tmp_path / "o"
    train.main(SMOKE + ["--run", run, "--stage", "learn", "--mask", path, "--out", str(out)])
    total = sum(m.numel() for m in masks.values())
    info = json.load(open(out / "stage.json"))
    assert info["trained_fraction"] == pytest.approx(sum(int(m.sum()) for m in kept.values()) / total)


def test_out_is_a_file(run, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file")
    fails_cleanly(capsys, str(tmp_path), SMOKE + ["--run", run, "--stage", "learn", "--out", out],
                  f"{out}: the stage's output is a file")


def test_the_grad_scorer_checks_the_vocabulary(run, capsys, tmp_path):
    small = tmp_path / "small"
    cfg = json.load(open(os.path.join(run, "sft", "config.json")))
    from model import ModelConfig, Transformer
    Transformer(ModelConfig(vocab_size=8, dim=cfg["hidden_size"], n_layers=1, n_heads=2, n_kv_heads=1,
                            hidden_dim=64)).save_pretrained(str(small))
    args = ["--run", run, "--stage", "mask", "--scorer", "grad", "--model", str(small),
            "--out", str(tmp_path / "o")]
    fails_cleanly(capsys, run, SMOKE + args, "vocab_size 8 is smaller than the tokenizer's")


# ----------------------------------------------------------------------------- truncation

def test_truncation_is_reported_and_a_prompt_without_room_is_an_error(run, capsys, tmp_path):
    pairs = [json.loads(line) for line in open(os.path.join(run, "sample", "pairs.jsonl"))][:8]
    pairs[3] = {**pairs[3], "rejected": pairs[3]["rejected"] + " and so on" * 30}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    capsys.readouterr()
    train.main(SMOKE + ["--run", run, "--stage", "learn", "--data", str(data), "--out", str(tmp_path / "o")])
    warning = (f"learn: warning: 1 of 16 rows longer than --max-len 128, their responses cut "
               f"(the first: {data}:4)")
    assert warning in capsys.readouterr().out
    pairs[5] = {**pairs[5], "prompt": pairs[5]["prompt"] * 10}
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "learn", "--data", str(data), "--out",
                                        str(tmp_path / "o2")], f"{data}:6: the prompt has", "leaves no room")


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--ckpt-every", "0"], "--ckpt-every"), (["--log-every", "0"], "--log-every"),
    (["--max-len", "1"], "--max-len"), (["--grad-accum", "0"], "--grad-accum"),
    (["--dpo-steps", "-5"], "--dpo-steps"),
    (["--beta", "0"], "--beta"), (["--beta", "-1"], "--beta"), (["--eps", "-1"], "--eps"),
    (["--eps", "2"], "--eps"), (["--temperature", "-1"], "--temperature"), (["--tau", "2"], "--tau"),
    (["--top-p", "0"], "--top-p"), (["--learn-lr", "nan"], "--learn-lr"), (["--dpo-lr", "inf"], "--dpo-lr"),
    (["--forget-lr", "0"], "--forget-lr"), (["--learn-ratio", "2"], "--learn-ratio"),
    (["--exclude-top", "0.5", "--forget-ratio", "0.6"], "--forget-ratio"),
    (["--dim", "30", "--n-heads", "4"], "--dim"),
    (["--device", "cuda:7"], "--device"),
])
def test_a_bad_flag_before_any_work(run, capsys, flags, expected):
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "sft", "--seed", "1", "--force"] + flags,
                  f"argument {expected}")


def test_select_masks_refuses_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        allo.select_masks({"w": torch.tensor([1.0, float("nan"), 2.0])}, 0.5)


def test_the_embedded_task_asked_for_with_other_settings(run, capsys):
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "sft", "--task-seed", "1"],
                  f"{run}/task: the task was written with seed 0, not 1", "--force")


# ----------------------------------------------------------------------------- torn checkpoints, the lock

@pytest.mark.parametrize("name,cut", [("model.safetensors", lambda n: 0), ("model.safetensors", lambda n: 7),
                                      ("model.safetensors", lambda n: n // 2),
                                      ("model.safetensors", lambda n: n - 1),
                                      ("optimizer.safetensors", lambda n: 20),
                                      ("optimizer.safetensors", lambda n: n // 2),
                                      ("optimizer.safetensors", lambda n: n - 1)])
def test_a_torn_checkpoint_falls_back_to_the_one_before(run, capsys, monkeypatch, tmp_path, name, cut):
    """A checkpoint file cut anywhere (a power loss: empty, inside the header, inside the data, one
    byte short) is skipped with one warning; the stage resumes from the one before and ends with the
    weights of an uninterrupted run."""
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "6", "--ckpt-every", "2"]
    train.main(args + ["--out", str(tmp_path / "straight")])
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(args + ["--force"])
    monkeypatch.undo()
    torn = os.path.join(run, "learn.tmp", "ckpt", "step-0000004", name)
    truncate(torn, cut(os.path.getsize(torn)))
    capsys.readouterr()
    train.main(args)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "step-0000004: cannot load" in out
    assert "learn: resumed from step 2/6" in out
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(
        os.path.join(run, "learn", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_per_output_directory(run, capsys):
    out = os.path.join(run, "dpo")
    held = runs.lock(out + ".lock")  # another process would hold it the same way
    try:
        fails(capsys, SMOKE + ["--run", run, "--stage", "dpo", "--force"],
              f"{out}: in use by process {os.getpid()}")
    finally:
        runs.unlock(*held)
    assert not os.path.exists(out + ".lock")


def test_a_second_process_stops_at_once(run):
    """Two processes: the one that comes second says who holds the output, and leaves the holder's
    unfinished work (<out>.tmp, no checkpoint yet) as it is."""
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); from bookkeeping import runs; "
            "runs.lock(sys.argv[2]); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, ROOT, os.path.join(run, "learn.lock")],
                              stdout=subprocess.PIPE, text=True)
    work = os.path.join(run, "learn.tmp")
    os.makedirs(work)
    with open(os.path.join(work, "fingerprint.json"), "w") as f:
        json.dump({"stage": "learn"}, f)  # the holder's stage, started, before its first checkpoint
    try:
        assert holder.stdout.readline().strip() == "held"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SMOKE, "--run", run, "--stage",
                            "learn", "--force"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        expected = (f"error: {run}/learn: in use by process {holder.pid} (lock {run}/learn.lock); "
                    "wait for it or stop it")
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [expected]
        assert os.listdir(work) == ["fingerprint.json"]
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_is_one_line_and_leaves_the_output_as_it_was(run, capsys, monkeypatch):
    import errno

    from model import Transformer

    def full(self, path, **config):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "model.safetensors"))

    monkeypatch.setattr(Transformer, "save_pretrained", full)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "learn", "--force"],
                  "error: No space left on device: ", "learn.tmp/model.safetensors")


def test_a_dpo_model_of_another_shape(run, capsys, tmp_path):
    from model import ModelConfig, Transformer
    other = tmp_path / "other"
    cfg = json.load(open(os.path.join(run, "sft", "config.json")))
    Transformer(ModelConfig(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=2, n_heads=2,
                            n_kv_heads=1, hidden_dim=64)).save_pretrained(str(other))
    args = ["--run", run, "--stage", "mask", "--dpo-model", str(other), "--out", str(tmp_path / "o")]
    fails_cleanly(capsys, run, SMOKE + args, f"{other}: the DPO model's parameters are not")


def test_a_stage_stopped_between_its_last_two_renames_is_finished(run, capsys):
    """finish() writes stage.json into <out>.tmp/, moves <out> aside and renames <out>.tmp/ to <out>:
    stopped between the renames, the next run completes the swap instead of training again."""
    out = os.path.join(run, "learn")
    os.replace(out, out + ".tmp")  # as if the old output had been moved aside and the process died
    capsys.readouterr()
    train.main(SMOKE + ["--run", run, "--stage", "learn"])
    assert "learn: finished earlier with these settings, skipped" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "stage.json")) and not os.path.exists(out + ".tmp")


def test_eval_and_study_errors_are_one_line(run, capsys, tmp_path):
    import eval as evaluation
    from study import study
    questions = os.path.join(run, "task", "test.jsonl")
    tok = os.path.join(run, "task", "tokenizer.model")
    for argv, expected in (([str(tmp_path / "nothing")], "no such directory"),
                           (["--questions", questions, "--tokenizer", tok, str(tmp_path)],
                            "cannot load the model"),
                           (["--questions", questions, str(tmp_path)], "--questions needs --tokenizer"),
                           (["--max-new-tokens", "0", run], "argument --max-new-tokens"),
                           ([os.path.join(run, "task")], "task: neither a run directory (run.json) nor")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            evaluation.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, (argv, err)
    (tmp_path / "not-a-model").mkdir()  # the study makes a missing SFT model from --model, as train.py does
    with pytest.raises(SystemExit) as e:
        study.main(["--run", str(tmp_path / "r"), "--preset", "smoke", "--model",
                    str(tmp_path / "not-a-model"), "--questions", questions, "--eval-questions", questions])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not-a-model" in err, err
    assert not os.path.exists(tmp_path / "r" / "run.json")  # the fresh run's record goes with the error
