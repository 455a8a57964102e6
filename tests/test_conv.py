import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_field._conv import ToroidalConv, spectrum


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@eqx.filter_jit
def _apply(conv, z, impl):
    return conv(z, impl=impl)


@eqx.filter_jit
def _apply_all(conv, z):
    h, w = z.shape[1:]
    outs = [conv(z, impl=impl) for impl in ("direct", "spectral", "auto")]
    return outs + [conv.operator(h, w, impl=impl)(z) for impl in ("direct", "spectral")]


def _crandn(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _reference(weight, dilations, z):
    """Independent numpy reference: explicit taps with np.roll."""
    d, cout, cin, k, _ = weight.shape
    c = k // 2
    out = np.zeros((cout,) + z.shape[1:], complex)
    for j, r in enumerate(dilations):
        for a in range(k):
            for b in range(k):
                shifted = np.roll(z, (-r * (a - c), -r * (b - c)), axis=(1, 2))
                out += np.einsum("oi,ihw->ohw", weight[j, :, :, a, b], shifted)
    return out


def _dense(conv, h, w):
    """The conv as a dense (cout h w) x (cin h w) matrix, column by column."""
    n = conv.in_channels * h * w
    basis = jnp.eye(n, dtype=conv.weight.dtype).reshape(n, conv.in_channels, h, w)
    cols = eqx.filter_jit(jax.vmap(lambda e: conv(e, impl="direct").reshape(-1)))(basis)
    return np.asarray(cols).T


def _conv(cin, cout, k, dilations, seed=0):
    # eval_shape: only the structure, no (slow to compile) eager initialisation.
    conv = eqx.filter_eval_shape(
        ToroidalConv, cin, cout, k, dilations, dtype=jnp.complex128, key=jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(seed)
    return eqx.tree_at(lambda m: m.weight, conv, jnp.asarray(_crandn(rng, *conv.weight.shape)))


@pytest.mark.parametrize(
    "k,dilations,cin,cout,h,w",
    [
        (1, (1,), 2, 3, 5, 4),
        (3, (1,), 3, 2, 6, 7),
        (3, (1, 2, 4), 2, 2, 8, 8),
        (5, (1, 3), 1, 4, 7, 5),
        (3, (1, 2, 4), 2, 3, 3, 5),  # dilation*k larger than the grid: taps wrap
        (5, (2,), 2, 2, 4, 9),
    ],
)
def test_matches_reference(k, dilations, cin, cout, h, w):
    conv = _conv(cin, cout, k, dilations)
    z = _crandn(np.random.default_rng(1), cin, h, w)
    ref = _reference(np.asarray(conv.weight), dilations, z)
    for out in _apply_all(conv, jnp.asarray(z)):
        assert out.shape == (cout, h, w)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-10)


def test_float32_agreement_and_init():
    conv = eqx.filter_jit(ToroidalConv)(16, 16, 3, (1, 2, 4), key=jax.random.PRNGKey(0))
    z = jnp.asarray(_crandn(np.random.default_rng(0), 16, 28, 28), jnp.complex64)
    d, s = _apply_all(conv, z)[:2]
    assert d.dtype == s.dtype == jnp.complex64
    assert jnp.max(jnp.abs(d - s)) < 1e-4 * jnp.max(jnp.abs(d))
    assert conv.weight.dtype == jnp.complex64
    weight = np.asarray(conv.weight)
    var = np.mean(np.abs(weight) ** 2)
    assert abs(var - 2 / (27 * 32)) / (2 / (27 * 32)) < 0.05
    phase = np.angle(weight)
    assert abs(np.mean(np.cos(phase))) < 0.05 and abs(np.mean(np.sin(phase))) < 0.05


def test_real_input_promoted():
    conv = _conv(2, 2, 3, (1,))
    x = np.random.default_rng(0).standard_normal((2, 5, 5))
    out = _apply(conv, jnp.asarray(x), "auto")
    assert jnp.iscomplexobj(out)
    np.testing.assert_allclose(
        np.asarray(out), _reference(np.asarray(conv.weight), (1,), x), atol=1e-10
    )


@pytest.mark.parametrize("impl", ["direct", "spectral"])
def test_translation_equivariance(impl):
    conv = _conv(2, 3, 3, (1, 2))
    z = _crandn(np.random.default_rng(2), 2, 6, 9)
    shift = (2, -3)
    lhs = _apply(conv, jnp.asarray(np.roll(z, shift, axis=(1, 2))), impl)
    rhs = np.roll(np.asarray(_apply(conv, z, impl)), shift, axis=(1, 2))
    np.testing.assert_allclose(np.asarray(lhs), rhs, atol=1e-10)


@pytest.mark.parametrize("impl", ["direct", "spectral"])
def test_vjp_is_linear_transpose(impl):
    conv = _conv(2, 3, 3, (1, 2))
    rng = np.random.default_rng(3)
    h, w = 5, 6
    z = jnp.asarray(_crandn(rng, 2, h, w))
    ct = jnp.asarray(_crandn(rng, 3, h, w))

    def plain(weight, z):
        return jnp.asarray(_reference_jnp(weight, conv.dilations, z))

    def ours(weight, z):
        return eqx.tree_at(lambda m: m.weight, conv, weight)(z, impl=impl)

    @jax.jit
    def both(weight, z, ct, zs, cts):
        out, vjp = jax.vjp(ours, weight, z)
        out_ref, vjp_ref = jax.vjp(plain, weight, z)
        # Batched, as a DEQ uses it.
        _, vjp_b = jax.vjp(lambda wt, zs: jax.vmap(lambda z: ours(wt, z))(zs), weight, zs)
        return out, out_ref, vjp(ct), vjp_ref(ct), vjp_b(cts)

    zs = jnp.stack([z, 2 * z])
    cts = jnp.stack([ct, -ct])
    out, out_ref, g, g_ref, (gw, gz) = both(conv.weight, z, ct, zs, cts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9)
    np.testing.assert_allclose(np.asarray(gw), -np.asarray(g_ref[0]), atol=1e-9)
    np.testing.assert_allclose(np.asarray(gz[1]), -np.asarray(g_ref[1]), atol=1e-9)


def _reference_jnp(weight, dilations, z):
    d, cout, cin, k, _ = weight.shape
    c = k // 2
    out = 0
    for j, r in enumerate(dilations):
        for a in range(k):
            for b in range(k):
                shifted = jnp.roll(z, (-r * (a - c), -r * (b - c)), axis=(1, 2))
                out = out + jnp.einsum("oi,ihw->ohw", weight[j, :, :, a, b], shifted)
    return out


def test_grad_inside_while_loop():
    conv = _conv(2, 2, 3, (1, 2), seed=4)
    conv = eqx.tree_at(lambda m: m.weight, conv, conv.weight * 0.02)
    z0 = jnp.asarray(_crandn(np.random.default_rng(4), 2, 6, 6))

    def loss(conv, impl):
        op = conv.operator(6, 6, impl=impl)
        z = jax.lax.fori_loop(0, 5, lambda i, z: op(z) + z0, z0)
        return jnp.sum(jnp.abs(z) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    gd = grad(conv, "direct").weight
    gs = grad(conv, "spectral").weight
    np.testing.assert_allclose(np.asarray(gd), np.asarray(gs), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "k,dilations,cin,cout,h,w", [(3, (1,), 2, 3, 4, 5), (3, (1, 2), 3, 2, 6, 6)]
)
def test_operator_norm_exact(k, dilations, cin, cout, h, w):
    conv = _conv(cin, cout, k, dilations, seed=5)
    dense = _dense(conv, h, w)
    np.testing.assert_allclose(
        np.asarray(
            _reference(
                np.asarray(conv.weight), dilations, np.eye(cin * h * w)[0].reshape(cin, h, w)
            )
        ).reshape(-1),
        dense[:, 0],
        atol=1e-10,
    )
    exact = np.linalg.svd(dense, compute_uv=False)[0]
    np.testing.assert_allclose(float(eqx.filter_jit(conv.operator_norm)(h, w)), exact, rtol=1e-10)
    est = float(eqx.filter_jit(conv.operator_norm_estimate)(h, w, iters=200))
    assert est <= exact * (1 + 1e-10)
    np.testing.assert_allclose(est, exact, rtol=1e-6)
    # The reshaped-kernel matrix norm is only a lower bound.
    flat = np.asarray(conv.weight).transpose(1, 0, 2, 3, 4).reshape(cout, -1)
    assert np.linalg.norm(flat, 2) <= exact * (1 + 1e-10)


def test_spectrum_is_fft_of_embedded_kernel():
    conv = _conv(2, 2, 3, (1, 3), seed=6)
    h, w = 5, 7
    emb = np.zeros((2, 2, h, w), complex)
    c = 1
    for j, r in enumerate(conv.dilations):
        for a in range(3):
            for b in range(3):
                emb[:, :, (-r * (a - c)) % h, (-r * (b - c)) % w] += np.asarray(conv.weight)[
                    j, :, :, a, b
                ]
    np.testing.assert_allclose(
        np.asarray(spectrum(conv.weight, conv.dilations, h, w)), np.fft.fft2(emb), atol=1e-10
    )


def test_bad_input():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="odd"):
        ToroidalConv(2, 2, 4, key=key)
    with pytest.raises(ValueError, match="dilations"):
        ToroidalConv(2, 2, 3, (0,), key=key)
    with pytest.raises(ValueError, match="impl"):
        ToroidalConv(2, 2, 3, impl="fft", key=key)
    with pytest.raises(TypeError, match="complex or real floating"):
        ToroidalConv(2, 2, 3, dtype=jnp.int32, key=key)
    conv = eqx.filter_eval_shape(ToroidalConv, 2, 3, 3, key=key)
    with pytest.raises(ValueError, match="shape"):
        conv(np.zeros((1, 2, 5, 5), np.complex64))
    with pytest.raises(ValueError, match="channels"):
        conv(np.zeros((3, 5, 5), np.complex64))
    with pytest.raises(TypeError, match="dtype"):
        conv(np.zeros((2, 5, 5), np.int32))
    op = eqx.filter_eval_shape(conv.operator, 5, 5)
    with pytest.raises(ValueError, match="grid"):
        eqx.filter_eval_shape(op, np.zeros((2, 6, 5), np.complex64))


def _real_conv(cin, cout, k, dilations, seed=0):
    conv = eqx.filter_eval_shape(
        ToroidalConv, cin, cout, k, dilations, dtype=jnp.float64, key=jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(seed)
    return eqx.tree_at(
        lambda m: m.weight, conv, jnp.asarray(rng.standard_normal(conv.weight.shape))
    )


@pytest.mark.parametrize(
    "k,dilations,cin,cout,h,w", [(3, (1,), 2, 3, 4, 5), (3, (1, 2), 3, 2, 6, 6)]
)
def test_real_weights_map_real_fields_with_exact_norm_and_transpose(k, dilations, cin, cout, h, w):
    """Real weights: every implementation gives the real correlation (odd and even widths for
    `irfft2`), the operator norm is the dense real matrix's, the VJP is its transpose."""
    conv = _real_conv(cin, cout, k, dilations, seed=7)
    assert conv.real
    rng = np.random.default_rng(8)
    z = rng.standard_normal((cin, h, w))
    ref = _reference(np.asarray(conv.weight), dilations, z)
    for out in _apply_all(conv, jnp.asarray(z)):
        assert out.dtype == jnp.float64 and out.shape == (cout, h, w)
        np.testing.assert_allclose(np.asarray(out), ref.real, rtol=1e-10, atol=1e-10)
    ct = rng.standard_normal((cout, h, w))

    @eqx.filter_jit
    def dense_norm_and_vjps(conv, z, ct):
        n = cin * h * w
        basis = jnp.eye(n, dtype=jnp.float64).reshape(n, cin, h, w)
        cols = jax.vmap(lambda e: conv(e, impl="direct").reshape(-1))(basis)
        vjps = [
            jax.vjp(lambda z, i=i: conv(z, impl=i), z)[1](ct)[0] for i in ("direct", "spectral")
        ]
        return cols.T, conv.operator_norm(h, w), vjps

    dense, norm, vjps = dense_norm_and_vjps(conv, jnp.asarray(z), jnp.asarray(ct))
    assert dense.dtype == jnp.float64
    np.testing.assert_allclose(float(norm), np.linalg.svd(dense, compute_uv=False)[0], rtol=1e-10)
    for gz in vjps:
        np.testing.assert_allclose(np.asarray(gz).reshape(-1), dense.T @ ct.reshape(-1), atol=1e-10)
    with pytest.raises(TypeError, match="real weights"):
        conv(jnp.asarray(_crandn(rng, cin, h, w)))
    with pytest.raises(ValueError, match="planar"):
        conv.planar_operator(h, w)


def test_real_init_has_the_complex_init_second_moment():
    conv = eqx.filter_jit(ToroidalConv)(
        16, 16, 3, (1, 2, 4), dtype=jnp.float32, key=jax.random.PRNGKey(0)
    )
    assert conv.weight.dtype == jnp.float32
    var = float(np.mean(np.asarray(conv.weight) ** 2))
    assert abs(var - 2 / (27 * 32)) / (2 / (27 * 32)) < 0.05


#
# `ff.toroidal_correlate`: the channels-last correlation behind `impl="direct"`.
#


def _lax_reference(x, kernel, dilations):
    """Independent implementation: wrap padding + `lax.conv_general_dilated`, per scale."""
    k = kernel.shape[1]
    out = 0
    for j, r in enumerate(dilations):
        p = r * (k // 2)
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="wrap")
        out = out + jax.lax.conv_general_dilated(
            xp,
            kernel[j],
            (1, 1),
            "VALID",
            rhs_dilation=(r, r),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return out


@pytest.mark.parametrize("dtype", ["real", "complex", "mixed"])
@pytest.mark.parametrize(
    "k,dilations,shape",
    [((3), (1,), (2, 6, 7, 3, 4)), (3, (1, 2), (1, 8, 5, 2, 2)), (5, (1, 3), (2, 4, 9, 2, 3))],
)
def test_toroidal_correlate_matches_lax(dtype, k, dilations, shape):
    import fractal_field as ff

    n, h, w, cin, cout = shape
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, h, w, cin))
    kern = rng.standard_normal((len(dilations), k, k, cin, cout))
    if dtype in ("complex", "mixed"):
        kern = kern + 1j * rng.standard_normal(kern.shape)
    if dtype == "complex":
        x = x + 1j * rng.standard_normal(x.shape)
    x, kern = jnp.asarray(x), jnp.asarray(kern)
    out = jax.jit(ff.toroidal_correlate, static_argnums=2)(x, kern, dilations)
    ref = _lax_reference(x.astype(out.dtype), kern, dilations)
    assert out.shape == (n, h, w, cout) and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-10)
    # Periodic: a circular shift of the input shifts the output.
    shifted = ff.toroidal_correlate(jnp.roll(x, (2, -3), axis=(1, 2)), kern, dilations)
    np.testing.assert_allclose(
        np.asarray(shifted), np.roll(np.asarray(out), (2, -3), axis=(1, 2)), atol=1e-10
    )


