"""The training machinery of every ALLO stage: one resumable loop, the per-batch losses, the cached
reference log-probs. It knows no stage and no task: a stage hands fit() a model, its masks, a
function that builds micro-batch i and a function that turns a micro-batch into its loss.

Under torchrun (parallel.py) each of N processes takes its contiguous --batch-size share of a
global micro-batch of N x --batch-size examples, and every loss is normalized over the whole
optimizer step (Norms), so N processes at batch b train exactly like one process at batch N*b.
"""

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, astuple, dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import allo
import parallel
from data import DataError, TokenizerFile, atomic_path, collate, replace_dir, write_json
from model import Transformer, autocast


class UsageError(Exception):
    """A missing prerequisite or an input that does not fit: one line, exit status 2."""


@dataclass
class TrainConfig:
    """How every training stage trains (train.py's optimization flags)."""
    batch_size: int = 32  # examples (or pairs) per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # AdamW's, on parameters with >= 2 dims
    warmup_frac: float = 0.1  # linear warmup over this fraction of the steps, then cosine decay to 0
    max_len: int = 128  # tokens of prompt + response
    log_every: int = 50  # a progress line every N steps
    ckpt_every: int = 100  # a checkpoint every N steps
    grad_checkpoint: bool = False  # recompute each block in backward: less activation memory
    compile: bool = False  # torch.compile the training forward (and backward)
    seed: int = 0  # the batch order


@dataclass
class Norms:
    """The denominators of one optimizer step's loss. A micro-batch carries its own counts; fit()
    sums them over the step's micro-batches on every process and hands the sums to the loss, so
    the micro-batch losses add up to the loss of the whole step."""
    pairs: int = 0  # DPO: preference pairs
    chosen_tokens: int = 0  # DPO's optional NLL term: response targets of the chosen side
    scored_tokens: int = 0  # SFT: response targets
    weighted_tokens: int = 0  # NPO: targets with w_t != 0


# ----------------------------------------------------------------------------- a stage's output

