"""Generation throughput: with the KV cache against recomputing the whole prefix every step, on a
real checkpoint against transformers' generate, or on model shapes against transformers' two loops.

    python -m tools.bench_generate [--dim 256 --layers 4 --batch 16 --prompt 32 --new 96]
    python -m tools.bench_generate --model DIR --batch 16 --prompt 24 --new 32 --threads 2
    python -m tools.bench_generate --model DIR --sampling 4 --batch 64 --prompt 64 --new 64 --threads 2
    python -m tools.bench_generate --shapes 135m,1.1b --batches 16,64,256 --new 128 --device cuda

--shapes (random weights of SmolLM2-135M's and TinyLlama-1.1B's shapes, or dim:layers:heads:kv:
hidden:vocab[:untied]; bf16 on CUDA, float32 elsewhere): for each shape and batch, greedy decoding
of --new tokens per row (no EOS) by the project's two loops (batches: Transformer.generate; slots:
generate_refill, its decode step replayed from a CUDA graph on CUDA) and, where transformers is
importable, by its generate with the default dynamic cache and with a static cache + torch.compile
(mode reduce-overhead); timed in turns; prints new tokens/s and the achieved bandwidth (the weights
and the KV cache read once per step, over the time), as a fraction of the GPU's HBM bandwidth
(known GPUs, or --hbm-gbs).

A random model: both runs decode the same greedy tokens (checked); the table gives new tokens
per second. --model DIR (a Hugging Face Llama checkpoint): model.generate against transformers'
generate on the same random prompts of --prompt tokens, greedy, every row decoding --new tokens
(no EOS), timed in turns in one process; prints both throughputs, how many rows decoded the same
tokens, and the ratio (target: at least 1.1x transformers' tokens/s at batch 16). Needs
transformers (tools/versus_hf.py).

--sampling K with --model: sampling as the sample stage does it, --batch rows holding K samples of
each of --batch/K random prompts, at --temperature and --top-p, --new tokens a row (no EOS), in
turns: the project's generate (each distinct prompt computed once, the nucleus from torch.topk,
the draw's exponentials vectorized); the same loop as it was before 2026-12-07 (every row's
prompt computed, every token sorted, torch.multinomial), whose sampled tokens must be the same
(checked); and transformers' generate (num_return_sequences=K), where importable, whose draws
differ. Prints each one's new tokens/s and the ratios. With
--questions FILE the prompts are the first --batch/K questions of a questions JSONL under the
model's chat template (train.py --prompt-template chat) instead of random tokens: a trained
model's nucleus on real prompts is narrower than on random ones.
"""

import argparse
import contextlib
import sys
import tempfile
import time

import torch

import model as model_py
from data import load_tokenizer, prompt_text, read_jsonl
from model import ModelConfig, Transformer, pick_device
from tools.bench_train import model_config
from tools.versus_hf import in_turns, load_hf

SHAPES = {"135m": "576:30:9:3:1536:49152",  # SmolLM2-135M (tied embeddings)
          "1.1b": "2048:22:32:4:5632:32000:untied"}  # TinyLlama-1.1B
HBM_GBS = {"H200": 4800, "H100": 3350, "A100": 2039}  # HBM bandwidth (GB/s) by a substring of the GPU's name


def bench_checkpoint(a, device):
    """--model: the project's generate against transformers' on one batch of random prompts."""
    model = Transformer.from_pretrained(a.model).to(device).eval()
    hf = load_hf(a.model, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (a.batch, a.prompt), generator=g)
    out = {}

    def ours():
        out["project"] = model.generate(ids.tolist(), a.new, eos_id=-1, pad_id=0)

    def theirs():
        with torch.no_grad():
            new = hf.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                              max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=None, pad_token_id=0)
        out["transformers"] = new[:, a.prompt:].tolist()

    runs = {"project": ours} if hf is None else {"project": ours, "transformers": theirs}
    t = in_turns(runs, 1, a.repeats, device)
    print(f"{a.model}: {model.num_params() / 1e6:.1f}M parameters; greedy, {a.batch} prompts of {a.prompt} "
          f"tokens, {a.new} new tokens each; median of {a.repeats} in turns")
    print("| implementation | new tokens/s | seconds |\n|---|---|---|")
    for name, dt in t.items():
        print(f"| {name} | {a.batch * a.new / dt:,.1f} | {dt:.2f} |")
    if hf is not None:
        same = sum(x == y for x, y in zip(out["project"], out["transformers"]))
        print(f"project / transformers tokens/s: {t['transformers'] / t['project']:.2f}x (target >= 1.1x); "
              f"{same} of {a.batch} rows decoded the same tokens")
    return t


