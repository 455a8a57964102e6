"""The expanded fractal cell: `z <- (1-a) z + a act(K act_h(E z) + injection)`."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import pytest
from _reference import (
    np_conv_norm,
    np_correlate,
    np_crelu,
    np_modrelu,
    random_field,
    solve_cell,
    to_float64,
)

import fractal_field as ff
from fractal_field._checkpoint import save_checkpoint
from fractal_field._train import build_model

C, HIDDEN, GRID = 3, 5, 8


@functools.cache
def _cell(hidden_activation="modrelu", gamma=0.9, dtype=jnp.complex64):
    """An expanded cell with active (negative) modReLU biases and large raw kernels, so that
    both rescalings and both nonlinearities matter. Built once per argument set."""
    cell = ff.FractalCell(
        C,
        hidden=HIDDEN,
        hidden_activation=hidden_activation,
        gamma=gamma,
        norm_grid=(GRID, GRID),
        key=jr.PRNGKey(0),
    )
    cell = eqx.tree_at(lambda c: c.act.bias, cell, -0.3 * jnp.arange(1, C + 1, dtype=jnp.float32))
    if hidden_activation == "modrelu":
        bias = -0.2 * jnp.arange(HIDDEN, dtype=jnp.float32)
        cell = eqx.tree_at(lambda c: c.hidden_act.bias, cell, bias)
    cell = eqx.tree_at(lambda c: c.expand.conv.weight, cell, cell.expand.conv.weight * 5)
    cell = eqx.tree_at(lambda c: c.conv.conv.weight, cell, cell.conv.conv.weight * 5)
    return to_float64(cell) if dtype == jnp.complex128 else cell


def _np_step(cell, z, inj):
    z = np.asarray(z, complex)
    h, w = z.shape[1:]
    e = np.asarray(cell.expand.conv.weight[0], complex)
    k = np.asarray(cell.conv.conv.weight[0], complex)
    e = e * min(1.0, 1.0 / np_conv_norm(e, GRID, GRID))
    k = k * min(1.0, cell.conv.gamma / np_conv_norm(k, GRID, GRID))
    hid = np_correlate(e, z)
    if cell.hidden_act_name == "modrelu":
        hid = np_modrelu(hid, np.asarray(cell.hidden_act.bias))
    else:
        hid = np_crelu(hid)
    y = np_correlate(k, hid) + np.asarray(inj, complex)
    a = cell.alpha()
    return (1 - a) * z + a * np_modrelu(y, np.asarray(cell.act.bias))


@pytest.mark.parametrize("hidden_activation", ["modrelu", "crelu"])
def test_step_matches_independent_reference(hidden_activation):
    cell = _cell(hidden_activation)
    assert cell.hidden == HIDDEN and cell.channels == C
    z = random_field(jr.PRNGKey(1), (C, GRID, GRID))
    inj = random_field(jr.PRNGKey(2), (C, GRID, GRID))
    want = _np_step(cell, z, inj)
    step = eqx.filter_jit(lambda c, z, u: c.step_with(c.operator(GRID, GRID), z, u))
    np.testing.assert_allclose(step(cell, z, inj), want, rtol=1e-4, atol=1e-5)
    # The resolution-agnostic call (what Multigrid uses) is the same map.
    agnostic = eqx.filter_jit(lambda c, z, u: c.normalized()(z, u))
    np.testing.assert_allclose(agnostic(cell, z, inj), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden_activation", ["modrelu", "cardioid"])
def test_certified_contraction(hidden_activation):
    """`lipschitz_bound` multiplies both convolutions' norms and both activations' constants,
    stays at most `(1 - a) + a Lip(act) Lip(act_h) gamma`, and bounds observed ratios."""
    cell = _cell(hidden_activation, gamma=0.8)
    bound = float(cell.lipschitz_bound(GRID, GRID))
    a = cell.alpha()
    lip_h = ff.LIPSCHITZ[hidden_activation]
    assert bound <= (1 - a) + a * lip_h * 0.8 + 1e-5
    e_norm = float(cell.expand.lipschitz_bound(GRID, GRID))
    k_norm = float(cell.conv.lipschitz_bound(GRID, GRID))
    np.testing.assert_allclose(bound, (1 - a) + a * lip_h * e_norm * k_norm, rtol=1e-6)
    np.testing.assert_allclose([e_norm, k_norm], [1.0, 0.8], rtol=1e-4)  # both rescaled
    inj = random_field(jr.PRNGKey(3), (C, GRID, GRID))
    za = random_field(jr.PRNGKey(4), (32, C, GRID, GRID))
    dz = random_field(jr.PRNGKey(5), (32, C, GRID, GRID))
    dz = dz * jnp.where(jnp.arange(32) % 2, 1e-2, 1.0)[:, None, None, None]
    step = eqx.filter_jit(jax.vmap(lambda z: cell(z, inj)))
    num = jnp.linalg.norm((step(za) - step(za + dz)).reshape(32, -1), axis=1)
    ratio = num / jnp.linalg.norm(dz.reshape(32, -1), axis=1)
    assert 0.3 < float(ratio.max()) <= bound + 1e-5


def test_planar_step_matches_unbatched_steps():
    with jax.enable_x64(True):
        cell = _cell(dtype=jnp.complex128)
        z = random_field(jr.PRNGKey(6), (4, C, GRID, GRID), jnp.complex128)
        inj = random_field(jr.PRNGKey(7), (4, C, GRID, GRID), jnp.complex128)

        @eqx.filter_jit
        def both(c, z, u):
            op = c.operator(GRID, GRID)
            want = jax.vmap(lambda z, u: c.step_with(op, z, u))(z, u)
            got = c.planar_step(c.planar_operator(GRID, GRID), ff.to_planar(z), ff.to_planar(u))
            return ff.from_planar(got), want

        got, want = both(cell, z, inj)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_fixed_point_gradient_matches_unrolled_reference():
    """Implicit gradients (expansion, projection, both activations' biases) against
    differentiating a long naive unroll of the same contraction."""
    with jax.enable_x64(True):
        cell = _cell(gamma=0.5, dtype=jnp.complex128)
        inj = random_field(jr.PRNGKey(8), (C, GRID, GRID), jnp.complex128)
        params, static = eqx.partition(cell, eqx.is_inexact_array)

        def loss(p, adjoint):
            sol = solve_cell(eqx.combine(p, static), inj, GRID, adjoint)
            return jnp.sum(jnp.abs(sol.value) ** 2 * jnp.arange(1, C + 1)[:, None, None])

        grad = eqx.filter_jit(jax.grad(loss))
        g_imp = grad(params, ff.ImplicitAdjoint(rtol=1e-13, atol=0.0, max_steps=200))
        g_unr = grad(params, ff.UnrolledAdjoint())
        leaves = jax.tree_util.tree_leaves(g_imp)
        assert len(leaves) == 4  # expansion, projection, two modReLU biases
        for a, b in zip(leaves, jax.tree_util.tree_leaves(g_unr), strict=True):
            assert float(jnp.max(jnp.abs(b))) > 0
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_unexpanded_cell_keeps_its_initial_weights():
    """`hidden=0` draws the same weights as before the option existed (shipped checkpoints
    and seeded runs stay reproducible); the expansion draws its own."""
    key = jr.PRNGKey(3)
    plain = ff.FractalCell(C, key=key)
    want = ff.ContractiveToroidalConv(C, C, key=jr.split(key)[0]).conv.weight
    np.testing.assert_array_equal(plain.conv.conv.weight, want)
    assert plain.expand is None and plain.hidden == 0
    arrays = jax.tree_util.tree_leaves(eqx.filter(plain, eqx.is_array))
    assert len(arrays) == 2  # the convolution, the modReLU bias


def test_classifier_with_expanded_cell_agrees_across_batch_modes_and_reloads(tmp_path):
    """(With a readout head too: both widen the model and both must survive a checkpoint.)"""

    def config(batch_solve):
        model = dict(
            preset="tiny",
            hidden=8,
            hidden_activation="crelu",
            readout_hidden=6,
            batch_solve=batch_solve,
        )
        return ml_collections.ConfigDict(
            dict(
                model=model,
                solver=dict(name="anderson", history=5),
                adjoint=dict(name="implicit"),
                epochs=1,
                optim=dict(lr=1e-3, warmup_epochs=0.0, weight_decay=0.0, clip=1.0),
            )
        )

    model = build_model(config("planar"), key=jr.PRNGKey(0))
    assert model.cell.hidden == 8 and model.cell.hidden_act_name == "crelu"
    assert model.readout.heads[0].weight.shape == (6, 4)
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    fwd = eqx.filter_jit(lambda m, x: m.batched(x, rtol=1e-5, max_steps=60))
    planar, sol = fwd(model, x)
    assert bool(jnp.all(sol.result == ff.RESULTS.successful))
    per_sample, _ = fwd(build_model(config("per_sample"), key=jr.PRNGKey(0)), x)
    np.testing.assert_allclose(planar, per_sample, rtol=1e-3, atol=1e-4)
    # A checkpoint rebuilds the expanded model from its config.
    model = jax.tree_util.tree_map(lambda p: p + 0.01 if eqx.is_inexact_array(p) else p, model)
    path = tmp_path / "model.eqx"
    save_checkpoint(path, model, {"config": config("planar").to_dict()})
    loaded = ff.load_model(path)
    np.testing.assert_array_equal(fwd(loaded, x)[0], fwd(model, x)[0])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden=-1"):
        ff.FractalCell(C, hidden=-1, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="Unknown activation 'relu'"):
        ff.FractalCell(C, hidden=4, hidden_activation="relu", key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"hidden=8\) is an option of a single field"):
        ff.make_model("tiny", scales=2, hidden=8, key=jr.PRNGKey(0))


def _np_group_norm(z, groups, gain, bias, eps=1e-5):
    """Complex group normalisation of one `(c, h, w)` field, written out group by group."""
    z = np.asarray(z, complex)
    out = np.empty_like(z)
    size = z.shape[0] // groups
    for g in range(groups):
        block = z[g * size : (g + 1) * size]
        centred = block - block.mean()
        out[g * size : (g + 1) * size] = centred / np.sqrt(np.mean(np.abs(centred) ** 2) + eps)
    return out * np.asarray(gain)[:, None, None] + np.asarray(bias)[:, None, None]


def _group_norm(channels=6, groups=3):
    norm = ff.ComplexGroupNorm(channels, groups)
    gain = 0.5 + jnp.arange(channels, dtype=jnp.float32) / channels
    bias = random_field(jr.PRNGKey(20), (channels,))
    return eqx.tree_at(lambda n: (n.gain, n.bias), norm, (gain, bias))


def test_group_norm_matches_reference_in_both_layouts():
    norm = _group_norm()
    z = 3.0 * random_field(jr.PRNGKey(21), (4, 6, 5, 7)) + (1 - 2j)
    want = np.stack([_np_group_norm(zi, 3, norm.gain, norm.bias) for zi in z])
    np.testing.assert_allclose(jax.vmap(norm)(z), want, rtol=1e-5, atol=1e-5)
    planar = ff.from_planar(norm.planar(ff.to_planar(z)))
    np.testing.assert_allclose(planar, want, rtol=1e-5, atol=1e-5)


def test_group_norm_equivariance_and_invariance():
    """Translation-equivariant on the torus; blind to each group's own scale and offset (which
    is what removes the contraction certificate); a group's phase passes through."""
    norm = _group_norm()
    z = random_field(jr.PRNGKey(22), (6, 8, 8))
    shift = lambda f: jnp.roll(f, (3, -2), axis=(1, 2))  # noqa: E731
    np.testing.assert_allclose(norm(shift(z)), shift(norm(z)), rtol=1e-5, atol=1e-6)
    per_group = lambda *v: jnp.repeat(jnp.array(v), 2)[:, None, None]  # noqa: E731
    scaled = z * per_group(2.5, 0.5, 4.0) + per_group(1 + 1j, -2.0, 0.3j)
    np.testing.assert_allclose(norm(scaled), norm(z), rtol=1e-4, atol=1e-5)
    phase = per_group(jnp.exp(0.7j), 1j, -1.0)
    unbiased = eqx.tree_at(lambda n: n.bias, norm, jnp.zeros_like(norm.bias))
    np.testing.assert_allclose(unbiased(z * phase), unbiased(z) * phase, rtol=1e-4, atol=1e-5)


