import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fractal_field as ff


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _crandn(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _np_reference(weight, dilations, z):
    """Independent numpy reference for a batch: explicit taps with np.roll."""
    weight, z = np.asarray(weight), np.asarray(z)
    d, cout, cin, k, _ = weight.shape
    c = k // 2
    out = np.zeros((z.shape[0], cout) + z.shape[2:], complex)
    for j, r in enumerate(dilations):
        for a in range(k):
            for b in range(k):
                shifted = np.roll(z, (-r * (a - c), -r * (b - c)), axis=(2, 3))
                out += np.einsum("oi,nihw->nohw", weight[j, :, :, a, b], shifted)
    return out


def test_layout_roundtrip_and_shape():
    z = _crandn(np.random.default_rng(0), 3, 4, 5, 6)
    p = ff.to_planar(z)
    assert p.shape == (2, 5, 6, 4, 3)
    np.testing.assert_array_equal(p[0, 1, 2, 3, 0], np.real(z[0, 3, 1, 2]))
    np.testing.assert_array_equal(p[1, 1, 2, 3, 0], np.imag(z[0, 3, 1, 2]))
    np.testing.assert_array_equal(ff.from_planar(p), z)
    with pytest.raises(ValueError, match=r"\(b, c, h, w\)"):
        ff.to_planar(z[0])
    with pytest.raises(ValueError, match=r"\(2, h, w, c, b\)"):
        ff.from_planar(p[:1])


@pytest.mark.parametrize(
    "b,cin,cout,h,w,k,dil",
    [(3, 4, 4, 6, 6, 3, (1,)), (2, 3, 5, 5, 8, 3, (1, 2)), (1, 2, 2, 7, 4, 5, (1,))],
)
def test_operator_matches_reference(b, cin, cout, h, w, k, dil):
    rng = np.random.default_rng(1)
    conv = ff.ToroidalConv(cin, cout, k, dil, dtype=jnp.complex128, key=jax.random.key(0))
    z = _crandn(rng, b, cin, h, w)
    got = ff.from_planar(conv.planar_operator(h, w)(ff.to_planar(z)))
    np.testing.assert_allclose(got, _np_reference(conv.weight, dil, z), atol=1e-12)
    # and the per-field (vmapped) operator
    np.testing.assert_allclose(got, jax.vmap(conv)(z), atol=1e-12)


def test_operator_translation_equivariant():
    rng = np.random.default_rng(2)
    conv = ff.ToroidalConv(3, 3, 3, (1, 2), dtype=jnp.complex128, key=jax.random.key(1))
    op = conv.planar_operator(8, 6)
    p = ff.to_planar(_crandn(rng, 2, 3, 8, 6))
    shift = (3, -2)
    lhs = op(jnp.roll(p, shift, axis=(1, 2)))
    np.testing.assert_allclose(lhs, jnp.roll(op(p), shift, axis=(1, 2)), atol=1e-12)


def test_operator_gradients_match_autodiff_and_fd():
    rng = np.random.default_rng(3)
    b, c, h, w = 2, 3, 5, 6
    conv = ff.ToroidalConv(c, c, 3, (1,), dtype=jnp.complex128, key=jax.random.key(2))
    z = _crandn(rng, b, c, h, w)
    weights = jnp.asarray(rng.standard_normal((b, c, h, w)))

    def loss_planar(weight, z):
        cv = eqx.tree_at(lambda t: t.weight, conv, weight)
        y = ff.from_planar(cv.planar_operator(h, w)(ff.to_planar(z)))
        return jnp.sum(weights * jnp.abs(y) ** 2)

    def loss_ref(weight, z):
        cv = eqx.tree_at(lambda t: t.weight, conv, weight)
        return jnp.sum(weights * jnp.abs(jax.vmap(lambda x: cv(x, impl="direct"))(z)) ** 2)

    gp = jax.grad(loss_planar, argnums=(0, 1))(conv.weight, z)
    gr = jax.grad(loss_ref, argnums=(0, 1))(conv.weight, z)
    for a, r in zip(gp, gr, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10)
    # central finite difference along a random complex direction of the weight
    dw = _crandn(rng, *conv.weight.shape)
    eps = 1e-6
    fd = (loss_planar(conv.weight + eps * dw, z) - loss_planar(conv.weight - eps * dw, z)) / (
        2 * eps
    )
    # JAX's gradient of a real loss in a complex variable is dL/dRe - i dL/dIm.
    np.testing.assert_allclose(jnp.sum(jnp.real(gp[0] * dw)), fd, rtol=1e-6)


@pytest.mark.parametrize("name", ["modrelu", "cardioid", "crelu", "phase_tanh"])
def test_planar_activations_match_complex(name):
    rng = np.random.default_rng(4)
    c = 4
    cell = ff.FractalCell(c, activation=name, key=jax.random.key(0))
    act = cell.act
    if name == "modrelu":
        act = eqx.tree_at(lambda a: a.bias, act, jnp.asarray(rng.uniform(-1.5, 0.3, c)))
    z = _crandn(rng, 3, c, 5, 5)
    p = ff.to_planar(z)
    np.testing.assert_allclose(ff.from_planar(act.planar(p)), jax.vmap(act)(z), atol=1e-13)
    weights = jnp.asarray(rng.standard_normal(p.shape))

    def lp(a, p):
        return jnp.sum(weights * a.planar(p))

    def lr(a, p):
        return jnp.sum(weights * ff.to_planar(jax.vmap(a)(ff.from_planar(p))))

    gp = eqx.filter_grad(lambda a, p: lp(a, p))(act, p)
    gr = eqx.filter_grad(lambda a, p: lr(a, p))(act, p)
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(gr), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-12)
    np.testing.assert_allclose(jax.grad(lp, 1)(act, p), jax.grad(lr, 1)(act, p), atol=1e-12)


