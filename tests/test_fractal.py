"""`fractal_field.fractal`: box counting on exact fractals, `T_r` and scale invariance, the
segment graph and the phase-flow probe."""

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff
from fractal_field import fractal

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_nano.py") + ":smoke"

# ---------------------------------------------------------------------------------------------
# Exact fractals


def carpet(level: int) -> np.ndarray:
    m = np.ones((1, 1), bool)
    for _ in range(level):
        e = np.zeros_like(m)
        m = np.block([[m, m, m], [m, e, m], [m, m, m]])
    return m


def menger(level: int) -> np.ndarray:
    m = np.ones((1, 1, 1), bool)
    for _ in range(level):
        n = m.shape[0]
        out = np.zeros((3 * n,) * 3, bool)
        for i, j, k in np.ndindex(3, 3, 3):
            if (i == 1) + (j == 1) + (k == 1) < 2:  # remove centres of faces and the body
                out[i * n : (i + 1) * n, j * n : (j + 1) * n, k * n : (k + 1) * n] = m
        m = out
    return m


def cantor(level: int) -> np.ndarray:
    m = np.ones(1, bool)
    for _ in range(level):
        m = np.concatenate([m, np.zeros_like(m), m])
    return m


def triangle(level: int) -> np.ndarray:
    i, j = np.indices((2**level, 2**level))
    return (i & j) == 0  # Pascal's triangle mod 2


def point() -> np.ndarray:
    m = np.zeros((64, 64))
    m[17, 40] = 3.0
    return m


def line() -> np.ndarray:
    m = np.zeros((64, 64), np.complex64)
    m[:, 5] = 1 - 2j
    return m


