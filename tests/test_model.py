"""The fractal cell and the classifier models."""

from pathlib import Path

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from _reference import np_correlate, to_float64

import fractal_field as ff

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_nano.py"


@pytest.mark.parametrize(
    "preset, limit, lower", [("nano", 20_000, 10_000), ("cifar_small", 170_000, 80_000)]
)
def test_preset_parameter_counts(preset, limit, lower):
    model = ff.make_model(preset, key=jr.PRNGKey(0))
    n = ff.count_params(model)
    assert lower < n < limit
    # A complex weight counts twice.
    w = model.cell.conv.conv.weight
    assert jnp.iscomplexobj(w)
    assert f"{n:,}" in ff.param_summary(model)
    # The same count from shapes alone (no weights initialised).
    shapes = eqx.filter_eval_shape(ff.make_model, preset, key=jr.PRNGKey(0))
    assert ff.count_params(shapes) == n


@pytest.mark.parametrize("activation", ["modrelu", "crelu", "phase_tanh"])
def test_cell_is_certified_contraction_with_unique_fixed_point(activation):
    key = jr.PRNGKey(1)
    cell = ff.FractalCell(6, gamma=0.8, norm_grid=(8, 8), activation=activation, key=key)
    # Make the raw kernel large so the normalisation is active.
    cell = eqx.tree_at(lambda c: c.conv.conv.weight, cell, cell.conv.conv.weight * 10)
    bound = float(cell.lipschitz_bound(8, 8))
    assert bound < 1
    # Empirical Lipschitz ratio never exceeds the certificate.
    k1, k2, k3 = jr.split(jr.PRNGKey(2), 3)
    inj = jr.normal(k1, (6, 8, 8), jnp.complex64)
    za = jr.normal(k2, (16, 6, 8, 8), jnp.complex64)
    zb = za + 0.1 * jr.normal(k3, (16, 6, 8, 8), jnp.complex64)
    fa = jax.vmap(cell, (0, None))(za, inj)
    fb = jax.vmap(cell, (0, None))(zb, inj)
    ratio = jnp.linalg.norm((fa - fb).reshape(16, -1), axis=1) / jnp.linalg.norm(
        (za - zb).reshape(16, -1), axis=1
    )
    assert float(ratio.max()) <= bound + 1e-5
    # Random starts reach the same fixed point with plain iteration.
    starts = 5 * jr.normal(jr.PRNGKey(3), (4, 6, 8, 8), jnp.complex64)
    sols = jax.vmap(
        lambda z0: ff.fixed_point(
            cell, z0, inj, solver=ff.Naive(), max_steps=500, rtol=1e-6, atol=0
        )
    )(starts)
    assert bool(jnp.all(sols.result == ff.RESULTS.successful))
    spread = jnp.max(jnp.abs(sols.value - sols.value[0]))
    assert float(spread) < 1e-4 * float(jnp.max(jnp.abs(sols.value[0])) + 1)


def test_cell_is_resolution_agnostic_and_equivariant():
    cell = ff.FractalCell(4, norm_grid=(8, 8), key=jr.PRNGKey(0))
    for h, w in [(8, 8), (4, 4), (6, 10)]:
        z = jr.normal(jr.PRNGKey(h), (4, h, w), jnp.complex64)
        x = jr.normal(jr.PRNGKey(w), (4, h, w), jnp.complex64)
        out = cell(z, x)
        assert out.shape == z.shape and out.dtype == z.dtype
        shifted = cell(jnp.roll(z, (1, 2), (1, 2)), jnp.roll(x, (1, 2), (1, 2)))
        np.testing.assert_allclose(shifted, jnp.roll(out, (1, 2), (1, 2)), atol=1e-5)


