"""Throughput of ALLO's training steps and of generation, to estimate the time of a run.

    python -m tools.bench_train                      # three model sizes, about 4 minutes on 2 CPU cores
    python -m tools.bench_train --sizes 10m,2048:22:32:4:5632:32000:untied --device cuda  # TinyLlama's
    python -m tools.bench_train --prompt 200 --response 300 --batch 8 --threads 1
    python -m tools.bench_train --model DIR --batch 4 --prompt 48 --response 48 --jitter 0 --threads 2

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
CUDA), backward, clip_grad_norm_ 1.0, optimizer step, zero_grad, as trainer.fit does on one
process; reference log-probs are cached before timing (trainer.reference_logps), as train.py
does. tokens/s counts the real (non-padding) tokens of the batch, as train.py's progress lines;
for generate, the new tokens.
Lengths vary by +-jitter around --prompt / --response, so rows are padded as in real batches.
--pack times each training step twice, padded and packed (trainer.packed into rows of twice the mean
length, as train.py --pack packs into rows of --max-len: packed only where that saves a tenth of the
positions, else the padded batch again), and prints how much faster packed is.
After --warmup steps, the median of --steps. On a CPU shared with other jobs use --threads 1
(oversubscribed threads made the default model's step 50-100x slower).

--model DIR (a Hugging Face Llama checkpoint): a DPO step's forward and backward (the optimizer
aside) on --batch pairs, the project's dpo_batch_loss against transformers' model computing the
same loss as TRL does (every position's logits, log-softmax of the labels, the attention mask),
timed in turns in one process; prints both, their losses (which must agree) and the time ratio
(target: the project at most 0.95x transformers' time). Needs transformers (tools/versus_hf.py).
"""

import argparse
import random
import statistics
import time
from functools import partial
from types import SimpleNamespace

import torch

import allo
from data import collate
from model import ModelConfig, Transformer, autocast, pick_device
from tools.versus_hf import in_turns, load_hf
from trainer import (Norms, dpo_batch_loss, full_masks, npo_batch_loss, packed, reference_logps,
                     sft_batch_loss, with_reference)

