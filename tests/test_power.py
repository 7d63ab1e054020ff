"""#35 item 4: the study's power, study/power.py: the formula by hand and against a simulation."""

import math

import numpy as np
import pytest

from study import power


def test_half_width_by_hand():
    # p = 0.5: d = 2p(1-p) = 0.5; 500 questions: sd = 100 * sqrt(0.5 / 500) = 3.162 points;
    # 3 seeds: t(2) = 4.303
    assert power.half_width(3, 500, 0.5, 0.0) == pytest.approx(4.303 * 100 * math.sqrt(0.001) / math.sqrt(3))
    # a seed spread of 3 points on top: sqrt(10 + 9) = 4.359; 10 seeds: t(9) = 2.262
    assert power.half_width(10, 500, 0.5, 3.0) == pytest.approx(2.262 * math.sqrt(19) / math.sqrt(10))
    assert power.half_width(5, 1000, 0.3, 0.0, discordance=0.1) == pytest.approx(2.776 * 1 / math.sqrt(5))
    assert power.fewest_seeds(1000, 0.3, 0.0, 1.25, discordance=0.1) == 5  # 5 seeds: 1.241, 4 seeds: 1.388
    assert power.fewest_seeds(200, 0.5, 10.0, 2.0) is None  # no seed count up to 30 gets there


def test_the_question_term_is_the_spread_of_a_paired_difference():
    """Two arms on the same N questions, right with probability p each, disagreeing on a share d of them:
    the spread of their accuracy difference over many draws of the questions is 100 sqrt(d / N) points
    (within 3%: 20,000 draws put the sample sd within about 1% of the true one)."""
    rng = np.random.default_rng(0)
    n, p, d, draws = 400, 0.5, 0.2, 20_000
    # per question: both right (p - d/2), only a right (d/2), only b right (d/2), both wrong (1 - p - d/2)
    counts = rng.multinomial(n, [p - d / 2, d / 2, d / 2, 1 - p - d / 2], size=draws)
    diff = 100 * (counts[:, 1] - counts[:, 2]) / n
    assert diff.std() == pytest.approx(100 * math.sqrt(d / n), rel=0.03)
    assert power.half_width(1_000_000, n, p, 0.0, d) == pytest.approx(1.96 * diff.std() / 1000, rel=0.03)


def test_the_command_prints_the_table(capsys):
    power.main(["--accuracy", "0.45", "--seed-sd", "2", "--questions", "500", "1319"])
    out = capsys.readouterr().out
    assert "| 500 |" in out and "| 1319 |" in out and "seeds for +-2" in out