class StageOutput:
    """Where a stage writes, and the checks around it. Use: `with StageOutput(...) as so:`.

    - One process per output: a lock on <out>.lock (fcntl.flock, released by the OS if the process
      dies); a second process stops at once with one line naming the holder's pid.
    - Nothing half-written: the stage writes into <out>.tmp/ (its checkpoints, metrics.jsonl, its
      files), which finish() renames to <out>, so <out> is the previous result or the whole new one.
      A failure leaves <out> as it was; <out>.tmp/ stays only if it holds a checkpoint to resume.
    - A fingerprint (the stage, its settings, an identity of each input file or model, see
      input_id) in <out>.tmp/fingerprint.json and in stage.json: a finished stage with the same
      fingerprint is skipped (so.finished, so.info); with another it is an error unless force; a
      checkpoint resumes only under the same fingerprint (force starts over).
    Rank 0 checks and writes; every process learns the outcome.
    """

    def __init__(self, stage, out, settings, inputs, device, force=False):
        self.stage, self.out, self.work, self.device, self.force = stage, out, out + ".tmp", device, force
        self.fingerprint = json.loads(json.dumps({"stage": stage, **settings,
                                                  "inputs": {k: input_id(v) for k, v in inputs.items()}}))
        self.finished, self.info, self.t0, self.lock = False, None, time.time(), None
        self.created = []  # parent directories this stage made, removed again if it fails

    def __enter__(self):
        code = 0  # 0: train, 1: finished earlier, 2: rank 0 stopped with an error
        if parallel.is_main():
            try:
                code = self.prepare()
            except BaseException:
                parallel.all_reduce_sum(torch.tensor([2], device=self.device))
                self.cleanup()
                raise
        code = int(parallel.all_reduce_sum(torch.tensor([code], device=self.device)))
        if code == 2:
            raise UsageError(f"{self.stage}: stopped (rank 0 says why)")
        if code == 1:
            self.finished = True
            with open(os.path.join(self.out, "stage.json")) as f:
                self.info = json.load(f)
            print(f"{self.stage}: finished earlier with these settings, skipped (--force redoes it) -> "
                  f"{self.out}")
        return self

    def prepare(self):
        """Rank 0: lock, then 1 if the stage is finished with this fingerprint, else 0 with a work
        directory ready (kept for resuming, or new)."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"{self.out}: the stage's output is a file, not a directory")
        parent = os.path.dirname(os.path.abspath(self.out))
        while not os.path.exists(parent):  # remember what we make, to remove it if we fail
            self.created.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        self.lock = lock(self.out + ".lock")
        swapped = read_json(os.path.join(self.work, "stage.json"))  # finished, but stopped before the rename
        if swapped is not None and swapped.get("fingerprint") == self.fingerprint and not self.force:
            replace_dir(self.work, self.out)
            return 1
        unfinished = read_json(os.path.join(self.work, "fingerprint.json"))
        if unfinished == self.fingerprint and not self.force:
            return 0  # resume it (also a redo that --force started, over a finished output)
        done = read_json(os.path.join(self.out, "stage.json"))
        if done is not None and not self.force:
            if done.get("fingerprint") == self.fingerprint:
                return 1
            raise UsageError(f"{self.out}: finished earlier with "
                             f"{difference(done.get('fingerprint'), self.fingerprint)}; --force redoes it")
        if os.path.isdir(self.work) and not self.force:
            raise UsageError(f"{self.work}: holds an unfinished run with "
                             f"{difference(unfinished, self.fingerprint)}; --force starts over")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        write_json(os.path.join(self.work, "fingerprint.json"), self.fingerprint)
        return 0

    def finish(self, model=None, **info):
        """Save the stage's model (Hugging Face layout) if it has one and, last, stage.json (with the
        fingerprint, an id for the stages after it, and on CUDA the peak allocated memory); then
        <out>.tmp/ becomes <out>. Rank 0 writes; every process returns once it is there."""
        info = {"stage": self.stage, "wall_s": time.time() - self.t0, **info}
        if self.device.type == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if parallel.is_main():
            if model is not None:
                model.save_pretrained(self.work)
            shutil.rmtree(os.path.join(self.work, "ckpt"), ignore_errors=True)
            os.remove(os.path.join(self.work, "fingerprint.json"))
            write_json(os.path.join(self.work, "stage.json"),
                       {**info, "id": uuid.uuid4().hex, "fingerprint": self.fingerprint})
            replace_dir(self.work, self.out)
        memory = f", peak memory {info['peak_memory_gib']:.2f} GiB" if self.device.type == "cuda" else ""
        print(f"{self.stage}: done in {info['wall_s']:.0f}s{memory} -> {self.out}")
        parallel.barrier()
        self.info = info
        return info

    def __exit__(self, kind, error, trace):
        if parallel.is_main():
            self.cleanup(failed=kind is not None)
        return False

    def cleanup(self, failed=True):
        """Rank 0: on a failure remove what holds nothing to resume; release the lock."""
        if failed:
            if not checkpoints(os.path.join(self.work, "ckpt")):
                shutil.rmtree(self.work, ignore_errors=True)
            for folder in self.created:
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
        if self.lock is not None:
            unlock(*self.lock)
            self.lock = None


def lock(path):
    """(fd, path) holding an exclusive flock on path, which records our pid; UsageError naming the
    holder when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{path[:-5]}: in use by process {holder} (lock {path}); wait for it or stop it")
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked meanwhile
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd, path
        os.close(fd)


def unlock(fd, path):
    os.unlink(path)  # while still holding it: a process waiting on the old file sees it is gone
    os.close(fd)


