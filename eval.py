"""Evaluate checkpoints: held-out greedy accuracy and preference metrics, as one markdown table.

    python eval.py runs/default            # every finished stage of a run (SFT, DPO, NPO, ALLO)
    python eval.py runs/default/learn      # one checkpoint directory of a run
    python eval.py runs/default --split val
    python eval.py --questions test.jsonl --tokenizer my-llama/ --pairs out/sample/test_pairs.jsonl \\
                   --ref my-llama/ my-llama/ out/dpo out/learn          # any checkpoints, your data

A run directory records its inputs (run.json: the questions files, the tokenizer's rules, the prompt
template), so a run is scored as it was trained; --split names one of its evaluation files (default:
the last). Accuracy: greedy decoding of each question under the prompt template, the final answer
read in --answer-format and compared with the reference's (after removing commas, "$", a trailing
period and a trailing ".0"). Pair accuracy and margin: on held-out preference pairs (`train.py
--stage sample --eval-questions` writes them), the implicit reward beta * sum_t log pi/pi_ref of
every checkpoint against the reference model (--ref; in a run, its starting model); pair accuracy
is the fraction of pairs whose chosen reward is above the rejected one, margin the mean difference.
"""

import os
import sys

from bookkeeping import gguf_io
from study.report import run_figures
from bookkeeping.fileio import read_json, write_json
from bookkeeping.flags import (HelpFormatter, Parser, add_config_flags, add_machine_flags,
                               add_tokenizer_flags, apply_machine_flags, config_from, count, real)
from bookkeeping.resolve import in_run, run_record
from bookkeeping.runs import UsageError, input_id, load_model, one_line
from data import (DataError, PromptConfig, TokenizerFile, complete, is_correct, load_tokenizer, prompt_text,
                  read_jsonl, reference_answers)
from model import pick_device
from trainer import reference_logps

# the comparison table of a run, (label, stage), in the order of the method
ROWS = [("SFT", "sft"), ("DPO (full parameters)", "dpo"), ("NPO forgetting only", "forget"),
        ("ALLO (forget + learn)", "learn")]


def accuracy(model, tok, questions, prompt=PromptConfig(), label="accuracy"):
    """Greedy accuracy on questions rows ({"question", "answer"}) under the prompt settings."""
    prompts = [prompt_text(q["question"], prompt.template, tok, prompt.system) for q in questions]
    responses = complete(model, tok, prompts, prompt.max_new_tokens, stop=prompt.stop,
                         batch_size=prompt.gen_batch_size, label=label, decode=prompt.decode)
    answers = reference_answers(questions)
    right = sum(is_correct(r, a, prompt.answer_format) for r, a in zip(responses, answers))
    return right / max(1, len(questions))


# ----------------------------------------------------------------------------- preference metrics

def pair_logps(model, tok, pairs, max_len, batch_size=64, label="score"):
    """Summed log pi(response | prompt) of each pair's chosen and of its rejected response (float64
    lists) and each chosen row's scored tokens (its response and EOS, as max_len cuts them). A pair's
    two rows share a batch and, where packing pays, their prompt, computed once
    (trainer.reference_logps with pack)."""
    n, device = len(pairs), model.embed_tokens.weight.device
    rows = reference_logps(model, tok, [p["prompt"] for p in pairs] * 2,
                           [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], max_len, device,
                           batch_size, label, pack=True, all_processes=False)
    sums = [r.double().sum().item() for r in rows]
    return sums[:n], sums[n:], [len(r) for r in rows[:n]]


def pair_metrics(model, ref_sums, tok, pairs, beta, max_len, batch_size=64, label="eval"):
    """Preference accuracy and mean implicit-reward margin of `model` on pairs, against the
    reference's summed log-probs ref_sums = (chosen, rejected), and the chosen responses'
    log-likelihood per token (their summed log-probs over their tokens: DPO can lower it while it
    raises the margin, likelihood displacement)."""
    chosen, rejected, n_chosen = pair_logps(model, tok, pairs, max_len, batch_size, f"{label} pairs")
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, *ref_sums)]
    n = len(margins)
    return sum(m > 0 for m in margins) / n, sum(margins) / n, sum(chosen) / sum(n_chosen)


