"""Gradients through `ff.fixed_point`: implicit, phantom, Jacobian-free and unrolled adjoints."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fractal_field as ff


@pytest.fixture(autouse=True)
def _x64():
    """float64 for this module's tests only (a global switch would leak into other modules)."""
    with jax.enable_x64(True):
        yield


# Compilation dominates on CPU: most tests use the cheap-to-compile Naive solver forward and
# backward, and share cached jitted losses (`_compiled`) so the same program compiles once.
N = 4
FWD = dict(solver=ff.Naive(), max_steps=300, rtol=0.0, atol=1e-14)
IMPLICIT = ff.ImplicitAdjoint(solver=ff.Naive(), max_steps=300, rtol=0.0, atol=1e-14)
IMPLICIT_ANDERSON = ff.ImplicitAdjoint(max_steps=300, rtol=0.0, atol=1e-14)


def _tanh_map(z, args):
    a, b = args
    return jnp.tanh(a @ z + b)


def _params(cplx, seed=0, n=N, norm=0.5):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    b = rng.normal(size=n)
    if cplx:
        a = a + 1j * rng.normal(size=(n, n))
        b = b + 1j * rng.normal(size=n)
    a = norm * a / np.linalg.norm(a, 2)
    return jnp.asarray(a), jnp.asarray(0.5 * b)


def _sq(z):
    return sum(jnp.sum(jnp.real(x * jnp.conj(x))) for x in jax.tree.leaves(z))


def _weighted_loss(z):
    # A real loss that is not rotation-invariant, so that every direction matters.
    w = jnp.arange(1.0, z.shape[-1] + 1.0)
    return jnp.sum(w * jnp.real(z)) + 0.5 * _sq(z)


def _solve(a, b, adjoint=IMPLICIT, **kw):
    kw = {**FWD, **kw}
    z0 = jnp.zeros(a.shape[-1], a.dtype)
    return ff.fixed_point(_tanh_map, z0, (a, b), adjoint=adjoint, **kw)


def _make_loss(adjoint=IMPLICIT, **kw):
    def loss(a, b):
        return _weighted_loss(_solve(a, b, adjoint, **kw).value)

    return loss


@functools.cache
def _compiled(adjoint=IMPLICIT, **kw):
    """Jitted `(loss, grad)` for a configuration, shared between tests."""
    loss = _make_loss(adjoint, **kw)
    return jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _fd_grad(f, x, eps=1e-5):
    """Central differences, returned in JAX's convention `dL/dRe - i dL/dIm` for complex x."""
    x = np.asarray(x)
    cplx = np.iscomplexobj(x)
    flat = x.reshape(-1)
    out = np.zeros(flat.shape, x.dtype)
    directions = [1.0, 1j] if cplx else [1.0]
    for i in range(flat.size):
        for d in directions:
            e = np.zeros_like(flat)
            e[i] = eps * d
            df = (
                float(f(jnp.asarray((flat + e).reshape(x.shape))))
                - float(f(jnp.asarray((flat - e).reshape(x.shape))))
            ) / (2 * eps)
            out[i] += df if d == 1.0 else -1j * df
    return out.reshape(x.shape)


def _assert_grad_close(actual, expected, rtol=1e-6):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.max(np.abs(expected))
    assert scale > 1e-3
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# ---------------------------------------------------------------------------------------
# Implicit adjoint against finite differences and against unrolling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("solver", ["naive", "anderson"])
def test_implicit_grad_args_vs_finite_differences(cplx, solver):
    a, b = _params(cplx)
    if solver == "naive":
        loss, grad = _compiled()
    else:
        loss, grad = _compiled(IMPLICIT_ANDERSON, solver=ff.Anderson())
    ga, gb = grad(a, b)
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    _assert_grad_close(ga, _fd_grad(lambda x: loss(x, b), a))
    _assert_grad_close(gb, _fd_grad(lambda x: loss(a, x), b))


