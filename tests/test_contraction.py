import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_field._contraction import ContractiveToroidalConv


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _dense_norm(conv, h, w):
    n = conv.in_channels * h * w
    basis = jnp.eye(n, dtype=jnp.complex128).reshape(n, conv.in_channels, h, w)
    cols = eqx.filter_jit(jax.vmap(lambda c, e: c(e, impl="direct").reshape(-1), (None, 0)))(
        conv, basis
    )
    return np.linalg.svd(np.asarray(cols).T, compute_uv=False)[0]


def _contractive(gamma, norm_grid, seed=0, scale=1.0, **kwargs):
    # eval_shape: structure only (no slow eager init), then an explicit random complex weight.
    cc = eqx.filter_eval_shape(
        ContractiveToroidalConv,
        2,
        3,
        3,
        (1, 2),
        gamma=gamma,
        norm_grid=norm_grid,
        dtype=jnp.complex128,
        key=jax.random.PRNGKey(0),
        **kwargs,
    )
    rng = np.random.default_rng(seed)
    shape = cc.conv.weight.shape
    weight = scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    return eqx.tree_at(lambda c: c.conv.weight, cc, jnp.asarray(weight))


def test_norm_at_most_gamma_dense():
    gamma = 0.9
    cc = _contractive(gamma, (8, 6))
    assert float(cc.conv.operator_norm(8, 6)) > 1  # the raw kernel is not a contraction
    normed = eqx.filter_jit(lambda c: c.normalised())(cc)
    for h, w in [(8, 6), (4, 3), (2, 6), (1, 1)]:  # reference grid and sub-grids
        dense = _dense_norm(normed, h, w)
        assert dense <= gamma * (1 + 1e-12)
        np.testing.assert_allclose(float(cc.lipschitz_bound(h, w)), dense, rtol=1e-10)
    np.testing.assert_allclose(_dense_norm(normed, 8, 6), gamma, rtol=1e-10)
    # Not a divisor of (8, 6): the figure differs but lipschitz_bound still gives it exactly.
    np.testing.assert_allclose(
        float(cc.lipschitz_bound(5, 7)), _dense_norm(normed, 5, 7), rtol=1e-10
    )


def test_real_weights_norm_at_most_gamma_dense():
    """Real weights: the rescaled real map has dense operator norm `gamma` on the reference
    grid, and `lipschitz_bound` is exact on other grids."""
    cc = eqx.filter_eval_shape(
        ContractiveToroidalConv,
        2,
        3,
        3,
        (1, 2),
        gamma=0.9,
        norm_grid=(6, 4),
        dtype=jnp.float64,
        key=jax.random.PRNGKey(0),
    )
    weight = np.random.default_rng(1).standard_normal(cc.conv.weight.shape)
    cc = eqx.tree_at(lambda c: c.conv.weight, cc, jnp.asarray(weight))

    @eqx.filter_jit
    def dense_and_bound(cc, h, w):
        normed = cc.normalised()
        n = cc.in_channels * h * w
        basis = jnp.eye(n, dtype=jnp.float64).reshape(n, cc.in_channels, h, w)
        cols = jax.vmap(lambda e: normed(e, impl="direct").reshape(-1))(basis)
        return cols.T, cc.lipschitz_bound(h, w)

    for h, w in [(6, 4), (3, 5)]:
        dense, bound = dense_and_bound(cc, h, w)
        assert dense.dtype == jnp.float64
        norm = np.linalg.svd(np.asarray(dense), compute_uv=False)[0]
        np.testing.assert_allclose(float(bound), norm, rtol=1e-10)
        if (h, w) == (6, 4):
            np.testing.assert_allclose(norm, 0.9, rtol=1e-10)


def test_small_kernel_unchanged_and_grad():
    cc = _contractive(0.5, (6, 6), seed=1, scale=1e-3)
    np.testing.assert_allclose(np.asarray(cc.normalised().weight), np.asarray(cc.conv.weight))
    big = _contractive(0.5, (6, 6), seed=2)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6)) + 0j)
    grads = eqx.filter_jit(eqx.filter_grad(lambda c: jnp.sum(jnp.abs(c(z)) ** 2)))(big)
    assert bool(jnp.all(jnp.isfinite(grads.conv.weight)))


def test_power_method():
    cc = _contractive(0.8, (6, 6), seed=3, norm_method="power", power_iters=300)
    np.testing.assert_allclose(float(cc.lipschitz_bound(6, 6)), 0.8, rtol=1e-6)
    with pytest.raises(ValueError, match="norm_method"):
        _contractive(0.8, (6, 6), norm_method="qr")


def _conv_at(channels, grid, seed=0):
    cc = ContractiveToroidalConv(
        channels, channels, gamma=0.9, norm_grid=grid, key=jax.random.key(0)
    )
    rng = np.random.default_rng(seed)
    shape = cc.conv.weight.shape
    w = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / 10
    return eqx.tree_at(lambda c: c.conv.weight, cc, jnp.asarray(w, jnp.complex64))


