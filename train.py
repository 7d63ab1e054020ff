"""ALLO stage by stage (Chen et al., EMNLP 2024, "Not Everything is All You Need").

    python train.py                  # every stage on the embedded default, then the results table
    python train.py --stage learn --model out/forget --data pairs.jsonl --mask learn.safetensors --out allo/
    torchrun --nproc_per_node 4 train.py --run-dir runs/ddp    # the same on 4 GPUs (or 4 CPU processes)

Stages (each reads the run directory, default runs/default/, or its explicit flags: your model and data):
  sft       the starting point: SFT of --model on --data; on the embedded default, the task is written
            into <run>/task/ and a tiny Llama trained from scratch
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

A stage writes into <out>.tmp/ and renames it to <out> (default <run>/<stage>/: Hugging Face
config.json + model.safetensors, metrics.jsonl, stage.json) when it finishes. Its fingerprint (its
settings and its inputs' identities) decides what happens when it runs again: finished alike, it is
skipped; with other settings, an error (--force redoes it). Training stages checkpoint every
--ckpt-every steps and resume from there when run again alike; the batch order is a function of
(seed, step), so a resumed run on CPU ends with the same weights as an uninterrupted one. Every bad
file or flag stops with one line and exit status 2; one process at a time works on an output.

Under torchrun (parallel.py; DistributedDataParallel, nccl on CUDA with one GPU per process, gloo
on CPU) N processes at --batch-size b train exactly like one process at batch N*b. Reference
log-probs, sampling and rewriter scoring are split over the processes too; rank 0 alone writes
files and prints. A checkpoint resumes under any number of processes with the same global batch.
"""

import os
import random
import sys
import time

import torch

import allo
import parallel
import task
from data import (ANSWER_FORMATS, DEFAULT_TEMPLATE, DataError, HelpFormatter, Parser, TokenizerFile, collate,
                  count, is_correct, load_tokenizer, prompt_text, rate, read_jsonl, read_template, real,
                  write_json, write_jsonl)
from eval import (accuracy, cut_at_stop, evaluate_run, flag_quality, generate_ids, markdown_table,
                  reference_answers)
from model import ModelConfig, Transformer, autocast, pick_device
from trainer import (Norms, StageOutput, TrainConfig, UsageError, check_lengths, dpo_batch_loss, fit,
                     full_masks, load_masks, load_model, n_scored, need, npo_batch_loss, one_line, pair_batch,
                     pair_rows, rank_batch, reference_logps, sft_batch_loss, train_settings, trained_fraction,
                     with_reference)

STAGES = ["sft", "sample", "warmup", "mask", "rewriter", "forget", "learn"]


# ----------------------------------------------------------------------------- sft

def stage_sft(*, tokenizer, data, out, steps, lr, cfg, device, model=None, arch=None,
              template=DEFAULT_TEMPLATE, eval_questions=None, eval_n=200, answer_format="auto", stop=(),
              max_new_tokens=64, force=False):
    """The starting point: SFT of `model` (a checkpoint directory) or, without one, of a new Llama of
    shape `arch` (a dict of ModelConfig fields) on `data`: {"input", "output"} rows, or questions
    rows whose target is their reference solution under the prompt template. Validation: greedy
    accuracy on the first eval_n questions of eval_questions."""
    settings = dict(steps=steps, lr=lr, arch=None if model else arch, template=template, eval_n=eval_n,
                    answer_format=answer_format, stop=stop, max_new_tokens=max_new_tokens,
                    **train_settings(cfg))
    inputs = dict(model=model, tokenizer=tokenizer, data=data, eval_questions=eval_questions)
    with StageOutput("sft", out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer)
        read = read_jsonl(data, "sft")
        rows = [r if "input" in r else {"input": prompt_text(r["question"], template),
                                        "output": " " + r["answer"]} for r in read]
        prompts, targets = [r["input"] for r in rows], [r["output"] for r in rows]
        check_lengths("sft", tok, prompts, targets, cfg.max_len, read.where)
        if model:
            policy = load_model(model, device, tok)
        else:
            torch.manual_seed(cfg.seed)
            shape = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=cfg.max_len, **arch)
            policy = Transformer(shape).to(device)
        print(f"sft: {policy.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {len(rows)} "
              f"training examples, device {device}")

        def batch_at(i):
            idx = rank_batch(len(rows), i, cfg)
            b = collate(tok, [prompts[k] for k in idx], [targets[k] for k in idx], cfg.max_len)
            return {**b, "norms": Norms(scored_tokens=n_scored(b["labels"]))}

        fit("sft", policy, full_masks(policy), batch_at,
            lambda net, b, norms: sft_batch_loss(net, b, norms, device), so.work, steps=steps, lr=lr, cfg=cfg)
        val_acc = None
        if eval_questions and parallel.is_main():  # validation on rank 0 only; the others wait in finish()
            questions = read_jsonl(eval_questions, "questions")[:eval_n]
            val_acc = accuracy(policy, tok, questions, template, answer_format, stop, max_new_tokens)
            print(f"sft: validation greedy accuracy {100 * val_acc:.1f}% on {len(questions)} questions")
        return so.finish(policy, trained_fraction=1.0, val_accuracy=val_acc)


# ----------------------------------------------------------------------------- Stage 0: sample