def test_model_forward_jit_vmap_and_stats():
    model = ff.make_model("tiny", key=jr.PRNGKey(0))
    x = jr.normal(jr.PRNGKey(1), (5, 1, 8, 8))
    logits, sol = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
    assert logits.shape == (5, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert sol.stats.num_steps.shape == (5,)
    assert bool(jnp.all(sol.result == ff.RESULTS.successful))
    # Per-sample: each equals the unbatched call.
    l0, s0 = model(x[0])
    np.testing.assert_allclose(l0, logits[0], rtol=1e-4, atol=1e-5)
    assert int(s0.stats.num_steps) == int(sol.stats.num_steps[0])


def test_multigrid_and_anderson_models_agree():
    model = ff.make_model("tiny", key=jr.PRNGKey(0), rtol=1e-6, max_steps=200)
    x = jr.normal(jr.PRNGKey(1), (1, 8, 8))
    la, sa = model(x)
    lm, sm = model(x, solver=ff.Multigrid(levels=2))
    assert sm.result == ff.RESULTS.successful
    np.testing.assert_allclose(la, lm, rtol=1e-3, atol=1e-4)


def test_bad_image_shape_is_a_clear_error():
    model = ff.make_model("tiny", key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="unbatched"):
        model(jnp.zeros((2, 1, 8, 8)))


def _tight_tiny(rtol: float, **overrides):
    """The tiny preset in float64, forward and backward solves to `rtol` (call under x64)."""
    return to_float64(
        ff.make_model(
            "tiny",
            key=jr.PRNGKey(0),
            rtol=rtol,
            atol=0.0,
            max_steps=300,
            learn_alpha=True,
            adjoint=ff.ImplicitAdjoint(rtol=rtol, atol=0.0, max_steps=300),
            **overrides,
        )
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"field": "real", "channels": 6},
        # Two scales, read by HRNet's head.
        {"scales": 2, "channels": (4, 6), "readout_pyramid": (2, 3), "readout_final": 4},
    ],
    ids=["one", "real", "two_pyramid"],
)
def test_whole_model_gradient_matches_finite_differences(overrides):
    with jax.enable_x64(True):
        model = _tight_tiny(1e-12, **overrides)
        x = jr.normal(jr.PRNGKey(1), (2, 1, 8, 8), jnp.float64)
        y = jnp.array([3, 7])
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(p):
            m = eqx.combine(p, static)
            logits, _ = jax.vmap(m)(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])

        grads = jax.jit(jax.grad(loss))(params)
        jloss = jax.jit(loss)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        gleaves = jax.tree_util.tree_leaves(grads)
        rng = np.random.default_rng(0)
        eps = 1e-6
        checked = 0
        for i, (p, g) in enumerate(zip(leaves, gleaves, strict=True)):
            flat = np.asarray(p).reshape(-1)
            for j in rng.choice(flat.size, size=min(2, flat.size), replace=False):
                directions = [1.0, 1j] if np.iscomplexobj(flat) else [1.0]
                for d in directions:

                    def shifted(s, i=i, j=j, d=d, flat=flat, p=p):
                        new = flat.copy()
                        new[j] += s * d
                        ls = list(leaves)
                        ls[i] = jnp.asarray(new.reshape(np.shape(p)))
                        return float(jloss(jax.tree_util.tree_unflatten(treedef, ls)))

                    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
                    gj = np.asarray(g).reshape(-1)[j]
                    # JAX convention: grad = dL/dRe - i dL/dIm.
                    an = np.real(gj) if d == 1.0 else -np.imag(gj)
                    np.testing.assert_allclose(an, fd, rtol=1e-4, atol=1e-7)
                    checked += 1
        assert checked >= 10


@pytest.mark.parametrize("hidden", [0, 4])
def test_readout_matches_slice_means_reference(hidden):
    """Adaptive pooling (averaging matrices) against a direct slice-and-mean reference, on an
    uneven grid where bins differ in size; with `hidden`, the per-site ReLU head first."""
    ro = ff.Readout(3, 5, grid=3, phase_features=True, hidden=hidden, key=jr.PRNGKey(0))
    z = jr.normal(jr.PRNGKey(1), (3, 7, 10), jnp.complex64)
    zn = np.asarray(z)
    mag = np.sqrt(np.abs(zn) ** 2 + 1e-12)
    f = np.concatenate([mag, np.real(zn), np.imag(zn)])
    if hidden:
        w, b = np.asarray(ro.heads[0].weight), np.asarray(ro.heads[0].bias)
        f = np.maximum(np.tensordot(w, f, axes=(1, 0)) + b[:, None, None], 0.0)
        assert f.shape == (hidden, 7, 10)
    hb, wb = [0, 2, 5, 7], [0, 3, 7, 10]  # np.linspace(0, n, 4).round()
    ref = np.stack(
        [
            np.stack(
                [f[:, hb[i] : hb[i + 1], wb[j] : wb[j + 1]].mean((1, 2)) for j in range(3)], -1
            )
            for i in range(3)
        ],
        -2,
    )
    want = ro.linear(jnp.asarray(ref.reshape(-1), jnp.float32))
    np.testing.assert_allclose(ro(z), want, rtol=1e-5, atol=1e-5)


def test_readout_head_keeps_headless_weights_and_shapes():
    """`hidden=0` draws the same linear weights as a readout without the option; a multi-scale
    state gets one head per scale; a negative size is refused."""
    key = jr.PRNGKey(3)
    plain, head = ff.Readout(4, 10, grid=2, key=key), ff.Readout(4, 10, grid=2, hidden=0, key=key)
    assert head.heads is None
    np.testing.assert_array_equal(plain.linear.weight, head.linear.weight)
    ms = ff.Readout((4, 6), 10, grid=2, phase_features=True, hidden=5, key=key)
    assert [h.weight.shape for h in ms.heads] == [(5, 12), (5, 18)]
    assert ms.linear.weight.shape == (10, 5 * 4 + 5 * 1)
    z = (jnp.ones((4, 4, 4), jnp.complex64), jnp.ones((6, 2, 2), jnp.complex64))
    assert ms(z).shape == (10,)
    with pytest.raises(ValueError, match="hidden=-1"):
        ff.Readout(4, 10, hidden=-1, key=key)


