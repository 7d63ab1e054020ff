"""Nothing lost, ever: an output folder is the stage's or nobody's, the final swap is safe at every
instant, inputs are known by their content, special files and library errors are one line, and
Ctrl-C says where a rerun resumes."""

import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_failsafe import SMOKE, fails, fails_cleanly, snapshot

import eval as evaluation
import train

# ---------------------------------------------------------------------------- an output folder is the stage's


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("where, says", [("user", "holds files that no stage wrote (notes.txt)"),
                                         ("run", "is a run directory"), ("model", "is a model's folder"),
                                         ("other stage", "holds a run of the dpo stage")])
def test_an_output_over_a_folder_that_is_not_the_stages_is_refused(run, capsys, tmp_path, where, says,
                                                                   force):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    model = shutil.copytree(os.path.join(run, "sft"), tmp_path / "model")
    os.remove(model / "stage.json")  # a model of yours: no stage wrote it here
    out = {"user": str(user), "run": run, "model": str(model),
           "other stage": os.path.join(run, "dpo")}[where]
    before = snapshot(str(tmp_path / "x"))  # every file under tmp_path
    fails(capsys, SMOKE + ["--run", run, "--stage", "learn", "--out", out, *force], f"{out}: {says}",
          "not a learn stage's output")
    assert snapshot(str(tmp_path / "x")) == before


def test_the_run_directory_with_a_trailing_slash_or_dots_is_the_same_folder(run, capsys):
    fails(capsys, SMOKE + ["--run", run, "--stage", "learn", "--out", run + "/sample/../", "--force"],
          f"{run}: is a run directory")


def swap_steps():
    """The file operations of a stage's last moments, in order: the rename of its stage.json, the
    removal of its checkpoints, the renames of the swap and the removal of the old output."""
    return ["stage.json", "ckpt", "out->old", "tmp->out", "old"]


@pytest.mark.parametrize("at", swap_steps())
def test_a_stop_at_each_step_of_the_swap_leaves_a_result_and_the_rerun_completes_it(run, capsys,
                                                                                     monkeypatch, at):
    """learn --force over a finished learn: stopped at each step of the swap, the old or the new
    result is whole (in <out> or, finished, in <out>.tmp); the rerun of the same command completes
    the swap without a training step once the new stage.json is written."""
    out = os.path.join(run, "learn")
    old_id = json.load(open(os.path.join(out, "stage.json")))["id"]
    args = SMOKE + ["--run", run, "--stage", "learn", "--dpo-steps", "4", "--ckpt-every", "2"]
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def stop_here(what):
        raise KeyboardInterrupt(f"stopped at {what}")

    def replace(src, dst):
        if at == "stage.json" and dst.endswith(os.path.join("learn.tmp", "stage.json")):
            stop_here(at)
        if at == "out->old" and src == out:
            stop_here(at)
        if at == "tmp->out" and dst == out:
            stop_here(at)
        return real_replace(src, dst)

    def rmtree(path, *a, **k):
        if (at == "ckpt" and path.endswith(os.path.join("learn.tmp", "ckpt"))) or \
                (at == "old" and path == out + ".old" and os.path.exists(out)):
            stop_here(at)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        train.main(args + ["--force"])
    monkeypatch.undo()
    finished = os.path.join(run, "learn.tmp", "stage.json")
    results = [p for p in (os.path.join(out, "stage.json"), os.path.join(out + ".old", "stage.json"),
                           finished) if os.path.exists(p)]
    assert results, "no whole result left"
    new_id = json.load(open(finished))["id"] if os.path.exists(finished) else None
    capsys.readouterr()
    train.main(args)  # the same command, without --force
    printed = capsys.readouterr().out
    done = json.load(open(os.path.join(out, "stage.json")))
    if at == "stage.json":  # not finished yet: the old result stood; the rerun resumes from its checkpoint
        assert "learn: resumed from step 2/4" in printed and done["id"] != old_id
    else:
        assert " loss " not in printed  # no training step
        assert done["id"] == (new_id or done["id"]) and done["id"] != old_id
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    assert done["steps"] == 4 and load_file(os.path.join(out, "model.safetensors"))