def stage_sample(*, model, tokenizer, questions, out, k, temperature, top_p, max_new_tokens, max_pairs, seed,
                 device, eval_questions=(), template=DEFAULT_TEMPLATE, stop=(), answer_format="auto",
                 correct="answer", gold_chosen=False, n_sample=0, force=False):
    """K responses per question of `questions` (the first n_sample, 0 = all) at `temperature`, cut at
    the first stop string; correct = the reference's final answer (the paper) and, with
    correct="steps", every step of the reference solution too (the embedded task's step checker).
    Duplicates dropped. Writes out/pairs.jsonl: every (correct, wrong) of a question, at most
    max_pairs drawn with the seed; out/forget.jsonl: every wrong response, with its question and
    reference solution; out/<name>_pairs.jsonl: held-out pairs of each file <name>.jsonl of
    eval_questions. Each process samples its contiguous share of the questions with seed + rank;
    the token ids are gathered in question order."""
    files = [("train", questions, "pairs.jsonl")]
    files += [(name, path, f"{name}_pairs.jsonl") for path in eval_questions
              for name in [os.path.splitext(os.path.basename(path))[0]]]
    if len({f[2] for f in files}) < len(files):
        raise UsageError(f"--eval-questions {' '.join(eval_questions)}: two files of one name")
    settings = dict(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    max_pairs=max_pairs, seed=seed, template=template, stop=stop, answer_format=answer_format,
                    correct=correct, gold_chosen=gold_chosen, n_sample=n_sample, world=parallel.world())
    inputs = dict(model=model, tokenizer=tokenizer, questions=questions, eval_questions=list(eval_questions))
    with StageOutput("sample", out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer)
        rows_of = {path: read_jsonl(path, "questions") for _, path, _ in files}
        answers = {path: reference_answers(rows) for path, rows in rows_of.items()}
        policy = load_model(model, device, tok)
        rng, stats = random.Random(seed), {}
        for split, path, pairs_file in files:
            n = n_sample if split == "train" and n_sample else len(rows_of[path])
            rows, final = rows_of[path][:n], answers[path][:n]
            prompts = [prompt_text(r["question"], template) for r in rows]
            mine = [q for q in prompts[parallel.shard(len(prompts))] for _ in range(k)]  # K per question
            ids = generate_ids(policy, tok, mine, max_new_tokens, temperature, top_p, seed + parallel.rank())
            ids = parallel.gather_rows([torch.tensor(t, dtype=torch.long) for t in ids], torch.long, device)
            texts = [cut_at_stop(tok.decode(t), stop) for t in ids]  # K per question, every question in order
            pairs, forget, stats[split] = sample_rows(rows, final, prompts, texts, k, correct, answer_format,
                                                      gold_chosen, max_pairs, rng)
            if parallel.is_main():
                write_jsonl(os.path.join(so.work, pairs_file), pairs)
                if split == "train":
                    write_jsonl(os.path.join(so.work, "forget.jsonl"), forget)
            s = stats[split]
            print(f"sample {split}: {len(rows)} questions x {k}: final answer right in "
                  f"{100 * s['sample_accuracy']:.1f}%, counted correct (--correct {correct}) "
                  f"{100 * s['steps_correct']:.1f}%; {len(pairs)} pairs, {len(forget)} wrong responses")
        return so.finish(**stats)


def sample_rows(rows, answers, prompts, texts, k, correct, answer_format, gold_chosen, max_pairs, rng):
    """(pairs, forgetting rows, stats) from K sampled texts per question."""
    pairs, forget, n_correct, n_right = [], [], 0, 0
    for qi, (row, answer, prompt) in enumerate(zip(rows, answers, prompts)):
        drawn = [" " + t.strip() for t in texts[qi * k:(qi + 1) * k]]
        final = [is_correct(s, answer, answer_format) for s in drawn]
        problem = task.Problem(row["question"], row["answer"], answer)
        right = [ok and (correct == "answer" or task.steps_correct(problem, s))
                 for s, ok in zip(drawn, final)]
        n_correct += sum(final)
        n_right += sum(right)
        good = list(dict.fromkeys(s for s, ok in zip(drawn, right) if ok))
        bad = list(dict.fromkeys(s for s, ok in zip(drawn, right) if not ok))
        if not good and gold_chosen:  # not in the paper: the reference stands in as chosen
            good = [" " + row["answer"]]
        combos = [(c, w) for c in good for w in bad]
        for c, w in rng.sample(combos, min(max_pairs, len(combos))):
            pairs.append({"prompt": prompt, "chosen": c, "rejected": w})
        forget += [{"prompt": prompt, "response": w, "question": row["question"], "reference": row["answer"],
                    "answer": answer} for w in bad]
    stats = {"questions": len(rows), "sample_accuracy": n_correct / max(1, len(texts)),
             "steps_correct": n_right / max(1, len(texts)), "pairs": len(pairs),
             "wrong_responses": len(forget)}
    return pairs, forget, stats


# ----------------------------------------------------------------------------- DPO: Stage 1a and Stage 3

def stage_warmup(*, model, tokenizer, data, out, lr, steps, beta, nll, cfg, device, ref=None, force=False):
    """Stage 1a: vanilla DPO on every parameter (the full-parameter DPO baseline); its weight change
    ranks the neurons in the mask stage."""
    return train_dpo("warmup", model=model, ref=ref, tokenizer=tokenizer, data=data, mask=None, out=out,
                     eps=1.0, lr=lr, steps=steps, beta=beta, nll=nll, cfg=cfg, device=device, force=force)


