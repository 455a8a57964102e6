"""Energy-based fields and equilibrium propagation."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff

C, H = 2, 5
TOL = dict(solver=ff.Naive(), max_steps=400, rtol=0.0, atol=1e-13)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _field(key):
    k1, k2 = jr.split(jr.PRNGKey(key))
    return jr.normal(k1, (C, H, H)) + 1j * jr.normal(k2, (C, H, H))


def _cell(activation="phase_tanh"):
    return ff.SymmetricCell(
        C, activation=activation, norm_grid=(H, H), dtype=jnp.complex128, key=jr.PRNGKey(0)
    )


def test_coupling_is_hermitian_and_contractive():
    cell = _cell()
    k = cell.coupling()
    a, b = _field(1), _field(2)
    np.testing.assert_allclose(jnp.vdot(a, k(b)), jnp.vdot(k(a), b), rtol=1e-12)
    assert float(k.operator_norm(H, H)) <= cell.gamma + 1e-12
    # Not the Hermitian part of anything else: the free weight itself is not symmetric.
    free = cell.conv
    assert abs(complex(jnp.vdot(a, free(b)) - jnp.vdot(free(a), b))) > 1e-3


def test_fixed_point_minimises_the_energy_also_nudged():
    fn = _cell().bind(H, H)
    inj, nudge = 0.8 * _field(3), 0.3 * _field(4)
    steps = 1e-3 * jnp.stack([_field(10 + key) for key in range(3)])

    @jax.jit
    def check(n):
        z = ff.fixed_point(lambda z, x: fn(z, x, n), jnp.zeros_like(inj), inj, **TOL).value

        def energy(z):
            return fn.energy(z, inj) + jnp.real(jnp.vdot(n, z))

        # The (conjugate) gradient vanishes, and every small step goes uphill.
        return jnp.max(jnp.abs(jax.grad(energy)(z))), jax.vmap(energy)(z + steps) - energy(z)

    for n in (jnp.zeros_like(nudge), nudge):
        grad, rises = check(n)
        assert float(grad) < 1e-9
        assert np.all(np.asarray(rises) > 0), rises


@functools.cache
def _grad(adjoint):
    w = jr.normal(jr.PRNGKey(7), (C, H, H))

    def loss(cell, inj):
        sol = ff.fixed_point(cell.bind(H, H), jnp.zeros_like(inj), inj, adjoint=adjoint, **TOL)
        return jnp.sum(w * jnp.abs(sol.value) ** 2) + jnp.sum(jnp.real(sol.value))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda cell, inj: jax.tree.leaves(eqx.filter(grad(cell, inj), eqx.is_inexact_array))


@pytest.mark.parametrize("symmetric, order", [(True, 2), (False, 1)])
def test_ep_converges_to_the_implicit_gradient(symmetric, order):
    cell, inj = _cell(), 0.8 * _field(5)
    exact = _grad(ff.ImplicitAdjoint(solver=ff.Naive(), max_steps=400, rtol=0.0, atol=1e-13))(
        cell, inj
    )
    assert len(exact) == 2  # the coupling's weight and the injection

    def error(beta):
        adj = ff.EquilibriumPropagation(beta=beta, symmetric=symmetric, rtol=0.0, atol=1e-13)
        est = _grad(adj)(cell, inj)
        pairs = zip(est, exact, strict=True)
        return max(float(jnp.linalg.norm(e - x) / jnp.linalg.norm(x)) for e, x in pairs)

    e1, e2 = error(0.1), error(0.05)
    # O(beta^2) two-sided, O(beta) one-sided: halving beta divides the error by ~4 or ~2.
    assert 0.8 * 2**order < e1 / e2 < 1.2 * 2**order, (e1, e2)
    assert e2 < (5e-3 if symmetric else 0.15), e2


def test_model_with_equilibrium_propagation():
    x = jr.normal(jr.PRNGKey(1), (2, 1, 8, 8))

    def grads(adjoint):
        model = ff.make_model(
            "tiny", symmetric=True, activation="phase_tanh", adjoint=adjoint, key=jr.PRNGKey(0)
        )
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(p, probe):
            logits, _ = eqx.combine(p, static).batched(x, stats_probe=probe)
            return jnp.mean(jax.nn.log_softmax(logits)[:, 3])

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, ff.backward_stats_probe())

    (g_ep, probe), (g_imp, _) = grads(ff.EquilibriumPropagation(rtol=1e-6)), grads(None)
    cell_ep, cell_imp = g_ep.cell.conv.weight, g_imp.cell.conv.weight
    assert float(jnp.linalg.norm(cell_ep - cell_imp)) < 0.05 * float(jnp.linalg.norm(cell_imp))
    steps, residual, failed = np.asarray(probe) / 2
    assert steps > 0 and residual < 1e-5 and failed == 0


def test_clear_errors():
    inj = _field(6)
    with pytest.raises(TypeError, match="gradient of an energy"):
        ff.fixed_point(
            lambda z, x: 0.5 * z + x, inj, inj, adjoint=ff.EquilibriumPropagation(), **TOL
        )
    with pytest.raises(ValueError, match="not symmetric"):
        ff.make_model("tiny", adjoint=ff.EquilibriumPropagation(), key=jr.PRNGKey(0))
    for act in ("cardioid", "zrelu"):
        with pytest.raises(ValueError, match="not the gradient of a potential"):
            ff.SymmetricCell(C, activation=act, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="per-sample solves only"):
        ff.make_model("tiny", symmetric=True, batch_solve="planar", key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="must be positive"):
        ff.EquilibriumPropagation(beta=0.0)
