"""The over-optimisation study's analysis (experiments/rlhf/overoptimization.py): Gao et al.'s RL form."""
import importlib.util
import math
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "rlhf", "overoptimization.py")
_spec = importlib.util.spec_from_file_location("overoptimization", _PATH)
overopt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overopt)


def test_the_rl_form_is_recovered_with_its_peak():
    d = np.linspace(0.0, 3.0, 13)
    fit = overopt.fit_gao_rl(d, d * (0.4 - 0.1 * d))
    assert fit["alpha"] == pytest.approx(0.4) and fit["b"] == pytest.approx(0.1)
    assert fit["d_peak"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert overopt.fit_gao_rl(d, 0.3 * d + 0.01 * d * d)["d_peak"] == math.inf  # still rising: no peak
    with pytest.raises(ValueError, match="at least 2 points"):
        overopt.fit_gao_rl(np.array([1.0]), np.array([0.1]))


def test_analyse_measures_gains_from_the_sft_policy():
    points = [dict(beta=beta, step=step, d=d, gold=0.5 + d * (0.2 - 0.05 * d), proxy=-4.0 + 0.3 * d)
              for beta, scale in ((0.0, 1.0), (0.1, 0.5)) for step, d in ((0, 0.0), (10, scale), (20, 2 * scale))]
    fits = overopt.analyse(points)
    assert fits["gold_base"] == pytest.approx(0.5) and fits["proxy_base"] == pytest.approx(-4.0)
    assert fits["gold"]["alpha"] == pytest.approx(0.2) and fits["gold"]["b"] == pytest.approx(0.05)
    assert fits["proxy"]["alpha"] == pytest.approx(0.3) and abs(fits["proxy"]["b"]) < 1e-9
    with pytest.raises(ValueError, match="iteration-0"):
        overopt.analyse([p for p in points if p["step"] > 0])
