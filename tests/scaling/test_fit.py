"""Scaling-law fits recover the laws that generated their data; the command prints JSON and writes plots."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.scaling import fit, kaplan
from llm_jax.scaling.results import FitError, make_runs

# Hoffmann et al. 2022, Approach 3
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TRUTH = np.array([E, A, B, ALPHA, BETA])
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
A_EXP, B_EXP = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)


def chinchilla(n, d):
    return E + A / np.asarray(n) ** ALPHA + B / np.asarray(d) ** BETA


def grid_runs(sizes=16, noise=0.0, seed=0):
    """Models of 50M–16B parameters trained on 5B–500B tokens (the span of Chinchilla's runs)."""
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(5e7, 1.6e10, sizes), np.geomspace(5e9, 5e11, sizes)))
    loss = chinchilla(n, d) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size))
    return make_runs(n, d, loss)


def isoflop_runs(per_budget=9, spread=4.0, noise=0.0, seed=0):
    """Per budget C, model sizes spread log-evenly around the law's N_opt(C), each trained on D = C/(6N)."""
    budgets = np.geomspace(1e18, 1e22, 9)
    n = np.concatenate([G * (c / 6) ** A_EXP * np.geomspace(1 / spread, spread, per_budget) for c in budgets])
    c = np.repeat(budgets, per_budget)
    d = c / (6 * n)
    return make_runs(n, d, chinchilla(n, d) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size)), c)


@pytest.fixture(scope="module")
def exact_fit():
    return fit.fit_approach3(grid_runs())


def test_approach3_recovers_the_chinchilla_law(exact_fit):
    np.testing.assert_allclose(exact_fit.params(), TRUTH, rtol=1e-6)
    assert exact_fit.solver["stopped_by"] in ("gtol", "ftol") and exact_fit.solver["iterations"] > 10


def test_a_loose_tolerance_stops_at_the_starting_point(exact_fit):
    # Σ Huber with δ = 1e-3 has gradients far below 1: a tolerance sized for objectives of order one is met at
    # every start, and the "fit" is the best grid point; the default tolerance moves on to the true law
    loose = fit.fit_approach3(grid_runs(), gtol=1.0)
    assert loose.solver["iterations"] == 0 and loose.solver["stopped_by"] == "start"
    grid = fit.approach3_starts()
    natural_grid = np.stack([np.exp(grid[:, 2]), np.exp(grid[:, 0]), np.exp(grid[:, 1]), grid[:, 3], grid[:, 4]], 1)
    assert np.any(np.all(np.isclose(natural_grid, loose.params(), rtol=1e-9), axis=1))
    assert np.max(np.abs(loose.params() / TRUTH - 1)) > 0.1
    np.testing.assert_allclose(exact_fit.params(), TRUTH, rtol=1e-6)


def test_approach3_intervals_hold_the_truth_under_noise():
    noisy = fit.fit_approach3(grid_runs(sizes=12, noise=0.01, seed=1), bootstrap=100, seed=2)
    for name, true in zip(("E", "A", "B", "alpha", "beta"), TRUTH):
        estimate = getattr(noisy, name)
        assert estimate.low < estimate.value < estimate.high, name
        assert estimate.low <= true <= estimate.high, (name, estimate, true)
    exponents = fit.allocation_exponents(noisy)
    assert exponents["a"].low <= A_EXP <= exponents["a"].high
    at = fit.optimal_allocation(noisy, 1e22)
    assert at["N_opt"].low <= G * (1e22 / 6) ** A_EXP <= at["N_opt"].high
    assert at["D_opt"].low <= (1e22 / 6) ** B_EXP / G <= at["D_opt"].high
    predicted = fit.predict_loss(noisy, 1e9, 2e10)
    assert predicted.low <= chinchilla(1e9, 2e10) <= predicted.high


def test_a_known_irreducible_loss_is_held_and_the_rest_recovered():
    held = fit.fit_approach3(grid_runs(), fixed_E=E)
    np.testing.assert_allclose(held.params(), TRUTH, rtol=1e-6)
    assert held.solver["fixed_E"] == E and held.solver["starts"] == 900  # the grid's e values collapse to one
    noisy = fit.fit_approach3(grid_runs(sizes=12, noise=0.01, seed=1), fixed_E=E, bootstrap=100, seed=2)
    assert noisy.E.value == noisy.E.low == noisy.E.high == pytest.approx(E, rel=1e-12)
    for name, true in zip(("A", "B", "alpha", "beta"), TRUTH[1:]):
        estimate = getattr(noisy, name)
        assert estimate.low <= true <= estimate.high, (name, estimate, true)
    # a wrong floor cannot fit as well as the true one, and the free fit is never worse than either
    wrong = fit.fit_approach3(grid_runs(), fixed_E=1.0)
    assert wrong.objective > 1e3 * max(held.objective, 1e-12) and wrong.E.value == pytest.approx(1.0)
    with pytest.raises(FitError, match="below every run's loss"):
        fit.fit_approach3(grid_runs(), fixed_E=5.0)


