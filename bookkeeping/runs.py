"""Run bookkeeping of every stage: its output folder, fingerprint, lock, input identities and input
checks. It knows no stage: a stage hands StageOutput its name, its config and its inputs."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import fields, is_dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bookkeeping import parallel
from bookkeeping.fileio import read_json, replace_dir, write_json
from data import COMPANION_FILES, TOKENIZER_FILES, DataError, TokenizerFile, find_tokenizer, regular_file
from model import Transformer, autocasts


class UsageError(Exception):
    """A missing prerequisite or an input that does not fit: one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during training: one line saying where a rerun resumes, exit status 130."""


def fingerprint(config):
    """The settings of a config dataclass that change a stage's result, as a JSON-able dict: every
    field, nested configs flattened into their own dicts, but not the fields marked
    result=False (logging, checkpointing, recomputation, compilation); a per-process field
    (the micro-batch) counts as its global size, N processes at batch b training like one at N*b."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("result") is False:
            continue
        if is_dataclass(value):
            value = fingerprint(value)
        elif f.metadata.get("per_process"):
            f_name, value = "global_" + f.name, value * parallel.world()
            out[f_name] = value
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


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

    def __init__(self, stage, out, config, inputs, device, force=False, **extra):
        """config: the stage's config dataclass; inputs: {name: path, list of paths, TokenizerFile or
        None}; extra: settings outside the config that change the result."""
        self.stage, self.out, self.work, self.device, self.force = stage, out, out + ".tmp", device, force
        self.held = {}  # path -> the bytes of each data file, read once: hashed here, parsed by the stage
        ids = {k: input_id(v, self.held) for k, v in inputs.items()}
        self.fingerprint = json.loads(json.dumps({"stage": stage, **fingerprint(config), **extra,
                                                  "inputs": ids}))
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
        directory ready (kept for resuming, or new). A folder that is not this stage's own (a user's
        folder, the run directory, a model, another stage's output) is refused, --force or not."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UsageError(f"{self.out}: the stage's output is a file, not a directory")
        for folder in (self.out, self.work, self.out + ".old"):
            refuse_foreign(folder, self.stage, self.force)
        parent = os.path.dirname(os.path.abspath(self.out))
        while not os.path.exists(parent):  # remember what we make, to remove it if we fail
            self.created.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        self.lock = lock(self.out + ".lock")
        swapped = read_json(os.path.join(self.work, "stage.json"))  # finished, stopped before its swap
        if swapped is not None and swapped.get("fingerprint") == self.fingerprint:
            self.swap()
            print(f"{self.stage}: finished earlier, its output put in place -> {self.out}")
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

    def finish(self, model=None, tok=None, **info):
        """Save the stage's model, if it has one, as a complete Hugging Face folder (config.json with
        its tokenizer's special ids, generation_config.json, the weights, the tokenizer's files) and
        stage.json (the fingerprint, the machine, on CUDA the peak allocated memory); then swap
        <out>.tmp/ into <out>. Once stage.json is written the result is complete: a stop at any later
        point leaves it in <out>.tmp/ or <out>, and the next run completes the swap without
        training. Rank 0 writes; every process returns once it is there."""
        info = {"stage": self.stage, "wall_s": time.time() - self.t0, **info, **machine(self.device)}
        if self.device.type == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if parallel.is_main():
            if model is not None:
                save_model(self.work, model, tok)
            write_json(os.path.join(self.work, "stage.json"),
                       {**info, "id": uuid.uuid4().hex, "fingerprint": self.fingerprint})
            self.swap()
        memory = f", peak memory {info['peak_memory_gib']:.2f} GiB" if self.device.type == "cuda" else ""
        print(f"{self.stage}: done in {info['wall_s']:.0f}s{memory} -> {self.out}")
        parallel.barrier()
        self.info = info
        return info

    def swap(self):
        """The finished <out>.tmp/ (its stage.json written) without what only a run needs, in the
        place of <out>."""
        shutil.rmtree(os.path.join(self.work, "ckpt"), ignore_errors=True)
        if os.path.exists(os.path.join(self.work, "fingerprint.json")):
            os.remove(os.path.join(self.work, "fingerprint.json"))
        replace_dir(self.work, self.out)

    def __exit__(self, kind, error, trace):
        if parallel.is_main():
            self.cleanup(failed=kind is not None)
        return False

    def cleanup(self, failed=True):
        """Rank 0: on a failure remove the work folder if it holds nothing to resume (no checkpoint)
        and nothing finished (no stage.json), and only while this process holds the lock (a process
        refused by another's lock leaves that process's work alone); release the lock."""
        if failed and self.lock is not None:
            finished = os.path.exists(os.path.join(self.work, "stage.json"))
            if not finished and not checkpoints(os.path.join(self.work, "ckpt")):
                shutil.rmtree(self.work, ignore_errors=True)
        if failed:
            for folder in self.created:
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
        if self.lock is not None:
            unlock(*self.lock)
            self.lock = None


