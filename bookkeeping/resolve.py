"""The run directory: its record (run.json) and where a stage's inputs lie in it.

train.py's PIPELINE says, for each stage, where each input comes from when no flag names it: a file an
earlier stage wrote ("sample/pairs.jsonl"), an earlier stage's model ("sft/"), or one of the run's own
inputs ("run:questions"), which start_run records in <run>/run.json (your files, or the embedded task's,
written into <run>/task/). A run on preference pairs (--pairs) has no sample stage: its pairs, rendered
into <run>/pairs/, stand where the sample stage's files would ("sample/pairs.jsonl" is then
"pairs/pairs.jsonl"). This module reads those sources against a run directory; stage_inputs also
holds the few rules of which inputs a stage reads with its settings (unused).
"""

import json
import os
from dataclasses import asdict

import task
from bookkeeping import flags, parallel
from bookkeeping.fileio import write_json, write_jsonl
from bookkeeping.runs import UsageError, input_id, need, one_line
from data import (DataError, PromptConfig, TokenizerFile, find_tokenizer, load_tokenizer, preference_pairs,
                  read_jsonl, response_lead)

HELD_OUT = "{}_pairs.jsonl"  # the sample stage's held-out pairs of an evaluation file <name>.jsonl


RECORD = {"inputs": dict, "tokenizer": dict, "prompt": dict, "max_len": int, "eval": dict}  # run.json
RECORD_INPUTS = ("embedded", "model", "questions", "eval_questions", "validation", "sft_data", "rewrites",
                 "skip_sft", "correct", "pairs")
PAIRS_DIR = "pairs"  # a preference-data run (--pairs): its pairs as the pipeline's files, in place of sample/


def load_record(run):
    """<run>/run.json as start_run writes it, or None when the run has none. A record that does not
    parse (cut short) or has another shape (edited, or written by another version) is a UsageError
    naming the file and what is wrong with it."""
    path = os.path.join(run, "run.json")
    try:
        with open(path, "rb") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{path}: not a whole run record ({one_line(e)}); rerun the run's command with "
                         "--force to write it anew") from None
    if isinstance(record, dict) and isinstance(record.get("inputs"), dict):
        record["inputs"].setdefault("pairs", None)  # a run.json from before --pairs
    if problem := record_problem(record):
        raise UsageError(f"{path}: {problem}: not a run record of this version; rerun the run's command with "
                         "--force to write it anew")
    return record


def record_problem(record):
    """What makes `record` other than a run.json of this version, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}"
    if set(record) != set(RECORD):
        return f"keys {sorted(record)}, not {sorted(RECORD)}"
    wrong = next((k for k, kind in RECORD.items() if type(record[k]) is not kind), None)
    if wrong:
        return f"'{wrong}' is a {type(record[wrong]).__name__}, not a {RECORD[wrong].__name__}"
    if set(record["inputs"]) != set(RECORD_INPUTS):
        return f"'inputs' has keys {sorted(record['inputs'])}, not {sorted(RECORD_INPUTS)}"
    if not {"splits", "reference", "rows"} <= set(record["eval"]):
        return "'eval' lacks its splits, reference or rows"
    return None


def run_record(run):
    """The record a run directory keeps of its inputs (run.json, written by train.py); DataError
    when there is none, UsageError when it is not whole (load_record)."""
    record = load_record(run)
    if record is None:
        raise DataError(f"{os.path.join(run, 'run.json')}: not found; run `python train.py` (or its sft "
                        "stage) first, or give --questions and --tokenizer")
    return record


def in_run(run, path):
    """A path of a run's record: relative ones lie inside the run directory."""
    return path if path is None or os.path.isabs(path) else os.path.join(run, path)


def in_pipeline(run, source, stage):
    """Where a PIPELINE source of `stage` lies in the run directory (an earlier stage's file or
    model; the starting model where the run skipped SFT), for study/study.py."""
    return from_run(run, load_record(run), source, stage)


