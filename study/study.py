"""The paper's claims in miniature: its empirical study and its ablations, over several seeds.

    python -m study --pipeline-seeds 5 --run runs/pipe   # 5 whole pipelines: the claims' true spread
    python -m study                          # 3 arm seeds on runs/default, scored on the test split
    python -m study --quick                  # 1 seed, short budgets, 200 questions
    python -m study --split val --tag lr3e-5 --dpo-lr 3e-5    # choosing settings: validation only
    python -m study --lr-grid 0.3 1 3        # each arm's rates chosen on val from one grid, scored on test

Two kinds of seed. A pipeline seed (--pipeline-seeds N) re-runs everything the arms start from:
the SFT model's init and batch order, the sampling of the pairs and wrong responses, the rewriter
(each seed in its own run directory <run>/seed<s>/, made and resumed as train.py makes them; the
task's questions stay those of --task-seed), then every arm. An arm seed (--seeds N, on one run)
varies only the arms' batch order, hence the DPO run that ranks the neurons and its masks: its
spread leaves out the largest source of variance, and its intervals are too narrow for a claim.

Every train.py flag works here too (learning rates, steps, ratios, eps, tau, beta, ...). With arm
seeds the study starts from <run>/{sft,sample,rewriter}, and makes those missing as train.py makes
them (--model, --questions and the rest name your model and data, as for train.py): every arm
starts from the same SFT model and trains on the same self-sampled data, the learning arms for --dpo-steps
optimizer steps on the same pairs, the forgetting phases for --forget-steps on the same wrong
responses. A seed sets the batch order, hence the DPO run whose weight change ranks the neurons,
the masks drawn from it and every arm. Full-parameter training runs at --dpo-lr, training under a
mask at --learn-lr, adapters at --lora-lr, forgetting at --forget-lr: each choice made on the
validation split. With --lr-grid X..., the study makes that choice per arm, on the same footing:
on the first seed every arm trains at each multiplier X of its rates (ALLO's forgetting and learning
rates scaled together, one grid as every other arm's), is scored on val, keeps its best multiplier
for every seed, and is scored on --split; the sweep and the chosen rates go into results.json and
table.md. The masks come from DPO full at its base rate.

  arm                     forgetting (token-level NPO)      learning
  SFT                     -                                 -
  DPO full                -                                 DPO, every parameter; its |theta - theta_SFT|
                                                            ranks the neurons
  DPO top / bottom /      -                                 DPO, only the top (bottom, random)
                                                            --learn-ratio of the entries
    random k%
  DPO LoRA                -                                 DPO through low-rank adapters on every linear
                                                            layer, as many parameters as the top learn
                                                            mask (the nearest rank), at --lora-lr
  NPO                     -                                 token-level NPO on every token of the wrong
                                                            responses, every parameter
  ALLO                    unaligned tokens, top forget mask  DPO with key tokens (--eps), top learn mask
  ALLO w/o forgetting     -                                 as ALLO
  ALLO w/o neuron masks   unaligned tokens, every parameter  DPO with key tokens, every parameter
  ALLO w/o key tokens     as ALLO                           DPO (every rejected token), top learn mask
  ALLO forgetting every   every token, top forget mask      as ALLO
    token

Writes <run>/study/<tag>/: one directory per seed and arm (resumable: finished arms are skipped,
and a model's held-out scores, kept beside it, are not computed again),
results.json (every seed's row, the means, the claims as paired differences with 95% t intervals, the
machine), results.csv, table.md, and with matplotlib the figures convergence, accuracy and
mask_density (PNG and SVG).
"""

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import replace

from safetensors.torch import load_file

import lora
import train
from bookkeeping.fileio import atomic_path, read_json, write_json
from bookkeeping.flags import HelpFormatter, Parser, apply_machine_flags, config_from, count, rate
from bookkeeping.resolve import in_pipeline, load_record
from bookkeeping.runs import UsageError, lock, machine, one_line, unlock
from data import DataError, TokenizerFile
from eval import run_evaluator
from model import Transformer, pick_device
from study import report

