"""An interactive web demo of a trained field: draw a digit or pick a test image, see the class
probabilities, and watch the field crystallise.

    python scripts/demo.py [--checkpoint checkpoints/mnist_nano.eqx] [--port 7860]
                           [--host 127.0.0.1] [--data-dir ../shared/data]

Starts a local Gradio app (open the printed address in a browser) for an MNIST or a CIFAR-10
model; which one, and so the input size, normalisation and class names, comes from the
checkpoint's training config (`data.name`, see `DATASETS`). Inputs: for a digit model a
sketchpad, the MNIST test images shipped in `scripts/demo_digits/`, or an uploaded image file,
prepared as MNIST digits were: grayscale, white on black, the strokes scaled into a 20x20 box
and centred by their centre of mass in a 28x28 image. For a CIFAR-10 model the test images
shipped in `scripts/demo_cifar10/`, or any uploaded picture, made RGB, scaled and centre-cropped
to 32x32. With `--data-dir`, test images of the model's dataset there (the first five of each
class) are offered instead of the shipped ones. Outputs: the class probabilities, the image the
model sees, an animation and a grid of the field's iterates (magnitude and phase) and the
residual curve. The solver (Naive, Anderson, Multigrid) and its budget (max steps) are
controls: one solve to the largest budget per input and solver is recorded and every smaller
budget is read off it (a solve stopped after `k` steps has exactly the first `k` iterates).

The model logic (`prepare_drawing`, `prepare_upload`, `prepare_photo`, `FieldDemo`) needs no
browser and no Gradio; `build_app` makes the web app.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import io
import os
import re
import shutil
import tempfile
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

import fractal_field as ff
from fractal_field import viz
from fractal_field.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    normalize,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "mnist_nano.eqx"
DIGITS_DIR = ROOT / "scripts" / "demo_digits"
CIFAR10_DIR = ROOT / "scripts" / "demo_cifar10"
SOLVERS = ("Naive", "Anderson", "Multigrid")
SIZE = 28  # MNIST: 28x28 images, the digit scaled into a 20x20 box
BOX = 20
PHOTO = 32  # CIFAR-10: 32x32 RGB images
MAX_SIDE = 4096  # larger uploads are refused
INK = 0.1  # ink above this fraction of the darkest-to-lightest range counts as a stroke


class InputError(ValueError):
    """An input the demo cannot classify; its message is shown to the user."""


# ----------------------------------------------------------------------------------------------
# Preparing inputs as MNIST digits


def _gray(image: np.ndarray) -> np.ndarray:
    """`(H, W)`, `(H, W, 1..4)` image (uint8, bool or floats in [0, 1]) -> floats `(H, W)` in
    [0, 1], transparent pixels composited onto white."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (2, 3, 4))):
        raise InputError(f"Expected an image (H, W) or (H, W, channels); got shape {a.shape}.")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == bool or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError("The image has non-finite (NaN or inf) pixels.")
    else:
        raise InputError(f"Unsupported pixel type {a.dtype} (expected uint8, uint16 or float).")
    if a.ndim == 2:
        return np.clip(a, 0.0, 1.0)
    alpha = a[..., -1] if a.shape[-1] in (2, 4) else np.ones(a.shape[:2], np.float32)
    colour = a[..., :-1] if a.shape[-1] in (2, 4) else a
    lum = colour[..., 0] if colour.shape[-1] == 1 else colour @ np.float32([0.299, 0.587, 0.114])
    return np.clip(alpha * lum + (1.0 - alpha), 0.0, 1.0)


