"""MaskedAdamW against dense torch.optim.AdamW: optimizer state bytes, step time, ops per step.

A ~34M-parameter Llama from model.py (dim 512, 8 layers, vocab 8000, untied head; --config: the
shape of a Hugging Face config.json instead, e.g. configs/tinyllama-1.1b.json), random gradients,
masks = global top-k of random scores (allo.select_masks). MaskedAdamW's two steps, the per-tensor
loop (allo.MaskedAdamW, train.py's on CPU) and the multi-tensor step (optim.MultiTensorMaskedAdamW,
train.py's on CUDA), against torch.optim.AdamW, fused on CUDA and foreach on CPU. The optimizers step
in turn on the same weights (warmup, then the median of several steps each), so all see the same
machine load; on CUDA each step is timed between two torch.cuda.synchronize().

Ops per step: the aten ops that reach a TorchDispatchMode during one step(), the kernel launches
the step asks for (CPU-side; views count too, foreach ops once). "constant" and "per tensor" are
the intercept and slope of ops against the number of parameter tensors, from the same optimizer
built again over half of them (the first half of the layers, embedding, norm and head).

    python -m tools.bench_optim                     # CUDA if there is one, else CPU
    python -m tools.bench_optim --device cuda --config configs/tinyllama-1.1b.json
"""

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import allo
from bookkeeping.optim import MultiTensorMaskedAdamW
from model import ModelConfig, Transformer

RATIOS = [0.01, 0.05, 0.10, 0.30, 1.00]
WARMUP, STEPS = 2, 7


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches __torch_dispatch__ while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(opt):
    with OpCounter() as counter:
        opt.step()
    return counter.count


def timed_step(opt, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def make_adamw(params, device):
    """The baseline: fused on CUDA (one kernel for many tensors), foreach on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=fused, foreach=not fused)


def fit(ops_all, n_all, ops_half, n_half):
    """(constant, per tensor) of the line through (n_half, ops_half) and (n_all, ops_all)."""
    per_tensor = (ops_all - ops_half) / (n_all - n_half)
    return ops_all - per_tensor * n_all, per_tensor


def ops_row(name, ops_all, n_all, ops_half, n_half, buckets="-"):
    constant, per_tensor = fit(ops_all, n_all, ops_half, n_half)
    return {"optimizer": name, "buckets": buckets, "ops per step": ops_all,
            "ops / tensor": round(ops_all / n_all, 2), "constant": round(constant, 1),
            "(ops - constant) / tensor": round(per_tensor, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CUDA if available, else CPU")
    ap.add_argument("--config", default=None,
                    help="a Hugging Face Llama config.json (file or directory) for the model's shape")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    torch.manual_seed(0)
    if args.config:
        from tools.memory_plan import load_config  # any Llama config.json file or directory
        cfg = load_config(args.config)
    else:
        cfg = ModelConfig(vocab_size=8000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376,
                          max_seq_len=512, tie_embeddings=False)
    model = Transformer(cfg).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    named = list(model.named_parameters())
    in_half = [not n.startswith("layers.") or int(n.split(".")[1]) < cfg.n_layers // 2 for n, _ in named]
    half = [(n, p) for (n, p), keep in zip(named, in_half) if keep]  # the first half of the layers
    n_all, n_half = len(named), len(half)
    if device.type == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name(device)}), torch {torch.__version__}")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"model: {sum(p.numel() for _, p in named) / 1e6:.1f}M parameters in {n_all} tensors")

    dense = make_adamw([p for _, p in named], device)
    baseline = "AdamW fused" if device.type == "cuda" else "AdamW foreach"
    print(f"baseline: torch.optim.AdamW({'fused' if device.type == 'cuda' else 'foreach'}=True)")
    scores = {n: torch.rand_like(p) for n, p in named}
    largest = max(p.numel() for _, p in named)
    rows, ops = [], []
    paths = {"loop": allo.MaskedAdamW, "multi-tensor": MultiTensorMaskedAdamW}  # MaskedAdamW's two steps
    for ratio in RATIOS:
        masks = allo.select_masks(scores, ratio)
        masked = {k: v(named, masks, lr=1e-5, weight_decay=0.0) for k, v in paths.items()}
        times = {k: [] for k in list(paths) + [baseline]}
        for i in range(WARMUP + STEPS):
            for k, opt in list(masked.items()) + [(baseline, dense)]:
                t = timed_step(opt, device)
                if i >= WARMUP:
                    times[k].append(t)
        ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
        b_masked, b_dense = allo.optimizer_state_bytes(masked["loop"]), allo.optimizer_state_bytes(dense)
        rows.append({"mask ratio": f"{ratio:.0%}", "selected": sum(int(m.sum()) for m in masks.values()),
                     "MaskedAdamW state MB": round(b_masked / 2**20, 1),
                     f"{baseline} state MB": round(b_dense / 2**20, 1),
                     "state ratio": round(b_masked / b_dense, 4),
                     **{f"{k} ms": round(v, 1) for k, v in ms.items()},
                     **{f"{k} / {baseline}": round(ms[k] / ms[baseline], 2) for k in paths}})
        for k, v in paths.items():
            ops_all = count_ops(masked[k])
            buckets = len(masked[k]._buckets(list(masked[k].state), largest)) if k == "multi-tensor" else "-"
            half_opt = v(half, {n: masks[n] for n, _ in half}, lr=1e-5, weight_decay=0.0)
            half_opt.step()  # counted after a first step, as every optimizer here
            ops.append(ops_row(f"MaskedAdamW {k} {ratio:.0%}", ops_all, n_all, count_ops(half_opt), n_half,
                               buckets))
            del half_opt
        del masked, masks
    print(allo.format_table(rows))
    del dense

    kinds = [("foreach", False)] + [("fused", True)] * (device.type == "cuda")
    for kind, fused in kinds:
        counts = []
        for subset in (named, half):
            opt = torch.optim.AdamW([p for _, p in subset], lr=1e-5, fused=fused, foreach=not fused)
            opt.step()  # the first step creates the state: count the second
            counts.append(count_ops(opt))
            del opt
        ops.append(ops_row(f"AdamW {kind}", counts[0], n_all, counts[1], n_half))
    print(f"\naten ops dispatched per step ({n_all} tensors; constant and per tensor: fitted against "
          f"the same optimizer over {n_half} of them):")
    print(allo.format_table(ops))


if __name__ == "__main__":
    main()
