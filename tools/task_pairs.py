"""Preference pairs from the embedded task, in TRL's formats, for trying `train.py --pairs` on any model:

    python -m tools.task_pairs DIR [--n-train 300] [--n-val 60] [--n-test 100] [--conversational] [--seed 0]
    python train.py --model M --pairs DIR/train.jsonl --eval-pairs DIR/val.jsonl DIR/test.jsonl ...

Each problem of task.make_splits gives one pair: chosen is its solution; rejected is the task's unaligned
habit where the problem has three or more steps (task.lazy_solution: it stops a step early), else an
arithmetic slip (the last step's result one off, the answer following it). Rows are {"prompt", "chosen",
"rejected"} strings, or with --conversational lists of {"role", "content"} messages (the prompt a user
turn, each response an assistant turn), for --prompt-template chat. Deterministic from --seed.
"""

import argparse
import os
import random

import task
from bookkeeping.fileio import write_jsonl


def slip(solution, rng):
    """The solution with its last step's result one off and the answer following it."""
    *steps, _ = solution.split(". ")  # ["14 + 7 = 21", "21 - 5 = 16"], "The answer is 16."
    left, value = steps[-1].rsplit(" = ", 1)
    wrong = int(value) + (1 if int(value) == 0 or rng.random() < 0.5 else -1)
    return ". ".join(steps[:-1] + [f"{left} = {wrong}"]) + f". The answer is {wrong}."


def pair_rows(problems, seed, conversational=False):
    """One preference row per problem (see the module's docstring)."""
    rng = random.Random(seed)
    rows = []
    for p in problems:
        lazy = p.solution.count(" = ") >= 3
        rejected = task.lazy_solution(p) if lazy else slip(p.solution, rng)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": p.question}],
                         "chosen": [{"role": "assistant", "content": p.solution}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": p.question, "chosen": p.solution, "rejected": rejected})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for train.jsonl, val.jsonl, test.jsonl")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=60)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--conversational", action="store_true",
                   help="lists of messages (for --prompt-template chat)")
    p.add_argument("--seed", type=int, default=0, help="the problems' seed (and the slips')")
    a = p.parse_args(argv)
    splits = task.make_splits(a.seed, a.n_train, a.n_val, a.n_test)
    os.makedirs(a.out, exist_ok=True)
    for name, problems in splits.items():
        write_jsonl(os.path.join(a.out, f"{name}.jsonl"), pair_rows(problems, a.seed, a.conversational))
        print(f"{os.path.join(a.out, name + '.jsonl')}: {len(problems)} pairs")


if __name__ == "__main__":
    main()
