"""bench_train.py on tiny settings: every step runs and the table counts the right tokens."""

import pytest

from tools import bench_train

TINY = ["--warmup", "0", "--steps", "1", "--batch", "3", "--prompt", "6", "--response", "4",
        "--gen-batch", "2", "--new", "3", "--threads", "1", "--device", "cpu"]
STEPS = ["DPO (full)", "DPO learn (10% mask, eps 0.5)", "NPO forget (10% mask)", "SFT",
         "generate (KV cache, greedy)"]


def table_rows(out):
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_table_has_every_step_of_every_size_with_exact_token_counts(capsys):
    rows = bench_train.main(TINY + ["--sizes", "default,32:1:2:1:64:64:untied", "--jitter", "0"])
    printed = table_rows(capsys.readouterr().out)
    assert [(r["model"], r["step"]) for r in printed] == [
        (m, s) for m in ("default (0.78M)", "32:1:2:1:64:64:untied (0.01M)") for s in STEPS]
    assert [r["tokens/step"] for r in rows] == [72, 72, 36, 36, 6] * 2  # [BOS] + 6 + 4 + [EOS] per row
    assert [r["batch"] for r in rows] == ["6x12", "6x12", "3x12", "3x12", "2x3"] * 2
    assert all(r["ms/step"] > 0 and r["tokens/s"] > 0 for r in rows)


def test_padding_is_not_counted():
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--jitter", "0.5", "--batch", "8"])
    for r in rows[:4]:
        n_rows, length = map(int, r["batch"].split("x"))
        assert n_rows * (3 + 2 + 2) <= r["tokens/step"] < n_rows * length  # shortest rows: 3 + 2 tokens


@pytest.mark.native_kernels  # see tests/conftest.py
def test_compile_flag_times_the_compiled_model(capsys):
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--jitter", "0", "--compile",
                                    "--warmup", "1"])
    assert "torch.compile" in capsys.readouterr().out
    assert [r["tokens/step"] for r in rows] == [72, 72, 36, 36, 6]


def test_bench_generate_times_both_loops_on_a_shape(capsys):
    """--shapes: the project's batches and slots loops (and transformers' where it is importable) on
    one shape; the bandwidth column counts the weights and the KV cache read per step."""
    from tools import bench_generate
    rows = bench_generate.main(["--shapes", "64:2:4:2:128:300", "--batches", "3,5", "--prompt", "4",
                                "--new", "3", "--repeats", "1", "--threads", "1", "--device", "cpu"])
    loops = {r["loop"] for r in rows}
    assert {"project batches", "project slots"} <= loops and {r["batch"] for r in rows} == {3, 5}
    assert "| 64:2:4:2:128:300 | 5 | project slots |" in capsys.readouterr().out
    cfg = bench_generate.model_config("64:2:4:2:128:300", 7)
    weights = 300 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # tied head; q, o, k, v; the MLP
    kv = 5 * (2 * 2 * 2 * 16) * (4 + 5 + 6)  # 5 rows; K and V, 2 layers x 2 heads x 16; 4, 5, 6 positions
    assert bench_generate.bytes_read(cfg, 5, 4, 3, 4) == (3 * weights + kv) * 4


def test_pack_times_each_training_step_padded_and_packed(capsys):
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--jitter", "0.6", "--batch", "8", "--pack"])
    names = [r["step"] for r in rows]
    assert names == [s + p for s in STEPS[:4] for p in ("", ", packed")] + STEPS[4:]
    for padded, packed in zip(rows[0:8:2], rows[1:8:2]):
        assert padded["tokens/step"] == packed["tokens/step"]  # the same real tokens, fewer rows
        assert int(packed["batch"].split("x")[0]) < int(padded["batch"].split("x")[0])
    assert capsys.readouterr().out.count("the padded step's speed") == 4


def test_peak_tflops_adds_the_mfu_of_the_training_steps(capsys):
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--jitter", "0", "--peak-tflops", "1e-4"])
    # tied embedding 64x32; q, o 32x32; k, v 32x16 (2 heads of 16, 1 kv head); MLP 3 x 32x64; 3 norms
    n = 64 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 3 * 32
    for r in rows[:4]:
        assert r["MFU"] == f"{6 * n * r['tokens/s'] / 1e8:.1%}"
    assert rows[4]["MFU"] == "-" and "/ 0.0001 TFLOP/s" in capsys.readouterr().out