@pytest.mark.parametrize("complex_", [False, True])
def test_toroidal_correlate_gradients(complex_):
    import fractal_field as ff

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6, 2))
    kern = rng.standard_normal((2, 3, 3, 2, 3))
    if complex_:
        x = x + 1j * rng.standard_normal(x.shape)
        kern = kern + 1j * rng.standard_normal(kern.shape)
    x, kern = jnp.asarray(x), jnp.asarray(kern)
    weights = jnp.asarray(rng.standard_normal((2, 5, 6, 3)))

    def loss(f, x, kern):
        y = f(x, kern, (1, 2))
        return jnp.sum(weights * jnp.tanh(jnp.abs(y) ** 2 / 10))

    ours = jax.jit(jax.grad(lambda x, k: loss(ff.toroidal_correlate, x, k), (0, 1)))(x, kern)
    ref = jax.grad(lambda x, k: loss(_lax_reference, x, k), (0, 1))(x, kern)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10)
    # And against a central finite difference along a random direction (real part).
    dk = rng.standard_normal(kern.shape)
    if complex_:
        dk = dk + 1j * rng.standard_normal(kern.shape)
    dk = jnp.asarray(dk)
    eps = 1e-6
    fd = (
        loss(ff.toroidal_correlate, x, kern + eps * dk)
        - loss(ff.toroidal_correlate, x, kern - eps * dk)
    ) / (2 * eps)
    # JAX's gradient of a real loss in a complex variable is dL/dRe - i dL/dIm.
    analytic = jnp.sum(jnp.real(ours[1] * dk))
    np.testing.assert_allclose(float(fd), float(analytic), rtol=1e-6)
    # vmap over an extra leading axis agrees with the batch axis.
    xs = jnp.stack([x, 2 * x])
    vm = jax.vmap(lambda xi: ff.toroidal_correlate(xi, kern, (1, 2)))(xs)
    np.testing.assert_allclose(
        np.asarray(vm[1]), 2 * np.asarray(ff.toroidal_correlate(x, kern, (1, 2))), atol=1e-10
    )