def test_the_allocation_minimises_the_law_at_fixed_compute(exact_fit):
    for c in (1e19, 1e21, 1e24):
        n_opt, d_opt = exact_fit.allocation([c])
        n = np.geomspace(n_opt[0] / 3, n_opt[0] * 3, 200_001)
        best = n[np.argmin(chinchilla(n, c / (6 * n)))]
        np.testing.assert_allclose(n_opt[0], best, rtol=1e-4)
        np.testing.assert_allclose(n_opt[0] * d_opt[0] * 6, c, rtol=1e-12)


def test_outliers_are_named_and_left_out():
    runs = grid_runs(sizes=8, noise=0.002, seed=3)
    bad = np.array([5, 40])
    corrupted = make_runs(runs.n, runs.d, np.where(np.isin(np.arange(len(runs)), bad), runs.loss * 1.3, runs.loss))
    kept = fit.fit_approach3(corrupted, outlier_z=5.0)
    assert kept.removed_rows == tuple(corrupted.rows[bad]) and kept.n_runs == len(runs) - 2
    np.testing.assert_allclose(kept.params()[[0, 3, 4]], TRUTH[[0, 3, 4]], rtol=0.05)


@pytest.mark.parametrize("which", ["approach3", "kaplan"])
def test_hand_written_gradients_match_autodiff(which):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        zn, zd, log_loss = (jnp.asarray(rng.normal(size=(1, 32))) for _ in range(3))
        weight = jnp.asarray(rng.integers(0, 3, size=(1, 32)).astype(np.float64))
        if which == "approach3":
            u = jnp.asarray(rng.normal(size=(6, 5)) * 0.5)
            objective, args = fit._huber_value_and_grad, (weight, zn, zd, log_loss * 0.01)
        else:
            u = jnp.asarray(np.abs(rng.normal(size=(6, 4))) + 0.1)
            objective, args = kaplan._kaplan_value_and_grad, (weight, zn, zd, log_loss, jnp.asarray(1.7))
        value, grad = objective(u, *args)
        auto = jax.vmap(jax.grad(lambda row: objective(row[None], *args)[0][0]))(u)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(auto), rtol=1e-9, atol=1e-12)
        assert np.all(np.isfinite(np.asarray(value)))


# Kaplan et al. 2020, eqs. 1.1–1.3 (C in FLOPs: C_c = 3.1e8 PF-days) and 1.5
KAPLAN_1D = {"N": (8.8e13, 0.076), "D": (5.4e13, 0.095), "C": (3.1e8 * 8.64e19, 0.050)}
N_C, D_C, ALPHA_N, ALPHA_D = 6.4e13, 1.8e13, 0.076, 0.103


@pytest.mark.parametrize("variable", sorted(KAPLAN_1D))
def test_kaplan_one_variable_laws(variable):
    x_c, alpha = KAPLAN_1D[variable]
    x = np.geomspace(x_c * 1e-7, x_c * 1e-3, 20)
    exact = kaplan.fit_kaplan_law(x, (x_c / x) ** alpha)
    np.testing.assert_allclose([exact.x_c.value, exact.alpha.value], [x_c, alpha], rtol=1e-8)
    noise = np.exp(0.01 * np.random.default_rng(4).standard_normal(x.size))
    noisy = kaplan.fit_kaplan_law(x, (x_c / x) ** alpha * noise, bootstrap=500, seed=5)
    assert noisy.alpha.low <= alpha <= noisy.alpha.high and noisy.x_c.low <= x_c <= noisy.x_c.high


def kaplan_joint(n, d):
    return ((N_C / n) ** (ALPHA_N / ALPHA_D) + D_C / d) ** ALPHA_D


def test_a_law_the_runs_cannot_support_is_skipped_with_the_reason():
    # Two IsoFLOP budgets of models far too large for them: the bigger the model, the fewer its tokens and the
    # higher its loss, so L(N) on each size's best run rises; the other laws still fit
    n = np.tile(np.geomspace(1e9, 1e10, 4), 2)
    c = np.repeat([1e18, 2e18], 4)
    d = c / (6 * n)
    result = kaplan.fit_kaplan(make_runs(n, d, kaplan_joint(n, d), c))
    assert result.L_N is None and set(result.skipped) == {"L(N)"}
    assert "does not fall" in result.skipped["L(N)"] and "IsoFLOP" in result.skipped["L(N)"]
    assert result.L_D.alpha.value > 0 and result.L_C is not None
    assert "L(N)" not in result.to_json() and result.to_json()["skipped"] == result.skipped