def test_a_symlinked_lock_is_refused_and_its_target_untouched(run, capsys, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, os.path.join(run, "learn.lock"))
    fails(capsys, SMOKE + ["--run", run, "--stage", "learn", "--force"],
          "learn.lock: the lock is a symbolic link")
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------------------- inputs by content

def test_an_earlier_stages_file_edited_in_place_is_another_input(run, capsys):
    pairs = os.path.join(run, "sample", "pairs.jsonl")
    with open(pairs) as f:
        rows = f.readlines()
    with open(pairs, "w") as f:
        f.writelines(rows[:10])  # cut in place: the stage id in sample/stage.json is unchanged
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "dpo"],
                  "finished earlier with another data (input)")


def test_a_fifo_as_an_input_is_one_line_and_no_hang(run, capsys, tmp_path):
    fifo = str(tmp_path / "pairs.fifo")
    os.mkfifo(fifo)
    fails(capsys, SMOKE + ["--run", run, "--stage", "dpo", "--data", fifo, "--out", str(tmp_path / "o")],
          f"{fifo}: not a regular file")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--questions", fifo, "--tokenizer", os.path.join(run, "sft"),
                         os.path.join(run, "sft")])
    assert e.value.code == 2 and "not a regular file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- library errors as one line

def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("row, expected", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"prompt": "a", "response": "b", "weights": [1' + "0" * 400 + "]}",
     "'weights' item 0 must be a finite number >= 0, got 100000000000... (401 characters)"),
    ('{"prompt": "\\ud800", "response": "b"}', "'prompt' is not valid Unicode"),
])
def test_bad_content_that_libraries_choke_on_is_one_line(run, capsys, tmp_path, row, expected):
    data = write(tmp_path / "f.jsonl", row + "\n")
    fails(capsys, SMOKE + ["--run", run, "--stage", "forget", "--data", data, "--out", str(tmp_path / "o")],
          f"{data}:1:", expected)


def model_with(run, tmp_path, **config):
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(run, "sft"), folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.load(open(path)), **config}))
    return str(folder)


@pytest.mark.parametrize("config, expected", [
    ({"rms_norm_eps": "small"}, "rms_norm_eps 'small' (not a positive number)"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings 'yes' (not true or false)"),
    ({"num_key_value_heads": 1.5}, "num_key_value_heads 1.5 (not a positive integer)"),
    ({"rope_scaling": [1]}, "rope_scaling [1] (not an object)"),
    ({"num_hidden_layers": 10**6},
     "the checkpoint holds 1 layers, config.json's num_hidden_layers says 1000000"),
    ({"vocab_size": 10**12}, "embed_tokens.weight has shape"),
])
def test_config_fields_are_checked_before_a_model_is_built(run, capsys, tmp_path, config, expected):
    model = model_with(run, tmp_path, **config)
    fails(capsys, SMOKE + ["--run", run, "--stage", "dpo", "--model", model, "--out", str(tmp_path / "o")],
          f"{model}: cannot load the model", expected)


def test_integer_weights_are_refused_and_half_precision_converts(run, capsys, tmp_path):
    model = model_with(run, tmp_path)
    weights = load_file(os.path.join(model, "model.safetensors"))
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"].to(torch.bfloat16)},
              os.path.join(model, "model.safetensors"))
    from model import Transformer
    assert Transformer.from_pretrained(model).norm.weight.dtype == torch.float32
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"].long()},
              os.path.join(model, "model.safetensors"))
    fails(capsys, SMOKE + ["--run", run, "--stage", "dpo", "--model", model, "--out", str(tmp_path / "o")],
          "norm.weight holds torch.int64 values, not floating-point weights")


def test_a_tokenizer_whose_largest_id_exceeds_the_embedding_is_refused(run, capsys, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "</s>": 5000},
                                                          unk_token="<unk>"))
    folder = tmp_path / "tok"
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert tk.get_vocab_size() == 3  # counts tokens, not ids
    fails(capsys, SMOKE + ["--run", run, "--stage", "dpo", "--tokenizer", str(folder), "--out",
                           str(tmp_path / "o")], "is smaller than the tokenizer's 5001")