def test_toroidal_correlate_bad_input():
    import fractal_field as ff

    x = jnp.zeros((1, 5, 5, 2))
    with pytest.raises(ValueError, match="kernel must have shape"):
        ff.toroidal_correlate(x, jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="odd"):
        ff.toroidal_correlate(x, jnp.zeros((1, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match="dilations"):
        ff.toroidal_correlate(x, jnp.zeros((2, 3, 3, 2, 2)), (1,))
    with pytest.raises(ValueError, match="x must have shape"):
        ff.toroidal_correlate(jnp.zeros((5, 5, 2)), jnp.zeros((1, 3, 3, 2, 2)))
    with pytest.raises(ValueError, match="channels"):
        ff.toroidal_correlate(x, jnp.zeros((1, 3, 3, 3, 2)))
    with pytest.raises(ValueError, match="positive"):
        ff.toroidal_correlate(x, jnp.zeros((1, 3, 3, 2, 2)), (0,))
    with pytest.raises(TypeError, match="floating or complex"):
        ff.toroidal_correlate(x.astype(jnp.int32), jnp.zeros((1, 3, 3, 2, 2), jnp.int32))


#
# Mixed precision: `precision="bfloat16"` (bfloat16 operands, float32 accumulation).
#

LAYOUTS = ("direct", "spectral", "planar")


def _bf16(x) -> np.ndarray:
    """Real (and imaginary) parts rounded to bfloat16, in float64/complex128."""
    x = np.asarray(x)

    def rnd(a):
        return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)

    return rnd(x.real) + 1j * rnd(x.imag) if np.iscomplexobj(x) else rnd(x)


def _mixed_conv(precision="bfloat16", cin=3, cout=2):
    """A complex64 two-scale 3x3 conv (operator norm about 1) at `precision`."""
    conv = eqx.filter_eval_shape(
        ToroidalConv, cin, cout, 3, (1, 2), precision=precision, key=jax.random.PRNGKey(0)
    )
    weight = _crandn(np.random.default_rng(5), *conv.weight.shape) / 8
    return eqx.tree_at(lambda m: m.weight, conv, jnp.asarray(weight, jnp.complex64))


def _field(seed, c=3, h=6, w=8):
    return jnp.asarray(_crandn(np.random.default_rng(seed), c, h, w), jnp.complex64)


@eqx.filter_jit
def _apply_layout(conv, z, layout):
    import fractal_field as ff

    h, w = z.shape[1:]
    if layout == "planar":
        return ff.from_planar(conv.planar_operator(h, w)(ff.to_planar(z[None])))[0]
    return conv.operator(h, w, impl=layout)(z)


def test_bfloat16_direct_is_exact_on_bfloat16_inputs():
    # Products of bfloat16 numbers are exact in float32: on operands that are already
    # bfloat16, only float32 accumulation separates the result from the exact one.
    conv = _mixed_conv()
    weight = _bf16(conv.weight)
    conv = eqx.tree_at(lambda m: m.weight, conv, jnp.asarray(weight, jnp.complex64))
    z = _bf16(_field(6))
    out = _apply_layout(conv, jnp.asarray(z, jnp.complex64), "direct")
    ref = _reference(weight, conv.dilations, z)
    assert out.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_bfloat16_spectral_rounds_the_mixing_operands_only():
    # The FFTs stay complex64; the per-frequency mixing multiplies the bfloat16-rounded planes
    # of the field's spectrum by the bfloat16-rounded block matrices, accumulating in float32.
    conv, z = _mixed_conv(), _field(6)
    out = _apply_layout(conv, z, "spectral")
    op = conv.operator(6, 8, impl="spectral")
    zf = np.asarray(jnp.fft.fft2(z)).reshape(3, 48)
    planes = _bf16(np.concatenate([zf.real, zf.imag]))
    yf = np.einsum("fio,if->of", _bf16(op.block), planes)
    ref = np.fft.ifft2((yf[:2] + 1j * yf[2:]).reshape(2, 6, 8))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_conv_within_bfloat16_rounding_of_float32(layout):
    conv, z = _mixed_conv(), _field(7)
    ref = _reference(np.asarray(conv.weight, np.complex128), conv.dilations, np.asarray(z))
    out = _apply_layout(conv, z, layout)
    exact = _apply_layout(_mixed_conv("float32"), z, layout)
    assert out.dtype == exact.dtype == jnp.complex64
    err = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    # A few bfloat16 roundings (unit roundoff 2^-9 = 0.002) against float32's 1e-7.
    assert 1e-4 < err < 1e-2
    assert np.linalg.norm(np.asarray(exact) - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_gradients_and_products(layout):
    z, ct = _field(8), _field(9, c=2)

    def loss(conv, z):
        y = _apply_layout(conv, z, layout)
        return jnp.sum(jnp.real(jnp.conj(ct) * y) + 0.1 * jnp.abs(y) ** 2)

    grad = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))
    g32 = grad(_mixed_conv("float32"), z)
    gbf = grad(_mixed_conv(), z)
    for a, b in [(g32[0].weight, gbf[0].weight), (g32[1], gbf[1])]:
        assert b.dtype == a.dtype == jnp.complex64
        assert jnp.linalg.norm(b - a) / jnp.linalg.norm(a) < 1e-2
    # Every real matrix product of the layout's application, forward and backward, takes
    # bfloat16 operands and accumulates in float32.
    op = eqx.filter_eval_shape(
        lambda c: c.planar_operator(6, 8) if layout == "planar" else c.operator(6, 8, impl=layout),
        _mixed_conv(),
    )
    x = jax.ShapeDtypeStruct((2, 6, 8, 3, 1), jnp.float32) if layout == "planar" else z
    jaxpr = jax.make_jaxpr(lambda op, x: jax.vjp(op, x)[1](op(x)))(op, x)
    dots = _find_eqns(jaxpr.jaxpr, "dot_general")
    assert len(dots) >= 2
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32