def test_implicit_grad_complex_convention():
    # For a real loss L of a complex parameter A, JAX returns dL/dRe(A) - i dL/dIm(A): a step
    # along conj(grad) increases L at the first-order rate |grad|^2, a step along i*conj(grad)
    # leaves it unchanged to first order.
    a, b = _params(True, seed=5)
    loss, grad = _compiled()
    ga, gb = (np.asarray(g) for g in grad(a, b))
    for step, expected in [
        (np.conj(ga), np.sum(np.abs(ga) ** 2)),
        (1j * np.conj(ga), 0.0),
        (np.ones_like(ga), np.sum(np.real(ga))),
        (1j * np.ones_like(ga), -np.sum(np.imag(ga))),
    ]:
        h = 1e-6 / np.max(np.abs(step))
        rate = (float(loss(a + h * step, b)) - float(loss(a - h * step, b))) / (2 * h)
        np.testing.assert_allclose(rate, expected, rtol=1e-6, atol=1e-6 * np.sum(np.abs(ga) ** 2))


def test_implicit_grad_closure_vs_finite_differences():
    a, b = _params(True, seed=1)

    def loss(a_, b_):
        # Parameters enter only by closure.
        fn = lambda z, _: jnp.tanh(a_ @ z + b_)
        return _weighted_loss(
            ff.fixed_point(fn, jnp.zeros(N, a_.dtype), adjoint=IMPLICIT, **FWD).value
        )

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    loss = jax.jit(loss)
    ga, gb = grad(a, b)
    _assert_grad_close(ga, _fd_grad(lambda x: loss(x, b), a))
    _assert_grad_close(gb, _fd_grad(lambda x: loss(a, x), b))


class _TanhLayer(eqx.Module):
    a: jax.Array
    b: jax.Array
    gain: float = eqx.field(static=True, default=1.0)

    def __call__(self, z, args):
        return jnp.tanh(self.gain * (self.a @ z) + self.b + args)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_implicit_grad_module_fn_vs_finite_differences(cplx):
    a, b = _params(cplx, seed=2)
    shift = jnp.full(N, 0.1, a.dtype)

    def loss_raw(layer, shift_):
        z0 = jnp.zeros(N, a.dtype)
        sol = ff.fixed_point(layer, z0, shift_, adjoint=IMPLICIT, **FWD)
        return _weighted_loss(sol.value)

    loss = eqx.filter_jit(loss_raw)
    layer = _TanhLayer(a, b)
    g_layer, g_shift = eqx.filter_jit(jax.grad(loss_raw, argnums=(0, 1)))(layer, shift)
    assert isinstance(g_layer, _TanhLayer)
    _assert_grad_close(g_layer.a, _fd_grad(lambda x: loss(_TanhLayer(x, b), shift), a))
    _assert_grad_close(g_layer.b, _fd_grad(lambda x: loss(_TanhLayer(a, x), shift), b))
    _assert_grad_close(g_shift, _fd_grad(lambda x: loss(layer, x), shift))
    # Shift enters exactly like b.
    _assert_grad_close(g_shift, g_layer.b, rtol=1e-10)


def _tree_map_fn(z, args):
    a, b, c = args
    r, w = z["r"], z["w"]
    return {
        "r": jnp.tanh(a @ r + 0.3 * jnp.real(w) + b),
        "w": 0.5 * jnp.tanh(c * w + 0.2 * r) + 0.1j,
    }


def test_implicit_grad_mixed_pytree_state_vs_finite_differences():
    # A state with a real and a complex leaf, coupled to each other.
    a, b = _params(False, seed=3)
    c = jnp.asarray(0.4 * np.exp(1j * np.arange(N)))

    @jax.jit
    def loss(a_, b_, c_):
        z0 = {"r": jnp.zeros(N), "w": jnp.zeros(N, jnp.complex128)}
        sol = ff.fixed_point(_tree_map_fn, z0, (a_, b_, c_), adjoint=IMPLICIT, **FWD)
        return _weighted_loss(sol.value["r"]) + _weighted_loss(sol.value["w"] ** 2)

    ga, gb, gc = jax.grad(loss, argnums=(0, 1, 2))(a, b, c)
    _assert_grad_close(ga, _fd_grad(lambda x: loss(x, b, c), a))
    _assert_grad_close(gb, _fd_grad(lambda x: loss(a, x, c), b))
    _assert_grad_close(gc, _fd_grad(lambda x: loss(a, b, x), c))


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_implicit_matches_unrolled_on_long_solve(cplx):
    # A slowly contracting map: the unrolled derivative of a converged solve is the implicit one.
    a, b = _params(cplx, seed=4, norm=0.9)
    kw = dict(max_steps=400)
    g_imp = _compiled(IMPLICIT, **kw)[1](a, b)
    g_unr = _compiled(ff.UnrolledAdjoint(), **kw)[1](a, b)
    for gi, gu in zip(g_imp, g_unr, strict=True):
        _assert_grad_close(gi, gu, rtol=1e-9)


