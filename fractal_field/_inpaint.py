"""Inpainting with a fractal field: known pixels hold the field, the cell fills the holes."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._adjoint import ImplicitAdjoint
from ._cell import FractalCell
from ._fixed_point import fixed_point, solve_settings
from ._solution import Solution
from ._solver import Anderson

_BINOMIAL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16


class InpaintMap(eqx.Module):
    """The field map of `InpaintField`: `m * inj + (1 - m) * cell(z, inj)` for
    `args = (inj, m)`, at any grid size (a known pixel, `m = 1`, holds its injection; a hole,
    `m = 0`, is updated by the cell). `cell` is a `FractalCell`, called as it is: pass
    `cell.normalized()` to evaluate it at several grid sizes, or `op` (its operator for one
    grid, built once per solve) to evaluate it on that grid only."""

    cell: FractalCell
    op: Any = None

    def __call__(
        self,
        z: Complex[Array, "c h w"],
        args: tuple[Complex[Array, "c h w"], Float[Array, "1 h w"]],
    ) -> Complex[Array, "c h w"]:
        inj, m = args
        new = self.cell(z, inj) if self.op is None else self.cell.step_with(self.op, z, inj)
        m = m.astype(jnp.real(z).dtype)
        return (m * inj + (1 - m) * new).astype(z.dtype)


class InpaintField(eqx.Module):
    """A deep-equilibrium inpainting model on a `(1, H, W)` image with a `(1, H, W)` mask
    (1: known pixel, 0: hole), at any grid size.

    - encoder: pointwise, `inj = a x m + b m + c` per complex channel (`x m`: the corrupted
      image);
    - field: the fixed point of `InpaintMap` (known pixels hold `inj`, the `FractalCell`
      fills the holes), from `z0 = 0`;
    - readout: pointwise, `Re(w . z) + d`, the restored image.

    Every part is pointwise or a 3x3 toroidal convolution, so one set of weights acts on any
    grid (train on a coarse grid, solve on a finer one, e.g. with `ff.Multigrid`).
    `diffusion_init=True` starts the cell's kernel as the binomial 3x3 average per channel
    (plus the usual random kernel, scaled by `init_noise`), the encoder as the image in every
    channel and the readout as their mean (plus noise of size `init_noise`): a field that
    starts by filling holes by diffusion. `gamma` bounds the cell's operator norm (1 allows
    exact averaging; the clamped known pixels keep the map contractive on the holes).
    """

    encoder: Complex[Array, "c 3"]
    cell: FractalCell
    readout_weight: Complex[Array, " c"]
    readout_bias: Float[Array, ""]
    solver: Any
    adjoint: Any
    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)

    def __init__(
        self,
        channels: int = 4,
        *,
        gamma: float = 1.0,
        alpha: float = 0.5,
        activation: str = "modrelu",
        norm_grid: tuple[int, int] = (32, 32),
        impl: str = "auto",
        diffusion_init: bool = True,
        init_noise: float = 0.1,
        solver=Anderson(history=5),
        adjoint=None,
        max_steps: int = 200,
        rtol: float = 1e-4,
        atol: float = 0.0,
        key: PRNGKeyArray,
    ):
        if channels < 1:
            raise ValueError(f"InpaintField(channels={channels}) must be >= 1.")
        if init_noise < 0:
            raise ValueError(f"InpaintField(init_noise={init_noise}) must be >= 0.")
        ekey, ckey, rkey = jr.split(key, 3)
        cell = FractalCell(
            channels,
            gamma=gamma,
            alpha=alpha,
            activation=activation,
            norm_grid=norm_grid,
            impl=impl,
            key=ckey,
        )
        if diffusion_init:
            w = cell.conv.conv.weight
            eye = np.eye(channels)[None, :, :, None, None] * _BINOMIAL
            cell = eqx.tree_at(
                lambda c: c.conv.conv.weight,
                cell,
                (jnp.asarray(eye) + init_noise * w).astype(w.dtype),
            )
        # Start near "every channel carries the image, the readout averages them".
        noise = lambda k, shape: init_noise * jr.normal(k, shape, jnp.complex64)  # noqa: E731
        first = 1 + noise(ekey, (channels, 1))
        self.encoder = jnp.concatenate([first, jnp.zeros((channels, 2))], 1).astype(jnp.complex64)
        self.cell = cell
        self.readout_weight = ((1 + noise(rkey, (channels,))) / channels).astype(jnp.complex64)
        self.readout_bias = jnp.zeros((), jnp.float32)
        self.solver = solver
        self.adjoint = ImplicitAdjoint() if adjoint is None else adjoint
        self.max_steps = max_steps
        self.rtol = rtol
        self.atol = atol

    @property
    def channels(self) -> int:
        return self.cell.channels

    def inject(
        self, image: Float[Array, "1 h w"], mask: Float[Array, "1 h w"]
    ) -> Complex[Array, "c h w"]:
        """The injection field from the corrupted image `image * mask` and the mask."""
        _check_inputs(image, mask)
        feats = jnp.stack([image[0] * mask[0], mask[0], jnp.ones_like(mask[0])])
        return jnp.einsum("ck,khw->chw", self.encoder, feats.astype(jnp.complex64))

    def readout(self, z: Complex[Array, "c h w"]) -> Float[Array, "1 h w"]:
        """The restored image from a field."""
        return (jnp.real(jnp.einsum("c,chw->hw", self.readout_weight, z)) + self.readout_bias)[None]

    def field_map(self, grid: tuple[int, int] | None = None) -> InpaintMap:
        """The map solved for: at any grid size (`grid=None`), or with the cell's operator
        built once for one `grid`."""
        if grid is None:
            return InpaintMap(self.cell.normalized())
        return InpaintMap(self.cell, self.cell.operator(*grid))

    def solve(
        self, image: Float[Array, "1 h w"], mask: Float[Array, "1 h w"], **fixed_point_kwargs
    ) -> Solution:
        """The field's fixed point for one image; keyword arguments override
        `ff.fixed_point`'s."""
        kwargs = solve_settings(self, fixed_point_kwargs)
        inj = self.inject(image, mask)
        agnostic = getattr(kwargs["solver"], "resolution_agnostic", False)
        fn = self.field_map(None if agnostic else inj.shape[1:])
        return fixed_point(fn, jnp.zeros_like(inj), (inj, mask), **kwargs)

    def __call__(
        self, image: Float[Array, "1 h w"], mask: Float[Array, "1 h w"], **fixed_point_kwargs
    ) -> tuple[Float[Array, "1 h w"], Solution]:
        """`(restored image, solution)` for one image (unbatched: `vmap` for a batch)."""
        sol = self.solve(image, mask, **fixed_point_kwargs)
        return self.readout(sol.value), sol


