"""Evaluate checkpoints: held-out greedy accuracy and preference metrics, as one markdown table.

    python eval.py runs/default            # every finished stage of a run (SFT, DPO, NPO, ALLO)
    python eval.py runs/default/learn      # one checkpoint directory of a run
    python eval.py runs/default --split val
    python eval.py --questions test.jsonl --tokenizer my-llama/ --pairs out/sample/test_pairs.jsonl \
                   --ref my-llama/ my-llama/ out/warmup out/learn          # any checkpoints, your data

Accuracy: greedy decoding of each question under the prompt template, the final answer read in
--answer-format and compared with the reference's (after removing commas, "$", a trailing period
and a trailing ".0"). Pair accuracy and margin: on held-out preference pairs (`train.py --stage
sample --eval-questions` writes them), the implicit reward beta * sum_t log pi/pi_ref of every
checkpoint against the reference model (--ref; in a run, its SFT model); pair accuracy is the
fraction of pairs whose chosen reward is above the rejected one, margin the mean difference.
"""

import json
import os
import sys

import torch

from allo import token_logps
from data import (ANSWER_FORMATS, DEFAULT_TEMPLATE, DataError, HelpFormatter, Parser, collate, count,
                  extract_answer, is_correct, load_tokenizer, prompt_text, read_jsonl, read_template, real,
                  write_json)
from model import autocast, pick_device
from trainer import UsageError, load_model, one_line

# (label, stage directory) of the comparison table of a run, in the order of the method
ROWS = [("SFT", "sft"), ("DPO (full parameters)", "warmup"), ("NPO forgetting only", "forget"),
        ("ALLO (forget + learn)", "learn")]


# ----------------------------------------------------------------------------- generation and answers

@torch.no_grad()
def generate_ids(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=256):
    """Generated response token ids (EOS not included) for each prompt string (KV-cache decoding, batched)."""
    model.eval()
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts[i:i + batch_size]]
        out += model.generate(ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature, top_p, gen,
                              vocab_size=tok.vocab_size)
    return out


def cut_at_stop(text, stop):
    """The text up to the first of the stop strings (all of it when none occurs)."""
    return text[:min([i for s in stop if (i := text.find(s)) >= 0], default=len(text))]


def complete(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop=()):
    """Generated response text for each prompt string, cut at the first stop string."""
    return [cut_at_stop(tok.decode(t), stop)
            for t in generate_ids(model, tok, prompts, max_new_tokens, temperature, top_p, seed)]


def reference_answers(rows):
    """The final answer of each questions row's reference solution (its "answer" field)."""
    answers = [extract_answer(r["answer"]) for r in rows]
    for i, a in enumerate(answers):
        if a is None:
            where = rows.where(i) if hasattr(rows, "where") else f"row {i}"
            raise DataError(f"{where}: field 'answer' states no final answer (no '####', 'The answer is' or "
                            "number)")
    return answers


def accuracy(model, tok, questions, template=DEFAULT_TEMPLATE, answer_format="auto", stop=(),
             max_new_tokens=64):
    """Greedy accuracy on questions rows ({"question", "answer"})."""
    prompts = [prompt_text(q["question"], template) for q in questions]
    responses = complete(model, tok, prompts, max_new_tokens, stop=stop)
    answers = reference_answers(questions)
    return sum(is_correct(r, a, answer_format) for r, a in zip(responses, answers)) / max(1, len(questions))


# ----------------------------------------------------------------------------- preference metrics

@torch.no_grad()
def response_logps(model, tok, prompts, responses, max_len, batch_size=64):
    """Summed log pi(response | prompt) per row, float64 list."""
    model.eval()
    device = model.embed_tokens.weight.device
    sums = []
    for i in range(0, len(prompts), batch_size):
        b = collate(tok, prompts[i:i + batch_size], responses[i:i + batch_size], max_len)
        with autocast(device):
            logits = model(b["input_ids"].to(device), b["attention_mask"].to(device))
        sums += token_logps(logits.float(), b["labels"].to(device)).sum(-1).double().tolist()
    return sums


def pair_metrics(model, ref_sums, tok, pairs, beta, max_len):
    """Preference accuracy and mean implicit-reward margin of `model` on pairs, against the
    reference's summed log-probs ref_sums = (chosen, rejected)."""
    if not pairs:
        return float("nan"), float("nan")
    prompts = [p["prompt"] for p in pairs]
    chosen = response_logps(model, tok, prompts, [p["chosen"] for p in pairs], max_len)
    rejected = response_logps(model, tok, prompts, [p["rejected"] for p in pairs], max_len)
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, *ref_sums)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