# name, forgetting (tokens, mask) or None, learning (loss, mask, key tokens) or None
ARMS = [
    ("SFT", None, None),
    ("DPO full", None, ("dpo", "full", False)),
    ("DPO top", None, ("dpo", "top", False)),
    ("DPO bottom", None, ("dpo", "bottom", False)),
    ("DPO random", None, ("dpo", "random", False)),
    ("DPO LoRA", None, ("dpo", "lora", False)),
    ("NPO", None, ("npo", "full", False)),
    ("ALLO", ("unaligned", "top"), ("dpo", "top", True)),
    ("ALLO w/o forgetting", None, ("dpo", "top", True)),
    ("ALLO w/o neuron masks", ("unaligned", "full"), ("dpo", "full", True)),
    ("ALLO w/o key tokens", ("unaligned", "top"), ("dpo", "top", False)),
    ("ALLO forgetting every token", ("all", "top"), ("dpo", "top", True)),
]
CONVERGENCE = ["DPO full", "DPO top", "DPO bottom", "DPO random"]  # vanilla DPO losses compare


def forgets(arm):
    """An arm that trains on the forgetting data (the rewriter's output): ALLO's, or NPO."""
    _, forget, learn = arm
    return forget is not None or (learn is not None and learn[0] == "npo")


def slug(name):
    return name.lower().replace("/", "").replace(" ", "-").replace("--", "-")


# ----------------------------------------------------------------------------- masks (the mask stage)

def study_masks(run, seed_dir, a, seed, device):
    """Masks of one seed from its full-parameter DPO run, through the mask stage: the top
    --forget-ratio (forgetting), and the top, bottom and a random --learn-ratio (learning) of
    |theta_DPO - theta_SFT|, one global threshold each. Returns {kind: mask file}."""
    inputs = dict(model=in_pipeline(run, train.PIPELINE["mask"]["model"], "mask"),
                  dpo_model=os.path.join(seed_dir, slug("DPO full")))
    paths = {}
    for rank in ("top", "bottom", "random"):
        config = config_from(train.MaskConfig, a, rank=rank, scorer="delta",
                             train=replace(config_from(train.TrainConfig, a), seed=seed))
        out = os.path.join(seed_dir, f"masks-{rank}")
        train.stage_mask(config, inputs, out, device)
        paths[f"learn-{rank}"] = os.path.join(out, "learn.safetensors")
    paths["forget-top"] = os.path.join(seed_dir, "masks-top", "forget.safetensors")
    return paths


# ----------------------------------------------------------------------------- one arm

def arm_rates(forget, learn, lrs, forget_lr, scale=1.0):
    """The learning rates an arm trains at, by phase: {"forget": lr} where it forgets, {"learn": lr} (its
    DPO, or NPO's forgetting loss); lrs: DPO's (full-parameter, masked, LoRA); scale: the sweep's
    multiplier of every one of them."""
    rates = {"forget": scale * forget_lr} if forget else {}
    if learn is not None:
        loss, kind, _ = learn
        base = forget_lr if loss == "npo" else lrs[2] if kind == "lora" else lrs[kind != "full"]
        rates["learn"] = scale * base
    return rates


def train_arm(name, forget, learn, run, seed_dir, masks, forget_config, learn_config, inputs, lrs, eps,
              device, scale=1.0):
    """Train one arm of one seed from the SFT model (forgetting, then learning) through train.py's
    stage functions; returns the output directory and the stage directories it went through.
    forget_config, learn_config: the configs every forgetting / learning run shares; inputs: the
    tokenizer and data files of each; lrs: (full-parameter, masked, LoRA) learning rates of DPO; eps:
    ALLO's key-token fraction; scale: a multiplier of every rate of the arm (arm_rates), which the
    arm's folders name unless it is 1."""
    # each phase skips itself when finished alike
    model_dir, phases = in_pipeline(run, train.PIPELINE["forget"]["model"], "forget"), []
    rates = arm_rates(forget, learn, lrs, forget_config.lr, scale)
    tag = "" if scale == 1 else f"-lr-x{scale:g}"
    if forget:
        tokens, kind = forget
        out = os.path.join(seed_dir, f"forget-{tokens}-{kind}{tag}")  # shared by the arms that forget alike
        train.stage_forget(replace(forget_config, lr=rates["forget"], all_tokens=tokens == "all"),
                           {**inputs["forget"], "model": model_dir,
                            "mask": masks["forget-top"] if kind == "top" else None}, out, device)
        model_dir = out
        phases.append(out)
    loss, kind, key_tokens = learn
    out = os.path.join(seed_dir, slug(name) + tag)
    if loss == "npo":  # the NPO baseline: the forgetting loss on every token, the learning budget
        train.stage_forget(replace(forget_config, lr=rates["learn"], steps=learn_config.steps,
                                   all_tokens=True),
                           {**inputs["forget"], "model": model_dir, "mask": None}, out, device)
    elif kind == "lora":  # adapters with as many parameters as the top learning mask selects
        selected = sum(int(m.sum()) for m in load_file(masks["learn-top"]).values())
        rank = lora.rank_for(Transformer.from_pretrained(model_dir), selected)
        train.stage_learn(replace(learn_config, lr=rates["learn"], eps=1.0, lora_rank=rank),
                          {**inputs["learn"], "model": model_dir, "mask": None}, out, device)
    else:
        mask = None if kind == "full" else masks[f"learn-{kind}"]
        train.stage_learn(replace(learn_config, lr=rates["learn"], eps=eps if key_tokens else 1.0),
                          {**inputs["learn"], "model": model_dir, "mask": mask}, out, device)
    phases.append(out)
    return out, phases


