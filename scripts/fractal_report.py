"""Fractal dimension of a trained field model: weights, equilibrium fields and their evolution.

    python scripts/fractal_report.py --checkpoint checkpoints/mnist_nano.eqx
        [--data-dir ../shared/data] [--per-class 10] [--trajectories 10]
        [--json benchmarks/results/fractal_report.json] [--figures docs/fractal]

Measures, for the checkpoint's model and for the same architecture freshly initialised (and a
Gaussian matrix of the same shape as a structure-free reference):

- weights: the box-counting dimension `D` of every parameter with a 2-D grid of smallest side
  >= 4 (`ff.fractal.as_matrix`: conv kernels as `(out, in * kh * kw)`, complex by magnitude,
  occupied where `|w|` exceeds its mean) and its discrete-scale-invariance report at segment
  sizes 4, 8, 16 (tolerance 0.1);
- equilibrium fields: `D` of `|z*|` (each channel's 14x14 field, occupied above its mean) per
  channel and per class, over `--per-class` test images of each class;
- the field at each iteration of the plain cell iteration (`ff.Naive`) from `z = 0`, on
  `--trajectories` test images: does `D` settle as the field crystallises?

Writes the numbers as JSON and figures (`summary.png`, `weights_dsi.png`, `weights_box.png`,
`fields_classes.png`, `fields_iterations.png`, `segment_graph.png`) into `--figures`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import ml_collections
import numpy as np

import fractal_field as ff
from fractal_field import fractal, viz
from fractal_field._provenance import provenance
from fractal_field._train import build_model, synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
DSI = dict(r0=4, lam=2, num=3, tol=0.1)


def _nan(v) -> float | None:
    v = float(v)
    return round(v, 4) if math.isfinite(v) else None


def field_dimension(f: np.ndarray) -> float:
    """`D` of one `(h, w)` field's magnitude above its mean; `nan` if it is constant."""
    try:
        return fractal.box_counting_dimension(f, threshold="mean").dimension
    except ValueError:
        return math.nan


def weight_rows(model) -> dict:
    """`{path: (matrix, BoxCounting, ScaleInvariance)}` for parameters with a 2-D grid."""
    out = {}
    params = eqx.filter(model, eqx.is_inexact_array)
    for p, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        m = fractal.as_matrix(np.asarray(w))
        if min(m.shape) < 4:
            continue
        box = fractal.box_counting_dimension(m, threshold="mean")
        dsi = fractal.scale_invariance(m, threshold="mean", **DSI)
        out[jax.tree_util.keystr(p)] = (m, box, dsi)
    return out


def weight_json(rows: dict) -> dict:
    return {
        name: dict(
            shape=list(m.shape),
            D=_nan(box.dimension),
            r2=_nan(box.r2),
            scales=list(box.scales),
            counts=list(box.counts),
            dsi_scales=list(dsi.scales),
            dsi_D=[_nan(d) for d in dsi.dimensions],
            dsi_spread=_nan(dsi.spread),
            dsi_holds=dsi.holds,
        )
        for name, (m, box, dsi) in rows.items()
    }


@eqx.filter_jit
def _fields(model, x):
    _, sol = model.batched(x)
    return sol.value


def field_dimensions(model, x) -> np.ndarray:
    """`(N, C)` dimensions of `|z*|` per image and channel."""
    z = np.asarray(_fields(model, x))
    return np.array([[field_dimension(c) for c in img] for img in z])


