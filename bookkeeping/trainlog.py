"""What a training stage leaves behind as it goes: metrics rows, progress lines and checkpoints.

trainer.fit hands each finished step to one TrainLog: every step's loss and learning rate go to
<out>/metrics.jsonl (written at each progress line and checkpoint, with the tokens/s of that step),
a progress line every log_every steps, and a checkpoint every ckpt_every steps (where ckpt_minutes
is set, at most one per ckpt_minutes, the first too counted from the start) into <out>/ckpt/, the
two newest kept; each checkpoint holds the metrics rows up to its step. When the stage runs again,
TrainLog.resume loads the newest checkpoint that loads and puts its rows back as
<out>/metrics.jsonl, so a log torn by a kill mid-append costs nothing. Rank 0 alone writes and
prints.
"""

import json
import os
import shutil
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import allo
from bookkeeping import parallel
from bookkeeping.fileio import atomic_path, replace_dir
from bookkeeping.runs import checkpoints, one_line, writing


class TrainLog:
    """The metrics, progress lines and checkpoints of one stage's `steps` optimizer steps in `out`."""

    def __init__(self, stage, out, steps, log_every, ckpt_every, ckpt_minutes=0.0):
        self.stage, self.out, self.steps = stage, out, steps
        self.log_every, self.ckpt_every, self.ckpt_seconds = log_every, ckpt_every, 60 * ckpt_minutes
        self.last_ckpt = time.monotonic()  # of the last checkpoint, or the start: the first waits as long
        self.ckpt_dir = os.path.join(out, "ckpt")
        self.start, self.tokens, self.losses, self.rows = 0, 0, [], []  # rows: the metrics not yet written
        self.stats = []  # each step's statistics since the last progress line
        self.history = []  # every step's row so far: each checkpoint keeps a copy
        self.t0 = time.time()

    def resume(self, model, opt):
        """Load the newest checkpoint into model and opt; returns its step (0: none). metrics.jsonl
        becomes the checkpoint's rows; the steps after it will be logged again."""
        self.start = resume(self.ckpt_dir, model, opt)
        if self.start:
            print(f"{self.stage}: resumed from step {self.start}/{self.steps}")
        if parallel.is_main():
            kept = os.path.join(self.ckpt_dir, f"step-{self.start:07d}", "metrics.jsonl")
            self.history = trim_metrics(os.path.join(self.out, "metrics.jsonl"), self.start,
                                        kept if self.start else None)
        self.t0, self.last_ckpt = time.time(), time.monotonic()
        return self.start

    def step(self, done, loss, lr, tokens, model, opt, stats=None):
        """Step `done` (1-based) finished with this loss, learning rate, global token count and
        statistics (trainer.fit's: DPO's rewards, NPO's log-ratio; written with the loss)."""
        self.tokens += tokens
        self.losses.append(loss)
        self.stats.append(stats or {})
        self.rows.append({"stage": self.stage, "step": done, "loss": loss, "lr": lr, **(stats or {})})
        self.history.append(self.rows[-1])
        checkpoint = (done % self.ckpt_every == 0 and done < self.steps
                      and time.monotonic() - self.last_ckpt >= self.ckpt_seconds)
        line = done % self.log_every == 0 or done == self.steps
        if line or checkpoint:
            self.rows[-1]["tokens_per_s"] = self.tokens / (time.time() - self.t0)
            self.rows = write_metrics(self.out, self.rows)
        if line:
            log_progress(self.stage, done, self.steps, sum(self.losses) / len(self.losses), lr, self.tokens,
                         time.time() - self.t0, done - self.start, self.stats)
            self.losses, self.stats = [], []
        if checkpoint and parallel.is_main():
            save_checkpoint(self.ckpt_dir, done, model, opt, self.history)
            self.last_ckpt = time.monotonic()

    def last_good(self):
        """Where a rerun resumes from, in words: the newest checkpoint, or the start."""
        found = checkpoints(self.ckpt_dir)
        return f"the last good checkpoint is {found[-1]}" if found else \
            "no checkpoint yet: a rerun starts over"

    def last_step(self):
        """The step a rerun resumes from: the newest checkpoint's, or 0."""
        found = checkpoints(self.ckpt_dir)
        return step_of(found[-1]) if found else 0


