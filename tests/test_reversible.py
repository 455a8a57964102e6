"""The reversible solver and its adjoint: exact reversal, exact gradients, flat memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fractal_field as ff


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


N = 5
BETA = 0.5


def _params(kind, seed=0, n=N, norm=0.7):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    b = rng.normal(size=n)
    if kind != "real":
        a = a + 1j * rng.normal(size=(n, n))
        b = b + 1j * rng.normal(size=n)
    return jnp.asarray(norm * a / np.linalg.norm(a, 2)), jnp.asarray(b)


def _map(z, args):
    """`tanh(A z + b)` on a vector, or on a `{"c": complex, "r": real}` pytree state."""
    a, b = args
    act = ff.phase_tanh if jnp.iscomplexobj(a) else jnp.tanh  # 1-Lipschitz
    if isinstance(z, dict):
        c = act(a @ z["c"] + b + 0.3 * z["r"])
        return {"c": c, "r": jnp.tanh(0.5 * jnp.real(a @ z["c"]) - 0.4 * z["r"])}
    return act(a @ z + b)


def _z0(kind, dtype):
    rng = np.random.default_rng(7)
    z = jnp.asarray(0.1 * rng.normal(size=N), dtype)
    return {"c": z, "r": jnp.real(z)} if kind == "pytree" else z


def _loss(value):
    leaves = jax.tree.leaves(value)
    w = jnp.arange(1.0, N + 1.0)
    return sum(jnp.sum(w * jnp.real(x)) + 0.5 * jnp.sum(jnp.abs(x) ** 2) for x in leaves)


@functools.cache
def _grad(adjoint, polish, max_steps=60):
    def loss(a, b, z0, probe):
        sol = ff.fixed_point(
            _map,
            z0,
            (a, b),
            solver=ff.Reversible(BETA),
            adjoint=adjoint,
            max_steps=max_steps,
            rtol=1e-4,
            atol=0.0,
            throw=False,
            polish=polish,
            stats_probe=probe,
        )
        return _loss(sol.value)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_undo_reconstructs_the_stored_states(kind):
    a, b = _params(kind)
    solver = ff.Reversible(BETA)
    z = _z0(kind, a.dtype)
    y, fz = solver.init(_map, z, None, (a, b)), _map(z, (a, b))
    stored = [(z, y)]
    for _ in range(12):
        z, fz, y, work = solver.step(_map, z, fz, (a, b), y)
        assert work == 2.0
        stored.append((z, y))
    scale = float(jnp.linalg.norm(z))
    eps = float(jnp.finfo(jnp.float64).eps)
    for k, (zs, ys) in enumerate(reversed(stored[:-1]), start=1):
        z, y = solver.undo(_map, z, y, (a, b))
        err = max(float(jnp.linalg.norm(z - zs)), float(jnp.linalg.norm(y - ys)))
        # Rounding, grown by at most (1 - beta)^-2 per step undone (the stated bound).
        assert err <= 10 * eps * scale / (1 - BETA) ** (2 * k), (k, err)


@pytest.mark.parametrize(
    "kind, polish", [("real", True), ("complex", False), ("complex", True), ("pytree", False)]
)
def test_gradient_equals_the_unrolled_gradient(kind, polish):
    a, b = _params(kind)
    z0 = _z0(kind, a.dtype)
    probe = ff.backward_stats_probe()
    rev = _grad(ff.ReversibleAdjoint(), polish)(a, b, z0, probe)
    unr = _grad(ff.UnrolledAdjoint(), polish)(a, b, z0, probe)
    for g_rev, g_unr in zip(rev[:2], unr[:2], strict=True):
        np.testing.assert_allclose(g_rev, g_unr, rtol=1e-10, atol=1e-12)
    # The gradient with respect to z0 (small: the iteration forgets its start).
    for g_rev, g_unr in zip(jax.tree.leaves(rev[2]), jax.tree.leaves(unr[2]), strict=True):
        np.testing.assert_allclose(g_rev, g_unr, atol=1e-9 * float(jnp.max(jnp.abs(unr[0]))))
    steps, recon, failed = np.asarray(rev[3])
    assert 5 < steps < 60 and failed == 0
    assert recon < 1e-4  # the reconstructed z0 (rounding grown backwards, see docs)
    np.testing.assert_array_equal(np.asarray(unr[3]), np.zeros(3))


def test_vmap_with_different_step_counts():
    a, b = _params("complex", seed=1)
    bs = jnp.stack([b, 0.1 * b, 3.0 * b])

    def grads(adjoint):
        def loss(a, bs):
            def one(b):
                sol = ff.fixed_point(
                    _map,
                    jnp.zeros(N, a.dtype),
                    (a, b),
                    solver=ff.Reversible(BETA),
                    adjoint=adjoint,
                    max_steps=60,
                    rtol=1e-4,
                    atol=0.0,
                    throw=False,
                )
                return _loss(sol.value), sol.stats.num_steps

            losses, steps = jax.vmap(one)(bs)
            return jnp.sum(losses), steps

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(a, bs)

    (ga, gb), steps = grads(ff.ReversibleAdjoint())
    (ua, ub), _ = grads(ff.UnrolledAdjoint())
    assert len(set(np.asarray(steps).tolist())) > 1, steps  # the samples stop apart
    np.testing.assert_allclose(ga, ua, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, ub, rtol=1e-10, atol=1e-12)


def _temp_bytes(adjoint, max_steps, n=32):
    a, b = _params("complex", seed=2, n=n, norm=0.9)

    def loss(a, b):
        sol = ff.fixed_point(
            _map,
            jnp.zeros(n, a.dtype),
            (a, b),
            solver=ff.Reversible(BETA),
            adjoint=adjoint,
            max_steps=max_steps,
            rtol=1e-30,
            atol=0.0,
            throw=False,
        )
        return _loss(sol.value[:N])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return stats.temp_size_in_bytes


def test_memory_flat_in_the_number_of_steps():
    rev = {k: _temp_bytes(ff.ReversibleAdjoint(), k) for k in (10, 200)}
    unr = {k: _temp_bytes(ff.UnrolledAdjoint(), k) for k in (10, 200)}
    assert rev[200] <= rev[10] + 1024, rev
    # 190 more steps, each storing at least the two 32-complex128 states.
    assert unr[200] >= unr[10] + 190 * 2 * 32 * 16, unr


def test_clear_errors():
    a, b = _params("real")
    with pytest.raises(TypeError, match="solver=ff.Reversible"):
        ff.fixed_point(_map, jnp.zeros(N), (a, b), adjoint=ff.ReversibleAdjoint())
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta must lie in"):
            ff.Reversible(beta)