SIZES = {  # name -> dim:layers:heads:kv_heads:hidden:vocab[:untied] (default: tied embeddings, as train.py)
    "default": "128:4:4:2:352:320",  # train.py's embedded-task model: 0.78M
    "10m": "256:10:4:2:704:8000",  # 9.4M
    "34m": "512:8:8:8:1376:8000:untied",  # 33.5M, bench_optim.py's model
    "135m": "576:30:9:3:1536:49152",  # SmolLM2-135M's shape
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


def bench_size(spec, args, device):
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    max_len = round((args.prompt + args.response) * (1 + args.jitter)) + 2 + args.new
    cfg = model_config(spec, max_len)
    model = Transformer(cfg).to(device)
    B, v = args.batch, cfg.vocab_size
    prompts = [random_ids(rng, args.prompt, args.jitter, v) for _ in range(B)]
    chosen = [random_ids(rng, args.response, args.jitter, v) for _ in range(B)]
    rejected = [random_ids(rng, args.response, args.jitter, v) for _ in range(B)]
    weights = [[float(rng.random() < 0.5) for _ in r] for r in rejected]  # the rewriter's 1[p_t < tau]
    # the reference (the starting model) log-probs, cached once as train.py does
    cached = reference_logps(model, TOK, prompts * 2, chosen + rejected, max_len, device)
    model.train()
    net = torch.compile(model) if args.compile else model  # compiled in the untimed warmup steps
    pairs = with_reference(collate(TOK, prompts * 2, chosen + rejected, max_len), cached, list(range(2 * B)))
    forget = with_reference(collate(TOK, prompts, rejected, max_len, weights), cached[B:], list(range(B)))
    assert pairs["n_truncated"] == forget["n_truncated"] == 0
    masks = allo.select_masks({n: torch.rand_like(p) for n, p in model.named_parameters()}, args.mask_ratio)

    pct = f"{args.mask_ratio:.0%}"
    chosen_tokens = int((pairs["labels"][:B] != -100).sum())
    pair_norms = Norms(pairs=B, chosen_tokens=chosen_tokens)  # as train.py's batches
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
    for name, m, batch, loss_fn in runs:  # each optimizer lives for its own timing only
        for packing in (False, True) if args.pack else (False,):
            opt = allo.MaskedAdamW(model.named_parameters(), m, lr=1e-6)  # default step: multi-tensor on CUDA
            b = packed(batch, 2 * (args.prompt + args.response)) if packing else batch
            step = partial(train_step, net, opt, loss_fn, b)
            dt, tok = median_time(step, args, device)
            shape = b["packed"]["input_ids"].shape if "packed" in b else batch["input_ids"].shape
            rows.append((name + (", packed" if packing else ""), shape, tok, dt))
            del step, opt
    model.eval()
    gen_prompts = [random_ids(rng, args.prompt, args.jitter, v) for _ in range(args.gen_batch)]

    def generate():  # eos_id -1: no row stops early, every row gets --new tokens
        return sum(map(len, model.generate(gen_prompts, args.new, eos_id=-1, pad_id=TOK.pad_id)))

    dt, tok = median_time(generate, args, device)
    rows.append(("generate (KV cache, greedy)", (args.gen_batch, args.new), tok, dt))
    size = f"{spec} ({model.num_params() / 1e6:.2f}M)"
    out = [{"model": size, "step": name, "batch": "x".join(map(str, shape)), "tokens/step": tok,
            "ms/step": round(1e3 * dt, 1) if dt < 0.1 else round(1e3 * dt), "tokens/s": round(tok / dt)}
           for name, shape, tok, dt in rows]
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


def hf_dpo_loss(hf, batch, beta, device):
    """Vanilla DPO against a zero reference as a transformers user computes it (TRL's way): the
    logits of every position, log-softmax at the labels, summed over each response."""
    labels = batch["labels"].to(device)
    with autocast(device):
        logits = hf(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits.float()  # [2B,T,V], one float32 copy (none on a CPU)
    picked = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logps = ((picked - logits.logsumexp(-1)) * (labels != -100)).sum(-1)  # [2B]
    chosen, rejected = logps.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


def bench_checkpoint(args, device):
    """--model: one DPO forward and backward of the project against transformers, on one batch."""
    rng = random.Random(args.seed)
    model = Transformer.from_pretrained(args.model).to(device).train()
    hf = load_hf(args.model, device)
    B, v = args.batch, model.cfg.vocab_size
    prompts = [random_ids(rng, args.prompt, args.jitter, v) for _ in range(B)]
    responses = [random_ids(rng, args.response, args.jitter, v) for _ in range(2 * B)]
    batch = collate(TOK, prompts * 2, responses, round((args.prompt + args.response) * (1 + args.jitter)) + 2)
    batch["ref"] = torch.zeros(batch["labels"].shape)  # a zero reference, on both sides
    losses = {}

    def step(name, net, loss_fn):
        loss = loss_fn()
        loss.backward()
        net.zero_grad(set_to_none=True)
        losses[name] = loss.item()

    runs = {"project": lambda: step("project", model, lambda: dpo_batch_loss(
        model, batch, Norms(pairs=B), device, args.beta, 1.0))}
    if hf is not None:
        hf.train()
        runs["transformers"] = lambda: step("transformers", hf,
                                            lambda: hf_dpo_loss(hf, batch, args.beta, device))
    t = in_turns(runs, args.warmup, args.steps, device)
    tokens = int(batch["attention_mask"].sum())
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters; a DPO step's forward + backward on "
          f"{2 * B} rows x {batch['input_ids'].shape[1]} tokens ({tokens} real, half of them prompt), "
          f"median of {args.steps} in turns")
    print("| implementation | ms per forward + backward | tokens/s | loss |\n|---|---|---|---|")
    for name, dt in t.items():
        print(f"| {name} | {1e3 * dt:.0f} | {tokens / dt:,.0f} | {losses[name]:.6f} |")
    if hf is not None:
        print(f"project / transformers time: {t['project'] / t['transformers']:.2f}x (target <= 0.95x); "
              f"losses differ by {abs(losses['project'] - losses['transformers']):.1e}")
    return t


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
    add("--model", help="a Hugging Face Llama checkpoint: time a DPO step against transformers (see above)")
    add("--peak-tflops", type=float, help="the device's matrix rate for the MFU column (default on CUDA: "
        "the dense bf16 rate of an H100, H200 or A100 by name; elsewhere no column)")
    add("--pack", action="store_true", help="time each training step padded and packed (train.py --pack)")
    add("--compile", action="store_true", help="torch.compile the model for the training steps, as train.py "
        "--compile (the compile happens in the warmup steps, which must be >= 1)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.model:
        return bench_checkpoint(args, device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    args.peak_tflops = peak_tflops(args, device)
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
    for i, r in enumerate(rows):
        if r["step"].endswith(", packed"):
            print(f"{r['model']} {r['step'][:-8]}: packed {rows[i - 1]['ms/step'] / r['ms/step']:.2f}x "
                  "the padded step's speed")
    print("batch: rows x padded length (generate: prompts x new tokens); tokens/step: real tokens "
          "(generate: new tokens); ms/step: one optimizer step (generate: one call)")
    if args.peak_tflops:
        print(f"MFU: 6 x parameters x tokens/s / {args.peak_tflops:g} TFLOP/s{name} (the attention's FLOPs "
              "not counted)")
    return rows


if __name__ == "__main__":
    main()