# ---------------------------------------------------------------------------------------
# Forward values; phantom and Jacobian-free gradients
# ---------------------------------------------------------------------------------------

ADJOINTS = {
    "implicit": IMPLICIT,
    "phantom": ff.PhantomAdjoint(),
    "jfb": ff.JacobianFreeAdjoint(),
    "unrolled": ff.UnrolledAdjoint(),
}


@pytest.mark.parametrize(
    "cplx, solver", [(False, ff.Anderson()), (True, ff.Naive())], ids=["real", "complex"]
)
def test_forward_identical_across_adjoints(cplx, solver):
    a, b = _params(cplx, seed=6)
    sols = {k: jax.jit(lambda a_, b_, adj=adj: _solve(a_, b_, adj, solver=solver))(a, b)
            for k, adj in ADJOINTS.items()}  # fmt: skip
    ref = sols["implicit"]
    for name, sol in sols.items():
        np.testing.assert_allclose(
            np.asarray(sol.value), np.asarray(ref.value), rtol=0, atol=1e-15, err_msg=name
        )
        assert int(sol.stats.num_steps) == int(ref.stats.num_steps), name
        assert bool(sol.result == ff.RESULTS.successful), name


def _by_hand_phantom(a, b, steps, damping):
    """`d * J_theta^T sum_{i<k} M^T^i g` with `M = (1 - d) I + d J_z`, all at z*."""
    z = _solve(a, b).value
    g = jax.grad(_weighted_loss)(z)
    _, vjp_z = jax.vjp(lambda y: _tanh_map(y, (a, b)), z)
    _, vjp_p = jax.vjp(lambda p: _tanh_map(z, p), (a, b))
    acc, v = jnp.zeros_like(g), g
    for _ in range(steps):
        acc = acc + v
        v = (1 - damping) * v + damping * vjp_z(v)[0]
    (gp,) = vjp_p(damping * acc)
    return gp


@pytest.mark.parametrize("cplx, steps, damping", [(False, 1, 1.0), (True, 3, 0.5), (False, 7, 0.8)])
def test_phantom_matches_truncated_neumann_series(cplx, steps, damping):
    a, b = _params(cplx, seed=7)
    adj = ff.PhantomAdjoint(steps=steps, damping=damping)
    g = _compiled(adj)[1](a, b)
    expected = _by_hand_phantom(a, b, steps, damping)
    for gi, ei in zip(g, expected, strict=True):
        _assert_grad_close(gi, ei, rtol=1e-10)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_jacobian_free_is_one_step_formula(cplx):
    a, b = _params(cplx, seed=8)
    g = _compiled(ff.JacobianFreeAdjoint())[1](a, b)
    z = _solve(a, b).value
    ct = jax.grad(_weighted_loss)(z)
    _, vjp_p = jax.vjp(lambda p: _tanh_map(z, p), (a, b))
    (expected,) = vjp_p(ct)  # J_theta^T g
    for gi, ei in zip(g, expected, strict=True):
        _assert_grad_close(gi, ei, rtol=1e-10)


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_phantom_approaches_implicit_as_steps_grow(damping):
    # Documented approximation: the error decays like ||(1 - d) I + d J||^k. Kept to k <= 20:
    # PhantomAdjoint unrolls its steps in Python and k = 50 takes 15-30 s to compile on CPU.
    a, b = _params(False, seed=9, norm=0.3)
    g_imp = _compiled()[1](a, b)

    def err(adj):
        g = _compiled(adj)[1](a, b)
        return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(g, g_imp, strict=True))

    errors = [err(ff.PhantomAdjoint(steps=k, damping=damping)) for k in (1, 5, 20)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    contraction = 1 - damping + damping * 0.3
    assert errors[-1] < 10 * contraction**19 * errors[0], errors
    assert errors[-1] < 1e-3 * errors[0], errors
    if damping == 1.0:
        # Jacobian-free is the one-step phantom gradient, not the exact gradient.
        assert err(ff.JacobianFreeAdjoint()) == errors[0]
        assert errors[0] > 1e-3


# ---------------------------------------------------------------------------------------
# Gradient w.r.t. z0, vmap, jit
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["implicit", "phantom", "jfb"])
def test_grad_wrt_z0_is_zero(name):
    a, b = _params(True, seed=10)

    def loss(z0):
        sol = ff.fixed_point(_tanh_map, z0, (a, b), adjoint=ADJOINTS[name], **FWD)
        return _weighted_loss(sol.value)

    z0 = jnp.asarray(np.linspace(-0.5, 0.5, N) + 0.3j)
    g = jax.jit(jax.grad(loss))(z0)
    np.testing.assert_array_equal(np.asarray(g), np.zeros(N))


