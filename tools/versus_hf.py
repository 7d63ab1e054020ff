"""The transformers side of the benchmarks against Hugging Face (bench_train.py and
bench_generate.py with --model DIR): its model, and timings taken in turns.

transformers is not a dependency of the project: run these in a throwaway environment that has
it (pip install transformers), on the same torch. Without it the benchmarks time the project alone.
"""

import statistics
import time

import torch


def load_hf(path, device):
    """transformers' LlamaForCausalLM of a checkpoint directory in float32 with SDPA attention, or
    None (with a line saying why) when transformers is not importable."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not importable here: the project is timed alone (pip install transformers "
              "in a throwaway environment to compare)")
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device)


def in_turns(runs, warmup, repeats, device):
    """{name: median seconds} of each run (name -> function), called in turns repeats times after
    `warmup` untimed rounds, so a machine's slow spell falls on every side alike."""
    times = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