@contextlib.contextmanager
def as_before():
    """model.generate as it ran before 2026-12-07: every row's prompt computed, however often it
    repeats, the nucleus found by sorting every token, and the token drawn by torch.multinomial."""
    def every_row(prompts, device):
        rows = torch.arange(len(prompts), device=device)
        return rows, rows

    kept = model_py.distinct, model_py.nucleus, model_py.draw

    def sorted_nucleus(probs, top_p):  # k at the vocabulary: nucleus sorts every token at once
        return kept[1](probs, top_p, k=probs.shape[-1])

    def multinomial(probs, generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    model_py.distinct, model_py.nucleus, model_py.draw = every_row, sorted_nucleus, multinomial
    try:
        yield
    finally:
        model_py.distinct, model_py.nucleus, model_py.draw = kept


def bench_sampling(a, device):
    """--model with --sampling K: the sample stage's generation, now, before, and transformers'."""
    model = Transformer.from_pretrained(a.model).to(device).eval()
    hf = load_hf(a.model, device)
    k, n = a.sampling, a.batch // a.sampling
    if a.questions:  # real prompts, left-padded for transformers as model.generate pads them
        tok = load_tokenizer(a.model)
        questions = read_jsonl(a.questions, "questions")[:n]
        rows = [tok.prompt_ids(prompt_text(q["question"], "chat", tok)) for q in questions]
        n, width = len(rows), max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, model.cfg.vocab_size, (n, a.prompt), generator=g)
        rows, attention = ids.tolist(), torch.ones_like(ids)
    prompts = [row for row in rows for _ in range(k)]  # K samples of each prompt, as stage_sample
    out = {}

    def ours(name):
        g = torch.Generator(device=device).manual_seed(1)
        out[name] = model.generate(prompts, a.new, -1, 0, a.temperature, a.top_p, g)

    def before():
        with as_before():
            ours("before")

    def theirs():
        with torch.no_grad():
            hf.generate(ids.to(device), attention_mask=attention.to(device), do_sample=True,
                        temperature=a.temperature, top_p=a.top_p, top_k=0, num_return_sequences=k,
                        max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=None, pad_token_id=0)

    runs = {"project": lambda: ours("project"), "project before 2026-12-07": before}
    if hf is not None:
        runs["transformers"] = theirs
    t = in_turns(runs, 1, a.repeats, device)
    what = f"questions of {a.questions} ({min(map(len, rows))}-{max(map(len, rows))} tokens)" if a.questions \
        else f"random prompts of {a.prompt} tokens"
    print(f"{a.model}: {model.num_params() / 1e6:.1f}M parameters; {k} samples of each of {n} {what}, "
          f"temperature {a.temperature}, top-p {a.top_p}, {a.new} new tokens a row; median of {a.repeats} in "
          "turns")
    print("| implementation | new tokens/s | seconds |\n|---|---|---|")
    for name, dt in t.items():
        print(f"| {name} | {len(prompts) * a.new / dt:,.1f} | {dt:.2f} |")
    line = f"project / before: {t['project before 2026-12-07'] / t['project']:.2f}x tokens/s"
    if hf is not None:
        line += f"; project / transformers: {t['transformers'] / t['project']:.2f}x"
    print(f"{line}; the same sampled tokens as before: {out['project'] == out['before']}")
    return t


def bytes_read(cfg, batch, prompt, new, elt):
    """Bytes a greedy decode of `new` tokens reads at least: every weight once per step, and at step t
    the KV cache of prompt + t positions of every row (the prefill's step included)."""
    weights = sum(s for s in (cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2),
                              cfg.n_layers * (2 * cfg.dim * cfg.n_heads * cfg.head_dim
                                              + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
                                              + 3 * cfg.dim * cfg.hidden_dim)))
    kv_per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    kv = sum(batch * kv_per_position * (prompt + t) for t in range(new))
    return (new * weights + kv) * elt