class Evaluator:
    """Held-out metrics of any checkpoint: greedy accuracy on a questions file and, given pairs
    and a reference model, pair accuracy and margin (the reference's log-probs computed once)."""

    def __init__(self, questions, tokenizer, pairs=None, ref=None, *, template=DEFAULT_TEMPLATE,
                 answer_format="auto", stop=(), beta=0.1, max_len=256, max_new_tokens=64, device="auto",
                 n_questions=0, n_pairs=0):
        """questions, pairs: JSONL paths; ref: a model directory; n_questions, n_pairs: score only
        the first N (0 = all)."""
        if pairs and not ref:
            raise DataError(f"{pairs}: pair metrics need a reference model (--ref)")
        try:
            self.device = pick_device(device)
        except ValueError as e:
            raise DataError(f"--device: {e}") from None
        self.beta, self.max_len = beta, max_len
        self.template, self.answer_format, self.stop = template, answer_format, stop
        self.max_new_tokens = max_new_tokens
        self.tok = load_tokenizer(tokenizer)
        self.problems = read_jsonl(questions, "questions")[:n_questions or None]
        reference_answers(self.problems)  # every question must have one
        self.pairs = read_jsonl(pairs, "pairs")[:n_pairs or None] if pairs else []
        self.ref = ref
        self.ref_sums = ([], [])
        if self.pairs:
            model = load_model(ref, self.device, self.tok)
            prompts = [p["prompt"] for p in self.pairs]
            self.ref_sums = tuple(response_logps(model, self.tok, prompts, [p[side] for p in self.pairs],
                                                 max_len) for side in ("chosen", "rejected"))

    def __call__(self, model_dir):
        """{"accuracy", "pair_accuracy", "margin", "n_questions", "n_pairs"} of one checkpoint; the
        reference itself has no pair metrics (None)."""
        model = load_model(model_dir, self.device, self.tok)
        is_ref = self.ref is not None and os.path.samefile(model_dir, self.ref)
        pair_acc, margin = (None, None) if is_ref or not self.pairs else pair_metrics(
            model, self.ref_sums, self.tok, self.pairs, self.beta, self.max_len)
        acc = accuracy(model, self.tok, self.problems, self.template, self.answer_format, self.stop,
                       self.max_new_tokens)
        return {"accuracy": acc, "pair_accuracy": pair_acc, "margin": margin,
                "n_questions": len(self.problems), "n_pairs": len(self.pairs)}


def flag_quality(tok, scored, errors_at, tau):
    """How well the rewriter's unaligned tokens (p_t < tau) find a known first wrong step: (recall:
    share of wrong responses whose first wrong token is flagged, precision: share of flagged tokens
    at or after it, number of wrong responses judged). errors_at: the char index of each
    response's first error, -1 when nothing is wrong or it is not known."""
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


# ----------------------------------------------------------------------------- tables

def stage_info(model_dir):
    """trained fraction and wall time from a stage's stage.json (None outside a run)."""
    path = os.path.join(model_dir, "stage.json")
    if not os.path.exists(path):
        return {"trained_fraction": None, "wall_s": None}
    with open(path) as f:
        info = json.load(f)
    return {"trained_fraction": info.get("trained_fraction"), "wall_s": info.get("wall_s")}


def evaluate_models(evaluate, models):
    """Rows of the table for (label, model directory) pairs."""
    return [{"model": label, "stage": os.path.basename(os.path.normpath(d)), **evaluate(d), **stage_info(d)}
            for label, d in models]


def run_evaluator(run, split="test", device="auto", beta=0.1, n_questions=0, n_pairs=0):
    """The Evaluator of a run directory: its task's split, its held-out pairs, its SFT model as reference."""
    pairs = os.path.join(run, "sample", f"{split}_pairs.jsonl")
    task_dir = os.path.join(run, "task")
    return Evaluator(os.path.join(task_dir, f"{split}.jsonl"), os.path.join(task_dir, "tokenizer.model"),
                     pairs if os.path.exists(pairs) else None, os.path.join(run, "sft"), beta=beta,
                     device=device, n_questions=n_questions, n_pairs=n_pairs)