def test_kaplan_joint_law():
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e9, 10), np.geomspace(2e7, 2e10, 10)))
    exact = kaplan.fit_kaplan_joint(make_runs(n, d, kaplan_joint(n, d)))
    np.testing.assert_allclose([exact.N_c.value, exact.D_c.value, exact.alpha_N.value, exact.alpha_D.value],
                               [N_C, D_C, ALPHA_N, ALPHA_D], rtol=1e-5)
    noise = np.exp(0.01 * np.random.default_rng(6).standard_normal(n.size))
    noisy = kaplan.fit_kaplan_joint(make_runs(n, d, kaplan_joint(n, d) * noise), bootstrap=100, seed=7)
    for estimate, true in ((noisy.N_c, N_C), (noisy.D_c, D_C), (noisy.alpha_N, ALPHA_N), (noisy.alpha_D, ALPHA_D)):
        assert estimate.low <= true <= estimate.high, (estimate, true)


def test_approach2_recovers_the_allocation_exponents():
    exact = fit.fit_approach2(isoflop_runs())
    assert len(exact.profiles) == 9 and not exact.skipped
    assert exact.n_opt.p.value == pytest.approx(A_EXP, abs=1e-6)
    assert exact.d_opt.p.value == pytest.approx(B_EXP, abs=1e-6)
    noisy = fit.fit_approach2(isoflop_runs(noise=0.005, seed=8), bootstrap=200, seed=9)
    assert noisy.n_opt.p.low <= A_EXP <= noisy.n_opt.p.high
    assert noisy.d_opt.p.low <= B_EXP <= noisy.d_opt.p.high


def test_a_window_around_each_budgets_minimum_undoes_a_lopsided_range():
    # sizes from N_opt/2 to 300·N_opt: the long undertrained arm is no parabola in ln N and drags the vertex up
    budgets = np.geomspace(1e18, 1e22, 5)
    n = np.concatenate([G * (c / 6) ** A_EXP * np.geomspace(0.5, 300, 11) for c in budgets])
    c = np.repeat(budgets, 11)
    runs = make_runs(n, c / (6 * n), chinchilla(n, c / (6 * n)), c)
    error = lambda result: [p.n_opt / (G * (p.budget / 6) ** A_EXP) - 1 for p in result.profiles]
    assert min(error(fit.fit_approach2(runs))) > 0.2
    windowed = fit.fit_approach2(runs, window=5)
    assert max(np.abs(error(windowed))) < 0.01 and all(p.members.size == 5 for p in windowed.profiles)
    assert windowed.n_opt.p.value == pytest.approx(A_EXP, abs=1e-6)
    with pytest.raises(FitError, match="window is 2"):
        fit.fit_approach2(runs, window=2)


def test_approach1_frontier_is_each_budgets_best_run():
    runs = isoflop_runs(per_budget=25, spread=8.0)          # the middle size of each budget is its optimum
    result = fit.fit_approach1(runs, bootstrap=50)
    assert np.array_equal(np.sort(result.frontier), np.arange(12, len(runs), 25))
    assert result.n_opt.p.value == pytest.approx(A_EXP, abs=1e-9)
    assert result.d_opt.p.value == pytest.approx(B_EXP, abs=1e-9)


# ------------------------------------------------------------------------------------------------- command

