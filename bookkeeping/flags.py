"""The command line of train.py, eval.py and `python -m study`: checked argparse types, and flags made from
the settings of the stage configs.

A stage's setting is written once, as a field of its frozen config dataclass:

    lr: float = setting(3e-5, "learning-stage learning rate, under the mask", flag="--learn-lr", type=rate)

add_config_flags makes the flag from it (--<field name> unless `flag` says otherwise, its default,
type and help), and config_from fills the config from the parsed flags by field name. A flag that
several configs share (--beta, --seed) is made once and read by each.
"""

import argparse
import math
import os
import sys
from dataclasses import MISSING, field, fields

import torch

from model import pick_device, use_cpu_bf16

# ----------------------------------------------------------------------------- checked types


def count(low, high=None):
    """An argparse type: an integer >= low (and <= high)."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
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


def nonempty(text):
    """An argparse type: a string that is not empty."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


nonempty.__name__ = "text"


class Parser(argparse.ArgumentParser):
    """argparse with one line for a bad flag: "error: argument --x: ...", exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, every flag with its default (none shown for switches and
    flags without one), on lines of up to 110 characters."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=110)

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False and action.default != []
        return super()._get_help_string(action) if shown else action.help


# ----------------------------------------------------------------------------- settings as flags

VARIANTS = "variants not in the paper"


def setting(default, help, *, flag=None, type=None, choices=None, variant=False, result=True,
            per_process=False, default_from=None):
    """A config field that is also a flag. flag: its name (default --<field name>); type: the
    argparse type (bool fields are switches, tuple fields repeat); variant: listed under "variants
    not in the paper"; result=False: it does not change the result (not in the resume fingerprint);
    per_process: counted over every process in the fingerprint; default_from: a None default takes
    the value of that other flag (its dest)."""
    meta = dict(help=help, flag=flag, type=type, choices=choices, variant=variant, result=result,
                per_process=per_process, default_from=default_from)
    return field(default=default, metadata=meta)


def flag_name(f):
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest(f):
    return flag_name(f)[2:].replace("-", "_")


def check_settings(configs):
    """Every flag declared once: a setting met again (in another config, or in a config nested in
    several) must carry the same default, help, type and choices, else a ValueError names it."""
    seen = {}
    for cls in configs:
        for f in fields(cls):
            if "help" not in f.metadata:  # a nested config: its own entry of `configs`
                continue
            spec = (f.default, f.metadata["help"], f.metadata["type"], f.metadata["choices"])
            first = seen.setdefault(dest(f), (cls.__name__, spec))
            if first[1] != spec:
                raise ValueError(f"{flag_name(f)}: declared in {first[0]} and again, differently, in "
                                 f"{cls.__name__}; declare it once (a nested config)")


def add_config_flags(parser, configs):
    """The flags of every setting of `configs` (config dataclasses; nested configs are their own
    entries), each once, in the argument group of its config (its docstring's first line), and last
    the group "variants not in the paper"."""
    check_settings(configs)
    made, placed = {action.dest for action in parser._actions}, {}
    for cls in configs:
        for f in fields(cls):
            if "help" in f.metadata and dest(f) not in made:  # not a nested config, nor a flag made already
                made.add(dest(f))
                title = VARIANTS if f.metadata["variant"] else cls.__doc__.strip().splitlines()[0]
                placed.setdefault(title, []).append(f)
    placed[VARIANTS] = placed.pop(VARIANTS, [])
    for title, settings in placed.items():
        g = parser.add_argument_group(title)
        for f in settings:
            meta = f.metadata
            if f.type in (bool, "bool"):
                g.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, default=f.default,
                               help=meta["help"])  # --no-X too: a preset's True can be turned off
            elif f.default == ():
                g.add_argument(flag_name(f), action="append", default=[], type=meta["type"],
                               help=meta["help"])
            else:
                g.add_argument(flag_name(f), default=f.default, type=meta["type"], choices=meta["choices"],
                               help=meta["help"])


def config_from(cls, a, **given):
    """A config of class `cls` from parsed flags `a` by field name (nested configs alike); `given`
    fills fields by name instead."""
    values = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif "help" not in f.metadata:  # a nested config
            nested = type(f.default) if f.default is not MISSING else f.default_factory
            values[f.name] = config_from(nested, a)
        else:
            value = getattr(a, dest(f))
            if value is None and f.metadata["default_from"]:
                value = getattr(a, f.metadata["default_from"])
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


# ----------------------------------------------------------------------------- shared input flags

def add_tokenizer_flags(g):
    """The tokenizer and its special tokens (train.py and eval.py)."""
    from data import BOS_MODES  # imported here: data.py imports this module (its configs' settings)
    g.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: "
                   "the model directory's, else the run's)")
    g.add_argument("--bos", default="auto", choices=BOS_MODES, help="BOS before every prompt: auto = as the "
                   "tokenizer's own encoding does (a tokenizer.json's post-processor; for a tokenizer.model, "
                   "tokenizer_config.json's add_bos_token, default on)")
    g.add_argument("--bos-token", type=nonempty, help="override the tokenizer's BOS token")
    g.add_argument("--eos-token", type=nonempty, help="override the tokenizer's EOS token (ends every "
                   "response)")
    g.add_argument("--pad-token", type=nonempty, help="override the tokenizer's PAD token (default: its own, "
                   "else EOS)")


def add_machine_flags(g):
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=count(0), default=0,
                   help="CPU threads for torch, 0 = torch's default (tiny models often run fastest on 1)")
    g.add_argument("--cpu-bf16", action="store_true",
                   help="on a CPU with AMX or AVX512-BF16: bf16 autocast, as on CUDA (float32 weights, "
                        "optimizer state and losses); refused on other CPUs, where bf16 products are "
                        "emulated")


def apply_machine_flags(a):
    """--threads and --cpu-bf16, process-wide; a CPU without bf16 products stops with one line."""
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        use_cpu_bf16(a.cpu_bf16)
    except ValueError as e:
        print(f"error: --cpu-bf16: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- train.py's flags

PRESETS = {
    # every stage on a few examples, for the tests
    "smoke": dict(n_train=96, n_val=24, n_test=24, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                  sft_steps=4, batch_size=8, k=2, dpo_steps=2, rewriter_steps=2, forget_steps=2, eval_n=8,
                  log_every=1, ckpt_every=2, max_new_tokens=40, gold_chosen=True),
    # the second size of the study (docs/study.md): 5.98M parameters, a lazier SFT, batches of 16 over
    # twice the default's SFT and rewriter steps, rates chosen on val
    "6m": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=704, lazy_rate=0.8, batch_size=16,
               sft_steps=2000, rewriter_steps=600, dpo_lr=2e-5, learn_lr=2e-5, forget_lr=3e-6),
    # a ~100M-1B pretrained Llama (--model): budgets that run SmolLM2-135M-Instruct through every stage
    # in about half an hour on 2 CPU cores; the DPO, forget and learn rates the best of a sweep on its
    # validation split (docs/own-model.md); a checkpoint every 4 steps, at most one per 5 minutes and none
    # in a stage's first 5 (a 135M model's weights and optimizer state, 1.6 GB, are written and flushed at
    # each: 12-25 s on a 2-core virtual machine's disk, as long as 4-8 SFT steps); packed rows, as a chat
    # template's prompts and real solutions vary in length and a pair's two rows share a long prompt
    "pretrained": dict(batch_size=8, max_len=256, gen_batch_size=64, ref_batch_size=16, max_new_tokens=64,
                       sft_steps=40, sft_lr=2e-5, eval_n=60, k=4, n_sample=120, temperature=0.7, dpo_steps=12,
                       dpo_lr=1e-6, learn_lr=2e-6, forget_steps=8, forget_lr=1e-5, rewriter_steps=12,
                       rewriter_lr=1e-5, log_every=2, ckpt_every=4, ckpt_minutes=5, pack=True),
}
# the authors' release protocol (RUCAIBox/ALLO's scripts) on the pretrained preset's batches and lengths: 10
# samples per problem at temperature 0.7, top-p 0.95, at most 5 pairs a problem; one 5% mask for both stages;
# the rejected side's top 10% of tokens; warmup DPO at 1e-6, forgetting at 5e-7, learning at 5e-6, one epoch
# each on a cosine schedule (their effective batches of 32-128 on 8 GPUs scaled down to the preset's 8)
PRESETS["release"] = {**PRESETS["pretrained"], "k": 10, "temperature": 0.7, "top_p": 0.95, "max_pairs": 5,
                      "forget_ratio": 0.05, "learn_ratio": 0.05, "eps": 0.1, "dpo_lr": 1e-6,
                      "forget_lr": 5e-7, "learn_lr": 5e-6, "epochs": 1.0}
# rates and budgets chosen for the 0.78M toy trained from scratch: a warning when a pretrained model gets them
TOY_DEFAULTS = ("sft_lr", "rewriter_lr", "dpo_lr", "learn_lr", "forget_lr", "k", "n_sample", "sft_steps")


def parse_train_args(argv, stages, configs, description=None):
    """train.py's flags, each checked (one line and exit status 2 for a bad one): what to run, your
    model and data, one stage's explicit inputs, the tokenizer, and the settings of `configs`."""
    p = Parser(description=description, formatter_class=HelpFormatter,
               usage="%(prog)s [--stage NAME] [--model DIR (--questions F --eval-questions F [F ...] | "
                     "--pairs F --eval-pairs F [F ...])] [flags]")
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", default="all", choices=list(stages) + ["all"], help="stage to run")
    g.add_argument("--run", "--run-dir", dest="run", default="runs/default", type=folder,
                   help="run directory; under torchrun write --run-dir (torchrun's --run is its --run-path)")
    g.add_argument("--force", action="store_true",
                   help="redo a finished stage, start an unfinished one over, rewrite the run's inputs")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="smoke: a tiny version of every stage, for tests; 6m: the 5.98M-parameter model and "
                        "task variant of the study's second size (docs/study.md); pretrained: rates and "
                        "budgets for a ~100M-1B pretrained --model (a start, for these budgets: choose "
                        "rates per model and budget on val); release: pretrained's batches with the "
                        "authors' protocol (10 samples a problem, 5%% masks, eps 0.1, their rates, one "
                        "epoch per preference stage)")
    add_machine_flags(g)
    g = p.add_argument_group("your model and data (every stage: python train.py --model DIR --questions F "
                             "--eval-questions F..., or --pairs F --eval-pairs F...)")
    g.add_argument("--model", type=folder, help="your model directory (Hugging Face Llama, Qwen2 or Qwen3); "
                   "with --stage: the stage's starting model")
    g.add_argument("--questions", help="your training questions, JSONL in GSM8K's format {question, answer}")
    g.add_argument("--eval-questions", nargs="+", help="questions files for validation (the first) and "
                   "held-out pairs and the table (the last)")
    g.add_argument("--sft-data", help="SFT rows, questions or {input, output} (default: --questions' "
                   "reference solutions)")
    g.add_argument("--pairs", help="instead of --questions, your preference pairs, TRL's rows: {prompt, "
                   "chosen, rejected} strings, or lists of {role, content} messages with --prompt-template "
                   "chat; every stage runs on them, without sampling (with --stage rewriter: the pairs whose "
                   "chosen responses are trained as their own rewrites)")
    g.add_argument("--eval-pairs", nargs="+", help="with --pairs: held-out pairs files, the same formats "
                   "(the table scores the last)")
    g.add_argument("--skip-sft", action="store_true", help="start from --model as it is (an instruct model)")
    g.add_argument("--rewrites", help="minimal-edit rewrites {prompt, response, rewrite} of the wrong "
                   "responses (default: on the embedded task, task.py's; otherwise each response's target is "
                   "its reference solution, a weaker proxy)")
    g = p.add_argument_group("one stage's explicit inputs (with --stage; each overrides its place in the "
                             "run)")
    g.add_argument("--data", help="JSONL: for sft {input, output} or questions rows; pairs for dpo, mask, "
                   "learn; forgetting rows for rewriter, forget")
    g.add_argument("--ref", type=folder, help="reference model dir for dpo, forget, learn (default: the "
                   "starting model)")
    g.add_argument("--dpo-model", type=folder, help="mask: the dpo stage's model, for the delta scorer")
    g.add_argument("--mask", help="mask safetensors for forget, learn")
    g.add_argument("--rewriter-init", type=folder, help="rewriter: its starting weights (default: --model)")
    g.add_argument("--out", type=folder, help="output directory of the stage (default <run>/<stage>)")
    add_tokenizer_flags(p.add_argument_group("tokenizer"))
    add_config_flags(p, configs)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    a = p.parse_args(argv)
    check_flags(p, a)
    toy = [name for name in TOY_DEFAULTS if getattr(a, name) == p.get_default(name)
           and not (a.pairs and name in ("k", "n_sample"))]  # a run on pairs samples nothing
    if a.model and (a.questions or a.pairs) and not a.preset and toy:  # your model, every stage
        given = ", ".join(f"--{n.replace('_', '-')} {getattr(a, n):g}" for n in toy)
        print(f"warning: {given}: the embedded 0.78M model's defaults, not rates or budgets for a pretrained "
              "--model; start from --preset pretrained and choose the rates for your model on the validation "
              "file", file=sys.stderr)
    return a


