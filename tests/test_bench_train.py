"""bench_train.py on tiny settings: every step runs and the table counts the right tokens."""

from types import SimpleNamespace

import pytest
import torch

import allo
import model
from model import Transformer
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


def test_bench_generate_sampling_times_the_loop_now_and_before(tmp_path, capsys):
    """--sampling K on a checkpoint: the project's generate against the loop as it was (every row's
    prompt computed, the full sort), the same sampled tokens, and the old functions put back; a
    --sampling it cannot run is one line and exit status 2."""
    import model as model_py
    from tools import bench_generate
    torch.manual_seed(0)
    Transformer(bench_train.model_config("64:2:4:2:128:300", 16)).save_pretrained(str(tmp_path))
    kept = model_py.distinct, model_py.nucleus
    t = bench_generate.main(["--model", str(tmp_path), "--sampling", "3", "--batch", "6", "--prompt", "4",
                             "--new", "5", "--repeats", "1", "--threads", "1", "--device", "cpu"])
    assert {"project", "project before 2026-12-07"} <= set(t)
    assert "the same sampled tokens as before: True" in capsys.readouterr().out
    assert (model_py.distinct, model_py.nucleus) == kept
    with pytest.raises(SystemExit) as e:
        bench_generate.main(["--sampling", "3", "--batch", "2"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_bench_generate_sampling_on_questions_under_the_chat_template(tmp_path, capsys):
    """--questions: the prompts are the questions under the model folder's chat template (three of
    different lengths, left-padded for transformers), K samples each, as the sample stage."""
    import json
    from test_own_data import CHATML, bpe_tokenizer
    from tools import bench_generate
    torch.manual_seed(0)
    Transformer(bench_train.model_config("64:2:4:2:128:300", 64)).save_pretrained(str(tmp_path))
    bpe_tokenizer(tmp_path, False, {"chat_template": CHATML})
    questions = tmp_path / "q.jsonl"
    asked = ("What is 2 + 3?", "Tom has 4 apples. How many now?", "7 - 2?", "x")
    questions.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in asked))
    t = bench_generate.main(["--model", str(tmp_path), "--sampling", "2", "--batch", "6", "--new", "4",
                             "--questions", str(questions), "--repeats", "1", "--threads", "1",
                             "--device", "cpu"])
    out = capsys.readouterr().out
    assert "2 samples of each of 3 questions of" in out and "the same sampled tokens as before: True" in out
    assert {"project", "project before 2026-12-07"} <= set(t)


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


class StandIn(torch.nn.Module):
    """A transformers-like model for versus_hf without transformers: the project's own model called
    as transformers is (input_ids, attention_mask) -> an object with .logits, every position's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.model(input_ids, attention_mask))


def test_versus_hf_runs_each_step_through_the_same_loss_code_on_both_sides(capsys, monkeypatch):
    """--versus-hf: SFT, DPO and DPO learn, each side a row with the batch's real tokens; the
    transformers side's loss (every position's logits picked at the scored targets by AsProject)
    equals the project's, which computes the head at those targets only."""
    monkeypatch.setattr(bench_train, "load_hf",
                        lambda path, device: StandIn(Transformer.from_pretrained(path)))
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64:untied", "--jitter", "0.5", "--versus-hf",
                                    "--peak-tflops", "1e-4"])
    assert [(r["step"], r["implementation"]) for r in rows] == [
        (s, side) for s in ("SFT", "DPO (full)", "DPO learn (eps 0.5)")
        for side in ("project", "transformers")]
    real = [r["tokens"] for r in rows]
    assert real[0] == real[1] and real[2:] == [real[2]] * 4 and real[2] > real[0] >= 3 * (3 + 2 + 2)
    for project, other in zip(rows[::2], rows[1::2]):
        # float32; the two sides sum their attention and head products in other orders
        assert abs(float(project["loss"]) - float(other["loss"])) < 1e-5
        assert other["loss difference"] < 1e-5 and other["ratio"] > 0
    out = capsys.readouterr().out
    assert out.count("project / transformers time") == 3 and "MFU" in out


