"""Multi-process training: train.py under torchrun (2 CPU processes, gloo) against one process.

2 processes at --batch-size 2 see exactly the examples 1 process sees at --batch-size 4 (both with
--grad-accum 2, so micro-batches of different token counts are normalized together), so every
training stage must end with the same weights, up to float32 rounding. The learning rates are
raised so that a step moves weights by ~1e-3, far above the tolerance: a wrongly weighted
gradient flips the sign of Adam's first update somewhere. The 2 processes also recompute
activations (--grad-checkpoint), which must not change a gradient either.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from bookkeeping import trainlog
from data import Tokenizer, prompt_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --eps 1: key-token selection is a threshold, and float32 rounding that differs between 1 and 2
# processes (other padded lengths) can swap two near-tied tokens; allo's tests cover the selection
LR = ["--preset", "smoke", "--dpo-lr", "1e-3", "--learn-lr", "1e-3", "--forget-lr", "1e-3", "--eps", "1"]
ONE = LR + ["--batch-size", "4", "--grad-accum", "2"]  # 1 process: 8 examples per step
TWO = LR + ["--batch-size", "2", "--grad-accum", "2", "--grad-checkpoint"]  # each of 2 processes: 4 of the 8


def torchrun(*args):
    """train.py under torchrun with 2 processes on a free port -> CompletedProcess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """two: `--stage all` under torchrun, its SFT resumed from a 1-process checkpoint at step 2;
    one: SFT in 1 process; ref: every later training stage in 1 process on two's inputs."""
    two, one, ref = (tmp_path_factory.mktemp(name) for name in ("two", "one", "ref"))
    real_save = trainlog.save_checkpoint

    def save_then_die(ckpt_dir, step, *state):
        real_save(ckpt_dir, step, *state)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit):
        mp.setattr(trainlog, "save_checkpoint", save_then_die)
        train.main(ONE + ["--run", str(two), "--stage", "sft"])
    p = torchrun(*TWO, "--run-dir", str(two))
    assert p.returncode == 0, p.stderr
    train.main(ONE + ["--run", str(one), "--stage", "sft"])
    for f in ("run.json", "task", "sft", "sample", "mask"):
        (shutil.copytree if os.path.isdir(two / f) else shutil.copy)(two / f, ref / f)
    train.main(ONE + ["--run", str(ref), "--stage", "dpo"])
    train.main(ONE + ["--run", str(ref), "--stage", "rewriter"])
    scored = str(two / "rewriter" / "forget_weighted.jsonl")
    train.main(ONE + ["--run", str(ref), "--stage", "forget", "--data", scored])
    train.main(ONE + ["--run", str(ref), "--stage", "learn", "--model", str(two / "forget")])
    return {"two": two, "one": one, "ref": ref, "stdout": p.stdout}


def weights(d):
    return load_file(str(d / "model.safetensors"))


def losses(d):
    return [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]


def rows(path):
    return [json.loads(line) for line in open(path)]


def prompts_of(run, split):
    return [prompt_text(q["question"]) for q in rows(run / "task" / f"{split}.jsonl")]


# How far float32 rounding may move a weight: a tenth of one Adam step at the smallest peak rate
# trained here (1e-3). Two processes sum a gradient in another order than one (and each CPU kind's
# kernels in another order again), and Adam divides each entry by its own magnitude: where the
# gradient nearly cancels (a prompt token's embedding under DPO, pushed up by the chosen row and
# down by the rejected one), a rounding difference becomes a visible fraction of a step. Measured
# on the dpo stage's embeddings: 0.6% of a step with AVX2 kernels, 1.2% and 2.0% on an Intel Xeon
# (AVX-512; AVX2 forced), 1.5% with baseline x86-64 kernels (ATEN_CPU_CAPABILITY=default,
# MKL_ENABLE_INSTRUCTIONS=SSE4_2). A wrongly weighted or sharded gradient moves entries by a
# whole step, and by 2 steps where Adam's sign flips.
WEIGHT_TOL = 1e-4