def _np_conv(x, conv, stride=1):
    """A circular (toroidal) convolution by shifted copies: `out[o, i, j] = b[o] + sum w[o, c,
    di, dj] x[c, s i + di - k // 2, s j + dj - k // 2]`, indices modulo the grid."""
    w = np.asarray(conv.weight, np.float64)
    k = w.shape[-1]
    out = np.zeros((w.shape[0],) + x.shape[1:])
    for di in range(k):
        for dj in range(k):
            shifted = np.roll(x, (k // 2 - di, k // 2 - dj), axis=(1, 2))
            out += np.tensordot(w[:, :, di, dj], shifted, axes=(1, 0))
    if conv.bias is not None:
        out += np.asarray(conv.bias, np.float64).reshape(-1, 1, 1)
    return out[:, ::stride, ::stride]


def _np_group_norm(x, norm):
    c, h, w = x.shape
    g = x.reshape(norm.groups, -1)
    g = (g - g.mean(1, keepdims=True)) / np.sqrt(g.var(1, keepdims=True) + norm.eps)
    scale, shift = np.asarray(norm.weight), np.asarray(norm.bias)
    return g.reshape(c, h, w) * scale[:, None, None] + shift[:, None, None]


def _np_pyramid(head, xs):
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731

    def block(b, x):
        y = relu(_np_group_norm(_np_conv(x, b.conv1), b.norm1))
        y = relu(_np_group_norm(_np_conv(y, b.conv2), b.norm2))
        y = _np_group_norm(_np_conv(y, b.conv3), b.norm3)
        r = x if b.skip is None else _np_group_norm(_np_conv(x, b.skip[0]), b.skip[1])
        return relu(y + r)

    y = block(head.blocks[0], xs[0])
    for (conv, norm), b, x in zip(head.downs, head.blocks[1:], xs[1:], strict=True):
        y = relu(_np_group_norm(_np_conv(y, conv, stride=2), norm)) + block(b, x)
    return relu(_np_group_norm(_np_conv(y, head.final[0]), head.final[1]))


def test_pyramid_head_matches_numpy_reference_and_is_torus_equivariant():
    """HRNet's head against shifted-copy circular convolutions and a direct group norm, with
    a widening skip (scale 0) and an identity one (scale 1); shifting the fine map by two
    sites and the coarse one by one shifts the output by one site."""
    head = ff.PyramidHead((6, 12), (2, 3), 5, norm_groups=2, key=jr.PRNGKey(0))
    assert head.blocks[0].skip is not None and head.blocks[1].skip is None
    # Random norm affines, so that the reference checks where they enter.
    leaves, treedef = jax.tree_util.tree_flatten(head)
    keys = jr.split(jr.PRNGKey(1), len(leaves))
    leaves = [
        x + 0.3 * jr.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    head = jax.tree_util.tree_unflatten(treedef, leaves)
    xs = (
        jr.normal(jr.PRNGKey(2), (6, 8, 8), jnp.float32),
        jr.normal(jr.PRNGKey(3), (12, 4, 4), jnp.float32),
    )
    run = eqx.filter_jit(head)
    got = np.asarray(run(xs))
    assert got.shape == (5, 4, 4) and head.out_channels == 5
    want = _np_pyramid(head, [np.asarray(x, np.float64) for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    shifted = run((jnp.roll(xs[0], (2, 2), (1, 2)), jnp.roll(xs[1], (1, 1), (1, 2))))
    np.testing.assert_allclose(shifted, np.roll(got, (1, 1), (1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pyramid": (2,)}, "final_channels"),
        ({"final_channels": 8}, "final_channels"),
        ({"pyramid": (2,), "final_channels": 8, "hidden": 4}, "hidden=4"),
        ({"pyramid": (2, 3), "final_channels": 8}, "one width per scale"),
        ({"pyramid": (0,), "final_channels": 8}, "must be >= 1"),
    ],
)
def test_readout_pyramid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ff.Readout(4, 10, key=jr.PRNGKey(0), **kwargs)


def test_readout_pyramid_pools_the_head_and_checks_grids():
    """The pyramid readout is the linear layer on the head's map pooled to the coarsest
    scale's bins; a coarse field that is not half the fine one is a clear error."""
    ro = ff.Readout(
        (4, 6), 10, grid=4, phase_features=True, pyramid=(2, 3), final_channels=5,
        key=jr.PRNGKey(0),
    )  # fmt: skip
    assert ro.heads is None and ro.linear.weight.shape == (10, 5 * 2 * 2)
    z = (jr.normal(jr.PRNGKey(1), (4, 8, 8), jnp.complex64),
         jr.normal(jr.PRNGKey(2), (6, 4, 4), jnp.complex64))  # fmt: skip
    site = [np.concatenate([np.abs(zi), np.real(zi), np.imag(zi)]).astype(np.float32) for zi in z]
    m = np.asarray(eqx.filter_jit(ro.pyramid)([jnp.asarray(f) for f in site]))  # (5, 4, 4)
    pooled = m.reshape(5, 2, 2, 2, 2).mean((2, 4))
    want = ro.linear(jnp.asarray(pooled.reshape(-1)))
    np.testing.assert_allclose(eqx.filter_jit(ro)(z), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not half"):
        eqx.filter_eval_shape(ro, (z[0], jnp.ones((6, 8, 8), jnp.complex64)))


@pytest.mark.parametrize(
    "channels, kwargs",
    [
        (5, {"grid": 3, "phase_features": True}),
        (5, {"grid": 2, "hidden": 4, "dropout": 0.3}),
        ((4, 6), {"grid": 4, "phase_features": True, "dropout": 0.3}),
        (5, {"grid": 2, "pyramid": (2,), "final_channels": 3}),
    ],
    ids=["phase", "head_dropout", "two_scales", "pyramid"],
)
def test_readout_on_planar_fields_is_vmap_of_the_readout(channels, kwargs):
    """`Readout.planar` on a planar batch: the per-image readout of `ff.from_planar`, in
    values and parameter gradients, with and without dropout keys."""
    ro = ff.Readout(channels, 7, key=jr.PRNGKey(0), **kwargs)
    chans = (channels,) if isinstance(channels, int) else channels
    zs = tuple(
        jr.normal(jr.PRNGKey(1 + s), (3, c, 8 >> s, 8 >> s), jnp.complex64)
        for s, c in enumerate(chans)
    )
    ps = tuple(ff.to_planar(z) for z in zs)
    arg = lambda t: t if len(t) > 1 else t[0]  # noqa: E731
    keys = jr.split(jr.PRNGKey(9), 3)

    @eqx.filter_jit
    def both(r, k):
        planar = lambda r: r.planar(arg(ps), keys=k)  # noqa: E731
        per_image = lambda r: jax.vmap(lambda z, ki: r(z, key=ki))(arg(zs), k)  # noqa: E731
        return [
            (f(r), eqx.filter_grad(lambda r, f=f: jnp.sum(jnp.sin(f(r))))(r))
            for f in (planar, per_image)
        ]

    for k in (None, keys):
        (got, got_grad), (want, want_grad) = both(ro, k)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        leaves = map(jax.tree_util.tree_leaves, (got_grad, want_grad))
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_readout_dropout_scales_kept_features_and_is_off_without_key():
    """With a key: a `p` fraction of the pooled features zeroed, the rest scaled by
    `1 / (1 - p)`, unbiased over keys; without one: the plain readout."""
    p, key, n = 0.25, jr.PRNGKey(4), 3 * 8 * 4

    def readout(num_classes, dropout, identity=False):
        r = ff.Readout(8, num_classes, grid=2, phase_features=True, dropout=dropout, key=key)
        if identity:  # the linear layer passes the (dropped) features through
            r = eqx.tree_at(
                lambda r: (r.linear.weight, r.linear.bias), r, (jnp.eye(n), 0 * r.linear.bias)
            )
        return r

    z = jr.normal(jr.PRNGKey(5), (8, 6, 6), jnp.complex64)
    np.testing.assert_array_equal(readout(10, p)(z), readout(10, 0.0)(z))
    feats = np.asarray(readout(n, 0.0, identity=True)(z))
    assert np.all(feats != 0)
    drop = readout(n, p, identity=True)
    out = np.asarray(jax.vmap(lambda k: drop(z, key=k))(jr.split(jr.PRNGKey(6), 400)))
    kept = out != 0
    np.testing.assert_allclose(
        out[kept], np.broadcast_to(feats / (1 - p), out.shape)[kept], rtol=1e-6
    )
    assert abs(1 - kept.mean() - p) < 0.01  # 38,400 draws: 4.5 standard errors
    # Unbiased: the mean over 400 keys is within ~5 standard errors of the features.
    np.testing.assert_allclose(out.mean(0), feats, atol=0.12 * np.abs(feats).max())
    with pytest.raises(ValueError, match="dropout=1.0"):
        ff.Readout(8, 10, dropout=1.0, key=key)


@pytest.mark.parametrize("batch_solve", ["per_sample", "planar"])
def test_classifier_dropout_only_with_a_key(batch_solve):
    """`batched(x, key=...)` drops features with one mask per image; without a key the model
    gives the logits of the same model built without dropout."""
    kw = dict(batch_solve=batch_solve, key=jr.PRNGKey(0))
    model, ref = ff.make_model("tiny", dropout=0.5, **kw), ff.make_model("tiny", **kw)
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    x = jnp.concatenate([x[:1], x])  # images 0 and 1 are the same
    fwd = eqx.filter_jit(lambda m, x, k: m.batched(x, key=k)[0])
    plain = fwd(model, x, None)
    np.testing.assert_array_equal(plain, fwd(ref, x, None))
    a, b = fwd(model, x, jr.PRNGKey(2)), fwd(model, x, jr.PRNGKey(3))
    assert not np.allclose(a, b) and not np.allclose(a, plain)
    np.testing.assert_array_equal(a, fwd(model, x, jr.PRNGKey(2)))  # reproducible
    np.testing.assert_allclose(plain[0], plain[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[0], a[1])  # the same image, another mask


def test_field_dropout_is_one_mask_per_solve_of_the_linear_part():
    # Each image's solution is the fixed point of the cell whose linear part is multiplied by
    # that image's mask (`field_mask`, drawn once); the planar batch solve draws the same masks;
    # without a key the model is the one built without field dropout; gradients flow.
    kw = dict(key=jr.PRNGKey(0), rtol=1e-6, max_steps=100)
    model = ff.make_model("tiny", field_dropout=0.3, **kw)
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    key = jr.PRNGKey(5)
    fwd = eqx.filter_jit(lambda m, x, k: m.batched(x, key=k))
    logits, sol = fwd(model, x, key)

    @eqx.filter_jit
    def residuals(m, x, z, mask):
        inj, op = m.encoder(x), m.cell.operator(8, 8)
        masked = m.cell.step_with(lambda v: op(v) * mask, z, inj)
        return jnp.linalg.norm(masked - z), jnp.linalg.norm(m.cell.step_with(op, z, inj) - z)

    for i, ki in enumerate(jr.split(key, 3)):
        mask = model.field_mask(jr.fold_in(ki, 1), (8, 8))
        np.testing.assert_allclose(np.unique(mask), [0.0, 1 / 0.7], rtol=1e-6)
        masked, plain = residuals(model, x[i], sol.value[i], mask)
        size = float(jnp.linalg.norm(sol.value[i]))
        assert float(masked) < 1e-5 * size and float(plain) > 1e-2 * size
    planar = ff.make_model("tiny", field_dropout=0.3, batch_solve="planar", **kw)
    np.testing.assert_allclose(fwd(planar, x, key)[0], logits, rtol=1e-4, atol=1e-5)
    ref = ff.make_model("tiny", **kw)
    np.testing.assert_array_equal(fwd(model, x, None)[0], fwd(ref, x, None)[0])
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(fwd(m, x, key)[0] ** 2)))(model)
    g = jnp.concatenate([jnp.ravel(jnp.abs(v)) for v in jax.tree_util.tree_leaves(grads)])
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(g)) > 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"field_dropout": 1.0}, "must be in"),
        ({"field_dropout": 0.2, "scales": 2}, "single FractalCell"),
        ({"field_dropout": 0.2, "symmetric": True}, "single FractalCell"),
        ({"field_dropout": 0.2, "solver": ff.Multigrid()}, "resolution-agnostic"),
    ],
)
def test_field_dropout_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ff.make_model("tiny", key=jr.PRNGKey(0), **overrides)


@pytest.mark.parametrize("overrides", [{}, {"scales": 2, "channels": (4, 6)}], ids=["one", "two"])
def test_planar_batch_solve_matches_per_sample_values_and_gradients(overrides):
    """`batch_solve="planar"` solves the batch as one problem in the planar layout: the same
    logits and parameter gradients as per-sample solves, to the solver tolerance (also for a
    multi-scale field, whose state is a tuple of fields)."""
    with jax.enable_x64(True):
        per = _tight_tiny(1e-11, **overrides)
        planar = _tight_tiny(1e-11, batch_solve="planar", **overrides)
        x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8), jnp.float64)
        y = jnp.array([3, 7, 1])

        def loss(m):
            logits, sol = m.batched(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), y]), (logits, sol)

        (lp, (logits_p, sol_p)), g_p = eqx.filter_jit(
            eqx.filter_value_and_grad(loss, has_aux=True)
        )(per)
        (lq, (logits_q, sol_q)), g_q = eqx.filter_jit(
            eqx.filter_value_and_grad(loss, has_aux=True)
        )(planar)
        np.testing.assert_allclose(logits_q, logits_p, rtol=1e-8, atol=1e-9)
        for a, b in zip(
            jax.tree_util.tree_leaves(sol_q.value),
            jax.tree_util.tree_leaves(sol_p.value),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)
        for a, b in zip(
            jax.tree_util.tree_leaves(g_q), jax.tree_util.tree_leaves(g_p), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        # Per-image views of the one batch solve.
        assert sol_q.stats.num_steps.shape == (3,) and sol_q.result._value.shape == (3,)
        assert bool(jnp.all(sol_q.result == ff.RESULTS.successful))
        assert len(set(np.asarray(sol_q.stats.num_steps).tolist())) == 1


def test_planar_batch_solve_backward_stats_are_per_image_means():
    model = ff.make_model(
        "tiny",
        key=jr.PRNGKey(0),
        batch_solve="planar",
        adjoint=ff.ImplicitAdjoint(rtol=1e-4, max_steps=50, throw=False),
    )
    x = jr.normal(jr.PRNGKey(1), (4, 1, 8, 8))

    def loss(probe):
        logits, _ = model.batched(x, stats_probe=probe)
        return logits.sum()

    g = jax.grad(loss)(ff.backward_stats_probe())
    # Summed as if over 4 per-image solves, each with the batch solve's statistics.
    steps = float(g[0]) / 4
    assert steps == int(steps) and 1 <= steps <= 50
    assert 0 < float(g[1]) / 4 <= 1e-4 and float(g[2]) == 0.0


def test_batch_solve_errors():
    with pytest.raises(ValueError, match="batch_solve"):
        ff.make_model("tiny", key=jr.PRNGKey(0), batch_solve="fast")
    with pytest.raises(ValueError, match="resolution-agnostic"):
        ff.make_model("tiny", key=jr.PRNGKey(0), batch_solve="planar", solver=ff.Multigrid())
    model = ff.make_model("tiny", key=jr.PRNGKey(0), batch_solve="planar")
    with pytest.raises(ValueError, match=r"batch \(b, c, H, W\)"):
        model.batched(jnp.zeros((1, 8, 8)))


@pytest.mark.parametrize("hidden, pool", [(0, 1), (6, 1), (6, 2)])
def test_encoder_stem_is_translation_equivariant(hidden, pool):
    """Circular padding everywhere: shifting the image by a multiple of `pool` shifts the
    injection field."""
    enc = ff.Encoder(3, 4, pool=pool, hidden=hidden, key=jr.PRNGKey(0))
    x = jr.normal(jr.PRNGKey(1), (3, 8, 12))
    z = enc(x)
    assert z.shape == (4, 8 // pool, 12 // pool) and jnp.iscomplexobj(z)
    zs = enc(jnp.roll(x, (2 * pool, 3 * pool), (1, 2)))
    np.testing.assert_allclose(zs, jnp.roll(z, (2, 3), (1, 2)), rtol=1e-5, atol=1e-5)


def test_encoder_stem_matches_reference_and_counts_parameters():
    enc = ff.Encoder(3, 4, hidden=5, key=jr.PRNGKey(0))
    x = jr.normal(jr.PRNGKey(1), (3, 6, 6), jnp.float32)  # also if another test left x64 on

    def circ_conv(w, b, x):  # independent: wrap-pad, then a valid lax convolution
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode="wrap")
        y = jax.lax.conv_general_dilated(xp[None], w, (1, 1), "VALID")[0]
        return y + b

    h = jax.nn.relu(circ_conv(enc.stem.weight, enc.stem.bias, x))
    h = circ_conv(enc.conv.weight, enc.conv.bias, h)
    np.testing.assert_allclose(enc(x), jax.lax.complex(h[:4], h[4:]), rtol=1e-5, atol=1e-5)
    assert ff.count_params(enc) == (3 * 9 * 5 + 5) + (5 * 9 * 8 + 8)
    assert enc.in_channels == 3
    with pytest.raises(ValueError, match="hidden"):
        ff.Encoder(3, 4, hidden=-1, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        enc(jnp.zeros((5, 6, 6)))


def _encoder_reference(enc, x):
    """Independent: equinox's circular convolutions at full resolution, then mean pooling."""
    h = jax.nn.relu(enc.stem(x)) if enc.stem is not None else x
    h = enc.conv(h)
    c, hh, ww = h.shape
    p = enc.pool
    h = h.reshape(c, hh // p, p, ww // p, p).mean((2, 4))
    if enc.field == "real":
        return h
    z = jax.lax.complex(h[: c // 2], h[c // 2 :])
    return z if enc.theta is None else z * jnp.exp(1j * enc.theta)[:, None, None]


@pytest.mark.parametrize(
    "hidden, pool, phase, field",
    [(0, 1, "none", "complex"), (5, 3, "learned", "complex"), (0, 2, "none", "real")],
)
def test_encoder_matches_reference(hidden, pool, phase, field):
    """The encoder's fused convolution-and-pooling (one strided convolution) against convolving
    at full resolution and pooling, per image and batched, values and gradients."""
    enc = ff.Encoder(3, 4, pool=pool, hidden=hidden, phase=phase, field=field, key=jr.PRNGKey(0))
    x = jr.normal(jr.PRNGKey(1), (5, 3, 6, 12), jnp.float32)  # also if another test left x64 on
    ref = jax.vmap(lambda xi: _encoder_reference(enc, xi))(x)
    np.testing.assert_allclose(enc.batched(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(enc)(x), ref, rtol=1e-5, atol=1e-5)
    dtype = jnp.float32 if field == "real" else jnp.complex64
    assert enc.batched(x).dtype == dtype
    ct = jr.normal(jr.PRNGKey(2), (5, 4, 6 // pool, 12 // pool), dtype)

    def loss(e, fn):
        return jnp.real(jnp.vdot(ct, fn(e, x)))

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    g1 = grad(enc, lambda e, x: e.batched(x))
    g2 = grad(enc, lambda e, x: jax.vmap(lambda xi: _encoder_reference(e, xi))(x))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    if pool > 1:
        with pytest.raises(ValueError, match="divisible by pool"):
            enc.batched(jnp.zeros((1, 3, 7, 12)))
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        enc.batched(x[0])


def test_planar_batch_trajectory_matches_per_sample_naive_iterates():
    """Naive iteration acts on each image alone, so the planar batch's recorded iterates are
    the per-sample ones, batch axis first as under `vmap`."""
    kw = dict(solver=ff.Naive(), key=jr.PRNGKey(0))
    per = ff.make_model("tiny", **kw)
    planar = ff.make_model("tiny", batch_solve="planar", **kw)
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    opts = dict(max_steps=6, rtol=0.0, atol=0.0, record_every=2)
    _, sp = per.batched(x, **opts)
    _, sq = planar.batched(x, **opts)
    assert sq.stats.trajectory.shape == sp.stats.trajectory.shape == (3, 4, 4, 8, 8)
    np.testing.assert_allclose(sq.stats.trajectory, sp.stats.trajectory, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sq.stats.num_steps, sp.stats.num_steps)


def _eqns(jaxpr, name):
    """Every equation called `name` in a jaxpr and the jaxprs inside it."""
    out = [e for e in jaxpr.eqns if e.primitive.name == name]
    for e in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            out += _eqns(sub, name)
    return out


def _check_mixed_loops(model, x):
    """Every carry of the model's solves is float32 or complex64, and the loop bodies'
    products take bfloat16 operands."""
    loops = _eqns(jax.make_jaxpr(lambda x: model.batched(x)[0])(x).jaxpr, "while")
    assert loops
    for loop in loops:
        carries = {v.aval.dtype for v in loop.outvars if jnp.issubdtype(v.aval.dtype, jnp.inexact)}
        assert carries <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.complex64)}, carries
    products = [e for loop in loops for e in _eqns(loop.params["body_jaxpr"].jaxpr, "dot_general")]
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in products)


def test_bfloat16_training_step_matches_float32():
    """`model.precision=bfloat16` (per-sample solves, implicit adjoint): one training step's
    loss, solver steps and gradients (SGD with rate 1: the update) within bfloat16 rounding of
    float32's; parameters and the field stay float32/complex64."""
    from fractal_field._train import build_model, make_train_step

    x = jr.normal(jr.PRNGKey(1), (4, 1, 8, 8))
    y = jnp.array([0, 1, 2, 3])
    optimizer = optax.sgd(1.0)
    step = make_train_step(optimizer, None)
    out = {}
    for precision in ("float32", "bfloat16"):
        config = ff.load_config(f"{CONFIG}:smoke", [f"model.precision={precision}"])
        model = build_model(config, key=jr.PRNGKey(0))
        assert model.cell.conv.conv.precision == precision
        params = jax.tree_util.tree_map(np.array, eqx.filter(model, eqx.is_inexact_array))
        opt_state = optimizer.init(params)
        if precision == "bfloat16":
            _check_mixed_loops(model, x)
        new, _, metrics = step(jr.PRNGKey(2), model, opt_state, x, y)
        assert new.cell.conv.conv.precision == precision
        grads = jax.tree_util.tree_map(
            lambda a, b: a - b, params, eqx.filter(new, eqx.is_inexact_array)
        )
        out[precision] = metrics, grads
    (m32, g32), (mbf, gbf) = out["float32"], out["bfloat16"]
    np.testing.assert_allclose(mbf["loss"], m32["loss"], rtol=1e-2)
    assert 0 < float(mbf["bwd_steps"]) and abs(float(mbf["fwd_steps"] - m32["fwd_steps"])) <= 3
    assert float(mbf["fwd_failed"]) == 0
    leaves32, leavesbf = jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(gbf)
    assert [a.dtype for a in leavesbf] == [a.dtype for a in leaves32]
    assert jnp.complex64 in [a.dtype for a in leavesbf]
    g, g_bf = (jnp.concatenate([jnp.ravel(a) for a in t]) for t in (leaves32, leavesbf))
    assert 1e-5 < float(jnp.linalg.norm(g_bf - g) / jnp.linalg.norm(g)) < 5e-2


def test_bfloat16_planar_batch_solve_matches_float32():
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    run = eqx.filter_jit(lambda m, x: m.batched(x))
    logits, sol = run(ff.make_model("tiny", key=jr.PRNGKey(0), batch_solve="planar"), x)
    mixed = ff.make_model("tiny", key=jr.PRNGKey(0), batch_solve="planar", precision="bfloat16")
    logits_bf, sol_bf = run(mixed, x)
    assert sol_bf.value.dtype == jnp.complex64 and logits_bf.dtype == jnp.float32
    assert bool(jnp.all(sol_bf.result == ff.RESULTS.successful))
    field_err = jnp.linalg.norm(sol_bf.value - sol.value) / jnp.linalg.norm(sol.value)
    assert 1e-5 < float(field_err) < 1e-2
    np.testing.assert_allclose(logits_bf, logits, rtol=0, atol=1e-2 * float(jnp.abs(logits).max()))
    _check_mixed_loops(mixed, x)


def test_precision_errors():
    with pytest.raises(ValueError, match=r"FieldClassifier\(precision='float16'\)"):
        ff.make_model("tiny", key=jr.PRNGKey(0), precision="float16")
    from fractal_field._train import build_model

    config = ff.load_config(f"{CONFIG}:smoke", ["model.precision=half"])
    with pytest.raises(ValueError, match="'bfloat16'"):
        build_model(config, key=jr.PRNGKey(0))


#
# The real-valued twin (`field="real"`).
#


@pytest.mark.parametrize("solver", [ff.Naive(), ff.Anderson()], ids=["naive", "anderson"])
def test_real_twin_is_real_and_solves_its_real_map(solver):
    """All parameters, the injection and the equilibrium are real; the equilibrium is a fixed
    point of the real map (an independent NumPy step: real correlation, `sign(u) relu(|u| +
    b)`, relaxation) and the logits are the readout of `|z|` and `z` (NumPy reference)."""
    model = ff.make_model(
        "tiny",
        key=jr.PRNGKey(0),
        field="real",
        channels=6,
        phase_features=True,
        solver=solver,
        rtol=1e-5,
        atol=0.0,
        max_steps=200,
    )
    # A large raw kernel (the normalisation active) and a negative bias (modReLU nonlinear).
    model = eqx.tree_at(
        lambda m: (m.cell.conv.conv.weight, m.cell.act.bias),
        model,
        (10 * model.cell.conv.conv.weight, jnp.full((6,), -0.05)),
    )
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    assert leaves and not any(jnp.iscomplexobj(x) for x in leaves)
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    fn = eqx.filter_jit(lambda m, x: (jax.vmap(m)(x), jax.vmap(m.encoder)(x), m.cell.normalized()))
    (logits, sol), inj, cell = fn(model, x)
    assert sol.value.dtype == inj.dtype == jnp.float32
    assert bool(jnp.all(sol.result == ff.RESULTS.successful))
    assert float(model.cell.lipschitz_bound(8, 8)) <= 0.5 + 0.5 * 0.9 + 1e-6
    w = np.asarray(cell.conv.weight[0], np.float64)
    b = np.minimum(np.asarray(model.cell.act.bias, np.float64), 0)[:, None, None]
    lin = model.readout.linear
    for z, u0, out in zip(np.asarray(sol.value, np.float64), np.asarray(inj), logits, strict=True):
        u = np_correlate(w, z).real + u0
        step = 0.5 * z + 0.5 * np.sign(u) * np.maximum(np.abs(u) + b, 0)
        assert np.linalg.norm(step - z) <= 1e-4 * np.linalg.norm(z)
        f = np.concatenate([np.sqrt(z**2 + 1e-12), z])  # (12, 8, 8) -> 2 x 2 bins of 4 x 4
        pooled = f.reshape(12, 2, 4, 2, 4).mean((2, 4)).reshape(-1)
        want = np.asarray(lin.weight, np.float64) @ pooled + np.asarray(lin.bias)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


def _count(preset, **kwargs):
    return ff.count_params(
        eqx.filter_eval_shape(ff.make_model, preset, key=jr.PRNGKey(0), **kwargs)
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("nano", 38),
        ("cifar_small", 92),
        ({"preset": "cifar_small", "stem": 32, "batch_solve": "planar"}, 96),
    ],
)
def test_equal_params_channels_is_the_closest_real_count(spec, expected):
    c = ff.equal_params_channels(spec)
    assert c == expected
    kwargs = dict(spec) if isinstance(spec, dict) else {"preset": spec}
    preset = kwargs.pop("preset")
    target = _count(preset, **kwargs)
    kwargs.pop("batch_solve", None)
    gaps = [
        abs(_count(preset, **kwargs, field="real", channels=n) - target) for n in (c - 1, c, c + 1)
    ]
    assert gaps[1] <= min(gaps[0], gaps[2]) and gaps[1] <= 0.02 * target
    if spec == "nano":  # 9 c^2 (cell) + 10 c (encoder) + c (bias) + 160 c + 10 (readout)
        assert _count("nano", field="real", channels=c) == 9 * c**2 + 171 * c + 10


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"scales": 2}, "scales=2"),
        ({"batch_solve": "planar"}, "batch_solve='planar'"),
        ({"symmetric": True}, "symmetric=True"),
        ({"norm_groups": 2}, "norm_groups=2"),
        ({"phase": "learned"}, "phase='learned'"),
        ({"field": "reel"}, "'complex' or 'real'"),
    ],
)
def test_real_twin_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        ff.make_model("tiny", key=jr.PRNGKey(0), **{"field": "real", **overrides})


