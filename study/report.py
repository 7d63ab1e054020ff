"""The study's numbers and pictures: means over seeds, the paper's claims as paired differences with
their 95% t intervals, quarter means of the training loss, the markdown tables and the figures
(matplotlib, an optional package: without it the tables are still written)."""

import math
import os
import statistics

from bookkeeping.fileio import atomic_path

# the two-sided 95% quantile of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
        19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052,
        28: 2.048, 29: 2.045, 30: 2.042}

# (claim, arm a, arm b, the sign the paper claims for a - b; 0: no claim, a comparison)
CLAIMS = [
    ("ALLO − DPO full", "ALLO", "DPO full", +1),
    ("DPO top − DPO full", "DPO top", "DPO full", +1),
    ("DPO top − DPO bottom", "DPO top", "DPO bottom", +1),
    ("ALLO w/o forgetting − ALLO", "ALLO w/o forgetting", "ALLO", -1),
    ("ALLO w/o neuron masks − ALLO", "ALLO w/o neuron masks", "ALLO", -1),
    ("ALLO w/o key tokens − ALLO", "ALLO w/o key tokens", "ALLO", -1),
    ("ALLO forgetting every token − ALLO", "ALLO forgetting every token", "ALLO", -1),
    ("DPO top − DPO LoRA (as many trained parameters)", "DPO top", "DPO LoRA", 0),  # no claim: a comparison
]