def _find_eqns(jaxpr, name):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _find_eqns(sub, name)
    return out


def test_with_precision_sets_every_conv_and_shares_weights():
    import fractal_field as ff

    key = jax.random.PRNGKey(0)
    cell = eqx.filter_eval_shape(ff.FractalCell, 4, hidden=6, norm_grid=(8, 8), key=key)
    multi = eqx.filter_eval_shape(ff.MultiScaleCell, (4, 2), norm_grid=(8, 8), key=key)
    for tree in (cell, multi):
        mixed = ff.with_precision(tree, "bfloat16")
        convs = [x for x in jax.tree_util.tree_leaves(mixed, is_leaf=_is_conv) if _is_conv(x)]
        before = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_conv) if _is_conv(x)]
        assert len(convs) == len(before) >= 2
        assert all(c.precision == "bfloat16" for c in convs)
        assert all(b.precision == "float32" for b in before)
        assert all(c.weight is b.weight for c, b in zip(convs, before, strict=True))
        assert eqx.tree_equal(ff.with_precision(mixed, "float32"), tree)


def _is_conv(x):
    return isinstance(x, ToroidalConv)


def test_precision_bad_values():
    import fractal_field as ff

    key = jax.random.PRNGKey(0)
    for bad in ("float16", "bf16", jnp.bfloat16, None):
        with pytest.raises(ValueError, match=r"ToroidalConv\(precision=.*'bfloat16'"):
            ToroidalConv(2, 2, 3, precision=bad, key=key)
    with pytest.raises(ValueError, match=r"with_precision\(precision='half'\)"):
        ff.with_precision(_mixed_conv(), "half")
    with pytest.raises(ValueError, match=r"toroidal_correlate\(precision='fp8'\)"):
        ff.toroidal_correlate(jnp.zeros((1, 5, 5, 2)), jnp.zeros((1, 3, 3, 2, 2)), precision="fp8")