def stage_learn(*, model, tokenizer, data, out, lr, steps, beta, eps, nll, cfg, device, mask=None, ref=None,
                force=False):
    """Stage 3: DPO whose rejected side counts through its key tokens (eps < 1), updating only the
    learning mask's entries (mask None: every parameter). Its output is the ALLO model."""
    return train_dpo("learn", model=model, ref=ref, tokenizer=tokenizer, data=data, mask=mask, out=out,
                     eps=eps, lr=lr, steps=steps, beta=beta, nll=nll, cfg=cfg, device=device, force=force)


def train_dpo(stage, *, model, ref, tokenizer, data, mask, out, eps, lr, steps, beta, nll, cfg, device,
              force):
    """DPO on the pairs of `data` from `model`; the reference is `ref` (default: the same starting
    weights), its log-probs cached once."""
    settings = dict(eps=eps, lr=lr, steps=steps, beta=beta, nll=nll, **train_settings(cfg))
    inputs = dict(model=model, ref=ref, tokenizer=tokenizer, data=data, mask=mask)
    with StageOutput(stage, out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer)
        pairs = read_jsonl(data, "pairs")
        if not pairs:
            raise UsageError(f"{data}: no preference pairs to train on")
        check_lengths(stage, tok, *pair_rows(pairs), cfg.max_len, lambda i: pairs.where(i % len(pairs)))
        policy = load_model(model, device, tok)
        masks = load_masks(mask, policy)
        reference = policy if ref in (None, model) else load_model(ref, device, tok)
        cached = reference_logps(reference, tok, *pair_rows(pairs), cfg.max_len, device)
        del reference
        fraction = trained_fraction(masks, policy)
        print(f"{stage}: {len(pairs)} pairs, trained fraction {fraction:.3f}, eps {eps}, lr {lr}, "
              f"{steps} steps")

        def batch_at(i):
            return pair_batch(tok, pairs, rank_batch(len(pairs), i, cfg), cached, cfg.max_len)

        fit(stage, policy, masks, batch_at,
            lambda net, b, norms: dpo_batch_loss(net, b, norms, device, beta, eps, nll), so.work, steps=steps,
            lr=lr, cfg=cfg)
        return so.finish(policy, trained_fraction=fraction, steps=steps, lr=lr, eps=eps)


# ----------------------------------------------------------------------------- Stage 1b: key neurons

def stage_mask(*, model, out, scorer, forget_ratio, learn_ratio, granularity, exclude_top, cfg, device,
               warmup=None, tokenizer=None, data=None, grad_mode="abs_sum", beta=0.1, force=False):
    """Importance of every entry: |theta_warmup - theta_model| (scorer "delta") or the DPO gradient
    accumulated over the pairs of `data` (scorer "grad", cfg.batch_size pairs at a time); then one
    global top-k% threshold for the forgetting mask and one for the learning mask."""
    grad = dict(grad_mode=grad_mode, beta=beta, max_len=cfg.max_len, batch_size=cfg.batch_size)
    settings = dict(scorer=scorer, forget_ratio=forget_ratio, learn_ratio=learn_ratio,
                    granularity=granularity, exclude_top=exclude_top, **(grad if scorer == "grad" else {}))
    inputs = dict(model=model, warmup=warmup, tokenizer=tokenizer, data=data)
    with StageOutput("mask", out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer) if scorer == "grad" else None
        start = load_model(model, device, tok)
        if scorer == "delta":
            warm = load_model(warmup, device)
            shapes = lambda m: {n: p.shape for n, p in m.named_parameters()}  # noqa: E731
            if shapes(warm) != shapes(start):
                raise UsageError(f"{warmup}: the warmup model's parameters are not those of {model}")
            scores = allo.importance_from_delta(dict(start.named_parameters()), dict(warm.named_parameters()))
        else:
            pairs = read_jsonl(data, "pairs")
            n = len(pairs)
            check_lengths("mask", tok, *pair_rows(pairs), cfg.max_len, lambda i: pairs.where(i % n))
            cached = reference_logps(start, tok, *pair_rows(pairs), cfg.max_len, device)
            batches = (pair_batch(tok, pairs, list(range(i, min(n, i + cfg.batch_size))), cached, cfg.max_len)
                       for i in range(0, n, cfg.batch_size))
            # gradients of the vanilla-DPO loss, each batch's share of the mean over all n pairs
            scores = allo.grad_importance(
                start, lambda m, b: dpo_batch_loss(m, b, Norms(pairs=n), device, beta, 1.0), batches,
                mode=grad_mode)
        info = {}
        for name, ratio in (("forget", forget_ratio), ("learn", learn_ratio)):
            masks = allo.select_masks(scores, ratio, granularity=granularity, exclude_top=exclude_top)
            if parallel.is_main():
                allo.save_masks(os.path.join(so.work, f"{name}.safetensors"), masks)
            info[f"{name}_fraction"] = trained_fraction(masks)
            print(f"mask {name}: {100 * info[f'{name}_fraction']:.2f}% of entries; by module type:")
            print(allo.format_table([r for r in allo.mask_summary(masks) if r["by"] == "type"]))
        print("mask by layer (learning mask):")
        print(allo.format_table([r for r in allo.mask_summary(masks) if r["by"] == "layer"]))
        return so.finish(scorer=scorer, granularity=granularity, **info)


# ----------------------------------------------------------------------------- Stage 2a: the rewriter

def rewriter_prompt(row):
    """What the rewriter sees: the question, the response to fix and a correct reference solution.
    The reference comes last, right before the rewrite, with a response's leading space, so that
    its tokens are those the rewrite copies (the README tells why this order)."""
    return f"Question: {row['question']}\nDraft:{row['response']}\nReference: {row['reference']}\nRewrite:"