def iteration_dimensions(model, images, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean over channels of `D(|z_t|)` at every Naive iteration `t`, and the
    relative residuals; both `(n, max_steps + 1)` (nan after convergence)."""
    dims = np.full((len(images), max_steps + 1), np.nan)
    res = np.full((len(images), max_steps + 1), np.nan)
    for i, x in enumerate(images):
        traj, r, _ = viz.model_trajectory(
            model, x, solver=ff.Naive(), max_steps=max_steps, rtol=1e-5, atol=1e-7
        )
        traj = np.asarray(traj)
        for t in range(len(traj)):
            d = [field_dimension(c) for c in traj[t]]
            dims[i, t] = np.nanmean(d) if np.isfinite(d).any() else np.nan
        norm = np.linalg.norm(traj[-1])
        res[i, : len(r)] = np.asarray(r) / max(norm, 1e-12)
        # A converged field stays at its fixed point: carry its last values forward.
        dims[i, len(traj) :] = dims[i, len(traj) - 1]
        res[i, len(r) :] = res[i, len(r) - 1]
    return dims, res


def load_test_images(name: str, data_dir, per_class: int, channels: int):
    from fractal_field.data import DataNotFoundError, load_dataset

    try:
        ds = load_dataset(name, "test", data_dir=data_dir, source="local")
        note = f"{name} test split"
    except (DataNotFoundError, FileNotFoundError) as e:
        print(f"WARNING: {name} test data not found ({type(e).__name__}); using synthetic images.")
        ds = synthetic_dataset(40 * per_class, image_size=28, channels=channels, seed=1)
        note = "synthetic images (test data not found)"
    idx = np.concatenate(
        [np.flatnonzero(ds.labels == c)[:per_class] for c in range(ds.num_classes)]
    )
    return np.asarray(ds.normalize(ds.images[idx]), np.float32), np.asarray(ds.labels[idx]), note


def summary_figure(report, it_trained, it_fresh, path):
    fig = viz._common.new_figure(13.0, 3.6)
    a, b, c = fig.subplots(1, 3)
    cell = ".cell.conv.conv.weight"
    for i, (label, key) in enumerate(
        (("trained", "trained"), ("initialised", "initialised"), ("Gaussian", "gaussian"))
    ):
        w = report["weights"][key].get(cell)
        if w:
            a.plot(w["dsi_scales"], w["dsi_D"], "o-", color=f"C{i}", label=label)
    a.set_xscale("log", base=2)
    a.set_xlabel("segment size r_k")
    a.set_ylabel("mean segment D")
    a.set_title("cell kernel K (28 x 252), |w| > mean", fontsize=9)
    a.legend(fontsize=8)
    for i, key in enumerate(("trained", "initialised")):
        d = report["fields"][key]["per_channel"]
        b.plot(
            range(len(d)), [np.nan if v is None else v for v in d], "o", color=f"C{i}", label=key
        )
    b.set_xlabel("channel")
    b.set_ylabel("D of |z*| (14 x 14, > mean)")
    b.set_title("equilibrium field per channel", fontsize=9)
    b.legend(fontsize=8)
    for i, (key, dims) in enumerate((("trained", it_trained), ("initialised", it_fresh))):
        t = np.arange(dims.shape[1])
        m = np.nanmean(dims, 0)
        c.plot(t, m, "-", color=f"C{i}", label=key)
    c.set_xlabel("cell iteration t (Naive, from z = 0)")
    c.set_ylabel("mean D of |z_t|")
    c.set_title("dimension while the field crystallises", fontsize=9)
    c.legend(fontsize=8)
    for ax in (a, b, c):
        ax.grid(True, alpha=0.3)
    fig.suptitle(report["caption"], fontsize=8)
    return viz._common.finish(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mnist_nano.eqx"))
    p.add_argument("--data-dir", default=None, help="data directory (or $FRACTAL_FIELD_DATA)")
    p.add_argument("--per-class", type=int, default=10, help="test images per class")
    p.add_argument("--trajectories", type=int, default=10, help="images whose solve is traced")
    p.add_argument("--max-steps", type=int, default=40, help="Naive iterations traced")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh initialisation")
    p.add_argument("--null-draws", type=int, default=20, help="shuffled/Gaussian references")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fractal_report.json"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "fractal"))
    args = p.parse_args(argv)
    t0 = time.time()
    warnings.filterwarnings("ignore", "Mean of empty slice")

    model, meta = ff.load_model(args.checkpoint, with_meta=True)
    config = ml_collections.ConfigDict(meta["config"])
    fresh = build_model(config, key=jr.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)

    weights = {"trained": weight_rows(model), "initialised": weight_rows(fresh)}
    weights["gaussian"] = {}
    nulls = {}
    for name, (m, box, _) in weights["trained"].items():
        g = rng.normal(size=m.shape)
        gbox = fractal.box_counting_dimension(g, threshold="mean")
        weights["gaussian"][name] = (g, gbox, fractal.scale_invariance(g, threshold="mean", **DSI))
        # Null references: the trained entries in random places; Gaussian matrices.
        shuffled = [
            fractal.box_counting_dimension(
                rng.permutation(m.ravel()).reshape(m.shape), threshold="mean"
            ).D
            for _ in range(args.null_draws)
        ]
        gauss = [
            fractal.box_counting_dimension(rng.normal(size=m.shape), threshold="mean").D
            for _ in range(args.null_draws)
        ]
        nulls[name] = dict(
            trained_D=_nan(box.D),
            shuffled_D_mean=_nan(np.mean(shuffled)),
            shuffled_D_std=_nan(np.std(shuffled)),
            gaussian_D_mean=_nan(np.mean(gauss)),
            gaussian_D_std=_nan(np.std(gauss)),
            draws=args.null_draws,
        )

    x, labels, data_note = load_test_images(
        config.data.get("name", "mnist"), args.data_dir, args.per_class, model.encoder.in_channels
    )
    fields = {}
    for key, m in (("trained", model), ("initialised", fresh)):
        d = field_dimensions(m, x)  # (N, C)
        fields[key] = dict(
            mean=_nan(np.nanmean(d)),
            std_over_images=_nan(np.nanstd(np.nanmean(d, 1))),
            per_channel=[_nan(v) for v in np.nanmean(d, 0)],
            per_class={
                int(c): _nan(np.nanmean(d[labels == c])) for c in np.unique(labels).tolist()
            },
            constant_fields=int(np.isnan(d).sum()),
            n_fields=int(d.size),
        )
    pick = np.concatenate([np.flatnonzero(labels == c)[:1] for c in np.unique(labels)])
    pick = pick[: args.trajectories]
    it_trained, res_trained = iteration_dimensions(model, x[pick], args.max_steps)
    it_fresh, res_fresh = iteration_dimensions(fresh, x[pick], args.max_steps)

    source = provenance("scripts/fractal_report.py", argv)
    report = dict(
        **source,
        checkpoint=Path(args.checkpoint).name,
        data=data_note,
        images=int(len(x)),
        threshold="mean",
        dsi=DSI,
        weights={k: weight_json(v) for k, v in weights.items()},
        weight_nulls=nulls,
        fields=fields,
        iterations={
            key: dict(
                mean_D=[_nan(v) for v in np.nanmean(dims, 0)],
                mean_relative_residual=[_nan(v) for v in np.nanmean(res, 0)],
            )
            for key, dims, res in (
                ("trained", it_trained, res_trained),
                ("initialised", it_fresh, res_fresh),
            )
        },
        caption=f"{source['command']} ({source['date']}, {source['hardware']})",
    )

    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)

    def stamp(fig, name):
        fig.suptitle(report["caption"], fontsize=6)
        viz._common.finish(fig, out / name)

    summary_figure(report, it_trained, it_fresh, out / "summary.png")
    fig = viz.plot_scale_invariance(
        {f"{name} {key}": weights[key][name][2] for name in weights["trained"] for key in weights},
        title="Scale invariance of the weights (mean segment D at r = 4, 8, 16)",
    )
    stamp(fig, "weights_dsi.png")
    cell = ".cell.conv.conv.weight"
    fig = viz.plot_box_counting(
        {key: weights[key][cell][1] for key in weights if cell in weights[key]},
        title="Box counting of the cell kernel |K| > mean",
    )
    stamp(fig, "weights_box.png")
    fig = viz._common.new_figure(5.5, 3.4)
    ax = fig.subplots()
    for key in fields:
        pc = fields[key]["per_class"]
        ax.plot(list(pc), [np.nan if v is None else v for v in pc.values()], "o-", label=key)
    ax.set_xlabel("class")
    ax.set_ylabel("mean D of |z*|")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Equilibrium fields per class", fontsize=9)
    stamp(fig, "fields_classes.png")
    fig = viz._common.new_figure(5.5, 3.4)
    ax = fig.subplots()
    for i, (key, dims) in enumerate((("trained", it_trained), ("initialised", it_fresh))):
        ax.plot(dims.T, color=f"C{i}", lw=0.5, alpha=0.4)
        ax.plot(np.nanmean(dims, 0), color=f"C{i}", lw=2, label=key)
    ax.set_xlabel("cell iteration t (Naive, from z = 0)")
    ax.set_ylabel("D of |z_t| (mean over channels)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    stamp(fig, "fields_iterations.png")
    names = list(weights["trained"])
    feats, edges = fractal.segment_graph(
        [weights["trained"][n][0] for n in names], 8, gamma=1.0, s=1.0
    )
    fig = viz.plot_segment_graph(
        feats,
        edges,
        layer_names=names,
        max_edges=150,
        title="Segment graph (r = 8)",
    )
    stamp(fig, "segment_graph.png")

    report["seconds"] = round(time.time() - t0, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    for key in weights:
        for name, (_, box, dsi) in weights[key].items():
            print(
                f"{key:12s} {name:26s} D={box.dimension:.3f} (r2 {box.r2:.3f}) "
                f"DSI D(r)={[round(d, 3) for d in dsi.dimensions]} spread {dsi.spread:.3f} "
                f"{'holds' if dsi.holds else 'fails'}"
            )
    for name, n in nulls.items():
        print(
            f"{name}: trained D {n['trained_D']}, shuffled {n['shuffled_D_mean']} +- "
            f"{n['shuffled_D_std']}, Gaussian {n['gaussian_D_mean']} +- {n['gaussian_D_std']}"
        )
    for key, f in fields.items():
        print(f"fields {key}: mean D {f['mean']}, per class {f['per_class']}")
    print(f"Wrote {args.json} and figures to {out}/ in {report['seconds']}s.")


if __name__ == "__main__":
    main()
