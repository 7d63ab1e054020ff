"""What ALLO reads: tokenizers and their special tokens, prompts (templates and chat templates),
answer extraction, JSONL, collation into batches. Nothing here knows the embedded task (task.py).

The model sees prompt_text(question) = "Question: ...\\nAnswer:" (or the model's own chat template)
and learns to continue it with a response that starts with a space (none after a chat template),
so prompt and response tokenize separately with a clean boundary.

Token sequences: the tokenizer's own prefix (its BOS, where its own encoding adds one) + enc(prompt)
+ enc(response) + [EOS], right padded, labels pre-shifted (labels[b, t] = input_ids[b, t+1] on
response targets, else -100).
"""

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import sentencepiece as spm
import torch

from bookkeeping.fileio import atomic_path
from bookkeeping.flags import count, nonempty, setting

# -----------------------------------------------------------------------------
# tokenizers


class DataError(Exception):
    """A bad input file or value; the message is "path[:line]: what is wrong" (one line, for the CLI)."""


BOS_MODES = ("auto", "always", "never")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# the files a tokenizer's folder may hold beside it, copied with it into every stage's output
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class BaseTokenizer:
    """What both kinds of tokenizer share. A subclass sets path, vocab_size, bos/eos/pad ids and
    tokens, own_prefix (the ids its own encoding puts before a text), encode and decode_ids.

    encode() adds no special token, but special tokens written in the text (a chat template's
    "<|im_start|>") are encoded as themselves; decode() drops BOS, EOS and PAD."""

    def setup(self, bos_mode):
        """The BOS rule: `auto` puts in front of a prompt what the tokenizer's own encoding does,
        `always` its BOS, `never` nothing."""
        if bos_mode not in BOS_MODES:
            raise ValueError(f"bos mode {bos_mode!r}: expected one of {BOS_MODES}")
        if bos_mode == "always" and self.bos_id is None:
            raise DataError(f"{self.path}: --bos always, but the tokenizer has no BOS token; name one with "
                            "--bos-token")
        self.prefix = {"auto": self.own_prefix, "always": [self.bos_id], "never": []}[bos_mode]
        self.specials = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self.chat_template = read_chat_template(os.path.dirname(self.path))

    def prompt_ids(self, text_or_ids):
        """A prompt's tokens as the tokenizer's own encoding makes them: its prefix (BOS) first,
        unless the prompt begins with it already (a chat template that writes its own BOS)."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        return ids if ids[:len(self.prefix)] == self.prefix else self.prefix + ids

    def decode(self, ids):
        return self.decode_ids([int(i) for i in ids if int(i) not in self.specials])

    def special_ids(self):
        """The token ids a Hugging Face config.json and generation_config.json name."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}

    def save_pretrained(self, folder):
        """Copy the tokenizer's files (and those beside it: its config, its chat template) into folder."""
        here = os.path.dirname(self.path)
        for name in (os.path.basename(self.path),) + COMPANION_FILES:
            if os.path.isfile(os.path.join(here, name)):
                shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))
        if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):  # a bare tokenizer.model
            config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bool(self.prefix),
                      "add_eos_token": False, "bos_token": self.bos_token, "eos_token": self.eos_token,
                      "pad_token": self.pad_token}
            with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
                json.dump(config, f, indent=2)


class Tokenizer(BaseTokenizer):
    """A SentencePiece tokenizer.model (Llama 2, TinyLlama, Mistral; the embedded task's). Its BOS goes
    in front of a prompt where tokenizer_config.json's add_bos_token says so, by default (Llama 2)."""

    def __init__(self, model_path, bos=None, eos=None, pad=None, bos_mode="auto"):
        try:
            with open(model_path, "rb") as f:
                proto = f.read()
            if not proto:  # checked here: the library would log to stderr first
                raise DataError(f"{model_path}: not a SentencePiece model (empty)")
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as e:
            why = str(e).splitlines()[0][:80]
            raise DataError(f"{model_path}: not a SentencePiece model ({why})") from None
        self.path, self.vocab_size = model_path, self.sp.vocab_size()
        own_bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.bos_id = self.special(bos, own_bos, "--bos-token")
        self.eos_id = self.special(eos, self.sp.eos_id() if self.sp.eos_id() >= 0 else None, "--eos-token")
        if self.eos_id is None:
            raise DataError(f"{model_path}: the tokenizer has no EOS piece; name one with --eos-token")
        own_pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id  # Llama: no pad piece, EOS pads
        self.pad_id = self.special(pad, own_pad, "--pad-token")
        self.bos_token, self.eos_token, self.pad_token = (None if i is None else self.sp.id_to_piece(i)
                                                          for i in (self.bos_id, self.eos_id, self.pad_id))
        adds_bos = tokenizer_config(os.path.dirname(model_path)).get("add_bos_token", True)
        if adds_bos and self.bos_id is None and bos_mode == "auto":
            raise DataError(f"{model_path}: the tokenizer has no BOS piece; name one with --bos-token, or "
                            "--bos never")
        self.own_prefix = [self.bos_id] if adds_bos is True else []
        self.setup(bos_mode)
        self.split_at = re.compile("(" + "|".join(re.escape(t) for t in {self.bos_token, self.eos_token,
                                                                        self.pad_token} if t) + ")")

    def special(self, piece, default, flag):
        """The id of `piece` (a flag's override) or the model's own (None: it has none)."""
        if piece is None:
            return default
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise DataError(f"{self.path}: {flag} {piece!r} is not a piece of this tokenizer")
        return i

    def encode(self, text):
        ids = []
        for part in self.split_at.split(text):  # special tokens written in the text are themselves
            ids += [self.sp.piece_to_id(part)] if part in (self.bos_token, self.eos_token, self.pad_token) \
                else self.sp.encode(part)
        return ids

    def decode_ids(self, ids):
        return self.sp.decode(ids)