def stage_rewriter(*, model, tokenizer, data, out, steps, lr, tau, weights_mode, cfg, device, rewrites=None,
                   pairs=None, force=False):
    """Stage 2a: train the rewriter, a copy of `model`, to turn (question, wrong response, reference
    solution) into the response minimally corrected, then score every wrong response of `data`
    (forgetting rows with their "question" and "reference"): p_t of each of its tokens, unaligned =
    p_t < tau. The target of a wrong response is its rewrite in `rewrites` ({"prompt", "response",
    "rewrite"}, e.g. written by a stronger model) or else, a weaker proxy, the reference solution;
    the correct responses (the chosen side of `pairs`) are rewrites of themselves, as in RLMEC.
    Writes out/forget_weighted.jsonl."""
    settings = dict(steps=steps, lr=lr, tau=tau, weights_mode=weights_mode, **train_settings(cfg))
    inputs = dict(model=model, tokenizer=tokenizer, data=data, rewrites=rewrites, pairs=pairs)
    with StageOutput("rewriter", out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer)
        forget = read_jsonl(data, "forget")
        examples, errors_at, n_given = rewrite_examples(forget, rewrites, pairs)
        max_len = 3 * cfg.max_len
        check_lengths("rewriter", tok, [e[0] for e in examples], [e[1] for e in examples], max_len,
                      lambda i: f"{data} (rewrite example {i + 1})")
        rewriter = load_model(model, device, tok)
        print(f"rewriter: {len(examples)} rewrite examples; of {len(forget)} wrong responses {n_given} with "
              f"a given rewrite, {len(forget) - n_given} with the reference solution as target")

        def batch_at(i):
            idx = rank_batch(len(examples), i, cfg)
            b = collate(tok, [examples[k][0] for k in idx], [examples[k][1] for k in idx], max_len)
            return {**b, "norms": Norms(scored_tokens=n_scored(b["labels"]))}

        fit("rewriter", rewriter, full_masks(rewriter), batch_at,
            lambda net, b, norms: sft_batch_loss(net, b, norms, device), so.work, steps=steps, lr=lr, cfg=cfg)
        scored = score_tokens(rewriter, tok, forget, tau, weights_mode, cfg.batch_size, max_len, device)
        if parallel.is_main():
            write_jsonl(os.path.join(so.work, "forget_weighted.jsonl"), scored)
        info = {"unaligned_tokens": sum(sum(w > 0 for w in s["weights"]) for s in scored),
                "tokens": sum(len(s["weights"]) for s in scored)}
        line = f"rewriter: {info['unaligned_tokens']}/{info['tokens']} response tokens unaligned " \
               f"(p_t < {tau})"
        if any(at >= 0 for at in errors_at):  # the first wrong step is known (the embedded task's rewrites)
            recall, precision, found = flag_quality(tok, scored, errors_at, tau)
            info.update(first_error_recall=recall, flag_precision=precision)
            line += (f"; first wrong step found in {100 * recall:.1f}% of {found} wrong responses; "
                     f"{100 * precision:.1f}% of flagged tokens lie at or after it")
        print(line)
        return so.finish(rewriter, trained_fraction=1.0, **info)


def rewrite_examples(forget, rewrites, pairs):
    """The rewriter's (prompt, target) examples, deduplicated: each wrong response with its given
    rewrite or, without one, its reference solution; each correct response (pairs' chosen side) as
    itself. Also the char index of each wrong response's first error (-1: not known) and the number
    of given rewrites."""
    for i, r in enumerate(forget):
        if not all(isinstance(r.get(f), str) for f in ("question", "reference")):
            raise DataError(f"{forget.where(i)}: the rewriter needs the fields 'question' and 'reference' "
                            "(the sample stage writes them)")
    given = {(r["prompt"], r["response"]): r for r in (read_jsonl(rewrites, "rewrites") if rewrites else [])}
    fixes = [given.get((r["prompt"], r["response"])) for r in forget]
    lead = [r["response"][:len(r["response"]) - len(r["response"].lstrip())] for r in forget]  # leading space
    examples = [(rewriter_prompt(r), fix["rewrite"] if fix else space + r["reference"])
                for r, fix, space in zip(forget, fixes, lead)]
    by_prompt = {r["prompt"]: r for r in forget}
    for p in read_jsonl(pairs, "pairs") if pairs else []:  # a correct response is its own rewrite
        if p["prompt"] in by_prompt:
            row = {**by_prompt[p["prompt"]], "response": p["chosen"]}
            examples.append((rewriter_prompt(row), p["chosen"]))
    if not examples:
        raise UsageError(f"{forget.path}: no wrong responses to rewrite")
    errors_at = [fix.get("first_error", -1) if fix else -1 for fix in fixes]
    return list(dict.fromkeys(examples)), errors_at, sum(f is not None for f in fixes)