def step_losses(out):
    """The training loss of every step of a run, from its metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ----------------------------------------------------------------------------- the study

def run_study(opts, a):
    """Every arm of opts.arms, scored on opts.split: for opts.pipeline_seeds whole pipelines (one
    run directory each), or for opts.seeds arm seeds on the run opts.run."""
    record = load_record(opts.run)
    if a.pairs or (record and record["inputs"]["pairs"]):
        raise UsageError(f"{opts.run}: the study scores accuracy on questions, which a run on preference "
                         "pairs (--pairs) has none of; compare its models with eval.py")
    device = pick_device(a.device)
    root = os.path.join(opts.run, "study", opts.tag)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    held = lock(root + ".lock")  # one study per run and tag: a second is refused, naming the first
    try:
        run_arms(opts, a, root, device)
    finally:
        unlock(*held)


def run_arms(opts, a, root, device):
    """run_study's work, under its lock: the prerequisite stages, every arm, the results."""
    arms = [arm for arm in ARMS if not opts.arms or arm[0] in opts.arms]
    prerequisites = ("sft", "sample") + (("rewriter",) if any(forgets(arm) for arm in arms) else ())
    t0, rows, sweep = time.time(), [], []
    chosen = {arm[0]: 1.0 for arm in arms}  # each arm's multiplier of its rates: 1 without --lr-grid

    def choose(a_seed, run):  # the sweep, on the first seed: every arm at every multiplier, scored on val
        sweep.extend(study_run(opts, a_seed, run, [a_seed.seed], arms, device, t0, "val",
                               {arm[0]: opts.lr_grid for arm in arms}))
        chosen.update(report.chosen_scales(sweep))
        print("study: rates chosen on val: " + ", ".join(f"{n} x{m:g}" for n, m in chosen.items()),
              flush=True)

    if opts.pipeline_seeds:
        for seed in range(a.seed, a.seed + opts.pipeline_seeds):
            a_seed = argparse.Namespace(**{**vars(a), "seed": seed})
            run = os.path.join(opts.run, f"seed{seed}")
            train.run_stages(a_seed, run, prerequisites, device)
            if opts.lr_grid and seed == a.seed:
                choose(a_seed, run)
            rows += study_run(opts, a_seed, run, [seed], arms, device, t0, opts.split,
                              {n: [m] for n, m in chosen.items()})
    else:
        missing = [s for s in prerequisites if not os.path.exists(os.path.join(opts.run, s, "stage.json"))]
        if missing:  # made as train.py makes them; a finished one stays as it is, whatever the flags
            train.run_stages(a, opts.run, missing, device)
        if opts.lr_grid:
            choose(a, opts.run)
        rows = study_run(opts, a, opts.run, range(a.seed, a.seed + opts.seeds), arms, device, t0, opts.split,
                         {n: [m] for n, m in chosen.items()})
    os.makedirs(root, exist_ok=True)
    write_results(root, opts, a, rows, [arm[0] for arm in arms], device, sweep, chosen)
    print(f"study: {time.time() - t0:.0f}s -> {root}")


