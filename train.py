"""ALLO stage by stage (Chen et al., EMNLP 2024, "Not Everything is All You Need").

    python train.py                      # every stage on the embedded default, then the results table
    python train.py --stage forget --model my-llama/ --data forget.jsonl --mask forget_mask.safetensors --out out/
    torchrun --nproc_per_node 4 train.py --run-dir runs/ddp    # the same on 4 GPUs (or 4 CPU processes)

Stages (each reads the run directory, default runs/default/, or explicit flags):
  sft       the starting point: a tiny Llama trained from scratch on the embedded arithmetic task
  sample    Stage 0: K self-sampled responses per question -> learning pairs (correct, wrong) and
            the forgetting set (every wrong response)
  warmup    Stage 1a: vanilla DPO from the SFT model; also the full-parameter DPO baseline
  mask      Stage 1b: key neurons = global top-k% of |theta_warmup - theta_sft| (or accumulated
            DPO gradients, --scorer grad): one mask for forgetting, one for learning
  rewriter  Stage 2a: the token-level reward model (a rewriter that minimally corrects wrong
            responses); flags unaligned tokens p_t < tau of every forgetting response
  forget    Stage 2b: token-level NPO on the unaligned tokens, updating only the forgetting mask
  learn     Stage 3: DPO with key tokens on the rejected side, updating only the learning mask:
            the ALLO model
  all       every stage in order, skipping finished ones (--force redoes them), then eval.py's table

A stage writes <run>/<stage>/ (Hugging Face config.json + model.safetensors, metrics.jsonl) and,
last, stage.json: a stage with stage.json is finished. Training stages checkpoint every
--ckpt-every steps into <stage>/ckpt/ and resume from there when run again; the batch order is a
function of (seed, step), so a resumed run on CPU ends with the same weights as an uninterrupted one.

Under torchrun (parallel.py; DistributedDataParallel, nccl on CUDA with one GPU per process, gloo
on CPU) each of N processes takes its contiguous --batch-size share of a global micro-batch of
N x --batch-size examples, so N processes at batch b train exactly like one process at batch N*b
(loss normalized over every micro-batch of every process). Reference log-probs, sampling and
rewriter scoring are split over the processes too; rank 0 alone writes files and prints. A
checkpoint resumes under any number of processes with the same global batch.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import allo
import parallel
from data import (LAZY_RATE, MAX_OPERAND, MAX_VALUE, DataError, Problem, Tokenizer, collate, correct_response,
                  is_correct, make_splits, prompt_text, read_jsonl, sft_examples, steps_correct, train_task_tokenizer,
                  write_jsonl)
from eval import ROWS, accuracy, evaluate_run, generate_ids, load_problems, markdown_table
from model import ModelConfig, Transformer, autocast, pick_device, write_json

STAGES = ["sft", "sample", "warmup", "mask", "rewriter", "forget", "learn"]


class UsageError(Exception):
    """A missing prerequisite or an input that does not fit: one line, exit status 2."""


# ----------------------------------------------------------------------------- the training loop

def fit(stage, model, masks, args, n_steps, lr, batch_at, loss_fn, out):
    """Train `model` for n_steps with MaskedAdamW on `masks` (all-True masks = full parameters).

    Per step, on each of the `world` processes: its --grad-accum micro-batches batch_at(i), each
    carrying "counts", the normalizers of its loss (e.g. scored tokens); their sum over the step's
    micro-batches on every process is all-reduced first, and each micro-batch backpropagates
    loss_fn(model, batch, counts) * world, its share of the loss of the whole step (DDP averages
    gradients over processes and all-reduces them only after the last micro-batch). So the step's
    gradient is that of the loss over all its examples, however they are split. Dense gradients
    clipped to norm 1.0 before the masked update (as the release), the same update on every
    process; linear warmup then cosine decay of the learning rate. Progress (global tokens/s) every
    --log-every steps, a checkpoint every --ckpt-every steps, resume from the newest checkpoint,
    stop on a non-finite loss (on every process: the loss is all-reduced).
    """
    device = next(model.parameters()).device
    model.grad_checkpointing = args.grad_checkpoint
    opt = allo.MaskedAdamW(model.named_parameters(), masks, lr=lr, weight_decay=args.weight_decay)
    ckpt_dir = os.path.join(out, "ckpt")
    start = resume(ckpt_dir, model, opt)
    if start:
        print(f"{stage}: resumed from step {start}/{n_steps}")
    world = parallel.world()
    # forward/backward through DDP (gradients all-reduced); optimizer, checkpoints and saving use `model`
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    t0, tokens, losses = time.time(), 0, []
    for step in range(start, n_steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, n_steps, args.warmup_frac)
        batches = [batch_at(step * args.grad_accum + j) for j in range(args.grad_accum)]  # this process's
        counts = torch.tensor([b["counts"] for b in batches], device=device).sum(0)  # [n_counts]
        counts = parallel.all_reduce_sum(counts).tolist()  # normalizers of the whole step
        stats = torch.tensor([0.0, sum(int(b["attention_mask"].sum()) for b in batches)],
                             dtype=torch.float64, device=device)  # [loss share, tokens] of this process
        for j, b in enumerate(batches):
            with nullcontext() if net is model or j == len(batches) - 1 else net.no_sync():
                loss = loss_fn(net, b, counts)
                (loss * world).backward()
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
        if done % args.log_every == 0 or done == n_steps:
            dt = time.time() - t0
            rate = (done - start) / dt
            row = {"stage": stage, "step": done, "loss": sum(losses) / len(losses), "lr": opt.param_groups[0]["lr"],
                   "tokens_per_s": tokens / dt}
            print(f"{stage} {done}/{n_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                  f"tok/s {row['tokens_per_s']:,.0f} eta {(n_steps - done) / rate:.0f}s", flush=True)
            if parallel.is_main():
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
            losses = []
        if done % args.ckpt_every == 0 and done < n_steps and parallel.is_main():
            save_checkpoint(ckpt_dir, done, model, opt)
    return model


def save_checkpoint(ckpt_dir, step, model, opt):
    """<ckpt>/step-N/ {model, optimizer}.safetensors, written to a temp dir then renamed."""
    tmp = os.path.join(ckpt_dir, f"step-{step:07d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()},
              os.path.join(tmp, "model.safetensors"))
    allo.save_optimizer(os.path.join(tmp, "optimizer.safetensors"), opt)
    os.replace(tmp, os.path.join(ckpt_dir, f"step-{step:07d}"))
    for old in os.listdir(ckpt_dir):
        if old != f"step-{step:07d}":
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


def lr_factor(step, n_steps, warmup_frac):
    """Linear warmup over warmup_frac of the steps, then cosine decay to 0 (the release's schedule)."""
    warm = max(1, int(warmup_frac * n_steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, n_steps - warm)))