def score_tokens(rewriter, tok, forget, tau, weights_mode, batch_size, max_len, device):
    """p_t and w_t of every token of every forgetting response, teacher-forced as the rewrite of
    itself; each process scores its contiguous share and every process gets them all, in order."""
    mine = forget[parallel.shard(len(forget))]
    p_rows, w_rows = [], []  # p_t, w_t [n_tok] of each response of this process
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        b = collate(tok, [rewriter_prompt(r) for r in rows], [r["response"] for r in rows], max_len)
        b = {k: b[k].to(device) for k in ("input_ids", "labels")}  # right-padded: no attention mask needed
        with autocast(device):
            probs = allo.rewriter_token_probs(rewriter, b)  # [B,T], 0 off-target
        weights = allo.unaligned_token_weights(probs, b["labels"], tau, weights_mode)
        for r, p_row, w_row, lab in zip(rows, probs, weights, b["labels"]):
            n_tok = len(tok.encode(r["response"]))
            p_rows.append(p_row[lab != -100][:n_tok])  # drop the EOS target
            w_rows.append(w_row[lab != -100][:n_tok])
    p_rows = parallel.gather_rows(p_rows, torch.float32, device)  # every response, in order
    w_rows = parallel.gather_rows(w_rows, torch.float32, device)
    return [{"prompt": r["prompt"], "response": r["response"], "weights": w.tolist(), "probs": p.tolist()}
            for r, p, w in zip(forget, p_rows, w_rows, strict=True)]


# ----------------------------------------------------------------------------- Stage 2b: forget

def stage_forget(*, model, tokenizer, data, out, lr, steps, beta, all_tokens, cfg, device, mask=None,
                 ref=None, force=False):
    """Stage 2b, token-level NPO: -w_t log sigmoid(-beta r_t) on the weighted (unaligned) tokens of
    the wrong responses of `data` (all_tokens: every token); reference = `ref` (default: the
    starting model); only the entries of `mask` move (None: every parameter)."""
    settings = dict(lr=lr, steps=steps, beta=beta, all_tokens=all_tokens, **train_settings(cfg))
    inputs = dict(model=model, ref=ref, tokenizer=tokenizer, data=data, mask=mask)
    with StageOutput("forget", out, settings, inputs, device, force) as so:
        if so.finished:
            return so.info
        tok = load_tokenizer(tokenizer)
        rows = read_jsonl(data, "forget", tok)
        if not rows:
            raise UsageError(f"{data}: no forgetting examples")
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        check_lengths("forget", tok, prompts, responses, cfg.max_len, rows.where)
        policy = load_model(model, device, tok)
        masks = load_masks(mask, policy)
        reference = policy if ref in (None, model) else load_model(ref, device, tok)
        weights = None if all_tokens else [r.get("weights", [1.0] * len(tok.encode(r["response"])))
                                           for r in rows]
        cached = reference_logps(reference, tok, prompts, responses, cfg.max_len, device)
        del reference
        fraction = trained_fraction(masks, policy)
        print(f"forget: {len(rows)} wrong responses, trained fraction {fraction:.3f}, "
              f"{'all tokens' if all_tokens else 'unaligned tokens'}")

        def batch_at(i):
            idx = rank_batch(len(rows), i, cfg)
            b = collate(tok, [prompts[k] for k in idx], [responses[k] for k in idx], cfg.max_len,
                        None if weights is None else [weights[k] for k in idx])
            if weights is None:  # NPO on every response token: the EOS target too
                b["weights"] = (b["labels"] != -100).float()
            b["norms"] = Norms(weighted_tokens=int((b["weights"] != 0).sum()))
            return with_reference(b, cached, idx)

        fit("forget", policy, masks, batch_at,
            lambda net, b, norms: npo_batch_loss(net, b, norms, device, beta), so.work, steps=steps, lr=lr,
            cfg=cfg)
        return so.finish(policy, trained_fraction=fraction, steps=steps)


# ----------------------------------------------------------------------------- the command line