def read_json(path):
    """The JSON object of path, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def difference(old, new):
    """The first setting in which two fingerprints differ, as words."""
    if not isinstance(old, dict):
        return "no record of its settings"
    for key in list(new) + [k for k in old if k not in new]:
        if key == "inputs":
            for name in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
                if old.get("inputs", {}).get(name) != new["inputs"].get(name):
                    return f"another {name} (input)"
        elif old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r}, not {new.get(key)!r}" if key != "stage" else \
                f"stage {old.get(key)!r}, not {new.get(key)!r}"
    return "the same settings"


def input_id(path):
    """What stands for an input in a fingerprint: None; for a directory or file written by a stage,
    that stage's id (from its stage.json) and the file's name; otherwise a content hash (of the
    whole file up to 256 MiB, else of its size and first and last MiB; a directory: of its files).
    A TokenizerFile: its file's id and the special tokens it names; a list: each item's id."""
    if path is None:
        return None
    if isinstance(path, (list, tuple)):
        return [input_id(p) for p in path]
    if isinstance(path, TokenizerFile):
        return [input_id(path.path), path.bos, path.eos, path.pad]
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    made = read_json(os.path.join(folder, "stage.json"))
    if made and "id" in made:
        return made["id"] + ("" if folder == path else "/" + os.path.basename(path))
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        listing = "".join(f"{n}:{file_hash(os.path.join(path, n))}" for n in files)
        return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    return "sha256:" + file_hash(path)


def file_hash(path, whole=256 * 2**20, edge=2**20):
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= whole:
            while chunk := f.read(2**24):
                h.update(chunk)
        else:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge) + str(size).encode())
    return h.hexdigest()


def train_settings(cfg):
    """The settings of TrainConfig that change a stage's result: not the logging, checkpointing,
    recomputation or compilation, and the global micro-batch rather than the per-process one (N
    processes at batch b train like one at N*b, so a checkpoint resumes under any number)."""
    ignored = ("log_every", "ckpt_every", "grad_checkpoint", "compile", "batch_size")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    return {**settings, "global_batch": cfg.batch_size * parallel.world()}


# ----------------------------------------------------------------------------- a stage's inputs

def load_model(path, device, tok=None):
    """A Hugging Face Llama directory on `device`, checked: loadable, every weight finite, a
    vocabulary that holds the tokenizer's. Any problem is one UsageError naming the path."""
    try:
        model = Transformer.from_pretrained(path).to(device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise UsageError(f"{path}: cannot load the model: {one_line(e)}") from None
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"{path}/config.json: vocab_size {model.cfg.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size}")
    bad = {n: int((~torch.isfinite(p)).sum()) for n, p in model.named_parameters()}
    if any(bad.values()):
        first = next(n for n, k in bad.items() if k)
        raise UsageError(f"{path}: {sum(bad.values()):,} non-finite weights (the first in {first})")
    return model


def one_line(error):
    text = getattr(error, "strerror", None) and f"{error.strerror}: {error.filename}" or str(error)
    return " ".join(text.split())[:200] or type(error).__name__


