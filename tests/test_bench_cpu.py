"""tools/bench_cpu.py, the CPU goals in one run, at its --quick settings on a tiny model with a chat
template: every side runs train.py, each table is written, and the float32 side samples the same
responses as the code before (here the last commit, whose sampling this checkout keeps)."""

import os
import subprocess

import pytest
import torch

from model import Transformer
from test_bench_train import table_rows
from tools import bench_cpu, bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed():
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", "HEAD"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not committed(), reason="the code before comes from git history: not a git checkout")
def test_quick_run_writes_every_table_and_the_same_samples(tmp_path, capsys):
    from test_own_data import CHATML, bpe_tokenizer
    folder = tmp_path / "model"
    torch.manual_seed(0)
    Transformer(bench_train.model_config("48:2:4:2:96:300", 512)).save_pretrained(str(folder))
    bpe_tokenizer(folder, False, {"chat_template": CHATML})
    out = tmp_path / "out"
    assert bench_cpu.main(["--model", str(folder), "--before", "HEAD", "--quick", "--threads", "1",
                           "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".md")] == ["default.md", "sample.md", "sft.md"]
    sides = 3 if bench_cpu.model_py.cpu_multiplies_bf16() else 2
    sft = table_rows((out / "sft.md").read_text())
    assert [r["code"] for r in sft][:2] == ["before (HEAD)", "this checkout, float32"] and len(sft) == sides
    assert sft[0]["before / this"] == "1.00x"
    assert sft[0]["last loss"] == sft[1]["last loss"] != "-"  # the same code, the same steps
    sample = (out / "sample.md").read_text().split("the sample stage, top-p ")[1:]
    assert [t.split("\n")[0] for t in sample] == ["1", "0.95"]
    for text in sample:
        rows = table_rows(text)
        assert [r["same as before"] for r in rows[:2]] == ["True", "True"] and len(rows) == sides
        assert int(rows[0]["responses in its files"]) > 0
    default = (out / "default.md").read_text()
    assert "the embedded default run (--preset smoke)" in default and "| ALLO (forget + learn) |" in default
    assert len([n for n in names if n.endswith(".log")]) == 3 * sides + 1  # every run's output kept


def test_a_commit_that_does_not_exist_is_one_line(tmp_path, capsys):
    assert bench_cpu.main(["--model", str(tmp_path), "--before", "no-such-commit", "--out",
                           str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --before no-such-commit: git archive") and err.count("\n") == 1


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a GGUF file")
    assert bench_cpu.main(["--model", str(fake), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {fake}: ") and err.count("\n") == 1
