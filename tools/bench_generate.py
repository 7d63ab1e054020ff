"""Generation throughput with the KV cache against recomputing the whole prefix every step.

    python tools/bench_generate.py [--dim 256 --layers 4 --batch 16 --prompt 32 --new 96]

Both runs decode the same greedy tokens (checked); the table gives new tokens per second.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
from model import ModelConfig, Transformer, pick_device  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=96, help="new tokens per sequence")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = pick_device(a.device)
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
