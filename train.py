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
import flags
import parallel
import task
from data import (DEFAULT_TEMPLATE, DataError, collate, is_correct, load_tokenizer, prompt_text, read_jsonl,
                  write_json, write_jsonl)
from eval import (accuracy, cut_at_stop, evaluate_run, flag_quality, generate_ids, markdown_table,
                  reference_answers)
from model import ModelConfig, Transformer, autocast, pick_device
from trainer import (Norms, StageOutput, UsageError, check_lengths, dpo_batch_loss, fit, full_masks,
                     load_masks, load_model, n_scored, npo_batch_loss, one_line, pair_batch,
                     pair_rows, rank_batch, reference_logps, sft_batch_loss, train_settings, trained_fraction,
                     with_reference)


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
STAGES = list(STAGE_FUNCTIONS)  # in the order they run


def parse_args(argv=None):
    return flags.parse_args(argv, STAGES, description=__doc__)


def run_stage(name, a, run, device):
    if device.type == "cuda":  # StageOutput.finish() records the stage's peak
        torch.cuda.reset_peak_memory_stats(device)
    return STAGE_FUNCTIONS[name](**flags.stage_arguments(name, a, run), device=device, force=a.force)


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