STAGE_FUNCTIONS = {"sft": stage_sft, "sample": stage_sample, "warmup": stage_warmup, "mask": stage_mask,
                   "rewriter": stage_rewriter, "forget": stage_forget, "learn": stage_learn}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def stage_arguments(name, a, run):
    """The keyword arguments of stage `name` from the flags `a`: every input path is its flag or,
    without one, its place in the run directory (which must exist); hyperparameters from flags.
    Without --data (sft) or --questions (sample) the stage runs on the embedded task, whose files
    task.py writes into <run>/task/."""
    def at(flag, rel, maker):  # an input: the flag, else the run directory's file written by `maker`
        return flag or need(os.path.join(run, rel), maker)

    def model(stage):  # a model: the run directory's (its config.json must exist)
        return os.path.dirname(need(os.path.join(run, stage, "config.json"), stage))

    embedded = not (a.data if name == "sft" else a.questions)
    if name == "sft" and embedded:
        write_embedded_task(a, os.path.join(run, "task"))
    own = a.model if a.model and any(os.path.exists(os.path.join(a.model, f)) for f in TOKENIZER_FILES) \
        else None
    tokenizer = TokenizerFile(at(a.tokenizer or own, "task/tokenizer.model", "sft"), a.bos_token, a.eos_token,
                              a.pad_token)
    cfg = train_config(a)
    common = dict(out=a.out or os.path.join(run, name), tokenizer=tokenizer)
    generation = dict(template=read_template(a.prompt_template), stop=tuple(a.stop),
                      answer_format=a.answer_format, max_new_tokens=a.max_new_tokens)
    if name == "sft":
        arch = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                    hidden_dim=a.hidden_dim)
        val = os.path.join(run, "task", "val.jsonl") if embedded else (a.eval_questions or [None])[0]
        return dict(common, **generation, model=a.model, arch=arch, steps=a.sft_steps, lr=a.sft_lr, cfg=cfg,
                    data=a.data or os.path.join(run, "task", "sft.jsonl"), eval_n=a.eval_n,
                    eval_questions=val)
    if name == "sample":
        files = [at(None, f"task/{s}.jsonl", "sft") for s in ("train", "val", "test")] if embedded else \
            [a.questions] + (a.eval_questions or [])
        return dict(common, **generation, model=a.model or model("sft"), questions=files[0],
                    eval_questions=files[1:], k=a.k, temperature=a.temperature, top_p=a.top_p,
                    max_pairs=a.max_pairs, seed=a.seed, gold_chosen=a.gold_chosen, n_sample=a.n_sample,
                    correct=a.correct or ("steps" if embedded else "answer"))
    if name == "mask":
        grad = a.scorer == "grad"
        return dict(common, model=a.model or model("sft"), scorer=a.scorer, grad_mode=a.grad_mode,
                    data=at(a.data, "sample/pairs.jsonl", "sample") if grad else None,
                    warmup=None if grad else a.warmup or model("warmup"), forget_ratio=a.forget_ratio,
                    learn_ratio=a.learn_ratio, granularity=a.granularity, exclude_top=a.exclude_top,
                    beta=a.beta, cfg=cfg)
    if name == "rewriter":
        return dict(common, **rewriter_inputs(a, run), model=a.rewriter_init or a.model or model("sft"),
                    steps=a.rewriter_steps, lr=a.rewriter_lr, tau=a.tau, weights_mode=a.weights_mode, cfg=cfg)
    dpo = dict(common, ref=a.ref, beta=a.beta, cfg=cfg)
    if name == "warmup":
        return dict(dpo, model=a.model or model("sft"), data=at(a.data, "sample/pairs.jsonl", "sample"),
                    lr=a.dpo_lr, steps=a.dpo_steps, nll=a.nll)
    if name == "forget":
        mask = a.mask or (at(None, "mask/forget.safetensors", "mask") if a.forget_ratio < 1 else None)
        return dict(dpo, model=a.model or model("sft"), mask=mask, lr=a.forget_lr, steps=a.forget_steps,
                    data=at(a.data, "rewriter/forget_weighted.jsonl", "rewriter"), all_tokens=a.all_tokens)
    mask = a.mask or (at(None, "mask/learn.safetensors", "mask") if a.learn_ratio < 1 else None)
    return dict(dpo, model=a.model or model("forget"), data=at(a.data, "sample/pairs.jsonl", "sample"),
                mask=mask, lr=a.learn_lr, steps=a.dpo_steps, eps=a.eps, nll=a.nll)


def rewriter_inputs(a, run):
    """The rewriter's data, rewrites and pairs. In the run directory: its sample stage's wrong
    responses and pairs, and, on the embedded task, task.py's minimal corrections of them."""
    if a.data:
        return dict(data=a.data, rewrites=a.rewrites, pairs=a.pairs)
    data = need(os.path.join(run, "sample", "forget.jsonl"), "sample")
    rewrites = a.rewrites
    if not rewrites and os.path.exists(os.path.join(run, "task", "task.json")):  # the embedded task
        rewrites = os.path.join(run, "task", "rewrites.jsonl")
        if parallel.is_main():
            task.write_rewrites(read_jsonl(data, "forget"), rewrites)
        parallel.barrier()
    pairs = a.pairs or need(os.path.join(run, "sample", "pairs.jsonl"), "sample")
    return dict(data=data, rewrites=rewrites, pairs=pairs)


def write_embedded_task(a, folder):
    """The embedded task's files in `folder`, unless they are there with these settings."""
    settings = dict(seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, lazy_rate=a.lazy_rate,
                    max_operand=a.max_operand, max_value=a.max_value)
    if not task.written_with(folder, settings, a.force):  # every process checks, rank 0 writes
        if parallel.is_main():
            task.write_task(folder, **settings)
        parallel.barrier()


def train_config(a):
    return TrainConfig(batch_size=a.batch_size, grad_accum=a.grad_accum, weight_decay=a.weight_decay,
                       warmup_frac=a.warmup_frac, max_len=a.max_len, log_every=a.log_every,
                       ckpt_every=a.ckpt_every, grad_checkpoint=a.grad_checkpoint, compile=a.compile,
                       seed=a.seed)


def run_stage(name, a, run, device):
    if device.type == "cuda":  # StageOutput.finish() records the stage's peak
        torch.cuda.reset_peak_memory_stats(device)
    return STAGE_FUNCTIONS[name](**stage_arguments(name, a, run), device=device, force=a.force)