def test_cell_planar_solve_matches_per_field_solve():
    """The planar batch solve reaches the same fixed points and gradients as solving each
    field on its own (through vmap)."""
    rng = np.random.default_rng(5)
    b, c, n = 3, 4, 6
    cell = ff.FractalCell(c, norm_grid=(n, n), key=jax.random.key(3)).normalized()
    cell = eqx.tree_at(
        lambda t: (t.conv.weight, t.act.bias),
        cell,
        (cell.conv.weight.astype(jnp.complex128), jnp.full((c,), -0.2)),
    )
    u = _crandn(rng, b, c, n, n)
    kw = dict(rtol=1e-10, atol=0.0, max_steps=400, throw=True)
    adj = ff.ImplicitAdjoint(rtol=1e-10, atol=0.0, max_steps=400)

    def loss_planar(cell, u):
        op = cell.conv.planar_operator(n, n)
        up = ff.to_planar(u)
        sol = ff.fixed_point(
            lambda p, a: cell.planar_step(op, p, a), jnp.zeros_like(up), up, adjoint=adj, **kw
        )
        return jnp.sum(jnp.abs(ff.from_planar(sol.value)) ** 2), ff.from_planar(sol.value)

    def loss_fields(cell, u):
        op = cell.conv.operator(n, n)

        def one(ui):
            fn = lambda z, a: cell.step_with(op, z, a)  # noqa: E731
            return ff.fixed_point(fn, jnp.zeros_like(ui), ui, adjoint=adj, **kw).value

        z = jax.vmap(one)(u)
        return jnp.sum(jnp.abs(z) ** 2), z

    (lp, zp), gp = eqx.filter_value_and_grad(loss_planar, has_aux=True)(cell, u)
    (lr, zr), gr = eqx.filter_value_and_grad(loss_fields, has_aux=True)(cell, u)
    np.testing.assert_allclose(zp, zr, atol=1e-9)
    # the fixed point really is one
    op = cell.conv.operator(n, n)
    fz = jax.vmap(lambda z, a: cell.step_with(op, z, a))(zp, u)
    np.testing.assert_allclose(fz, zp, atol=1e-9)
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(gr), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-7, atol=1e-9)


def test_operator_errors():
    conv = ff.ToroidalConv(3, 3, key=jax.random.key(0))
    op = conv.planar_operator(6, 6)
    with pytest.raises(ValueError, match="grid"):
        op(jnp.zeros((2, 5, 6, 3, 2)))
    with pytest.raises(ValueError, match="input channels"):
        op(jnp.zeros((2, 6, 6, 4, 2)))
    with pytest.raises(ValueError, match="to_planar"):
        op(jnp.zeros((3, 6, 6, 2), jnp.complex64))
    with pytest.raises(TypeError, match="real"):
        op(jnp.zeros((2, 6, 6, 3, 2), jnp.complex64))
    with pytest.raises(ValueError, match="planar"):
        ff.ModReLU(3).planar(jnp.zeros((2, 6, 6, 4, 2)))


def test_contractive_planar_operator_is_rescaled():
    rng = np.random.default_rng(6)
    cc = ff.ContractiveToroidalConv(3, 3, gamma=0.5, norm_grid=(6, 6), key=jax.random.key(4))
    z = _crandn(rng, 2, 3, 6, 6)
    got = ff.from_planar(cc.planar_operator(6, 6)(ff.to_planar(z)))
    np.testing.assert_allclose(got, jax.vmap(cc)(z), rtol=1e-5, atol=1e-5)
    # the rescaling is active: the raw convolution differs
    assert float(cc.conv.operator_norm(6, 6)) > 0.6
    assert not np.allclose(got, jax.vmap(cc.conv)(z), rtol=1e-3)