def stage_inputs(name, a, run, config, sources):
    """The inputs of stage `name` with config `config`: each its flag in `a` or, without one, its
    place in the run directory, `sources` (the stage's row of train.PIPELINE); the tokenizer:
    --tokenizer, else the one in the model's folder, else the run's. Without a run directory, a
    UsageError names every flag the stage still needs."""
    record, inputs, missing = load_record(run), {}, []
    for key, source in sources.items():
        given = getattr(a, key)
        if (name, key) == ("rewriter", "model") and a.rewriter_init:
            given = a.rewriter_init  # the rewriter's own starting weights
        if name == "sft" and key == "eval_questions" and given:
            given = given[0]  # sft validates on the first
        unread = source is None or unused(name, key, a, config)
        if given is None and not unread and record is None and not source.endswith("?"):
            missing.append("--" + key.replace("_", "-"))  # named below, with every other one missing
            continue
        inputs[key] = given if given is not None or unread else from_run(run, record, source, name)
    tokenizes = not (name == "mask" and config.scorer == "delta")  # the delta scorer reads no text
    own = tokenizes and inputs.get("model") and find_tokenizer(inputs["model"])
    path = a.tokenizer or (inputs["model"] if own and os.path.exists(own) else None)
    if tokenizes and path is None and record is None:
        missing.append("--tokenizer")
    if missing:
        raise UsageError(f"{os.path.join(run, 'run.json')}: not found, so --stage {name} needs "
                         f"{' '.join(missing)}, or a run directory to take them from: run `python train.py "
                         "--stage sft` (or `python train.py`) first")
    if tokenizes:
        path = path or in_run(run, record["tokenizer"]["path"])
        inputs["tokenizer"] = TokenizerFile(path, a.bos_token, a.eos_token, a.pad_token, a.bos)
    return inputs


def unused(name, key, a, config):
    """An input the stage does not read with these settings."""
    if name == "mask":
        return key == ("data" if config.scorer == "delta" else "dpo_model")
    if key == "mask":
        return (a.forget_ratio if name == "forget" else a.learn_ratio) >= 1
    return False


def from_run(run, record, source, stage):
    """The path of a PIPELINE source in the run directory, whose record (run.json) is `record`."""
    optional, source = source.endswith("?"), source.rstrip("?")
    if record is None:
        return None if optional else no_run(run, stage)
    if source == "run:rewrites" and record["inputs"]["embedded"]:
        return embedded_rewrites(run)  # a path under the run directory already
    if source.startswith("run:"):
        value = record["inputs"].get(source[4:])
        if value is None and not optional:
            raise UsageError(f"{run}/run.json: the run has no {source[4:]}; name it with its flag")
        return [in_run(run, v) for v in value] if isinstance(value, list) else in_run(run, value)
    if source == "sft/" and record["inputs"]["skip_sft"]:
        return record["inputs"]["model"]
    made_by = source.split("/")[0]
    if made_by == "sample" and record["inputs"]["pairs"]:  # a preference-data run has its pairs, no sampling
        return need(os.path.join(run, PAIRS_DIR, source.split("/")[1]), "sft")
    path = need(os.path.join(run, source.rstrip("/")), made_by)
    if source.endswith("/"):
        need(os.path.join(path, "config.json"), made_by)
    return path


def no_run(run, stage):
    raise UsageError(f"{os.path.join(run, 'run.json')}: not found; run `python train.py --stage sft` (or "
                     f"`python train.py`) first, or give --stage {stage} its inputs as flags")


def embedded_rewrites(run):
    """The embedded task's minimal corrections of the sample stage's wrong responses, written once
    per forgetting file (its content's hash in the name)."""
    forget = need(os.path.join(run, "sample", "forget.jsonl"), "sample")
    path = os.path.join(run, "task", f"rewrites-{input_id(forget)[-12:]}.jsonl")
    if parallel.is_main() and not os.path.exists(path):
        task.write_rewrites(read_jsonl(forget, "forget"), path)
    parallel.barrier()
    return path