def test_a_full_disk_in_safetensors_is_one_line(run, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr("model.save_file", full)
    fails_cleanly(capsys, run, SMOKE + ["--run", run, "--stage", "learn", "--force"],
                  "No space left on device")


def test_an_output_that_cannot_be_written_by_eval_is_one_line(run, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluation.main([run, "--out", str(tmp_path / "no" / "such" / "dir.json")])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ----------------------------------------------------------------------------- no silent nonsense

def test_an_empty_stop_string_is_refused(run, capsys):
    fails(capsys, SMOKE + ["--run", run, "--stage", "sample", "--stop", ""], "--stop: must not be empty")


@pytest.mark.parametrize("stage, flag", [("sample", "--questions"), ("dpo", "--data"),
                                         ("forget", "--data")])
def test_an_empty_input_file_is_refused(run, capsys, tmp_path, stage, flag):
    empty = write(tmp_path / "empty.jsonl", "\n")
    fails(capsys, SMOKE + ["--run", run, "--stage", stage, flag, empty, "--out", str(tmp_path / "o")], empty)


def test_eval_over_zero_questions_is_refused(run, capsys, tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--questions", empty, "--tokenizer", os.path.join(run, "sft"),
                         os.path.join(run, "sft")])
    assert e.value.code == 2 and "no questions to score" in capsys.readouterr().err


@pytest.mark.parametrize("stage, given, needs", [
    ("sample", ["--questions", "q.jsonl"], "--eval-questions"),
    ("rewriter", ["--data", "f.jsonl"], "--pairs"),
    ("learn", [], "--model --data --mask --tokenizer"),
    ("mask", [], "--model --dpo-model"),
])
def test_a_stage_alone_names_every_flag_it_still_needs(run, capsys, tmp_path, stage, given, needs):
    """No run directory to take inputs from: one line naming the missing flags, nothing written."""
    model = os.path.join(run, "sft")  # a model with its tokenizer: --tokenizer is not missing then
    args = SMOKE + ["--run-dir", str(tmp_path / "none"), "--stage", stage, "--out", str(tmp_path / "o")]
    args += ["--model", model] * (stage in ("sample", "rewriter")) + given
    where = tmp_path / "none" / "run.json"
    err = fails(capsys, args, f"{where}: not found, so --stage {stage} needs {needs}, or a run")
    assert "--tokenizer" not in err or "--tokenizer" in needs
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "none")


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_is_one_line_naming_the_step_a_rerun_resumes_from(run, capsys, monkeypatch):
    from bookkeeping import trainlog
    real = trainlog.save_checkpoint

    def save_then_ctrl_c(ckpt_dir, step, *state):
        real(ckpt_dir, step, *state)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainlog, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        train.main(SMOKE + ["--run", run, "--stage", "learn", "--force", "--dpo-steps", "4",
                            "--ckpt-every", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 130
    assert err == "learn: interrupted; rerun the same command to resume from step 2\n"


def test_a_data_file_is_read_once_the_copy_hashed_is_the_copy_parsed(tmp_path):
    """A stage hashes its data files for its fingerprint and parses those same bytes: a file changed
    in between (or a pipe that could be read only once) cannot slip another content in."""
    from bookkeeping import runs
    from data import read_jsonl
    path = write(tmp_path / "pairs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    held = {}
    first = runs.input_id(path, held)
    write(path, '{"prompt": "other", "chosen": "c", "rejected": "d"}\n')
    assert [r["prompt"] for r in read_jsonl(path, "pairs", held=held)] == ["q"]
    assert runs.input_id(path) != first and [r["prompt"] for r in read_jsonl(path, "pairs")] == ["other"]


def test_long_phases_print_progress_lines(run, capsys, monkeypatch):
    """Sampling, reference log-probs and the rewriter's scoring print done/total, rate and ETA
    (here at every batch), as plain lines."""
    import data
    monkeypatch.setattr(data, "PROGRESS_EVERY", 0.0)
    train.main(SMOKE + ["--run", run, "--stage", "sample", "--force", "--gen-batch-size", "64"])
    train.main(SMOKE + ["--run", run, "--stage", "dpo", "--force", "--ref-batch-size", "100"])
    out = capsys.readouterr().out
    assert "sample train 64/192 responses, " in out and "sample train 192/192 responses, " in out
    assert "sample test 48/48 responses, " in out
    assert "dpo: reference log-probs 100/384 rows, " in out and " eta 0s" in out
    assert "\r" not in out