def test_as_project_picks_the_scored_positions_of_every_logit():
    """AsProject returns, for flat indices into B*T, exactly those positions' logits (or their log-probs
    at the given targets): what trainer.scored_logps expects of the project's model."""
    torch.manual_seed(0)
    model = Transformer(bench_train.model_config("32:1:2:1:64:64", 8)).double()
    ids, mask = torch.randint(4, 64, (2, 5)), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    full = model(ids, mask).flatten(0, 1)  # [10,V]
    keep, targets = torch.tensor([1, 4, 6]), torch.tensor([7, 8, 9])
    wrapped = bench_train.AsProject(StandIn(model), model.cfg, mask)
    assert torch.equal(wrapped(ids, keep=keep), full[keep])
    logps = wrapped(ids, keep=keep, targets=targets)
    assert torch.equal(logps, allo.token_logps(full[keep], targets))  # the project's own log-probs, exactly
    # and they are log-probs: log_softmax computes them in another order (float64 rounding)
    assert (logps - full[keep].log_softmax(-1)[range(3), targets]).abs().max() < 1e-12


def test_profile_adds_each_steps_share_of_matrix_products():
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--jitter", "0", "--profile"])
    assert [r["step"] for r in rows] == STEPS
    for r in rows:
        assert 0 < int(r["matmul share"].rstrip("%")) < 100 and r["matmul GFLOP/s"] > 0
        assert r["products alone ms"] > 0 and float(r["bound"].rstrip("x")) > 0


def test_products_alone_runs_each_recorded_kernel_on_its_shapes(monkeypatch):
    """Each kernel and shapes the profiler recorded (addmm with its bias and scalars, bmm) is called
    on operands of those shapes, `reps` + 1 times (one warm-up), and its median counts `count` times."""
    calls = []
    for name in ("addmm", "bmm"):
        monkeypatch.setattr(torch, name, lambda *ops, name=name: calls.append((name, [o.shape for o in ops])))
    events = [SimpleNamespace(key="aten::addmm", input_shapes=[[8], [4, 6], [6, 8], [], []], count=3),
              SimpleNamespace(key="aten::bmm", input_shapes=[[2, 4, 6], [2, 6, 8]], count=1)]
    assert bench_train.products_alone(events, reps=3) > 0
    assert calls == [("addmm", [(8,), (4, 6), (6, 8)])] * 4 + [("bmm", [(2, 4, 6), (2, 6, 8)])] * 4


def test_matmul_share_counts_the_products_and_their_flops():
    """Four products of 256x256 by 256x256 and a sum of their results: most of the time is theirs
    (each product is about a hundred times a sum's work), and their FLOPs are counted exactly."""
    a = torch.randn(256, 256)
    share, flops, seconds, alone = bench_train.matmul_share(lambda: sum(a @ a for _ in range(4)), 1)
    assert 0.5 < share < 1.0 and flops == 4 * 2 * 256 ** 3 and seconds > 0 and alone > 0


def test_profile_with_the_transformers_comparison_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--profile", "--versus-hf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "error: --profile measures the CPU time of the per-size steps: use it with --device cpu and without "
        "--model or --versus-hf"]


def test_cpu_bf16_times_each_step_in_float32_and_bf16(capsys, monkeypatch):
    """--cpu-bf16 (the probe stood in where this CPU lacks bf16 products): every step and generate
    timed twice, the bf16 rows multiplying in bf16, and the autocast off again afterwards."""
    monkeypatch.setattr(model, "cpu_multiplies_bf16", lambda: True)
    seen = []
    up = torch.nn.Linear.forward

    def forward(self, x):
        out = up(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    rows = bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--cpu-bf16"])
    assert [r["step"] for r in rows] == [s + p for s in STEPS for p in ("", ", bf16")]
    assert {torch.float32, torch.bfloat16} == set(seen) and not model.CPU_BF16
    assert capsys.readouterr().out.count("float32's speed") == 5


def test_cpu_bf16_on_a_cpu_without_bf16_products_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(model, "cpu_multiplies_bf16", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_train.main(TINY + ["--sizes", "32:1:2:1:64:64", "--cpu-bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --cpu-bf16: this CPU has neither")