def _ink(gray: np.ndarray, what: str) -> np.ndarray:
    """The strokes of a grayscale image as white on black in [0, 1]: the background is the
    median of the border pixels; dark strokes on a light background are inverted."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = background - gray if background > 0.5 else gray - background
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    if peak < INK:
        raise InputError(
            f"The {what} is empty (one flat colour): draw a digit, or pick a test image."
        )
    return ink / peak


def _mnist_layout(ink: np.ndarray) -> np.ndarray:
    """Crop the strokes, scale them into a 20x20 box (aspect kept, anti-aliased) and place
    their centre of mass at the centre of a 28x28 image, as MNIST's digits were."""
    rows = np.flatnonzero((ink > INK).any(1))
    cols = np.flatnonzero((ink > INK).any(0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    s = BOX / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = Image.fromarray(np.round(crop * 255).astype(np.uint8)).resize(
        (nw, nh), Image.Resampling.LANCZOS
    )
    small = np.asarray(small, np.float32)
    mass = small.sum()
    cy = float(small.sum(1) @ np.arange(nh)) / mass
    cx = float(small.sum(0) @ np.arange(nw)) / mass
    centre = SIZE / 2  # MNIST's test digits: mean centre of mass at pixel (14.0, 14.0)
    top = int(np.clip(round(centre - cy), 0, SIZE - nh))
    left = int(np.clip(round(centre - cx), 0, SIZE - nw))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + nh, left : left + nw] = small
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def prepare_drawing(value) -> np.ndarray:
    """A sketchpad's value (Gradio's `{"composite": array, ...}`, or an image array) -> the
    MNIST-style `uint8 (28, 28)` digit, white on black. Raises `InputError` for an empty
    canvas."""
    if isinstance(value, dict):
        image = value.get("composite")
        if image is None:
            layers = [x for x in value.get("layers") or [] if x is not None]
            image = layers[-1] if layers else None
    else:
        image = value
    if image is None:
        raise InputError("The canvas is empty: draw a digit, or pick a test image.")
    return _mnist_layout(_ink(_gray(image), "canvas"))


def _open_upload(path, what: str, mode: str) -> tuple[Image.Image, str]:
    """An uploaded file's image, converted to PIL `mode`, and the file's name; `InputError`
    for no file or one that is not an image."""
    if path is None:
        raise InputError(f"No file uploaded: choose an image file (PNG, JPEG, ...) of {what}.")
    name = Path(path).name
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode), name
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(
            f"{name!r} is not an image file that can be read (PNG, JPEG, BMP, GIF, ...): "
            f"{type(e).__name__}."
        ) from e


def prepare_upload(path) -> np.ndarray:
    """An image file -> the MNIST-style `uint8 (28, 28)` digit. A 28x28 image is taken as an
    MNIST digit as it is (only made grayscale, white on black); a larger one is laid out as a
    drawing. Raises `InputError` for no file, a file that is not an image, or a wrong size."""
    im, name = _open_upload(path, "one digit", "LA")
    w, h = im.size
    image = np.asarray(im)
    if (h, w) != (SIZE, SIZE) and min(h, w) < SIZE:
        raise InputError(
            f"{name!r} is {w}x{h} pixels: upload a 28x28 MNIST digit, or a picture of one "
            f"digit at least 28 pixels a side."
        )
    if max(h, w) > MAX_SIDE:
        raise InputError(
            f"{name!r} is {w}x{h} pixels: images up to {MAX_SIDE} pixels a side are accepted."
        )
    ink = _ink(_gray(image), "image")
    if (h, w) == (SIZE, SIZE):
        return np.round(ink * 255).astype(np.uint8)
    return _mnist_layout(ink)


def prepare_photo(path) -> np.ndarray:
    """An image file -> a CIFAR-10-style `uint8 (32, 32, 3)` RGB image: transparent pixels
    composited onto white, the shorter side scaled to 32 pixels and the centre cropped (a
    32x32 image is taken as it is). Raises `InputError` for no file, a file that is not an
    image, or a wrong size."""
    rgba, name = _open_upload(path, "one object", "RGBA")
    w, h = rgba.size
    if min(h, w) < PHOTO:
        raise InputError(
            f"{name!r} is {w}x{h} pixels: upload a picture at least {PHOTO} pixels a side."
        )
    if max(h, w) > MAX_SIDE:
        raise InputError(
            f"{name!r} is {w}x{h} pixels: images up to {MAX_SIDE} pixels a side are accepted."
        )
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    s = PHOTO / min(w, h)
    nw, nh = max(PHOTO, round(w * s)), max(PHOTO, round(h * s))
    rgb = rgb.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - PHOTO) // 2, (nh - PHOTO) // 2
    return np.asarray(rgb.crop((left, top, left + PHOTO, top + PHOTO)))


