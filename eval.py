"""Evaluate checkpoints of an ALLO run: held-out greedy accuracy and preference metrics.

    python eval.py runs/default            # table of every finished stage (SFT, DPO, NPO, ALLO)
    python eval.py runs/default/learn      # one checkpoint directory
    python eval.py runs/default --split val

Accuracy: greedy decoding on the embedded task's questions, answer after the last
"The answer is" compared with the reference. Pair accuracy and margin: on held-out preference
pairs (sampled from the SFT model on the same split's questions by `train.py --stage sample`),
the implicit reward beta * sum_t log pi/pi_ref is computed against the SFT model for every
checkpoint; pair accuracy is the fraction of pairs whose chosen reward is above the rejected one,
margin the mean difference.
"""

import argparse
import json
import os
import sys

import torch

from allo import token_logps
from data import DataError, Tokenizer, collate, is_correct, prompt_text, read_jsonl, write_json
from model import Transformer, autocast, pick_device
from task import load_problems

# (label, stage directory) of the comparison table, in the order of the method
ROWS = [("SFT", "sft"), ("DPO (full parameters)", "warmup"), ("NPO forgetting only", "forget"),
        ("ALLO (forget + learn)", "learn")]


@torch.no_grad()
def generate_ids(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=256):
    """Generated response token ids (EOS not included) for each prompt string (KV-cache decoding, batched)."""
    model.eval()
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts[i:i + batch_size]]
        out += model.generate(ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature, top_p, gen)
    return out


def complete(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=256):
    """Generated response text for each prompt string."""
    return [tok.decode(t) for t in generate_ids(model, tok, prompts, max_new_tokens, temperature, top_p, seed,
                                                 batch_size)]


def accuracy(model, tok, problems, max_new_tokens=64):
    responses = complete(model, tok, [prompt_text(p.question) for p in problems], max_new_tokens)
    return sum(is_correct(r, p.answer) for r, p in zip(responses, problems)) / max(1, len(problems))


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
    """Held-out metrics of any checkpoint of a run: greedy accuracy on the split's questions,
    and pair accuracy and margin on the split's held-out pairs against the run's SFT model
    (the reference's log-probs are computed once, here)."""

    def __init__(self, run, split="test", device="auto", beta=0.1, max_len=256, n_questions=0, n_pairs=0):
        """n_questions, n_pairs: score only the first N of the split (0 = all)."""
        self.device, self.beta, self.max_len = pick_device(device), beta, max_len
        self.tok = Tokenizer(os.path.join(run, "tokenizer.model"))
        self.problems = load_problems(os.path.join(run, "task", f"{split}.jsonl"))[:n_questions or None]
        pairs_file = os.path.join(run, "sample", f"{split}_pairs.jsonl")
        self.pairs = (read_jsonl(pairs_file, "pairs") if os.path.exists(pairs_file) else [])[:n_pairs or None]
        self.sft_dir = os.path.join(run, "sft")
        ref = Transformer.from_pretrained(self.sft_dir).to(self.device)
        prompts = [p["prompt"] for p in self.pairs]
        self.ref_sums = tuple(response_logps(ref, self.tok, prompts, [p[side] for p in self.pairs], max_len)
                              for side in ("chosen", "rejected"))

    def __call__(self, model_dir):
        """{"accuracy", "pair_accuracy", "margin", "n_questions", "n_pairs"} of one checkpoint; the
        SFT model is the reference of the implicit reward, so its pair metrics are None."""
        model = Transformer.from_pretrained(model_dir).to(self.device)
        is_ref = os.path.samefile(model_dir, self.sft_dir)
        pair_acc, margin = (None, None) if is_ref else pair_metrics(
            model, self.ref_sums, self.tok, self.pairs, self.beta, self.max_len)
        return {"accuracy": accuracy(model, self.tok, self.problems), "pair_accuracy": pair_acc,
                "margin": margin, "n_questions": len(self.problems), "n_pairs": len(self.pairs)}


def flag_quality(tok, scored, errors_at, tau):
    """How well the unaligned tokens (p_t < tau) find the known first wrong step: (recall: share of
    wrong responses whose first wrong token is flagged, precision: share of flagged tokens at or
    after it, number of wrong responses judged). errors_at: the char index of each response's
    first error, -1 when nothing is wrong."""
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


def evaluate_run(run, split="test", device="auto", beta=0.1, stages=ROWS):
    """Metrics of each finished stage of a run directory, with its trained fraction and wall time."""
    evaluate = Evaluator(run, split, device, beta)
    rows = []
    for label, stage in stages:
        d = os.path.join(run, stage)
        if not os.path.exists(os.path.join(d, "stage.json")):
            continue
        with open(os.path.join(d, "stage.json")) as f:
            info = json.load(f)
        rows.append({"model": label, "stage": stage, **evaluate(d),
                     "trained_fraction": info.get("trained_fraction"), "wall_s": info.get("wall_s")})
    return rows


def markdown_table(rows, split):
    lines = [f"| model | {split} accuracy | pair accuracy | margin | trained fraction | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        frac = "-" if r["trained_fraction"] is None else f"{r['trained_fraction']:.3f}"
        pair = "-" if r["pair_accuracy"] is None else f"{100 * r['pair_accuracy']:.1f}%"
        margin = "-" if r["margin"] is None else f"{r['margin']:+.3f}"
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {pair} | {margin} | {frac} | {r['wall_s']:.0f} |")
    n = rows[0] if rows else {"n_questions": 0, "n_pairs": 0}
    lines.append(f"\n{n['n_questions']} {split} questions, {n['n_pairs']} held-out pairs; "
                 "margin = beta * (chosen - rejected) log-ratio against the SFT model.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run directory (runs/default) or one checkpoint directory inside it")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="held-out split to score (choose settings on val, report test; default test)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ... (default auto)")
    p.add_argument("--out", help="JSON output file (default <run>/eval_<split>.json)")
    a = p.parse_args()
    path = os.path.normpath(a.path)
    try:
        if os.path.exists(os.path.join(path, "tokenizer.model")):  # a run directory
            run, stages = path, ROWS
        else:  # a checkpoint directory inside a run
            run, stage = os.path.dirname(path), os.path.basename(path)
            stages = [(dict((s, l) for l, s in ROWS).get(stage, stage), stage)]
        for need in ("tokenizer.model", f"task/{a.split}.jsonl", "sft/config.json"):
            if not os.path.exists(os.path.join(run, need)):
                raise DataError(f"{os.path.join(run, need)}: not found; run `python train.py --stage sft` first")
        rows = evaluate_run(run, a.split, a.device, a.beta, stages=stages)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(rows, a.split))
    out = a.out or os.path.join(run, f"eval_{a.split}.json" if stages is ROWS else f"eval_{a.split}_{stages[0][1]}.json")
    write_json(out, {"split": a.split, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
