"""train.py's command line: its flags and presets, and the arguments each stage function gets from
them."""

import os

import parallel
import task
from data import (ANSWER_FORMATS, DEFAULT_TEMPLATE, HelpFormatter, Parser, TokenizerFile, count, rate,
                  read_jsonl, read_template, real)
from model import pick_device
from trainer import TrainConfig, need

# ----------------------------------------------------------------------------- each stage's arguments

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def stage_arguments(name, a, run):
    """The keyword arguments of stage `name` from the flags `a`: every input path is its flag or,
    without one, its place in the run directory (which must exist); hyperparameters from flags.
    Without --data (sft) or --questions (sample) the stage runs on the embedded task, whose files
    task.py writes into <run>/task/."""
    def at(flag, rel, maker):  # an input: the flag, else the run directory's file written by `maker`
        return flag or need(os.path.join(run, rel), maker)

    def model(stage):  # a model: the run directory's (its config.json must exist)
        return os.path.dirname(need(os.path.join(run, stage, "config.json"), stage))

    embedded = not (a.data if name == "sft" else a.questions)
    if name == "sft" and embedded:
        write_embedded_task(a, os.path.join(run, "task"))
    own = a.model if a.model and any(os.path.exists(os.path.join(a.model, f)) for f in TOKENIZER_FILES) \
        else None
    tokenizer = TokenizerFile(at(a.tokenizer or own, "task/tokenizer.model", "sft"), a.bos_token, a.eos_token,
                              a.pad_token)
    cfg = train_config(a)
    common = dict(out=a.out or os.path.join(run, name), tokenizer=tokenizer)
    generation = dict(template=read_template(a.prompt_template), stop=tuple(a.stop),
                      answer_format=a.answer_format, max_new_tokens=a.max_new_tokens)
    if name == "sft":
        arch = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                    hidden_dim=a.hidden_dim)
        val = os.path.join(run, "task", "val.jsonl") if embedded else (a.eval_questions or [None])[0]
        return dict(common, **generation, model=a.model, arch=arch, steps=a.sft_steps, lr=a.sft_lr, cfg=cfg,
                    data=a.data or os.path.join(run, "task", "sft.jsonl"), eval_n=a.eval_n,
                    eval_questions=val)
    if name == "sample":
        files = [at(None, f"task/{s}.jsonl", "sft") for s in ("train", "val", "test")] if embedded else \
            [a.questions] + (a.eval_questions or [])
        return dict(common, **generation, model=a.model or model("sft"), questions=files[0],
                    eval_questions=files[1:], k=a.k, temperature=a.temperature, top_p=a.top_p,
                    max_pairs=a.max_pairs, seed=a.seed, gold_chosen=a.gold_chosen, n_sample=a.n_sample,
                    correct=a.correct or ("steps" if embedded else "answer"))
    if name == "mask":
        grad = a.scorer == "grad"
        return dict(common, model=a.model or model("sft"), scorer=a.scorer, grad_mode=a.grad_mode,
                    data=at(a.data, "sample/pairs.jsonl", "sample") if grad else None,
                    warmup=None if grad else a.warmup or model("warmup"), forget_ratio=a.forget_ratio,
                    learn_ratio=a.learn_ratio, granularity=a.granularity, exclude_top=a.exclude_top,
                    beta=a.beta, cfg=cfg)
    if name == "rewriter":
        return dict(common, **rewriter_inputs(a, run), model=a.rewriter_init or a.model or model("sft"),
                    steps=a.rewriter_steps, lr=a.rewriter_lr, tau=a.tau, weights_mode=a.weights_mode, cfg=cfg)
    dpo = dict(common, ref=a.ref, beta=a.beta, cfg=cfg)
    if name == "warmup":
        return dict(dpo, model=a.model or model("sft"), data=at(a.data, "sample/pairs.jsonl", "sample"),
                    lr=a.dpo_lr, steps=a.dpo_steps, nll=a.nll)
    if name == "forget":
        mask = a.mask or (at(None, "mask/forget.safetensors", "mask") if a.forget_ratio < 1 else None)
        return dict(dpo, model=a.model or model("sft"), mask=mask, lr=a.forget_lr, steps=a.forget_steps,
                    data=at(a.data, "rewriter/forget_weighted.jsonl", "rewriter"), all_tokens=a.all_tokens)
    mask = a.mask or (at(None, "mask/learn.safetensors", "mask") if a.learn_ratio < 1 else None)
    return dict(dpo, model=a.model or model("forget"), data=at(a.data, "sample/pairs.jsonl", "sample"),
                mask=mask, lr=a.learn_lr, steps=a.dpo_steps, eps=a.eps, nll=a.nll)