class HFTokenizer(BaseTokenizer):
    """A Hugging Face tokenizer.json (Llama 3.x, SmolLM2, Qwen and other BPE tokenizers) through the
    `tokenizers` package, imported only here. BOS, EOS and PAD are the tokenizer's own, from
    tokenizer_config.json or special_tokens_map.json beside it, unless given; PAD defaults to EOS.
    Its post-processor decides whether a BOS goes in front of a prompt (Llama 3: yes, SmolLM2: no)."""

    def __init__(self, path, bos=None, eos=None, pad=None, bos_mode="auto"):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise DataError(f"{path}: a tokenizer.json needs the `tokenizers` package: pip install "
                            "tokenizers") from None
        try:
            self.tk = Backend.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for every bad file
            raise DataError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0][:80]})") from None
        with open(path, encoding="utf-8") as f:  # the library silently renumbers clashing added tokens
            for t in json.load(f).get("added_tokens") or []:
                got = self.tk.token_to_id(t.get("content", "")) if isinstance(t, dict) else None
                if got is None or got != t.get("id"):
                    raise DataError(f"{path}: added token {t!r:.60} is declared with id {t.get('id')!r} but "
                                    f"gets {got}: two added tokens share an id or a text")
        # ids may have gaps: the vocabulary the model needs runs to the largest id
        self.path = path
        self.vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        named = special_tokens(os.path.dirname(path))
        self.bos_token, self.eos_token = bos or named.get("bos_token"), eos or named.get("eos_token")
        self.pad_token = pad or named.get("pad_token") or self.eos_token
        self.bos_id = self.special(self.bos_token, "BOS", "--bos-token", required=False)
        self.eos_id = self.special(self.eos_token, "EOS", "--eos-token")
        self.pad_id = self.special(self.pad_token, "PAD", "--pad-token")
        plain, own = (self.tk.encode("a", add_special_tokens=s).ids for s in (False, True))
        self.own_prefix = own[:own.index(plain[0])] if plain and plain[0] in own else []
        self.setup(bos_mode)

    def special(self, token, what, flag, required=True):
        i = None if token is None else self.tk.token_to_id(token)
        if i is None and (required or token is not None):
            said = "the tokenizer names none" if token is None else f"{token!r} is not one of its tokens"
            raise DataError(f"{self.path}: no {what} token ({said}); name one with {flag}")
        return i

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids  # added tokens in the text: themselves

    def decode_ids(self, ids):
        return self.tk.decode(ids, skip_special_tokens=False)


def tokenizer_config(folder):
    """tokenizer_config.json of folder as a dict ({} when there is none)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    return config if isinstance(config, dict) else {}


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
        except (OSError, ValueError, RecursionError) as e:
            raise DataError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
    return out


def read_chat_template(folder):
    """The chat template of a tokenizer's folder: chat_template.jinja, else tokenizer_config.json's
    "chat_template" (a string, or a list of named ones: "default"); None when it has none."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


@dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer's path, special tokens that override its own (token strings, None: its own) and
    the BOS rule (auto: the tokenizer's own, always, never)."""
    path: str
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    bos_mode: str = "auto"


def find_tokenizer(path):
    """The tokenizer file of a path: the file itself, or the one a directory holds (tokenizer.model
    first); None when a directory holds none."""
    if not os.path.isdir(path):
        return path
    return next((os.path.join(path, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(path, f))),
                None)


def load_tokenizer(spec):
    """A SentencePiece tokenizer.model or a Hugging Face tokenizer.json. spec: a path (the file, or
    a model directory holding one, tokenizer.model first) or a TokenizerFile."""
    spec = spec if isinstance(spec, TokenizerFile) else TokenizerFile(spec)
    path = find_tokenizer(spec.path)
    if path is None:
        raise DataError(f"{spec.path}: holds neither tokenizer.model nor tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such tokenizer file")
    kind = HFTokenizer if path.endswith(".json") else Tokenizer
    tok = kind(path, spec.bos, spec.eos, spec.pad, spec.bos_mode)
    if os.path.isdir(spec.path):
        warn_if_other_disagrees(tok, os.path.join(spec.path, "tokenizer.json"), spec)
    return tok


PROBE = "Question: Tom has 12 apples and buys 7 more.\nAnswer: 12 + 7 = 19 apples. #### 19"


def warn_if_other_disagrees(tok, other, spec):
    """A folder with a tokenizer.model and a tokenizer.json uses the .model; where the .json (read
    when `tokenizers` is installed) encodes PROBE otherwise, or names other BOS/EOS ids, one warning
    says so: the two files are then two tokenizers, and the model was trained with one of them."""
    if tok.path == other or not os.path.isfile(other):
        return
    try:
        json_tok = HFTokenizer(other, spec.bos, spec.eos, spec.pad, spec.bos_mode)
    except DataError:  # no `tokenizers`, or a .json it cannot read: nothing to compare with
        return
    if tok.prompt_ids(PROBE) != json_tok.prompt_ids(PROBE):
        how = f"encode {PROBE[:19]!r}... into other ids"
    elif tok.eos_id != json_tok.eos_id:
        how = f"name other EOS ids ({tok.eos_id} and {json_tok.eos_id})"
    else:
        return
    print(f"warning: {os.path.dirname(tok.path)}: tokenizer.model and tokenizer.json {how}: they are two "
          "tokenizers; tokenizer.model is used (name the other with --tokenizer)", flush=True)


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
CHAT = "chat"  # --prompt-template chat: the tokenizer's own chat template
ANSWER_FORMATS = ("auto", "gsm8k", "the-answer-is", "last-number")
ANSWER_MARKER = re.compile(r"the answer is", re.IGNORECASE)
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def prompt_text(question, template=DEFAULT_TEMPLATE, tok=None, system=None):
    """The prompt of a question: the template with {question} replaced (other braces kept as they
    are, so few-shot formats need no escaping), or with template "chat" the tokenizer's own chat
    template rendered (render_chat)."""
    if template == CHAT:
        return render_chat(tok, question, system)
    return template.replace("{question}", question)


def response_lead(template):
    """What a response starts with after this template's prompt: a space after "Answer:", nothing
    after a chat template's "assistant\\n" or a template that ends in white space."""
    return "" if template == CHAT or template[-1:].isspace() else " "


def render_chat(tok, question, system=None):
    """The tokenizer's chat template rendered (render_messages) with the question as the user message,
    after an optional system message, and the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                "content": question}]
    return render_messages(tok, messages, generation_prompt=True)


def render_messages(tok, messages, generation_prompt):
    """The tokenizer's chat template (tok.chat_template) rendered over messages ([{"role", "content"}])
    as transformers renders it (jinja2, sandboxed, trim_blocks and lstrip_blocks), with or without the
    generation prompt. jinja2 is imported only here."""
    if tok is None or tok.chat_template is None:
        where = tok.path if tok is not None else "the tokenizer"
        raise DataError(f"{where}: --prompt-template chat, but its folder has no chat template "
                        "(tokenizer_config.json's chat_template, or chat_template.jinja)")
    if not tok.chat_template.strip():
        raise DataError(f"{tok.path}: the chat template is empty")
    template = chat_renderer(tok.chat_template, tok.path)
    with time_limit(CHAT_RENDER_SECONDS):
        try:
            text = template.render(messages=messages, add_generation_prompt=generation_prompt,
                                   bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
                                   pad_token=tok.pad_token or "")
        except Exception as e:  # the template's own code may raise anything (a raise, a sandbox refusal)
            raise DataError(f"{tok.path}: the chat template fails to render: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if len(text) > CHAT_MAX_CHARS:
        raise DataError(f"{tok.path}: the chat template renders {len(text):,} characters for one "
                        f"conversation (at most {CHAT_MAX_CHARS:,})")
    return text


CHAT_RENDER_SECONDS = 10  # a chat template that renders one prompt for longer loops without end
CHAT_MAX_CHARS = 65536  # and one that renders more than this for one question is not a prompt
_RENDERERS = {}


class TemplateTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds):
    """Raise TemplateTimeout in the block after `seconds` (SIGALRM: the main thread on Unix; elsewhere
    no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout(f"it ran for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def chat_renderer(source, where="the tokenizer"):
    """The compiled jinja2 template of a chat template's source (compiled once; `where`: its
    tokenizer, named by the error of one that does not parse), in a sandbox that also refuses to
    multiply a string or list, or raise to a power, past the size of a prompt."""
    if source not in _RENDERERS:
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
        except ImportError:
            raise DataError("--prompt-template chat needs the `jinja2` package: pip install jinja2") from None

        class Sandbox(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**"])

            def call_binop(self, context, operator, left, right):
                sizes = [len(x) for x in (left, right) if isinstance(x, (str, list, tuple))]
                numbers = [x for x in (left, right) if isinstance(x, int)]
                if operator == "*" and sizes and any(abs(n) * max(sizes) > CHAT_MAX_CHARS for n in numbers):
                    raise SecurityError("a sequence multiplied past the size of a prompt")
                if operator == "**" and isinstance(right, int) and abs(right) > 64:
                    raise SecurityError("a power too large for a prompt")
                return super().call_binop(context, operator, left, right)

        def raise_exception(message):
            raise TemplateError(message)

        env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            _RENDERERS[source] = env.from_string(source)
        except (TemplateError, RecursionError) as e:
            raise DataError(f"{where}: the chat template does not parse: {e}") from None
    return _RENDERERS[source]


def read_template(value):
    """--prompt-template: chat (the tokenizer's own chat template), a string with {question}, or
    @file whose text is one."""
    if value == CHAT:
        return value
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
          "rewrites": ("prompt", "response", "rewrite"),
          "preferences": ()}  # strings or lists of messages: checked by preference_pairs


def regular_file(path):
    """path, which must be a regular file (or a symbolic link to one); DataError otherwise: a FIFO, a
    device or a socket would hang or be consumed by a read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket cannot be an input)")
    return path


class Rows(list):
    """The rows of a JSONL file, with where each came from: rows.where(i) -> "path:line"."""

    def __init__(self, path):
        super().__init__()
        self.path, self.lines = path, []

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"


def read_jsonl(path, kind, tok=None, held=None):
    """Rows of a JSONL file of the given kind, each checked:
      questions: {"question": str, "answer": str}   (GSM8K's format: answer = the reference
                 solution, ending in "#### <final answer>" or "The answer is <final answer>.")
      sft:       {"input": str, "output": str}, or questions rows
      pairs:     {"prompt": str, "chosen": str, "rejected": str}   (TRL / ALLO release format)
      preferences: TRL's string or conversational rows, checked by preference_pairs
      forget:    {"prompt": str, "response": str, "weights": [number >= 0, ...] (optional)}
      rewrites:  {"prompt": str, "response": str, "rewrite": str, "first_error": int (optional)}
    With tok, forget weights must have one entry per token of tok.encode(response).
    Blank lines are skipped; other fields are kept. Raises DataError("path:line: ...").
    held: {path: bytes} already read (a stage's inputs, as hashed for its fingerprint); a path not
    in it is read now. Returns Rows (a list that knows each row's line)."""
    if kind not in FIELDS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(FIELDS)}")
    rows = Rows(path)
    if held is not None and path in held:
        f = io.BytesIO(held[path])
    else:
        regular_file(path)
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
            except RecursionError:
                raise DataError(f"{where} JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{where} expected a JSON object, got {type(row).__name__}")
            questions = kind == "sft" and "input" not in row and "question" in row
            for field in FIELDS["questions" if questions else kind]:
                if field not in row:
                    raise DataError(f"{where} missing field {field!r}")
                if not isinstance(row[field], str):
                    raise DataError(f"{where} field {field!r} must be a string, "
                                    f"got {type(row[field]).__name__}")
                try:
                    row[field].encode("utf-8")
                except UnicodeEncodeError:  # "\\ud800" in JSON: no tokenizer can encode it
                    raise DataError(f"{where} field {field!r} is not valid Unicode (a lone "
                                    "surrogate)") from None
            if kind == "forget" and "weights" in row:
                check_weights(row, where, tok)
            first = row.get("first_error", -1) if kind == "rewrites" else -1
            if isinstance(first, bool) or not isinstance(first, int):
                raise DataError(f"{where} field 'first_error' must be an integer, got {first!r}")
            rows.append(row)
            rows.lines.append(lineno)
    return rows


def finite(x):
    """x is a finite number (an integer too large for a float is not)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def check_weights(row, where, tok):
    w = row["weights"]
    if not isinstance(w, list):
        raise DataError(f"{where} field 'weights' must be a list of numbers, got {type(w).__name__}")
    for i, x in enumerate(w):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not finite(x) or x < 0:
            shown = repr(x) if len(repr(x)) < 30 else repr(x)[:12] + f"... ({len(repr(x))} characters)"
            raise DataError(f"{where} field 'weights' item {i} must be a finite number >= 0, got {shown}")
    if tok is not None:
        n = len(tok.encode(row["response"]))
        if len(w) != n:
            raise DataError(f"{where} field 'weights' has {len(w)} entries, the response has {n} tokens")


# -----------------------------------------------------------------------------
# collation


def encode_rows(tok, prompts, responses):
    """The rows' text tokenized once, for a whole stage: each prompt as tok.prompt_ids makes it (BOS
    first where the tokenizer's own encoding adds one), each response as tok.encode does. collate()
    and check_lengths() take these id lists as they take the text, and give the same batches."""
    return [tok.prompt_ids(p) for p in prompts], [tok.encode(r) for r in responses]


def collate(tok, prompts, responses, max_len, weights=None):
    """Batch prompt + response + [EOS] rows, each prompt as tok.prompt_ids makes it (the tokenizer's
    BOS first where its own encoding adds one), right-padded with tok.pad_id.

    prompts, responses: lists of str or of token id lists (pre-tokenized, without BOS).
    weights: None (1.0 on every response target and on the EOS target) or one list per row
    with one number per response token (weight i -> target of response token i; EOS gets 0).
    Truncation to max_len: tokens are cut from the end (EOS first, then the response's tail);
    if the prompt leaves no room for a single response target, the prompt is cut from the left
    (its BOS kept) down to max_len - 1 tokens and one target is kept. Each cut row counts once in
    "n_truncated"; the caller must report it.
    A preference batch is collate(tok, prompts + prompts, chosen + rejected, ...): rows 0..B-1
    chosen, B..2B-1 rejected, one padding length.
    Returns input_ids, attention_mask, labels (pre-shifted, -100 off-target) as long [B,T],
    weights float32 [B,T] (0 wherever labels == -100), n_truncated int.
    """
    if max_len < 2:
        raise ValueError(f"max_len {max_len}: need at least 2 (a prompt token and one target)")
    rows, n_truncated = [], 0
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        lead = tok.prompt_ids(p)
        if not lead:
            raise ValueError(f"row {b}: an empty prompt without BOS: nothing predicts the first token")
        r = tok.encode(r) if isinstance(r, str) else list(r)
        w = [1.0] * len(r) + [1.0] if weights is None else list(weights[b]) + [0.0]
        if len(w) != len(r) + 1:
            raise ValueError(f"row {b}: {len(w) - 1} weights for {len(r)} response tokens")
        targets = r + [tok.eos_id]  # what the positions from the last prompt token on predict
        cut_prompt = len(lead) + 1 > max_len  # not even one target fits after the prompt
        if cut_prompt:
            kept = len(tok.prefix) if lead[:len(tok.prefix)] == tok.prefix else 0  # the BOS stays
            lead = lead[:kept] + lead[len(lead) - (max_len - 1 - kept):]
        keep = min(len(targets), max_len - len(lead))
        n_truncated += cut_prompt or keep < len(targets)
        rows.append((lead + targets[:keep], len(lead), w[:keep]))
    T = max(len(ids) for ids, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    wts = torch.zeros(B, T, dtype=torch.float32)
    for b, (ids, n_lead, w) in enumerate(rows):
        L = len(ids)
        input_ids[b, :L] = torch.tensor(ids)
        attention_mask[b, :L] = 1
        # position n_lead - 1 (the last prompt token) predicts the first response token
        labels[b, n_lead - 1:L - 1] = input_ids[b, n_lead:L]
        wts[b, n_lead - 1:L - 1] = torch.tensor(w, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "weights": wts, "n_truncated": n_truncated}


def pack(batch, capacity):
    """The rows of a right-padded collate() batch [B,T] laid end to end in fewer rows of at most
    max(capacity, T) tokens, first-fit decreasing, tokens that several rows begin with held once.

    A row is its prompt, then its response. Rows with the same prompt tokens (a preference pair's
    chosen and rejected, the samples of one question) form a group: the prompt's tokens but the last
    once (branch 0), then each row's last prompt token and response (branches 1, 2, ...), as in
    tree attention (SpecInfer, Miao et al. 2024). Each row keeps its own copy of the last prompt
    token, the position that predicts its first response token, so every scored position stays one
    row's. A group that does not fit in a packed row is split into groups that do. The tokens that
    every row of the batch begins with before its first target (a chat template's system prompt) go
    once at the start of each packed row, as the prefix its groups share: one level more of the tree.
    Returns the packed rows [R,C]: input_ids; labels (-100 off-target and on padding); doc_ids (0 on
    the shared prefix, a packed row's groups numbered 1, 2, ...; -1 on padding); branch_ids (0 on a
    shared prompt or prefix and on padding, k on the k-th row of the group); positions (each token's
    position in its own row) and source (the flat index b*T + t each token came from; -1 on padding).
    Transformer.forward(..., doc_ids=, branch_ids=, positions=) gives each token the logits it has
    in its own row; a loss lays the packed log-probs back onto [B,T] through source
    (trainer.forward_logps), so every per-row loss of the padded batch applies unchanged. The
    matrix products then run over R*C <= B*T positions: the padding and the repeated prompts they
    skip are the gain."""
    B, T = batch["input_ids"].shape
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = batch["attention_mask"].sum(1).tolist()
    scored = (labels != -100).long()
    # the shared part of row b: its prompt but the last token, the tokens before its first target
    shared = [int(scored[b].argmax()) if scored[b].any() else 0 for b in range(B)]
    # the prefix every row shares: the longest run of equal leading tokens within every shared part
    differs = (ids[:, :min(shared)] != ids[:1, :min(shared)]).any(0).tolist() + [True]
    prefix = differs.index(True) if B > 1 else 0
    groups = {}  # rows with the same shared part, in their order; a row with none is a group alone
    for b in range(B):
        groups.setdefault(tuple(ids[b, :shared[b]].tolist()) if shared[b] else ("alone", b), []).append(b)
    capacity = max(capacity, T)

    def size(rows):  # tokens of a group after the prefix: the rest of its shared part once, each row's rest
        return shared[rows[0]] - prefix + sum(lengths[b] - shared[b] for b in rows)

    units = []  # the groups, each split into as few as fit in a packed row (a row alone always fits)
    for rows in groups.values():
        unit = []
        for b in rows:
            if unit and prefix + size(unit + [b]) > capacity:
                units.append(unit)
                unit = []
            unit.append(b)
        units.append(unit)
    sizes = [size(u) for u in units]

    def first_fit(c):  # first-fit decreasing into rows of c tokens: each row's units, the longest row
        bins, room = [], []  # the units of each packed row, and the tokens left in it after the prefix
        for u in sorted(range(len(units)), key=lambda u: -sizes[u]):  # longest first (stable)
            j = next((j for j, left in enumerate(room) if left >= sizes[u]), len(bins))
            if j == len(bins):
                bins.append([])
                room.append(c - prefix)
            bins[j].append(u)
            room[j] -= sizes[u]
        return bins, c - min(room)

    # every row is as long as the longest, so the row length is chosen too: of 33 from the longest
    # unit up to capacity, the one that leaves the fewest positions R * C
    longest = prefix + max(sizes)
    bins, C = min((first_fit(longest + (capacity - longest) * i // 32) for i in range(33)),
                  key=lambda fit: len(fit[0]) * fit[1])
    R = len(bins)
    source = torch.full((R, C), -1, dtype=torch.long)
    doc_ids = torch.full((R, C), -1, dtype=torch.long)
    branch_ids = torch.zeros(R, C, dtype=torch.long)
    positions = torch.zeros(R, C, dtype=torch.long)
    for j, us in enumerate(bins):
        first = units[us[0]][0]
        pieces = [(first, 0, 0, 0, prefix)]  # (row, group, branch, start, end): the prefix, group 0
        for d, u in enumerate(us, 1):
            s = shared[units[u][0]]
            pieces += [(units[u][0], d, 0, prefix, s)] + [(b, d, k, s, lengths[b]) for k, b in enumerate(units[u], 1)]
        at = 0
        for b, d, k, start, end in pieces:  # row b's tokens start..end-1 as branch k of group d
            n = end - start
            source[j, at:at + n] = b * T + torch.arange(start, end)
            doc_ids[j, at:at + n], branch_ids[j, at:at + n] = d, k
            positions[j, at:at + n] = torch.arange(start, end)
            at += n
    real, flat = source >= 0, source.clamp(min=0)
    return {"input_ids": ids.flatten()[flat],  # padding repeats token 0: never attended
            "labels": torch.where(real, labels.flatten()[flat], -100),
            "doc_ids": doc_ids, "branch_ids": branch_ids, "positions": positions, "source": source}


# -----------------------------------------------------------------------------
# prompts and generation (the sample stage and eval.py)

def template_flag(value):
    """--prompt-template as an argparse type: a bad template is a bad flag."""
    try:
        return read_template(value)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


template_flag.__name__ = "template"


DECODE_LOOPS = ("auto", "slots", "batches")


@dataclass(frozen=True)
class PromptConfig:
    """prompts and generation (sampling, validation, evaluation)"""
    template: str = setting(DEFAULT_TEMPLATE, "a question's prompt: chat (the model's own chat template, "
                            "needs jinja2), a string with {question}, or @file", flag="--prompt-template",
                            type=template_flag)
    system: str | None = setting(None, "with --prompt-template chat: a system message before the question",
                                 type=nonempty)
    answer_format: str = setting("auto", "how a final answer is read: auto tries '####', then 'The answer "
                                 "is', then the last number", choices=ANSWER_FORMATS)
    stop: tuple = setting((), "a string that ends a generation, besides EOS (repeatable)", type=nonempty)
    max_new_tokens: int = setting(64, "max generated tokens", type=count(1))
    gen_batch_size: int = setting(256, "prompts per generation batch (its KV cache: tools/memory_plan.py); a "
                                  "sampling temperature draws per batch, so the samples depend on it",
                                  type=count(1))
    decode: str = setting("auto", "generation loop: slots (fixed shapes, a finished row's slot takes the "
                          "next prompt, the step replayed from a CUDA graph on CUDA) or batches (every "
                          "batch decodes until its last row ends); auto: slots on CUDA, batches elsewhere",
                          choices=DECODE_LOOPS)


def decode_loop(decode, device):
    """The generation loop --decode names on `device`: "auto" is slots on CUDA, batches elsewhere
    (on a CPU a step costs little to launch, and the batches loop keeps the default run's samples)."""
    if decode not in DECODE_LOOPS:
        raise ValueError(f"decode must be one of {DECODE_LOOPS}, not {decode!r}")
    return decode if decode != "auto" else "slots" if device.type == "cuda" else "batches"


@torch.no_grad()
def generate_ids(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, batch_size=256,
                 label="generate", stop=(), decode="auto"):
    """Generated response token ids (EOS not included) for each prompt string (KV-cache decoding,
    batch_size rows at a time); each prompt begins as the tokenizer's own encoding begins it
    (tok.prompt_ids). A row ends at EOS or at the token whose decoded tail holds a stop string. The
    loop (decode_loop): batches, Transformer.generate on one batch after another, or slots,
    Transformer.generate_refill over every prompt. A progress line, headed `label`, every few
    seconds."""
    model.eval()
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    tail = max((len(s) for s in stop), default=0) + 2  # tokens enough to hold any stop string

    def finished(new):
        text = tok.decode(new[-tail:])
        return any(s in text for s in stop)

    if decode_loop(decode, model.embed_tokens.weight.device) == "slots":
        progress = Progress(label, len(prompts), "responses")
        return model.generate_refill([tok.prompt_ids(p) for p in prompts], max_new_tokens, tok.eos_id,
                                     temperature, top_p, gen, vocab_size=tok.vocab_size,
                                     finished=finished if stop else None, slots=batch_size,
                                     progress=progress.update)
    out = []
    for i in batches(label, len(prompts), batch_size, "responses"):
        ids = [tok.prompt_ids(p) for p in prompts[i:i + batch_size]]
        out += model.generate(ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature, top_p, gen,
                              vocab_size=tok.vocab_size, finished=finished if stop else None)
    return out


def cut_at_stop(text, stop):
    """The text up to the first of the stop strings (all of it when none occurs)."""
    return text[:min([i for s in stop if (i := text.find(s)) >= 0], default=len(text))]


def complete(model, tok, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop=(), batch_size=256,
             label="generate", decode="auto"):
    """Generated response text for each prompt string, cut at the first stop string."""
    ids = generate_ids(model, tok, prompts, max_new_tokens, temperature, top_p, seed, batch_size, label, stop,
                       decode)
    return [cut_at_stop(tok.decode(t), stop) for t in ids]


def reference_answers(rows):
    """The final answer of each questions row's reference solution (its "answer" field)."""
    answers = [extract_answer(r["answer"]) for r in rows]
    for i, a in enumerate(answers):
        if a is None:
            where = rows.where(i) if hasattr(rows, "where") else f"row {i}"
            raise DataError(f"{where}: field 'answer' states no final answer (no '####', 'The answer is' or "
                            "number)")
    return answers


# -----------------------------------------------------------------------------
# preference datasets (train.py --pairs)

def preference_pairs(rows, tok, template, system, max_len):
    """A preference dataset in either of TRL's formats, as the pipeline's pairs: returns (pairs,
    dropped). rows: read_jsonl(path, "preferences"). A row is
      strings:         {"prompt": str, "chosen": str, "rejected": str}; the prompt goes through the
                       prompt template as a question does (prompt_text; '{question}' keeps it as it is)
                       and each response starts with the template's lead (response_lead);
      conversational:  "chosen" and "rejected" lists of {"role", "content"} messages and "prompt" one
                       too, or no prompt (TRL's implicit prompt: the turns chosen and rejected share,
                       all but their last); rendered with the chat template (--prompt-template chat),
                       the prompt's own turns (system, earlier turns) kept and --system put first where
                       it has no system turn; a response is the conversation's text after the prompt's
                       (with its generation prompt), its closing EOS left to collate, which adds one.
    Each pair is {"prompt", "chosen", "rejected", "question"} (question: the last user turn, what the
    rewriter reads). Rows with an empty side, chosen equal to rejected, a pair seen before, or a side
    longer than max_len with its prompt and EOS are dropped and counted in `dropped`. A malformed row
    is a DataError naming its line and field."""
    pairs, seen = [], set()
    dropped = {"empty": 0, "chosen = rejected": 0, "duplicates": 0, f"over --max-len {max_len}": 0}
    for i, row in enumerate(rows):
        prompt, chosen, rejected, question = preference_texts(row, rows.where(i), tok, template, system)
        if not (prompt.strip() and chosen.strip() and rejected.strip()):
            dropped["empty"] += 1
        elif chosen == rejected:
            dropped["chosen = rejected"] += 1
        elif (prompt, chosen, rejected) in seen:
            dropped["duplicates"] += 1
        elif len(tok.prompt_ids(prompt)) + max(len(tok.encode(c)) for c in (chosen, rejected)) + 1 > max_len:
            dropped[f"over --max-len {max_len}"] += 1
        else:
            seen.add((prompt, chosen, rejected))
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "question": question})
    return pairs, dropped


def preference_texts(row, where, tok, template, system):
    """(prompt, chosen, rejected, question) text of one preference row (preference_pairs)."""
    for field in ("chosen", "rejected"):
        if field not in row:
            raise DataError(f"{where}: missing field {field!r}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be a string where 'chosen' and 'rejected' are")
        lead = response_lead(template)
        head = prompt_text(prompt, template, tok, system)
        return head, lead + chosen.strip(), lead + rejected.strip(), prompt
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both lists of "
                        "messages")
    if template != CHAT:
        raise DataError(f"{where}: conversational rows (lists of messages) need --prompt-template chat")
    chosen, rejected = messages_of(chosen, where, "chosen"), messages_of(rejected, where, "rejected")
    if isinstance(prompt, list):
        turns = messages_of(prompt, where, "prompt")
    elif chosen[:-1] and chosen[:-1] == rejected[:-1]:  # the implicit prompt: the turns both share
        turns, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raise DataError(f"{where}: no prompt: field 'prompt' is not a list of messages, and 'chosen' and "
                        "'rejected' do not share their turns before the last")
    if system and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}] + turns
    head = render_messages(tok, turns, generation_prompt=True)
    texts = []
    for side in (chosen, rejected):
        whole = render_messages(tok, turns + side, generation_prompt=False)
        if not whole.startswith(head):
            raise DataError(f"{where}: the chat template renders the conversation without the prompt's text "
                            "(with its generation prompt) at its start")
        text = whole[len(head):].rstrip()
        if tok.eos_token and text.endswith(tok.eos_token):
            text = text[:-len(tok.eos_token)]  # the turn's end: collate adds the EOS every response ends in
        texts.append(text)
    users = [m["content"] for m in turns if m["role"] == "user"]
    return head, texts[0], texts[1], users[-1] if users else turns[-1]["content"]


def messages_of(value, where, field):
    """A list of {"role": str, "content": str} messages (other keys kept), or a DataError."""
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                            isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{\"role\": str, \"content\": "
                        "str}} messages")
    return value



# -----------------------------------------------------------------------------
# progress of a long phase that is not training

PROGRESS_EVERY = 10.0  # seconds between the progress lines of a phase that is not training


class Progress:
    """The progress of a long phase that is not training (sampling, reference log-probs, scoring,
    evaluation) over n items: update(done) prints a plain line (done/total, rate, ETA) at most every
    PROGRESS_EVERY seconds, and a last one when the phase took longer than that."""

    def __init__(self, label, n, unit="rows"):
        self.label, self.n, self.unit = label, n, unit
        self.t0 = self.last = time.time()

    def update(self, done):
        now = time.time()
        if now - self.last >= PROGRESS_EVERY or (done == self.n and now - self.t0 >= PROGRESS_EVERY):
            rate, left = done / max(now - self.t0, 1e-9), self.n - done
            print(f"{self.label} {done}/{self.n} {self.unit}, {rate:,.1f}/s, eta {left / rate:.0f}s",
                  flush=True)
            self.last = now


def batches(label, n, size, unit="rows"):
    """The start of each batch of `size` of n rows, with the phase's Progress lines."""
    progress = Progress(label, n, unit)
    for i in range(0, n, size):
        yield i
        progress.update(min(n, i + size))