# ----------------------------------------------------------------------------------------------
# The datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What the demo needs to know of a model's dataset.

    `name` is the training config's `data.name`; `shape` that of a prepared `uint8` image,
    `(H, W)` for grayscale or `(H, W, 3)`; `mean`/`std` the per-channel normalisation the model
    was trained with; `examples` the folder of shipped test images
    (`<name>_test_<index>_<label>.png`); `prepare_upload` turns an uploaded file into a
    prepared image; `drawing` says whether a sketchpad is offered (digits only)."""

    name: str
    title: str
    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    examples: Path
    prepare_upload: Callable[[Any], np.ndarray]
    drawing: bool

    @property
    def channels(self) -> int:
        return self.shape[2] if len(self.shape) == 3 else 1

    @property
    def size(self) -> int:
        return self.shape[0]

    def normalize(self, image: np.ndarray) -> jax.Array:
        """A prepared `uint8` image -> the model's input `float32 (c, H, W)`."""
        x = np.asarray(image).reshape(1, self.size, self.size, self.channels)
        return normalize(x, self.mean, self.std)[0]


DATASETS = {
    "mnist": Dataset(
        name="mnist",
        title="MNIST digits",
        shape=(SIZE, SIZE),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        classes=MNIST_CLASSES,
        examples=DIGITS_DIR,
        prepare_upload=prepare_upload,
        drawing=True,
    ),
    "cifar10": Dataset(
        name="cifar10",
        title="CIFAR-10 images",
        shape=(PHOTO, PHOTO, 3),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        classes=CIFAR10_CLASSES,
        examples=CIFAR10_DIR,
        prepare_upload=prepare_photo,
        drawing=False,
    ),
}


def dataset_of(meta: dict) -> Dataset:
    """The `Dataset` of a checkpoint from its metadata (`ff.load_model(..., with_meta=True)`):
    the training config's `data.name`. Raises `ValueError` for a dataset the demo does not
    know."""
    name = ((meta.get("config") or {}).get("data") or {}).get("name")
    if name not in DATASETS:
        raise ValueError(
            f"The demo shows models trained on {' or '.join(DATASETS)}; this checkpoint's "
            f"training config has data.name={name!r}."
        )
    return DATASETS[name]


