"""#31 item 3: reference log-probs computed once, kept on disk by content (bookkeeping/refcache.py), read
back by later stages, reruns and study arms; whatever changes the numbers changes the key."""

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from bookkeeping.refcache import RefCache
from data import TokenizerFile, encode_rows, load_tokenizer, read_jsonl
from model import Transformer
from trainer import pair_rows, reference_logps

SMOKE = ["--preset", "smoke"]
HIT = "reference log-probs read from the cache"


def cache_files(run):
    folder = os.path.join(run, "cache", "ref_logps")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def learn(run, *flags):
    train.main(SMOKE + ["--run", run, "--stage", "learn", "--force", "--learn-lr", "1e-4", *flags])
    return load_file(os.path.join(run, "learn", "model.safetensors"))


def test_the_key_changes_with_whatever_changes_the_numbers(tmp_path):
    cpu = torch.device("cpu")
    base = dict(folder=str(tmp_path), model_id="sha256:a", prompts=[[1, 2], [3]], responses=[[4], [5, 6]],
                max_len=64, batch_size=8, device=cpu)
    path = RefCache(**base).path
    assert RefCache(**base).path == path  # the same pass, the same file
    others = [dict(model_id="sha256:b"), dict(max_len=63), dict(batch_size=4), dict(pack=True),
              dict(prompts=[[1, 2], [7]]),  # one token
              dict(prompts=[[1], [2, 3]]),  # the same ids, another row boundary
              dict(prompts=[[4], [5, 6]], responses=[[1, 2], [3]])]  # prompts and responses swapped
    paths = [RefCache(**{**base, **o}).path for o in others]
    assert len(set(paths + [path])) == len(others) + 1
    off = RefCache(**{**base, "folder": None})
    assert off.path is None and off.load() is None


def test_saved_and_loaded_exactly(tmp_path):
    rows = [torch.randn(n) for n in (3, 0, 5)]
    cache = RefCache(str(tmp_path), "sha256:a", [[1]] * 3, [[2]] * 3, 64, 8, torch.device("cpu"))
    assert cache.load() is None
    cache.save(rows)
    back = cache.load()
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(rows, back))
    assert os.listdir(os.path.dirname(cache.path)) == [os.path.basename(cache.path)]  # no temporary left


def test_the_cached_pass_equals_a_fresh_one(run):
    """The smoke run's dpo stage kept its pass (the SFT model on the pairs); it equals a pass computed now,
    bit for bit."""
    tok = load_tokenizer(TokenizerFile(os.path.join(run, "sft")))
    pairs = read_jsonl(os.path.join(run, "sample", "pairs.jsonl"), "pairs")
    rows = encode_rows(tok, *pair_rows(pairs))
    cfg = train.stage_config("dpo", train.parse_args(SMOKE + ["--run", run]), None).train
    sft = Transformer.from_pretrained(os.path.join(run, "sft"))
    fresh = reference_logps(sft, tok, *rows, cfg.max_len, torch.device("cpu"), cfg.ref_batch_size)
    stage = json.load(open(os.path.join(run, "dpo", "stage.json")))
    cache = RefCache(os.path.join(run, "cache"), stage["fingerprint"]["inputs"]["model"], *rows, cfg.max_len,
                     cfg.ref_batch_size, torch.device("cpu"))
    cached = cache.load()
    assert cached is not None and len(cached) == len(fresh) == 2 * len(pairs)
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))


def test_a_rerun_of_learn_reads_the_cache_and_ends_alike(run, capsys):
    before = cache_files(run)
    assert len(before) >= 3  # dpo (SFT on the pairs), forget (SFT on the wrong responses), learn (forget's)
    capsys.readouterr()
    cached = learn(run)
    assert HIT in capsys.readouterr().out  # it says so
    assert cache_files(run) == before
    fresh = learn(run, "--ref-cache", "off")
    assert HIT not in capsys.readouterr().out
    assert cache_files(run) == before
    assert all(torch.equal(cached[n], fresh[n]) for n in fresh)  # the same weights, bit for bit


def test_a_changed_key_is_computed_again(run, capsys, tmp_path):
    n = len(cache_files(run))
    pairs = os.path.join(run, "sample", "pairs.jsonl")
    fewer = str(tmp_path / "pairs.jsonl")
    with open(pairs) as f, open(fewer, "w") as g:
        g.writelines(f.readlines()[1:])  # one pair fewer
    for flags in (["--max-len", "100"], ["--data", fewer], ["--ref", os.path.join(run, "dpo")], ["--pack"]):
        capsys.readouterr()
        learn(run, *flags)
        assert HIT not in capsys.readouterr().out, flags
        n += 1
        assert len(cache_files(run)) == n, flags
    learn(run, "--ref", os.path.join(run, "dpo"))  # and that one is kept in turn
    assert HIT in capsys.readouterr().out


def test_an_unreadable_cache_file_is_computed_again(run, capsys):
    weights = learn(run)
    for name in cache_files(run):
        with open(os.path.join(run, "cache", "ref_logps", name), "r+b") as f:
            f.truncate(20)  # cut inside the header
    capsys.readouterr()
    again = learn(run)
    out = capsys.readouterr().out
    assert "unreadable" in out and HIT not in out
    assert all(torch.equal(weights[n], again[n]) for n in weights)
    learn(run)  # written whole again
    assert HIT in capsys.readouterr().out


def test_a_stage_with_its_own_out_uses_no_cache_unless_named(run, tmp_path, capsys):
    shutil.rmtree(os.path.join(run, "cache"))
    args = SMOKE + ["--run", run, "--stage", "learn", "--learn-lr", "1e-4"]
    train.main(args + ["--out", str(tmp_path / "a")])
    assert not os.path.exists(os.path.join(run, "cache"))
    train.main(args + ["--out", str(tmp_path / "b"), "--ref-cache", str(tmp_path / "c")])
    assert len(os.listdir(tmp_path / "c" / "ref_logps")) == 1


def test_a_packed_pass_is_kept_apart_and_equals_the_padded_one(run, capsys):
    """learn --pack computes its reference pass packed (pairs sharing their prompts) and keeps it under
    its own key; row for row it equals the padded pass to float32 rounding (2e-5 on a log-prob of
    about -1 to -10, summed in another order; a response that saw its sibling would move by ~1e-1)."""
    learn(run)
    padded = set(cache_files(run))
    capsys.readouterr()
    learn(run, "--pack")
    assert HIT not in capsys.readouterr().out
    (new,) = set(cache_files(run)) - padded
    folder = os.path.join(run, "cache", "ref_logps")
    meta = {name: json.loads(safe_open(os.path.join(folder, name), "pt").metadata()["about"])
            for name in cache_files(run)}
    assert meta[new]["pack"] is True
    (same,) = [name for name in padded if {**meta[name], "pack": True} == meta[new]]  # the learn pass, padded
    a, b = (load_file(os.path.join(folder, name)) for name in (same, new))
    assert torch.equal(a["lengths"], b["lengths"])
    assert (a["logps"] - b["logps"]).abs().max() < 2e-5
    learn(run, "--pack")
    assert HIT in capsys.readouterr().out
