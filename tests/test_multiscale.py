"""The multi-scale fractal cell: coupled fields on a pyramid of tori."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from _reference import np_conv_norm, np_correlate, np_modrelu, random_field, solve_cell, to_float64

import fractal_field as ff

CHANNELS = (2, 3, 4)


def _fields(key, channels, h, w, dtype=jnp.complex64, batch=()):
    keys = jr.split(key, len(channels))
    return tuple(
        random_field(k, (*batch, c, h >> s, w >> s), dtype)
        for s, (k, c) in enumerate(zip(keys, channels, strict=True))
    )


@functools.cache
def _cell(channels=CHANNELS, grid=8, **kwargs):
    """A cell (immutable, so built once per set of arguments: initialisation compiles)."""
    return ff.MultiScaleCell(channels, norm_grid=(grid, grid), key=jr.PRNGKey(0), **kwargs)


# An independent NumPy implementation (`_reference.py`): wrap-around correlation tap by tap,
# pooling by block means, upsampling by Kronecker products, norms from dense SVDs.


def _np_pool(z, f):
    c, h, w = z.shape
    return z.reshape(c, h // f, f, w // f, f).mean((2, 4))


def _np_up(z, f):
    return np.kron(z, np.ones((1, f, f)))


def _np_step(cell, zs, inj):
    zs = [np.asarray(z, complex) for z in zs]
    s_count = len(zs)
    h, w = zs[0].shape[1:]
    weights = [np.asarray(c.weight[0], complex) for c in cell.convs]
    mix = [np.asarray(m, complex) for m in cell.mix]
    pairs = [(s, t) for s in range(s_count) for t in range(s_count) if s != t]
    n = np.zeros((s_count, s_count))
    for s, wt in enumerate(weights):
        n[s, s] = np_conv_norm(wt, h >> s, w >> s)
    for m, (s, t) in zip(mix, pairs, strict=True):
        n[s, t] = np.linalg.norm(m, 2)
    c = min(1.0, cell.gamma / np.linalg.norm(n, 2))
    lin = [c * np_correlate(wt, z) for wt, z in zip(weights, zs, strict=True)]
    for m, (s, t) in zip(mix, pairs, strict=True):
        if t < s:
            y = np.einsum("oc,chw->ohw", m, _np_pool(zs[t], 2 ** (s - t)))
        else:
            y = _np_up(np.einsum("oc,chw->ohw", m, zs[t]), 2 ** (t - s))
        lin[s] = lin[s] + c * y
    lin[0] = lin[0] + np.asarray(inj, complex)
    a = cell.alpha()
    return [
        (1 - a) * z + a * np_modrelu(y, np.asarray(act.bias))
        for z, y, act in zip(zs, lin, cell.acts, strict=True)
    ]


@pytest.mark.parametrize("channels", [(2, 3), CHANNELS])
def test_step_matches_independent_reference(channels):
    cell = _cell(channels)
    # Non-zero modReLU biases, so the activation's thresholds are exercised too.
    acts = tuple(
        eqx.tree_at(lambda a: a.bias, act, -0.3 * jnp.arange(c, dtype=jnp.float32) / c)
        for act, c in zip(cell.acts, channels, strict=True)
    )
    cell = eqx.tree_at(lambda c: c.acts, cell, acts)
    zs = _fields(jr.PRNGKey(1), channels, 8, 8)
    inj = random_field(jr.PRNGKey(2), (channels[0], 8, 8))
    out, scale = eqx.filter_jit(lambda c, z, u: (c(z, u), c.scale()))(cell, zs, inj)
    want = _np_step(cell, zs, inj)
    assert float(scale) < 1  # the rescaling is active at this initialisation
    for o, r in zip(out, want, strict=True):
        np.testing.assert_allclose(np.asarray(o), r, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("activation", ["modrelu", "crelu", "cardioid"])
def test_certified_contraction_in_the_scale_weighted_norm(activation):
    """`lipschitz_bound` is at most `(1 - a) + a Lip(act) gamma` on the reference grid and
    bounds every observed ratio `||f(z) - f(w)|| / ||z - w||` in the weighted norm."""
    cell = _cell(activation=activation, gamma=0.8)
    bound = float(eqx.filter_jit(lambda c: c.lipschitz_bound(8, 8))(cell))
    a = cell.alpha()
    assert bound <= (1 - a) + a * ff.LIPSCHITZ[activation] * 0.8 + 1e-5
    inj = random_field(jr.PRNGKey(3), (CHANNELS[0], 8, 8))

    def norm(zs):
        return float(jnp.sqrt(sum(jnp.mean(jnp.abs(z) ** 2) for z in zs)))

    step = eqx.filter_jit(lambda z: cell(z, inj))
    worst = 0.0
    for i in range(20):
        z = _fields(jr.PRNGKey(10 + i), CHANNELS, 8, 8)
        # Nearby and far-apart pairs.
        scale = 1e-2 if i % 2 else 1.0
        w = tuple(
            a + scale * b
            for a, b in zip(z, _fields(jr.PRNGKey(50 + i), CHANNELS, 8, 8), strict=True)
        )
        fz, fw = step(z), step(w)
        ratio = norm([p - q for p, q in zip(fz, fw, strict=True)]) / norm(
            [p - q for p, q in zip(z, w, strict=True)]
        )
        worst = max(worst, ratio)
    assert 0.3 < worst <= bound + 1e-5


def test_fixed_point_is_unique_and_solvers_agree():
    with jax.enable_x64(True):
        cell = to_float64(_cell((2, 3), gamma=0.5))
        inj = random_field(jr.PRNGKey(4), (2, 8, 8), jnp.complex128)

        def fn(z, u):
            return cell.step_with(cell.operator(8, 8), z, u)

        @eqx.filter_jit
        def solve(solver, z0):
            return ff.fixed_point(
                fn, z0, inj, solver=solver, max_steps=300, rtol=1e-12, atol=0.0, throw=True
            )

        starts = [cell.init_state(inj), _fields(jr.PRNGKey(5), (2, 3), 8, 8, jnp.complex128)]
        sols = [solve(ff.Naive(), starts[0]), solve(ff.Anderson(history=5), starts[1])]
        for a, b in zip(sols[0].value, sols[1].value, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
        for a, b in zip(fn(sols[0].value, inj), sols[0].value, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)
        assert int(sols[1].stats.num_steps) < int(sols[0].stats.num_steps)


@pytest.mark.parametrize("shift", [(4, 0), (4, 8), (12, 4)])
def test_translation_equivariance(shift):
    """Shifting the finest field by a multiple of `2^(scales - 1)` sites (and scale `s` by
    that over `2^s`) shifts the update the same way."""
    cell = _cell(grid=16)
    zs = _fields(jr.PRNGKey(6), CHANNELS, 16, 16)
    inj = random_field(jr.PRNGKey(7), (CHANNELS[0], 16, 16))

    def roll(zs):
        return tuple(
            jnp.roll(z, (shift[0] >> s, shift[1] >> s), axis=(1, 2)) for s, z in enumerate(zs)
        )

    step = eqx.filter_jit(cell)
    out = roll(step(zs, inj))
    (inj_shifted,) = roll((inj,))
    want = step(roll(zs), inj_shifted)
    for a, b in zip(out, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_planar_step_matches_unbatched_steps_and_per_scale_injection():
    with jax.enable_x64(True):
        cell = _cell()
        zs = _fields(jr.PRNGKey(8), CHANNELS, 8, 8, jnp.complex128, batch=(3,))
        injs = _fields(jr.PRNGKey(9), CHANNELS, 8, 8, jnp.complex128, batch=(3,))
        want = eqx.filter_jit(jax.vmap(cell))(zs, injs)
        planar = jax.jit(
            lambda zs, injs: cell.planar_step(
                cell.planar_operator(8, 8),
                tuple(ff.to_planar(z) for z in zs),
                tuple(ff.to_planar(u) for u in injs),
            )
        )(zs, injs)
        for a, b in zip(planar, want, strict=True):
            np.testing.assert_allclose(ff.from_planar(a), b, rtol=1e-6, atol=1e-6)
        # The finest injection alone is the same as zero injections at the coarser scales.
        finest = eqx.filter_jit(jax.vmap(cell))(zs, injs[0])
        zero = eqx.filter_jit(jax.vmap(cell))(zs, (injs[0], *(jnp.zeros_like(u) for u in injs[1:])))
        for a, b in zip(finest, zero, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gradient_of_fixed_point_matches_unrolled_reference():
    """Implicit gradients through a multi-scale solve against differentiating a long naive
    unroll of the same (contractive) map."""
    with jax.enable_x64(True):
        cell = to_float64(_cell((2, 3), gamma=0.5))
        inj = random_field(jr.PRNGKey(10), (2, 8, 8), jnp.complex128)
        params, static = eqx.partition(cell, eqx.is_inexact_array)

        def loss(p, adjoint):
            sol = solve_cell(eqx.combine(p, static), inj, 8, adjoint)
            return sum(jnp.sum(jnp.abs(z) ** 2 * (s + 1)) for s, z in enumerate(sol.value))

        grad = eqx.filter_jit(jax.grad(loss))
        g_imp = grad(params, ff.ImplicitAdjoint(rtol=1e-13, atol=0.0, max_steps=200))
        g_unr = grad(params, ff.UnrolledAdjoint())
        leaves = jax.tree_util.tree_leaves(g_imp)
        assert len(leaves) == 2 + 2 + 2  # convs, mixings, modReLU biases
        for a, b in zip(leaves, jax.tree_util.tree_leaves(g_unr), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible"):
        ff.MultiScaleCell((2, 2, 2), norm_grid=(6, 6), key=jr.PRNGKey(0))
    cell = _cell((2, 3))
    zs = _fields(jr.PRNGKey(0), (2, 3), 8, 8)
    with pytest.raises(ValueError, match="expects 2 fields"):
        cell(zs[:1], zs[0])
    with pytest.raises(ValueError, match="4x4 grid"):
        cell((zs[0], jnp.zeros((3, 8, 8), jnp.complex64)), zs[0])
    with pytest.raises(ValueError, match="divisible by 2"):
        cell.operator(7, 8)
    with pytest.raises(ValueError, match="scale"):
        ff.make_model("tiny", channels=(2, 3), scales=3, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="single-grid solver"):
        ff.make_model("tiny", scales=2, solver=ff.Multigrid(), key=jr.PRNGKey(0))
    model = ff.make_model("tiny", scales=2, channels=(2, 3), key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="single-grid solver"):
        model.solve(jnp.zeros((1, 8, 8)), solver=ff.Multigrid())


@pytest.mark.parametrize("batch_solve", ["per_sample", "planar"])
def test_multiscale_classifier_runs_jitted_with_tuple_state(batch_solve):
    model = ff.make_model(
        "tiny", scales=2, channels=(4, 6), batch_solve=batch_solve, key=jr.PRNGKey(0)
    )
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    logits, sol = eqx.filter_jit(lambda m, x: m.batched(x))(model, x)
    assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert [v.shape for v in sol.value] == [(3, 4, 8, 8), (3, 6, 4, 4)]
    assert bool(jnp.all(sol.result == ff.RESULTS.successful))
    # The readout sees both scales: 2x2 bins of the finest, 1x1 of the coarser.
    assert model.readout.linear.weight.shape == (10, 4 * 4 + 6 * 1)
    assert isinstance(model.cell, ff.MultiScaleCell) and model.cell.channels == (4, 6)
