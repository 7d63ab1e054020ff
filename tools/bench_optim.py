"""MaskedAdamW against dense torch.optim.AdamW: optimizer state bytes and step time.

A ~34M-parameter Llama from model.py (dim 512, 8 layers, vocab 8000, untied head), random
gradients, masks = global top-k of random scores (allo.select_masks). The two optimizers step
alternately on the same weights (warmup, then the median of several steps each), so both see the
same machine load. Prints a markdown table. Usage: python tools/bench_optim.py
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import allo  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

RATIOS = [0.01, 0.05, 0.10, 0.30, 1.00]
WARMUP, STEPS = 2, 7


def timed_step(opt):
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def main():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376,
                      max_seq_len=512, tie_embeddings=False)
    model = Transformer(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors, "
          f"{torch.get_num_threads()} threads")

    dense = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)  # foreach by default
    scores = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    rows = []
    for ratio in RATIOS:
        masks = allo.select_masks(scores, ratio)
        masked = allo.MaskedAdamW(model.named_parameters(), masks, lr=1e-5, weight_decay=0.0)
        t_masked, t_dense = [], []
        for i in range(WARMUP + STEPS):
            tm, td = timed_step(masked), timed_step(dense)
            if i >= WARMUP:
                t_masked.append(tm)
                t_dense.append(td)
        b_masked, b_dense = allo.optimizer_state_bytes(masked), allo.optimizer_state_bytes(dense)
        ms_masked, ms_dense = 1e3 * statistics.median(t_masked), 1e3 * statistics.median(t_dense)
        rows.append({"mask ratio": f"{ratio:.0%}",
                     "selected": sum(int(m.sum()) for m in masks.values()),
                     "MaskedAdamW state MB": round(b_masked / 2**20, 1),
                     "AdamW state MB": round(b_dense / 2**20, 1),
                     "state ratio": round(b_masked / b_dense, 4),
                     "MaskedAdamW step ms": round(ms_masked, 1),
                     "AdamW step ms": round(ms_dense, 1),
                     "time ratio": round(ms_masked / ms_dense, 2)})
        del masked
    print(allo.format_table(rows))


if __name__ == "__main__":
    main()
