"""Data for ALLO on disk and in batches: tokenizer, prompts, answer extraction, JSONL, atomic
writes, collation. Nothing here knows the embedded task (task.py).

The model sees prompt_text(question) = "Question: ...\\nAnswer:" and learns to continue it with a
response that starts with a space, so prompt and response tokenize separately with a clean
boundary and decode back to prompt + response exactly.

Token sequences: [BOS] + enc(prompt) + enc(response) + [EOS], right padded, labels pre-shifted
(labels[b, t] = input_ids[b, t+1] on response targets, else -100).
"""

import io
import json
import math
import os
import re
from contextlib import contextmanager

import sentencepiece as spm
import torch

# -----------------------------------------------------------------------------
# atomic writes


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; when the block ends without an error, the
    file is flushed to disk and renamed to `path` in one step, so `path` is either the old file or
    the whole new one. On an error the temporary file is removed."""
    tmp = path + ".tmp"
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))  # the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fsync(path):
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


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
    N in 0..max_number is a single piece (as the embedded task needs); vocab_size must leave
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(path)


# -----------------------------------------------------------------------------
# prompts and answers

ANSWER_MARKER = re.compile(r"the answer is", re.IGNORECASE)


def prompt_text(question):
    return f"Question: {question}\nAnswer:"


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
    """Write rows (dicts) as JSONL, atomically (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
