"""Throughput of ALLO's training steps and of generation, to estimate the time of a run.

    python -m tools.bench_train                      # three model sizes, about 4 minutes on 2 CPU cores
    python -m tools.bench_train --sizes 10m,1.1b --device cuda  # 1.1b: TinyLlama's shape
    python -m tools.bench_train --prompt 200 --response 300 --batch 8 --threads 1
    python -m tools.bench_train --model DIR --batch 4 --prompt 48 --response 48 --jitter 0 --threads 2
    python -m tools.bench_train --versus-hf --sizes 135m,1.1b --device cuda --prompt 256 --response 256

Per model size (--sizes: a preset of SIZES or dim:layers:heads:kv_heads:hidden:vocab[:untied]),
the optimizer step of train.py on one batch of random token ids:
  DPO (full)  vanilla DPO, chosen and rejected rows in one [2B,T] batch, every parameter trained
              (MaskedAdamW with all-True masks), as `--stage dpo`
  DPO learn   DPO with key tokens (--eps) on the rejected half, MaskedAdamW on a --mask-ratio
              mask (random scores), as `--stage learn`
  NPO forget  token-level NPO with token weights on a [B,T] batch, the same mask, as `--stage forget`
  SFT         cross-entropy of the responses of a [B,T] batch, every parameter, as `--stage sft`
  generate    model.generate with the KV cache, greedy, --gen-batch prompts, --new tokens each
A training step: trainer.py's per-batch loss (dpo_batch_loss, npo_batch_loss; bf16 autocast on
CUDA and with --cpu-bf16), backward, clip_grad_norm_ 1.0, optimizer step, zero_grad, as
trainer.fit does on one process; reference log-probs are cached before timing
(trainer.reference_logps), as train.py does. tokens/s counts the real (non-padding) tokens of the
batch, as train.py's progress lines; for generate, the new tokens.
Lengths vary by +-jitter around --prompt / --response, so rows are padded as in real batches.
--cpu-bf16 times each step and generate twice, in float32 and under bf16 autocast (train.py --cpu-bf16,
on a CPU with AMX or AVX512-BF16), and prints how much faster bf16 is.
--pack times each training step twice, padded and packed (trainer.packed into rows of twice the mean
length, as train.py --pack packs into rows of --max-len: packed only where that saves a tenth of the
positions, else the padded batch again), and prints how much faster packed is.
After --warmup steps, the median of --steps. On a CPU shared with other jobs use --threads 1
(oversubscribed threads made the default model's step 50-100x slower).

--model DIR (a Hugging Face checkpoint), or --versus-hf with --sizes (a new model of each shape, its
random weights written to a temporary folder): the forward and backward of an SFT, a DPO and a
DPO-learn step (key tokens at --eps) on one batch, the project's model against transformers' model
of the same checkpoint, timed in turns in one process. Both go through trainer.py's loss code: the
transformers side as a transformers user's loss computes it (every position's logits, the attention
mask; AsProject), the project's as train.py does (the head only at the scored targets). Prints
tokens/s (and MFU with --peak-tflops or on a named GPU), both losses (which must agree) and each
step's time ratio (target: the project at most 0.95x transformers' time). Needs transformers
(tools/versus_hf.py); without it the project is timed alone.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import torch

import allo
from data import collate
from model import ModelConfig, Transformer, autocasts, pick_device, use_cpu_bf16
from bookkeeping.flags import apply_machine_flags
from tools.versus_hf import in_turns, load_hf
from trainer import (Norms, dpo_batch_loss, full_masks, npo_batch_loss, packed, reference_logps,
                     sft_batch_loss, with_reference)

SIZES = {  # name -> dim:layers:heads:kv_heads:hidden:vocab[:untied] (default: tied embeddings, as train.py)
    "default": "128:4:4:2:352:320",  # train.py's embedded-task model: 0.78M
    "10m": "256:10:4:2:704:8000",  # 9.4M
    "34m": "512:8:8:8:1376:8000:untied",  # 33.5M, bench_optim.py's model
    "135m": "576:30:9:3:1536:49152",  # SmolLM2-135M's shape
    "1.1b": "2048:22:32:4:5632:32000:untied",  # TinyLlama-1.1B's shape
}
# what collate needs; the inputs are token ids
TOK = SimpleNamespace(bos_id=2, eos_id=3, pad_id=0, prompt_ids=lambda ids: [2] + list(ids))


def model_config(spec, max_len):
    """A preset name or dim:layers:heads:kv_heads:hidden:vocab[:untied] -> ModelConfig."""
    fields = SIZES.get(spec, spec).split(":")
    if (len(fields) not in (6, 7) or fields[6:] not in ([], ["untied"])
            or not all(f.isdigit() for f in fields[:6])):
        raise ValueError(f"--sizes {spec!r}: expected one of {', '.join(SIZES)} "
                         "or dim:layers:heads:kv_heads:hidden:vocab[:untied]")
    dim, layers, heads, kv, hidden, vocab = map(int, fields[:6])
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                       hidden_dim=hidden, max_seq_len=max_len, tie_embeddings=fields[6:] != ["untied"])


def random_ids(rng, mean, jitter, vocab):
    n = max(1, round(mean * (1 + rng.uniform(-jitter, jitter))))
    return [rng.randrange(4, vocab) for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_step(model, opt, loss_fn, batch):
    """One optimizer step as train.fit does it (one process, grad_accum 1) -> real tokens."""
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss {loss.item()}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def median_time(fn, args, device):
    """Median seconds of fn() over args.steps calls after args.warmup; fn returns its tokens."""
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        tokens = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[args.warmup:]), tokens


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the matrix products' kernels


def matmul_share(fn, steps):
    """--profile: the share of fn's time (`steps` calls under torch's profiler, CPU) spent in matrix
    products, their FLOPs (the profiler's count, 2 x M x K x N each) and seconds: with all the rest
    free, a step could be at most 1 / share as fast at their rate. Also the seconds a call's
    products take alone (products_alone), the bound outside the profiler, whose own cost per
    operation inflates the rest."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True,
                                record_shapes=True) as prof:
        for _ in range(steps):
            fn()
    events = prof.key_averages(group_by_input_shape=True)
    products = [e for e in events if e.key in MATMULS]
    busy = sum(e.self_cpu_time_total for e in products)  # microseconds
    return (busy / sum(e.self_cpu_time_total for e in events), sum(e.flops for e in products), busy / 1e6,
            products_alone(products) / steps)