class Evaluator:
    """Held-out metrics of any checkpoint: greedy accuracy on a questions file and, given pairs
    and a reference model, pair accuracy and margin (the reference's log-probs computed once)."""

    def __init__(self, questions, tokenizer, pairs=None, ref=None, *, prompt=PromptConfig(), beta=0.1,
                 max_len=256, device="auto", batch_size=64, n_questions=0, n_pairs=0):
        """questions, pairs: JSONL paths (questions None: pair metrics only, a run on preference pairs);
        tokenizer: a path or a TokenizerFile; ref: a model directory; n_questions, n_pairs: score only
        the first N (0 = all)."""
        if pairs and not ref:
            raise DataError(f"{pairs}: pair metrics need a reference model (--ref)")
        try:
            self.device = pick_device(device)
        except ValueError as e:
            raise DataError(f"--device: {e}") from None
        self.prompt, self.beta, self.max_len = prompt, beta, max_len
        self.batch_size = batch_size
        self.tok = load_tokenizer(tokenizer)
        self.problems = read_jsonl(questions, "questions")[:n_questions or None] if questions else []
        if questions and not self.problems:
            raise DataError(f"{questions}: no questions to score")
        reference_answers(self.problems)  # every question must have one
        self.pairs = read_jsonl(pairs, "pairs")[:n_pairs or None] if pairs else []
        if not (self.problems or self.pairs):
            raise DataError("nothing to score: no questions and no held-out pairs")
        self.ref = ref
        self.ref_sums, self.ref_chosen_logp = ([], []), None
        if self.pairs:
            model = load_model(ref, self.device, self.tok)
            chosen, rejected, n_chosen = pair_logps(model, self.tok, self.pairs, max_len, batch_size,
                                                    "eval reference pairs")
            self.ref_sums, self.ref_chosen_logp = (chosen, rejected), sum(chosen) / sum(n_chosen)

    def __call__(self, model_dir):
        """{"accuracy", "pair_accuracy", "margin", "chosen_logp", "n_questions", "n_pairs"} of one
        checkpoint; the reference itself has no pair accuracy or margin (None); without questions no
        accuracy (None)."""
        model = load_model(model_dir, self.device, self.tok)
        is_ref = self.ref is not None and os.path.samefile(model_dir, self.ref)
        pair_acc, margin, chosen_logp = (None, None, self.ref_chosen_logp) if is_ref or not self.pairs else \
            pair_metrics(model, self.ref_sums, self.tok, self.pairs, self.beta, self.max_len, self.batch_size,
                         f"eval {model_dir}")
        acc = None if not self.problems else accuracy(model, self.tok, self.problems, self.prompt,
                                                      f"eval {model_dir}")
        return {"accuracy": acc, "pair_accuracy": pair_acc, "margin": margin, "chosen_logp": chosen_logp,
                "n_questions": len(self.problems), "n_pairs": len(self.pairs)}


# ----------------------------------------------------------------------------- tables

def stage_record(model_dir):
    """trained fraction and wall time from a stage's stage.json (None outside a run)."""
    info = read_json(os.path.join(model_dir, "stage.json")) or {}
    return {"trained_fraction": info.get("trained_fraction"), "wall_s": info.get("wall_s")}


def stage_label(model_dir):
    """A folder's label in the table: its stage's (SFT, DPO, NPO, ALLO) when a run's stage wrote it,
    else the folder itself."""
    stage = (read_json(os.path.join(model_dir, "stage.json")) or {}).get("stage")
    return dict((s, label) for label, s in ROWS).get(stage, model_dir)


def evaluate_models(evaluate, models):
    """Rows of the table for (label, model directory) pairs."""
    return [{"model": label, "stage": os.path.basename(os.path.normpath(d)), **evaluate(d), **stage_record(d)}
            for label, d in models]


