"""study/study.py on the smoke run: every arm trains, masks are what they claim, results are written,
a second call resumes instead of retraining."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import allo
import lora
from model import Transformer
from study import report, study

ARGS = ["--quick", "--preset", "smoke", "--dpo-steps", "4", "--forget-steps", "2", "--n-eval", "8"]


def weights(path):
    return {n: p.detach() for n, p in Transformer.from_pretrained(path).named_parameters()}


def test_study_quick_runs_every_arm_and_resumes(smoke_run, capsys):
    capsys.readouterr()
    study.main(["--run", smoke_run, "--tag", "t"] + ARGS)
    # the arms that share a reference model and data read one reference pass from the run's cache: the
    # masked DPO arms that of the dpo stage (the SFT model on the pairs): #31 item 3
    out = capsys.readouterr().out
    assert out.count("learn: reference log-probs read from the cache") >= 3, out
    root = os.path.join(smoke_run, "study", "t")
    res = json.load(open(os.path.join(root, "results.json")))
    assert [r["arm"] for r in res["rows"]] == [a[0] for a in study.ARMS]  # one seed with --quick
    assert [s["arm"] for s in res["summary"]] == [a[0] for a in study.ARMS]
    for r in res["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["n_questions"] == 8
        assert (r["losses"] is not None) == (r["arm"] in study.CONVERGENCE)
        if r["losses"]:  # every step's loss (--dpo-steps 4), their quarters from them
            assert len(r["losses"]) == 4
            summary = next(s for s in res["summary"] if s["arm"] == r["arm"])
            assert summary["quarter_losses"] == r["losses"]  # one seed, one step a quarter
    assert res["device"].startswith("cpu ") and res["torch"] == torch.__version__
    with open(os.path.join(root, "results.csv")) as f:
        assert len(f.readlines()) == 1 + len(study.ARMS)
    table = open(os.path.join(root, "table.md")).read()
    assert all(f"| {a[0]} |" in table for a in study.ARMS) and "DPO loss, mean over each quarter" in table

    # masks, made by the mask stage: one global top / bottom / random fraction each; top and bottom disjoint
    seed = os.path.join(root, "seed0")
    kinds = ("learn-top", "learn-bottom", "learn-random")
    m = {k: load_file(os.path.join(seed, f"masks-{k[6:]}", "learn.safetensors")) for k in kinds}
    for rank in ("top", "bottom", "random"):
        stage = json.load(open(os.path.join(seed, f"masks-{rank}", "stage.json")))
        assert stage["fingerprint"]["rank"] == rank
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
    # the LoRA arm trains as many parameters as the top mask, to the nearest rank, and only the linear layers
    lora_arm = weights(os.path.join(seed, study.slug("DPO LoRA")))
    assert all(torch.equal(lora_arm[n], sft[n]) != n.endswith("proj.weight") for n in sft)
    fraction = {r["arm"]: r["learn_fraction"] for r in res["rows"]}
    model = Transformer.from_pretrained(os.path.join(smoke_run, "sft"))
    step = sum(m.in_features + m.out_features for m in lora.adapted_layers(model)) / model.num_params()
    assert 0 < fraction["DPO LoRA"] and abs(fraction["DPO LoRA"] - fraction["DPO top"]) <= step
    # ALLO and ALLO w/o key tokens share one forgetting run; three forgetting runs in all
    assert sorted(d for d in os.listdir(seed) if d.startswith("forget-")) == [
        "forget-all-top", "forget-unaligned-full", "forget-unaligned-top"]

    capsys.readouterr()
    study.main(["--run", smoke_run, "--tag", "t"] + ARGS)  # everything finished: nothing trains again
    out = capsys.readouterr().out
    assert " loss " not in out  # no progress line of fit(): no stage ran
    assert json.load(open(os.path.join(root, "results.json")))["rows"] == res["rows"]


def test_train_flags_are_not_taken_for_abbreviations_of_study_flags():
    """--seed is train.py's flag (the first seed), not an abbreviation of study's --seeds."""
    opts, a = study.parse(["--seed", "2", "--seeds", "3", "--split", "val"])
    assert (opts.seeds, a.seed, opts.split) == (3, 2, "val")
    opts, a = study.parse(["--seed", "1"])
    assert (opts.seeds, a.seed) == (3, 1)


@pytest.mark.parametrize("n", [7, 50, 100])
def test_quarter_means_are_the_means_of_every_steps_loss(n):
    losses = [float(i * i % 17) for i in range(1, n + 1)]
    bounds = {7: [0, 1, 3, 5, 7], 50: [0, 12, 25, 37, 50], 100: [0, 25, 50, 75, 100]}[n]  # floor(q * n / 4)
    expected = [sum(losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    assert report.quarter_means(losses) == pytest.approx(expected, abs=0)
    assert report.quarter_means([1.0, 2.0]) == [None, 1.0, None, 2.0]


def test_paired_interval_and_verdicts_by_hand():
    """Differences 2, 4, 6 points: mean 4, sd 2, t(2) = 4.303, half width 4.303 * 2 / sqrt(3) = 4.969."""
    rows = [{"arm": arm, "seed": s, "accuracy": acc} for s, (a, d) in enumerate([(0.50, 0.48), (0.60, 0.56),
                                                                                  (0.70, 0.64)])
            for arm, acc in (("ALLO", a), ("DPO full", d))]
    (claim,) = report.claims(rows)
    assert claim["claim"] == "ALLO − DPO full" and claim["seeds"] == 3
    assert claim["difference"] == pytest.approx(4.0)
    assert (claim["low"], claim["high"]) == pytest.approx((4 - 4.303 * 2 / 3 ** 0.5,
                                                           4 + 4.303 * 2 / 3 ** 0.5))
    assert claim["verdict"] == "not shown: the interval holds 0"
    assert report.verdict(0.5, 2.0, +1) == "holds" and report.verdict(-3, -1, +1) == "fails: the other way"
    assert report.verdict(-3, -1, -1) == "holds" and report.verdict(None, None, +1) == "one seed: no interval"
    assert report.verdict(0.5, 2.0, 0) == "the first higher"
    assert report.verdict(-2, -1, 0) == "the second higher"
    assert report.verdict(-1, 2.0, 0) == "no difference shown: the interval holds 0"


def test_a_seed_without_held_out_pairs_leaves_the_others_pair_means():
    """A pipeline seed whose SFT model answered every held-out question samples no held-out pairs:
    its rows have no pair metrics, the means are over the seeds that have them."""
    row = {"arm": "ALLO", "forget_fraction": 0.1, "learn_fraction": 0.1, "wall_s": 5.0, "losses": None}
    rows = [{**row, "seed": 0, "accuracy": 0.5, "pair_accuracy": 0.75, "margin": 0.25, "n_pairs": 4},
            {**row, "seed": 1, "accuracy": 0.7, "pair_accuracy": None, "margin": None, "n_pairs": 0},
            {**row, "seed": 2, "accuracy": 0.6, "pair_accuracy": 0.25, "margin": -0.05, "n_pairs": 8}]
    (s,) = report.summarize(rows, ["ALLO"])
    assert s["accuracy"] == pytest.approx(0.6) and s["pair_accuracy"] == pytest.approx(0.5)
    assert s["margin"] == pytest.approx(0.1)
    (s,) = report.summarize(rows[1:2], ["ALLO"])
    assert s["pair_accuracy"] is None and s["margin"] is None
    table = report.markdown(report.summarize(rows, ["ALLO"]), [], "test", "3 seeds", "", 6, [4, 0, 8])
    assert "| ALLO | 60.0 ± 10.0% | 50.0% | +0.100 |" in table
    assert "4, 0, 8 (by seed) held-out pairs" in table


def test_pipeline_seeds_rerun_the_whole_pipeline_per_seed(tmp_path, capsys):
    run = str(tmp_path / "pipe")
    args = ["--run", run, "--pipeline-seeds", "2", "--tag", "p", "--arms", "DPO full", "DPO top", "ALLO",
            "--preset", "smoke", "--dpo-steps", "4", "--forget-steps", "2", "--n-eval", "8", "--threads", "1"]
    study.main(args[:3] + ["1", "--seed", "1"] + args[4:])  # seed 1 alone, as side by side on a GPU
    study.main(args)  # seed 0, then the table over both
    sft = [weights(os.path.join(run, f"seed{s}", "sft")) for s in (0, 1)]
    assert any(not torch.equal(sft[0][n], sft[1][n]) for n in sft[0])  # another init and batch order
    samples = [open(os.path.join(run, f"seed{s}", "sample", "forget.jsonl")).read() for s in (0, 1)]
    assert samples[0] != samples[1]
    questions = [open(os.path.join(run, f"seed{s}", "task", "test.jsonl")).read() for s in (0, 1)]
    assert questions[0] == questions[1]  # the task's questions stay
    res = json.load(open(os.path.join(run, "study", "p", "results.json")))
    assert res["seeds"] == [0, 1] and "pipeline" in res["kind"]
    by = {(r["arm"], r["seed"]): 100 * r["accuracy"] for r in res["rows"]}
    claim = next(c for c in res["claims"] if c["claim"] == "ALLO − DPO full")
    diffs = [by[("ALLO", s)] - by[("DPO full", s)] for s in (0, 1)]
    half = 12.706 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5  # t(1) * sd / sqrt(2)
    assert claim["difference"] == pytest.approx(sum(diffs) / 2)
    assert (claim["low"], claim["high"]) == pytest.approx((claim["difference"] - half,
                                                           claim["difference"] + half))
    table = open(os.path.join(run, "study", "p", "table.md")).read()
    assert "2 pipeline seed(s)" in table and "| ALLO − DPO full |" in table
    evals = sorted(os.path.join(d, f) for s in (0, 1) for d, _, fs in os.walk(os.path.join(run, f"seed{s}"))
                   for f in fs if f.startswith(("eval_", "sft_eval_")))
    assert len(evals) == 2 * 4  # per seed: the SFT model and the three arms
    kept = [os.stat(p).st_mtime_ns for p in evals]
    capsys.readouterr()
    study.main(args)  # resumable: nothing trains again, nothing is scored again
    assert " loss " not in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in evals] == kept


def test_a_kept_evaluation_is_that_of_the_same_finished_stage(tmp_path):
    model, path, calls = tmp_path / "sft", str(tmp_path / "sft_eval.json"), []
    model.mkdir()

    def finish(stage_id):
        (model / "stage.json").write_text(json.dumps({"id": stage_id}))

    def evaluate(d):
        calls.append(d)
        return {"accuracy": len(calls) / 10}

    finish("a")
    assert study.cached_eval(str(model), evaluate, path) == {"accuracy": 0.1}
    assert study.cached_eval(str(model), evaluate, path) == {"accuracy": 0.1} and len(calls) == 1
    finish("b")  # the stage was run again: its model is another
    assert study.cached_eval(str(model), evaluate, path) == {"accuracy": 0.2} and len(calls) == 2


def test_figures_are_written_with_matplotlib_and_skipped_in_one_line_without(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [{"arm": arm, "seed": s, "accuracy": 0.5 + 0.1 * s, "pair_accuracy": None, "margin": None,
             "forget_fraction": 0.0, "learn_fraction": 0.0, "wall_s": 0.0,
             "losses": [0.7, 0.6, 0.5, 0.4] if arm != "ALLO" else None}
            for arm in ("DPO full", "DPO top", "ALLO") for s in (0, 1)]
    summary = report.summarize(rows, ["DPO full", "DPO top", "ALLO"])
    masks = {"layers.0.mlp.up_proj.weight": torch.tensor([[True, False]]),
             "norm.weight": torch.tensor([True])}
    written = report.figures(str(tmp_path), rows, summary, masks)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f"{n}.{e}" for n in ("convergence", "accuracy", "mask_density")
                           for e in ("png", "svg"))
    assert all(os.path.getsize(p) > 1000 for p in written)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert report.figures(str(tmp_path / "none"), rows, summary, masks) == []
    assert capsys.readouterr().out == "study: no figures (they need matplotlib: pip install matplotlib); " \
        "the tables are written\n"


def test_eval_plot_draws_a_runs_curves(smoke_run, tmp_path, capsys, monkeypatch):
    """#31 item 4: eval.py R --plot writes each finished training stage's curves and the masks by
    layer as PNG under R/plots/ and says where; without matplotlib, one line; not a run, one line
    and exit status 2."""
    import shutil

    import pytest

    import eval as evaluation
    pytest.importorskip("matplotlib")
    run = str(shutil.copytree(smoke_run, tmp_path / "run"))
    evaluation.main([run, "--plot"])
    out = capsys.readouterr().out
    names = ["sft", "dpo", "rewriter", "forget", "learn", "masks"]
    assert out == "eval: plots " + ", ".join(os.path.join(run, "plots", f"{n}.png") for n in names) + "\n"
    assert all(open(os.path.join(run, "plots", f"{n}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
               for n in names)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    evaluation.main([run, "--plot"])
    assert capsys.readouterr().out == "eval: no plots (they need matplotlib: pip install matplotlib)\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        evaluation.main([os.path.join(run, "learn"), "--plot"])
    assert e.value.code == 2 and "--plot draws a run directory's curves" in capsys.readouterr().err


def test_chosen_scales_take_the_validation_best_nearest_the_base_rates_on_a_tie():
    rows = [{"arm": arm, "lr_scale": m, "accuracy": acc} for arm, m, acc in (
        ("DPO full", 0.3, 0.40), ("DPO full", 1.0, 0.45), ("DPO full", 3.0, 0.50),
        ("ALLO", 0.5, 0.60), ("ALLO", 1.0, 0.55), ("ALLO", 2.0, 0.60),  # a tie: x0.5 and x2 as far from 1
        ("DPO top", 0.3, 0.70), ("DPO top", 1.0, 0.60), ("DPO top", 3.0, 0.70),  # x3 the nearer, in log scale
        ("NPO", 0.3, 0.20), ("NPO", 1.0, 0.20), ("NPO", 3.0, 0.10))]
    assert report.chosen_scales(rows) == {"DPO full": 3.0, "ALLO": 0.5, "DPO top": 3.0, "NPO": 1.0}


def test_a_rate_sweep_chooses_each_arm_on_val_and_scores_it_on_test(smoke_run, capsys):
    arms = ["DPO full", "DPO top", "ALLO"]
    study.main(["--run", smoke_run, "--tag", "sweep", "--lr-grid", "0.5", "2", "--arms", *arms] + ARGS)
    root = os.path.join(smoke_run, "study", "sweep")
    res = json.load(open(os.path.join(root, "results.json")))
    sweep = res["sweep"]
    expected = {(a, m, "val") for a in arms for m in (0.5, 2)}
    assert {(r["arm"], r["lr_scale"], r["split"]) for r in sweep} == expected
    for arm in arms:  # the validation-best multiplier, and every seed's row trained at it, scored on test
        best = max((r for r in sweep if r["arm"] == arm), key=lambda r: (r["accuracy"], -r["lr_scale"]))
        assert res["chosen_scales"][arm] == best["lr_scale"]
        (row,) = [r for r in res["rows"] if r["arm"] == arm]
        assert row["lr_scale"] == best["lr_scale"] and row["split"] == "test"
        assert row["rates"] == best["rates"] and row["rates"]["learn"] == pytest.approx(
            best["lr_scale"] * {"DPO full": 1e-5, "DPO top": 3e-5, "ALLO": 3e-5}[arm])
    allo_rates = next(r["rates"] for r in sweep if r["arm"] == "ALLO" and r["lr_scale"] == 2)
    assert allo_rates == pytest.approx({"forget": 6e-5, "learn": 6e-5})  # one grid for both of ALLO's rates
    # the folders name the multiplier; the first seed's test row reuses the model its sweep trained
    seed = os.path.join(root, "seed0")
    named = {"dpo-full-lr-x0.5", "dpo-full-lr-x2", "forget-unaligned-top-lr-x2", "allo-lr-x0.5"}
    assert named <= set(os.listdir(seed))
    out = capsys.readouterr().out
    assert out.count("learn: done in") == 2 * len(arms) + 1  # the sweep's runs and the masks' DPO full at x1
    table = open(os.path.join(root, "table.md")).read()
    assert "| arm | val at x0.5 | val at x2 | chosen | its rates |" in table


def test_arm_seeds_make_the_missing_prerequisites_as_train_py_does(smoke_run, tmp_path, capsys):
    """On a run without sft, sample and rewriter, the arm-seed study makes them (and none of the
    pipeline's later stages), equal to train.py's; a finished one is kept whatever the flags."""
    run = str(tmp_path / "r")
    study.main(["--run", run, "--tag", "t", "--arms", "SFT", "ALLO"] + ARGS)
    assert sorted(n for n in os.listdir(run) if os.path.isdir(os.path.join(run, n))) == [
        "cache", "rewriter", "sample", "sft", "study", "task"]
    for stage in ("sft", "rewriter"):  # the smoke run's, made by `python train.py --preset smoke`
        mine, theirs = weights(os.path.join(run, stage)), weights(os.path.join(smoke_run, stage))
        assert all(torch.equal(mine[n], theirs[n]) for n in theirs), stage
    read = lambda r: open(os.path.join(r, "sample", "pairs.jsonl")).read()  # noqa: E731
    assert read(run) == read(smoke_run)
    made = json.load(open(os.path.join(run, "sft", "stage.json")))["id"]
    study.main(["--run", run, "--tag", "u", "--arms", "SFT", "ALLO", "--seed", "5", "--epochs", "1"] + ARGS)
    assert json.load(open(os.path.join(run, "sft", "stage.json")))["id"] == made
    # the table names the steps the stages ran, which one epoch takes from the data's size
    n = {k: sum(1 for _ in open(os.path.join(run, f))) // 8
         for k, f in (("learn", "sample/pairs.jsonl"), ("forget", "rewriter/forget_weighted.jsonl"))}
    table = open(os.path.join(run, "study", "u", "table.md")).read()
    assert f"Learning: {n['learn']} steps (1 epoch) of 8 pairs" in table
    assert f"forgetting: {n['forget']} steps (1 epoch) of 8 wrong responses" in table