def products_alone(products, reps=5):
    """Seconds the profiled matrix products take on their own: each kernel and shapes the profiler
    recorded (key_averages grouped by input shape) called on random operands of those shapes, in
    the autocast dtype where CPU bf16 is on (model.use_cpu_bf16), the median of `reps` calls times
    how often it ran."""
    dtype = torch.bfloat16 if autocasts(torch.device("cpu")) else torch.float32
    total = 0.0
    for e in products:
        kernel = getattr(torch, e.key.split("::")[1])  # mm, addmm, bmm, baddbmm
        operands = [torch.randn(s, dtype=dtype) for s in e.input_shapes if s]  # the scalars left at 1
        times = []
        for _ in range(reps + 1):  # the first call warms up
            t0 = time.perf_counter()
            kernel(*operands)
            times.append(time.perf_counter() - t0)
        total += e.count * statistics.median(times[1:])
    return total


def random_pairs(model, args, rng, max_len, device):
    """--batch random prompts, each with a chosen and a rejected response (lengths +-jitter), drawn
    from rng; the pairs as one [chosen; rejected] batch with the starting model's reference log-probs
    cached once, as train.py does, and their Norms. Returns a namespace: prompts, chosen, rejected,
    cached, pairs, norms."""
    B, v = args.batch, model.cfg.vocab_size
    prompts = [random_ids(rng, args.prompt, args.jitter, v) for _ in range(B)]
    chosen = [random_ids(rng, args.response, args.jitter, v) for _ in range(B)]
    rejected = [random_ids(rng, args.response, args.jitter, v) for _ in range(B)]
    cached = reference_logps(model, TOK, prompts * 2, chosen + rejected, max_len, device)
    pairs = with_reference(collate(TOK, prompts * 2, chosen + rejected, max_len), cached, list(range(2 * B)))
    norms = Norms(pairs=B, chosen_tokens=int((pairs["labels"][:B] != -100).sum()))  # as train.py's batches
    return SimpleNamespace(prompts=prompts, chosen=chosen, rejected=rejected, cached=cached, pairs=pairs,
                           norms=norms)


