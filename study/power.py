"""How many test questions and pipeline seeds a study needs to see a difference of a few points.

    python -m study.power --accuracy 0.45 [--seed-sd 2] [--target 2]

Two arms (ALLO and DPO) scored on the same N test questions, over n pipeline seeds. For one seed, the
difference of their accuracies varies, in points, by

    sd^2 = 100^2 * d / N + s^2

  - d / N: the questions. d is the share of questions exactly one of the two arms answers right (the
    paired-binary variance of a difference of two accuracies on the same questions, McNemar's
    discordant pairs). Two models of accuracy p whose errors were independent would disagree on
    2p(1-p) of the questions; two fine-tunings of one SFT model disagree on far fewer, so 2p(1-p),
    from the SFT model's accuracy alone, is the cautious default.
  - s^2: the training seeds. s is the spread over seeds of the difference itself (one pipeline seed
    redraws the SFT model, the samples, the masks and the batch order).

Over n seeds the paired 95% interval of the mean difference is +- t(0.975, n-1) * sd / sqrt(n)
(study/report.py's intervals). This prints that half-width for question counts and seed counts, and
the fewest seeds that reach the target at each question count.
"""

import argparse
import math

from study.report import T975


def half_width(n_seeds, n_questions, accuracy, seed_sd, discordance=None):
    """The paired 95% interval's half-width, in points, of the mean difference of two arms over n_seeds
    seeds of n_questions questions each (see the module's docstring); discordance None: 2p(1-p)."""
    d = 2 * accuracy * (1 - accuracy) if discordance is None else discordance
    sd = math.sqrt(100 ** 2 * d / n_questions + seed_sd ** 2)
    return T975.get(n_seeds - 1, 1.96) * sd / math.sqrt(n_seeds)


def fewest_seeds(n_questions, accuracy, seed_sd, target, discordance=None, most=30):
    """The fewest seeds (at least 3, at most `most`) whose half-width is at most target; None if none."""
    return next((n for n in range(3, most + 1)
                 if half_width(n, n_questions, accuracy, seed_sd, discordance) <= target), None)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.power", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", type=float, required=True, help="the SFT model's test accuracy, 0..1")
    p.add_argument("--seed-sd", type=float, default=2.0, help="the spread over seeds of the difference, in "
                   "points (a study's per-seed differences tell it; default 2)")
    p.add_argument("--discordance", type=float, help="the share of questions exactly one arm answers right "
                   "(default 2p(1-p): independent errors, the cautious end)")
    p.add_argument("--target", type=float, default=2.0, help="the half-width wanted, in points (default 2)")
    p.add_argument("--questions", type=int, nargs="+", default=[200, 500, 1000, 1319, 2000])
    a = p.parse_args(argv)
    if not 0 < a.accuracy < 1:
        p.error("argument --accuracy: between 0 and 1")
    seeds = (3, 5, 10, 20, 30)
    d = a.discordance if a.discordance is not None else 2 * a.accuracy * (1 - a.accuracy)
    print(f"paired 95% half-width of ALLO - DPO, points (SFT accuracy {a.accuracy:g}, seed sd {a.seed_sd:g}, "
          f"discordance {d:.3f})")
    print("| questions | " + " | ".join(f"{n} seeds" for n in seeds) + f" | seeds for +-{a.target:g} |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for q in a.questions:
        cells = [f"{half_width(n, q, a.accuracy, a.seed_sd, a.discordance):.1f}" for n in seeds]
        need = fewest_seeds(q, a.accuracy, a.seed_sd, a.target, a.discordance)
        print(f"| {q} | " + " | ".join(cells) + f" | {need or 'over 30'} |")


if __name__ == "__main__":
    main()
