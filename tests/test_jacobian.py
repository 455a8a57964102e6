"""Jacobian regularisation: the Hutchinson estimate, its gradient, the model's penalty."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from _reference import random_field

import fractal_field as ff
from fractal_field._train import make_train_step


def _exact(fn, z, args):
    """`||J||_F^2 / n` of `fn` at `z` viewed as a real map, from the dense Jacobian."""
    as_real = lambda x: jnp.stack([x.real, x.imag]) if x.dtype.kind == "c" else x  # noqa: E731
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(as_real, z))
    kinds = jax.tree_util.tree_map(lambda x: x.dtype.kind == "c", z)

    def real_map(v):
        parts = unravel(v)
        zz = jax.tree_util.tree_map(
            lambda p, c: jax.lax.complex(p[0], p[1]) if c else p, parts, kinds
        )
        out = jax.tree_util.tree_map(as_real, fn(zz, args))
        return jax.flatten_util.ravel_pytree(out)[0]

    jac = jax.jacfwd(real_map)(flat)
    return jnp.sum(jac**2) / flat.size


def _nonlinear(z, w):
    a, b = z
    return (ff.modrelu(w @ a, -0.2), jnp.tanh(b * jnp.real(a[:1]).sum()) + w[0, 0].real)


def _state_and_weight(dtype=jnp.complex64):
    a = random_field(jr.PRNGKey(0), (3, 4), dtype)
    b = jr.normal(jr.PRNGKey(1), (5,), jnp.real(a).dtype)
    w = random_field(jr.PRNGKey(2), (3, 3), dtype)
    return (a, b), w


@pytest.mark.parametrize("kind", ["linear", "pytree"])
def test_estimate_matches_dense_jacobian(kind):
    """Unbiased: with many probes it converges to the exact `||J||_F^2 / n` (real view)."""
    (a, b), w = _state_and_weight()
    if kind == "linear":
        fn, z = (lambda z, w: w @ z), a
    else:
        fn, z = _nonlinear, (a, b)
    want = float(_exact(fn, z, w))
    got = float(ff.jacobian_penalty(fn, z, w, key=jr.PRNGKey(3), probes=20000))
    assert want > 0.1
    np.testing.assert_allclose(got, want, rtol=0.05)
    if kind == "linear":  # the real view of a complex linear map M has ||.||_F^2 = 2 ||M||_F^2
        frob = a.shape[1] * float(jnp.sum(jnp.abs(w) ** 2))  # M = W acting on each column
        np.testing.assert_allclose(want, 2 * frob / (2 * a.size), rtol=1e-5)


def test_gradient_matches_finite_differences():
    """Differentiable in what `fn` depends on (here the weight, through a second-order path)."""
    with jax.enable_x64(True):
        (a, b), w = _state_and_weight(jnp.complex128)

        def pen(w):
            return ff.jacobian_penalty(_nonlinear, (a, b), w, key=jr.PRNGKey(4), probes=3)

        grad = jax.grad(pen)(w)
        direction = random_field(jr.PRNGKey(5), w.shape, jnp.complex128)
        eps = 1e-6
        fd = (pen(w + eps * direction) - pen(w - eps * direction)) / (2 * eps)
        # JAX's gradient of a real function of complex w is d/dRe w - i d/dIm w.
        analytic = jnp.real(jnp.sum(grad * direction))
        assert abs(float(fd)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)


def _tiny(batch_solve, norm_groups=0):
    return ff.make_model(
        "tiny", key=jr.PRNGKey(0), batch_solve=batch_solve, norm_groups=norm_groups
    )


@pytest.mark.parametrize("batch_solve", ["planar", "per_sample"])
def test_model_penalty_is_the_unrelaxed_cells_jacobian(batch_solve):
    """`FieldClassifier.jacobian_penalty` estimates `||d act(Kz + u)/dz||_F^2 / n` at each
    image's fixed point (not the relaxed step's), averaged over the batch, in both layouts."""
    model = _tiny(batch_solve, norm_groups=2)
    x = jr.normal(jr.PRNGKey(1), (2, 1, 8, 8))
    _, sol = eqx.filter_jit(lambda m, x: m.batched(x, rtol=1e-6, max_steps=100))(model, x)
    cell, a = model.cell, model.cell.alpha()
    op = cell.operator(8, 8)

    def unrelaxed(z, u):
        return (cell.step_with(op, z, u) - (1 - a) * z) / a

    exact = jax.jit(jax.vmap(lambda z, u: _exact(unrelaxed, z, u)))
    want = float(jnp.mean(exact(sol.value, jax.vmap(model.encoder)(x))))
    key = jr.PRNGKey(2)
    penalty = eqx.filter_jit(lambda m, x, v: m.jacobian_penalty(x, v, key=key, probes=2000))
    np.testing.assert_allclose(float(penalty(model, x, sol.value)), want, rtol=0.05)


def test_train_step_adds_the_penalty():
    """With a weight, the step logs `jac` and its gradient changes the update; `loss` stays the
    cross-entropy; a negative weight is refused."""
    opt = ff.complex_safe(optax.sgd(0.1))
    x = jr.normal(jr.PRNGKey(1), (4, 1, 8, 8))
    y = jnp.arange(4)
    runs = {}
    for weight in (0.0, 1.0):
        model = _tiny("planar", norm_groups=2)  # the step donates its model and state
        state = opt.init(eqx.filter(model, eqx.is_inexact_array))
        runs[weight] = make_train_step(opt, False, weight)(jr.PRNGKey(3), model, state, x, y)
    (m0, _, met0), (m1, _, met1) = runs[0.0], runs[1.0]
    assert "jac" not in met0 and float(met1["jac"]) > 0
    np.testing.assert_allclose(float(met0["loss"]), float(met1["loss"]), rtol=1e-6)
    leaves = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))  # noqa: E731
    pairs = zip(leaves(m0), leaves(m1), strict=True)
    assert max(float(jnp.max(jnp.abs(p - q))) for p, q in pairs) > 1e-6
    with pytest.raises(ValueError, match="jacobian_penalty=-1"):
        make_train_step(opt, False, -1.0)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="probes=0"):
        ff.jacobian_penalty(lambda z, _: z, jnp.ones(3), key=jr.PRNGKey(0), probes=0)
    with pytest.raises(TypeError, match="z must be a floating-point or complex array"):
        ff.jacobian_penalty(lambda z, _: z, jnp.ones(3, jnp.int32), key=jr.PRNGKey(0))