def assert_same_training(a, b):
    """Same final weights (to WEIGHT_TOL) and per-step losses (to 1e-5 relative; measured: 4e-7 at
    most), up to float32 rounding."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=WEIGHT_TOL, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(losses(a), losses(b), rtol=1e-5, atol=0)


def test_two_processes_resume_a_checkpoint_and_match_one_process_sft(runs):
    assert "sft: resumed from step 2/4" in runs["stdout"]
    assert_same_training(runs["two"] / "sft", runs["one"] / "sft")
    assert len(losses(runs["two"] / "sft")) == 4  # steps 1-2 of the killed run, 3-4 under torchrun


@pytest.mark.parametrize("stage", ["dpo", "rewriter", "forget", "learn"])
def test_two_processes_match_one_process(runs, stage):
    assert_same_training(runs["two"] / stage, runs["ref"] / stage)
    start, end = weights(runs["two"] / "sft"), weights(runs["two"] / stage)
    assert any(not torch.equal(start[k], end[k]) for k in start), "the stage moved no weight"


def test_only_rank_0_writes_and_prints(runs):
    out = runs["stdout"]
    for stage in train.STAGES:
        assert out.count(f"{stage}: done in") == 1
    assert out.count("| SFT |") == 1
    assert len(losses(runs["two"] / "dpo")) == 2  # one row per step, not one per process
    assert not [f for _, _, fs in os.walk(runs["two"]) for f in fs if f.endswith(".tmp")]
    assert os.path.exists(runs["two"] / "eval_test.json")


def test_masked_stages_keep_frozen_entries_bit_identical_under_two_processes(runs):
    two = runs["two"]
    for stage, start, mask in (("forget", "sft", "forget"), ("learn", "forget", "learn")):
        before, after = weights(two / start), weights(two / stage)
        masks = load_file(str(two / "mask" / f"{mask}.safetensors"))
        moved = 0
        for name, m in masks.items():
            a, b = before["model." + name], after["model." + name]
            assert torch.equal(a[~m], b[~m]), f"{stage}: frozen entries of {name} changed"
            moved += int((a[m] != b[m]).sum())
        assert moved > 0


def test_sample_under_two_processes_has_every_question_in_order(runs):
    """The 4-step SFT model answers every question wrong: each question must bring its wrong samples."""
    two = runs["two"]
    for split in ("train", "val", "test"):
        pairs_file = "pairs.jsonl" if split == "train" else f"{split}_pairs.jsonl"
        pairs = rows(two / "sample" / pairs_file)
        assert list(dict.fromkeys(p["prompt"] for p in pairs)) == prompts_of(two, split)
        assert all(p["chosen"] and p["rejected"] for p in pairs)
    forget = rows(two / "sample" / "forget.jsonl")
    assert list(dict.fromkeys(r["prompt"] for r in forget)) == prompts_of(two, "train")
    per_question = [sum(r["prompt"] == q for r in forget) for q in prompts_of(two, "train")]
    assert all(1 <= n <= 2 for n in per_question)  # --k 2 samples, duplicates dropped


def test_rewriter_scores_under_two_processes_every_row_in_order(runs):
    two, ref = runs["two"], runs["ref"]
    forget = rows(two / "sample" / "forget.jsonl")
    scored = rows(two / "rewriter" / "forget_weighted.jsonl")
    tok = Tokenizer(str(two / "task" / "tokenizer.model"))
    assert [(r["prompt"], r["response"]) for r in scored] == [(r["prompt"], r["response"]) for r in forget]
    for r in scored:
        assert len(r["weights"]) == len(r["probs"]) == len(tok.encode(r["response"]))
    one_process = rows(ref / "rewriter" / "forget_weighted.jsonl")
    torch.testing.assert_close([p for r in scored for p in r["probs"]],
                               [p for r in one_process for p in r["probs"]], rtol=1e-4, atol=1e-6)


def test_grad_accum_2_equals_one_micro_batch_twice_as_big(runs, tmp_path):
    train.main(LR + ["--run", str(tmp_path), "--stage", "sft", "--batch-size", "8", "--grad-accum", "1"])
    assert_same_training(runs["one"] / "sft", tmp_path / "sft")


def test_error_under_torchrun_is_one_line_and_does_not_hang(tmp_path):
    """Weights (or a loss) that turn non-finite mid-training stop every process: the loss is all-reduced
    and every process steps the same weights."""
    p = torchrun("--preset", "smoke", "--stage", "sft", "--sft-lr", "1e30", "--run-dir", str(tmp_path))
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr
    assert "sft: non-finite weights after step" in errors[0] or "sft: loss is" in errors[0], errors
    # torchrun's report: the first process to fail exited with status 2, no process was aborted by
    # gloo's teardown (torchrun may stop the other with SIGTERM once the first has exited)
    assert "exitcode  : 2" in p.stderr.split("Root Cause")[-1] and "SIGABRT" not in p.stderr
    assert not os.path.exists(tmp_path / "sft" / "stage.json")


def test_process_group_is_left_after_the_error_is_freed(tmp_path, monkeypatch):
    """An error's traceback holds fit()'s frame, and under torchrun the DDP wrapper in it references
    the process group: leaving the group while the traceback lives let gloo abort at exit (SIGABRT)."""
    handling = []
    monkeypatch.setattr(train.parallel, "shutdown", lambda: handling.append(sys.exc_info()[0]))
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--stage", "sft", "--sft-lr", "1e30", "--run-dir", str(tmp_path)])
    assert e.value.code == 2 and handling == [None]


def test_shutdown_frees_cyclic_garbage_before_leaving_the_group(monkeypatch):
    """A DistributedDataParallel wrapper sits in reference cycles: freed only by the collector. If
    the collector ran after destroy_process_group (at exit), the wrapper's reducer met a destroyed
    gloo group and the process aborted (SIGABRT, 1 run in 3 under load)."""
    import gc
    import weakref

    class Wrapper:  # stands in for DDP: unreachable, but alive until the collector runs
        pass

    w = Wrapper()
    w.self = w
    alive = weakref.ref(w)
    del w
    seen = []
    monkeypatch.setattr(train.parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.parallel.dist, "destroy_process_group", lambda: seen.append(alive() is None))
    gc.disable()
    try:
        train.parallel.shutdown()
    finally:
        gc.enable()
    assert seen == [True]