def bench_size(spec, args, device):
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    max_len = round((args.prompt + args.response) * (1 + args.jitter)) + 2 + args.new
    cfg = model_config(spec, max_len)
    model = Transformer(cfg).to(device)
    B, v = args.batch, cfg.vocab_size
    r = random_pairs(model, args, rng, max_len, device)
    pairs, pair_norms = r.pairs, r.norms
    weights = [[float(rng.random() < 0.5) for _ in row] for row in r.rejected]  # the rewriter's 1[p_t < tau]
    model.train()
    net = torch.compile(model) if args.compile else model  # compiled in the untimed warmup steps
    forget = with_reference(collate(TOK, r.prompts, r.rejected, max_len, weights), r.cached[B:],
                            list(range(B)))
    assert pairs["n_truncated"] == forget["n_truncated"] == 0
    masks = allo.select_masks({n: torch.rand_like(p) for n, p in model.named_parameters()}, args.mask_ratio)

    pct = f"{args.mask_ratio:.0%}"
    forget_norms = Norms(weighted_tokens=int((forget["weights"] != 0).sum()))
    runs = [("DPO (full)", full_masks(model), pairs,
             lambda m, b: dpo_batch_loss(m, b, pair_norms, device, args.beta, 1.0)),
            (f"DPO learn ({pct} mask, eps {args.eps})", masks, pairs,
             lambda m, b: dpo_batch_loss(m, b, pair_norms, device, args.beta, args.eps)),
            (f"NPO forget ({pct} mask)", masks, forget,
             lambda m, b: npo_batch_loss(m, b, forget_norms, device, args.beta)),
            ("SFT", full_masks(model), forget,
             lambda m, b: sft_batch_loss(m, b, Norms(scored_tokens=int((forget["labels"] != -100).sum())),
                                         device))]
    rows = []
    precisions = (False, True) if args.cpu_bf16 else (False,)  # --cpu-bf16: float32, then bf16 autocast
    for name, m, batch, loss_fn in runs:  # each optimizer lives for its own timing only
        for packing in (False, True) if args.pack else (False,):
            for bf16 in precisions:
                use_cpu_bf16(bf16)
                opt = allo.MaskedAdamW(model.named_parameters(), m, lr=1e-6)  # default: multi-tensor on CUDA
                b = packed(batch, 2 * (args.prompt + args.response)) if packing else batch
                step = partial(train_step, net, opt, loss_fn, b)
                dt, tok = median_time(step, args, device)
                shape = b["packed"]["input_ids"].shape if "packed" in b else batch["input_ids"].shape
                rows.append((name + (", packed" if packing else "") + (", bf16" if bf16 else ""), shape, tok,
                             dt, args.profile and matmul_share(step, args.steps)))
                del step, opt
    model.eval()
    gen_prompts = [random_ids(rng, args.prompt, args.jitter, v) for _ in range(args.gen_batch)]

    def generate():  # eos_id -1: no row stops early, every row gets --new tokens
        return sum(map(len, model.generate(gen_prompts, args.new, eos_id=-1, pad_id=TOK.pad_id)))

    for bf16 in precisions:
        use_cpu_bf16(bf16)
        dt, tok = median_time(generate, args, device)
        rows.append(("generate (KV cache, greedy)" + (", bf16" if bf16 else ""), (args.gen_batch, args.new),
                     tok, dt, args.profile and matmul_share(generate, args.steps)))
    use_cpu_bf16(False)
    size = f"{spec} ({model.num_params() / 1e6:.2f}M)"
    out = [{"model": size, "step": name, "batch": "x".join(map(str, shape)), "tokens/step": tok,
            "ms/step": round(1e3 * dt, 1) if dt < 0.1 else round(1e3 * dt), "tokens/s": round(tok / dt)}
           | ({"matmul share": f"{mm[0]:.0%}", "matmul GFLOP/s": round(mm[1] / mm[2] / 1e9),
               "products alone ms": round(1e3 * mm[3], 1 if mm[3] > 1e-3 else 3),  # a tiny model's: > 0
               "bound": f"{dt / mm[3]:.2f}x"} if mm else {})
           for name, shape, tok, dt, mm in rows]
    if args.peak_tflops:  # model FLOPs utilization of the training steps: 6 x parameters per token
        for r in out:
            r["MFU"] = "-" if r is out[-1] else \
                f"{6 * model.num_params() * r['tokens/s'] / (1e12 * args.peak_tflops):.1%}"
    return out


