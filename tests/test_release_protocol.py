"""#35 item 2: the authors' release protocol as a preset (--preset release), and one epoch per preference
stage (--epochs), its steps following from the data's size and the global batch."""

import json
import os
from types import SimpleNamespace

import pytest

import train
from data import read_jsonl
from trainer import batch_indices, stage_steps

SMOKE = ["--preset", "smoke"]


@pytest.mark.parametrize("n, batch, accum, epochs, expected", [
    (100, 8, 1, 1, 12),  # 100 // 8 micro-batches an epoch (batch_indices drops the remainder)
    (100, 8, 1, 0.5, 6), (100, 8, 2, 1, 6), (100, 8, 3, 1, 4),  # ceil(12 / 3)
    (5, 8, 1, 2, 2),  # fewer examples than a batch: one batch of all of them an epoch
    (100, 8, 1, 0, 7),  # no epochs: the stage's own steps
])
def test_stage_steps_are_passes_over_the_data(n, batch, accum, epochs, expected):
    cfg = SimpleNamespace(batch_size=batch, grad_accum=accum)
    assert stage_steps(7, epochs, n, cfg) == expected
    if epochs == 1 and accum == 1:  # one epoch sees every example at most once, and all but n % batch
        seen = [i for k in range(expected) for i in batch_indices(n, batch, k, seed=0)]
        assert len(seen) == len(set(seen)) == n - n % min(n, batch)


def test_one_epoch_of_learn_and_forget_on_the_smoke_run(run):
    train.main(SMOKE + ["--run", run, "--stage", "forget", "--force", "--epochs", "1"])
    train.main(SMOKE + ["--run", run, "--stage", "learn", "--force", "--epochs", "1"])
    for stage, data in (("forget", "rewriter/forget_weighted.jsonl"), ("learn", "sample/pairs.jsonl")):
        n = len(read_jsonl(os.path.join(run, data), "forget" if stage == "forget" else "pairs"))
        info = json.load(open(os.path.join(run, stage, "stage.json")))
        assert info["steps"] == n // 8 and info["fingerprint"]["pref"]["epochs"] == 1.0, stage
        with open(os.path.join(run, stage, "metrics.jsonl")) as f:
            assert len(f.readlines()) == n // 8


def test_the_release_preset_is_the_release_protocol():
    """The values of the release's scripts (RUCAIBox/ALLO: run_inference.sh, gen_data.py, run_gen.sh,
    train_improving.py, run_warmup.sh, run_forgetting.sh, run_improving.sh) on the pretrained preset's
    batches; a flag still overrides a preset's value."""
    a = train.parse_args(["--preset", "release"])
    assert (a.k, a.temperature, a.top_p, a.max_pairs) == (10, 0.7, 0.95, 5)
    assert (a.forget_ratio, a.learn_ratio, a.eps, a.exclude_top, a.beta) == (0.05, 0.05, 0.1, 0.0, 0.1)
    assert (a.dpo_lr, a.forget_lr, a.learn_lr, a.epochs) == (1e-6, 5e-7, 5e-6, 1.0)
    assert (a.batch_size, a.max_len, a.pack) == (8, 256, True)  # the pretrained preset's
    assert train.parse_args(["--preset", "release", "--learn-lr", "1e-6"]).learn_lr == 1e-6


def test_held_out_questions_take_their_own_number_of_samples(run, monkeypatch):
    """--held-out-k: the training questions get --k samples each, every --eval-questions file
    --held-out-k (its pairs only score the models); without it, --k."""
    calls = {}

    def counting(policy, tok, prompts, *args, **kwargs):
        calls[args[5]] = len(prompts)  # the progress label, "sample <split>"
        return original(policy, tok, prompts, *args, **kwargs)

    original = train.generate_ids
    monkeypatch.setattr(train, "generate_ids", counting)
    train.main(SMOKE + ["--run", run, "--stage", "sample", "--force", "--k", "3", "--held-out-k", "1"])
    n = {name: len(read_jsonl(os.path.join(run, "task", name + ".jsonl"), "questions"))
         for name in ("val", "test")}
    assert calls == {"sample train": 3 * 96, "sample val": n["val"], "sample test": n["test"]}
    info = json.load(open(os.path.join(run, "sample", "stage.json")))
    assert (info["fingerprint"]["k"], info["fingerprint"]["held_out_k"]) == (3, 1)
    calls.clear()
    train.main(SMOKE + ["--run", run, "--stage", "sample", "--force", "--k", "2"])
    assert calls == {"sample train": 2 * 96, "sample val": 2 * n["val"], "sample test": 2 * n["test"]}