def bench_shapes(a, device):
    """--shapes: the project's two loops against transformers' two, per shape and batch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    hbm = a.hbm_gbs or next((v for k, v in HBM_GBS.items() if gpu and k in gpu), None)
    print(f"device {gpu or device}, {dtype}, greedy, prompts of {a.prompt} tokens, {a.new} new tokens per "
          f"row; median of {a.repeats} in turns; HBM {hbm or 'unknown'} GB/s")
    print("| shape | batch | loop | new tokens/s | seconds | GB/s | of HBM |\n|---|---|---|---|---|---|---|")
    rows = []
    for shape in a.shapes.split(","):
        cfg = model_config(SHAPES.get(shape, shape), a.prompt + a.new)
        torch.manual_seed(0)
        model = Transformer(cfg)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = [load_hf(d, device)]  # dynamic cache; then static cache + compile
            hf.append(hf[0] and load_hf(d, device))
        model = model.to(device, dtype).eval()
        if hf[0] is not None:
            hf = [m.to(dtype).eval() for m in hf]
            hf[1].generation_config.cache_implementation = "static"
            hf[1].forward = torch.compile(hf[1].forward, mode="reduce-overhead", fullgraph=True)
        for batch in map(int, a.batches.split(",")):
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(4, cfg.vocab_size, (batch, a.prompt), generator=g)
            prompts = ids.tolist()
            sides = {"project batches": lambda: model.generate(prompts, a.new, eos_id=-1, pad_id=0),
                     "project slots": lambda: model.generate_refill(prompts, a.new, eos_id=-1, slots=batch)}
            for name, m in zip(("transformers dynamic", "transformers static+compile"), hf):
                if m is not None:
                    sides[name] = lambda m=m: hf_generate(m, ids.to(device), a.new)
            t = in_turns(sides, 1, a.repeats, device)
            moved = bytes_read(cfg, batch, a.prompt, a.new, torch.finfo(dtype).bits // 8)
            for name, dt in t.items():
                gbs = moved / dt / 1e9
                share = f"{100 * gbs / hbm:.1f}%" if hbm else "-"
                print(f"| {shape} | {batch} | {name} | {batch * a.new / dt:,.0f} | {dt:.3f} | {gbs:,.1f} | "
                      f"{share} |", flush=True)
                rows.append({"shape": shape, "batch": batch, "loop": name, "seconds": dt})
    return rows


@torch.no_grad()
def hf_generate(model, ids, new):
    """transformers' greedy generate of exactly `new` tokens per row."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=96, help="new tokens per sequence")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="a Hugging Face Llama checkpoint: time against transformers (see above)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side with --model (median)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch, 0 = torch's default")
    p.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} or dim:layers:heads:kv:hidden:vocab"
                   "[:untied]: the loops side by side (see above)")
    p.add_argument("--sampling", type=int, metavar="K", help="with --model: K samples a prompt, as the "
                   "sample stage (see above)")
    p.add_argument("--questions", help="with --sampling: a questions JSONL whose first --batch/K "
                   "questions, under the model's chat template, are the prompts (default: random tokens)")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sampling (default 0.7, the "
                   "presets')")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sampling (default 0.95, the release's)")
    p.add_argument("--batches", default="16,64,256", help="with --shapes: comma list of batch sizes")
    p.add_argument("--hbm-gbs", type=float, help="with --shapes: the GPU's HBM bandwidth in GB/s, when its "
                   "name is not known")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    if a.shapes:
        return bench_shapes(a, device)
    if a.sampling is not None and not (a.model and 0 < a.sampling <= a.batch):
        print(f"error: --sampling {a.sampling}: needs --model and 0 < K <= --batch ({a.batch})",
              file=sys.stderr)
        sys.exit(2)
    if a.model:
        return bench_sampling(a, device) if a.sampling else bench_checkpoint(a, device)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 32,
                      n_kv_heads=max(1, a.dim // 64), hidden_dim=int(a.dim * 8 / 3) // 32 * 32,
                      max_seq_len=a.prompt + a.new)
    model = Transformer(cfg).to(device).eval()
    prompts = torch.randint(0, a.vocab, (a.batch, a.prompt)).tolist()
    print(f"device {device}, {model.num_params() / 1e6:.2f}M params, batch {a.batch}, "
          f"prompt {a.prompt}, {a.new} new tokens")
    rows, outputs = [], {}
    for use_cache in (True, False):
        model.generate(prompts, 4, eos_id=-1, pad_id=0, use_cache=use_cache)  # warm up
        t0 = time.perf_counter()
        outputs[use_cache] = model.generate(prompts, a.new, eos_id=-1, pad_id=0, use_cache=use_cache)
        dt = time.perf_counter() - t0
        rows.append((use_cache, a.batch * a.new / dt, dt))
    same = outputs[True] == outputs[False]
    print("| decoding | new tokens/s | seconds |\n|---|---|---|")
    for use_cache, tps, dt in rows:
        print(f"| {'KV cache' if use_cache else 'recompute prefix'} | {tps:,.0f} | {dt:.2f} |")
    print(f"speed-up with cache: {rows[0][1] / rows[1][1]:.1f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