def _check_inputs(image, mask) -> None:
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(
            f"InpaintField expects an unbatched (1, H, W) image, got shape {image.shape}; "
            "use `jax.vmap` for batches."
        )
    if mask.shape != image.shape:
        raise ValueError(f"The mask's shape {mask.shape} differs from the image's {image.shape}.")


def hidden_mse(
    restored: Float[Array, "*b 1 h w"], image: Float[Array, "*b 1 h w"], mask: Array
) -> Array:
    """Mean squared error over the hidden pixels (`mask == 0`)."""
    hidden = 1 - mask
    return jnp.sum(hidden * (restored - image) ** 2) / jnp.maximum(jnp.sum(hidden), 1)


def box_masks(
    key: PRNGKeyArray,
    batch: int,
    grid: int,
    boxes: int = 2,
    size: tuple[float, float] = (0.25, 0.5),
) -> Float[Array, "batch 1 grid grid"]:
    """Random masks with `boxes` rectangular holes each, sides a fraction `size` of `grid`."""
    if not 0 < size[0] <= size[1] <= 1:
        raise ValueError(f"box_masks(size={size}) needs 0 < low <= high <= 1.")
    ks, kp = jr.split(key)
    sides = jr.uniform(ks, (batch, boxes, 2), minval=size[0], maxval=size[1]) * grid
    starts = jr.uniform(kp, (batch, boxes, 2)) * (grid - sides)
    idx = jnp.arange(grid) + 0.5
    inside = lambda s, a: (idx >= s[..., None]) & (idx < (s + a)[..., None])  # noqa: E731
    rows = inside(starts[..., 0], sides[..., 0])  # (batch, boxes, grid)
    cols = inside(starts[..., 1], sides[..., 1])
    holes = jnp.any(rows[..., :, None] & cols[..., None, :], axis=1)
    return (~holes).astype(jnp.float32)[:, None]


