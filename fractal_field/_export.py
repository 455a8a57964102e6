"""Export a classifier to serialized StableHLO with `jax.export`."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import export as jax_export

from ._model import FieldClassifier


def export_classifier(
    model: FieldClassifier,
    shape: Sequence[int],
    *,
    platforms: Sequence[str] | None = None,
) -> jax_export.Exported:
    """`jax.export` of `model.batched(x)[0]` (logits) for float32 batches of `shape`
    `(b, c, H, W)`: encoder, field solve and readout as one StableHLO module.

    The fixed-point solve stays a `while` loop (same stopping test as in JAX). The cell's
    contraction rescaling is folded into its weights first (`FractalCell.normalized`), so
    the module holds no SVD. `exported.serialize()` gives bytes to store;
    `jax.export.deserialize(data).call(x)` runs them from JAX on any of `platforms`
    (default: the current backend).
    """
    if not isinstance(model, FieldClassifier):
        raise TypeError(f"export_classifier expects a FieldClassifier, got {type(model).__name__}.")
    shape = tuple(int(s) for s in shape)
    c = model.encoder.in_channels
    if len(shape) != 4 or shape[1] != c or min(shape) < 1:
        raise ValueError(f"shape must be (b, {c}, H, W) with positive sizes, got {shape}.")
    model = eqx.tree_at(lambda m: m.cell, model, model.cell.normalized())
    params, static = eqx.partition(model, eqx.is_array)

    def logits(x):
        return eqx.combine(params, static).batched(x)[0]

    kwargs = {} if platforms is None else dict(platforms=tuple(platforms))
    return jax_export.export(jax.jit(logits), **kwargs)(jax.ShapeDtypeStruct(shape, jnp.float32))