def run_evaluator(run, split=None, device="auto", beta=0.1, n_questions=0, n_pairs=0):
    """The Evaluator of a run directory as its run.json says: an evaluation file (split: its name,
    default the last), its held-out pairs, the run's starting model as reference, the run's
    tokenizer rules and prompt settings. Returns (evaluator, split)."""
    record = run_record(run)
    splits = record["eval"]["splits"]
    split = split or list(splits)[-1]
    if split not in splits:
        raise DataError(f"--split {split}: the run has no such evaluation file (it has: {', '.join(splits)})")
    pairs = in_run(run, splits[split]["pairs"])
    questions = in_run(run, splits[split]["questions"])  # None in a run on preference pairs
    sampled = (read_json(os.path.join(run, "sample", "stage.json")) or {}).get("fingerprint", {})
    drawn_from = sampled.get("inputs", {}).get("eval_questions") if isinstance(sampled, dict) else None
    if questions and os.path.exists(pairs) and isinstance(drawn_from, list) and \
            input_id(questions) not in drawn_from:
        print(f"warning: {questions} changed after the sample stage drew {pairs} from it: the pair metrics "
              "are of the old file's questions (rerun --stage sample --force for new pairs)")
    tokenizer = TokenizerFile(**{**record["tokenizer"], "path": in_run(run, record["tokenizer"]["path"])})
    evaluate = Evaluator(questions, tokenizer,
                         pairs if os.path.exists(pairs) else None, in_run(run, record["eval"]["reference"]),
                         prompt=PromptConfig(**{**record["prompt"], "stop": tuple(record["prompt"]["stop"])}),
                         beta=beta, max_len=record["max_len"], device=device, n_questions=n_questions,
                         n_pairs=n_pairs)
    return evaluate, split


def evaluate_run(run, split=None, device="auto", beta=0.1, stages=None):
    """Metrics of each finished stage of a run directory (its comparison rows, or `stages`: (label,
    stage) pairs), with its trained fraction and wall time. Returns (rows, split)."""
    evaluate, split = run_evaluator(run, split, device, beta)
    rows = [(label, in_run(run, d)) for label, d in stages or run_record(run)["eval"]["rows"]]
    finished = [(label, d) for label, d in rows if os.path.exists(os.path.join(d, "config.json"))]
    for label, d in rows:
        if (label, d) not in finished:
            print(f"eval: {label} ({d}) is not finished: its row is left out")
    return evaluate_models(evaluate, finished), split


def markdown_table(rows, split, reference="the starting model"):
    """The comparison table. Rows scored on questions show their accuracy; rows of a run on preference
    pairs (no questions) show their chosen responses' log-likelihood per token instead."""
    pairs_only = bool(rows) and all(r["accuracy"] is None for r in rows)
    first = "chosen log-prob/token" if pairs_only else f"{split} accuracy"
    lines = [f"| model | {first} | pair accuracy | margin | trained fraction | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        frac = "-" if r["trained_fraction"] is None else f"{r['trained_fraction']:.3f}"
        pair = "-" if r["pair_accuracy"] is None else f"{100 * r['pair_accuracy']:.1f}%"
        margin = "-" if r["margin"] is None else f"{r['margin']:+.3f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        value = f"{r['chosen_logp']:.4f}" if pairs_only else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {r['model']} | {value} | {pair} | {margin} | {frac} | {wall} |")
    n = rows[0] if rows else {"n_questions": 0, "n_pairs": 0}
    held = f"{n['n_pairs']} {split} held-out pairs" if pairs_only else \
        f"{n['n_questions']} {split} questions, {n['n_pairs']} held-out pairs"
    lines.append(f"\n{held}; margin = beta * (chosen - rejected) log-ratio against {reference}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="a run directory, a checkpoint inside one, or (with --questions) "
                   "the checkpoint directories (or llama.cpp GGUF files, converted once into runs/gguf/) to "
                   "compare")
    p.add_argument("--split", help="a run's evaluation file to score, by name (val, test, ...; default: the "
                   "last); choose settings on val, report test")
    p.add_argument("--questions", help="questions JSONL ({\"question\", \"answer\"}, GSM8K's format)")
    p.add_argument("--pairs", help="held-out preference pairs JSONL, for pair accuracy and margin (with "
                   "--ref)")
    p.add_argument("--ref", help="reference model directory of the implicit reward")
    p.add_argument("--beta", type=real(0, open_low=True), default=0.1, help="beta of the implicit reward")
    p.add_argument("--batch-size", type=count(1), default=64, help="rows per batch when scoring pairs")
    p.add_argument("--max-len", type=count(2), help="max tokens of prompt + response (default: the run's, "
                   "else 256)")
    p.add_argument("--out", help="JSON output file (default <run>/eval_<split>.json, or none)")
    p.add_argument("--plot", action="store_true", help="draw a run's curves per stage (loss, DPO's and NPO's "
                   "numbers) and its masks by layer as PNG under R/plots/, instead of the table (needs "
                   "matplotlib)")
    add_machine_flags(p)
    g = p.add_argument_group("tokenizer (with --questions; a run uses its own)")
    add_tokenizer_flags(g)
    add_config_flags(p, [PromptConfig])
    return p.parse_args(argv)


GGUF_RUN = "runs"  # with --questions, a FILE.gguf is converted once into runs/gguf/<name>-<hash>/


def main(argv=None):
    a = parse_args(argv)
    apply_machine_flags(a)
    try:
        if a.questions:
            if not a.tokenizer:
                raise DataError("--questions needs --tokenizer")
            prompt = config_from(PromptConfig, a)
            tokenizer = TokenizerFile(gguf_io.model_folder(a.tokenizer, GGUF_RUN), a.bos_token, a.eos_token,
                                      a.pad_token, a.bos)
            evaluate = Evaluator(a.questions, tokenizer, a.pairs, a.ref, prompt=prompt, beta=a.beta,
                                 device=a.device, max_len=a.max_len or 256, batch_size=a.batch_size)
            models = [gguf_io.model_folder(d, GGUF_RUN) for d in a.paths]  # a .gguf file: its conversion
            rows = evaluate_models(evaluate, [(stage_label(d), m) for d, m in zip(a.paths, models)])
            split, out = "held-out", a.out
        elif a.plot:  # the run's pictures instead of its table
            if not os.path.isfile(os.path.join(a.paths[0], "run.json")):
                raise DataError(f"{a.paths[0]}: --plot draws a run directory's curves; this is none")
            written = run_figures(a.paths[0])  # None without matplotlib, which it has said
            if written is not None:
                print("eval: plots " + ", ".join(written) if written else "eval: nothing to plot yet")
            return
        else:
            rows, split, out = evaluate_in_run(a)
        print(markdown_table(rows, split, f"the reference model {a.ref}" if a.questions else
                             "the run's starting model"))
        if out:
            write_json(out, {"split": split, "rows": rows})
            print(f"wrote {out}")
    except (DataError, UsageError, OSError) as e:
        print(f"error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)


def evaluate_in_run(a):
    """(rows, split, output file) for a run directory or one checkpoint directory inside a run."""
    if len(a.paths) != 1:
        raise DataError("several checkpoint directories: give them their --questions and --tokenizer")
    path = os.path.normpath(a.paths[0])
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory")
    if os.path.exists(os.path.join(path, "run.json")):  # a run directory
        run, stages = path, None
    else:
        run, stage = os.path.dirname(path), os.path.basename(path)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise DataError(f"{path}: neither a run directory (run.json) nor a model in one (config.json)")
        labels = {os.path.basename(d): label for label, d in run_record(run)["eval"]["rows"]}
        stages = [(labels.get(stage, stage), stage)]
    rows, split = evaluate_run(run, a.split, a.device, a.beta, stages=stages)
    name = f"eval_{split}.json" if stages is None else f"eval_{split}_{stages[0][1]}.json"
    return rows, split, a.out or os.path.join(run, name)


if __name__ == "__main__":
    main()