def folder(text):
    """An argparse type: a directory path, normalized once (no trailing slash, no "..")."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return os.path.normpath(text)


folder.__name__ = "directory"


def check_flags(p, a):
    """What no single flag's type can check, before any work."""
    for name, ratio in (("--forget-ratio", a.forget_ratio), ("--learn-ratio", a.learn_ratio)):
        if a.exclude_top + ratio > 1:
            p.error(f"argument {name}: --exclude-top {a.exclude_top:g} + {ratio:g} is more than every entry")
    if a.dim % a.n_heads or a.n_heads % a.n_kv_heads or (a.dim // a.n_heads) % 2:
        p.error(f"argument --dim: {a.dim} with --n-heads {a.n_heads} and --n-kv-heads {a.n_kv_heads}: dim "
                "must divide into heads of even size, heads into key/value heads")
    if a.min_steps > a.max_steps:
        p.error(f"argument --min-steps: {a.min_steps} is more than --max-steps {a.max_steps}")
    if a.skip_sft and not a.model:
        p.error("argument --skip-sft: starts from --model, which is missing")
    if a.system and a.prompt_template != "chat":
        p.error("argument --system: goes with --prompt-template chat")
    try:
        pick_device(a.device)
    except ValueError as e:
        p.error(f"argument --device: {e}")