def run_all(a, run, device):
    """Every stage in order (each skips itself when finished alike), then the test table."""
    explicit = [f"--{k.replace('_', '-')}" for k in ("out", "model", "data", "mask", "questions", "rewrites",
                                                       "warmup", "pairs", "rewriter_init") if getattr(a, k)]
    if explicit:
        raise UsageError(f"{explicit[0]} names one stage's input: use it with --stage")
    t0 = time.time()
    for stage in STAGES:
        run_stage(stage, a, run, device)
    if parallel.is_main():  # the table on rank 0 only
        rows = evaluate_run(run, "test", a.device, a.beta)
        print(markdown_table(rows, "test"))
        write_json(os.path.join(run, "eval_test.json"), {"split": "test", "rows": rows})
    print(f"pipeline: {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------- flags

PRESETS = {  # --preset smoke: every stage on a few examples, for the tests
    "smoke": dict(n_train=96, n_val=24, n_test=24, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                  sft_steps=4, batch_size=8, k=2, dpo_steps=2, rewriter_steps=2, forget_steps=2, eval_n=8,
                  log_every=1, ckpt_every=2, max_new_tokens=40, gold_chosen=True),
}


def parse_args(argv=None):
    """The flags, each checked (one line and exit status 2 for a bad one)."""
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    add_input_flags(p)
    add_task_flags(p)
    add_training_flags(p)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    a = p.parse_args(argv)
    check_flags(p, a)
    return a


def check_flags(p, a):
    """What no single flag's type can check, before any work."""
    for name, ratio in (("--forget-ratio", a.forget_ratio), ("--learn-ratio", a.learn_ratio)):
        if a.exclude_top + ratio > 1:
            p.error(f"argument {name}: --exclude-top {a.exclude_top:g} + {ratio:g} is more than every entry")
    if a.dim % a.n_heads or a.n_heads % a.n_kv_heads or (a.dim // a.n_heads) % 2:
        p.error(f"argument --dim: {a.dim} with --n-heads {a.n_heads} and --n-kv-heads {a.n_kv_heads}: dim "
                "must divide into heads of even size, heads into key/value heads")
    try:
        pick_device(a.device)
    except ValueError as e:
        p.error(f"argument --device: {e}")


def add_input_flags(p):
    """What to run and its explicit inputs."""
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", default="all", choices=STAGES + ["all"], help="stage to run")
    g.add_argument("--run", "--run-dir", dest="run", default="runs/default",
                   help="run directory; under torchrun write --run-dir (torchrun's --run is its --run-path)")
    g.add_argument("--force", action="store_true",
                   help="redo a finished stage, start an unfinished one over, rewrite the embedded task")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="smoke: a tiny version of every stage, for tests")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=count(0), default=0,
                   help="CPU threads for torch, 0 = torch's default (tiny models often run fastest on 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of data, init, batch order, sampling")
    g = p.add_argument_group("explicit inputs (each overrides its place in the run directory)")
    g.add_argument("--model",
                   help="starting model dir (Hugging Face Llama layout); sft: without it, a new one")
    g.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: "
                   "the --model directory's, else <run>/task/tokenizer.model)")
    g.add_argument("--data", help="JSONL: for sft {input, output} or questions rows; pairs for warmup, mask, "
                   "learn; forgetting rows for rewriter, forget")
    g.add_argument("--questions", help="sample: questions JSONL in GSM8K's format, {question, answer}")
    g.add_argument("--eval-questions", nargs="+",
                   help="sample: questions files for held-out pairs; sft: validation accuracy on the first")
    g.add_argument("--ref",
                   help="reference model dir for warmup, forget, learn (default: the starting model)")
    g.add_argument("--warmup", help="mask: the warmup model of the delta scorer (default <run>/warmup)")
    g.add_argument("--mask", help="mask safetensors for forget, learn")
    g.add_argument("--rewrites", help="rewriter: minimal-edit rewrites {prompt, response, rewrite} of the "
                   "wrong responses (default: on the embedded task, task.py's; otherwise each response's "
                   "target is its reference solution, a weaker proxy)")
    g.add_argument("--pairs", help="rewriter: pairs whose chosen responses are trained as their own rewrites "
                   "(default <run>/sample/pairs.jsonl without --data)")
    g.add_argument("--rewriter-init", help="rewriter: its starting weights (default: --model)")
    g.add_argument("--out", help="output directory of the stage (default <run>/<stage>)")
    g.add_argument("--bos-token", help="override the tokenizer's BOS token")
    g.add_argument("--eos-token", help="override the tokenizer's EOS token")
    g.add_argument("--pad-token", help="override the tokenizer's PAD token (default: its own, else EOS)")


def add_task_flags(p):
    """The embedded task and the model trained on it from scratch."""
    g = p.add_argument_group("embedded task and model (sft without --data)")
    g.add_argument("--n-train", type=count(1), default=4000, help="training problems")
    g.add_argument("--n-val", type=count(1), default=500, help="validation problems, for choosing settings")
    g.add_argument("--n-test", type=count(1), default=500, help="held-out test problems")
    g.add_argument("--max-operand", type=count(1), default=task.MAX_OPERAND,
                   help="largest number added or taken")
    g.add_argument("--max-value", type=count(1), default=task.MAX_VALUE,
                   help="largest count a problem reaches")
    g.add_argument("--lazy-rate", type=real(0, 1), default=task.LAZY_RATE,
                   help="SFT demonstrations of 3-step problems that stop a step early: the unaligned habit "
                        "the preference stages should remove")
    g.add_argument("--dim", type=count(1), default=128, help="model width")
    g.add_argument("--n-layers", type=count(1), default=4, help="layers")
    g.add_argument("--n-heads", type=count(1), default=4, help="attention heads")
    g.add_argument("--n-kv-heads", type=count(1), default=2, help="key/value heads (grouped-query attention)")
    g.add_argument("--hidden-dim", type=count(1), default=352, help="SwiGLU hidden size")
    g.add_argument("--sft-steps", type=count(1), default=1000, help="SFT optimizer steps")
    g.add_argument("--sft-lr", type=rate, default=2e-3, help="SFT peak learning rate")
    g.add_argument("--eval-n", type=count(0), default=200, help="validation questions scored after SFT")