def study_run(opts, a, run, seeds, arms, device, t0, split, scales):
    """The arms on one run directory for the given arm seeds, scored on `split`, each arm at each of its
    multipliers of its rates (scales: {arm: [multiplier, ...]}); returns a row per seed, arm and
    multiplier."""
    root = os.path.join(run, "study", opts.tag)
    os.makedirs(root, exist_ok=True)
    evaluate, split = run_evaluator(run, split, a.device, a.beta, n_questions=opts.n_eval,
                                    n_pairs=opts.n_eval)
    print(f"study: {len(arms)} arms x {len(seeds)} seed(s) on {run}, {len(evaluate.problems)} {split} "
          f"questions, {len(evaluate.pairs)} held-out pairs -> {root}", flush=True)
    sft = in_pipeline(run, train.PIPELINE["dpo"]["model"], "dpo")
    sft_metrics = cached_eval(sft, evaluate, os.path.join(root, f"sft_eval_{split}_{opts.n_eval}.json"))
    tokenizer = TokenizerFile(sft, a.bos_token, a.eos_token, a.pad_token, a.bos)
    # the forgetting data (the rewriter's output) only where an arm forgets (or is NPO)
    stages = ("forget", "learn") if any(forgets(arm) for arm in arms) else ("learn",)
    inputs = {stage: dict(tokenizer=tokenizer, data=in_pipeline(run, train.PIPELINE[stage]["data"], stage))
              for stage in stages}
    rows = []
    for seed in seeds:
        cfg = replace(config_from(train.TrainConfig, a), seed=seed, ref_cache=train.ref_cache(a, run))
        seed_dir = os.path.join(root, f"seed{seed}")
        arm_args = dict(run=run, seed_dir=seed_dir, inputs=inputs,
                        forget_config=config_from(train.ForgetConfig, a, train=cfg),
                        learn_config=config_from(train.LearnConfig, a, train=cfg),
                        lrs=(a.dpo_lr, a.learn_lr, opts.lora_lr or 10 * a.dpo_lr), eps=a.eps, device=device)
        train_arm(*ARMS[1], masks={}, **arm_args)  # DPO full at its base rate first: the masks come from it
        masks = study_masks(run, seed_dir, a, seed, device)
        for name, forget, learn in arms:
            for scale in scales[name] if learn is not None else [1.0]:  # SFT trains nothing
                row = {"arm": name, "seed": seed, "run": run, "forget_fraction": 0.0, "learn_fraction": 0.0,
                       "wall_s": 0.0, "losses": None, "split": split, "lr_scale": scale,
                       "rates": arm_rates(forget, learn, arm_args["lrs"], a.forget_lr, scale), **sft_metrics}
                if learn is not None:
                    out, phases = train_arm(name, forget, learn, masks=masks, scale=scale, **arm_args)
                    row.update(arm_metrics(name, out, phases, forget, evaluate, split, opts.n_eval))
                rows.append(row)
                at = f" at x{scale:g} its rates" if scale != 1 else ""
                print(f"study: seed {seed} {name}{at}: {split} accuracy {100 * row['accuracy']:.1f}%; "
                      f"elapsed {time.time() - t0:.0f}s", flush=True)
    return rows


def write_results(root, opts, a, rows, names, device, sweep=(), chosen=None):
    """results.json (every row, the summary, the claims, the machine; with --lr-grid the validation
    sweep's rows and each arm's chosen multiplier), results.csv, table.md and the figures under root;
    prints the table."""
    summary, found = report.summarize(rows, names), report.claims(rows)
    split, seeds = rows[0]["split"], sorted({r["seed"] for r in rows})
    kind = "pipeline seed(s)" if opts.pipeline_seeds else \
        "arm seed(s) (one SFT model, one sample, one rewriter)"
    write_json(os.path.join(root, "results.json"),
               {"split": split, "seeds": seeds, "kind": kind, "settings": vars(a), "rows": rows,
                "summary": summary, "claims": found, "sweep": list(sweep), "chosen_scales": chosen,
                **machine(device)})
    write_csv(os.path.join(root, "results.csv"), rows)
    def steps(phase, flag):  # as the stages ran them: with --epochs they follow from the data's size
        ran = sorted({r["steps"][phase] for r in rows if phase in r.get("steps", {}) and r["arm"] != "NPO"})
        epochs = f" ({a.epochs:g} epoch{'s' * (a.epochs != 1)})" if a.epochs else ""
        return "/".join(map(str, ran or [flag])) + " steps" + epochs

    settings = (f"Learning: {steps('learn', a.dpo_steps)} of {a.batch_size} pairs (full parameters at lr "
                f"{a.dpo_lr:g}, masks at {a.learn_lr:g}, learn ratio {a.learn_ratio:g}, eps {a.eps:g}); "
                f"forgetting: {steps('forget', a.forget_steps)} of {a.batch_size} wrong responses at lr "
                f"{a.forget_lr:g}, forget ratio {a.forget_ratio:g}, tau {a.tau:g}. Intervals: Student's t "
                "over the per-seed paired differences.")
    table = report.markdown(summary, found, split, f"{len(seeds)} {kind}", settings,
                            rows[0]["n_questions"],
                            [next(r["n_pairs"] for r in rows if r["seed"] == s) for s in seeds])
    if sweep:
        table += "\n\n" + report.sweep_markdown(sweep, chosen, rows)
    with atomic_path(os.path.join(root, "table.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n")
    print(table)
    mask = os.path.join(rows[0]["run"], "study", opts.tag, f"seed{seeds[0]}", "masks-top",
                        "learn.safetensors")
    written = report.figures(root, rows, summary, load_file(mask) if os.path.exists(mask) else None)
    if written:
        print("study: figures " + ", ".join(os.path.basename(p) for p in written))


def arm_metrics(name, out, phases, forget, evaluate, split, n_eval):
    """An arm's held-out metrics, the wall time and trained fractions of its phases, its losses."""
    infos = [read_json(os.path.join(p, "stage.json")) for p in phases]
    row = {**cached_eval(out, evaluate, os.path.join(out, f"eval_{split}_{n_eval}.json")),
           "wall_s": sum(i["wall_s"] for i in infos), "learn_fraction": infos[-1]["trained_fraction"],
           "steps": {"learn": infos[-1]["steps"]}}
    if forget:
        row["forget_fraction"] = infos[0]["trained_fraction"]
        row["steps"]["forget"] = infos[0]["steps"]
    if name in CONVERGENCE:
        row["losses"] = step_losses(out)
    return row


def cached_eval(model, evaluate, path):
    """The held-out metrics of the model folder `model`, computed once and kept in path (JSON), for
    as long as the model is the same finished stage (its stage.json id; a folder without one, a
    model of your own, is taken as unchanged)."""
    model_id = (read_json(os.path.join(model, "stage.json")) or {}).get("id")
    kept = read_json(path)
    if kept is None or kept.get("model_id") != model_id:
        kept = {"model_id": model_id, "metrics": evaluate(model)}
        write_json(path, kept)
    return kept["metrics"]


def write_csv(path, rows):
    cols = ["arm", "seed", "accuracy", "pair_accuracy", "margin", "forget_fraction", "learn_fraction",
            "wall_s"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])


