"""What ALLO reads and writes: atomic writes, command-line flags, tokenizers, prompts and answer
extraction, JSONL, collation into batches. Nothing here knows the embedded task (task.py).

The model sees prompt_text(question) = "Question: ...\\nAnswer:" and learns to continue it with a
response that starts with a space, so prompt and response tokenize separately with a clean
boundary and decode back to prompt + response exactly.

Token sequences: [BOS] + enc(prompt) + enc(response) + [EOS], right padded, labels pre-shifted
(labels[b, t] = input_ids[b, t+1] on response targets, else -100).
"""

import argparse
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

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


def replace_dir(tmp, folder):
    """Put the complete directory tmp in the place of `folder` (which may exist): its files are
    flushed to disk, then two renames, the old folder removed last."""
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):
            fsync(os.path.join(tmp, name))
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync(os.path.dirname(os.path.abspath(folder)))
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


# -----------------------------------------------------------------------------
# command-line flags

def count(low):
    """An argparse type: an integer >= low."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def real(low, high=math.inf, open_low=False):
    """An argparse type: a finite number in [low, high] (in (low, high] with open_low)."""
    def parse(text):
        value = float(text)
        if not (math.isfinite(value) and (value > low if open_low else value >= low) and value <= high):
            span = f"{'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else \
                f"{'>' if open_low else '>='} {low:g}"
            where = f"in {span}" if high < math.inf else span
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


rate = real(0, open_low=True)  # a learning rate: finite and > 0


class Parser(argparse.ArgumentParser):
    """argparse with one line for a bad flag: "error: argument --x: ...", exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, every flag with its default (none shown for switches and
    flags without one)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


# -----------------------------------------------------------------------------
# tokenizers


class DataError(Exception):
    """A bad input file or value; the message is "path[:line]: what is wrong" (one line, for the CLI)."""


class Tokenizer:
    """A SentencePiece tokenizer.model (Llama 2, TinyLlama, Mistral; the embedded task's) with
    explicit BOS/EOS/PAD ids. encode() adds no special token; decode() drops them."""

    def __init__(self, model_path, bos=None, eos=None, pad=None):
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
            if not proto:  # checked here: the library would log to stderr first
                raise DataError(f"{model_path}: not a SentencePiece model (empty)")
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as e:
            why = str(e).splitlines()[0][:80]
            raise DataError(f"{model_path}: not a SentencePiece model ({why})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.special(model_path, bos, self.sp.bos_id(), "BOS", "--bos-token")
        self.eos_id = self.special(model_path, eos, self.sp.eos_id(), "EOS", "--eos-token")
        own_pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id  # Llama: no pad piece, EOS pads
        self.pad_id = self.special(model_path, pad, own_pad, "PAD", "--pad-token")
        self.specials = {self.bos_id, self.eos_id, self.pad_id}

    def special(self, path, piece, default, what, flag):
        """The id of `piece` (a flag's override) or the model's own, which must exist."""
        i = default if piece is None else self.sp.piece_to_id(piece)
        if piece is not None and (i == self.sp.unk_id() and piece != self.sp.id_to_piece(i)):
            raise DataError(f"{path}: {flag} {piece!r} is not a piece of this tokenizer")
        if i < 0:
            raise DataError(f"{path}: the tokenizer has no {what} piece; name one with {flag}")
        return i

    def encode(self, text):
        return self.sp.encode(text)  # no BOS/EOS

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids if int(i) not in self.specials])


class HFTokenizer:
    """A Hugging Face tokenizer.json (Llama 3.x, SmolLM2 and other BPE tokenizers) through the
    `tokenizers` package, imported only here. BOS, EOS and PAD are the tokenizer's own, from
    tokenizer_config.json or special_tokens_map.json beside it, unless given; PAD defaults to EOS.
    encode() adds no special token (the post-processor's BOS is not added); decode() drops them."""

    def __init__(self, path, bos=None, eos=None, pad=None):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise DataError(f"{path}: a tokenizer.json needs the `tokenizers` package: pip install "
                            "tokenizers") from None
        try:
            self.tk = Backend.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for every bad file
            raise DataError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0][:80]})") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        named = special_tokens(os.path.dirname(path))
        self.bos_id = self.special(path, bos or named.get("bos_token"), "BOS", "--bos-token")
        self.eos_id = self.special(path, eos or named.get("eos_token"), "EOS", "--eos-token")
        pad = pad or named.get("pad_token")
        self.pad_id = self.eos_id if pad is None else self.special(path, pad, "PAD", "--pad-token")
        self.specials = {self.bos_id, self.eos_id, self.pad_id}

    def special(self, path, token, what, flag):
        i = None if token is None else self.tk.token_to_id(token)
        if i is None:
            said = "the tokenizer names none" if token is None else f"{token!r} is not one of its tokens"
            raise DataError(f"{path}: no {what} token ({said}); name one with {flag}")
        return i

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode([int(i) for i in ids if int(i) not in self.specials], skip_special_tokens=False)


def special_tokens(folder):
    """{"bos_token": str, "eos_token": ..., "pad_token": ...} from tokenizer_config.json, then
    special_tokens_map.json, in folder (each value a string or {"content": str}); missing ones absent."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not readable JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


@dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer's path with special tokens that override its own (token strings, None: its own)."""
    path: str
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None