# dense bf16 matrix rate (TFLOP/s, without sparsity) of the GPUs the project's figures come from
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(args, device):
    """--peak-tflops, else the named GPU's dense bf16 rate from PEAK_TFLOPS, else None."""
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((rate for gpu, rate in PEAK_TFLOPS.items() if gpu in name), None)


class AsProject(torch.nn.Module):
    """transformers' model behind the project's forward signature, so trainer.py's loss code runs on
    it unchanged: every position's logits [B,T,V] with the batch's attention mask, as a transformers
    user's loss computes them (TRL's way), then the scored positions picked (keep: their flat
    indices, as trainer.scored_logps passes them), or their log-probs where it passes targets."""

    def __init__(self, hf, cfg, attention_mask):
        super().__init__()
        self.hf, self.cfg, self.attention_mask = hf, cfg, attention_mask

    def forward(self, input_ids, keep=None, targets=None, doc_ids=None):
        mask = self.attention_mask.to(input_ids.device)
        logits = self.hf(input_ids=input_ids, attention_mask=mask).logits.flatten(0, 1)  # [B*T,V]
        picked = logits.index_select(0, keep)
        return picked if targets is None else allo.token_logps(picked, targets)


def versus_hf(path, name, args, device):
    """The forward and backward of an SFT, a DPO and a DPO-learn step (key tokens at --eps) on one
    batch, the project's model against transformers' on the same checkpoint `path`, both through
    trainer.py's loss code (AsProject), timed in turns; a table row per step and implementation.
    The optimizer, the same code for both, is left out."""
    rng = random.Random(args.seed)
    model = Transformer.from_pretrained(path).to(device).train()
    hf = load_hf(path, device)
    max_len = round((args.prompt + args.response) * (1 + args.jitter)) + 2
    r = random_pairs(model, args, rng, max_len, device)
    pairs, pair_norms = r.pairs, r.norms
    model.train()
    sft = collate(TOK, r.prompts, r.chosen, max_len)
    steps = {"SFT": (sft, lambda m, b: sft_batch_loss(
                 m, b, Norms(scored_tokens=int((sft["labels"] != -100).sum())), device)),
             "DPO (full)": (pairs, lambda m, b: dpo_batch_loss(m, b, pair_norms, device, args.beta, 1.0)),
             f"DPO learn (eps {args.eps})": (pairs, lambda m, b: dpo_batch_loss(m, b, pair_norms, device,
                                                                                args.beta, args.eps))}
    if hf is not None:
        hf.train()
    size = f"{name} ({model.num_params() / 1e6:.1f}M)"
    rows = []
    for step, (batch, loss_fn) in steps.items():
        nets = {"project": model} | ({"transformers": AsProject(hf, model.cfg, batch["attention_mask"])}
                                     if hf is not None else {})
        losses = {}

        def run(side, net, batch=batch, loss_fn=loss_fn, losses=losses):
            loss = loss_fn(net, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if hf is not None:
                hf.zero_grad(set_to_none=True)
            losses[side] = loss.item()

        t = in_turns({side: partial(run, side, net) for side, net in nets.items()}, args.warmup, args.steps,
                     device)
        tokens = int(batch["attention_mask"].sum())
        for side, dt in t.items():
            rows.append({"model": size, "step": step, "implementation": side,
                         "batch": "x".join(map(str, batch["input_ids"].shape)), "tokens": tokens,
                         "ms fwd+bwd": round(1e3 * dt), "tokens/s": round(tokens / dt),
                         "loss": f"{losses[side]:.6f}"})
            if args.peak_tflops:  # 6 x parameters per token, as bench_size's MFU column
                rows[-1]["MFU"] = f"{6 * model.num_params() * tokens / dt / (1e12 * args.peak_tflops):.1%}"
        if hf is not None:
            rows[-1]["ratio"] = t["project"] / t["transformers"]
            rows[-1]["loss difference"] = abs(losses["project"] - losses["transformers"])
    return rows


def versus_hf_main(args, device):
    """--model DIR or --versus-hf: versus_hf on the checkpoint, or on a new model of each --sizes
    shape (random weights, written to a temporary folder for transformers to read)."""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.batch} "
          f"rows (pairs), prompt ~{args.prompt}, response ~{args.response} tokens (+-{args.jitter:.0%}); "
          f"forward + backward through trainer.py's loss code, median of {args.steps} in turns"
          + (", under bf16 autocast" if device.type == "cuda" else ", float32"))
    if args.model:
        rows = versus_hf(args.model, os.path.basename(os.path.normpath(args.model)), args, device)
    else:
        rows = []
        for spec in args.sizes.split(","):
            torch.manual_seed(args.seed)
            cfg = model_config(spec, round((args.prompt + args.response) * (1 + args.jitter)) + 2)
            with tempfile.TemporaryDirectory() as d:
                Transformer(cfg).save_pretrained(d)
                rows += versus_hf(d, spec, args, device)
    print(allo.format_table([{k: r[k] for k in r if k not in ("ratio", "loss difference")} for r in rows]))
    for r in rows:
        if "ratio" in r:
            print(f"{r['model']} {r['step']}: project / transformers time {r['ratio']:.2f}x (target <= "
                  f"0.95x); losses differ by {r['loss difference']:.1e}")
    if args.peak_tflops:
        print(f"MFU: 6 x parameters x tokens/s / {args.peak_tflops:g} TFLOP/s{gpu} (the attention's FLOPs "
              "not counted; the optimizer not timed)")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--sizes", default="default,10m,34m",
        help=f"comma list of {', '.join(SIZES)} or dim:layers:heads:kv_heads:hidden:vocab[:untied] "
             "(default: all)")
    add("--batch", type=int, default=32,
        help="pairs per DPO step, rows per NPO step (default 32, as train.py)")
    add("--prompt", type=int, default=35, help="mean prompt tokens (default 35, the embedded task)")
    add("--response", type=int, default=25, help="mean response tokens (default 25, the embedded task)")
    add("--jitter", type=float, default=0.2, help="lengths vary uniformly by +- this fraction (default 0.2)")
    add("--gen-batch", type=int, default=64, help="prompts per generate call (default 64)")
    add("--new", type=int, default=25, help="new tokens per generated row (default 25)")
    add("--mask-ratio", type=float, default=0.1, help="MaskedAdamW mask of the ALLO stages (default 0.1)")
    add("--eps", type=float, default=0.5, help="key-token fraction of the DPO learn step (default 0.5)")
    add("--beta", type=float, default=0.1)
    add("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    add("--steps", type=int, default=7, help="timed steps, the median is reported (default 7)")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda ... (default auto)")
    add("--threads", type=int, default=0, help="CPU threads for torch, 0 = torch's default")
    add("--seed", type=int, default=0)
    add("--model", help="a Hugging Face checkpoint: time its SFT, DPO and learn steps against transformers "
        "(see above)")
    add("--versus-hf", action="store_true", help="time the SFT, DPO and learn steps of a new model of each "
        "--sizes shape against transformers' (see above)")
    add("--peak-tflops", type=float, help="the device's matrix rate for the MFU column (default on CUDA: "
        "the dense bf16 rate of an H100, H200 or A100 by name; elsewhere no column)")
    add("--pack", action="store_true", help="time each training step padded and packed (train.py --pack)")
    add("--cpu-bf16", action="store_true", help="CPU: time each step and generate in float32 and under bf16 "
        "autocast (train.py --cpu-bf16; a CPU with AMX or AVX512-BF16)")
    add("--profile", action="store_true", help="CPU: each step's share of time in matrix products and their "
        "GFLOP/s, from --steps more steps under torch's profiler (the rest is what fusing could save); the "
        "products' time alone (each shape on its own) and the bound: step / that, how much faster the step "
        "could be with all the rest free")
    add("--compile", action="store_true", help="torch.compile the model for the training steps, as train.py "
        "--compile (the compile happens in the warmup steps, which must be >= 1)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    args.peak_tflops = peak_tflops(args, device)
    if args.profile and (device.type != "cpu" or args.model or args.versus_hf):
        print("error: --profile measures the CPU time of the per-size steps: use it with --device cpu and "
              "without --model or --versus-hf", file=sys.stderr)
        sys.exit(2)
    if args.cpu_bf16 and (device.type != "cpu" or args.model or args.versus_hf):
        print("error: --cpu-bf16 times the per-size steps on a CPU: use it with --device cpu and without "
              "--model or --versus-hf", file=sys.stderr)
        sys.exit(2)
    apply_machine_flags(args)  # --threads, and --cpu-bf16 refused in one line on a CPU without bf16 products
    if args.model or args.versus_hf:
        return versus_hf_main(args, device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch}, prompt ~{args.prompt}, response ~{args.response} tokens "
          f"(+-{args.jitter:.0%}), generate {args.gen_batch} x {args.new} new tokens; "
          f"median of {args.steps} after {args.warmup} warmup"
          + ("; torch.compile" if args.compile else ""))
    rows = []
    for spec in args.sizes.split(","):
        t0 = time.perf_counter()
        rows += bench_size(spec, args, device)
        print(f"{rows[-1]['model']}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(allo.format_table(rows))
    times = {(r["model"], r["step"]): r["ms/step"] for r in rows}
    variants = {", packed": ("packed", "the padded step's"), ", bf16": ("bf16 autocast", "float32's")}
    for r in rows:
        for suffix, (what, against) in variants.items():
            if r["step"].endswith(suffix):  # against the same step without the suffix
                step = r["step"][:-len(suffix)]
                print(f"{r['model']} {step}: {what} {times[r['model'], step] / r['ms/step']:.2f}x {against} speed")
    print("batch: rows x padded length (generate: prompts x new tokens); tokens/step: real tokens "
          "(generate: new tokens); ms/step: one optimizer step (generate: one call)")
    if args.peak_tflops:
        print(f"MFU: 6 x parameters x tokens/s / {args.peak_tflops:g} TFLOP/s{name} (the attention's FLOPs "
              "not counted)")
    return rows


if __name__ == "__main__":
    main()