CASES = {
    "carpet": (lambda: carpet(5), [3, 9, 27, 81], math.log(8) / math.log(3)),
    "triangle": (lambda: triangle(8), None, math.log(3) / math.log(2)),
    "cantor": (lambda: cantor(6), None, math.log(2) / math.log(3)),
    "square": (lambda: np.ones((64, 64)), None, 2.0),
    "line": (line, None, 1.0),
    "point": (point, None, 0.0),
    "menger": (lambda: menger(3), None, math.log(20) / math.log(3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_box_counting_exact_fractals(name):
    make, scales, expected = CASES[name]
    res = fractal.box_counting_dimension(make(), scales=scales)
    assert res.D == pytest.approx(expected, abs=1e-9)
    assert res.r2 == pytest.approx(1.0, abs=1e-9)
    assert len(res.scales) == len(res.counts) >= 2


def test_carpet_counts_and_intercept():
    res = fractal.box_counting_dimension(carpet(5).astype(np.float32), scales=[3, 9, 27, 81])
    assert res.counts == (8**4, 8**3, 8**2, 8)
    # log N = D log(1/r) + c with N(81) = 8 at r = 81 = 3^4: c = log 8 + D log 81 = 5 log 8.
    assert res.intercept == pytest.approx(5 * math.log(8))


def test_default_scales_and_partial_boxes():
    assert fractal.default_scales((243, 243)) == (1, 3, 9, 27, 81)
    assert fractal.default_scales((28, 252)) == (1, 2, 4, 8)
    assert fractal.default_scales((9, 64, 17)) == (1, 2, 4)
    assert fractal.default_scales((9, 18)) == (1, 3)
    m = np.zeros((5, 7), bool)
    m[4, 6] = m[0, 0] = True
    # Boxes of 2 on a 5 x 7 grid: 3 x 4 boxes, the last row and column partial.
    assert fractal.count_boxes(m, 2) == 2
    assert fractal.count_boxes(np.ones((5, 7), bool), 2) == 12
    assert fractal.count_boxes(np.ones((5, 7), bool), 3) == 6
    with pytest.raises(ValueError, match="r=0"):
        fractal.count_boxes(m, 0)


@pytest.mark.parametrize(
    "threshold, occupied",
    [(0.0, 8), (2.5, 6), ("mean", 5), (fractal.Quantile(0.75), 3)],
)
def test_thresholds(threshold, occupied):
    x = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7j, -8]).astype(np.complex64)
    # |x| = 0 0 1 2 3 4 5 6 7 8: mean 3.6; the 0.75-quantile 5.75 (linear interpolation).
    assert fractal.occupancy(x, threshold).sum() == occupied


def test_component_real_imag():
    x = np.array([1 + 0j, 2j, 0, 3 + 3j])
    assert fractal.occupancy(x, component="real").tolist() == [True, False, False, True]
    assert fractal.occupancy(x, component="imag").tolist() == [False, True, False, True]


def test_dense_random_matrix_reads_as_two():
    x = np.random.default_rng(0).normal(size=(128, 128))
    res = fractal.box_counting_dimension(x, threshold="mean", scales=[4, 8, 16, 32, 64])
    assert res.D == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones((0, 4)), {}, ValueError, "empty"),
        (np.full((8, 8), 2.0), {"threshold": "mean"}, ValueError, "constant"),
        (np.full((8, 8), 2.0), {"threshold": fractal.Quantile(0.5)}, ValueError, "constant"),
        (np.zeros((8, 8)), {}, ValueError, "No occupied"),
        (np.array([[1.0, np.nan]] * 4), {}, ValueError, "non-finite"),
        (np.array([[np.inf] * 8] * 8), {}, ValueError, "non-finite"),
        (np.ones((8, 8)), {"scales": [2]}, ValueError, "two distinct"),
        (np.ones((8, 8)), {"scales": [2, 2]}, ValueError, "two distinct"),
        (np.ones((8, 8)), {"scales": [0, 2]}, ValueError, "1..8"),
        (np.ones((8, 8)), {"scales": [2, 9]}, ValueError, "1..8"),
        (np.ones((8, 8)), {"scales": [1, 2.5]}, TypeError, "integers"),
        (np.ones((3, 8)), {}, ValueError, "too small"),
        (np.ones((8, 8)), {"threshold": "median"}, ValueError, "threshold"),
        (np.ones((8, 8)), {"threshold": -1.0}, ValueError, ">= 0"),
        (np.ones((8, 8)), {"component": "phase"}, ValueError, "component"),
        (np.array(["a"] * 8), {}, TypeError, "numeric"),
    ],
)
def test_box_counting_errors(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        fractal.box_counting_dimension(x, **kwargs)


def test_quantile_range():
    with pytest.raises(ValueError, match="0 <= q < 1"):
        fractal.Quantile(1.0)


# ---------------------------------------------------------------------------------------------
# T_r and discrete scale invariance


@pytest.mark.parametrize(
    "shape, r, matrix, tiles",
    [
        ((28, 252), 16, (28, 252), 2 * 16),
        ((56, 1, 3, 3), 4, (56, 9), 14 * 3),  # Equinox conv (out, in, kh, kw)
        ((1, 28, 28, 3, 3), 8, (28, 252), 4 * 32),  # our cell's (scales, out, in, 3, 3)
        ((10,), 3, (1, 10), 4),
        ((9, 9), 3, (9, 9), 9),
    ],
)
def test_segment_counts(shape, r, matrix, tiles):
    w = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    assert fractal.as_matrix(w).shape == matrix
    segs = fractal.segment(w, r)
    assert len(segs) == tiles == math.prod(fractal.segment_grid(matrix, r))
    # Nothing dropped or repeated: the tiles hold every entry once.
    assert sorted(np.concatenate([s.ravel() for s in segs])) == list(range(math.prod(shape)))
    assert fractal.as_matrix(w)[0, 0] == segs[0][0, 0] and segs[0].shape == (
        min(r, matrix[0]),
        min(r, matrix[1]),
    )


def test_scale_invariance_holds_for_carpet():
    rep = fractal.scale_invariance(carpet(5), r0=27, lam=3, num=3, threshold=0.0)
    assert rep.scales == (27, 81, 243)
    assert [s.shape for s in rep.segments] == [(9, 9), (3, 3), (1, 1)]
    # Tiles of 27 are level-3 carpets or empty (the central hole: 9 tiles, the next 8: nan).
    assert np.isnan(rep.segments[0]).sum() == 9 + 8
    np.testing.assert_allclose(rep.dimensions, math.log(8) / math.log(3), atol=1e-9)
    assert rep.holds and rep.spread < 1e-9
    json.dumps(rep.to_dict())


def test_scale_invariance_fails_for_random_pattern():
    x = np.random.default_rng(0).random((243, 243)) < 0.01
    rep = fractal.scale_invariance(x, r0=9, lam=3, num=3, threshold=0.0, tol=0.1)
    assert not rep.holds and rep.spread > 0.3


def test_scale_invariance_errors():
    with pytest.raises(ValueError, match="lam"):
        fractal.scale_invariance(np.ones((8, 8)), lam=1)
    with pytest.raises(ValueError, match="r=0"):
        fractal.segment(np.ones((8, 8)), 0)
    with pytest.raises(ValueError, match="scalar"):
        fractal.as_matrix(np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# Segment graph


def test_segment_features_and_adjacency_against_direct_formula():
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(8, 12))
    w2 = rng.normal(size=(6, 2, 2, 2)) + 1j * rng.normal(size=(6, 2, 2, 2))  # -> (6, 8)
    feats, edges = fractal.segment_graph([w1, w2], 4, gamma=0.7, s=2.0)
    assert [f.shape for f in feats] == [(6, 3), (4, 3)]
    assert edges[0].shape == (6, 4)
    # Features of one tile, by hand.
    tile = np.abs(w1[4:8, 8:12])
    p = tile.ravel() / tile.sum()
    mask = np.abs(w1) > np.abs(w1).mean()
    d = fractal.box_counting_dimension(mask[4:8, 8:12]).D
    np.testing.assert_allclose(feats[0][5], [d, tile.mean(), -(p * np.log(p)).sum() / np.log(16)])
    for i in range(6):
        for j in range(4):
            dist = math.sqrt(sum((feats[0][i, k] - feats[1][j, k]) ** 2 for k in range(3)))
            assert edges[0][i, j] == pytest.approx(0.7 * math.exp(-dist / 2.0))


def test_adjacency_errors():
    with pytest.raises(ValueError, match="same f"):
        fractal.kernel_adjacency(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="> 0"):
        fractal.kernel_adjacency(np.ones((2, 3)), np.ones((2, 3)), s=0.0)
    with pytest.raises(ValueError, match="two layers"):
        fractal.segment_graph([np.ones((4, 4))], 2)


# ---------------------------------------------------------------------------------------------
# Phase flow


def _np_tile_norms(g, r):
    a = fractal.as_matrix(np.asarray(g))
    rows, cols = fractal.segment_grid(a.shape, r)
    return np.array(
        [
            [np.linalg.norm(a[i * r : (i + 1) * r, j * r : (j + 1) * r]) for j in range(cols)]
            for i in range(rows)
        ]
    )


def test_phase_flow_hook_matches_direct_gradients(tmp_path):
    # A small field classifier with cheap (Jacobian-free) gradients keeps the test fast.
    model = ff.make_model(
        "tiny",
        key=jr.PRNGKey(0),
        channels=2,
        max_steps=4,
        solver=ff.Naive(),
        adjoint=ff.JacobianFreeAdjoint(),
    )
    ds = ff._train.synthetic_dataset(4, image_size=8)
    x = jnp.asarray(ds.normalize(ds.images))
    y = jnp.asarray(ds.labels)
    path = tmp_path / "fractal.jsonl"
    rec = fractal.log_phase_flow(path, model, x, y, step=3, epoch=1, r=4)
    assert json.loads(path.read_text().splitlines()[-1]) == rec
    assert (rec["step"], rec["epoch"], rec["r"]) == (3, 1, 4)

    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(fractal.classifier_loss))(model, (x, y))
    assert rec["loss"] == pytest.approx(float(loss), rel=1e-6)
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(grads, eqx.is_inexact_array))[0]
    assert sorted(rec["layers"]) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    total = 0.0
    for p, g in leaves:
        layer = rec["layers"][jax.tree_util.keystr(p)]
        ref = _np_tile_norms(g, 4)
        assert layer["grid"] == list(ref.shape)
        np.testing.assert_allclose(layer["norms"], ref.ravel(), rtol=1e-5, atol=1e-8)
        total += float(np.sum(np.abs(np.asarray(g)) ** 2))
    assert rec["grad_norm"] == pytest.approx(math.sqrt(total), rel=1e-5)