def start_run(a, run, rows):
    """The run's own inputs, recorded in <run>/run.json: your model and questions (--questions), your
    model and preference pairs (--pairs, rendered into <run>/pairs/ by preference_files, once the
    record is this run's), or the embedded task's files, written into <run>/task/. Also what eval.py
    needs to score the run as it was trained, with `rows`, the (label, stage) rows of its table. A run
    started with other inputs is refused unless --force."""
    if a.pairs:
        if a.questions or a.eval_questions or a.sft_data or a.rewrites:
            raise UsageError("--pairs: a preference-data run takes no --questions, --eval-questions, "
                             "--sft-data or --rewrites (it trains SFT on the chosen responses, the rewriter "
                             "on chosen)")
        if not a.model:
            raise UsageError("--pairs: your pairs need your model too (--model DIR)")
        if not a.eval_pairs:
            raise UsageError("--eval-pairs: the one command needs at least one held-out pairs file (the "
                             "table scores the last)")
        files = preference_files(a)
        inputs = dict(embedded=False, model=os.path.abspath(a.model), questions=None, eval_questions=[],
                      validation=None, sft_data=f"{PAIRS_DIR}/sft.jsonl", rewrites=None, skip_sft=a.skip_sft,
                      correct="answer", pairs=f"{PAIRS_DIR}/pairs.jsonl")
        tokenizer = os.path.abspath(a.tokenizer or a.model)
        splits = {split_name(p): {"questions": None, "pairs": os.path.join(PAIRS_DIR, HELD_OUT.format(
            split_name(p)))} for p in a.eval_pairs}
    elif a.questions:
        if a.eval_pairs:
            raise UsageError("--eval-pairs: goes with --pairs (with --questions, held-out pairs are sampled "
                             "from --eval-questions)")
        if not a.model:
            raise UsageError("--questions: your questions need your model too (--model DIR)")
        if not a.eval_questions:  # before any training: the table scores the last file
            raise UsageError("--eval-questions: the one command needs at least one evaluation file (the "
                             "table scores the last)")
        absolute = os.path.abspath
        evals = [absolute(p) for p in a.eval_questions or []]
        inputs = dict(embedded=False, model=absolute(a.model), questions=absolute(a.questions),
                      eval_questions=evals, validation=evals[0] if evals else None,
                      sft_data=absolute(a.sft_data or a.questions),
                      rewrites=a.rewrites and absolute(a.rewrites),
                      skip_sft=a.skip_sft, correct="answer", pairs=None)
        tokenizer = absolute(a.tokenizer or a.model)
    else:
        if a.model or a.skip_sft or a.eval_questions or a.sft_data or a.eval_pairs:
            raise UsageError("--model, --skip-sft, --eval-questions, --eval-pairs and --sft-data go with "
                             "your --questions or --pairs")
        write_embedded_task(a, os.path.join(run, "task"))
        inputs = dict(embedded=True, model=None, questions="task/train.jsonl",
                      eval_questions=["task/val.jsonl", "task/test.jsonl"], validation="task/val.jsonl",
                      sft_data="task/sft.jsonl", rewrites=None, skip_sft=False, correct="steps", pairs=None)
        tokenizer = "task/tokenizer.model"
    if not a.pairs:
        splits = {split_name(p): {"questions": p, "pairs": os.path.join("sample", HELD_OUT.format(
            split_name(p)))} for p in inputs["eval_questions"]}
    start = inputs["model"] if inputs["skip_sft"] else "sft"
    rows = [("start (--skip-sft)", start)] + rows[1:] if inputs["skip_sft"] else rows
    record = {"inputs": inputs, "tokenizer": dict(path=tokenizer, bos=a.bos_token, eos=a.eos_token,
                                                    pad=a.pad_token, bos_mode=a.bos),
              "prompt": json_form(asdict(flags.config_from(PromptConfig, a))), "max_len": a.max_len,
              "eval": {"splits": splits, "reference": start, "rows": rows}}
    old = None if a.force else load_record(run)  # --force writes a record anew, whatever is there
    if old is not None and json_form(old) != json_form(record):
        key = next(k for k in record if json_form(old.get(k)) != json_form(record[k]))
        raise UsageError(f"{run}: the run was started with other {key} ({json_form(old.get(key))}); another "
                         "--run-dir, or --force (redo every stage)")
    if parallel.is_main():
        os.makedirs(run, exist_ok=True)
        for name, lines in (files if a.pairs else {}).items():  # only once the record is this run's
            os.makedirs(os.path.join(run, PAIRS_DIR), exist_ok=True)
            write_jsonl(os.path.join(run, PAIRS_DIR, name), lines)
        write_json(os.path.join(run, "run.json"), record)
    parallel.barrier()
    return record