def test_grad_under_vmap_and_jit_matches_per_sample():
    a, _ = _params(False, seed=11)
    bs = jnp.asarray(np.random.default_rng(11).normal(size=(5, N)))
    bs = bs.at[3].multiply(4.0)  # a harder sample (tanh saturates less nicely)
    loss = _make_loss()
    grad = jax.grad(loss, argnums=(0, 1))
    ga, gb = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(a, bs)
    for i in range(bs.shape[0]):
        ea, eb = _compiled()[1](a, bs[i])
        _assert_grad_close(ga[i], ea, rtol=1e-10)
        _assert_grad_close(gb[i], eb, rtol=1e-10)
    # Gradient of a batch-summed loss is the sum of per-sample gradients.
    gsum = jax.jit(jax.grad(lambda a_: jnp.sum(jax.vmap(loss, in_axes=(None, 0))(a_, bs))))(a)
    _assert_grad_close(gsum, jnp.sum(ga, axis=0), rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Backward-solve statistics and failures
# ---------------------------------------------------------------------------------------


def _probe_loss(adjoint, **kw):
    def loss(a, b, probe):
        z0 = jnp.zeros(a.shape[-1], a.dtype)
        sol = ff.fixed_point(
            _tanh_map, z0, (a, b), adjoint=adjoint, stats_probe=probe, **{**FWD, **kw}
        )
        return _weighted_loss(sol.value)

    return loss


def test_backward_stats_probe_success():
    a, b = _params(True, seed=12)
    probe = ff.backward_stats_probe()
    assert probe.shape == (3,) and np.all(np.asarray(probe) == 0)
    adj = ff.ImplicitAdjoint(solver=ff.Naive(), rtol=1e-8, atol=0.0)
    loss = _probe_loss(adj)
    value, (ga, gp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))(a, b, probe)
    # The probe does not change the loss or the other gradients.
    value0, ga0 = jax.jit(jax.value_and_grad(_probe_loss(adj), argnums=0))(a, b, None)
    assert float(value) == float(value0)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(ga0))
    num_steps, rel_res, failed = (float(x) for x in gp)
    assert num_steps >= 1 and num_steps == int(num_steps)
    assert 0 <= rel_res <= 1e-8
    assert failed == 0.0


def test_backward_stats_probe_summed_over_vmap():
    a, _ = _params(False, seed=13)
    bs = jnp.asarray(np.random.default_rng(13).normal(size=(4, N))) * jnp.array(
        [[0.1], [1], [3], [6]]
    )
    probe = ff.backward_stats_probe()
    loss = _probe_loss(IMPLICIT)
    per_sample = [jax.jit(jax.grad(loss, argnums=2))(a, bs[i], probe) for i in range(4)]
    steps = [float(p[0]) for p in per_sample]
    assert all(s > 0 for s in steps)
    batched = jax.jit(
        jax.grad(lambda p: jnp.sum(jax.vmap(loss, in_axes=(None, 0, None))(a, bs, p)))
    )(probe)
    np.testing.assert_allclose(float(batched[0]), sum(steps), rtol=0, atol=1e-6)
    # Relative residuals are at round-off level here; their sum agrees up to round-off.
    np.testing.assert_allclose(
        float(batched[1]), sum(float(p[1]) for p in per_sample), rtol=1e-5, atol=1e-13
    )
    assert float(batched[1]) <= 4 * IMPLICIT.rtol + 4e-13
    assert float(batched[2]) == 0.0