def batch_indices(n, batch, i, seed):
    """Example indices of micro-batch i: epoch e = a fixed permutation from (seed, e)."""
    batch = min(batch, n)
    per_epoch = n // batch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + i // per_epoch))
    k = i % per_epoch
    return perm[k * batch:(k + 1) * batch].tolist()


def rank_batch(n, args, i):
    """This process's example indices of micro-batch i: its contiguous slice of the global
    micro-batch batch_indices(n, --batch-size * world, i, seed), so N processes at batch b see
    exactly what one process sees at batch N * b."""
    if n < parallel.world():
        raise UsageError(f"{n} examples cannot be shared by {parallel.world()} processes")
    idx = batch_indices(n, args.batch_size * parallel.world(), i, args.seed)
    return idx[parallel.shard(len(idx))]


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


# ----------------------------------------------------------------------------- shared helpers

def need(path, stage):
    if not os.path.exists(path):
        raise UsageError(f"{path}: not found; run `python train.py --stage {stage}` first (or pass it as a flag)")
    return path


def load_model(path, device, stage, tok=None):
    need(os.path.join(path, "config.json"), stage)
    model = Transformer.from_pretrained(path).to(device)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"{path}/config.json: vocab_size {model.cfg.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size}")
    return model


def load_masks_for(path, model, stage):
    masks = allo.load_masks(need(path, stage))
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params or m.shape != params[name].shape:
            got = tuple(params[name].shape) if name in params else "no such parameter"
            raise UsageError(f"{path}: mask {name!r} of shape {tuple(m.shape)} does not fit the model ({got})")
    return {n: m.to(params[n].device) for n, m in masks.items()}


def full_masks(model):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def trained_fraction(masks):
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def forward_logps(model, batch, device):
    """Per-token log-probs [B,T] of the batch's labels (0 off-target).

    collate() pads on the right, so causal attention alone gives every real position exactly the
    logits it has unpadded (padding only follows it): no attention mask is passed, which lets
    scaled_dot_product_attention use its fused kernels."""
    with autocast(device):
        logits = model(batch["input_ids"].to(device))  # [B,T,V]
    return allo.token_logps(logits, batch["labels"].to(device))


def sft_batch_loss(model, b, counts, device):
    """SFT (the starting point, and the rewriter): cross-entropy of the micro-batch's response
    tokens, its share of the mean over the step's counts[0] scored tokens."""
    with autocast(device):
        logits = model(b["input_ids"].to(device))  # [B,T,V], right-padded: see forward_logps
    return allo.sft_loss(logits, b["labels"].to(device), normalizer=counts[0])


def dpo_batch_loss(model, b, counts, device, beta, eps, nll=0.0):
    """Stage 3, DPO with key tokens (eps < 1: the rejected side counts through its ceil(eps * T)
    key tokens; eps 1 is vanilla DPO, the warmup) on a micro-batch of pairs, rows [chosen; rejected]
    [2B,T]: its share of the mean over the step's counts[0] pairs, plus nll x the NLL of the chosen
    tokens over the step's counts[1] chosen tokens (RPO-style, optional)."""
    logps = forward_logps(model, b, device)  # [2B,T]
    (pc, pr), (rc, rr) = logps.chunk(2), b["ref"].to(device).chunk(2)
    keep = allo.key_token_mask((pr - rr).detach(), b["labels"].chunk(2)[1].to(device) != -100, eps)
    loss = allo.dpo_loss(pc, pr, rc, rr, beta, keep)[0].sum() / counts[0]
    return loss - nll * pc.sum() / counts[1] if nll else loss