def parse(argv=None):
    # allow_abbrev False: train.py's --seed is not an abbreviation of --seeds
    p = Parser(prog="python -m study", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
               epilog="Any other flag is a train.py flag (see python train.py --help).")
    p.add_argument("--run", default="runs/default", help="run directory with sft, sample, rewriter")
    p.add_argument("--seeds", type=count(1, 100), default=3, help="arm seeds on one run: --seed, --seed + 1, "
                   "... (at most 100)")
    p.add_argument("--pipeline-seeds", type=count(0, 100), default=0, help="whole pipelines, one run "
                   "directory <run>/seed<s>/ each (SFT, sampling, rewriter, then the arms); 0: arm seeds on "
                   "--run (at most 100)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="held-out split to score: choose settings on val, report test")
    p.add_argument("--tag", default="main", help="name of this study under <run>/study/")
    p.add_argument("--arms", nargs="+", choices=[a[0] for a in ARMS], metavar="ARM",
                   help="run only these arms (quoted names, e.g. 'DPO full' ALLO; default all)")
    p.add_argument("--lora-lr", type=rate, help="the DPO LoRA arm's learning rate (default: 10 x --dpo-lr, a "
                   "start: adapters usually need a higher rate than the full model; choose it on val)")
    p.add_argument("--lr-grid", type=rate, nargs="+", metavar="X",
                   help="choose each arm's rates on val first: every arm trains at each multiplier X of its "
                   "rates (ALLO's forgetting and learning rates together) on the first seed, the best on val "
                   "is kept for every seed, scored on --split (e.g. 0.3 1 3)")
    p.add_argument("--n-eval", type=count(0), default=0,
                   help="score the first N questions and pairs, 0 = all")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, --dpo-steps 40, --forget-steps 20, --n-eval 200 (a smaller version)")
    opts, rest = p.parse_known_args(argv)
    if opts.lr_grid and opts.split == "val":
        p.error("argument --lr-grid: the rates are chosen on val, so the arms are scored on --split test")
    opts.lr_grid = list(dict.fromkeys(opts.lr_grid or []))  # each multiplier once
    if opts.quick:
        opts.seeds, opts.n_eval = 1, opts.n_eval or 200
        rest = ["--dpo-steps", "40", "--forget-steps", "20"] + rest
    a = train.parse_args(rest)
    return opts, a


def main(argv=None):
    opts, a = parse(argv)
    apply_machine_flags(a)  # --threads and --cpu-bf16, as train.py applies them
    try:
        run_study(opts, a)
    except (UsageError, DataError, OSError) as e:
        print(f"error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line; the finished arms and stages are kept
        print("interrupted; rerun the same command to go on (finished arms are kept)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