def load_masks(path, model):
    """The masks of `path` (safetensors, parameter name -> a bool tensor, or exact 0/1 values, of the
    parameter's shape; a parameter without a mask is frozen), checked against the model; None: every
    parameter trained. Any problem is one UsageError naming the path."""
    if path is None:
        return full_masks(model)
    try:
        masks = allo.load_masks(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise UsageError(f"{path}: not a mask file: {one_line(e)}") from None
    if not masks:
        raise UsageError(f"{path}: holds no mask")
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params or m.shape != params[name].shape:
            got = tuple(params[name].shape) if name in params else "no such parameter"
            raise UsageError(f"{path}: mask {name!r} of shape {tuple(m.shape)} does not fit the model "
                             f"({got})")
        if m.dtype != torch.bool:
            odd = m[(m != 0) & (m != 1)]
            if odd.numel():
                raise UsageError(f"{path}: mask {name!r} ({m.dtype}) holds {odd[0].item()!r}: a mask is "
                                 "bool, or exact 0 and 1")
    return {n: m.to(device=params[n].device, dtype=torch.bool) for n, m in masks.items()}


def check_lengths(stage, tok, prompts, responses, max_len, where):
    """Before training: a row whose prompt leaves no room for a response token in max_len is an
    error naming where(i) ("path:line"); rows whose response is cut are counted in one warning."""
    cut, first = 0, None
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt = len(tok.encode(p))
        if n_prompt + 2 > max_len:  # BOS + prompt + at least one response target
            raise DataError(f"{where(i)}: the prompt has {n_prompt} tokens; --max-len {max_len} leaves no "
                            "room for its response")
        if n_prompt + len(tok.encode(r)) + 2 > max_len:  # BOS + prompt + response + EOS
            cut, first = cut + 1, first or where(i)
    if cut:
        print(f"{stage}: warning: {cut} of {len(prompts)} rows longer than --max-len {max_len}, their "
              f"responses cut (the first: {first})", flush=True)


def need(path, stage):
    if not os.path.exists(path):
        raise UsageError(f"{path}: not found; run `python train.py --stage {stage}` first (or pass it as a "
                         "flag)")
    return path


# ----------------------------------------------------------------------------- the loop

def fit(stage, model, masks, batch_at, loss_fn, out, *, steps, lr, cfg):
    """Train `model` for `steps` optimizer steps with MaskedAdamW on `masks` (all-True masks train
    every parameter) and return it.

    batch_at(i) -> micro-batch i of this process, a dict with "attention_mask" and "norms";
    loss_fn(net, batch, norms) -> that micro-batch's share of the loss of the step.
    Dense gradients are clipped to norm 1.0 before the masked update (as the release); the
    learning rate warms up linearly, then decays on a cosine. A progress line (loss, lr, global
    tokens/s, ETA) every cfg.log_every steps, appended to out/metrics.jsonl; a checkpoint every
    cfg.ckpt_every steps into out/ckpt/, resumed from when the stage runs again. A non-finite loss
    stops every process (the loss is all-reduced) with a UsageError.
    """
    device = next(model.parameters()).device
    model.grad_checkpointing = cfg.grad_checkpoint
    opt = allo.MaskedAdamW(model.named_parameters(), masks, lr=lr, weight_decay=cfg.weight_decay)
    trained = [p for p in model.parameters() if p in opt.state]
    ckpt_dir = os.path.join(out, "ckpt")
    start = resume(ckpt_dir, model, opt)
    if start:
        print(f"{stage}: resumed from step {start}/{steps}")
    if parallel.is_main():
        trim_metrics(os.path.join(out, "metrics.jsonl"), start)  # rows after the checkpoint are logged again
    # forward and backward through DDP (gradients all-reduced); optimizer and checkpoints use `model`
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if parallel.world() > 1 else None
    net = ddp or model
    if cfg.compile:
        net = torch.compile(net)  # compiled on the first batch, again when a new shape needs it
    t0, tokens, losses = time.time(), 0, []
    for step in range(start, steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, cfg.warmup_frac)
        batches = [batch_at(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]  # this process's
        step_loss, step_tokens = backward(net, ddp, batches, loss_fn, device)
        if not math.isfinite(step_loss):
            raise UsageError(f"{stage}: loss is {step_loss} at step {step + 1}; stopped, "
                             f"{last_good(ckpt_dir)} (lower the learning rate?)")
        tokens += step_tokens
        losses.append(step_loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not all_finite(trained):  # before any checkpoint or final file holds them
            raise UsageError(f"{stage}: non-finite weights after step {step + 1}; stopped, "
                             f"{last_good(ckpt_dir)} (lower the learning rate?)")
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            log_progress(stage, out, done, steps, sum(losses) / len(losses), opt.param_groups[0]["lr"],
                         tokens, time.time() - t0, done - start)
            losses = []
        if done % cfg.ckpt_every == 0 and done < steps and parallel.is_main():
            save_checkpoint(ckpt_dir, done, model, opt)
    return model


def backward(net, ddp, batches, loss_fn, device):
    """The gradients of one optimizer step, from this process's micro-batches; returns the step's
    loss and its real tokens, summed over every process."""
    norms = step_norms([b["norms"] for b in batches], device)
    stats = torch.tensor([0.0, sum(int(b["attention_mask"].sum()) for b in batches)],
                         dtype=torch.float64, device=device)  # [loss share, tokens] of this process
    for j, b in enumerate(batches):
        # DDP all-reduces the gradients once, after the step's last micro-batch
        with nullcontext() if ddp is None or j == len(batches) - 1 else ddp.no_sync():
            loss = loss_fn(net, b, norms)
            (loss * parallel.world()).backward()  # DDP averages over processes: the loss is a share
        stats[0] += loss.detach()
    step_loss, step_tokens = parallel.all_reduce_sum(stats).tolist()
    return step_loss, step_tokens


def all_finite(tensors):
    """Every entry finite: the largest |x| of each tensor (one multi-tensor op) checked at once."""
    return not tensors or bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all())


def last_good(ckpt_dir):
    """Where a rerun resumes from, in words: the newest checkpoint, or the start."""
    found = checkpoints(ckpt_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint yet: a rerun starts over"


def trim_metrics(path, step):
    """Keep the metrics rows of steps <= step (those before the checkpoint resumed from)."""
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(rows)


def step_norms(norms, device):
    """The Norms of a step: this process's micro-batches summed, then summed over processes."""
    total = torch.tensor([astuple(n) for n in norms], device=device).sum(0)
    return Norms(*parallel.all_reduce_sum(total).tolist())


def log_progress(stage, out, done, steps, loss, lr, tokens, elapsed, steps_run):
    row = {"stage": stage, "step": done, "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed}
    eta = (steps - done) * elapsed / steps_run
    print(f"{stage} {done}/{steps} loss {loss:.4f} lr {lr:.2e} tok/s {row['tokens_per_s']:,.0f} "
          f"eta {eta:.0f}s", flush=True)
    if parallel.is_main():
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def lr_factor(step, n_steps, warmup_frac):
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (the release's schedule)."""
    warm = max(1, int(warmup_frac * n_steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n_steps - warm)))


def batch_indices(n, batch, i, seed):
    """Example indices of micro-batch i: epoch e = a fixed permutation from (seed, e), so the batch
    order is a function of (seed, step) and a resumed run sees what an uninterrupted one sees."""
    batch = min(batch, n)
    per_epoch = n // batch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + i // per_epoch))
    k = i % per_epoch
    return perm[k * batch:(k + 1) * batch].tolist()


def rank_batch(n, i, cfg):
    """This process's example indices of micro-batch i: its contiguous slice of the global
    micro-batch batch_indices(n, cfg.batch_size * world, i, cfg.seed), so N processes at batch b
    see exactly what one process sees at batch N * b."""
    if n < parallel.world():
        raise UsageError(f"{n} examples cannot be shared by {parallel.world()} processes")
    idx = batch_indices(n, cfg.batch_size * parallel.world(), i, cfg.seed)
    return idx[parallel.shard(len(idx))]


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt_dir, step, model, opt):
    """<ckpt>/step-N/{model, optimizer}.safetensors, written into a temporary directory, flushed to
    disk and renamed when complete; the two newest are kept (a torn one falls back to the other)."""
    name = f"step-{step:07d}"
    tmp = os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with atomic_path(os.path.join(tmp, "model.safetensors")) as path:
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, path)
    allo.save_optimizer(os.path.join(tmp, "optimizer.safetensors"), opt)
    replace_dir(tmp, os.path.join(ckpt_dir, name))
    for old in checkpoints(ckpt_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(ckpt_dir):
    """The complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [os.path.join(ckpt_dir, d) for d in sorted(os.listdir(ckpt_dir)) if d.startswith("step-")
            and not d.endswith((".tmp", ".old"))]


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
            return int(os.path.basename(path).split("-")[1])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            print(f"warning: {path}: cannot load ({one_line(e)}); trying the checkpoint before it",
                  flush=True)
    return 0


# ----------------------------------------------------------------------------- masks

def full_masks(model):
    """All-True masks: MaskedAdamW then trains every parameter, at AdamW's cost."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def trained_fraction(masks, model=None):
    """The fraction of entries the masks train: of the model's parameters (a parameter without a
    mask is frozen), or without a model of the entries the masks cover."""
    total = sum(t.numel() for t in (model.parameters() if model is not None else masks.values()))
    return sum(int(m.sum()) for m in masks.values()) / total


# ----------------------------------------------------------------------------- per-batch losses

def forward_logps(model, batch, device, amp=autocast):
    """Per-token log-probs [B,T] of the batch's labels (0 off-target), the forward under amp(device).

    collate() pads on the right, so causal attention alone gives every real position exactly the
    logits it has unpadded (padding only follows it): no attention mask is passed, which lets
    scaled_dot_product_attention use its fused kernels."""
    with amp(device):
        logits = model(batch["input_ids"].to(device))  # [B,T,V]
    return allo.token_logps(logits, batch["labels"].to(device))


def sft_batch_loss(model, b, norms, device, amp=autocast):
    """SFT (the starting point, and the rewriter): cross-entropy of the micro-batch's response
    tokens, its share of the mean over the step's scored tokens."""
    with amp(device):
        logits = model(b["input_ids"].to(device))  # [B,T,V], right-padded: see forward_logps
    return allo.sft_loss(logits, b["labels"].to(device), normalizer=norms.scored_tokens)


def dpo_batch_loss(model, b, norms, device, beta, eps, nll=0.0, amp=autocast):
    """DPO with key tokens on a micro-batch of pairs, rows [chosen; rejected] [2B,T]: its share of
    the mean over the step's pairs, plus nll x the NLL of the chosen tokens over the step's chosen
    tokens (RPO-style, optional). eps < 1: the rejected side counts through its ceil(eps * T) key
    tokens (Stage 3); eps 1 is vanilla DPO (the warmup)."""
    logps = forward_logps(model, b, device, amp)  # [2B,T]
    (pc, pr), (rc, rr) = logps.chunk(2), b["ref"].to(device).chunk(2)
    keep = allo.key_token_mask((pr - rr).detach(), b["labels"].chunk(2)[1].to(device) != -100, eps)
    loss = allo.dpo_loss(pc, pr, rc, rr, beta, keep)[0].sum() / norms.pairs
    return loss - nll * pc.sum() / norms.chosen_tokens if nll else loss


def npo_batch_loss(model, b, norms, device, beta, amp=autocast):
    """Token-level NPO (Stage 2) on the micro-batch's weighted tokens, its share of the mean over
    the step's weighted tokens."""
    logps = forward_logps(model, b, device, amp)  # [B,T]
    return allo.npo_token_loss(logps, b["ref"].to(device), b["weights"].to(device), beta,
                               normalizer=norms.weighted_tokens)


def n_scored(labels):
    """Number of scored targets (labels != -100)."""
    return int((labels != -100).sum())


# ----------------------------------------------------------------------------- reference log-probs and pairs

@torch.no_grad()
def reference_logps(ref, tok, prompts, responses, max_len, device, batch_size=64, amp=autocast):
    """Per-example 1-D tensors of the reference's per-token log-probs on the response targets,
    computed once and cached for the whole stage (no second model kept in memory during training).
    Each process computes its contiguous share of the examples; every process gets them all."""
    ref.eval()
    mine = parallel.shard(len(prompts))
    prompts, responses = prompts[mine], responses[mine]
    out = []
    for i in range(0, len(prompts), batch_size):
        b = collate(tok, prompts[i:i + batch_size], responses[i:i + batch_size], max_len)
        logps = forward_logps(ref, b, device, amp)
        keep = b["labels"] != -100
        out += [row[k] for row, k in zip(logps, keep.to(device))]
    return parallel.gather_rows(out, torch.float32, device)


def with_reference(batch, cached, rows):
    """Lay the cached per-token reference log-probs of `rows` onto the batch's label positions."""
    ref = torch.zeros(batch["labels"].shape)
    ref[batch["labels"] != -100] = torch.cat([cached[r] for r in rows])
    return {**batch, "ref": ref}


def pair_rows(pairs):
    """Preference pairs as rows (prompts, responses): chosen rows 0..n-1, then rejected rows n..2n-1."""
    return [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]


def pair_batch(tok, pairs, idx, cached, max_len):
    """Pairs idx as one batch, rows [chosen; rejected] [2B,T], with their cached reference log-probs
    and their Norms (pairs, chosen tokens)."""
    prompts, responses = pair_rows([pairs[k] for k in idx])
    b = collate(tok, prompts, responses, max_len)
    b["norms"] = Norms(pairs=len(idx), chosen_tokens=n_scored(b["labels"][:len(idx)]))
    return with_reference(b, cached, idx + [len(pairs) + k for k in idx])