def npo_batch_loss(model, b, counts, device, beta):
    """Stage 2, token-level NPO on the micro-batch's weighted tokens, its share of the mean over
    the step's counts[0] weighted tokens."""
    logps = forward_logps(model, b, device)  # [B,T]
    return allo.npo_token_loss(logps, b["ref"].to(device), b["weights"].to(device), beta, normalizer=counts[0])


@torch.no_grad()
def reference_logps(ref, tok, prompts, responses, max_len, device, batch_size=64):
    """Per-example 1-D tensors of the reference's per-token log-probs on the response targets,
    computed once and cached for the whole stage (no second model kept in memory during training).
    Each process computes its contiguous share of the examples; every process gets them all."""
    ref.eval()
    mine = parallel.shard(len(prompts))
    prompts, responses = prompts[mine], responses[mine]
    out = []
    for i in range(0, len(prompts), batch_size):
        b = collate(tok, prompts[i:i + batch_size], responses[i:i + batch_size], max_len)
        logps = forward_logps(ref, b, device)
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
    """Pairs idx as one batch, rows [chosen; rejected] [2B,T], with their cached reference log-probs."""
    prompts, responses = pair_rows([pairs[k] for k in idx])
    b = collate(tok, prompts, responses, max_len)
    return with_reference(b, cached, idx + [len(pairs) + k for k in idx])


def n_scored(labels):
    """Number of scored targets (labels != -100): the normalizer of an SFT loss."""
    return int((labels != -100).sum())


def report_truncation(stage, n, what):
    if n:
        print(f"{stage}: warning: {n} {what} truncated to --max-len", flush=True)


# ----------------------------------------------------------------------------- sft

