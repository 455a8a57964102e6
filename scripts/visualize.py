"""Figures and an animation of a trained field model's fixed point on one test image.

    python scripts/visualize.py [--checkpoint checkpoints/mnist_nano.eqx] [--input 0]
                                [--out figures/] [--every 1] [--max-steps 60]

Writes into `--out` (default `figures/`; `--out docs` regenerates the README's images):
`evolution_fractal.png` (the field crystallising over the iterations), `field.gif` (the same
as an animation), `residuals.png` and `solvers.png` (Naive, Anderson and Multigrid on the
same input; relative residuals) and `gallery.png` (fixed points of one test image per class);
with `--workdir`, also `training.png`. Without a checkpoint it falls back to a randomly
initialised nano model (with a warning).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax.random as jr
import numpy as np

import fractal_field as ff
from fractal_field import viz

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "mnist_nano.eqx"
IMAGE_SIZE = {"mnist": 28, "cifar10": 32}  # of the synthetic stand-in when data is missing


def load_model_or_random(checkpoint: str | Path | None, preset: str = "nano"):
    """`(model, dataset_name, note)`: the checkpoint's model, or a random `preset` model."""
    return _load(checkpoint, preset)[:3]


def _load(checkpoint, preset):
    """`(model, dataset_name, note, image_size)`; the image size of the training data."""
    from fractal_field._model import make_model
    from fractal_field._train import load_model

    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if path.exists():
        model, meta = load_model(path, with_meta=True)
        data = meta.get("config", {}).get("data", {})
        name = data.get("name", "mnist")
        size = IMAGE_SIZE.get(name, data.get("image_size", 8))
        print(f"Model: {path}")
        # Figure titles name the file only (no machine paths in the figures).
        return model, name, f"trained model {path.name}", size
    print(
        f"WARNING: no checkpoint at {path}; using a RANDOMLY INITIALISED {preset!r} model. "
        "The figures show the solver on an untrained field, not a trained one. Pass "
        "--checkpoint PATH (a .eqx file or a training workdir)."
    )
    return make_model(preset, key=jr.PRNGKey(0)), "mnist", f"random {preset} model", 28


def load_images(name: str, data_dir: str | None, image_size: int, channels: int):
    """The test split, or a synthetic stand-in (with a warning) if the data is missing."""
    from fractal_field._train import synthetic_dataset
    from fractal_field.data import DataNotFoundError, load_dataset

    if name == "synthetic":  # a model trained on a smoke config's generated images
        return synthetic_dataset(200, image_size=image_size, channels=channels, seed=1)
    try:
        return load_dataset(name, "test", data_dir=data_dir, source="local")
    except (DataNotFoundError, FileNotFoundError) as e:
        print(f"WARNING: {name} test data not found ({type(e).__name__}); using synthetic images.")
        return synthetic_dataset(200, image_size=image_size, channels=channels, seed=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help=f"default {DEFAULT_CHECKPOINT}")
    p.add_argument("--input", type=int, default=0, help="index of the test image")
    p.add_argument(
        "--out",
        default="figures",
        help="output directory (default: figures/; the README's images live in docs/, so "
        "`--out docs` regenerates those)",
    )
    p.add_argument("--data-dir", default=None, help="data directory (or $FRACTAL_FIELD_DATA)")
    p.add_argument("--every", type=int, default=1, help="record every K-th iterate")
    p.add_argument("--max-steps", type=int, default=60, help="solver steps at most")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of the solves")
    p.add_argument("--channels", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default=None, help="a training workdir: also plot training")
    args = p.parse_args(argv)

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data_name, note, size = _load(args.checkpoint, "nano")
    cin = model.encoder.in_channels
    ds = load_images(data_name, args.data_dir, size, cin)
    if not 0 <= args.input < len(ds.labels):
        p.error(f"--input {args.input} is not an index of the {len(ds.labels)} test images.")
    x = np.asarray(ds.normalize(ds.images[args.input : args.input + 1]))[0]
    label = int(ds.labels[args.input])
    if ds.class_names[label] != str(label):
        label = f"{label}, {ds.class_names[label]}"
    tol = dict(rtol=args.rtol, atol=1e-7)

    # The literal iteration of the cell (Naive): the field crystallising from z = 0.
    traj, res, sol = viz.model_trajectory(
        model, x, solver=ff.Naive(), every=args.every, max_steps=args.max_steps, **tol
    )
    what = f"{note}, test image {args.input} (label {label})"
    viz.plot_evolution(
        traj,
        args.channels,
        residuals=res,
        every=args.every,
        title=f"Field crystallising under z <- cell(z): {what}",
        path=out / "evolution_fractal.png",
    )
    viz.animate_field(
        traj, out / "field.gif", channel=args.channels[:3], residuals=res, every=args.every
    )
    print(
        f"Fixed point z* = cell(z*) of the {note} on test image {args.input} (label {label}), "
        f"Naive iteration from z = 0: {int(sol.stats.num_steps)} steps, relative residual "
        f"||f(z) - z|| / ||f(z)|| {float(sol.stats.relative_residual):.2e} "
        f"(absolute {float(sol.stats.residual):.2e})"
        + ("" if sol.result == ff.RESULTS.successful else f", above --rtol {args.rtol:g}")
    )

    sols = viz.compare_solvers(model, x, max_steps=args.max_steps, **tol)
    for name, s in sols.items():
        print(
            f"{name}: {int(s.stats.num_steps)} steps, {float(s.stats.num_fn_evals):.1f} "
            f"fine evals, rel. residual {float(s.stats.relative_residual):.2e}"
        )
    viz.plot_residuals(sols, x="work", rtol=args.rtol, title=what, path=out / "residuals.png")
    viz.plot_solver_comparison(model, x, solutions=sols, title=what, path=out / "solvers.png")

    idx = viz.first_of_each_class(ds.labels, ds.num_classes)
    images = np.asarray(ds.normalize(ds.images[idx]))
    viz.plot_fixed_point_gallery(
        model,
        images,
        ds.labels[idx],
        class_names=ds.class_names,
        title=f"Fixed points, one test image per class ({note})",
        path=out / "gallery.png",
    )
    written = ["evolution_fractal.png", "field.gif", "residuals.png", "solvers.png", "gallery.png"]
    if args.workdir:
        viz.plot_training(args.workdir, path=out / "training.png")
        written.append("training.png")
    print(f"Wrote {', '.join(written)} to {out}/ in {time.time() - t0:.0f}s.")


if __name__ == "__main__":
    main()