def test_normalised_cell_fixed_point_and_gradient():
    """A group-normalised cell (no certificate): `lipschitz_bound` says so; where the iteration
    converges, the fixed point satisfies the update (planar layout too) and the implicit
    gradients (including the norm's gain and bias) match a differentiated naive unroll."""
    with jax.enable_x64(True):
        cell = ff.FractalCell(C, norm_groups=1, norm_grid=(GRID, GRID), key=jr.PRNGKey(23))
        cell = to_float64(cell)
        assert float(cell.lipschitz_bound(GRID, GRID)) == np.inf
        inj = random_field(jr.PRNGKey(24), (C, GRID, GRID), jnp.complex128)
        params, static = eqx.partition(cell, eqx.is_inexact_array)

        def loss(p, adjoint):
            sol = solve_cell(eqx.combine(p, static), inj, GRID, adjoint)
            return jnp.sum(jnp.abs(sol.value) ** 2 * jnp.arange(1, C + 1)[:, None, None]), sol

        implicit = ff.ImplicitAdjoint(rtol=1e-13, atol=0.0, max_steps=200)
        grad = eqx.filter_jit(jax.grad(loss, has_aux=True))
        g_imp, sol = grad(params, implicit)
        g_unr, _ = grad(params, ff.UnrolledAdjoint())
        assert int(sol.result._value) == int(ff.RESULTS.successful._value)
        z = sol.value
        step = cell.step_with(cell.operator(GRID, GRID), z, inj)
        np.testing.assert_allclose(step, z, rtol=1e-10, atol=1e-11)
        planar = cell.planar_step(
            cell.planar_operator(GRID, GRID), ff.to_planar(z[None]), ff.to_planar(inj[None])
        )
        np.testing.assert_allclose(ff.from_planar(planar)[0], z, rtol=1e-10, atol=1e-11)
        leaves = jax.tree_util.tree_leaves(g_imp)
        assert len(leaves) == 4  # the convolution, the modReLU bias, the norm's gain and bias
        for a, b in zip(leaves, jax.tree_util.tree_leaves(g_unr), strict=True):
            assert float(jnp.max(jnp.abs(b))) > 0
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_norm_errors_name_the_problem():
    with pytest.raises(ValueError, match="groups must be a positive divisor"):
        ff.ComplexGroupNorm(6, 4)
    with pytest.raises(ValueError, match="norm_groups=-1"):
        ff.FractalCell(C, norm_groups=-1, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"norm_groups=2\) is an option of a single field"):
        ff.make_model("tiny", scales=2, norm_groups=2, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"expects a field \(6, h, w\)"):
        _group_norm()(jnp.zeros((4, 5, 5), jnp.complex64))
    with pytest.raises(ValueError, match=r"planar fields \(2, h, w, 6, b\)"):
        _group_norm().planar(jnp.zeros((2, 5, 5, 4, 1)))


def test_smoothing_interval_of_the_binomial_cell():
    """The binomial 3x3 average has symbol `b(kx) b(ky)`, `b = (1 + cos) / 2`, which is at most
    1/2 and at least 0 where one frequency is at least a quarter of the grid: with relaxation
    `a = 0.5` the smoother must damp `mu = a (1 - lambda)` in `[0.25, 0.5]`."""
    cell = ff.InpaintField(2, alpha=0.5, init_noise=0.0, key=jax.random.PRNGKey(0)).cell
    np.testing.assert_allclose(cell.smoothing_interval(16), (0.25, 0.5), atol=1e-6)
    expanded = ff.FractalCell(2, hidden=4, key=jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="no expansion layer"):
        expanded.smoothing_interval()
    with pytest.raises(ValueError, match="multiple of 4"):
        cell.smoothing_interval(10)