def test_power_default_iterations_match_svd_at_cifar_size():
    # The accelerator default: the estimate (50 steps) and its gradient match the exact SVD.
    with jax.enable_x64(False):
        conv = _conv_at(64, (16, 16))
        s_svd, s_pow = float(conv.scale("svd")), float(conv.scale("power"))
        assert s_svd < 1  # the kernel is rescaled
        np.testing.assert_allclose(s_pow, s_svd, rtol=2e-5)
        grad = eqx.filter_jit(eqx.filter_grad(lambda c, m: c.scale(m)))
        g_svd, g_pow = grad(conv, "svd").conv.weight, grad(conv, "power").conv.weight
        err = jnp.linalg.norm(g_pow - g_svd) / jnp.linalg.norm(g_svd)
        assert float(err) < 1e-3


@pytest.mark.parametrize("channels, method", [(8, "svd"), (40, "power")])
def test_auto_norm_method_on_cpu(channels, method):
    assert jax.default_backend() == "cpu"
    conv = _conv_at(channels, (6, 6), seed=1)
    assert conv.norm_method == "auto"
    assert float(conv.scale()) == float(conv.scale(method))
    other = "power" if method == "svd" else "svd"
    assert float(conv.scale()) != float(conv.scale(other))  # the two methods do differ here
    with pytest.raises(ValueError, match="method"):
        conv.scale("qr")


def _weight_normed(gamma, seed=0, gain_scale=1.0):
    cc = _contractive(gamma, (6, 6), seed=seed, weight_norm=True)
    gain = gain_scale * (0.5 + np.random.default_rng(seed + 1).random(cc.out_channels))
    return eqx.tree_at(lambda c: c.gain, cc, jnp.asarray(gain))


def test_weight_norm_is_gain_times_direction():
    """Each output channel's weights are `gain * v / ||v||`: independent of the direction's
    scale per channel, linear in the gain, and the plain conv at initialisation."""
    cc = _weight_normed(1e6)  # no contraction rescaling at this gamma
    v = cc.conv.weight
    w = np.asarray(cc.normalised().weight)
    vn = np.asarray(v)
    ref = vn / np.sqrt(np.sum(np.abs(vn) ** 2, axis=(0, 2, 3, 4), keepdims=True))
    np.testing.assert_allclose(w, ref * np.asarray(cc.gain)[None, :, None, None, None], rtol=1e-12)
    factors = jnp.asarray([2.0, 0.1, 7.0])[None, :, None, None, None]
    rescaled = eqx.tree_at(lambda c: c.conv.weight, cc, v * factors)
    np.testing.assert_allclose(np.asarray(rescaled.normalised().weight), w, rtol=1e-12)
    # Built with weight_norm=True, the model starts as the plain one (gain = ||v||).
    key = jax.random.PRNGKey(3)
    kw = dict(gamma=0.9, norm_grid=(6, 6), dtype=jnp.complex128, key=key)
    plain = ContractiveToroidalConv(2, 3, **kw)
    normed = ContractiveToroidalConv(2, 3, weight_norm=True, **kw)
    assert normed.weight_norm and not plain.weight_norm
    np.testing.assert_allclose(normed.normalised().weight, plain.normalised().weight, rtol=1e-10)


def test_weight_norm_keeps_the_certificate_and_its_gradient():
    gamma = 0.9
    cc = _weight_normed(gamma, seed=4, gain_scale=50.0)
    normed = eqx.filter_jit(lambda c: c.normalised())(cc)
    np.testing.assert_allclose(_dense_norm(normed, 6, 6), gamma, rtol=1e-10)
    # Gradient with respect to gain and direction against central differences.
    z = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6)) + 0j)

    def loss(gain, v):
        c = eqx.tree_at(lambda c: (c.gain, c.conv.weight), cc, (gain, v))
        return jnp.sum(jnp.abs(c(z)) ** 2)

    g_gain, g_v = jax.jit(jax.grad(loss, argnums=(0, 1)))(cc.gain, cc.conv.weight)
    loss = jax.jit(loss)
    rng = np.random.default_rng(6)
    d_gain = jnp.asarray(rng.standard_normal(cc.gain.shape))
    d_v = jnp.asarray(rng.standard_normal(cc.conv.weight.shape))
    eps = 1e-6
    fd = (
        loss(cc.gain + eps * d_gain, cc.conv.weight + eps * d_v)
        - loss(cc.gain - eps * d_gain, cc.conv.weight - eps * d_v)
    ) / (2 * eps)
    analytic = jnp.vdot(g_gain, d_gain).real + jnp.vdot(g_v, d_v).real  # real directions
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)