def mean_interval(values):
    """(mean, low, high): the 95% t interval of the mean, mean +- t(n-1) * sd / sqrt(n); no interval
    (None, None) below two values."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return mean, None, None
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_difference(a, b):
    """The mean and 95% t interval of the per-seed differences a[s] - b[s], over the seeds both hold."""
    seeds = sorted(set(a) & set(b))
    return mean_interval([a[s] - b[s] for s in seeds]) + (len(seeds),)


def verdict(low, high, sign):
    """Whether a claim holds: its interval excludes 0 on the side the paper claims (sign 0: a comparison
    the paper makes no claim on, which side the interval lies on, if either)."""
    if low is None:
        return "one seed: no interval"
    if sign == 0:
        return "the first higher" if low > 0 else "the second higher" if high < 0 else \
            "no difference shown: the interval holds 0"
    if (low > 0 if sign > 0 else high < 0):
        return "holds"
    if (high < 0 if sign > 0 else low > 0):
        return "fails: the other way"
    return "not shown: the interval holds 0"


def claims(rows):
    """Each claim whose two arms were run: {claim, difference, low, high, seeds, verdict}, accuracy in
    points; rows pair up by seed."""
    accuracy = {}
    for r in rows:
        accuracy.setdefault(r["arm"], {})[r["seed"]] = 100 * r["accuracy"]
    out = []
    for name, a, b, sign in CLAIMS:
        if a in accuracy and b in accuracy:
            mean, low, high, n = paired_difference(accuracy[a], accuracy[b])
            out.append({"claim": name, "difference": mean, "low": low, "high": high, "seeds": n,
                        "verdict": verdict(low, high, sign)})
    return out


def chosen_scales(sweep):
    """Each arm's multiplier of its rates with the best validation accuracy in the sweep's rows; a tie
    goes to the multiplier nearest 1 (the base rates), then to the smaller."""
    best = {}
    for r in sweep:
        key = (r["accuracy"], -abs(math.log(r["lr_scale"])), -r["lr_scale"])
        if r["arm"] not in best or key > best[r["arm"]][0]:
            best[r["arm"]] = (key, r["lr_scale"])
    return {arm: scale for arm, (_, scale) in best.items()}


def sweep_markdown(sweep, chosen, rows):
    """The validation sweep: each arm's accuracy at each multiplier of its rates, and the rates chosen
    (the arms that train: SFT has no rate)."""
    sweep = [r for r in sweep if r["rates"]]
    scales = sorted({r["lr_scale"] for r in sweep})
    lines = ["| arm | " + " | ".join(f"val at x{m:g}" for m in scales) + " | chosen | its rates |",
             "|---|" + "---|" * (len(scales) + 2)]
    for arm in dict.fromkeys(r["arm"] for r in sweep):
        acc = {r["lr_scale"]: r["accuracy"] for r in sweep if r["arm"] == arm}
        rates = next(r["rates"] for r in rows if r["arm"] == arm)
        cells = [f"{100 * acc[m]:.1f}%" if m in acc else "-" for m in scales]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | x{chosen[arm]:g} | " +
                     (", ".join(f"{k} {v:.3g}" for k, v in rates.items()) or "-") + " |")
    return "Rates chosen on the validation split, on the first seed (every arm from a grid of the same " \
           "multipliers of its base rates):\n\n" + "\n".join(lines)


def quarter_means(losses):
    """The mean loss over each quarter of a run's steps: quarter q holds steps floor(q*n/4)+1 ..
    floor((q+1)*n/4); a quarter without a step (n < 4) is None."""
    n = len(losses)
    bounds = [q * n // 4 for q in range(5)]
    return [statistics.fmean(losses[lo:hi]) if hi > lo else None for lo, hi in zip(bounds, bounds[1:])]


def summarize(rows, names):
    """Per arm: mean, sample std and 95% interval over seeds of accuracy, means of the rest (pair
    accuracy and margin over the seeds with held-out pairs), and the mean loss of each step and
    quarter over the seeds that kept them."""
    out = []
    for name in names:
        rs = [r for r in rows if r["arm"] == name]
        acc = [r["accuracy"] for r in rs]
        mean, low, high = mean_interval(acc)

        def average(key):  # over the seeds that have it: a seed may have no held-out pairs
            kept = [r[key] for r in rs if r[key] is not None]
            return statistics.fmean(kept) if kept else None

        losses = [r["losses"] for r in rs if r.get("losses")]
        steps = [statistics.fmean(s) for s in zip(*losses)] if losses else None
        out.append({"arm": name, "accuracy": mean,
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "accuracy_low": low, "accuracy_high": high, "pair_accuracy": average("pair_accuracy"),
                    "margin": average("margin"), "forget_fraction": average("forget_fraction"),
                    "learn_fraction": average("learn_fraction"), "wall_s": average("wall_s"),
                    "losses": steps, "quarter_losses": quarter_means(steps) if steps else None})
    return out


def markdown(summary, found, split, seeds_line, settings_line, n_questions, n_pairs):
    """The study's tables: arms, claims, and the loss quarters of the vanilla-DPO arms. n_pairs: the
    held-out pairs of each seed (pipeline seeds sample their own)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [f"| arm | {split} accuracy (mean ± std) | pair accuracy | margin | trained fraction "
             "(forget / learn) | wall time (s) |", "|---|---|---|---|---|---|"]
    for s in summary:
        margin = "-" if s["margin"] is None else f"{s['margin']:+.3f}"
        frac = "-" if s["wall_s"] == 0 else f"{s['forget_fraction']:.2f} / {s['learn_fraction']:.2f}"
        lines.append(f"| {s['arm']} | {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f}% | "
                     f"{pct(s['pair_accuracy'])} | {margin} | {frac} | {s['wall_s']:.0f} |")
    pairs = f"{n_pairs[0]}" if len(set(n_pairs)) == 1 else f"{', '.join(map(str, n_pairs))} (by seed)"
    lines.append(f"\n{seeds_line}; {n_questions} {split} questions, greedy; {pairs} held-out pairs, "
                 f"margin = beta * (chosen - rejected) log-ratio against the SFT model. {settings_line}")
    if found:
        lines += ["", "| claim (accuracy, points) | paired difference | 95% t interval | seeds | verdict |",
                  "|---|---|---|---|---|"]
        for c in found:
            span = "-" if c["low"] is None else f"[{c['low']:+.1f}, {c['high']:+.1f}]"
            lines.append(f"| {c['claim']} | {c['difference']:+.1f} | {span} | {c['seeds']} | "
                         f"{c['verdict']} |")
    conv = [s for s in summary if s["quarter_losses"]]
    if conv:
        lines += ["", "| DPO loss, mean over each quarter of the steps | 25% | 50% | 75% | 100% |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s['arm']} | "
                  + " | ".join("-" if q is None else f"{q:.4f}" for q in s["quarter_losses"]) + " |"
                  for s in conv]
    return "\n".join(lines)


