"""Hostile use of study.py (#32): settings changed under one tag, two studies on one run and tag,
seed counts without bound. Each is one line and exit status 2, with nothing written."""

import os

import pytest

from study import study

ARGS = ["--quick", "--preset", "smoke", "--dpo-steps", "4", "--forget-steps", "2", "--n-eval", "8"]


def test_study_with_other_settings_under_one_tag_is_refused(smoke_run, tmp_path, capsys):
    """(DPO arms alone need no rewriter: the run's is removed first.)"""
    import shutil
    run = str(shutil.copytree(smoke_run, tmp_path / "run"))
    shutil.rmtree(os.path.join(run, "rewriter"))
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


def test_a_second_study_on_one_run_and_tag_is_refused_at_once(smoke_run, tmp_path, capsys):
    """#32: two studies on one --run and --tag (the same or other seeds) would each write the
    tag's results.json, the last one winning: the second is refused in one line naming the first,
    and writes nothing."""
    import shutil

    from bookkeeping import runs
    run = str(shutil.copytree(smoke_run, tmp_path / "run"))
    shutil.rmtree(os.path.join(run, "study"), ignore_errors=True)  # another test's study on the shared run
    os.makedirs(os.path.join(run, "study"))
    held = runs.lock(os.path.join(run, "study", "u.lock"))  # as the first study holds it
    try:
        with pytest.raises(SystemExit) as e:
            study.main(["--run", run, "--tag", "u", "--arms", "DPO full", "--seeds", "2"] + ARGS)
    finally:
        runs.unlock(*held)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: {run}/study/u: in use by process {os.getpid()} (lock "
                                         f"{run}/study/u.lock); wait for it or stop it\n")
    assert os.listdir(os.path.join(run, "study")) == []  # nothing written, the lock gone with its holder
    study.main(["--run", run, "--tag", "u", "--arms", "DPO full"] + ARGS)  # once free, it runs
    assert os.path.isfile(os.path.join(run, "study", "u", "results.json"))
    assert not os.path.exists(os.path.join(run, "study", "u.lock"))


def test_study_seed_counts_are_bounded(capsys):
    from study import study
    for flag in ("--pipeline-seeds", "--seeds"):
        with pytest.raises(SystemExit) as e:
            study.main([flag, "1000000", "--preset", "smoke"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: must be <= 100, got 1000000" in err


def test_a_study_stopped_while_writing_its_results_leaves_whole_files(smoke_run, tmp_path, capsys,
                                                                      monkeypatch):
    """Ctrl-C between results.json and results.csv: one line, exit status 130, and every file there
    whole (each is written to a temporary name and renamed), none half-written; the rerun writes
    them all again."""
    import json
    import shutil
    run = str(shutil.copytree(smoke_run, tmp_path / "run"))
    args = ["--run", run, "--tag", "k", "--arms", "DPO full"] + ARGS
    study.main(args)
    root = os.path.join(run, "study", "k")
    before = {f: open(os.path.join(root, f), "rb").read() for f in ("results.json", "results.csv")}

    def killed(path, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "write_csv", killed)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        study.main(args)
    monkeypatch.undo()
    assert e.value.code == 130 and capsys.readouterr().err == ("interrupted; rerun the same command to go on "
                                                             "(finished arms are kept)\n")
    assert not [f for f in os.listdir(root) if ".tmp" in f]
    json.load(open(os.path.join(root, "results.json")))  # whole: the new one
    assert open(os.path.join(root, "results.csv"), "rb").read() == before["results.csv"]  # the old one
    capsys.readouterr()
    study.main(args)
    assert "study: seed 0 DPO full: test accuracy" in capsys.readouterr().out
    assert open(os.path.join(root, "results.csv"), "rb").read() == before["results.csv"]
    assert not os.path.exists(os.path.join(run, "study", "k.lock"))
