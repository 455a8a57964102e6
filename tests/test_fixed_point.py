"""Forward behaviour of `ff.fixed_point`: values, stopping, statistics and failure modes.

Compilation dominates the run time on CPU, so most solves go through one shared
`eqx.filter_jit(ff.fixed_point)` with module-level maps and data passed as `args`: repeated
problems of the same shape hit the compilation cache.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fractal_field as ff

# The parametrisations below build float64 data at collection time, so float64 is switched on
# for the whole process; the rest of the library is dtype-explicit and unaffected.
jax.config.update("jax_enable_x64", True)


DOTTIE = 0.739085133215160641655312087673873404013411758900757464965
TIGHT = dict(rtol=0.0, atol=1e-12)
SOLVE = eqx.filter_jit(ff.fixed_point)

SOLVERS = {
    "naive": ff.Naive(),
    "naive_damped": ff.Naive(damping=0.5),
    "anderson_complex": ff.Anderson(),
    "anderson_real": ff.Anderson(coefficients="real"),
    "broyden": ff.Broyden(),
}
SOLVER_PARAMS = pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))


def _is(result, code):
    return np.asarray(result == code)


def _matrix(rng, n, norm, cplx):
    a = rng.normal(size=(n, n))
    if cplx:
        a = a + 1j * rng.normal(size=(n, n))
    return norm * a / np.linalg.norm(a, 2)


def _vector(rng, shape, cplx):
    v = rng.normal(size=shape)
    if cplx:
        v = v + 1j * rng.normal(size=shape)
    return v


def _linear(z, args):
    a, b = args
    return a @ z + b


def _linear_tree(z, args):
    (ar, br), (ac, bc) = args
    m = bc.shape[0]
    return {"r": ar @ z["r"] + br, "c": (ac @ z["c"].reshape(-1)).reshape(m, m) + bc}


def _affine(z, args):
    a, b = args
    return a * z + b


def _cos(z, _):
    return jnp.cos(z)


def _babylon(z, _):
    return 0.5 * (z + 2.0 / z)


def _linear_problem(kind, rng, norm=0.6):
    """(fn, z0, args, expected) for `z = A z + b` with a known solution."""
    if kind in ("real", "complex"):
        cplx = kind == "complex"
        n = 6
        a, b = _matrix(rng, n, norm, cplx), _vector(rng, n, cplx)
        expected = np.linalg.solve(np.eye(n) - a, b)
        return _linear, jnp.zeros(n, a.dtype), (jnp.asarray(a), jnp.asarray(b)), expected
    # A pytree state: a real vector and a complex matrix.
    n, m = 4, 3
    ar, br = _matrix(rng, n, norm, False), _vector(rng, n, False)
    ac, bc = _matrix(rng, m * m, norm, True), _vector(rng, (m, m), True)
    expected = {
        "r": np.linalg.solve(np.eye(n) - ar, br),
        "c": np.linalg.solve(np.eye(m * m) - ac, bc.reshape(-1)).reshape(m, m),
    }
    z0 = {"r": jnp.zeros(n), "c": jnp.zeros((m, m), jnp.complex128)}
    args = ((jnp.asarray(ar), jnp.asarray(br)), (jnp.asarray(ac), jnp.asarray(bc)))
    return _linear_tree, z0, args, expected


def _assert_tree_close(actual, expected, tol):
    la, le = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(la) == len(le)
    for a, e in zip(la, le, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=tol)


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.abs(np.asarray(x)) ** 2) for x in jax.tree.leaves(tree))))


def _residual(fn, z, args):
    return _norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), fn(z, args), z))


# ---------------------------------------------------------------------------------------
# Known fixed points (and the statistics of those solves)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["real", "complex", "pytree"])
@SOLVER_PARAMS
def test_linear_map_matches_linear_solve(kind, solver):
    fn, z0, args, expected = _linear_problem(kind, np.random.default_rng(0))
    sol = SOLVE(fn, z0, args, solver=solver, max_steps=500, **TIGHT)
    assert _is(sol.result, ff.RESULTS.successful)
    _assert_tree_close(sol.value, expected, 1e-10)
    # Structure and dtypes of z0 are kept.
    assert jax.tree.structure(sol.value) == jax.tree.structure(z0)
    for v, z in zip(jax.tree.leaves(sol.value), jax.tree.leaves(z0), strict=True):
        assert v.dtype == z.dtype and v.shape == z.shape
    n = int(sol.stats.num_steps)
    assert 0 < n < 500
    # Stats agree with an independent recomputation at the last iterate, which
    # `polish=False` returns; the default returns its image, closer to the fixed point.
    last = SOLVE(fn, z0, args, solver=solver, max_steps=500, polish=False, **TIGHT)
    assert int(last.stats.num_steps) == n
    res = _residual(fn, last.value, args)
    fnorm = _norm(fn(last.value, args))
    np.testing.assert_allclose(float(sol.stats.residual), res, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(float(sol.stats.relative_residual), res / fnorm, rtol=1e-6)
    assert float(sol.stats.residual) <= 1e-12
    _assert_tree_close(sol.value, fn(last.value, args), 1e-14)
    # (Broyden can land exactly on the fixed point of a small linear map: then both are 0.)
    assert _residual(fn, sol.value, args) < res or res == 0.0
    # One map evaluation before the loop plus one per step.
    assert float(sol.stats.num_fn_evals) == n + 1
    assert sol.stats.residual_trace is None and sol.stats.trajectory is None


@SOLVER_PARAMS
def test_linear_map_other_data_reuses_solver(solver):
    # Several random problems through the same compiled solve.
    for seed in range(1, 4):
        fn, z0, args, expected = _linear_problem("complex", np.random.default_rng(seed))
        sol = SOLVE(fn, z0, args, solver=solver, max_steps=500, polish=False, **TIGHT)
        assert _is(sol.result, ff.RESULTS.successful)
        np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=0, atol=1e-10)
        assert float(sol.stats.residual) <= 1e-12
        fnorm = _norm(fn(sol.value, args))
        np.testing.assert_allclose(
            float(sol.stats.relative_residual), _residual(fn, sol.value, args) / fnorm, rtol=1e-6
        )


@SOLVER_PARAMS
@pytest.mark.parametrize(
    "fn, z0, root",
    [(_cos, 1.0, DOTTIE), (_babylon, 1.0, np.sqrt(2.0)), (_babylon, 5.0, np.sqrt(2.0))],
    ids=["dottie", "sqrt2_from_1", "sqrt2_from_5"],
)
def test_scalar_nonlinear_roots(fn, z0, root, solver):
    sol = SOLVE(fn, jnp.array(z0), solver=solver, max_steps=1000, rtol=0.0, atol=1e-14)
    assert _is(sol.result, ff.RESULTS.successful)
    assert sol.value.shape == () and sol.value.dtype == jnp.float64
    np.testing.assert_allclose(float(sol.value), root, rtol=0, atol=1e-12)


def test_float32_state_keeps_dtype():
    sol = SOLVE(_cos, jnp.ones(3, jnp.float32), rtol=1e-6, atol=0.0)
    assert sol.value.dtype == jnp.float32
    assert sol.stats.residual.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sol.value), DOTTIE, rtol=1e-5)


def test_eager_call_matches_jit():
    fn, z0, args, expected = _linear_problem("complex", np.random.default_rng(0))
    eager = ff.fixed_point(fn, z0, args, solver=ff.Naive(), max_steps=500, **TIGHT)
    jitted = SOLVE(fn, z0, args, solver=ff.Naive(), max_steps=500, **TIGHT)
    assert int(eager.stats.num_steps) == int(jitted.stats.num_steps)
    np.testing.assert_allclose(np.asarray(eager.value), np.asarray(jitted.value), atol=1e-14)
    np.testing.assert_allclose(np.asarray(eager.value), expected, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Anderson: complex vs real split, acceleration
# ---------------------------------------------------------------------------------------


def _nonholomorphic(z, args):
    # Uses |z| and conj(z): only R-linear structure is shared with the real split.
    a, b = args
    w = a @ z + b
    return jnp.tanh(jnp.abs(w)) * w / (1.0 + jnp.abs(w)) + 0.1 * jnp.conj(z)


def _nonholomorphic_split(zs, args):
    re, im = zs
    w = _nonholomorphic(re + 1j * im, args)
    return (jnp.real(w), jnp.imag(w))


def _nonholomorphic_problem(seed, n=5):
    rng = np.random.default_rng(seed)
    args = (jnp.asarray(_matrix(rng, n, 0.7, True)), jnp.asarray(_vector(rng, n, True)))
    return args, jnp.asarray(0.1 * _vector(rng, n, True))


@pytest.mark.parametrize("history", [1, 5])
def test_anderson_real_coefficients_equal_real_split(history):
    kw = dict(max_steps=200, rtol=0.0, atol=1e-9, residual_trace=True)
    solver = ff.Anderson(history=history, coefficients="real")
    for seed in range(3):
        args, z0 = _nonholomorphic_problem(seed)
        sol_c = SOLVE(_nonholomorphic, z0, args, solver=solver, **kw)
        zs = (jnp.real(z0), jnp.imag(z0))
        sol_s = SOLVE(_nonholomorphic_split, zs, args, solver=solver, **kw)
        assert _is(sol_c.result, ff.RESULTS.successful)
        assert _is(sol_s.result, ff.RESULTS.successful)
        assert int(sol_c.stats.num_steps) == int(sol_s.stats.num_steps), seed
        split_value = sol_s.value[0] + 1j * sol_s.value[1]
        np.testing.assert_allclose(np.asarray(sol_c.value), np.asarray(split_value), atol=1e-10)
        # The whole residual history agrees, not only the end point.
        n = int(sol_c.stats.num_steps) + 1
        np.testing.assert_allclose(
            np.asarray(sol_c.stats.residual_trace[:n]),
            np.asarray(sol_s.stats.residual_trace[:n]),
            rtol=1e-6,
            atol=1e-11,
        )


def test_anderson_complex_coefficients_same_fixed_point():
    kw = dict(max_steps=300, rtol=0.0, atol=1e-12)
    for seed in range(2):
        args, z0 = _nonholomorphic_problem(seed)
        sol_c = SOLVE(_nonholomorphic, z0, args, solver=ff.Anderson(), **kw)
        zs = (jnp.real(z0), jnp.imag(z0))
        sol_s = SOLVE(_nonholomorphic_split, zs, args, solver=ff.Anderson(), **kw)
        assert _is(sol_c.result, ff.RESULTS.successful)
        assert _is(sol_s.result, ff.RESULTS.successful)
        split_value = sol_s.value[0] + 1j * sol_s.value[1]
        np.testing.assert_allclose(np.asarray(sol_c.value), np.asarray(split_value), atol=1e-10)
        assert _residual(_nonholomorphic, sol_c.value, args) <= 1e-12


def test_anderson_faster_than_naive_on_slow_contraction():
    cplx = True
    rng = np.random.default_rng(3)
    n = 12
    # Hermitian with spectrum in [-0.95, 0.95]: Naive needs ~log(1e-10)/log(0.95) steps.
    q, _ = np.linalg.qr(_matrix(rng, n, 1.0, cplx))
    a = q @ np.diag(np.linspace(-0.95, 0.95, n)) @ q.conj().T
    b = _vector(rng, n, cplx)
    expected = np.linalg.solve(np.eye(n) - a, b)
    args = (jnp.asarray(a), jnp.asarray(b))
    z0 = jnp.zeros(n, a.dtype)
    kw = dict(max_steps=2000, rtol=0.0, atol=1e-10)
    naive = SOLVE(_linear, z0, args, solver=ff.Naive(), **kw)
    assert _is(naive.result, ff.RESULTS.successful)
    assert int(naive.stats.num_steps) > 300
    for coefficients, period in [("complex", 1), ("real", 1), ("complex", 3)]:
        solver = ff.Anderson(coefficients=coefficients, period=period)
        anderson = SOLVE(_linear, z0, args, solver=solver, **kw)
        assert _is(anderson.result, ff.RESULTS.successful)
        np.testing.assert_allclose(np.asarray(anderson.value), expected, atol=1e-8)
        assert float(anderson.stats.num_fn_evals) < float(naive.stats.num_fn_evals) / 3


def _periodic_anderson_reference(fn, z0, args, history, period, mixing, ridge, steps, real):
    """Anderson with `period - 1` mixed steps between mixings, written out in NumPy: the
    residual norm after each Anderson step."""
    gs, fs = [], []

    def push(z, fz):
        gs.append(fz - z)
        fs.append(fz)
        del gs[:-history], fs[:-history]

    z = np.asarray(z0)
    fz = np.asarray(fn(z, args))
    trace = [np.linalg.norm(fz - z)]
    for _ in range(steps):
        for _ in range(period - 1):
            push(z, fz)
            z = z + mixing * (fz - z)
            fz = np.asarray(fn(z, args))
        push(z, fz)
        gram = np.array([[np.vdot(a, b) for b in gs] for a in gs])
        gram = gram.real if real else gram
        scale = np.mean(np.real(np.diag(gram)))
        gram = gram + (ridge * scale + np.finfo(np.float64).tiny) * np.eye(len(gs))
        alpha = np.linalg.solve(gram, np.ones(len(gs)))
        alpha = alpha / alpha.sum()
        z = sum(a * (f - (1 - mixing) * g) for a, f, g in zip(alpha, fs, gs, strict=True))
        fz = np.asarray(fn(z, args))
        trace.append(np.linalg.norm(fz - z))
    return np.array(trace)


@pytest.mark.parametrize(
    "period, history, mixing, coefficients",
    [(2, 5, 1.0, "complex"), (3, 4, 0.7, "real"), (3, 2, 1.0, "complex")],
)
def test_periodic_anderson_matches_reference(period, history, mixing, coefficients):
    rng = np.random.default_rng(7)
    n, steps = 6, 6
    args = (jnp.asarray(_matrix(rng, n, 0.95, True)), jnp.asarray(_vector(rng, n, True)))
    z0 = jnp.zeros(n, jnp.complex128)
    solver = ff.Anderson(history=history, mixing=mixing, coefficients=coefficients, period=period)
    sol = SOLVE(
        _linear,
        z0,
        args,
        solver=solver,
        max_steps=steps,
        rtol=0.0,
        atol=0.0,
        residual_trace=True,
        throw=False,
    )
    expected = _periodic_anderson_reference(
        _linear, z0, args, history, period, mixing, 1e-4, steps, coefficients == "real"
    )
    np.testing.assert_allclose(np.asarray(sol.stats.residual_trace), expected, rtol=1e-8)
    assert float(sol.stats.num_fn_evals) == 1 + period * steps


# ---------------------------------------------------------------------------------------
# Robustness of Anderson to a degenerate history
# ---------------------------------------------------------------------------------------


def _half_plus_one(z, _):
    return 0.5 * z + 1.0


def _decay(z, _):
    return 0.9 * z


def _zero(z, _):
    return jnp.zeros_like(z)


_COLLINEAR = {
    "scalar": (_affine, jnp.array(0.0), (0.5, 1.0), 2.0),
    "pure_decay": (_decay, jnp.ones(4), None, 0.0),
    "collinear_vector": (_affine, jnp.zeros(4), (0.5, jnp.arange(4.0)), 2.0 * np.arange(4.0)),
    "complex_scalar": (_affine, jnp.array(0.0j), (0.5 + 0.5j, 1.0), 1.0 / (0.5 - 0.5j)),
}


@pytest.mark.parametrize(
    "problem, history, ridge",
    [(p, 5, r) for p in _COLLINEAR for r in (1e-4, 0.0)] + [("scalar", 1, 1e-4)],
)
def test_anderson_collinear_history_is_finite(problem, history, ridge):
    fn, z0, args, expected = _COLLINEAR[problem]
    solver = ff.Anderson(history=history, ridge=ridge)
    sol = SOLVE(fn, z0, args, solver=solver, max_steps=400, throw=False, **TIGHT)
    assert np.all(np.isfinite(np.asarray(sol.value)))
    assert np.isfinite(float(sol.stats.residual))
    assert _is(sol.result, ff.RESULTS.successful)
    np.testing.assert_allclose(np.asarray(sol.value), np.asarray(expected), atol=1e-10)


# ---------------------------------------------------------------------------------------
# Broyden: finite termination, a dense reference, the safeguard, gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, n, inner_product",
    [("real", 3, "complex"), ("complex", 3, "complex"), ("complex", 2, "real")],
)
def test_broyden_linear_map_exact_in_2n_steps(kind, n, inner_product):
    # Gay (1979): Broyden's good method on a linear map in d dimensions stops within 2d steps.
    # With the real inner product a complex-linear map in C^n is a map on R^{2n}.
    rng = np.random.default_rng(4)
    cplx = kind == "complex"
    dim = 2 * n if inner_product == "real" and cplx else n
    a, b = _matrix(rng, n, 0.9, cplx), _vector(rng, n, cplx)
    expected = np.linalg.solve(np.eye(n) - a, b)
    solver = ff.Broyden(memory=2 * dim, inner_product=inner_product)
    args = (jnp.asarray(a), jnp.asarray(b))
    sol = SOLVE(_linear, jnp.zeros(n, a.dtype), args, solver=solver, max_steps=100, **TIGHT)
    assert _is(sol.result, ff.RESULTS.successful)
    assert int(sol.stats.num_steps) <= 2 * dim
    np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=0, atol=1e-12)


def test_broyden_nonlinear_complex_map_agrees_with_naive():
    kw = dict(max_steps=300, rtol=0.0, atol=1e-11)
    for seed in range(3):
        args, z0 = _nonholomorphic_problem(seed)
        naive = SOLVE(_nonholomorphic, z0, args, solver=ff.Naive(), **kw)
        sol = SOLVE(_nonholomorphic, z0, args, solver=ff.Broyden(memory=6), **kw)
        assert _is(naive.result, ff.RESULTS.successful) and _is(sol.result, ff.RESULTS.successful)
        np.testing.assert_allclose(np.asarray(sol.value), np.asarray(naive.value), atol=1e-10)
        assert _residual(_nonholomorphic, sol.value, args) <= 1e-11
        assert int(sol.stats.num_steps) <= int(naive.stats.num_steps)


def _np_broyden(fn, z0, args, steps, memory, when_full, step_size):
    """Iterates of limited-memory good Broyden, with `H = -I + sum u v^H` as a list of pairs:
    when full, "restart" empties it before the update, "overwrite" drops the oldest after."""
    ip = np.vdot  # the conjugate inner product

    def h(x, pairs, adjoint=False):
        return -x + sum((v if adjoint else u) * ip(u if adjoint else v, x) for u, v in pairs)

    def g_of(z):
        return np.asarray(fn(jnp.asarray(z), args)) - z

    z = np.asarray(z0)
    g = g_of(z)
    d, pairs, out = g, [], [z]
    for _ in range(steps):
        dx = step_size * d
        z_new = z + dx
        g_new = g_of(z_new)
        if len(pairs) == memory and when_full == "restart":
            pairs = []
        v = h(dx, pairs, adjoint=True)
        u = (dx - h(g_new - g, pairs)) / ip(v, g_new - g)
        if len(pairs) == memory:
            pairs = pairs[1:]
        pairs.append((u, v))
        d = -h(g_new, pairs)
        z, g = z_new, g_new
        out.append(z)
    return np.stack(out)


@pytest.mark.parametrize(
    "when_full, step_size", [("restart", 1.0), ("overwrite", 1.0), ("restart", 0.7)]
)
def test_broyden_iterates_match_dense_reference(when_full, step_size):
    args, z0 = _nonholomorphic_problem(6, n=4)
    steps = 9  # memory 3 fills up twice
    solver = ff.Broyden(memory=3, when_full=when_full, step_size=step_size)
    sol = SOLVE(
        _nonholomorphic,
        z0,
        args,
        solver=solver,
        max_steps=steps,
        record_every=1,
        throw=False,
        rtol=0.0,
        atol=0.0,
    )
    assert int(sol.stats.num_steps) == steps and int(sol.stats.num_fn_evals) == steps + 1
    ref = _np_broyden(_nonholomorphic, z0, args, steps, 3, when_full, step_size)
    np.testing.assert_allclose(np.asarray(sol.stats.trajectory), ref, rtol=0, atol=1e-12)
    # The second step is not a plain damped one, and the solve makes progress.
    plain = ref[1] + step_size * (np.asarray(_nonholomorphic(jnp.asarray(ref[1]), args)) - ref[1])
    assert np.abs(ref[2] - plain).max() > 1e-3
    assert _residual(_nonholomorphic, ref[-1], args) < 1e-3 * _residual(_nonholomorphic, z0, args)


def _plus_one(z, _):
    return z + 1.0


def _slow_affine(z, _):
    return 0.9999 * z + 1.0


@pytest.mark.parametrize(
    "fn, max_step_ratio, restarts, exact_from",
    [
        (_plus_one, 1e3, [1, 2, 3, 4], None),  # g constant: every update divides by zero
        (_slow_affine, 1e3, [0, 1, 2, 3], None),  # Newton steps of 1e4 |g|: rejected
        (_slow_affine, 1e5, [0, 0], 1),  # accepted: one secant pair is exact for a * I
    ],
    ids=["zero_denominator", "huge_step", "accepted_step"],
)
def test_broyden_safeguard_restarts(fn, max_step_ratio, restarts, exact_from):
    # A restart takes a plain step: the iterates are Naive's until a Broyden step is taken.
    solver = ff.Broyden(memory=3, max_step_ratio=max_step_ratio)
    y = jnp.zeros(2)
    fy = fn(y, None)
    state = solver.init(fn, y, fy, None)
    z = np.zeros(2)
    for k, expected in enumerate(restarts):
        y, fy, state, work = solver.step(fn, y, fy, None, state)
        assert work == 1.0
        assert int(state.restarts) == expected, k
        z = np.asarray(fn(z, None))
        if exact_from is not None and k >= exact_from:
            np.testing.assert_allclose(np.asarray(y), 1e4, rtol=1e-10)
        else:
            np.testing.assert_allclose(np.asarray(y), z, rtol=1e-14)
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_broyden_implicit_gradient_matches_finite_differences():
    # Broyden for the forward solve and for the adjoint's linear backward solve.
    args, z0 = _nonholomorphic_problem(5, n=3)
    tol = dict(rtol=0.0, atol=1e-12, max_steps=300)
    forward = backward = ff.Broyden()

    def loss(b):
        sol = ff.fixed_point(
            _nonholomorphic,
            z0,
            (args[0], b),
            solver=forward,
            adjoint=ff.ImplicitAdjoint(solver=backward, **tol),
            **tol,
        )
        return jnp.sum(jnp.abs(sol.value - 0.3) ** 2)

    b = args[1]
    grad = jax.jit(jax.grad(loss))(b)
    # Central differences along random complex directions: JAX's gradient of a real loss
    # is d loss / d Re(b) - i d loss / d Im(b), so d loss = Re sum(grad * db).
    f = jax.jit(loss)
    rng = np.random.default_rng(0)
    for _ in range(3):
        db = jnp.asarray(_vector(rng, b.shape, True))
        eps = 1e-6
        fd = (float(f(b + eps * db)) - float(f(b - eps * db))) / (2 * eps)
        np.testing.assert_allclose(float(jnp.real(jnp.sum(grad * db))), fd, rtol=1e-6)


@SOLVER_PARAMS
def test_already_converged_start_takes_zero_steps(solver):
    z0 = jnp.full(3, 2.0)
    sol = SOLVE(_half_plus_one, z0, solver=solver, **TIGHT)
    assert _is(sol.result, ff.RESULTS.successful)
    assert int(sol.stats.num_steps) == 0
    assert float(sol.stats.residual) == 0.0
    np.testing.assert_array_equal(np.asarray(sol.value), np.asarray(z0))


@SOLVER_PARAMS
def test_exactly_converging_map_does_not_nan(solver):
    # The residual becomes exactly 0 (an all-zero Gram matrix for Anderson).
    sol = SOLVE(_zero, jnp.ones(3), solver=solver, max_steps=100, **TIGHT)
    assert _is(sol.result, ff.RESULTS.successful)
    assert np.all(np.isfinite(np.asarray(sol.value)))
    np.testing.assert_allclose(np.asarray(sol.value), np.zeros(3), atol=1e-12)
    damping = {ff.Naive: "damping", ff.Anderson: "mixing", ff.Broyden: "step_size"}
    if getattr(solver, damping[type(solver)]) == 1:
        assert int(sol.stats.num_steps) <= 2


# ---------------------------------------------------------------------------------------
# Composition with jit / filter_jit / vmap, and per-sample stopping
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["jit", "filter_jit"])
def test_jit_composition(wrap):
    def solve(a, b):
        sol = ff.fixed_point(_affine, jnp.zeros(3), (a, b), solver=ff.Anderson(), **TIGHT)
        return sol.value, sol.stats.num_steps

    f = {"jit": jax.jit(solve), "filter_jit": eqx.filter_jit(solve)}[wrap]
    a, b = jnp.array(0.5), jnp.array([1.0, 2.0, 3.0])
    value, steps = f(a, b)
    np.testing.assert_allclose(np.asarray(value), np.asarray(b) / 0.5, atol=1e-11)
    ref = SOLVE(_affine, jnp.zeros(3), (a, b), solver=ff.Anderson(), **TIGHT)
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref.value), atol=1e-14)
    assert int(steps) == int(ref.stats.num_steps)


def test_filter_jit_with_module_fn():
    class Affine(eqx.Module):
        a: jax.Array
        b: jax.Array

        def __call__(self, z, args):
            return self.a * z + self.b

    @eqx.filter_jit
    def solve(m):
        return ff.fixed_point(m, jnp.zeros(2), solver=ff.Anderson(), **TIGHT).value

    np.testing.assert_allclose(
        np.asarray(solve(Affine(jnp.array(0.25), jnp.array([3.0, -3.0])))), [4.0, -4.0], atol=1e-11
    )
    # Same structure, new values: cached compilation, new answer.
    np.testing.assert_allclose(
        np.asarray(solve(Affine(jnp.array(0.5), jnp.array([1.0, 2.0])))), [2.0, 4.0], atol=1e-11
    )


# Samples of different difficulty, the last one starting exactly at its fixed point.
_VMAP_A = jnp.array([0.1, 0.5, 0.9, 0.99, 0.7])
_VMAP_B = jnp.array([[1.0, -1.0], [2.0, 0.5], [0.3, 0.3], [1.0, 2.0], [0.6, -0.3]])
_VMAP_Z0 = jnp.zeros((5, 2)).at[4].set(_VMAP_B[4] / (1 - _VMAP_A[4]))


@pytest.mark.parametrize(
    "solver, order",
    [
        (SOLVERS["naive"], "vmap_of_jit"),
        (SOLVERS["anderson_real"], "vmap_of_jit"),
        (SOLVERS["anderson_complex"], "jit_of_vmap"),
    ],
    ids=["naive", "anderson_real", "anderson_complex_jit_of_vmap"],
)
def test_vmap_per_sample_stopping(solver, order):
    kw = dict(solver=solver, max_steps=5000, rtol=0.0, atol=1e-10)

    def solve(z0_, a_, b_):
        sol = SOLVE(_affine, z0_, (a_, b_), **kw)
        return sol.value, sol.stats.num_steps, sol.stats.residual, sol.result

    batched = jax.vmap(solve) if order == "vmap_of_jit" else jax.jit(jax.vmap(solve))
    values, steps, residuals, results = batched(_VMAP_Z0, _VMAP_A, _VMAP_B)
    assert np.all(_is(results, ff.RESULTS.successful))
    assert int(steps[4]) == 0
    assert len(set(np.asarray(steps[:4]).tolist())) >= 3  # genuinely different stopping steps
    for i in range(5):
        v, s, r, _ = solve(_VMAP_Z0[i], _VMAP_A[i], _VMAP_B[i])
        assert int(steps[i]) == int(s), i
        np.testing.assert_allclose(np.asarray(values[i]), np.asarray(v), rtol=0, atol=1e-13)
        np.testing.assert_allclose(float(residuals[i]), float(r), rtol=1e-6, atol=1e-14)
        expected = np.asarray(_VMAP_B[i]) / (1 - float(_VMAP_A[i]))
        np.testing.assert_allclose(np.asarray(values[i]), expected, rtol=0, atol=1e-7)


def test_vmap_failure_of_one_sample_does_not_leak():
    # One sample diverges; the others still succeed with their own stats.
    a = jnp.array([0.5, 2.0, 0.3])
    b = jnp.array([1.0, 1.0, 1.0])

    def solve(a_, b_):
        sol = SOLVE(_affine, jnp.array(0.0), (a_, b_), solver=ff.Naive(), throw=False, **TIGHT)
        return sol.value, sol.result, sol.stats.num_steps

    values, results, steps = jax.vmap(solve)(a, b)
    np.testing.assert_array_equal(_is(results, ff.RESULTS.successful), [True, False, True])
    np.testing.assert_array_equal(_is(results, ff.RESULTS.diverged), [False, True, False])
    for i in range(3):
        v, r, s = solve(a[i], b[i])
        assert int(steps[i]) == int(s)
        assert int(results._value[i]) == int(r._value)
        np.testing.assert_allclose(float(values[i]), float(v), rtol=0, atol=1e-13)


def _batched_problem(rng, batch=4, n=5):
    """Complex linear maps z -> A_i z + b_i whose solves stop at different steps."""
    norms = np.linspace(0.3, 0.9, batch)
    a = np.stack([_matrix(rng, n, s, True) for s in norms])
    b = np.stack([_vector(rng, n, True) for _ in range(batch)])
    return jnp.asarray(a), jnp.asarray(b)


def _sequential(solve, *xs):
    """The unbatched solve, one sample at a time (`lax.map` is a scan: no batching rule)."""
    return jax.lax.map(lambda x: solve(*x), xs)


@pytest.mark.parametrize(
    "solver, batched_z0",
    [
        (ff.Naive(), True),
        (ff.Anderson(history=3), False),
        (ff.Anderson(mixing=0.7), True),
        (ff.Broyden(memory=4), True),
    ],
    ids=["naive", "anderson_shared_z0", "anderson_damped", "broyden"],
)
def test_vmapped_solve_equals_sequential_solves(solver, batched_z0):
    # The batched loop freezes finished samples but lets their solver state run on: every
    # output must equal that of solving each sample on its own.
    a, b = _batched_problem(np.random.default_rng(0))
    z0 = jnp.zeros_like(b) if batched_z0 else jnp.zeros(b.shape[1:], b.dtype)

    def solve(z0_, a_, b_):
        sol = ff.fixed_point(
            _linear,
            z0_,
            (a_, b_),
            solver=solver,
            rtol=0.0,
            atol=1e-11,
            max_steps=300,
            throw=False,
            residual_trace=True,
            record_every=2,
        )
        return sol.value, sol.result._value, sol.stats

    in_axes = (0 if batched_z0 else None, 0, 0)
    out = jax.jit(jax.vmap(solve, in_axes=in_axes))(z0, a, b)
    z0s = z0 if batched_z0 else jnp.broadcast_to(z0, b.shape)
    ref = jax.jit(lambda *xs: _sequential(solve, *xs))(z0s, a, b)
    steps = np.asarray(out[2].num_steps)
    assert len(set(steps.tolist())) >= 3, steps  # samples genuinely stop at different steps
    np.testing.assert_array_equal(steps, np.asarray(ref[2].num_steps))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
    _assert_tree_close(out, ref, 1e-12)


def test_vmapped_solve_of_closure_over_batched_values():
    # fn closes over a vmapped array (not passed through args); nested vmap over two axes.
    a, b = _batched_problem(np.random.default_rng(1), batch=3)
    scales = jnp.array([1.0, 0.5])

    def solve(s, a_, b_):
        sol = ff.fixed_point(
            lambda z, _: a_ @ z + s * b_,
            jnp.zeros_like(b_),
            None,
            solver=ff.Anderson(history=4),
            rtol=0.0,
            atol=1e-11,
            max_steps=300,
        )
        return sol.value, sol.stats.num_steps

    nested = jax.jit(jax.vmap(jax.vmap(solve, in_axes=(None, 0, 0)), in_axes=(0, None, None)))
    values, steps = nested(scales, a, b)
    single = jax.jit(solve)
    for i, s in enumerate(np.asarray(scales)):
        for j in range(a.shape[0]):
            v, k = single(s, a[j], b[j])
            assert int(steps[i, j]) == int(k)
            np.testing.assert_allclose(np.asarray(values[i, j]), np.asarray(v), rtol=0, atol=1e-12)
            expected = np.linalg.solve(np.eye(a.shape[1]) - np.asarray(a[j]), s * np.asarray(b[j]))
            np.testing.assert_allclose(np.asarray(values[i, j]), expected, rtol=0, atol=1e-9)


def test_vmapped_implicit_gradient_equals_per_sample_gradient():
    # Under vmap the backward solve also runs in the batched loop.
    a, b = _batched_problem(np.random.default_rng(2), batch=3)

    def loss(a_, b_):
        sol = ff.fixed_point(
            _linear,
            jnp.zeros_like(b_),
            (a_, b_),
            solver=ff.Anderson(),
            adjoint=ff.ImplicitAdjoint(rtol=0.0, atol=1e-12, max_steps=300),
            rtol=0.0,
            atol=1e-12,
            max_steps=300,
        )
        return jnp.sum(jnp.abs(sol.value) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    grads = jax.jit(jax.vmap(grad))(a, b)
    single = jax.jit(grad)
    for j in range(a.shape[0]):
        ga, gb = single(a[j], b[j])
        np.testing.assert_allclose(np.asarray(grads[0][j]), np.asarray(ga), rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(grads[1][j]), np.asarray(gb), rtol=0, atol=1e-9)
        # The closed form: z = (I - A)^{-1} b, L = |z|^2, so dL/d(conj b) = (I - A)^{-H} z, and
        # JAX's gradient of a real loss is twice its conjugate.
        n = a.shape[1]
        z = np.linalg.solve(np.eye(n) - np.asarray(a[j]), np.asarray(b[j]))
        u = np.linalg.solve((np.eye(n) - np.asarray(a[j])).conj().T, z)
        np.testing.assert_allclose(np.asarray(gb), 2 * np.conj(u), rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Residual trace and trajectory
# ---------------------------------------------------------------------------------------


@SOLVER_PARAMS
def test_residual_trace(solver):
    fn, z0, args, _ = _linear_problem("complex", np.random.default_rng(2), norm=0.8)
    max_steps = 300
    sol = SOLVE(fn, z0, args, solver=solver, max_steps=max_steps, residual_trace=True, **TIGHT)
    trace = np.asarray(sol.stats.residual_trace)
    n = int(sol.stats.num_steps)
    assert trace.shape == (max_steps + 1,)
    assert _is(sol.result, ff.RESULTS.successful) and 0 < n < max_steps
    assert np.all(np.isfinite(trace[: n + 1]))
    assert np.all(np.isnan(trace[n + 1 :]))
    np.testing.assert_allclose(trace[0], _residual(fn, z0, args), rtol=1e-12)
    np.testing.assert_allclose(trace[n], float(sol.stats.residual), rtol=1e-12)
    assert trace[n] <= 1e-12 < trace[n - 1]
    # Monotone-ish: overall decay, and no step exceeds 10x the best residual so far.
    assert trace[n] < 1e-6 * trace[0]
    assert np.all(trace[1 : n + 1] <= 10 * np.minimum.accumulate(trace[:n]))
    if isinstance(solver, ff.Naive):
        # For a linear map of 2-norm 0.8 the damped Picard residual contracts by 1-d+0.8d.
        d = solver.damping
        assert np.all(trace[1 : n + 1] <= (1 - d + d * 0.8) * trace[:n] * (1 + 1e-9))


@pytest.mark.parametrize("every", [1, 3, 7])
@pytest.mark.parametrize("kind", ["real", "pytree"])
@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_trajectory_matches_independent_iteration(every, kind, damping):
    fn, z0, args, _ = _linear_problem(kind, np.random.default_rng(4), norm=0.9)
    z0 = jax.tree.map(lambda x: x + 1.0, z0)
    max_steps = 21
    sol = SOLVE(
        fn,
        z0,
        args,
        solver=ff.Naive(damping=damping),
        max_steps=max_steps,
        record_every=every,
        throw=False,
        **TIGHT,
    )
    assert _is(sol.result, ff.RESULTS.max_steps_reached)
    assert int(sol.stats.num_steps) == max_steps
    traj = sol.stats.trajectory
    n_rec = max_steps // every + 1
    assert jax.tree.structure(traj) == jax.tree.structure(z0)
    for t, z in zip(jax.tree.leaves(traj), jax.tree.leaves(z0), strict=True):
        assert t.shape == (n_rec,) + z.shape and t.dtype == z.dtype
    _assert_tree_close(jax.tree.map(lambda t: t[0], traj), z0, 0.0)
    z = z0
    for k in range(1, max_steps + 1):
        fz = fn(z, args)
        z = jax.tree.map(lambda a, b: a + damping * (b - a), z, fz)
        if k % every == 0:
            _assert_tree_close(jax.tree.map(lambda t, k=k: t[k // every], traj), z, 1e-12)
    _assert_tree_close(sol.value, z, 1e-12)


def test_trajectory_stops_at_convergence():
    sol = SOLVE(
        _half_plus_one,
        jnp.array(0.0),
        solver=ff.Naive(),
        max_steps=100,
        record_every=2,
        rtol=0.0,
        atol=1e-3,
    )
    n = int(sol.stats.num_steps)
    assert n == 10  # the residual at step k is 0.5**k
    traj = np.asarray(sol.stats.trajectory)
    expected = [2.0 - 2.0 * 0.5**k for k in range(0, n + 1, 2)]
    np.testing.assert_allclose(traj[: len(expected)], expected, rtol=0, atol=1e-15)
    # Slots past the last step are never written.
    np.testing.assert_array_equal(traj[n // 2 + 1 :], 0.0)


# ---------------------------------------------------------------------------------------
# Failure codes
# ---------------------------------------------------------------------------------------


def _nan_after_three(z, _):
    return jnp.where(z < 2.5, z + 1.0, jnp.nan)


def _log(z, _):
    return jnp.log(z)


def _half(z, _):
    return 0.5 * z


def _double_plus_one(z, _):
    return 2.0 * z + 1.0


FAILURES = {
    "max_steps": (_cos, jnp.array(1.0), 3, ff.RESULTS.max_steps_reached, "did not converge"),
    "nonfinite": (_nan_after_three, jnp.array(0.0), 50, ff.RESULTS.nonfinite, "non-finite"),
    "nonfinite_input": (
        _half,
        jnp.array([1.0, jnp.nan]),
        50,
        ff.RESULTS.nonfinite_input,
        "contains NaN or inf",
    ),
    "nonfinite_fn_z0": (
        _log,
        jnp.array([-1.0, 1.0]),
        50,
        ff.RESULTS.nonfinite_input,
        "contains NaN or inf",
    ),
    "diverged": (_double_plus_one, jnp.array(0.0), 1000, ff.RESULTS.diverged, "diverged"),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_codes_without_throw(name):
    fn, z0, max_steps, code, _ = FAILURES[name]
    sol = SOLVE(fn, z0, solver=ff.Naive(), max_steps=max_steps, throw=False, **TIGHT)
    assert _is(sol.result, code)
    assert not _is(sol.result, ff.RESULTS.successful)
    if name == "max_steps":
        assert int(sol.stats.num_steps) == 3
        np.testing.assert_allclose(float(sol.value), np.cos(np.cos(np.cos(1.0))), atol=1e-15)
    if name == "nonfinite":
        assert np.all(np.isfinite(np.asarray(sol.value)))
        assert float(sol.value) == 2.0  # the last finite iterate
        assert np.isfinite(float(sol.stats.residual))
    if name in ("nonfinite_input", "nonfinite_fn_z0"):
        assert int(sol.stats.num_steps) == 0
    if name == "diverged":
        assert np.isfinite(float(sol.value))
        assert int(sol.stats.num_steps) < 100  # stopped early, not at max_steps
        assert float(sol.stats.residual) > 1e4  # the residual at z0 is 1
    # Printing a result names it, then says what happened.
    item = {"max_steps": "max_steps_reached", "nonfinite_fn_z0": "nonfinite_input"}.get(name, name)
    printed = repr(sol.result)
    assert printed.startswith(f"fractal_field._solution.RESULTS<{item}: ")
    assert FAILURES[name][4] in printed and printed.endswith(">")


def test_successful_result_prints_its_name():
    sol = SOLVE(_half, jnp.array(1.0), solver=ff.Naive(), max_steps=100, **TIGHT)
    assert repr(sol.result) == "fractal_field._solution.RESULTS<successful>"
    assert ff.RESULTS[sol.result] == "successful"


def test_divergence_zero_disables_check():
    sol = SOLVE(
        _double_plus_one,
        jnp.array(0.0),
        solver=ff.Naive(),
        max_steps=30,
        divergence=0,
        throw=False,
    )
    assert _is(sol.result, ff.RESULTS.max_steps_reached)
    assert int(sol.stats.num_steps) == 30


def test_nonfinite_under_anderson_keeps_value_finite():
    sol = SOLVE(_nan_after_three, jnp.zeros(2), solver=ff.Anderson(), throw=False)
    assert _is(sol.result, ff.RESULTS.nonfinite)
    assert np.all(np.isfinite(np.asarray(sol.value)))


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_raises_with_throw(name):
    fn, z0, max_steps, _, message = FAILURES[name]
    with pytest.raises(Exception, match=message):
        sol = SOLVE(fn, z0, solver=ff.Naive(), max_steps=max_steps, throw=True, **TIGHT)
        jax.block_until_ready(sol.value)


def test_max_steps_zero():
    sol = SOLVE(_cos, jnp.array(1.0), max_steps=0, throw=False)
    assert _is(sol.result, ff.RESULTS.max_steps_reached)
    assert int(sol.stats.num_steps) == 0
    assert float(sol.value) == 1.0
    sol = SOLVE(_half, jnp.array(0.0), max_steps=0)
    assert _is(sol.result, ff.RESULTS.successful)


# ---------------------------------------------------------------------------------------
# Trace-time validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, z0, exc, match",
    [
        (lambda z, _: jnp.concatenate([z, z]), jnp.zeros(3), ValueError, "changed leaf"),
        (lambda z, _: z[:2], jnp.zeros(3), ValueError, r"float64\[2\]"),
        (lambda z, _: z.astype(jnp.float32), jnp.zeros(3), ValueError, "float32"),
        (lambda z, _: z + 0j, jnp.zeros(3), ValueError, "complex128"),
        (lambda z, _: jnp.real(z), jnp.zeros(3, jnp.complex128), ValueError, "changed leaf"),
        (lambda z, _: (z, z), jnp.zeros(3), ValueError, "same structure"),
        (lambda z, _: {"b": z["a"]}, {"a": jnp.zeros(3)}, ValueError, "same structure"),
        (lambda z, _: [z[0]], [jnp.zeros(1), jnp.zeros(1)], ValueError, "same structure"),
        (lambda z, _: z, jnp.zeros(3, jnp.int32), TypeError, "floating-point or complex"),
        (lambda z, _: z, {"a": jnp.zeros(2), "b": jnp.zeros(2, bool)}, TypeError, "z0"),
        (lambda z, _: z, 1, TypeError, "floating-point or complex"),
        (lambda z, _: z, {}, ValueError, "no array leaves"),
    ],
    ids=[
        "longer",
        "shorter",
        "to_float32",
        "to_complex",
        "complex_to_real",
        "tuple",
        "dict_keys",
        "list_len",
        "int_z0",
        "bool_leaf",
        "python_int",
        "empty",
    ],
)
def test_trace_time_problem_errors(fn, z0, exc, match):
    with pytest.raises(exc, match=match):
        ff.fixed_point(fn, z0)


def test_fn_that_fails_to_trace_is_reported():
    with pytest.raises(Exception, match=r"fn\(z0, args\) failed"):
        ff.fixed_point(lambda z, a: z @ a, jnp.zeros(3), jnp.zeros((2, 2)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ff.Naive(damping=0.0), "damping"),
        (lambda: ff.Naive(damping=1.5), "damping"),
        (lambda: ff.Naive(damping=-0.5), "damping"),
        (lambda: ff.Anderson(history=0), "history"),
        (lambda: ff.Anderson(history=-1), "history"),
        (lambda: ff.Anderson(mixing=0.0), "mixing"),
        (lambda: ff.Anderson(mixing=1.1), "mixing"),
        (lambda: ff.Anderson(ridge=-1e-3), "ridge"),
        (lambda: ff.Anderson(period=0), "period"),
        (lambda: ff.Anderson(coefficients="imaginary"), "coefficients"),
        (lambda: ff.Broyden(memory=0), "memory"),
        (lambda: ff.Broyden(step_size=0.0), "step_size"),
        (lambda: ff.Broyden(step_size=1.5), "step_size"),
        (lambda: ff.Broyden(max_step_ratio=0.5), "max_step_ratio"),
        (lambda: ff.Broyden(inner_product="imaginary"), "inner_product"),
        (lambda: ff.Broyden(when_full="grow"), "when_full"),
        (lambda: ff.PhantomAdjoint(steps=0), "steps"),
        (lambda: ff.PhantomAdjoint(damping=0.0), "damping"),
    ],
)
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_broyden_memory_must_be_an_int():
    with pytest.raises(TypeError, match="memory must be an int"):
        ff.Broyden(memory=2.5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_steps=-1), ValueError, "max_steps"),
        (dict(record_every=0), ValueError, "record_every"),
        (dict(solver="anderson"), TypeError, "solver"),
    ],
)
def test_invalid_driver_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ff.fixed_point(_half, jnp.zeros(2), **kwargs)


def test_polish_is_per_sample_under_vmap():
    # z -> a z + 1: a=0.5 converges within 30 steps, a=0.99 does not.
    def solve(a):
        return ff.fixed_point(
            lambda z, a: a * z + 1.0,
            jnp.array(0.0),
            a,
            solver=ff.Naive(),
            max_steps=30,
            rtol=0.0,
            atol=1e-6,
            throw=False,
        )

    sol = jax.jit(jax.vmap(solve))(jnp.array([0.5, 0.99]))
    codes = [ff.RESULTS.successful, ff.RESULTS.max_steps_reached]
    for i, (a, code) in enumerate(zip([0.5, 0.99], codes, strict=True)):
        assert _is(sol.result, code)[i]
        # Independent iteration: z_k after the solver's number of steps.
        z = 0.0
        for _ in range(int(sol.stats.num_steps[i])):
            z = a * z + 1.0
        # Success returns f(z_k); failure returns z_k itself.
        expected = a * z + 1.0 if i == 0 else z
        np.testing.assert_allclose(float(sol.value[i]), expected, rtol=0, atol=1e-14)