def add_training_flags(p):
    """Optimization, sampling and generation."""
    g = p.add_argument_group("optimization (every training stage)")
    g.add_argument("--max-len", type=count(2), default=128, help="max tokens of prompt + response")
    g.add_argument("--batch-size", type=count(1), default=32,
                   help="examples (or pairs) per micro-batch, process")
    g.add_argument("--grad-accum", type=count(1), default=1, help="micro-batches per optimizer step")
    g.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay, >=2-D params")
    g.add_argument("--warmup-frac", type=real(0, 1), default=0.1, help="linear warmup fraction, then cosine")
    g.add_argument("--log-every", type=count(1), default=50, help="progress line every N steps")
    g.add_argument("--ckpt-every", type=count(1), default=100, help="checkpoint every N steps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward in training "
                   "(faster steps on a GPU after tens of seconds of compiling; results agree with eager "
                   "within float rounding)")
    g.add_argument("--grad-checkpoint", action="store_true", help="keep only each block's input, recompute "
                   "the rest in backward (less activation memory, one more forward pass)")
    g = p.add_argument_group("sampling and generation (Stage 0, validation)")
    g.add_argument("--k", type=count(1), default=8, help="samples per question")
    g.add_argument("--temperature", type=real(0), default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=real(0, 1, open_low=True), default=1.0, help="nucleus sampling p")
    g.add_argument("--max-new-tokens", type=count(1), default=64, help="max generated tokens")
    g.add_argument("--max-pairs", type=count(0), default=5, help="pairs kept per question")
    g.add_argument("--correct", choices=["steps", "answer"], help="a sample is correct when its final answer "
                   "is right (answer, the paper's rule) and, with steps, every number and sign of the "
                   "reference's steps too (the embedded task's step checker, and its default there)")
    g.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                   help="a question's prompt: a string with {question}, or @file (few-shot, chat formats)")
    g.add_argument("--stop", action="append", default=[],
                   help="a string that ends a generation, besides EOS (repeatable)")
    g.add_argument("--answer-format", default="auto", choices=ANSWER_FORMATS, help="how a final answer is "
                   "read: auto tries '####', then 'The answer is', then the last number")
    g.add_argument("--gold-chosen", action="store_true",
                   help="questions with no correct sample pair the reference solution with the wrong ones")
    g.add_argument("--n-sample", type=count(0), default=1000, help="training questions to sample, 0 = all")
    add_allo_flags(p)


def add_allo_flags(p):
    """ALLO's own settings."""
    g = p.add_argument_group("ALLO")
    g.add_argument("--beta", type=real(0, open_low=True), default=0.1, help="beta of DPO and NPO")
    g.add_argument("--dpo-lr", type=rate, default=1e-5,
                   help="warmup (vanilla DPO, every parameter) learning rate")
    g.add_argument("--dpo-steps", type=count(1), default=100,
                   help="DPO steps of warmup AND learn: equal budgets")
    g.add_argument("--nll", type=real(0), default=0.0, help="weight of an NLL term on chosen (RPO-style)")
    g.add_argument("--scorer", default="delta", choices=["delta", "grad"],
                   help="key neurons from |theta_warmup - theta_sft| or accumulated DPO gradients")
    g.add_argument("--grad-mode", default="abs_sum", choices=["abs_sum", "sum_abs"],
                   help="--scorer grad: |sum g| (= SGD weight change) or sum |g|")
    g.add_argument("--granularity", default="entry", choices=["entry", "neuron"], help="mask unit")
    g.add_argument("--exclude-top", type=real(0, 1), default=0.0,
                   help="skip the very top fraction (release's l)")
    g.add_argument("--forget-ratio", type=real(0, 1), default=0.1, help="forgetting mask: top fraction")
    g.add_argument("--learn-ratio", type=real(0, 1), default=0.1,
                   help="learning mask: top fraction; 1 = no mask")
    g.add_argument("--rewriter-steps", type=count(1), default=300, help="rewriter training steps")
    g.add_argument("--rewriter-lr", type=rate, default=1e-3, help="rewriter learning rate")
    g.add_argument("--tau", type=real(0, 1, open_low=True), default=0.5,
                   help="unaligned token: rewriter p_t < tau")
    g.add_argument("--weights-mode", default="hard", choices=["hard", "soft"], help="1[p<tau] or 1-p")
    g.add_argument("--all-tokens", action="store_true", help="forget: every response token, ignore weights")
    g.add_argument("--forget-lr", type=rate, default=3e-5, help="forgetting learning rate")
    g.add_argument("--forget-steps", type=count(1), default=50, help="forgetting steps")
    g.add_argument("--learn-lr", type=rate, default=3e-5, help="learning-stage learning rate, under the mask")
    g.add_argument("--eps", type=real(0, 1, open_low=True), default=0.5,
                   help="key tokens: share of rejected kept")


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = parallel.init(pick_device(a.device))
    if not parallel.is_main():  # rank 0 prints the progress of all
        sys.stdout = open(os.devnull, "w")
    if parallel.world() > 1:
        print(f"torchrun: {parallel.world()} processes on {device.type}, {parallel.world()} x {a.batch_size} "
              f"examples per micro-batch, {a.grad_accum} micro-batches per step")
    status = 0
    try:
        if a.stage == "all":
            run_all(a, a.run, device)
        else:
            run_stage(a.stage, a, a.run, device)
    except (UsageError, DataError, OSError) as e:  # OSError: an output that cannot be written, a full disk
        if parallel.is_main():  # every process raises the same error
            print(f"error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        status = 2
    finally:  # after the except block, which frees the error's traceback and the DDP wrapper in it,
        parallel.shutdown()  # so that no process exits with the process group still referenced
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