def figures(root, rows, summary, masks):
    """convergence, accuracy and mask_density as PNG and SVG under root; returns the files written,
    or [] with one line printed when matplotlib is missing. masks: a learning mask (name -> bool
    tensor) for the density figure, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: no figures (they need matplotlib: pip install matplotlib); the tables are written")
        return []
    from allo import mask_summary
    written = []

    def save(fig, name):
        for ext in ("png", "svg"):
            path = os.path.join(root, f"{name}.{ext}")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
            written.append(path)
        plt.close(fig)

    conv = [s for s in summary if s["losses"]]
    if conv:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in conv:
            per_seed = [r["losses"] for r in rows if r["arm"] == s["arm"] and r.get("losses")]
            steps = range(1, len(s["losses"]) + 1)
            ax.plot(steps, s["losses"], label=s["arm"])
            ax.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                            alpha=0.2)
        masked = [s["learn_fraction"] for s in conv if s["learn_fraction"] < 1]  # the masks' trained share
        share = f" or on {100 * masked[0]:.3g}% of them" if masked else ""
        ax.set(xlabel="step", ylabel="DPO loss", title=f"Vanilla DPO on every parameter{share}\n"
               "(mean over seeds, band: lowest to highest)")
        ax.legend()
        save(fig, "convergence")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [s["arm"] for s in summary]
    means = [100 * s["accuracy"] for s in summary]
    errors = [[0 if s["accuracy_low"] is None else 100 * (s["accuracy"] - s["accuracy_low"])
               for s in summary],
              [0 if s["accuracy_high"] is None else 100 * (s["accuracy_high"] - s["accuracy"])
               for s in summary]]
    ax.errorbar(means, range(len(names)), xerr=errors, fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy (%)", title="Accuracy per arm (mean, 95% t interval over seeds)")
    save(fig, "accuracy")
    if masks:
        rows_by = {by: [r for r in mask_summary(masks) if r["by"] == by] for by in ("layer", "type")}
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, by in zip(axes, ("layer", "type")):
            ax.bar([r["group"] for r in rows_by[by]], [100 * r["density"] for r in rows_by[by]])
            ax.set(ylabel="entries in the mask (%)", title=f"learning mask by {by}")
            ax.tick_params(axis="x", rotation=60)
        save(fig, "mask_density")
    return written


RUN_STAGES = ("sft", "dpo", "rewriter", "forget", "learn")
PANELS = (("reward_accuracy", "reward accuracy"), ("kept_share", "kept share of the rejected tokens"),
          ("reward_margin", "reward margin"), ("weighted_share", "weighted share of the tokens"),
          ("weighted_logratio", "weighted tokens' mean log-ratio"))  # trainer's statistics, as drawn


def run_figures(run):
    """One run's pictures (eval.py R --plot) as PNG under R/plots/: each finished training stage's
    curves from its metrics.jsonl (the loss, and the DPO or NPO numbers it logged) and the masks'
    density by layer. Returns the files written, or None with one line printed without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval: no plots (they need matplotlib: pip install matplotlib)")
        return None
    import json

    from safetensors.torch import load_file

    from allo import mask_summary
    out, written = os.path.join(run, "plots"), []
    os.makedirs(out, exist_ok=True)

    def save(fig, name):
        path = os.path.join(out, f"{name}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    for stage in RUN_STAGES:
        log = os.path.join(run, stage, "metrics.jsonl")
        if not os.path.exists(os.path.join(run, stage, "stage.json")) or not os.path.exists(log):
            continue
        with open(log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        panels = [("loss", "loss")] + [p for p in PANELS if rows and p[0] in rows[0]]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
            ax.set(xlabel="step", title=label)
        fig.suptitle(f"{stage} ({run})", y=1.06)
        save(fig, stage)
    masks = {name: os.path.join(run, "mask", f"{name}.safetensors") for name in ("forget", "learn")}
    if all(os.path.exists(p) for p in masks.values()):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, path in masks.items():
            by_layer = [r for r in mask_summary(load_file(path)) if r["by"] == "layer"]
            ax.plot([r["group"] for r in by_layer], [100 * r["density"] for r in by_layer], "o-", label=name)
        ax.set(ylabel="entries in the mask (%)", title="the masks by layer")
        ax.tick_params(axis="x", rotation=60)
        ax.legend()
        save(fig, "masks")
    return written
