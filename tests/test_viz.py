"""`fractal_field.viz`: trajectory recording, domain colouring, figures and animations."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from PIL import Image

import fractal_field as ff
from fractal_field import viz
from fractal_field.viz._plots import default_columns
from fractal_field.viz._solve import default_solvers

C, H = 2, 8
SOLVERS = default_solvers((H, H))  # Naive, Anderson and (if importable) Multigrid
TOL = dict(rtol=1e-5, atol=1e-7)


class ToyCell(eqx.Module):
    """A small resolution-agnostic complex field map: `z <- z/2 + modrelu(K z + b)/2`."""

    w: jax.Array

    def __call__(self, z, injection):
        u = injection
        for i, di in enumerate((-1, 0, 1)):
            for j, dj in enumerate((-1, 0, 1)):
                u = u + jnp.einsum("oc,chw->ohw", self.w[:, :, i, j], jnp.roll(z, (di, dj), (1, 2)))
        mag = jnp.abs(u)
        return 0.5 * z + 0.5 * u * jnp.maximum(mag - 0.1, 0) / (mag + 1e-6)


@pytest.fixture(scope="module")
def problem():
    k1, k2 = jr.split(jr.PRNGKey(0))
    w = (jr.normal(k1, (C, C, 3, 3)) + 1j * jr.normal(k2, (C, C, 3, 3))) * 0.8 / (9 * C)
    yy, xx = np.meshgrid(np.arange(H), np.arange(H), indexing="ij")
    inj = np.stack([np.exp(2j * np.pi * (k * xx + yy) / H) * (1.5 + np.sin(xx)) for k in range(C)])
    inj = jnp.asarray(inj, jnp.complex64)
    return ToyCell(w.astype(jnp.complex64)), jnp.zeros_like(inj), inj


@pytest.fixture(scope="module")
def recorded(problem):
    cell, z0, inj = problem
    return {
        name: viz.record_trajectory(cell, z0, inj, solver=s, max_steps=40, every=2, **TOL)
        for name, s in SOLVERS.items()
    }


@pytest.mark.parametrize("name", list(SOLVERS))
def test_trajectory_matches_plain_solve(problem, recorded, name):
    cell, z0, inj = problem
    traj, res, sol = recorded[name]
    plain = eqx.filter_jit(ff.fixed_point)(
        cell, z0, inj, solver=SOLVERS[name], max_steps=40, throw=False, **TOL
    )
    assert sol.result == ff.RESULTS.successful
    assert int(sol.stats.num_steps) == int(plain.stats.num_steps)
    np.testing.assert_allclose(np.asarray(sol.value), np.asarray(plain.value), atol=1e-6)
    n = int(sol.stats.num_steps)
    assert traj.shape == (n // 2 + 1, C, H, H)
    assert res.shape == (n + 1,) and np.all(np.isfinite(res))
    np.testing.assert_array_equal(traj[0], np.zeros((C, H, H)))
    if n % 2 == 0:  # the last record is z_k; the returned value is f(z_k)
        np.testing.assert_allclose(cell(traj[-1], inj), np.asarray(sol.value), atol=1e-6)
    assert res[-1] < res[0]


def _png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("name", list(SOLVERS))
def test_figures_and_gif_per_solver(recorded, name, tmp_path):
    traj, res, _ = recorded[name]
    fig = viz.plot_evolution(
        traj, channels=(0, 1, 2), residuals=res, every=2, path=tmp_path / "evo.png"
    )
    assert len(fig.axes) > 4
    w, h = _png_size(tmp_path / "evo.png")
    assert w > 200 and h > 200
    out = viz.animate_field(traj, tmp_path / "field.gif", channel=(0, 1), residuals=res, every=2)
    with Image.open(out) as im:
        assert im.n_frames == len(traj)
        assert im.size[0] > im.size[1] > H  # two channels side by side
    viz.plot_residuals({name: res}, path=tmp_path / "res.png")
    assert min(_png_size(tmp_path / "res.png")) > 100


def test_solver_comparison_and_residuals(problem, tmp_path):
    cell, z0, inj = problem
    sols = viz.compare_solvers(cell, z0, SOLVERS, args=inj, max_steps=40, **TOL)
    assert set(sols) == set(SOLVERS)
    values = [np.asarray(s.value) for s in sols.values()]
    for v in values[1:]:
        np.testing.assert_allclose(v, values[0], atol=1e-3)
    fig = viz.plot_solver_comparison(cell, z0, solutions=sols, path=tmp_path / "solvers.png")
    assert min(_png_size(tmp_path / "solvers.png")) > 200
    # The curves plot the relative residual that the titles quote: each ends at its solve's.
    (curves,) = [ax for ax in fig.axes if ax.get_ylabel().startswith("relative residual")]
    for line, sol in zip(curves.get_lines(), sols.values(), strict=True):
        np.testing.assert_allclose(line.get_ydata()[-1], sol.stats.relative_residual, rtol=1e-5)
    for x in ("step", "work"):
        viz.plot_residuals(sols, x=x, rtol=1e-5, path=tmp_path / f"res_{x}.png")
        assert min(_png_size(tmp_path / f"res_{x}.png")) > 100


def test_domain_colouring():
    z = np.array([1.0, -1.0, 1j, 0.0, 3.0, np.nan], np.complex64)
    rgb = viz.domain_colouring(z, scale=1.0)
    assert rgb.shape == (6, 3) and np.all((rgb >= 0) & (rgb <= 1))
    # Phase 0 is red, phase pi is cyan: different hues.
    assert rgb[0].argmax() == 0 and rgb[1][0] < rgb[1][1]
    assert not np.allclose(rgb[0], rgb[1]) and not np.allclose(rgb[0], rgb[2])
    # Brightness grows with |z|; zero and NaN are black.
    assert rgb[4].max() > rgb[0].max() > 0
    np.testing.assert_array_equal(rgb[3], 0)
    np.testing.assert_array_equal(rgb[5], 0)
    # Same phase, different magnitude: same hue (same colour direction).
    a, b = rgb[0] / rgb[0].max(), rgb[4] / rgb[4].max()
    np.testing.assert_allclose(a, b, atol=1e-6)
    # Default scale: the median magnitude; the shape is kept.
    assert viz.domain_colouring(np.ones((2, 3, 4), np.complex64)).shape == (2, 3, 4, 3)


def test_colour_wheel_legend():
    from fractal_field.viz._common import new_figure

    fig = new_figure(2, 2)
    ax = viz.colour_wheel_legend(fig.add_subplot())
    assert len(ax.images) == 1


def test_animate_field_errors(tmp_path, monkeypatch):
    traj = np.ones((3, 1, 4, 4), np.complex64)
    with pytest.raises(ValueError, match=".gif or .mp4"):
        viz.animate_field(traj, tmp_path / "x.avi")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="ffmpeg"):
        viz.animate_field(traj, tmp_path / "x.mp4")


def test_plot_training(tmp_path):
    rows = [
        dict(
            loss=2.3 * 0.97**s,
            acc=min(1, 0.1 + 0.02 * s),
            fwd_steps=10 + s % 3,
            fwd_residual=1e-4,
            bwd_steps=8.0,
            step_time=0.1,
            lr=1e-3,
            step=s,
            epoch=s // 20,
        )
        for s in range(40)
    ]
    rows.append(rows[-1])  # a resumed run re-logs a step
    lines = [json.dumps(r) for r in rows] + ['{"loss": 1.0, "st']  # a line being written
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    evals = [
        dict(epoch=e, step=20 * (e + 1), accuracy=0.5 + 0.2 * e, mean_steps=11.0, epoch_time=3.0)
        for e in range(2)
    ]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in evals))
    fig = viz.plot_training(tmp_path, path=tmp_path / "training.png")
    assert len(fig.axes) == 3
    assert min(_png_size(tmp_path / "training.png")) > 100
    with pytest.raises(FileNotFoundError):
        viz.plot_training(tmp_path / "nothing")


def _tiny_model(**kwargs):
    return ff.make_model("tiny", key=jr.PRNGKey(0), **kwargs)


def test_model_trajectory_and_gallery(tmp_path):
    model = _tiny_model()
    x = jr.normal(jr.PRNGKey(1), (3, 1, 8, 8))
    traj, res, sol = viz.model_trajectory(model, x[0], solver=ff.Naive(), every=1, max_steps=20)
    assert traj.shape[1:] == (4, 8, 8) and np.iscomplexobj(traj)
    assert len(traj) == int(sol.stats.num_steps) + 1 == len(res)
    # The last record is z_k and the returned value f(z_k): they differ by the final residual.
    gap = np.linalg.norm(np.asarray(sol.value) - traj[-1])
    np.testing.assert_allclose(gap, float(sol.stats.residual), rtol=1e-3)
    assert res[-1] < res[0]
    viz.plot_fixed_point_gallery(model, x, labels=[0, 1, 2], path=tmp_path / "gallery.png")
    assert min(_png_size(tmp_path / "gallery.png")) > 100


def test_multiscale_trajectory_figures_frames_and_gallery(tmp_path):
    """A multi-scale model's solve is recorded per scale (a tuple of stacks, finest first) and
    every figure and animation takes it, with `scales` choosing the fields shown."""
    model = _tiny_model(scales=2, channels=3)
    x = jr.normal(jr.PRNGKey(1), (2, 1, 8, 8))
    traj, res, sol = viz.model_trajectory(model, x[0], solver=ff.Naive(), max_steps=20)
    assert isinstance(traj, tuple) and [t.shape[1:] for t in traj] == [(3, 8, 8), (3, 4, 4)]
    assert len(traj[0]) == len(traj[1]) == int(sol.stats.num_steps) + 1 == len(res)
    pairs = zip(sol.value, traj, strict=True)
    gap = np.sqrt(sum(np.sum(np.abs(np.asarray(v) - t[-1]) ** 2) for v, t in pairs))
    np.testing.assert_allclose(gap, float(sol.stats.residual), rtol=1e-3)
    # A magnitude and a phase row per (scale, channel), plus a colour-bar host and a wheel.
    ncol = len(default_columns(len(res)))
    fig = viz.plot_evolution(traj, residuals=res, path=tmp_path / "evo.png")
    assert len(fig.axes) == 2 * (2 * ncol + 2)
    assert [a.get_ylabel() for a in fig.axes if a.get_ylabel()][:2] == [
        "s0 ch 0: |z|",
        "s0 ch 0: phase",
    ]
    fig = viz.plot_evolution(traj, channels=(0, 2), scales=(1,))
    assert len(fig.axes) == 2 * (2 * ncol + 2)
    assert "s1 ch 2: phase" in [a.get_ylabel() for a in fig.axes]
    # Frames tile the scales side by side at one height: the coarse 4x4 field drawn as large.
    full = viz.field_frames(traj, upscale=4, caption=False)
    fine = viz.field_frames(traj, scales=(0,), upscale=4, caption=False)
    coarse = viz.field_frames(traj, scales=(1,), upscale=4, caption=False)
    # `upscale` applies to the first scale shown: 8x8 -> 32x32, or 4x4 -> 16x16 alone.
    assert fine[0].shape == (32, 32, 3) and coarse[0].shape == (16, 16, 3)
    assert full[0].shape == (32, 32 + 2 + 32, 3)
    np.testing.assert_array_equal(full[-1][:, :32], fine[-1])
    np.testing.assert_array_equal(full[-1][:, 34:], coarse[-1].repeat(2, 0).repeat(2, 1))
    # Each coarse pixel is a 4x4 block of its tile.
    np.testing.assert_array_equal(coarse[-1][::4, ::4].repeat(4, 0).repeat(4, 1), coarse[-1])
    out = viz.animate_field(traj, tmp_path / "ms.gif", scales=(0, 1))
    with Image.open(out) as im:
        assert im.n_frames == len(res)
    fig = viz.plot_fixed_point_gallery(model, x, path=tmp_path / "gallery.png")
    # The inputs, two rows per scale, a colour-bar host and a wheel per scale, one blank.
    assert len(fig.axes) == (1 + 2 * 2) * len(x) + 2 * 2 + 1
    with pytest.raises(ValueError, match="has 2 scale"):
        viz.plot_evolution(traj, scales=(2,))
    with pytest.raises(ValueError, match="channel=3: scale 0 has 3 channels"):
        viz.field_frames(traj, channel=3)