def step_of(checkpoint):
    """The step of a checkpoint directory <ckpt>/step-N."""
    return int(os.path.basename(checkpoint).split("-")[1])


def write_metrics(out, rows):
    """Append rows to out/metrics.jsonl (rank 0); returns an empty list for the rows to come."""
    if parallel.is_main():
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return []


def trim_metrics(path, step, kept=None):
    """Rewrite out/metrics.jsonl as the rows of steps <= step (those before the checkpoint resumed
    from): the checkpoint's own copy `kept` where it has one, else the log's rows. A line of the log
    that is not a whole row (the tail of an append a kill cut short, or an edit) is dropped with one
    warning: a log never costs the training it logs. Returns the rows kept."""
    logged, torn = [], []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                row = metrics_row(line)
                if row is None:
                    torn.append(n)
                elif row["step"] <= step:
                    logged.append(row)
    if torn:
        print(f"warning: {path}: line {torn[0]} is not a whole metrics row ({len(torn)} such line(s) "
              "dropped); the rows up to the checkpoint are kept", flush=True)
    if kept is not None and os.path.exists(kept):
        with open(kept, "rb") as f:
            rows = [metrics_row(line) for line in f]
        if None not in rows:  # the checkpoint's copy, whole as the checkpoint is
            logged = rows
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in logged)
    return logged


def metrics_row(line):
    """A metrics.jsonl line as its row, or None when it is not a whole row with an integer step."""
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return row if isinstance(row, dict) and type(row.get("step")) is int else None


SHOWN = (("reward_accuracy", "acc", "{:.2f}"), ("reward_margin", "margin", "{:+.3f}"),
         ("kept_share", "kept", "{:.2f}"), ("weighted_logratio", "logratio", "{:+.3f}"),
         ("weighted_share", "weighted", "{:.2f}"))  # statistics on the progress line: name, label, format


def log_progress(stage, done, steps, loss, lr, tokens, elapsed, steps_run, stats=()):
    """The progress line: the mean loss since the last line, lr, tokens/s over the run, ETA, and the
    means since the last line of the statistics in SHOWN that the steps have."""
    eta = (steps - done) * elapsed / steps_run
    shown = "".join(f" {label} " + fmt.format(sum(s[name] for s in stats) / len(stats))
                    for name, label, fmt in SHOWN if stats and all(name in s for s in stats))
    print(f"{stage} {done}/{steps} loss {loss:.4f}{shown} lr {lr:.2e} tok/s {tokens / elapsed:,.0f} "
          f"eta {eta:.0f}s", flush=True)


def save_checkpoint(ckpt_dir, step, model, opt, rows=()):
    """<ckpt>/step-N/{model, optimizer}.safetensors and metrics.jsonl (`rows`: the metrics of steps
    1..N), written into a temporary directory, flushed to disk and renamed when complete; the two
    newest are kept (a torn one falls back to the other)."""
    name = f"step-{step:07d}"
    tmp = os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with writing(tmp), atomic_path(os.path.join(tmp, "model.safetensors")) as path:
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, path)
        allo.save_optimizer(os.path.join(tmp, "optimizer.safetensors"), opt)
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    replace_dir(tmp, os.path.join(ckpt_dir, name))
    for old in checkpoints(ckpt_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def resume(ckpt_dir, model, opt):
    """Load the newest checkpoint that loads (a torn one, e.g. after a power loss, is skipped with a
    warning for the one before); returns its step, 0 when there is none."""
    params = dict(model.named_parameters())
    for path in reversed(checkpoints(ckpt_dir)):
        try:
            weights = load_file(os.path.join(path, "model.safetensors"))  # read before anything is written
            if {n: w.shape for n, w in weights.items()} != {n: p.shape for n, p in params.items()}:
                raise ValueError("its weights are not the model's")
            allo.load_optimizer(os.path.join(path, "optimizer.safetensors"), opt)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[n])
            return step_of(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            print(f"warning: {path}: cannot load ({one_line(e)}); trying the checkpoint before it",
                  flush=True)
    return 0