def rewriter_inputs(a, run):
    """The rewriter's data, rewrites and pairs. In the run directory: its sample stage's wrong
    responses and pairs, and, on the embedded task, task.py's minimal corrections of them."""
    if a.data:
        return dict(data=a.data, rewrites=a.rewrites, pairs=a.pairs)
    data = need(os.path.join(run, "sample", "forget.jsonl"), "sample")
    rewrites = a.rewrites
    if not rewrites and os.path.exists(os.path.join(run, "task", "task.json")):  # the embedded task
        rewrites = os.path.join(run, "task", "rewrites.jsonl")
        if parallel.is_main():
            task.write_rewrites(read_jsonl(data, "forget"), rewrites)
        parallel.barrier()
    pairs = a.pairs or need(os.path.join(run, "sample", "pairs.jsonl"), "sample")
    return dict(data=data, rewrites=rewrites, pairs=pairs)


def write_embedded_task(a, folder):
    """The embedded task's files in `folder`, unless they are there with these settings."""
    settings = dict(seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, lazy_rate=a.lazy_rate,
                    max_operand=a.max_operand, max_value=a.max_value)
    if not task.written_with(folder, settings, a.force):  # every process checks, rank 0 writes
        if parallel.is_main():
            task.write_task(folder, **settings)
        parallel.barrier()


def train_config(a):
    return TrainConfig(batch_size=a.batch_size, grad_accum=a.grad_accum, weight_decay=a.weight_decay,
                       warmup_frac=a.warmup_frac, max_len=a.max_len, log_every=a.log_every,
                       ckpt_every=a.ckpt_every, grad_checkpoint=a.grad_checkpoint, compile=a.compile,
                       seed=a.seed)


# ----------------------------------------------------------------------------- flags

PRESETS = {
    # every stage on a few examples, for the tests
    "smoke": dict(n_train=96, n_val=24, n_test=24, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                  sft_steps=4, batch_size=8, k=2, dpo_steps=2, rewriter_steps=2, forget_steps=2, eval_n=8,
                  log_every=1, ckpt_every=2, max_new_tokens=40, gold_chosen=True),
    # the second size of the study (README, "Does it reproduce?"): 5.98M parameters, a lazier SFT,
    # batches of 16 (the same examples as the default's 32 over twice the steps), rates chosen on val
    "6m": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=704, lazy_rate=0.8, batch_size=16,
               sft_steps=2000, rewriter_steps=600, dpo_lr=2e-5, learn_lr=2e-5, forget_lr=3e-6),
}


