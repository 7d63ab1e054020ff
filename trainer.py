"""The training machinery of every ALLO stage: one resumable loop, the per-batch losses, the cached
reference log-probs. It knows no stage and no task: a stage hands fit() a model, its masks, a
function that builds micro-batch i and a function that turns a micro-batch into its loss.

Under torchrun (parallel.py) each of N processes takes its contiguous --batch-size share of a
global micro-batch of N x --batch-size examples, and every loss is normalized over the whole
optimizer step (Norms), so N processes at batch b train exactly like one process at batch N*b.
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import astuple, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import allo
import parallel
from data import atomic_path, collate, load_tokenizer, write_json
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


# ----------------------------------------------------------------------------- a stage's inputs and outputs

def begin(out, tokenizer=None):
    """A stage's start: its clock, its output directory and, if it reads text, its tokenizer (a
    path or a data.TokenizerFile)."""
    os.makedirs(out, exist_ok=True)
    return time.time(), load_tokenizer(tokenizer) if tokenizer else None


def finish(stage, out, t0, device, model=None, **info):
    """Save the stage's model (HF layout) if it has one and, last, stage.json: the mark of a
    finished stage (on CUDA with the stage's peak allocated memory). Rank 0 writes; every process
    returns once the files are there."""
    info = {"stage": stage, "wall_s": time.time() - t0, **info}
    if device.type == "cuda":
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if parallel.is_main():
        if model is not None:
            model.save_pretrained(out)
            shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
        write_json(os.path.join(out, "stage.json"), info)
    memory = f", peak memory {info['peak_memory_gib']:.2f} GiB" if device.type == "cuda" else ""
    print(f"{stage}: done in {info['wall_s']:.0f}s{memory} -> {out}")
    parallel.barrier()
    return info


def load_model(path, device, tok=None):
    model = Transformer.from_pretrained(path).to(device)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"{path}/config.json: vocab_size {model.cfg.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size}")
    return model


def load_masks(path, model):
    """The masks of `path`, checked against the model's parameters; None (no path): all-True."""
    if path is None:
        return full_masks(model)
    masks = allo.load_masks(path)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params or m.shape != params[name].shape:
            got = tuple(params[name].shape) if name in params else "no such parameter"
            raise UsageError(f"{path}: mask {name!r} of shape {tuple(m.shape)} does not fit the model ({got})")
    return {n: m.to(params[n].device) for n, m in masks.items()}


def report_truncation(stage, n, what):
    if n:
        print(f"{stage}: warning: {n} {what} truncated to --max-len", flush=True)


def need(path, stage):
    if not os.path.exists(path):
        raise UsageError(f"{path}: not found; run `python train.py --stage {stage}` first (or pass it as a flag)")
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
    ckpt_dir = os.path.join(out, "ckpt")
    start = resume(ckpt_dir, model, opt)
    if start:
        print(f"{stage}: resumed from step {start}/{steps}")
    world = parallel.world()
    # forward and backward through DDP (gradients all-reduced); optimizer and checkpoints use `model`
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else None
    net = ddp or model
    if cfg.compile:
        net = torch.compile(net)  # compiled on the first batch, again when a new shape needs it
    t0, tokens, losses = time.time(), 0, []
    for step in range(start, steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, cfg.warmup_frac)
        batches = [batch_at(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]  # this process's
        norms = step_norms([b["norms"] for b in batches], device)
        stats = torch.tensor([0.0, sum(int(b["attention_mask"].sum()) for b in batches)],
                             dtype=torch.float64, device=device)  # [loss share, tokens] of this process
        for j, b in enumerate(batches):
            # DDP all-reduces the gradients once, after the step's last micro-batch
            with nullcontext() if ddp is None or j == len(batches) - 1 else ddp.no_sync():
                loss = loss_fn(net, b, norms)
                (loss * world).backward()  # DDP averages over processes; the loss is already a share of the sum
            stats[0] += loss.detach()
        step_loss, step_tokens = parallel.all_reduce_sum(stats).tolist()
        if not math.isfinite(step_loss):
            raise UsageError(f"{stage}: loss is {step_loss} at step {step + 1}; stopped, the last "
                             f"good checkpoint is in {ckpt_dir} (lower the learning rate?)")
        tokens += step_tokens
        losses.append(step_loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            log_progress(stage, out, done, steps, sum(losses) / len(losses), opt.param_groups[0]["lr"],
                         tokens, time.time() - t0, done - start)
            losses = []
        if done % cfg.ckpt_every == 0 and done < steps and parallel.is_main():
            save_checkpoint(ckpt_dir, done, model, opt)
    return model


def step_norms(norms, device):
    """The Norms of a step: this process's micro-batches summed, then summed over processes."""
    total = torch.tensor([astuple(n) for n in norms], device=device).sum(0)
    return Norms(*parallel.all_reduce_sum(total).tolist())


def log_progress(stage, out, done, steps, loss, lr, tokens, elapsed, steps_run):
    row = {"stage": stage, "step": done, "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed}
    eta = (steps - done) * elapsed / steps_run
    print(f"{stage} {done}/{steps} loss {loss:.4f} lr {lr:.2e} tok/s {row['tokens_per_s']:,.0f} eta {eta:.0f}s",
          flush=True)
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
    """<ckpt>/step-N/{model, optimizer}.safetensors, written into a temporary directory that is
    renamed when complete; older checkpoints are removed after."""
    name = f"step-{step:07d}"
    tmp = os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with atomic_path(os.path.join(tmp, "model.safetensors")) as path:
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, path)
    allo.save_optimizer(os.path.join(tmp, "optimizer.safetensors"), opt)
    os.replace(tmp, os.path.join(ckpt_dir, name))
    for old in os.listdir(ckpt_dir):
        if old != name:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def resume(ckpt_dir, model, opt):
    """Load the newest complete checkpoint; returns its step (0 when there is none)."""
    done = sorted(d for d in os.listdir(ckpt_dir) if not d.endswith(".tmp")) if os.path.isdir(ckpt_dir) else []
    if not done:
        return 0
    path = os.path.join(ckpt_dir, done[-1])
    weights = load_file(os.path.join(path, "model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    allo.load_optimizer(os.path.join(path, "optimizer.safetensors"), opt)
    return int(done[-1].split("-")[1])


# ----------------------------------------------------------------------------- masks

def full_masks(model):
    """All-True masks: MaskedAdamW then trains every parameter, at AdamW's cost."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def trained_fraction(masks):
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


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