def refuse_foreign(folder, stage, force=False):
    """UsageError unless `folder` is absent, empty, or this stage's own (its stage.json, or its work
    folder's fingerprint.json, names the stage). A stage record there that is not whole (cut short,
    edited) names itself; --force then redoes the stage over it."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    mark = read_json(os.path.join(folder, "stage.json")) or \
        read_json(os.path.join(folder, "fingerprint.json"))
    owner = mark.get("stage") if isinstance(mark, dict) else None
    if owner == stage:
        return
    torn = [n for n in ("stage.json", "fingerprint.json") if os.path.exists(os.path.join(folder, n))
            and not isinstance(read_json(os.path.join(folder, n)), dict)]
    if torn and owner is None:
        if force:
            return
        raise UsageError(f"{os.path.join(folder, torn[0])}: not a whole stage record (cut short or edited); "
                         "--force redoes the stage")
    if owner:
        what = f"holds a run of the {owner} stage"
    elif os.path.exists(os.path.join(folder, "run.json")):
        what = "is a run directory"
    elif os.path.exists(os.path.join(folder, "config.json")):
        what = "is a model's folder"
    else:
        what = f"holds files that no stage wrote ({', '.join(sorted(os.listdir(folder))[:3])})"
    raise UsageError(f"{folder}: {what}, not a {stage} stage's output; give the stage a folder of its own "
                     "(--out)")


def lock(path):
    """(fd, path) holding an exclusive flock on path, which records our pid; UsageError naming the
    holder when another process has it."""
    while True:
        try:  # O_NOFOLLOW: a symbolic link in the lock's place is refused, never written through
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"{path}: the lock is a symbolic link; remove it") from None
            raise
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


def difference(old, new):
    """The first setting in which two fingerprints differ, as words (a nested config's setting by
    its own name)."""
    if not isinstance(old, dict):
        return "no record of its settings"
    for key in list(new) + [k for k in old if k not in new]:
        if key == "inputs":
            for name in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
                if old.get("inputs", {}).get(name) != new["inputs"].get(name):
                    return f"another {name} (input)"
        elif isinstance(new.get(key), dict) and isinstance(old.get(key), dict) and old[key] != new[key]:
            return difference({**old[key], "inputs": {}}, {**new[key], "inputs": {}})
        elif key not in old:  # a setting this version added
            return f"no {key} (an older version's settings; this one's {key} is {new[key]!r})"
        elif old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r}, not {new.get(key)!r}"
    return "the same settings"


MODEL_FILES = ("config.json", "model.safetensors.index.json") + TOKENIZER_FILES + COMPANION_FILES


def input_id(path, held=None):
    """What stands for an input in a fingerprint: its content. None; a file: a hash of its content (the
    whole file up to 256 MiB, else its size and first and last MiB); a model directory: a hash of the
    names and hashes of the files that make the model (MODEL_FILES and its .safetensors). A file
    written by an earlier stage counts like any other, so an edited one is another input. A
    TokenizerFile: its file's id, those of the files beside it that change it (its config, its chat
    template), the special tokens and BOS rule it names; a list: each item's id. Anything but a
    regular file or a directory (a FIFO, a device, a socket) is refused: reading it to hash it would
    hang or consume it. held: a dict that keeps the bytes of each data file (.jsonl), so that the copy
    hashed is the copy the stage reads."""
    if path is None:
        return None
    if isinstance(path, (list, tuple)):
        return [input_id(p, held) for p in path]
    if isinstance(path, TokenizerFile):
        file = find_tokenizer(path.path) or path.path
        beside = [os.path.join(os.path.dirname(file), n) for n in COMPANION_FILES]
        return [input_id(file), *[input_id(f) for f in beside if os.path.isfile(f)], path.bos, path.eos,
                path.pad, path.bos_mode]
    if os.path.isdir(path):  # a model: what makes it, not what was written beside it (metrics, scores)
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") or n in MODEL_FILES)
        listing = "".join(f"{n}:{input_id(os.path.join(path, n))}" for n in files)
        return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    regular_file(path)
    if held is not None and path.endswith(".jsonl"):  # a data file: read once, hashed and kept
        with open(path, "rb") as f:
            held[path] = f.read()
        return "sha256:" + hashlib.sha256(held[path]).hexdigest()
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


def checkpoints(ckpt_dir):
    """The complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [os.path.join(ckpt_dir, d) for d in sorted(os.listdir(ckpt_dir)) if d.startswith("step-")
            and not d.endswith((".tmp", ".old"))]


@contextmanager
def writing(path):
    """A safetensors write error (a full disk) as one UsageError naming what was being written."""
    try:
        yield
    except SafetensorError as e:
        raise UsageError(f"{path}: cannot write it ({one_line(e)})") from None


def save_model(folder, model, tok):
    """A complete Hugging Face folder: the model with its tokenizer's special ids, the tokenizer's
    files, generation_config.json."""
    ids = tok.special_ids()
    with writing(os.path.join(folder, "model.safetensors")):
        model.save_pretrained(folder, **ids)
    tok.save_pretrained(folder)
    write_json(os.path.join(folder, "generation_config.json"), {**ids, "do_sample": False})


def machine(device):
    """What the run ran on, for the record: the GPU's name, or torch's CPU capability; torch's version."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu {torch.backends.cpu.get_cpu_capability()}"
    precision = "bf16 autocast" if autocasts(device) else "float32"
    return {"device": kind, "torch": torch.__version__, "precision": precision}


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
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    try:
        masks = load_file(path)
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
        n_prompt = len(tok.prompt_ids(p))  # with its BOS, where the tokenizer adds one
        if n_prompt + 1 > max_len:  # prompt + at least one response target
            raise DataError(f"{where(i)}: the prompt has {n_prompt} tokens; --max-len {max_len} leaves no "
                            "room for its response")
        n_response = len(tok.encode(r) if isinstance(r, str) else r)  # text, or data.encode_rows' ids
        if n_prompt + n_response + 1 > max_len:  # prompt + response + EOS
            cut, first = cut + 1, first or where(i)
    if cut:
        print(f"{stage}: warning: {cut} of {len(prompts)} rows longer than --max-len {max_len}, their "
              f"responses cut (the first: {first})", flush=True)


def need(path, stage):
    if not os.path.exists(path):
        raise UsageError(f"{path}: not found; run `python train.py --stage {stage}` first (or pass it as a "
                         "flag)")
    return path


