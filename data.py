"""Data for ALLO: tokenizer, the embedded arithmetic task, answer checking, JSONL, collation.

The embedded task is generated from a seed, with no downloads: short multi-step word
problems whose step-by-step solutions end in "The answer is N." (GSM8K-style extraction):

    question: Mia has 14 apples. She buys 7 more. Then she gives away 5.
              How many apples does Mia have now?
    solution: 14 + 7 = 21. 21 - 5 = 16. The answer is 16.

The model sees prompt_text(question) = "Question: ...\\nAnswer:" and learns to continue it
with the response " " + solution (responses start with a space, so prompt and response
tokenize separately with a clean boundary and decode back to prompt + response exactly).

Numbers: the task tokenizer makes every integer 0..max_value (with its leading space) ONE
piece. Each step "a + b = c" is then a single lookup (a, op, b) -> c that a tiny model can
learn; with digits split or character-level text it would also have to learn carries, which
a ~1M-parameter model trained for minutes does not (11% accuracy on two chained 2-digit
operations, see ALLO.md). Every step's values are whole tokens, so a wrong response has a
well-defined first wrong step (correct_response).

The SFT demonstrations are imperfect on purpose (sft_examples): LAZY_RATE of those of 3-step
problems stop a step early, an unaligned habit the SFT model learns and the preference stages
should unlearn (see the calibration note below).

Token sequences: [BOS] + enc(prompt) + enc(response) + [EOS], right
padded, labels pre-shifted (labels[b, t] = input_ids[b, t+1] on response targets, else -100).
"""

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass

import sentencepiece as spm
import torch

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A SentencePiece model with explicit BOS/EOS/PAD ids."""

    def __init__(self, model_path):
        with open(model_path, "rb") as f:
            self.sp = spm.SentencePieceProcessor(model_proto=f.read())
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path}: the tokenizer has no BOS or EOS piece")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id  # Llama: no pad
        self.specials = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text):
        return self.sp.encode(text)  # no BOS/EOS

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids if int(i) not in self.specials])


def train_tokenizer(texts, path, vocab_size, max_number=None):
    """Train a BPE SentencePiece model on texts (deterministic), write it atomically to path.

    Ids: pad 0, unk 1, bos 2, eos 3. Text is kept verbatim (no normalization, no dummy
    prefix, spaces and newlines preserved), so decode(encode(s)) == s for every s made of
    characters seen in texts (character_coverage 1.0). With max_number, each " N" for
    N in 0..max_number is a single piece (see the module docstring); vocab_size must leave
    room for those pieces and the characters. vocab_size is an upper bound.
    """
    symbols = [f"\u2581{n}" for n in range(max_number + 1)] if max_number is not None else []
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", user_defined_symbols=symbols, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        character_coverage=1.0, byte_fallback=False, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)
    return Tokenizer(path)


# -----------------------------------------------------------------------------
# the embedded task

# Calibrated on 2 CPU cores with train.py's defaults (0.78M parameters: dim 128, 4 layers, 4 heads,
# 2 kv heads, hidden 352, vocab 320; 1000 SFT steps of batch 32, lr 2e-3, about 2 minutes).
# Operands up to 9 and values up to 49: the SFT model gets every 2-step validation question right
# and stops most 3-step ones a step early (LAZY_RATE): 54% accuracy, the errors a habit that
# preference data can remove. Operands up to 20 and values up to 99 without lazy demonstrations:
# 52%, the errors arithmetic facts it has not learned, and every DPO setting tried lowered it.
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


def prompt_text(question):
    return f"Question: {question}\nAnswer:"


def sft_example(problem, lazy=False):
    """The SFT row of a problem: {"input": prompt, "output": response}, response = " " + solution,
    or with lazy=True " " + lazy_solution(problem)."""
    return {"input": prompt_text(problem.question), "output": " " + (lazy_solution(problem) if lazy else problem.solution)}


def lazy_solution(problem):
    """The solution with its last step skipped, answering the value before it:
    "14 + 7 = 21. 21 - 5 = 16. The answer is 16." -> "14 + 7 = 21. The answer is 21." """
    *steps, _ = problem.solution.split(". ")  # ["14 + 7 = 21", "21 - 5 = 16"], "The answer is 16."
    return ". ".join(steps[:-1]) + f". The answer is {steps[-2].split(' = ')[1]}."


def sft_examples(problems, lazy_rate, seed):
    """The SFT rows of the training problems, imperfect on purpose: a lazy annotator wrote
    lazy_rate of the demonstrations of the problems with 3 or more steps, which stop a step early
    (lazy_solution). The SFT model learns that unaligned habit along with the arithmetic, and
    answers most 3-step questions a step early; the other errors of a tiny model are arithmetic
    facts it has not learned, which preference data on other questions cannot teach it."""
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


# -----------------------------------------------------------------------------
# answer checking and correction

ANSWER_MARKER = re.compile(r"the answer is", re.IGNORECASE)
SLOT = re.compile(r"\d+|(?<= )[-+*](?= )")  # the numbers and operator signs of a solution


def extract_answer(text):
    """Text after the last "The answer is" (any case), stripped, one trailing period dropped;
    None when the marker is absent."""
    matches = list(ANSWER_MARKER.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end():].strip()
    return answer[:-1].strip() if answer.endswith(".") else answer


def is_correct(response, answer):
    pred = extract_answer(response)
    return pred is not None and pred.lower() == answer.strip().lower()


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
        if is_correct(corrected, problem.answer):
            return (response, -1) if first < 0 else (corrected, first)
    target = response[:len(response) - len(response.lstrip())] + problem.solution  # the response's leading space
    first = next((i for i, (a, b) in enumerate(zip(response, target)) if a != b), min(len(response), len(target)))
    return target, first


def steps_correct(problem, response):
    """Every step of the response states the reference's numbers and signs: correct_response finds
    no error to fix. Stricter than is_correct, which a wrong chain can pass by a lucky last step."""
    return correct_response(problem, response)[1] < 0


# -----------------------------------------------------------------------------
# JSONL


class DataError(Exception):
    """A bad input file; the message is "path:line: what is wrong" (one line, for the CLI)."""


FIELDS = {"sft": ("input", "output"), "pairs": ("prompt", "chosen", "rejected"),
          "forget": ("prompt", "response")}


def read_jsonl(path, kind, tok=None):
    """Rows of a JSONL file of the given kind, each checked:
      sft:    {"input": str, "output": str}
      pairs:  {"prompt": str, "chosen": str, "rejected": str}   (TRL / ALLO release format)
      forget: {"prompt": str, "response": str, "weights": [number >= 0, ...] (optional)}
    With tok, forget weights must have one entry per token of tok.encode(response).
    Blank lines are skipped; other fields are kept. Raises DataError("path:line: ...")."""
    if kind not in FIELDS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(FIELDS)}")
    rows = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}:"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where} not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where} expected a JSON object, got {type(row).__name__}")
            for field in FIELDS[kind]:
                if field not in row:
                    raise DataError(f"{where} missing field {field!r}")
                if not isinstance(row[field], str):
                    raise DataError(f"{where} field {field!r} must be a string, "
                                    f"got {type(row[field]).__name__}")
            if kind == "forget" and "weights" in row:
                check_weights(row, where, tok)
            rows.append(row)
    return rows


def check_weights(row, where, tok):
    w = row["weights"]
    if not isinstance(w, list):
        raise DataError(f"{where} field 'weights' must be a list of numbers, got {type(w).__name__}")
    for i, x in enumerate(w):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise DataError(f"{where} field 'weights' item {i} must be a finite number >= 0, got {x!r}")
    if tok is not None:
        n = len(tok.encode(row["response"]))
        if len(w) != n:
            raise DataError(f"{where} field 'weights' has {len(w)} entries, the response has {n} tokens")


def write_jsonl(path, rows):
    """Write rows (dicts) as JSONL, atomically (path.tmp then os.replace)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# collation


