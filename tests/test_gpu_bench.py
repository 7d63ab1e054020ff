"""tools/gpu_bench.sh, the script a lent GPU runs once: every command it runs works (its dry mode: each
command at toy sizes on the CPU), each writes its table, and a command that cannot run in time is
named without stopping the rest."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = ["optim.md", "train_135m.md", "train.md", "train_vs_hf.md", "sampling.md", "generate.md",
          "default_run.txt"]


def run_script(tmp_path, **env):
    """The script in its dry mode, with this interpreter as its `python`: (the result, its $OUT)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "GPU_BENCH_DRY": "1", "OUT": str(out), **env}
    env["PATH"] = str(bin_dir) + os.pathsep + env["PATH"]
    result = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_bench.sh")], env=env, cwd=out,
                            capture_output=True, text=True, timeout=600)
    return result, out


def test_every_command_runs_and_writes_its_table(tmp_path):
    r, out = run_script(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(TABLES)  # no failed.txt, and the scratch folder is gone
    for name in TABLES:
        text = (out / name).read_text()
        assert "|---|" in text, f"{name} has no table:\n{text}"
    assert "the same sampled tokens as before: True" in (out / "sampling.md").read_text()
    assert "| ALLO (forget + learn) |" in (out / "default_run.txt").read_text()
    assert "packed" in (out / "train_135m.md").read_text()


def test_commands_past_the_deadline_are_named_and_the_script_fails(tmp_path):
    r, out = run_script(tmp_path, DEADLINE="0")
    assert r.returncode == 1
    failed = (out / "failed.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in failed] == TABLES
    assert all("skipped" in line for line in failed)


def test_a_command_past_its_limit_is_named_and_the_rest_still_run(tmp_path):
    r, out = run_script(tmp_path, LIMIT="1")
    assert r.returncode == 1
    failed = (out / "failed.txt").read_text().splitlines()
    assert "default_run.txt: exit status 124, past 1 s" in failed  # seven stages take longer than 1 s
    assert all(line.endswith(", past 1 s") for line in failed)
    assert all((out / name).exists() for name in TABLES)  # each command was started
