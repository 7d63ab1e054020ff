"""End-to-end: every stage of train.py on the smoke preset, resume, and the error paths."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import allo
import train
from bookkeeping import trainlog
from data import Tokenizer
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke"]


def run_cli(*args):
    """train.py in a subprocess: (exit status, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    return p.returncode, p.stderr


@pytest.fixture
def run(smoke_run):
    return smoke_run


def test_all_stages_write_their_outputs(run):
    expected = {
        "sft": ["config.json", "model.safetensors", "metrics.jsonl", "stage.json"],
        "sample": ["pairs.jsonl", "forget.jsonl", "val_pairs.jsonl", "test_pairs.jsonl", "stage.json"],
        "dpo": ["config.json", "model.safetensors", "stage.json"],
        "mask": ["forget.safetensors", "learn.safetensors", "stage.json"],
        "rewriter": ["config.json", "model.safetensors", "forget_weighted.jsonl", "stage.json"],
        "forget": ["config.json", "model.safetensors", "stage.json"],
        "learn": ["config.json", "model.safetensors", "stage.json"],
    }
    for stage, files in expected.items():
        for f in files:
            assert os.path.exists(os.path.join(run, stage, f)), f"{stage}/{f}"
        assert not os.path.exists(os.path.join(run, stage, "ckpt")), "checkpoints go when a stage ends"
    for stage in ("sft", "dpo", "rewriter", "forget", "learn"):  # complete Hugging Face folders
        for f in ("generation_config.json", "tokenizer.model", "tokenizer_config.json"):
            assert os.path.exists(os.path.join(run, stage, f)), f"{stage}/{f}"
    assert [f for f in os.listdir(os.path.join(run, "task")) if f.startswith("rewrites-")]
    task_files = ["tokenizer.model", "train.jsonl", "val.jsonl", "test.jsonl", "sft.jsonl"]
    for f in [f"task/{name}" for name in task_files] + ["eval_test.json", "run.json"]:
        assert os.path.exists(os.path.join(run, f)), f
    rows = json.load(open(os.path.join(run, "eval_test.json")))["rows"]
    assert [r["stage"] for r in rows] == ["sft", "dpo", "forget", "learn"]
    assert not [f for _, _, fs in os.walk(run) for f in fs if f.endswith(".tmp")]


def test_masked_stages_move_only_their_mask(run):
    """forget starts from sft and may change only forget-mask entries; learn starts from forget."""
    def params(stage):
        return dict(Transformer.from_pretrained(os.path.join(run, stage)).named_parameters())

    for stage, start, mask in (("forget", "sft", "forget"), ("learn", "forget", "learn")):
        before, after = params(start), params(stage)
        masks = load_file(os.path.join(run, "mask", f"{mask}.safetensors"))
        moved = 0
        for name, m in masks.items():
            a, b = before[name].detach(), after[name].detach()
            assert torch.equal(a[~m], b[~m]), f"{stage}: frozen entries of {name} changed"
            moved += int((a[m] != b[m]).sum())
        assert moved > 0, f"{stage}: no masked entry moved"


def test_forget_weights_align_with_response_tokens(run):
    tok = Tokenizer(os.path.join(run, "task", "tokenizer.model"))
    rows = [json.loads(line) for line in open(os.path.join(run, "rewriter", "forget_weighted.jsonl"))]
    assert rows
    for r in rows:
        assert len(r["weights"]) == len(r["probs"]) == len(tok.encode(r["response"]))
        assert all(w == float(p < 0.5) for w, p in zip(r["weights"], r["probs"]))


def test_rewriter_prompt_ends_with_the_reference_tokenized_as_the_rewrite(run):
    """The rewrite of a response whose first number is wrong starts with the reference's first
    token: the prompt must hold that token as such (not glued to "Reference:"), last."""
    tok = Tokenizer(os.path.join(run, "task", "tokenizer.model"))
    row = json.loads(open(os.path.join(run, "sample", "forget.jsonl")).readline())
    prompt, rewrite = tok.encode(train.rewriter_prompt(row)), tok.encode(" " + row["reference"])
    tail = tok.encode("\nRewrite:")
    assert prompt[-len(tail) - len(rewrite):] == rewrite + tail


def test_all_skips_finished_stages(run, capsys):
    train.main(SMOKE + ["--run", run, "--stage", "all"])
    out = capsys.readouterr().out
    assert all(f"{s}: finished earlier with these settings, skipped" in out for s in train.STAGES)


def test_killed_stage_resumes_to_identical_weights(tmp_path, monkeypatch):
    args = SMOKE + ["--stage", "sft", "--sft-steps", "6", "--ckpt-every", "2"]
    train.main(args + ["--run", str(tmp_path / "straight")])

    real_save = trainlog.save_checkpoint

    def save_then_die(ckpt_dir, step, *state):
        real_save(ckpt_dir, step, *state)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(trainlog, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        train.main(args + ["--run", str(tmp_path / "killed")])
    assert sorted(os.listdir(tmp_path / "killed" / "sft.tmp" / "ckpt")) == ["step-0000002", "step-0000004"]
    assert not os.path.exists(tmp_path / "killed" / "sft")
    monkeypatch.setattr(trainlog, "save_checkpoint", real_save)
    train.main(args + ["--run", str(tmp_path / "killed")])
    a = load_file(str(tmp_path / "straight" / "sft" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "sft" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_last_checkpoint_kept(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = allo.nll_loss

    def nan_at_step_5(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(allo, "nll_loss", nan_at_step_5)
    with pytest.raises(SystemExit) as e:
        train.main(SMOKE + ["--run", str(tmp_path), "--stage", "sft", "--sft-steps", "6",
                            "--ckpt-every", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and len(err.strip().splitlines()) == 1
    last = tmp_path / "sft.tmp" / "ckpt" / "step-0000004"
    assert f"the last good checkpoint is {last}" in err and last.is_dir()
    assert not os.path.exists(tmp_path / "sft")


def test_missing_prerequisite_names_the_stage_to_run(tmp_path):
    code, err = run_cli("--stage", "learn", "--run", str(tmp_path))
    assert code == 2
    assert err.strip().count("\n") == 0 and "python train.py --stage sft" in err


def test_bad_inputs_fail_with_one_line_and_status_2(run, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                   '{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    out = str(tmp_path / "o")
    code, err = run_cli(*SMOKE, "--stage", "learn", "--run", run, "--data", str(bad), "--out", out)
    assert code == 2 and f"{bad}:2:" in err and "'chosen'" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o" / "stage.json")

    masks = load_file(os.path.join(run, "mask", "learn.safetensors"))
    name = next(iter(masks))
    masks[name] = torch.ones(3, 3, dtype=torch.bool)
    mask = str(tmp_path / "mask.safetensors")
    save_file(masks, mask)
    code, err = run_cli(*SMOKE, "--stage", "learn", "--run", run, "--mask", mask, "--out", out)
    assert code == 2 and "mask.safetensors" in err and name in err and err.count("\n") == 1

    small = tmp_path / "small"
    cfg = json.load(open(os.path.join(run, "sft", "config.json")))
    Transformer(ModelConfig(vocab_size=8, dim=cfg["hidden_size"], n_layers=1, n_heads=2, n_kv_heads=1,
                            hidden_dim=64)).save_pretrained(str(small))
    code, err = run_cli(*SMOKE, "--stage", "forget", "--run", run, "--model", str(small), "--out", out)
    assert code == 2 and "vocab_size 8" in err and err.count("\n") == 1


def test_sample_stage_with_refilled_slots(run, capsys, tmp_path):
    """--decode slots: the sample stage fills its slots from a queue of (question, sample) jobs and
    writes the same kinds of rows; greedy answers equal the batches loop's."""
    import eval as evaluation
    from bookkeeping.runs import load_model
    from data import load_tokenizer, read_jsonl
    out = tmp_path / "sample"
    train.main(SMOKE + ["--run", run, "--stage", "sample", "--decode", "slots", "--gen-batch-size", "5",
                        "--out", str(out)])
    assert read_jsonl(str(out / "pairs.jsonl"), "pairs") and read_jsonl(str(out / "forget.jsonl"), "forget")
    assert json.load(open(out / "stage.json"))["fingerprint"]["prompt"]["decode"] == "slots"
    tok = load_tokenizer(os.path.join(run, "sft"))
    model = load_model(os.path.join(run, "sft"), torch.device("cpu"), tok)
    questions = read_jsonl(os.path.join(run, "task", "val.jsonl"), "questions")
    answers = [evaluation.complete(model, tok, [q["question"] for q in questions], 24, batch_size=3, decode=d)
               for d in ("slots", "batches")]
    assert answers[0] == answers[1]


def test_an_optimizer_step_reads_the_device_once(monkeypatch):
    """trainer.optimizer_step reads the loss, the tokens and the weights' finiteness in one transfer
    (tolist); nothing else in trainer.py waits on a tensor's value (the micro-batches' token counts
    are host tensors). Counted at the Python level; the forward's gathers, which Python does not see,
    take indices made on the host (the meta-device test below)."""
    import traceback

    import trainer
    from bookkeeping.optim import masked_adamw
    from trainer import Norms, dpo_batch_loss
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model = Transformer(config)
    opt = masked_adamw(model.named_parameters(), trainer.full_masks(model), torch.device("cpu"), lr=1e-3)
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, :5] = labels[:, -1] = -100
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
         "ref": torch.zeros(4, 12), "norms": Norms(pairs=2, chosen_tokens=10)}
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if any(f.filename.endswith("trainer.py") for f in traceback.extract_stack()[:-1]):
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def loss(net, batch, norms, stats):
        return dpo_batch_loss(net, batch, norms, torch.device("cpu"), 0.1, 0.5, stats=stats)

    step_loss, tokens, _ = trainer.optimizer_step(model, model, opt, [b, b], loss, 1e-3)
    monkeypatch.undo()
    assert reads == ["tolist"] and tokens == 2 * 48 and step_loss > 0


@pytest.mark.parametrize("packed", [False, True])
def test_the_training_forward_and_losses_never_wait_on_the_device(packed):
    """#34 item 2: where the scored targets are, and how many, is found on the host (collate's batch);
    the forward, every loss and backward then run without reading a device tensor's value. The
    proof: they run on the meta device, which holds no values (a bool-mask gather there raises, as
    torch.nonzero has no meta kernel: the old code's x[keep] and labels[scored] did)."""
    from data import pack
    from trainer import Norms, dpo_batch_loss, npo_batch_loss, sft_batch_loss
    torch.manual_seed(0)
    meta = torch.device("meta")
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64)).to(meta)
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    mask = torch.ones_like(ids)
    for row, length in ((0, 8), (2, 6)):  # rows of unequal length, right-padded as collate pads
        ids[row, length:], labels[row, length - 1:], mask[row, length:] = 0, -100, 0
    b = {"input_ids": ids, "labels": labels, "attention_mask": mask, "ref": torch.zeros(4, 12),
         "weights": (labels != -100).float()}
    if packed:
        b["packed"] = pack(b, 16)
        assert b["packed"]["doc_ids"].max() == 2  # two sequences (groups 1, 2) share a packed row
    for loss in (sft_batch_loss(model, b, Norms(scored_tokens=20), meta),
                 dpo_batch_loss(model, b, Norms(pairs=2, chosen_tokens=10, rejected_tokens=10), meta, 0.1,
                                0.5, stats={}),
                 npo_batch_loss(model, b, Norms(weighted_tokens=20, scored_tokens=20), meta, 0.1, {})):
        assert loss.device == meta and loss.shape == ()
        loss.backward()
    assert all(p.grad is not None and p.grad.device == meta for p in model.parameters())


def test_each_training_stage_tokenizes_its_rows_once(run, tmp_path, monkeypatch):
    """#34 item 1: a stage encodes its text once (data.encode_rows) and collate pads ids: over
    every step of sft, dpo, rewriter and forget, no text is encoded inside collate()."""
    import traceback
    in_collate = []
    real = Tokenizer.encode

    def counted(self, text):
        in_collate.append(any(f.name == "collate" for f in traceback.extract_stack()))
        return real(self, text)

    monkeypatch.setattr(Tokenizer, "encode", counted)
    for stage in ("sft", "dpo", "rewriter", "forget"):
        del in_collate[:]
        train.main(SMOKE + ["--run", run, "--stage", stage, "--out", str(tmp_path / stage)])
        assert in_collate and not any(in_collate), stage
    n = len(open(os.path.join(run, "sample", "pairs.jsonl")).readlines())
    del in_collate[:]
    train.main(SMOKE + ["--run", run, "--stage", "mask", "--scorer", "grad", "--out", str(tmp_path / "mask")])
    assert len(in_collate) == 4 * n and not any(in_collate)  # prompt and response of 2n rows, once each


def test_every_step_logs_dpos_and_npos_numbers(run):
    """#31 item 2: metrics.jsonl of the smoke run holds, at every step, the DPO stages' rewards,
    reward accuracy, margin and kept share, and NPO's weighted log-ratio and share."""
    dpo_keys = {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "kept_share"}
    npo_keys = {"weighted_logratio", "weighted_share"}
    for stage, keys in (("dpo", dpo_keys), ("learn", dpo_keys), ("forget", npo_keys)):
        rows = [json.loads(line) for line in open(os.path.join(run, stage, "metrics.jsonl"))]
        assert rows and all(keys <= set(r) for r in rows), stage
        assert all(0 <= r[k] <= 1 for r in rows for k in keys if k.endswith(("accuracy", "share")))
    learn = [json.loads(line) for line in open(os.path.join(run, "learn", "metrics.jsonl"))]
    assert learn[0]["kept_share"] == 1.0 and learn[-1]["kept_share"] < 1.0  # step 1: every log-ratio is 0


def test_dpo_and_npo_statistics_by_hand():
    """The statistics of one batch against their formulas written out (float64): rewards
    beta * sum_t (log pi - log pi_ref) per response, accuracy and margin over the pairs, the kept
    share of the rejected side's tokens; NPO's mean log-ratio of the weighted tokens and their
    share of the response tokens. Split into two micro-batches, the shares add up to the same."""
    from trainer import Norms, dpo_batch_loss, forward_logps, npo_batch_loss
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64)).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (8, 12), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :5] = labels[:, -1] = -100
    labels[5, 8:] = -100  # a shorter rejected response
    ref = torch.randn(8, 12, generator=g, dtype=torch.float64) * (labels != -100) * 0.1
    weights = (torch.rand(8, 12, generator=g) < 0.5).double() * (labels != -100)
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "ref": ref,
         "weights": weights}
    cpu, beta = torch.device("cpu"), 0.1
    with torch.no_grad():
        logps = forward_logps(model, b, cpu)
    r = (logps - ref) * (labels != -100)
    chosen, rejected = beta * r[:4].sum(-1), beta * r[4:].sum(-1)
    stats = {}
    norms = Norms(pairs=4, rejected_tokens=int((labels[4:] != -100).sum()))
    dpo_batch_loss(model, b, norms, cpu, beta, 0.5, stats=stats)
    assert torch.allclose(stats["reward_chosen"], chosen.mean())
    assert torch.allclose(stats["reward_rejected"], rejected.mean())
    assert stats["reward_accuracy"] == (chosen > rejected).double().mean()
    assert torch.allclose(stats["reward_margin"], (chosen - rejected).mean())
    # eps 0.5: ceil(eps * T) of each rejected response's T tokens are kept
    kept = sum(math.ceil(0.5 * int((labels[i] != -100).sum())) for i in range(4, 8))
    assert stats["kept_share"] == kept / int((labels[4:] != -100).sum())
    npo = {}
    norms = Norms(weighted_tokens=int((weights != 0).sum()), scored_tokens=int((labels != -100).sum()))
    npo_batch_loss(model, b, norms, cpu, beta, stats=npo)
    assert torch.allclose(npo["weighted_logratio"], (r * weights).sum() / (weights != 0).sum())
    assert npo["weighted_share"] == (weights != 0).sum() / (labels != -100).sum()
    halves = [{}, {}]  # two micro-batches of the same step: their shares add up
    for half, rows in zip(halves, (slice(0, 4), slice(4, 8))):
        npo_batch_loss(model, {k: v[rows] for k, v in b.items()}, norms, cpu, beta, stats=half)
    assert torch.allclose(halves[0]["weighted_logratio"] + halves[1]["weighted_logratio"],
                          npo["weighted_logratio"])