def evaluate_run(run, split="test", device="auto", beta=0.1, stages=ROWS):
    """Metrics of each finished stage of a run directory, with its trained fraction and wall time."""
    finished = [(label, os.path.join(run, stage)) for label, stage in stages
                if os.path.exists(os.path.join(run, stage, "stage.json"))]
    return evaluate_models(run_evaluator(run, split, device, beta), finished)


def markdown_table(rows, split, reference="the SFT model"):
    lines = [f"| model | {split} accuracy | pair accuracy | margin | trained fraction | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        frac = "-" if r["trained_fraction"] is None else f"{r['trained_fraction']:.3f}"
        pair = "-" if r["pair_accuracy"] is None else f"{100 * r['pair_accuracy']:.1f}%"
        margin = "-" if r["margin"] is None else f"{r['margin']:+.3f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {pair} | {margin} | {frac} | {wall} |")
    n = rows[0] if rows else {"n_questions": 0, "n_pairs": 0}
    lines.append(f"\n{n['n_questions']} {split} questions, {n['n_pairs']} held-out pairs; "
                 f"margin = beta * (chosen - rejected) log-ratio against {reference}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="a run directory, a checkpoint inside one, or (with --questions) "
                   "the checkpoint directories to compare")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="a run's held-out split to score (choose settings on val, report test)")
    p.add_argument("--questions", help="questions JSONL ({\"question\", \"answer\"}, GSM8K's format)")
    p.add_argument("--tokenizer", help="with --questions: tokenizer.model, tokenizer.json or a directory "
                   "holding one")
    p.add_argument("--pairs", help="held-out preference pairs JSONL, for pair accuracy and margin (with "
                   "--ref)")
    p.add_argument("--ref", help="reference model directory of the implicit reward")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="a string with {question}, or @file")
    p.add_argument("--answer-format", default="auto", choices=ANSWER_FORMATS,
                   help="how the final answer is read (auto: '####', then 'The answer is', then the last "
                        "number)")
    p.add_argument("--stop", action="append", default=[], help="a string that ends a generation (repeatable)")
    p.add_argument("--max-new-tokens", type=count(1), default=64, help="generated tokens per question")
    p.add_argument("--beta", type=real(0, open_low=True), default=0.1, help="beta of the implicit reward")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    p.add_argument("--out", help="JSON output file (default <run>/eval_<split>.json, or none)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.questions:
            if not a.tokenizer:
                raise DataError("--questions needs --tokenizer")
            evaluate = Evaluator(a.questions, a.tokenizer, a.pairs, a.ref, beta=a.beta, device=a.device,
                                 template=read_template(a.prompt_template), answer_format=a.answer_format,
                                 stop=tuple(a.stop), max_new_tokens=a.max_new_tokens)
            rows, split, out = evaluate_models(evaluate, [(d, d) for d in a.paths]), "held-out", a.out
        else:
            rows, split, out = evaluate_in_run(a)
    except (DataError, UsageError, OSError) as e:
        print(f"error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(rows, split, f"the reference model {a.ref}" if a.questions else "the SFT model"))
    if out:
        write_json(out, {"split": split, "rows": rows})
        print(f"wrote {out}")


def evaluate_in_run(a):
    """(rows, split, output file) for a run directory or one checkpoint directory inside a run."""
    if len(a.paths) != 1:
        raise DataError("several checkpoint directories: give them their --questions and --tokenizer")
    path = os.path.normpath(a.paths[0])
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, "task")):  # a run directory
        run, stages = path, ROWS
    else:
        run, stage = os.path.dirname(path), os.path.basename(path)
        stages = [(dict((s, label) for label, s in ROWS).get(stage, stage), stage)]
    for need in (f"task/{a.split}.jsonl", "task/tokenizer.model", "sft/config.json"):
        if not os.path.exists(os.path.join(run, need)):
            raise DataError(f"{os.path.join(run, need)}: not found; run `python train.py --stage sft` first, "
                            "or give --questions and --tokenizer")
    rows = evaluate_run(run, a.split, a.device, a.beta, stages=stages)
    name = f"eval_{a.split}.json" if stages is ROWS else f"eval_{a.split}_{stages[0][1]}.json"
    return rows, a.split, a.out or os.path.join(run, name)


if __name__ == "__main__":
    main()