def upsample(images: Float[Array, "*b c h w"], grid: int) -> Float[Array, "*b c grid grid"]:
    """Bilinear resize of the last two axes to `grid x grid`."""
    shape = images.shape[:-2] + (grid, grid)
    return jax.image.resize(images, shape, "linear")


def smooth_images(key: PRNGKeyArray, n: int, grid: int) -> Float[Array, "n 1 grid grid"]:
    """`n` random smooth images in `[0, 1]` (low-pass noise): a data-free workload."""
    x = jr.normal(key, (n, 1, grid, grid))
    k = jnp.fft.fftfreq(grid) * grid
    low = jnp.exp(-(k[:, None] ** 2 + k[None] ** 2) / 4)
    x = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(x) * low))
    x = x / jnp.std(x, axis=(-2, -1), keepdims=True)
    return jax.nn.sigmoid(2 * x)


def make_inpaint(model_cfg: dict, solver_cfg: dict, adjoint_cfg: dict, *, key) -> InpaintField:
    """An `InpaintField` from the `model`, `solver` and `adjoint` sections of a config."""
    from ._train import build_adjoint, build_solver  # circular import

    return InpaintField(
        **dict(model_cfg),
        solver=build_solver(dict(solver_cfg)),
        adjoint=build_adjoint(dict(adjoint_cfg)),
        key=key,
    )


def train_inpaint(
    model: InpaintField,
    images: Float[Array, "n 1 h w"],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    boxes: int = 2,
    box_size: tuple[float, float] = (0.25, 0.5),
    clip: float = 1.0,
    key: PRNGKeyArray,
    log=None,
    log_every: int = 10,
) -> tuple[InpaintField, list[dict]]:
    """Fit `model` to fill random box holes (`box_masks`) in `images` by Adam on the hidden
    pixels' squared error, with the model's adjoint (implicit gradients by default).
    Returns the trained model and one record per step (`loss`, mean forward `steps`)."""
    import optax

    from ._complex_opt import complex_safe

    n, _, h, w = images.shape
    if h != w:
        raise ValueError(f"train_inpaint needs square images, got {h}x{w}.")
    if not 0 < batch_size <= n:
        raise ValueError(f"train_inpaint(batch_size={batch_size}) must lie in [1, {n}].")
    opt = complex_safe(optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr)))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, m):
        def loss_fn(params):
            restored, sol = jax.vmap(eqx.combine(params, static))(x, m)
            return hidden_mse(restored, x, m), sol.stats.num_steps

        (loss, nsteps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss, jnp.mean(nsteps)

    history = []
    for i in range(steps):
        kb, km = jr.split(jr.fold_in(key, i))
        idx = jr.choice(kb, n, (batch_size,), replace=False)
        masks = box_masks(km, batch_size, h, boxes, box_size)
        params, opt_state, loss, nsteps = step(params, opt_state, images[idx], masks)
        history.append(dict(step=i + 1, loss=float(loss), forward_steps=float(nsteps)))
        if log is not None and ((i + 1) % log_every == 0 or i == 0 or i + 1 == steps):
            log(f"step {i + 1}/{steps} loss {float(loss):.5f} forward steps {float(nsteps):.1f}")
    return eqx.combine(params, static), history


def save_inpaint(path: str, model: InpaintField, config: dict, **record) -> None:
    """Write `model`'s weights to `path` and `config` (its `model`, `solver` and `adjoint`
    sections, plus anything in `record`) to `path + ".json"`."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    eqx.tree_serialise_leaves(path, model)
    sections = {k: dict(config[k]) for k in ("model", "solver", "adjoint")}
    with open(path + ".json", "w") as f:
        json.dump(dict(config=sections, **record), f, indent=1, default=list)


def load_inpaint(path: str) -> InpaintField:
    """The `InpaintField` saved by `save_inpaint` at `path`."""
    import json

    with open(path + ".json") as f:
        cfg = json.load(f)["config"]
    model_cfg = dict(cfg["model"])
    if "norm_grid" in model_cfg:
        model_cfg["norm_grid"] = tuple(model_cfg["norm_grid"])
    like = make_inpaint(model_cfg, cfg["solver"], cfg["adjoint"], key=jr.PRNGKey(0))
    return eqx.tree_deserialise_leaves(path, like)