def parse_args(argv, stages, description=None):
    """train.py's flags, each checked (one line and exit status 2 for a bad one); --stage is one of
    `stages` or all."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    add_input_flags(p, stages)
    add_task_flags(p)
    add_training_flags(p)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    a = p.parse_args(argv)
    check_flags(p, a)
    return a


def check_flags(p, a):
    """What no single flag's type can check, before any work."""
    for name, ratio in (("--forget-ratio", a.forget_ratio), ("--learn-ratio", a.learn_ratio)):
        if a.exclude_top + ratio > 1:
            p.error(f"argument {name}: --exclude-top {a.exclude_top:g} + {ratio:g} is more than every entry")
    if a.dim % a.n_heads or a.n_heads % a.n_kv_heads or (a.dim // a.n_heads) % 2:
        p.error(f"argument --dim: {a.dim} with --n-heads {a.n_heads} and --n-kv-heads {a.n_kv_heads}: dim "
                "must divide into heads of even size, heads into key/value heads")
    try:
        pick_device(a.device)
    except ValueError as e:
        p.error(f"argument --device: {e}")


def add_input_flags(p, stages):
    """What to run and its explicit inputs."""
    g = p.add_argument_group("what to run")
    g.add_argument("--stage", default="all", choices=list(stages) + ["all"], help="stage to run")
    g.add_argument("--run", "--run-dir", dest="run", default="runs/default",
                   help="run directory; under torchrun write --run-dir (torchrun's --run is its --run-path)")
    g.add_argument("--force", action="store_true",
                   help="redo a finished stage, start an unfinished one over, rewrite the embedded task")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="smoke: a tiny version of every stage, for tests; 6m: the 5.98M-parameter "
                        "model and task variant of the study's second size (its flags: README)")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=count(0), default=0,
                   help="CPU threads for torch, 0 = torch's default (tiny models often run fastest on 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of data, init, batch order, sampling")
    g = p.add_argument_group("explicit inputs (each overrides its place in the run directory)")
    g.add_argument("--model",
                   help="starting model dir (Hugging Face Llama layout); sft: without it, a new one")
    g.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: "
                   "the --model directory's, else <run>/task/tokenizer.model)")
    g.add_argument("--data", help="JSONL: for sft {input, output} or questions rows; pairs for warmup, mask, "
                   "learn; forgetting rows for rewriter, forget")
    g.add_argument("--questions", help="sample: questions JSONL in GSM8K's format, {question, answer}")
    g.add_argument("--eval-questions", nargs="+",
                   help="sample: questions files for held-out pairs; sft: validation accuracy on the first")
    g.add_argument("--ref",
                   help="reference model dir for warmup, forget, learn (default: the starting model)")
    g.add_argument("--warmup", help="mask: the warmup model of the delta scorer (default <run>/warmup)")
    g.add_argument("--mask", help="mask safetensors for forget, learn")
    g.add_argument("--rewrites", help="rewriter: minimal-edit rewrites {prompt, response, rewrite} of the "
                   "wrong responses (default: on the embedded task, task.py's; otherwise each response's "
                   "target is its reference solution, a weaker proxy)")
    g.add_argument("--pairs", help="rewriter: pairs whose chosen responses are trained as their own rewrites "
                   "(default <run>/sample/pairs.jsonl without --data)")
    g.add_argument("--rewriter-init", help="rewriter: its starting weights (default: --model)")
    g.add_argument("--out", help="output directory of the stage (default <run>/<stage>)")
    g.add_argument("--bos-token", help="override the tokenizer's BOS token")
    g.add_argument("--eos-token", help="override the tokenizer's EOS token")
    g.add_argument("--pad-token", help="override the tokenizer's PAD token (default: its own, else EOS)")


def add_task_flags(p):
    """The embedded task and the model trained on it from scratch."""
    g = p.add_argument_group("embedded task and model (sft without --data)")
    g.add_argument("--n-train", type=count(1), default=4000, help="training problems")
    g.add_argument("--n-val", type=count(1), default=500, help="validation problems, for choosing settings")
    g.add_argument("--n-test", type=count(1), default=500, help="held-out test problems")
    g.add_argument("--max-operand", type=count(1), default=task.MAX_OPERAND,
                   help="largest number added or taken")
    g.add_argument("--max-value", type=count(1), default=task.MAX_VALUE,
                   help="largest count a problem reaches")
    g.add_argument("--lazy-rate", type=real(0, 1), default=task.LAZY_RATE,
                   help="SFT demonstrations of 3-step problems that stop a step early: the unaligned habit "
                        "the preference stages should remove")
    g.add_argument("--dim", type=count(1), default=128, help="model width")
    g.add_argument("--n-layers", type=count(1), default=4, help="layers")
    g.add_argument("--n-heads", type=count(1), default=4, help="attention heads")
    g.add_argument("--n-kv-heads", type=count(1), default=2, help="key/value heads (grouped-query attention)")
    g.add_argument("--hidden-dim", type=count(1), default=352, help="SwiGLU hidden size")
    g.add_argument("--sft-steps", type=count(1), default=1000, help="SFT optimizer steps")
    g.add_argument("--sft-lr", type=rate, default=2e-3, help="SFT peak learning rate")
    g.add_argument("--eval-n", type=count(0), default=200, help="validation questions scored after SFT")