def test_other_adjoints_leave_probe_zero():
    a, b = _params(False, seed=14)
    for adj in (ff.PhantomAdjoint(), ff.JacobianFreeAdjoint(), ff.UnrolledAdjoint()):
        gp = jax.grad(_probe_loss(adj, max_steps=50), argnums=2)(a, b, ff.backward_stats_probe())
        np.testing.assert_array_equal(np.asarray(gp), np.zeros(3))


def test_implicit_backward_failure_raises():
    a, b = _params(False, seed=15, norm=0.9)
    adj = ff.ImplicitAdjoint(max_steps=1, throw=True)
    loss = _make_loss(adj)
    # The forward solve alone is fine.
    assert np.isfinite(float(loss(a, b)))
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(a, b))


def test_implicit_backward_failure_reported_without_throw():
    a, b = _params(False, seed=15, norm=0.9)
    probe = ff.backward_stats_probe()
    adj = ff.ImplicitAdjoint(solver=ff.Naive(), max_steps=1, throw=False)
    ga, gp = jax.jit(jax.grad(_probe_loss(adj), argnums=(0, 2)))(a, b, probe)
    assert np.all(np.isfinite(np.asarray(ga)))  # best-effort gradient is returned
    assert float(gp[0]) == 1.0  # one backward step
    assert float(gp[1]) > IMPLICIT.rtol
    assert float(gp[2]) > 0  # failed
    # Under vmap the failures are counted per sample.
    bs = jnp.stack([b, 2 * b, -b])
    gpb = jax.jit(
        jax.grad(lambda p: jnp.sum(jax.vmap(_probe_loss(adj), in_axes=(None, 0, None))(a, bs, p)))
    )(probe)
    assert float(gpb[2]) == 3.0


# ---------------------------------------------------------------------------------------
# Memory: the implicit adjoint does not store the forward iterations
# ---------------------------------------------------------------------------------------


def _temp_bytes(adjoint, max_steps, n=32):
    a, b = _params(False, seed=16, n=n, norm=0.9)
    loss = _make_loss(adjoint, max_steps=max_steps, rtol=1e-30, atol=0.0, throw=False)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return stats.temp_size_in_bytes


def test_memory_implicit_constant_unrolled_grows():
    imp = {k: _temp_bytes(IMPLICIT, k) for k in (10, 200)}
    unr = {k: _temp_bytes(ff.UnrolledAdjoint(), k) for k in (10, 200)}
    assert imp[200] <= imp[10] + 1024, imp
    # 190 more steps each storing at least the 32-float64 iterate.
    assert unr[200] >= unr[10] + 190 * 32 * 8, unr
    assert unr[200] > 2 * imp[200], (imp, unr)


# ---------------------------------------------------------------------------------------
# Partially differentiable inputs and outputs
# ---------------------------------------------------------------------------------------


def _two_leaf_map(z, args):
    a, b, k = args  # k: an integer array, not differentiable
    return {"x": jnp.tanh(a @ z["x"] + k * b), "y": 0.5 * z["y"] + z["x"]}


@pytest.mark.parametrize("adjoint", [IMPLICIT, ff.UnrolledAdjoint()], ids=["implicit", "unrolled"])
def test_integer_args_and_single_leaf_loss(adjoint):
    a, b = _params(False, seed=17)
    k = jnp.array(2)

    @jax.jit
    def loss(a_, b_):
        z0 = {"x": jnp.zeros(N), "y": jnp.zeros(N)}
        sol = ff.fixed_point(_two_leaf_map, z0, (a_, b_, k), adjoint=adjoint, **FWD)
        return _weighted_loss(sol.value["y"])  # the "x" leaf gets no direct cotangent

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    _assert_grad_close(ga, _fd_grad(lambda x: loss(x, b), a))
    _assert_grad_close(gb, _fd_grad(lambda x: loss(a, x), b))


def test_loss_of_stats_only_has_zero_gradient():
    a, b = _params(False, seed=18)
    g = jax.jit(jax.grad(lambda a_: _solve(a_, b).stats.residual))(a)
    np.testing.assert_array_equal(np.asarray(g), np.zeros_like(a))