def test_real_twin_refuses_complex_fields_and_the_planar_solve():
    model = eqx.filter_eval_shape(ff.make_model, "tiny", key=jr.PRNGKey(0), field="real")
    with pytest.raises(ValueError, match="solve_planar"):
        model.solve_planar(jnp.zeros((2, 1, 8, 8)))
    with pytest.raises(TypeError, match="real field"):
        model.readout(jnp.zeros((4, 8, 8), jnp.complex64))
    with pytest.raises(ValueError, match="single field"):
        ff.equal_params_channels("tiny", scales=2)


def test_weight_norm_option():
    """`weight_norm=True`: one learnt gain per output channel of the cell's convolution, the
    same function at initialisation, still a certified contraction."""
    key = jr.PRNGKey(0)
    plain = ff.make_model("tiny", key=key)
    normed = ff.make_model("tiny", key=key, weight_norm=True)
    assert ff.count_params(normed) == ff.count_params(plain) + plain.cell.channels
    x = jr.normal(jr.PRNGKey(1), (1, 8, 8), jnp.float32)
    np.testing.assert_allclose(normed(x)[0], plain(x)[0], rtol=1e-4, atol=1e-5)
    bigger = eqx.tree_at(lambda m: m.cell.conv.gain, normed, 10 * normed.cell.conv.gain)
    assert float(bigger.cell.conv.lipschitz_bound(8, 8)) <= bigger.cell.conv.gamma * (1 + 1e-5)
    with pytest.raises(ValueError, match="weight_norm"):
        ff.make_model("tiny", key=key, weight_norm=True, scales=2)