def split_name(path):
    """An evaluation file's split name: its file name without the extension (test.jsonl: test)."""
    return os.path.splitext(os.path.basename(path))[0]


def preference_files(a):
    """A preference-data run's files, {file name: rows}, as the pipeline reads them in place of the
    sample stage's: pairs.jsonl (the --pairs rows as data.preference_pairs renders them), forget.jsonl
    (each distinct rejected response, its pair's chosen one as the rewriter's reference), sft.jsonl
    (each distinct chosen response as an SFT target) and <name>_pairs.jsonl of each --eval-pairs file.
    Prints one line per file: its rows, its pairs, and the rows dropped, counted by reason."""
    tok = load_tokenizer(TokenizerFile(a.tokenizer or a.model, a.bos_token, a.eos_token, a.pad_token, a.bos))
    prompt = flags.config_from(PromptConfig, a)
    lead = response_lead(prompt.template)
    names = [split_name(p) for p in a.eval_pairs]
    if len(set(names)) < len(names) or "pairs" in names:
        raise UsageError(f"--eval-pairs {' '.join(a.eval_pairs)}: two files of one name, or one named pairs")
    files = {}
    for path in [a.pairs] + a.eval_pairs:
        rows = read_jsonl(path, "preferences")
        pairs, dropped = preference_pairs(rows, tok, prompt.template, prompt.system, a.max_len)
        counted = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n) or "none"
        print(f"pairs: {path}: {len(rows)} rows, {len(pairs)} pairs; dropped: {counted}")
        if not pairs:
            raise UsageError(f"{path}: no preference pairs left to train or score on")
        triples = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
        if path != a.pairs:
            files[HELD_OUT.format(split_name(path))] = triples
            continue
        files["pairs.jsonl"] = triples
        wrong = {}  # each distinct rejected response with the first pair it is in
        for p in pairs:
            wrong.setdefault((p["prompt"], p["rejected"]), p)
        files["forget.jsonl"] = [{"prompt": p["prompt"], "response": p["rejected"], "question": p["question"],
                                  "reference": p["chosen"][len(lead):]} for p in wrong.values()]
        files["sft.jsonl"] = [{"input": prompt_, "output": chosen}
                              for prompt_, chosen in dict.fromkeys((p["prompt"], p["chosen"]) for p in pairs)]
    return files


def drop_unused_record(run, stages):
    """Remove <run>/run.json when no stage of `stages` left anything in the run (no output, no work
    folder to resume): a run whose first stage was refused is not started."""
    if parallel.is_main() and not any(os.path.exists(os.path.join(run, s + suffix))
                                       for s in stages for suffix in ("", ".tmp")):
        try:
            os.remove(os.path.join(run, "run.json"))
        except FileNotFoundError:
            pass


def json_form(x):
    return json.loads(json.dumps(x))


def write_embedded_task(a, folder):
    """The embedded task's files in `folder`, unless they are there with these settings."""
    config = flags.config_from(task.TaskConfig, a)
    if not task.written_with(folder, config, a.force):  # every process checks, rank 0 writes
        if parallel.is_main():
            task.write_task(folder, config)
        parallel.barrier()