def load_tokenizer(spec):
    """A SentencePiece tokenizer.model or a Hugging Face tokenizer.json. spec: a path (the file, or
    a model directory holding one, tokenizer.model first) or a TokenizerFile."""
    spec = spec if isinstance(spec, TokenizerFile) else TokenizerFile(spec)
    path, bos, eos, pad = spec.path, spec.bos, spec.eos, spec.pad
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in ("tokenizer.model", "tokenizer.json")
                 if os.path.exists(os.path.join(path, f))]
        if not found:
            raise DataError(f"{path}: holds neither tokenizer.model nor tokenizer.json")
        path = found[0]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such tokenizer file")
    kind = HFTokenizer if path.endswith(".json") else Tokenizer
    return kind(path, bos, eos, pad)


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

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
ANSWER_FORMATS = ("auto", "gsm8k", "the-answer-is", "last-number")
ANSWER_MARKER = re.compile(r"the answer is", re.IGNORECASE)
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def prompt_text(question, template=DEFAULT_TEMPLATE):
    """The prompt of a question: the template with {question} replaced (other braces kept as
    they are, so few-shot and chat templates need no escaping)."""
    return template.replace("{question}", question)


def read_template(value):
    """--prompt-template: a string with {question}, or @file whose text is one."""
    text = value
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{value[1:]}: cannot read the prompt template ({e})") from None
    if "{question}" not in text:
        raise DataError(f"--prompt-template {value[:40]!r}: has no {{question}} to fill in")
    return text


def extract_answer(text, fmt="auto"):
    """The final answer a text states, or None:
      gsm8k          the text after the last "####" (its first line)
      the-answer-is  the text after the last "The answer is" (any case)
      last-number    the last number
      auto           the first of these three that finds one.
    Stripped, one trailing period dropped."""
    if fmt not in ANSWER_FORMATS:
        raise ValueError(f"answer format {fmt!r}: expected one of {ANSWER_FORMATS}")
    if fmt == "auto":
        return next((a for f in ANSWER_FORMATS[1:] if (a := extract_answer(text, f)) is not None), None)
    if fmt == "last-number":
        numbers = NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    elif fmt == "gsm8k":
        answer = text.rsplit("####", 1)[1].strip().split("\n")[0] if "####" in text else None
    else:
        matches = list(ANSWER_MARKER.finditer(text))
        answer = text[matches[-1].end():] if matches else None
    if answer is None:
        return None
    answer = answer.strip()
    return answer[:-1].strip() if answer.endswith(".") else answer


def normalize_answer(answer):
    """An answer as compared: lower case, without commas, "$", a trailing period and a trailing
    ".0" ("$1,200.0." and "1200" are the same answer)."""
    a = answer.strip().lower().replace(",", "").replace("$", "").strip().rstrip(".").strip()
    return a[:-2] if a.endswith(".0") and a[:-2].lstrip("-").isdigit() else a


def is_correct(response, answer, fmt="auto"):
    """The response states `answer` (the reference's final answer), read in format fmt."""
    pred = extract_answer(response, fmt)
    return pred is not None and normalize_answer(pred) == normalize_answer(answer)


# -----------------------------------------------------------------------------
# JSONL


FIELDS = {"sft": ("input", "output"), "pairs": ("prompt", "chosen", "rejected"),
          "forget": ("prompt", "response"), "questions": ("question", "answer"),
          "rewrites": ("prompt", "response", "rewrite")}


class Rows(list):
    """The rows of a JSONL file, with where each came from: rows.where(i) -> "path:line"."""

    def __init__(self, path):
        super().__init__()
        self.path, self.lines = path, []

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"


def read_jsonl(path, kind, tok=None):
    """Rows of a JSONL file of the given kind, each checked:
      questions: {"question": str, "answer": str}   (GSM8K's format: answer = the reference
                 solution, ending in "#### <final answer>" or "The answer is <final answer>.")
      sft:       {"input": str, "output": str}, or questions rows
      pairs:     {"prompt": str, "chosen": str, "rejected": str}   (TRL / ALLO release format)
      forget:    {"prompt": str, "response": str, "weights": [number >= 0, ...] (optional)}
      rewrites:  {"prompt": str, "response": str, "rewrite": str, "first_error": int (optional)}
    With tok, forget weights must have one entry per token of tok.encode(response).
    Blank lines are skipped; other fields are kept. Raises DataError("path:line: ...").
    Returns Rows (a list that knows each row's line)."""
    if kind not in FIELDS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(FIELDS)}")
    rows = Rows(path)
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
            questions = kind == "sft" and "input" not in row and "question" in row
            for field in FIELDS["questions" if questions else kind]:
                if field not in row:
                    raise DataError(f"{where} missing field {field!r}")
                if not isinstance(row[field], str):
                    raise DataError(f"{where} field {field!r} must be a string, "
                                    f"got {type(row[field]).__name__}")
            if kind == "forget" and "weights" in row:
                check_weights(row, where, tok)
            first = row.get("first_error", -1) if kind == "rewrites" else -1
            if isinstance(first, bool) or not isinstance(first, int):
                raise DataError(f"{where} field 'first_error' must be an integer, got {first!r}")
            rows.append(row)
            rows.lines.append(lineno)
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