def collate(tok, prompts, responses, max_len, weights=None):
    """Batch [BOS] + prompt + response + [EOS] rows, right-padded with tok.pad_id.

    prompts, responses: lists of str or of token id lists (pre-tokenized).
    weights: None (1.0 on every response target and on the EOS target) or one list per row
    with one number per response token (weight i -> target of response token i; EOS gets 0).
    Truncation to max_len: tokens are cut from the end (EOS first, then the response's tail);
    if the prompt leaves no room for a single response target, the prompt is cut from the left
    (BOS kept) down to max_len - 2 tokens and one target is kept. Each cut row counts once in
    "n_truncated"; the caller must report it.
    A preference batch is collate(tok, prompts + prompts, chosen + rejected, ...): rows 0..B-1
    chosen, B..2B-1 rejected, one padding length.
    Returns input_ids, attention_mask, labels (pre-shifted, -100 off-target) as long [B,T],
    weights float32 [B,T] (0 wherever labels == -100), n_truncated int.
    """
    if max_len < 2:
        raise ValueError(f"max_len {max_len}: need at least 2 (BOS and one target)")
    rows, n_truncated = [], 0
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p = tok.encode(p) if isinstance(p, str) else list(p)
        r = tok.encode(r) if isinstance(r, str) else list(r)
        w = [1.0] * len(r) + [1.0] if weights is None else list(weights[b]) + [0.0]
        if len(w) != len(r) + 1:
            raise ValueError(f"row {b}: {len(w) - 1} weights for {len(r)} response tokens")
        targets = r + [tok.eos_id]  # what the positions from the last prompt token on predict
        cut_prompt = len(p) + 2 > max_len  # not even one target fits after the prompt
        if cut_prompt:
            p = p[len(p) - (max_len - 2):]
        keep = min(len(targets), max_len - 1 - len(p))
        n_truncated += cut_prompt or keep < len(targets)
        rows.append(([tok.bos_id] + p + targets[:keep], len(p), w[:keep]))
    T = max(len(ids) for ids, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    wts = torch.zeros(B, T, dtype=torch.float32)
    for b, (ids, n_prompt, w) in enumerate(rows):
        L = len(ids)
        input_ids[b, :L] = torch.tensor(ids)
        attention_mask[b, :L] = 1
        # position n_prompt (the last prompt token, or BOS) predicts the first response token
        labels[b, n_prompt:L - 1] = input_ids[b, n_prompt + 1:L]
        wts[b, n_prompt:L - 1] = torch.tensor(w, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "weights": wts, "n_truncated": n_truncated}