def add_training_flags(p):
    """Optimization, sampling and generation."""
    g = p.add_argument_group("optimization (every training stage)")
    g.add_argument("--max-len", type=count(2), default=128, help="max tokens of prompt + response")
    g.add_argument("--batch-size", type=count(1), default=32,
                   help="examples (or pairs) per micro-batch, process")
    g.add_argument("--grad-accum", type=count(1), default=1, help="micro-batches per optimizer step")
    g.add_argument("--weight-decay", type=real(0), default=0.0, help="AdamW weight decay, >=2-D params")
    g.add_argument("--warmup-frac", type=real(0, 1), default=0.1, help="linear warmup fraction, then cosine")
    g.add_argument("--log-every", type=count(1), default=50, help="progress line every N steps")
    g.add_argument("--ckpt-every", type=count(1), default=100, help="checkpoint every N steps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward in training "
                   "(faster steps on a GPU after tens of seconds of compiling; results agree with eager "
                   "within float rounding)")
    g.add_argument("--grad-checkpoint", action="store_true", help="keep only each block's input, recompute "
                   "the rest in backward (less activation memory, one more forward pass)")
    g = p.add_argument_group("sampling and generation (Stage 0, validation)")
    g.add_argument("--k", type=count(1), default=8, help="samples per question")
    g.add_argument("--temperature", type=real(0), default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=real(0, 1, open_low=True), default=1.0, help="nucleus sampling p")
    g.add_argument("--max-new-tokens", type=count(1), default=64, help="max generated tokens")
    g.add_argument("--max-pairs", type=count(0), default=5, help="pairs kept per question")
    g.add_argument("--correct", choices=["steps", "answer"], help="a sample is correct when its final answer "
                   "is right (answer, the paper's rule) and, with steps, every number and sign of the "
                   "reference's steps too (the embedded task's step checker, and its default there)")
    g.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                   help="a question's prompt: a string with {question}, or @file (few-shot, chat formats)")
    g.add_argument("--stop", action="append", default=[],
                   help="a string that ends a generation, besides EOS (repeatable)")
    g.add_argument("--answer-format", default="auto", choices=ANSWER_FORMATS, help="how a final answer is "
                   "read: auto tries '####', then 'The answer is', then the last number")
    g.add_argument("--gold-chosen", action="store_true",
                   help="questions with no correct sample pair the reference solution with the wrong ones")
    g.add_argument("--n-sample", type=count(0), default=1000, help="training questions to sample, 0 = all")
    add_allo_flags(p)


def add_allo_flags(p):
    """ALLO's own settings."""
    g = p.add_argument_group("ALLO")
    g.add_argument("--beta", type=real(0, open_low=True), default=0.1, help="beta of DPO and NPO")
    g.add_argument("--dpo-lr", type=rate, default=1e-5,
                   help="warmup (vanilla DPO, every parameter) learning rate")
    g.add_argument("--dpo-steps", type=count(1), default=100,
                   help="DPO steps of warmup AND learn: equal budgets")
    g.add_argument("--nll", type=real(0), default=0.0, help="weight of an NLL term on chosen (RPO-style)")
    g.add_argument("--scorer", default="delta", choices=["delta", "grad"],
                   help="key neurons from |theta_warmup - theta_sft| or accumulated DPO gradients")
    g.add_argument("--grad-mode", default="abs_sum", choices=["abs_sum", "sum_abs"],
                   help="--scorer grad: |sum g| (= SGD weight change) or sum |g|")
    g.add_argument("--granularity", default="entry", choices=["entry", "neuron"], help="mask unit")
    g.add_argument("--exclude-top", type=real(0, 1), default=0.0,
                   help="skip the very top fraction (release's l)")
    g.add_argument("--forget-ratio", type=real(0, 1), default=0.1, help="forgetting mask: top fraction")
    g.add_argument("--learn-ratio", type=real(0, 1), default=0.1,
                   help="learning mask: top fraction; 1 = no mask")
    g.add_argument("--rewriter-steps", type=count(1), default=300, help="rewriter training steps")
    g.add_argument("--rewriter-lr", type=rate, default=1e-3, help="rewriter learning rate")
    g.add_argument("--tau", type=real(0, 1, open_low=True), default=0.5,
                   help="unaligned token: rewriter p_t < tau")
    g.add_argument("--weights-mode", default="hard", choices=["hard", "soft"], help="1[p<tau] or 1-p")
    g.add_argument("--all-tokens", action="store_true", help="forget: every response token, ignore weights")
    g.add_argument("--forget-lr", type=rate, default=3e-5, help="forgetting learning rate")
    g.add_argument("--forget-steps", type=count(1), default=50, help="forgetting steps")
    g.add_argument("--learn-lr", type=rate, default=3e-5, help="learning-stage learning rate, under the mask")
    g.add_argument("--eps", type=real(0, 1, open_low=True), default=0.5,
                   help="key tokens: share of rejected kept")