def write_csv(path, runs, drop=(), edit=None):
    columns = {"N": runs.n, "N_total": runs.n * 1.2, "D": runs.d, "flops": runs.flops, "loss": runs.loss,
               "best_loss": runs.loss}
    names = [c for c in columns if c not in drop]
    lines = [",".join(names)] + [",".join(repr(float(columns[c][i])) for c in names) for i in range(len(runs))]
    if edit:
        row, column, text = edit
        cells = lines[row].split(",")
        cells[names.index(column)] = text
        lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_cli(capsys, *argv):
    code = main(["scaling-fit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_approach3(tmp_path, capsys):
    csv = write_csv(tmp_path / "runs.csv", grid_runs(sizes=6))
    code, out, err = run_cli(capsys, csv, "--n-col", "N", "--d-col", "D", "--loss-col", "loss", "--approach", "3",
                             "--bootstrap", "20", "--compute", "1e21", "--predict", "1e9,2e10")
    assert code == 0, err
    result = json.loads(out)
    fitted = [result[name]["value"] for name in ("E", "A", "B", "alpha", "beta")]
    np.testing.assert_allclose(fitted, TRUTH, rtol=1e-5)
    assert all(len(result[name]["ci"]) == 2 for name in ("E", "A", "B", "alpha", "beta"))
    assert result["allocation"]["a"]["value"] == pytest.approx(A_EXP, rel=1e-5)
    assert result["predictions"][0]["loss"]["value"] == pytest.approx(chinchilla(1e9, 2e10), rel=1e-6)
    assert result["extrapolation"]["held_out_runs"] > 0 and result["extrapolation"]["max_abs_relative_error"] < 1e-6
    code, out, err = run_cli(capsys, csv, "--bootstrap", "0", "--fixed-E", str(E), "--no-plots")
    held = json.loads(out)
    assert code == 0 and held["solver"]["fixed_E"] == E and held["alpha"]["value"] == pytest.approx(ALPHA, rel=1e-5)
    names = sorted(p.split("/")[-1] for p in result["plots"])
    assert names == ["allocation.png", "fitted_law.png", "loss_vs_compute.png"]
    for path in result["plots"]:
        assert (tmp_path / "runs_plots" / path.split("/")[-1]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("approach,plots", [("1", ["allocation.png", "loss_vs_compute.png"]),
                                             ("2", ["allocation.png", "isoflops.png", "loss_vs_compute.png"]),
                                             ("kaplan", ["fitted_law.png", "kaplan_laws.png", "loss_vs_compute.png"])])
def test_command_other_approaches(tmp_path, capsys, approach, plots):
    csv = write_csv(tmp_path / "iso.csv", isoflop_runs(per_budget=7))
    code, out, err = run_cli(capsys, csv, "--approach", approach, "--bootstrap", "20", "--plots-dir", tmp_path / "p")
    assert code == 0, err
    result = json.loads(out)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == plots
    if approach == "2":
        assert result["a"]["value"] == pytest.approx(A_EXP, abs=1e-6)
    if approach == "kaplan":
        assert {"L(N)", "L(D)", "L(C)", "L(N,D)"} <= set(result) and result["skipped"] == {}


@pytest.mark.parametrize("drop,edit,argv,message", [
    (("D",), None, (), "has no column 'D' (for D); its columns are N, N_total, flops, loss, best_loss"),
    ((), None, ("--n-col", "N_kaplan"), "has no column 'N_kaplan' (for N)"),
    ((), (3, "D", "0"), (), "row 3: column 'D' is 0; N, D, flops and loss must be finite and positive"),
    ((), (2, "loss", "-1.5"), (), "row 2: column 'loss' is -1.5"),
    ((), (5, "N", "big"), (), "row 5: column 'N' is 'big', not a number"),
    ((), None, ("--bootstrap", "1"), "bootstrap is 1"),
    ((), None, ("--holdout-fraction", "1.5"), "the holdout fraction is 1.5"),
    ((), None, ("--compute", "0"), "the compute budget is 0.0"),
    ((), None, ("--predict", "1e9,-5"), "cannot predict the loss at N = 1000000000.0, D = -5.0"),
    ((), None, ("--fixed-E", "-1"), "the fixed irreducible loss E = -1.0 must be positive"),
])
def test_command_names_bad_input(tmp_path, capsys, drop, edit, argv, message):
    csv = write_csv(tmp_path / "bad.csv", grid_runs(sizes=3), drop, edit)
    code, out, err = run_cli(capsys, csv, "--no-plots", *argv)
    assert code == 1 and out == ""
    assert message in err


def test_too_few_runs_are_refused(tmp_path, capsys):
    runs = grid_runs(sizes=2)
    code, _, err = run_cli(capsys, write_csv(tmp_path / "four.csv", runs), "--no-plots")
    assert code == 1 and "Approach 3 (5 coefficients) needs at least 6 runs; " in err and "has 4" in err
    with pytest.raises(FitError, match="Approach 2 needs at least 2 IsoFLOP budgets"):
        fit.fit_approach2(runs)
    with pytest.raises(FitError, match=r"Approach 1 needs at least 3 runs on the compute frontier .* has 2"):
        fit.fit_approach1(runs.subset(slice(0, 2)))


def test_missing_matplotlib_is_named_before_fitting(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now raises ImportError
    code, out, err = run_cli(capsys, write_csv(tmp_path / "runs.csv", grid_runs(sizes=3)))
    assert code == 1 and out == "" and "pip install 'llm_jax[plots]'" in err and "--no-plots" in err
