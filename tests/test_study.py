"""study.py on the smoke run: every arm trains, masks are what they claim, results are written,
a second call resumes instead of retraining."""

import json
import os

import torch
from safetensors.torch import load_file

import allo
import study
from model import Transformer

ARGS = ["--quick", "--preset", "smoke", "--dpo-steps", "4", "--forget-steps", "2", "--n-eval", "8"]


def weights(path):
    return {n: p.detach() for n, p in Transformer.from_pretrained(path).named_parameters()}


def test_study_quick_runs_every_arm_and_resumes(smoke_run, capsys):
    study.main(["--run", smoke_run, "--tag", "t"] + ARGS)
    root = os.path.join(smoke_run, "study", "t")
    res = json.load(open(os.path.join(root, "results.json")))
    assert [r["arm"] for r in res["rows"]] == [a[0] for a in study.ARMS]  # one seed with --quick
    assert [s["arm"] for s in res["summary"]] == [a[0] for a in study.ARMS]
    for r in res["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["n_questions"] == 8
        assert (r["quarter_losses"] is not None) == (r["arm"] in study.CONVERGENCE)
    assert all(len(r["quarter_losses"]) == 4 for r in res["rows"] if r["quarter_losses"])
    with open(os.path.join(root, "results.csv")) as f:
        assert len(f.readlines()) == 1 + len(study.ARMS)
    table = open(os.path.join(root, "table.md")).read()
    assert all(f"| {a[0]} |" in table for a in study.ARMS) and "DPO loss, mean over each quarter" in table

    # masks, made by the mask stage: one global top / bottom / random fraction each; top and bottom disjoint
    seed = os.path.join(root, "seed0")
    kinds = ("learn-top", "learn-bottom", "learn-random")
    m = {k: load_file(os.path.join(seed, f"masks-{k[6:]}", "learn.safetensors")) for k in kinds}
    for rank in ("top", "bottom", "random"):
        assert json.load(open(os.path.join(seed, f"masks-{rank}", "stage.json")))["fingerprint"]["rank"] == rank
    total = sum(t.numel() for t in m["learn-top"].values())
    for masks in m.values():
        assert sum(int(t.sum()) for t in masks.values()) == round(0.1 * total)
    assert allo.mask_overlap(m["learn-top"], m["learn-bottom"])["both"] == 0
    # a masked arm moves only its mask's entries
    sft = weights(os.path.join(smoke_run, "sft"))
    for arm, kind in zip(("DPO top", "DPO bottom", "DPO random"), kinds):
        after = weights(os.path.join(seed, study.slug(arm)))
        for name, mask in m[kind].items():
            assert torch.equal(after[name][~mask], sft[name][~mask]), (arm, name)
    # ALLO and ALLO w/o key tokens share one forgetting run; three forgetting runs in all
    assert sorted(d for d in os.listdir(seed) if d.startswith("forget-")) == [
        "forget-all-top", "forget-unaligned-full", "forget-unaligned-top"]

    capsys.readouterr()
    study.main(["--run", smoke_run, "--tag", "t"] + ARGS)  # everything finished: nothing trains again
    out = capsys.readouterr().out
    assert " loss " not in out  # no progress line of fit(): no stage ran
    assert json.load(open(os.path.join(root, "results.json")))["rows"] == res["rows"]


def test_study_with_other_settings_under_one_tag_is_refused(smoke_run, tmp_path, capsys):
    import shutil

    import pytest
    run = str(shutil.copytree(smoke_run, tmp_path / "run"))
    study.main(["--run", run, "--tag", "u", "--arms", "DPO full", "DPO top"] + ARGS)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        study.main(["--run", run, "--tag", "u", "--arms", "DPO full", "DPO top", "--learn-lr", "1e-4"] + ARGS)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "dpo-top: finished earlier with lr 3e-05, not 0.0001" in err
    with pytest.raises(SystemExit):
        study.main(["--run", run, "--tag", "u", "--arms", "DPO top", "--learn-ratio", "0.2"] + ARGS)
    assert "masks-top: finished earlier with learn_ratio 0.1, not 0.2" in capsys.readouterr().err


def test_train_flags_are_not_taken_for_abbreviations_of_study_flags():
    """--seed is train.py's flag (the first seed), not an abbreviation of study's --seeds."""
    opts, a = study.parse(["--seed", "2", "--seeds", "3", "--split", "val"])
    assert (opts.seeds, a.seed, opts.split) == (3, 2, "val")
    opts, a = study.parse(["--seed", "1"])
    assert (opts.seeds, a.seed) == (3, 1)