def example_images(
    dataset: Dataset | None = None, data_dir: str | os.PathLike | None = None, count: int = 50
) -> dict:
    """`{name: uint8 image}` for `dataset` (default MNIST): up to `count` test images under
    `data_dir` (the first `count // classes` of each class, in index order), or without it the
    images shipped in `dataset.examples` (one of each class)."""
    dataset = DATASETS["mnist"] if dataset is None else dataset
    if data_dir is not None:
        from fractal_field.data import load_dataset

        ds = load_dataset(dataset.name, "test", data_dir=data_dir, source="local")
        labels = np.asarray(ds.labels)
        per_class = max(1, count // len(dataset.classes))
        idx = sorted(
            i for c in range(len(dataset.classes)) for i in np.flatnonzero(labels == c)[:per_class]
        )
        return {
            f"test image {i} (label {dataset.classes[labels[i]]})": np.asarray(
                ds.images[i]
            ).reshape(dataset.shape)
            for i in idx
        }
    out = {}
    mode = "L" if dataset.channels == 1 else "RGB"
    pattern = re.compile(rf"{dataset.name}_test_(\d+)_(?:label)?(\w+)")
    for path in sorted(dataset.examples.glob(f"{dataset.name}_test_*.png")):
        i, label = pattern.match(path.stem).groups()
        with Image.open(path) as im:
            out[f"test image {int(i)} (label {label})"] = np.asarray(im.convert(mode))
    return out


# ----------------------------------------------------------------------------------------------
# The field


@eqx.filter_jit
def _readouts(model, traj, value):
    return jax.vmap(model.readout)(traj), model.readout(value)


@dataclasses.dataclass(frozen=True)
class _Trace:
    trajectory: np.ndarray  # (n + 1, c, h, w): the iterates z_0 .. z_n
    residuals: np.ndarray  # (n + 1,): ||f(z_k) - z_k||
    step_logits: np.ndarray  # (n + 1, classes): the readout of each iterate
    final_logits: np.ndarray  # the readout of the solution
    num_steps: int
    result: str
    relative_residual: float


@dataclasses.dataclass(frozen=True)
class FieldRun:
    """What the demo shows for one input, solver and budget.

    `probabilities` are those of a solve with `max_steps=budget`; `trajectory` and
    `residuals` hold its iterates `z_0 .. z_steps` and their residuals `||f(z) - z||`."""

    image: np.ndarray
    solver: str
    budget: int
    steps: int
    converged: bool
    probabilities: np.ndarray
    trajectory: np.ndarray
    residuals: np.ndarray
    rtol: float
    classes: tuple[str, ...] = MNIST_CLASSES

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def label(self) -> str:
        """The predicted class's name."""
        return self.classes[self.prediction]


class FieldDemo:
    """A trained classifier of `dataset`'s images and the solves behind the demo (no web code).

    `run(image, solver, budget)` classifies a prepared image (`uint8` of shape
    `dataset.shape`: `(28, 28)` for MNIST, `(32, 32, 3)` for CIFAR-10) with a solve of at most
    `budget` steps (1..`max_budget`). Each (image, solver) is solved once to `max_budget`
    steps, recording every iterate; a smaller budget's solve is the same solve stopped early,
    whose result is read off the record: the readout of its last iterate `z_budget` (a solve
    that converges first returns its own solution). The last `cache` records are kept.
    """

    def __init__(
        self,
        model: ff.FieldClassifier,
        dataset: Dataset | str = "mnist",
        *,
        max_budget: int = 60,
        cache: int = 32,
    ):
        if not isinstance(model, ff.FieldClassifier):
            raise TypeError(f"Expected a FieldClassifier, got {type(model).__name__}.")
        if isinstance(dataset, str):
            if dataset not in DATASETS:
                raise ValueError(f"Unknown dataset {dataset!r}: choose one of {list(DATASETS)}.")
            dataset = DATASETS[dataset]
        channels, classes = model.encoder.in_channels, model.readout.linear.out_features
        if (channels, classes) != (dataset.channels, len(dataset.classes)):
            plural = "s" if dataset.channels > 1 else ""
            raise ValueError(
                f"The demo classifies {dataset.title}: it needs a model with "
                f"{dataset.channels} input channel{plural} and {len(dataset.classes)} classes, "
                f"got {channels} and {classes}."
            )
        if isinstance(model.cell, ff.MultiScaleCell):
            raise ValueError("The demo shows single-field models (scales=1) only.")
        if max_budget < 1:
            raise ValueError(f"max_budget={max_budget} must be >= 1.")
        self.model = model
        self.dataset = dataset
        self.max_budget = int(max_budget)
        blank = jnp.zeros((dataset.channels, dataset.size, dataset.size))
        grid = eqx.filter_eval_shape(model.encoder, blank).shape[-2:]
        self.solvers = viz.default_solvers(tuple(grid))
        self.default_solver = next(
            (n for n, s in self.solvers.items() if type(s) is type(model.solver)), "Anderson"
        )
        self._cache: OrderedDict = OrderedDict()
        self._size = cache

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> FieldDemo:
        """The demo of a checkpoint written by `ff.train` (`ff.load_model`), for the dataset
        of its training config (`dataset_of`); keyword arguments as for `FieldDemo`."""
        model, meta = ff.load_model(path, with_meta=True)
        return cls(model, dataset_of(meta), **kwargs)

    def _trace(self, image: np.ndarray, solver: str) -> _Trace:
        key = (image.tobytes(), solver)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        x = self.dataset.normalize(image)
        traj, res, sol = viz.model_trajectory(
            self.model, x, solver=self.solvers[solver], max_steps=self.max_budget
        )
        # Padded to one length, so that the readout compiles once.
        pad = np.zeros((self.max_budget + 1 - len(traj), *traj.shape[1:]), traj.dtype)
        step_logits, final = _readouts(self.model, np.concatenate([traj, pad]), sol.value)
        trace = _Trace(
            trajectory=traj,
            residuals=res,
            step_logits=np.asarray(step_logits)[: len(traj)],
            final_logits=np.asarray(final),
            num_steps=int(sol.stats.num_steps),
            result="successful" if sol.result == ff.RESULTS.successful else "failed",
            relative_residual=float(sol.stats.relative_residual),
        )
        self._cache[key] = trace
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return trace

    def run(self, image: np.ndarray, solver: str, budget: int) -> FieldRun:
        image = np.asarray(image)
        if image.shape != self.dataset.shape or image.dtype != np.uint8:
            how = "prepare_drawing or prepare_upload" if self.dataset.drawing else "prepare_photo"
            raise InputError(
                f"Expected a uint8 {self.dataset.shape} image, got {image.dtype} "
                f"{image.shape}: prepare it with {how}."
            )
        if solver not in self.solvers:
            raise InputError(f"Unknown solver {solver!r}: choose one of {list(self.solvers)}.")
        if isinstance(budget, float) and budget.is_integer():
            budget = int(budget)
        if not isinstance(budget, int) or not 1 <= budget <= self.max_budget:
            raise InputError(f"The budget must be a whole number of steps in 1..{self.max_budget}.")
        t = self._trace(image, solver)
        if budget >= t.num_steps:
            steps, logits, converged = t.num_steps, t.final_logits, t.result == "successful"
        else:
            steps, logits, converged = budget, t.step_logits[budget], False
        return FieldRun(
            image=image,
            solver=solver,
            budget=budget,
            steps=steps,
            converged=converged,
            probabilities=np.asarray(jax.nn.softmax(jnp.asarray(logits))),
            trajectory=t.trajectory[: steps + 1],
            residuals=t.residuals[: steps + 1],
            rtol=self.model.rtol,
            classes=self.dataset.classes,
        )


# ----------------------------------------------------------------------------------------------
# Pictures


def _figure_array(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return np.asarray(Image.open(buf).convert("RGB"))


def summary(run: FieldRun) -> str:
    """One Markdown paragraph on a run: the prediction and how the solve ended."""
    p = run.probabilities
    head = f"**Prediction: {run.label}** (probability {p.max():.3f})."
    r = run.residuals
    res = f"residual ||f(z) - z|| {r[-1]:.2e}, from {r[0]:.2e} at z = 0"
    if run.converged:
        how = f"converged in {run.steps} steps of a budget of {run.budget} ({res})."
    else:
        how = (
            f"stopped by the budget after {run.steps} steps, not yet at the model's tolerance "
            f"rtol {run.rtol:g} ({res}): raise the budget to let the field settle."
        )
    return f"{head} {run.solver} solver: {how}"


def pictures(run: FieldRun, workdir: Path) -> dict:
    """`{"input", "animation", "evolution", "residual"}`: the model's input (upscaled), a GIF
    of the field's first three channels, the magnitude/phase grid and the residual curve."""
    big = np.repeat(np.repeat(run.image, 8, axis=0), 8, axis=1)
    gif = workdir / f"field-{uuid.uuid4().hex[:12]}.gif"
    chans = list(range(min(3, run.trajectory.shape[1])))
    viz.animate_field(run.trajectory, gif, channel=chans, residuals=run.residuals, fps=6)
    title = f"{run.solver}, {run.steps} steps (budget {run.budget})"
    evolution = viz.plot_evolution(run.trajectory, chans, residuals=run.residuals, title=title)
    residual = viz.plot_residuals({run.solver: run.residuals}, relative=None)
    ax = residual.axes[0]
    ax.axvline(run.budget, color="gray", ls="--", lw=0.8, label=f"budget {run.budget}")
    ax.legend(fontsize=8)
    return dict(
        input=big,
        animation=str(gif),
        evolution=_figure_array(evolution),
        residual=_figure_array(residual),
    )


# ----------------------------------------------------------------------------------------------
# The web app


def build_app(demo: FieldDemo, examples: dict, *, workdir: Path | None = None):
    """The Gradio `Blocks` app around `demo`, with `examples` (`{name: uint8 image}`, as
    `example_images(demo.dataset)`). The sketchpad is offered for digit models only."""
    import gradio as gr

    data = demo.dataset
    thing = "digit" if data.drawing else "picture"

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="ff-demo-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)

    def show(image, solver, budget):
        """Outputs for `image` (a prepared digit, or a thunk preparing it)."""
        try:
            image = image() if callable(image) else image
            run = demo.run(image, solver, int(budget))
            pics = pictures(run, workdir)
        except InputError as e:
            return None, f"**Cannot classify this input.** {e}", None, None, None, None, None
        except Exception as e:  # noqa: BLE001 - shown as a message, not a traceback
            traceback.print_exc()
            return None, f"**Something went wrong:** {type(e).__name__}: {e}", *(None,) * 5
        labels = {run.classes[i]: float(p) for i, p in enumerate(run.probabilities)}
        return (
            image,
            summary(run),
            pics["input"],
            labels,
            pics["animation"],
            pics["evolution"],
            pics["residual"],
        )

    def from_drawing(value, solver, budget):
        return show(lambda: prepare_drawing(value), solver, budget)

    def from_example(name, solver, budget):
        if name not in examples:
            return None, "**Pick a test image from the list.**", *(None,) * 5
        return show(examples[name], solver, budget)

    def from_upload(path, solver, budget):
        return show(lambda: data.prepare_upload(path), solver, budget)

    def again(current, solver, budget):
        if current is None:
            return (gr.skip(),) * 7
        return show(current, solver, budget)

    # delete_cache: Gradio's copies of the outputs are removed after an hour.
    with gr.Blocks(
        title="fractal-field demo", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:
        if data.drawing:
            how = "Draw a digit (or pick an MNIST test image, or upload one)"
        else:
            how = (
                f"Pick a {data.title.split()[0]} test image or upload a picture (made RGB, "
                f"scaled and centre-cropped to {data.size}x{data.size}; drawing is for digit "
                "models only)"
            )
        gr.Markdown(
            f"## fractal-field: a trained field classifying a {thing}\n"
            f"{how}, choose a fixed-point solver and its budget, and watch the complex field "
            "crystallise from z = 0 to its fixed point: hue is the phase, brightness the "
            f"magnitude. Classes: {', '.join(data.classes)}."
        )
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Tabs():
                    if data.drawing:
                        with gr.Tab("Draw"):
                            sketch = gr.Sketchpad(
                                type="numpy",
                                image_mode="RGBA",
                                canvas_size=(280, 280),
                                brush=gr.Brush(
                                    default_size=20, colors=["#000000"], color_mode="fixed"
                                ),
                                layers=False,
                                label="Draw one digit",
                                elem_id="sketch",
                            )
                            draw_btn = gr.Button(
                                "Classify drawing", variant="primary", elem_id="classify-drawing"
                            )
                    with gr.Tab("Test image"):
                        pick = gr.Dropdown(
                            list(examples),
                            value=None,
                            label=f"{data.title.split()[0]} test image",
                            elem_id="pick",
                        )
                    with gr.Tab("Upload"):
                        upload = gr.File(
                            label=f"An image file of one {'digit' if data.drawing else 'object'}",
                            type="filepath",
                            elem_id="upload",
                        )
                solver = gr.Radio(
                    list(demo.solvers),
                    value=demo.default_solver,
                    label="Fixed-point solver",
                    elem_id="solver",
                )
                budget = gr.Slider(
                    1,
                    demo.max_budget,
                    value=min(demo.model.max_steps, demo.max_budget),
                    step=1,
                    label="Solver budget (max steps)",
                    elem_id="budget",
                )
            with gr.Column(scale=3):
                status = gr.Markdown(
                    "Draw a digit or pick a test image."
                    if data.drawing
                    else "Pick a test image or upload a picture.",
                    elem_id="status",
                )
                with gr.Row():
                    seen = gr.Image(
                        label=f"What the model sees ({data.size}x{data.size})",
                        format="png",
                        interactive=False,
                        height=240,
                        elem_id="model-input",
                    )
                    probs = gr.Label(
                        num_top_classes=10, label="Class probabilities", elem_id="probs"
                    )
                with gr.Row():
                    anim = gr.Image(
                        label="The field crystallising (channels 0-2)",
                        type="filepath",
                        interactive=False,
                        height=300,
                        elem_id="animation",
                    )
                    residual = gr.Image(
                        label="Residual per step",
                        format="png",
                        interactive=False,
                        height=300,
                        elem_id="residual",
                    )
        evolution = gr.Image(
            label="Magnitude and phase over the iterations",
            format="png",
            interactive=False,
            elem_id="evolution",
        )
        outputs = [current, status, seen, probs, anim, evolution, residual]
        if data.drawing:
            draw_btn.click(from_drawing, [sketch, solver, budget], outputs)
        pick.select(from_example, [pick, solver, budget], outputs)
        upload.upload(from_upload, [upload, solver, budget], outputs)
        solver.input(again, [current, solver, budget], outputs)
        budget.release(again, [current, solver, budget], outputs)
    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a .eqx model file")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="data directory: offer test images of the model's dataset from there instead",
    )
    p.add_argument("--max-budget", type=int, default=60, help="largest solver budget (steps)")
    args = p.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        demo = FieldDemo.from_checkpoint(args.checkpoint, max_budget=args.max_budget)
        examples = example_images(demo.dataset, args.data_dir)
    except (OSError, ValueError, TypeError) as e:
        p.error(f"{type(e).__name__}: {e}")
    app = build_app(demo, examples)
    print(
        f"Model: {Path(args.checkpoint).name} ({demo.dataset.title}); {len(examples)} test images.",
        flush=True,
    )
    app.queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False)


if __name__ == "__main__":
    main()