def test_training_writes_phase_flow_records(tmp_path):
    cheap = ["model.channels=2", "model.max_steps=4", "solver.name=naive", "solver.history=None"]
    cheap += [
        "adjoint.name=jfb",
        "adjoint.max_steps=None",
        "adjoint.rtol=None",
        "adjoint.throw=None",
    ]
    cfg = ff.load_config(SMOKE, ["epochs=1", "fractal_probe_every=2", *cheap])
    ff.train(cfg, tmp_path, stop_after_steps=5)
    rows = [json.loads(s) for s in (tmp_path / "fractal.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# Figures


def _records():
    rng = np.random.default_rng(2)
    recs = []
    for step in range(6):
        layers = {
            ".w": dict(norms=rng.random(4).tolist(), grid=[2, 2], norm=1.0 / (step + 1)),
            ".b": dict(norms=[0.1], grid=[1, 1], norm=0.1),
        }
        recs.append(dict(step=step, epoch=step // 3, loss=2.0 - 0.3 * step, layers=layers))
    return recs


def test_plot_phase_flow(tmp_path):
    from fractal_field import viz

    recs = _records()
    path = tmp_path / "fractal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs[::-1] + recs[:1]) + "\n")
    assert viz.read_phase_flow(tmp_path) == recs  # sorted by step, repeats once
    fig = viz.plot_phase_flow(tmp_path, path=tmp_path / "phase.png")
    ax = fig.axes[0]
    assert ax.get_title() == ".w"  # single-segment parameters are left out by default
    assert len(ax.texts) == len(recs) - 1  # one arrow per transition
    np.testing.assert_allclose(
        ax.collections[0].get_offsets()[:, 1], [1 / (s + 1) for s in range(6)]
    )
    np.testing.assert_array_equal(ax.collections[0].get_array(), [0, 0, 0, 1, 1, 1])
    assert (tmp_path / "phase.png").stat().st_size > 0
    with pytest.raises(ValueError, match="Unknown layers"):
        viz.plot_phase_flow(recs, layers=[".nope"])


def test_plot_segment_graph_box_counting_and_scale_invariance(tmp_path):
    from fractal_field import viz

    feats, edges = fractal.segment_graph([np.eye(8), np.arange(32.0).reshape(4, 8)], 4)
    fig = viz.plot_segment_graph(feats, edges, max_edges=5, path=tmp_path / "graph.png")
    assert len(fig.axes[0].lines) == 5
    res = fractal.box_counting_dimension(carpet(3), scales=[1, 3, 9])
    fig = viz.plot_box_counting({"carpet": res}, path=tmp_path / "box.png")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), np.log([512, 64, 8]))
    rep = fractal.scale_invariance(carpet(4), r0=9, lam=3, num=3, threshold=0.0)
    fig = viz.plot_scale_invariance({"carpet": rep}, path=tmp_path / "dsi.png")
    assert "DSI holds" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert all((tmp_path / f).stat().st_size > 0 for f in ("graph.png", "box.png", "dsi.png"))
