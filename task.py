"""The embedded task: multi-step arithmetic word problems generated from a seed, no downloads.

It enters the pipeline only as data, through the same path as a user's GSM8K-format files:
write_task() writes its splits as {"question", "answer"} rows (answer = the reference solution),
its SFT demonstrations as questions rows too and its tokenizer; write_rewrites() writes the
minimal correction of each wrong response the sample stage found, for the rewriter, with the place
of its first error; flag_quality() judges the rewriter's flagged tokens against those places.

    question: Mia has 14 apples. She buys 7 more. Then she gives away 5.
              How many apples does Mia have now?
    solution: 14 + 7 = 21. 21 - 5 = 16. The answer is 16.

Numbers: the task's tokenizer makes every integer 0..max_value (with its leading space) one
piece, so each step "a + b = c" is one lookup (a, op, b) -> c that a tiny model can learn, and a
wrong response has a well-defined first wrong step (correct_response).

The SFT demonstrations are imperfect on purpose (sft_examples): a lazy annotator stopped a
fraction of the 3-step ones a step early, an unaligned habit the SFT model learns and the
preference stages should unlearn. docs/study.md tells how these settings were chosen.
"""

import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass

from bookkeeping.fileio import read_json, replace_dir, write_json, write_jsonl
from bookkeeping.flags import count, real, setting
from data import DataError, is_correct, prompt_text, train_tokenizer

MIN_STEPS, MAX_STEPS, MAX_OPERAND, MAX_VALUE, OPS = 2, 3, 9, 49, ("+", "-")
LAZY_RATE = 0.6  # fraction of the SFT demonstrations of 3-step problems that stop a step early
VOCAB_SIZE = 320

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"),
         ("Max", "he"), ("Lily", "she"), ("Ben", "he"), ("Emma", "she"), ("Tom", "he"),
         ("Nora", "she"), ("Jack", "he")]
ITEMS = ["apples", "marbles", "stickers", "coins", "shells", "pencils", "books", "cookies",
         "stamps", "cards", "eggs", "beads"]
TEMPLATES = {  # one sentence per step; {p} is the pronoun, {b} the operand
    "+": ["{p} buys {b} more.", "{p} finds {b} more.", "{p} gets {b} more from a friend."],
    "-": ["{p} gives away {b}.", "{p} loses {b}.", "{p} sells {b}."],
    "*": ["{p} ends up with {b} times as many."],
}


@dataclass(frozen=True)
class TaskConfig:
    """embedded task (without --questions)"""
    seed: int = setting(0, "seed of the task's questions (--seed varies the rest: init, batch order, "
                        "sampling)", flag="--task-seed", type=int)
    n_train: int = setting(4000, "training problems", type=count(1))
    n_val: int = setting(500, "validation problems, for choosing settings", type=count(1))
    n_test: int = setting(500, "held-out test problems", type=count(1))
    lazy_rate: float = setting(LAZY_RATE, "SFT demonstrations of 3-step problems that stop a step early: "
                               "the unaligned habit the preference stages should remove", type=real(0, 1))
    max_operand: int = setting(MAX_OPERAND, "largest number added or taken", type=count(1))
    max_value: int = setting(MAX_VALUE, "largest count a problem reaches", type=count(1))
    min_steps: int = setting(MIN_STEPS, "fewest steps of a problem", type=count(1))
    max_steps: int = setting(MAX_STEPS, "most steps of a problem", type=count(1))
    ops: str = setting("".join(OPS), "the operations a step draws from: + and -, and * (as many times as)",
                       choices=["+-", "+-*", "+", "-", "*", "+*", "-*"])


@dataclass
class Problem:
    question: str
    solution: str  # ends with "The answer is N."
    answer: str


