"""Generation throughput: with the KV cache against recomputing the whole prefix every step, or
on a real checkpoint against transformers' generate.

    python -m tools.bench_generate [--dim 256 --layers 4 --batch 16 --prompt 32 --new 96]
    python -m tools.bench_generate --model DIR --batch 16 --prompt 24 --new 32 --threads 2

A random model: both runs decode the same greedy tokens (checked); the table gives new tokens
per second. --model DIR (a Hugging Face Llama checkpoint): model.generate against transformers'
generate on the same random prompts of --prompt tokens, greedy, every row decoding --new tokens
(no EOS), timed in turns in one process; prints both throughputs, how many rows decoded the same
tokens, and the ratio (target: at least 1.1x transformers' tokens/s at batch 16). Needs
transformers (tools/versus_hf.py).
"""

import argparse
import time

import torch

from model import ModelConfig, Transformer, pick_device
from tools.versus_hf import in_turns, load_hf


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


def main():
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
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    if a.model:
        return bench_checkpoint(a, device)
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
