"""Anytime inference: budget curves, tolerances, early exit, warm starts."""

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff

N = 12  # step budget of the traces


@pytest.fixture(scope="module")
def model():
    return ff.make_model("tiny", key=jr.PRNGKey(0), max_steps=N, rtol=1e-3)


@pytest.fixture(scope="module")
def x():
    return np.asarray(jr.normal(jr.PRNGKey(1), (16, 1, 8, 8)))


_TRACES = {}


def _trace(model, x, name):
    if name not in _TRACES:
        solver = {"naive": ff.Naive(), "anderson": ff.Anderson()}[name]
        _TRACES[name] = (solver, ff.anytime_trace(model, x, solver=solver, rtol=1e-4))
    return _TRACES[name]


@eqx.filter_jit
def _batched(model, x, solver, max_steps, rtol):
    logits, sol = model.batched(x, solver=solver, max_steps=max_steps, rtol=rtol)
    return logits.argmax(-1), sol.stats.num_steps


@pytest.mark.parametrize("name", ["naive", "anderson"])
def test_trace_matches_real_solves(model, x, name):
    solver, trace = _trace(model, x, name)
    # A budget: a solve with max_steps=k (at the trace's tolerance).
    pred, steps = trace.budget(3)
    ref = _batched(model, x, solver, 3, 1e-4)
    np.testing.assert_array_equal(pred, ref[0])
    np.testing.assert_array_equal(steps, ref[1])
    # A looser tolerance: a solve with that rtol.
    pred, steps = trace.tolerance(1e-2, model.atol)
    ref = _batched(model, x, solver, N, 1e-2)
    np.testing.assert_array_equal(pred, ref[0])
    np.testing.assert_array_equal(steps, ref[1])


@pytest.mark.parametrize("name", ["naive", "anderson"])
def test_curve_monotone_and_reaches_full_solve(model, x, name):
    _, trace = _trace(model, x, name)
    labels = np.argmax(trace.final_logits, -1)  # the full solve is right by definition
    acc = np.array([np.mean(trace.budget(k)[0] == labels) for k in range(1, N + 1)])
    steps = np.array([np.mean(trace.budget(k)[1]) for k in range(1, N + 1)])
    assert acc[-1] == 1.0
    assert np.all(np.diff(acc) >= -2 / len(labels))  # monotone within two images
    assert acc[0] < 1.0  # one step is not enough: the curve does rise
    assert np.all(np.diff(steps) >= 0) and steps[-1] == np.mean(trace.num_steps)


@pytest.mark.parametrize("name", ["naive", "anderson"])
def test_early_exit_loop_matches_trace(model, x, name):
    solver, trace = _trace(model, x, name)
    stable = 2
    logits, steps = eqx.filter_jit(
        jax.vmap(lambda xi: ff.solve_early_exit(model, xi, stable=stable, solver=solver))
    )(x)
    pred, ref_steps = trace.early_exit(stable, model.rtol, model.atol)
    np.testing.assert_array_equal(np.argmax(logits, -1), pred)
    np.testing.assert_array_equal(steps, ref_steps)
    # Stopping on a stable prediction never takes more steps than the residual test alone.
    assert np.all(ref_steps <= trace.tolerance(model.rtol, model.atol)[1])


def test_warm_start_ends_at_the_same_fixed_point(model, x):
    solve = eqx.filter_jit(
        jax.vmap(lambda xi, z0: model.solve(xi, z0=z0, max_steps=100, rtol=1e-5, atol=0.0))
    )
    zero = np.zeros((len(x), 4, 8, 8), np.complex64)
    base = solve(x, zero)
    # A similar input (a video's next frame): the same image plus a little noise.
    shifted = x + 0.05 * np.asarray(jr.normal(jr.PRNGKey(2), x.shape))
    cold = solve(shifted, zero)
    warm = solve(shifted, base.value)
    assert np.all(cold.result == ff.RESULTS.successful)
    assert np.all(warm.result == ff.RESULTS.successful)
    # Both within rtol * |z| / (1 - L) of the unique fixed point (L: the certified bound).
    lip = float(model.cell.lipschitz_bound(8, 8))
    norm = np.linalg.norm(np.asarray(cold.value).reshape(len(x), -1), axis=-1)
    diff = np.linalg.norm(np.asarray(warm.value - cold.value).reshape(len(x), -1), axis=-1)
    assert np.all(diff <= 2 * 1e-5 * norm / (1 - lip) * 1.01)
    assert np.mean(warm.stats.num_steps) < np.mean(cold.stats.num_steps)
    # From its own fixed point a solve stops at once.
    again = solve(x, base.value)
    np.testing.assert_array_equal(again.stats.num_steps, 0)


def test_bad_arguments(model, x):
    _, trace = _trace(model, x, "naive")
    with pytest.raises(ValueError, match="budget k=13"):
        trace.budget(N + 1)
    with pytest.raises(ValueError, match="stable=0"):
        trace.early_exit(0, 1e-3)
    with pytest.raises(ValueError, match="stable=0"):
        ff.solve_early_exit(model, x[0], stable=0)
    with pytest.raises(ValueError, match="Multigrid is not supported"):
        ff.anytime_trace(model, x, solver=ff.Multigrid())
    with pytest.raises(ValueError, match="batch"):
        ff.anytime_trace(model, x[0])
    with pytest.raises(TypeError, match="FieldClassifier"):
        ff.anytime_trace(model.cell, x)
    with pytest.raises(ValueError, match="`z0` has shapes"):
        model.solve(x[0], z0=np.zeros((4, 4, 4), np.complex64))