def apply_op(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng, min_steps=MIN_STEPS, max_steps=MAX_STEPS, max_operand=MAX_OPERAND,
                 max_value=MAX_VALUE, ops=OPS):
    """One random problem; every value stays in 0..max_value, operands in 1..max_operand
    (2..max_operand for *). Returns (Problem, key) where key is its arithmetic, or None
    when the drawn start leaves no valid operation (the caller draws again)."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    cur = rng.randint(1, max_value)
    sentences, steps, key = [], [], [cur]
    for i in range(rng.randint(min_steps, max_steps)):
        bounds = {"+": (1, min(max_operand, max_value - cur)), "-": (1, min(max_operand, cur)),
                  "*": (2, min(max_operand, max_value // cur) if cur else 0)}
        feasible = [op for op in ops if bounds[op][0] <= bounds[op][1]]
        if not feasible:
            return None
        op = rng.choice(feasible)
        b = rng.randint(*bounds[op])
        new = apply_op(cur, op, b)
        sentence = rng.choice(TEMPLATES[op]).format(p=pron.capitalize() if i == 0 else pron, b=b)
        sentences.append(sentence if i == 0 else "Then " + sentence)
        steps.append(f"{cur} {op} {b} = {new}.")
        key += [op, b]
        cur = new
    question = f"{name} has {key[0]} {item}. {' '.join(sentences)} How many {item} does {name} have now?"
    solution = f"{' '.join(steps)} The answer is {cur}."
    return Problem(question, solution, str(cur)), tuple(key)


def make_splits(seed, n_train, n_val, n_test, **difficulty):
    """Deterministic train/val/test problems from seed; no arithmetic (start value, ops and
    operands) is shared between or within splits, hence no question either. The test split is
    drawn first, then val, then train, so growing n_train leaves val and test unchanged.
    difficulty: min_steps, max_steps, max_operand, max_value, ops (see make_problem)."""
    ops = difficulty.get("ops", OPS)
    if not ops or set(ops) - set(TEMPLATES):
        raise ValueError(f"ops {ops!r}: must be a non-empty subset of {sorted(TEMPLATES)}")
    rng = random.Random(seed)
    sizes = {"test": n_test, "val": n_val, "train": n_train}
    need = sum(sizes.values())
    seen, problems = set(), []
    for _ in range(20 * need + 1000):
        if len(problems) == need:
            break
        made = make_problem(rng, **difficulty)
        if made is not None and made[1] not in seen:
            seen.add(made[1])
            problems.append(made[0])
    if len(problems) < need:
        raise ValueError(f"found only {len(problems)} distinct problems of the {need} asked: "
                         "make the task harder or the splits smaller")
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name] = problems[start:start + n]
        start += n
    return splits


def write_task(folder, config):
    """The task's files, written into a temporary folder of this write's own, renamed to `folder`
    when complete (unless another process, a study side by side, put the same task there first):
    train/val/test.jsonl ({"question", "answer"}, GSM8K's format with "The answer is N." endings),
    sft.jsonl (the training problems' demonstrations, questions rows whose answer is the
    demonstration, lazy_rate of the 3-step ones stopping early), tokenizer.model, and task.json
    (the config)."""
    settings = asdict(config)
    seed, n_train, n_val, n_test, lazy_rate = (settings.pop(k) for k in ("seed", "n_train", "n_val", "n_test",
                                                                         "lazy_rate"))
    difficulty = settings
    splits = make_splits(seed, n_train, n_val, n_test, **difficulty)
    tmp = f"{folder}.{uuid.uuid4().hex[:12]}.tmp"  # its own: writers side by side never share one
    os.makedirs(tmp)
    for name, problems in splits.items():
        write_jsonl(os.path.join(tmp, f"{name}.jsonl"), [{"question": p.question, "answer": p.solution}
                                                         for p in problems])
    write_jsonl(os.path.join(tmp, "sft.jsonl"), sft_examples(splits["train"], lazy_rate, seed))
    train_task_tokenizer(os.path.join(tmp, "tokenizer.model"), **difficulty)
    write_json(os.path.join(tmp, "task.json"), asdict(config))
    try:
        if written_with(folder, config):  # another writer finished the same task meanwhile
            shutil.rmtree(tmp)
            return
    except DataError:
        pass  # other settings there: this write replaces them (the caller checked --force)
    replace_dir(tmp, folder)


def written_with(folder, config, force=False):
    """True when `folder` holds the task written with this config; False when it must be
    written (none there, or other settings and force); other settings without force: DataError."""
    settings = asdict(config)
    written = read_json(os.path.join(folder, "task.json"))
    if written is None:  # none there, or not whole: written anew
        return False
    if isinstance(written, dict):  # a task written before its steps and operations were settings
        written = {**{k: settings[k] for k in ("min_steps", "max_steps", "ops") if k not in written and
                      settings[k] == getattr(TaskConfig, k)}, **written}
    if written != settings and not force:
        key = next(k for k in settings if written.get(k) != settings[k])
        raise DataError(f"{folder}: the task was written with {key} {written.get(key)}, not {settings[key]}; "
                        "--force writes it anew (redo every stage after it)")
    return written == settings


def write_rewrites(forget, path):
    """The minimal correction of each wrong response of the forgetting rows (which carry their
    question, reference solution and final answer), as {"prompt", "response", "rewrite",
    "first_error"} rows: the rewriter's targets, with the char index of the first error."""
    rows = []
    for r in forget:
        rewrite, first = correct_response(Problem(r["question"], r["reference"], r["answer"]), r["response"])
        rows.append({"prompt": r["prompt"], "response": r["response"], "rewrite": rewrite,
                     "first_error": first})
    write_jsonl(path, rows)


# ----------------------------------------------------------------------------- SFT demonstrations

def sft_example(problem, lazy=False):
    """The SFT row of a problem, a questions row: {"question", "answer": the demonstration}, its
    solution or with lazy=True lazy_solution(problem). SFT puts it under the prompt template."""
    solution = lazy_solution(problem) if lazy else problem.solution
    return {"question": problem.question, "answer": solution}


def lazy_solution(problem):
    """The solution with its last step skipped, answering the value before it:
    "14 + 7 = 21. 21 - 5 = 16. The answer is 16." -> "14 + 7 = 21. The answer is 21." """
    *steps, _ = problem.solution.split(". ")  # ["14 + 7 = 21", "21 - 5 = 16"], "The answer is 16."
    return ". ".join(steps[:-1]) + f". The answer is {steps[-2].split(' = ')[1]}."


def sft_examples(problems, lazy_rate, seed):
    """The SFT rows of the training problems, imperfect on purpose: a lazy annotator wrote
    lazy_rate of the demonstrations of the problems with 3 or more steps, which stop a step early
    (lazy_solution). The SFT model learns that unaligned habit along with the arithmetic; its other
    errors are arithmetic facts it has not learned, which preference data cannot teach it."""
    rng = random.Random(seed)
    return [sft_example(p, lazy=p.solution.count(" = ") >= 3 and rng.random() < lazy_rate) for p in problems]


def train_task_tokenizer(path, vocab_size=VOCAB_SIZE, **difficulty):
    """The task's tokenizer, trained on 2000 problems of a fixed seed plus every template word
    (so every character the task can produce is encodable), numbers 0..max_value one piece each."""
    rng = random.Random(0)
    texts = []
    while len(texts) < 2000:
        made = make_problem(rng, **difficulty)
        if made is not None:
            texts.append(prompt_text(made[0].question) + " " + made[0].solution)
    words = [n for n, _ in NAMES] + ITEMS + [t.format(p=p, b=0) for ts in TEMPLATES.values()
                                             for t in ts for p in ("He", "She")]
    texts.append(" ".join(words) + " Then 0123456789 + - * =")
    return train_tokenizer(texts, path, vocab_size, max_number=difficulty.get("max_value", MAX_VALUE))


# ----------------------------------------------------------------------------- steps and corrections

SLOT = re.compile(r"\d+|(?<= )[-+*](?= )")  # the numbers and operator signs of a solution


def correct_response(problem, response):
    """Minimally correct a response: (corrected text, char index in response where the first
    error starts), or (response, -1) when nothing is wrong.

    A response is read as the slots of its steps (numbers and operator signs, see SLOT) and the
    text between them. When its slots line up one to one with the reference solution's (same
    count, numbers where numbers are), the first slot that differs is the first error; fixing it
    and recomputing the following steps gives exactly the reference's remaining slots (each step
    is fixed by the question), so every slot takes the reference's value while the text between
    slots is kept as the response wrote it. Otherwise (a step skipped or added, a garbled step),
    or when that does not state the right answer, the first error is the first character where
    the response departs from the reference, and the correction is the reference from there on.
    """
    got = list(SLOT.finditer(response))
    ref = [m.group() for m in SLOT.finditer(problem.solution)]
    if len(got) == len(ref) and all(m.group().isdigit() == r.isdigit() for m, r in zip(got, ref)):
        first, parts, end = -1, [], 0
        for m, r in zip(got, ref):
            if m.group() != r and first < 0:
                first = m.start()
            parts += [response[end:m.start()], r]
            end = m.end()
        corrected = "".join(parts) + response[end:]
        if is_correct(corrected, problem.answer, "the-answer-is"):
            return (response, -1) if first < 0 else (corrected, first)
    target = response[:len(response) - len(response.lstrip())] + problem.solution  # with its leading space
    first = next((i for i, (a, b) in enumerate(zip(response, target)) if a != b),
                 min(len(response), len(target)))
    return target, first


def steps_correct(problem, response):
    """Every step of the response states the reference's numbers and signs: correct_response finds
    no error to fix. Stricter than is_correct, which a wrong chain can pass by a lucky last step."""
    return correct_response(problem, response)[1] < 0


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