def stage_sft(args, run, device):
    t0 = time.time()
    out = args.out or os.path.join(run, "sft")
    os.makedirs(os.path.join(run, "task"), exist_ok=True)
    os.makedirs(out, exist_ok=True)
    difficulty = dict(max_operand=args.max_operand, max_value=args.max_value)
    splits = make_splits(args.seed, args.n_train, args.n_val, args.n_test, **difficulty)
    if parallel.is_main():
        for name, problems in splits.items():
            write_jsonl(os.path.join(run, "task", f"{name}.jsonl"), [p.__dict__ for p in problems])
        train_task_tokenizer(os.path.join(run, "tokenizer.model"), **difficulty)
    parallel.barrier()
    tok = Tokenizer(os.path.join(run, "tokenizer.model"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                      n_kv_heads=args.n_kv_heads, hidden_dim=args.hidden_dim, max_seq_len=args.max_len)
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    print(f"sft: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
          f"{len(splits['train'])} training problems, device {device}")
    rows = sft_examples(splits["train"], args.lazy_rate, args.seed)
    counted = set()

    def batch_at(i):
        idx = rank_batch(len(rows), args, i)
        b = collate(tok, [rows[k]["input"] for k in idx], [rows[k]["output"] for k in idx], args.max_len)
        if i not in counted:
            counted.add(i)
            report_truncation("sft", b["n_truncated"], "examples")
        return {**b, "counts": [n_scored(b["labels"])]}

    fit("sft", model, full_masks(model), args, args.sft_steps, args.sft_lr, batch_at,
        lambda net, b, counts: sft_batch_loss(net, b, counts, device), out)
    val_acc = None
    if parallel.is_main():  # validation on rank 0 only; the others wait in finish()
        val_acc = accuracy(model, tok, splits["val"][:args.eval_n])
        print(f"sft: validation greedy accuracy {100 * val_acc:.1f}% on "
              f"{min(args.eval_n, len(splits['val']))} questions")
    return finish("sft", out, t0, device, model, trained_fraction=1.0, val_accuracy=val_acc)


# ----------------------------------------------------------------------------- Stage 0: sample

def stage_sample(args, run, device):
    """K responses per question at --temperature; correct = same final answer (the paper) and, with
    --correct steps (the default), every step right too; duplicates dropped. Pairs: every
    (correct, wrong) of a question, at most --max-pairs drawn with the seed. Forgetting set: every
    wrong response. Val and test questions give held-out pairs.
    Each process samples its contiguous share of the questions with seed + rank; the token ids
    are gathered in question order."""
    t0 = time.time()
    out = args.out or os.path.join(run, "sample")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(need(os.path.join(run, "tokenizer.model"), "sft"))
    model = load_model(args.model or os.path.join(run, "sft"), device, "sft", tok)
    rng = random.Random(args.seed)
    stats = {}
    for split in ("train", "val", "test"):
        problems = load_problems(need(os.path.join(run, "task", f"{split}.jsonl"), "sft"))
        if split == "train":
            problems = problems[:args.n_sample] if args.n_sample else problems
        prompts = [prompt_text(p.question) for p in problems]
        mine = [q for q in prompts[parallel.shard(len(prompts))] for _ in range(args.k)]  # K per question
        ids = generate_ids(model, tok, mine, args.max_new_tokens, args.temperature, args.top_p,
                           args.seed + parallel.rank())
        ids = parallel.gather_rows([torch.tensor(t, dtype=torch.long) for t in ids], torch.long, device)
        texts = [tok.decode(t) for t in ids]  # K per question, every question in order
        pairs, forget, n_correct, n_right = [], [], 0, 0
        for qi, (p, prompt) in enumerate(zip(problems, prompts)):
            drawn = [" " + t.strip() for t in texts[qi * args.k:(qi + 1) * args.k]]
            right = [is_correct(s, p.answer) and (args.correct == "answer" or steps_correct(p, s)) for s in drawn]
            n_correct += sum(is_correct(s, p.answer) for s in drawn)
            n_right += sum(right)
            good = list(dict.fromkeys(s for s, ok in zip(drawn, right) if ok))
            bad = list(dict.fromkeys(s for s, ok in zip(drawn, right) if not ok))
            if not good and args.gold_chosen:  # not in the paper: the reference stands in as chosen
                good = [" " + p.solution]
            combos = [(c, w) for c in good for w in bad]
            for c, w in rng.sample(combos, min(args.max_pairs, len(combos))):
                pairs.append({"prompt": prompt, "chosen": c, "rejected": w})
            forget += [{"prompt": prompt, "response": w, "question": p.question, "reference": p.solution,
                        "answer": p.answer} for w in bad]
        if parallel.is_main():
            write_jsonl(os.path.join(out, f"{split}_pairs.jsonl" if split != "train" else "pairs.jsonl"), pairs)
            if split == "train":
                write_jsonl(os.path.join(out, "forget.jsonl"), forget)
        stats[split] = {"questions": len(problems), "sample_accuracy": n_correct / max(1, len(texts)),
                        "steps_correct": n_right / max(1, len(texts)), "pairs": len(pairs),
                        "wrong_responses": len(forget)}
        print(f"sample {split}: {len(problems)} questions x {args.k}: final answer right in "
              f"{100 * stats[split]['sample_accuracy']:.1f}%, counted correct (--correct {args.correct}) "
              f"{100 * stats[split]['steps_correct']:.1f}%; {len(pairs)} pairs, {len(forget)} wrong responses")
    return finish("sample", out, t0, device, **stats)


# ----------------------------------------------------------------------------- DPO (warmup and learn)

def train_dpo(stage, args, run, device, model_dir, model_stage, masks_path, eps, lr, steps):
    """DPO on the learning pairs from `model_dir`, reference = the same starting weights
    (log-probs cached once). eps < 1 keeps only the key tokens of the rejected side (Stage 3);
    masks_path None trains every parameter (vanilla DPO, Stage 1a)."""
    t0 = time.time()
    out = args.out or os.path.join(run, stage)
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(args.tokenizer or need(os.path.join(run, "tokenizer.model"), "sft"))
    pairs = read_jsonl(args.data or need(os.path.join(run, "sample", "pairs.jsonl"), "sample"), "pairs")
    if not pairs:
        raise UsageError(f"{stage}: no preference pairs to train on")
    model = load_model(model_dir, device, model_stage, tok)
    masks = load_masks_for(masks_path, model, "mask") if masks_path else full_masks(model)
    ref_dir = args.ref or model_dir
    ref = model if ref_dir == model_dir else load_model(ref_dir, device, model_stage, tok)
    cached = reference_logps(ref, tok, *pair_rows(pairs), args.max_len, device)
    del ref
    n = len(pairs)
    print(f"{stage}: {n} pairs, trained fraction {trained_fraction(masks):.3f}, eps {eps}, lr {lr}, {steps} steps")

    def batch_at(i):
        idx = rank_batch(n, args, i)
        b = pair_batch(tok, pairs, idx, cached, args.max_len)
        b["counts"] = [len(idx), n_scored(b["labels"][:len(idx)])]  # pairs (DPO), chosen tokens (--nll)
        return b

    fit(stage, model, masks, args, steps, lr, batch_at,
        lambda net, b, counts: dpo_batch_loss(net, b, counts, device, args.beta, eps, args.nll), out)
    return finish(stage, out, t0, device, model, trained_fraction=trained_fraction(masks), steps=steps, lr=lr,
                  eps=eps)


# ----------------------------------------------------------------------------- Stage 1: key neurons

def stage_mask(args, run, device):
    """Importance per entry (|theta_warmup - theta_sft| or accumulated DPO gradients), then one
    global top-k% threshold for the forgetting mask and one for the learning mask."""
    t0 = time.time()
    out = args.out or os.path.join(run, "mask")
    os.makedirs(out, exist_ok=True)
    sft_dir = args.model or os.path.join(run, "sft")
    sft = load_model(sft_dir, device, "sft")
    if args.scorer == "delta":
        warm = load_model(os.path.join(run, "warmup"), device, "warmup")
        scores = allo.importance_from_delta(dict(sft.named_parameters()), dict(warm.named_parameters()))
    else:
        tok = Tokenizer(args.tokenizer or need(os.path.join(run, "tokenizer.model"), "sft"))
        pairs = read_jsonl(args.data or need(os.path.join(run, "sample", "pairs.jsonl"), "sample"), "pairs")
        cached = reference_logps(sft, tok, *pair_rows(pairs), args.max_len, device)
        n = len(pairs)
        batches = (pair_batch(tok, pairs, list(range(i, min(n, i + args.batch_size))), cached, args.max_len)
                   for i in range(0, n, args.batch_size))

        # gradients of the vanilla-DPO loss, each batch's share of the mean over all n pairs
        scores = allo.grad_importance(sft, lambda m, b: dpo_batch_loss(m, b, [n], device, args.beta, 1.0),
                                      batches, mode=args.grad_mode)
    info = {}
    for name, ratio in (("forget", args.forget_ratio), ("learn", args.learn_ratio)):
        masks = allo.select_masks(scores, ratio, granularity=args.granularity, exclude_top=args.exclude_top)
        if parallel.is_main():
            allo.save_masks(os.path.join(out, f"{name}.safetensors"), masks)
        info[f"{name}_fraction"] = trained_fraction(masks)
        print(f"mask {name}: {100 * info[f'{name}_fraction']:.2f}% of entries; by module type:")
        print(allo.format_table([r for r in allo.mask_summary(masks) if r["by"] == "type"]))
    print("mask by layer (learning mask):")
    print(allo.format_table([r for r in allo.mask_summary(masks) if r["by"] == "layer"]))
    return finish("mask", out, t0, device, scorer=args.scorer, granularity=args.granularity, **info)


# ----------------------------------------------------------------------------- Stage 2a: rewriter

def rewriter_prompt(row):
    """What the rewriter sees: the question, the response to fix and a correct reference solution.
    The reference comes last, right before the rewrite, with a response's leading space, so that
    its tokens are those the rewrite copies. With the reference first and unspaced, the default
    run's rewriter flagged a wrong first number in 2% of such responses (first wrong step found in
    66.6% of all); this way, in 100%."""
    return f"Question: {row['question']}\nDraft:{row['response']}\nReference: {row['reference']}\nRewrite:"


def flag_quality(tok, scored, errors_at, tau):
    """How well the unaligned tokens (p_t < tau) find the known first wrong step (embedded task):
    (recall: share of wrong responses whose first wrong token is flagged, precision: share of
    flagged tokens at or after it, number of wrong responses judged). errors_at: the char index
    of each response's first error (correct_response), -1 when nothing is wrong."""
    hits, found, flagged, flagged_after = 0, 0, 0, 0
    for s, error_at in zip(scored, errors_at, strict=True):
        ids = tok.encode(s["response"])
        ends = [len(tok.decode(ids[:j + 1])) for j in range(len(ids))]
        first = next((j for j, e in enumerate(ends) if e > error_at), None)  # token holding the first error
        if error_at < 0 or first is None:  # nothing wrong, or only the end (a response cut short)
            continue
        found += 1
        hits += s["probs"][first] < tau
        flag = [j for j, p in enumerate(s["probs"]) if p < tau]
        flagged += len(flag)
        flagged_after += sum(j >= first for j in flag)
    return hits / max(1, found), flagged_after / max(1, flagged), found


def stage_rewriter(args, run, device):
    """Train the rewriter (a copy of the SFT model) to turn (question, response, reference) into
    the minimally corrected response (correct responses are kept unchanged, as in RLMEC); then
    score every forgetting response: p_t = P_rewriter(y_t | prompt, y_<t), unaligned = p_t < tau
    (each process scores its contiguous share of the responses; p_t and w_t are gathered in order)."""
    t0 = time.time()
    out = args.out or os.path.join(run, "rewriter")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(need(os.path.join(run, "tokenizer.model"), "sft"))
    forget = read_jsonl(args.data or need(os.path.join(run, "sample", "forget.jsonl"), "sample"), "forget")
    pairs = read_jsonl(need(os.path.join(run, "sample", "pairs.jsonl"), "sample"), "pairs")
    by_prompt = {r["prompt"]: r for r in forget}
    # (corrected response, char index of its first error) of each wrong response
    fixes = [correct_response(Problem(r["question"], r["reference"], r["answer"]), r["response"]) for r in forget]
    examples = [(rewriter_prompt(r), fixed) for r, (fixed, _) in zip(forget, fixes)]  # (prompt, target rewrite)
    for p in pairs:  # correct responses: the rewrite is the response itself
        if p["prompt"] in by_prompt:
            r = {**by_prompt[p["prompt"]], "response": p["chosen"]}
            examples.append((rewriter_prompt(r), p["chosen"]))
    examples = list(dict.fromkeys(examples))
    if not examples:
        raise UsageError("rewriter: no wrong responses to rewrite (the sample stage found none)")
    model = load_model(os.path.join(run, "sft"), device, "sft", tok)
    print(f"rewriter: {len(examples)} rewrite examples")
    max_len = 3 * args.max_len

    def batch_at(i):
        idx = rank_batch(len(examples), args, i)
        b = collate(tok, [examples[k][0] for k in idx], [examples[k][1] for k in idx], max_len)
        return {**b, "counts": [n_scored(b["labels"])]}

    fit("rewriter", model, full_masks(model), args, args.rewriter_steps, args.rewriter_lr, batch_at,
        lambda net, b, counts: sft_batch_loss(net, b, counts, device), out)

    # score: p_t of each response token, teacher-forced as the rewrite of itself
    mine = forget[parallel.shard(len(forget))]
    p_rows, w_rows = [], []  # p_t, w_t [n_tok] of each response of this process
    for i in range(0, len(mine), args.batch_size):
        rows = mine[i:i + args.batch_size]
        b = collate(tok, [rewriter_prompt(r) for r in rows], [r["response"] for r in rows], max_len)
        report_truncation("rewriter", b["n_truncated"], "scored responses")
        b = {k: b[k].to(device) for k in ("input_ids", "labels")}  # right-padded: no attention mask needed
        with autocast(device):
            probs = allo.rewriter_token_probs(model, b)  # [B,T], 0 off-target
        weights = allo.unaligned_token_weights(probs, b["labels"], args.tau, args.weights_mode)
        for r, p_row, w_row, lab in zip(rows, probs, weights, b["labels"]):
            on = lab != -100
            n_tok = len(tok.encode(r["response"]))
            p_rows.append(p_row[on][:n_tok])  # drop the EOS target
            w_rows.append(w_row[on][:n_tok])
    p_rows = parallel.gather_rows(p_rows, torch.float32, device)  # every response, in order
    w_rows = parallel.gather_rows(w_rows, torch.float32, device)
    scored = [{"prompt": r["prompt"], "response": r["response"], "weights": w.tolist(), "probs": p.tolist()}
              for r, p, w in zip(forget, p_rows, w_rows, strict=True)]
    if parallel.is_main():
        write_jsonl(os.path.join(out, "forget_weighted.jsonl"), scored)
    recall, precision, found = flag_quality(tok, scored, [at for _, at in fixes], args.tau)
    n_flag = sum(sum(w > 0 for w in s["weights"]) for s in scored)
    n_all = sum(len(s["weights"]) for s in scored)
    print(f"rewriter: {n_flag}/{n_all} response tokens unaligned (p_t < {args.tau}); first wrong step found in "
          f"{100 * recall:.1f}% of {found} wrong responses; {100 * precision:.1f}% of flagged tokens "
          "lie at or after it")
    return finish("rewriter", out, t0, device, model, trained_fraction=1.0, unaligned_tokens=n_flag, tokens=n_all,
                  first_error_recall=recall, flag_precision=precision)


# ----------------------------------------------------------------------------- Stage 2b: forget

def stage_forget(args, run, device):
    """Token-level NPO (ALLO eq. for forgetting): -w_t log sigmoid(-beta r_t) on the unaligned
    tokens of wrong responses; reference = the starting model; only the forgetting mask moves."""
    t0 = time.time()
    out = args.out or os.path.join(run, "forget")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(args.tokenizer or need(os.path.join(run, "tokenizer.model"), "sft"))
    data = args.data or need(os.path.join(run, "rewriter", "forget_weighted.jsonl"), "rewriter")
    rows = read_jsonl(data, "forget", tok)
    if not rows:
        raise UsageError(f"{data}: no forgetting examples")
    model_dir = args.model or os.path.join(run, "sft")
    model = load_model(model_dir, device, "sft", tok)
    masks = load_masks_for(args.mask or os.path.join(run, "mask", "forget.safetensors"), model, "mask") \
        if args.forget_ratio < 1 or args.mask else full_masks(model)
    ref = model if not args.ref else load_model(args.ref, device, "sft", tok)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    weights = None if args.all_tokens else [r.get("weights", [1.0] * len(tok.encode(r["response"]))) for r in rows]
    cached = reference_logps(ref, tok, prompts, responses, args.max_len, device)
    del ref
    print(f"forget: {len(rows)} wrong responses, trained fraction {trained_fraction(masks):.3f}, "
          f"{'all tokens' if args.all_tokens else 'unaligned tokens'}")

    def batch_at(i):
        idx = rank_batch(len(rows), args, i)
        b = collate(tok, [prompts[k] for k in idx], [responses[k] for k in idx], args.max_len,
                    None if weights is None else [weights[k] for k in idx])
        if weights is None:  # NPO on every response token: the EOS target too
            b["weights"] = (b["labels"] != -100).float()
        b["counts"] = [int((b["weights"] != 0).sum())]  # weighted tokens: the NPO normalizer
        return with_reference(b, cached, idx)

    fit("forget", model, masks, args, args.forget_steps, args.forget_lr, batch_at,
        lambda net, b, counts: npo_batch_loss(net, b, counts, device, args.beta), out)
    return finish("forget", out, t0, device, model, trained_fraction=trained_fraction(masks),
                  steps=args.forget_steps)


# ----------------------------------------------------------------------------- all

def run_stage(stage, args, run, device):
    if device.type == "cuda":  # finish() records the stage's peak
        torch.cuda.reset_peak_memory_stats(device)
    if stage == "sft":
        return stage_sft(args, run, device)
    if stage == "sample":
        return stage_sample(args, run, device)
    if stage == "warmup":
        return train_dpo("warmup", args, run, device, args.model or os.path.join(run, "sft"), "sft",
                         None, 1.0, args.dpo_lr, args.dpo_steps)
    if stage == "mask":
        return stage_mask(args, run, device)
    if stage == "rewriter":
        return stage_rewriter(args, run, device)
    if stage == "forget":
        return stage_forget(args, run, device)
    if stage == "learn":
        masks = args.mask or (os.path.join(run, "mask", "learn.safetensors") if args.learn_ratio < 1 else None)
        return train_dpo("learn", args, run, device, args.model or os.path.join(run, "forget"), "forget",
                         masks, args.eps, args.learn_lr, args.dpo_steps)
    raise AssertionError(stage)


PRESETS = {  # --preset smoke: every stage on a few examples, for the tests
    "smoke": dict(n_train=96, n_val=24, n_test=24, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                  sft_steps=4, batch_size=8, k=2, dpo_steps=2, rewriter_steps=2, forget_steps=2, eval_n=8,
                  log_every=1, ckpt_every=2, max_new_tokens=40, gold_chosen=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", default="all", choices=STAGES + ["all"], help="stage to run (default all)")
    g.add_argument("--run", "--run-dir", dest="run", default="runs/default",
                   help="run directory (default runs/default); under torchrun write --run-dir, since torchrun "
                        "takes --run for its own --run-path")
    g.add_argument("--force", action="store_true", help="with --stage all: redo finished stages")
    g.add_argument("--preset", choices=sorted(PRESETS), help="smoke: a tiny version of every stage, for tests")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ... (default auto)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, 0 = torch's default (tiny models often run fastest on 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of data, init, batch order, sampling (default 0)")
    g = p.add_argument_group("explicit inputs (override the run directory)")
    g.add_argument("--model", help="starting model dir (HF Llama layout): sample/warmup/mask/forget/learn")
    g.add_argument("--ref", help="reference model dir for forget/learn (default: the starting model)")
    g.add_argument("--data", help="JSONL data: pairs for warmup/mask/learn, forgetting rows for forget/rewriter")
    g.add_argument("--mask", help="mask safetensors for forget/learn")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default <run>/tokenizer.model)")
    g.add_argument("--out", help="output directory of the stage (default <run>/<stage>)")
    g = p.add_argument_group("embedded task and model (sft)")
    g.add_argument("--n-train", type=int, default=4000, help="training problems (default 4000)")
    g.add_argument("--n-val", type=int, default=500, help="validation problems, for choosing settings (default 500)")
    g.add_argument("--n-test", type=int, default=500, help="held-out test problems (default 500)")
    g.add_argument("--max-operand", type=int, default=MAX_OPERAND,
                   help=f"largest number added or taken away in a step (default {MAX_OPERAND})")
    g.add_argument("--max-value", type=int, default=MAX_VALUE,
                   help=f"largest count a problem reaches (default {MAX_VALUE})")
    g.add_argument("--lazy-rate", type=float, default=LAZY_RATE,
                   help="SFT demonstrations of 3-step problems that stop a step early: the unaligned habit the "
                        f"preference stages should remove (default {LAZY_RATE})")
    g.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    g.add_argument("--n-layers", type=int, default=4, help="layers (default 4)")
    g.add_argument("--n-heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads, GQA (default 2)")
    g.add_argument("--hidden-dim", type=int, default=352, help="SwiGLU hidden size (default 352)")
    g.add_argument("--max-len", type=int, default=128, help="max tokens of prompt + response (default 128)")
    g.add_argument("--sft-steps", type=int, default=1000, help="SFT optimizer steps (default 1000)")
    g.add_argument("--sft-lr", type=float, default=2e-3, help="SFT peak learning rate (default 2e-3)")
    g.add_argument("--eval-n", type=int, default=200, help="validation questions scored after SFT (default 200)")
    g = p.add_argument_group("optimization (every training stage)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="examples (or pairs) per micro-batch and process (default 32)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, >=2-D params (default 0)")
    g.add_argument("--warmup-frac", type=float, default=0.1, help="linear warmup fraction, then cosine (default 0.1)")
    g.add_argument("--log-every", type=int, default=50, help="progress line every N steps (default 50)")
    g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="training stages: keep only each block's input, recompute the rest in backward (less "
                        "activation memory, one more forward pass)")
    g = p.add_argument_group("sampling (Stage 0)")
    g.add_argument("--k", type=int, default=8, help="samples per question (default 8)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling p (default 1.0)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="max generated tokens (default 64)")
    g.add_argument("--max-pairs", type=int, default=5, help="pairs kept per question (default 5)")
    g.add_argument("--correct", default="steps", choices=["steps", "answer"],
                   help="a sample is correct when its final answer is right and (steps) every step is, or "
                        "(answer) whatever its steps, as in the paper; at temperature 1 most right answers of the "
                        "tiny model follow a wrong step (default steps)")
    g.add_argument("--gold-chosen", action="store_true",
                   help="questions with no correct sample pair the reference solution with the wrong ones")
    g.add_argument("--n-sample", type=int, default=1000, help="training questions to sample, 0 = all (default 1000)")
    g = p.add_argument_group("ALLO")
    g.add_argument("--beta", type=float, default=0.1, help="beta of DPO and NPO (default 0.1)")
    g.add_argument("--dpo-lr", type=float, default=1e-5,
                   help="warmup (vanilla DPO, every parameter) learning rate (default 1e-5)")
    g.add_argument("--dpo-steps", type=int, default=100, help="DPO steps of warmup AND learn: equal budgets (default 100)")
    g.add_argument("--nll", type=float, default=0.0, help="weight of an NLL term on chosen (RPO-style; default 0)")
    g.add_argument("--scorer", default="delta", choices=["delta", "grad"],
                   help="key neurons from |theta_warmup - theta_sft| or accumulated DPO gradients (default delta)")
    g.add_argument("--grad-mode", default="abs_sum", choices=["abs_sum", "sum_abs"],
                   help="--scorer grad: |sum g| (= SGD weight change) or sum |g| (default abs_sum)")
    g.add_argument("--granularity", default="entry", choices=["entry", "neuron"], help="mask unit (default entry)")
    g.add_argument("--exclude-top", type=float, default=0.0, help="skip the very top fraction, release's l (default 0)")
    g.add_argument("--forget-ratio", type=float, default=0.1, help="forgetting mask: top fraction (default 0.1)")
    g.add_argument("--learn-ratio", type=float, default=0.1, help="learning mask: top fraction; 1 = no mask (default 0.1)")
    g.add_argument("--rewriter-steps", type=int, default=300, help="rewriter training steps (default 300)")
    g.add_argument("--rewriter-lr", type=float, default=1e-3, help="rewriter learning rate (default 1e-3)")
    g.add_argument("--tau", type=float, default=0.5, help="unaligned token: rewriter p_t < tau (default 0.5)")
    g.add_argument("--weights-mode", default="hard", choices=["hard", "soft"], help="1[p<tau] or 1-p (default hard)")
    g.add_argument("--all-tokens", action="store_true", help="forget: every response token, ignore weights")
    g.add_argument("--forget-lr", type=float, default=3e-5, help="forgetting learning rate (default 3e-5)")
    g.add_argument("--forget-steps", type=int, default=50, help="forgetting steps (default 50)")
    g.add_argument("--learn-lr", type=float, default=3e-5,
                   help="learning-stage learning rate, under the learning mask (default 3e-5)")
    g.add_argument("--eps", type=float, default=0.5, help="key tokens: fraction of rejected tokens kept (default 0.5)")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parallel.init(pick_device(args.device))
    if not parallel.is_main():  # rank 0 prints the progress of all
        sys.stdout = open(os.devnull, "w")
    if parallel.world() > 1:
        print(f"torchrun: {parallel.world()} processes on {device.type}, {parallel.world()} x {args.batch_size} "
              f"examples per micro-batch, {args.grad_accum} micro-batches per step")
    run, status = args.run, 0
    try:
        if args.stage != "all":
            run_stage(args.stage, args, run, device)
            return
        if args.out or args.model or args.data or args.mask:
            raise UsageError("--out/--model/--data/--mask name one stage's inputs: use them with --stage")
        t0 = time.time()
        for stage in STAGES:
            if not args.force and os.path.exists(os.path.join(run, stage, "stage.json")):
                print(f"{stage}: finished earlier, skipped (--force to redo)")
                continue
            if args.force and parallel.is_main():
                shutil.rmtree(os.path.join(run, stage, "ckpt"), ignore_errors=True)
            parallel.barrier()
            run_stage(stage, args, run, device)
        if parallel.is_main():  # the table on rank 0 only
            rows = evaluate_run(run, "test", args.device, args.beta)
            print(markdown_table(rows, "test"))
            write_json(os.path.join(run, "eval_test.json"), {"split": "test", "rows": rows})
        print(f"pipeline: {time.time() - t0:.0f}s")
    except (UsageError, DataError) as e:
        if parallel.is_main():  # every process raises the same error
            print(f"error: {e}", file=sys.stderr)
        status = 2
    finally:  # after the except block, which frees the error's traceback and the DDP wrapper in it,
        parallel.shutdown()  # so that no process exits with the process group still referenced
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
