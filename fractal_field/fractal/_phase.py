"""Phase flow: per-segment gradient norms and the loss, recorded during training."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PyTree


def tile_norms(g: Array, r: int) -> Array:
    """Frobenius norm of each `r x r` tile of `as_matrix(g)` (the grid of `T_r`; complex
    entries count `|g|^2`), shape `(ceil(m / r), ceil(n / r))`. Traceable."""
    a = jnp.asarray(g)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    a = a[None, :] if a.ndim == 1 else a.reshape(a.shape[0], -1)
    m, n = a.shape
    rows, cols = -(-m // r), -(-n // r)
    sq = jnp.pad(jnp.abs(a) ** 2, ((0, rows * r - m), (0, cols * r - n)))
    return jnp.sqrt(sq.reshape(rows, r, cols, r).sum((1, 3)))


@eqx.filter_jit
def _probe(model, batch, loss_fn, r):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, batch)
    leaves = jtu.tree_flatten_with_path(eqx.filter(grads, eqx.is_inexact_array))[0]
    return loss, [(jtu.keystr(p), tile_norms(g, r)) for p, g in leaves]


def segment_grad_norms(
    model: PyTree, loss_fn: Callable[[PyTree, Any], Array], batch: Any, *, r: int = 8
) -> dict:
    """The loss and per-segment gradient norms of `model` (any Equinox model) on `batch`.

    `loss_fn(model, batch)` returns a scalar; it is differentiated with respect to every
    floating-point or complex array of `model`. Returns a JSON-ready dict: `loss`,
    `grad_norm` (over all parameters), and `layers`: for each parameter (by its path, e.g.
    `.cell.conv.conv.weight`), `norms`, the Frobenius norms of the `r x r` tiles of its
    gradient (`tile_norms`, row-major), `grid` `[rows, cols]` and `norm` (the whole gradient).
    """
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"Segment size r={r!r} must be an integer >= 1.")
    loss, named = _probe(model, batch, loss_fn, int(r))
    loss, named = jax.device_get((loss, named))
    layers = {}
    for name, norms in named:
        norms = np.asarray(norms, np.float64)
        layers[name] = dict(
            norms=norms.ravel().tolist(),
            grid=list(norms.shape),
            norm=float(np.sqrt((norms**2).sum())),
        )
    total = math.sqrt(sum(v["norm"] ** 2 for v in layers.values()))
    return dict(loss=float(loss), grad_norm=total, layers=layers)


def classifier_loss(model, batch) -> Array:
    """Mean softmax cross-entropy of a `FieldClassifier` on `(images, labels)`, through
    `model.batched` (no augmentation, no dropout)."""
    images, labels = batch
    logits, _ = model.batched(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def log_phase_flow(
    path: str | os.PathLike, model, images, labels, *, step: int, epoch: int, r: int = 8
) -> dict:
    """The training hook (`fractal_probe_every` in a config): `segment_grad_norms` of
    `classifier_loss` on one training batch, before the step's update, appended as one JSON
    line (with `step` and `epoch`) to `path` (`fractal.jsonl` in the run's workdir)."""
    rec = dict(step=int(step), epoch=int(epoch), r=int(r))
    rec.update(segment_grad_norms(model, classifier_loss, (images, labels), r=r))
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec
