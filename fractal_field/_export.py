"""Export a classifier: serialized StableHLO (`jax.export`) or ONNX (`jax2onnx`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from ._cell import FractalCell
from ._model import FieldClassifier
from ._real_pairs import real_pairs
from ._solver import Anderson, Broyden, Naive


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
    logits, shape = _logits_fn(model, shape, "export_classifier")
    kwargs = {} if platforms is None else dict(platforms=tuple(platforms))
    return jax_export.export(jax.jit(logits), **kwargs)(jax.ShapeDtypeStruct(shape, jnp.float32))


def _logits_fn(model, shape, caller: str):
    """`x -> model.batched(x)[0]` with the contraction rescaling folded in, and the checked
    batch shape."""
    if not isinstance(model, FieldClassifier):
        raise TypeError(f"{caller} expects a FieldClassifier, got {type(model).__name__}.")
    shape = tuple(int(s) for s in shape)
    c = model.encoder.in_channels
    if len(shape) != 4 or shape[1] != c or min(shape) < 1:
        raise ValueError(f"shape must be (b, {c}, H, W) with positive sizes, got {shape}.")
    if not isinstance(model.cell, FractalCell):
        raise ValueError(
            f"{caller} exports single-field models; this one has a {type(model.cell).__name__}."
        )
    model = eqx.tree_at(lambda m: m.cell, model, model.cell.normalized())
    params, static = eqx.partition(model, eqx.is_array)

    def logits(x):
        return eqx.combine(params, static).batched(x)[0]

    return logits, shape


def export_onnx(
    model: FieldClassifier,
    shape: Sequence[int],
    path: str | os.PathLike | None = None,
    *,
    opset: int = 23,
):
    """ONNX model (an `onnx.ModelProto`; also written to `path` if given) computing
    `model.batched(x)[0]` (logits) for float32 batches of `shape` `(b, c, H, W)` (a fixed
    batch size): input `"images"`, output `"logits"`.

    Encoder, field solve and readout are one graph; the fixed-point solve stays a loop (an ONNX
    `Loop` with the same stopping test as in JAX). ONNX Runtime has almost no complex kernels, so
    the traced model is replayed with every complex value as a real/imaginary pair (FFTs as
    products with DFT matrices, Anderson's small complex solve as a real one) and that real
    program is converted by `jax2onnx`. Solvers: `ff.Naive`, `ff.Anderson` and `ff.Broyden`.
    Needs the `export` extra (`pip install fractal-field[export]`).
    """
    logits, shape = _logits_fn(model, shape, "export_onnx")
    if type(model.solver) not in (Naive, Anderson, Broyden):
        raise ValueError(
            f"export_onnx supports the Naive, Anderson and Broyden solvers, got "
            f"{type(model.solver).__name__}; set `model = eqx.tree_at(lambda m: m.solver, "
            "model, ff.Anderson())` first."
        )
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(
            "export_onnx needs jax2onnx, onnx and onnxruntime: `pip install fractal-field[export]`."
        ) from e
    example = jax.ShapeDtypeStruct(shape, jnp.float32)
    proto = to_onnx(
        real_pairs(logits, example),
        [example],
        model_name="fractal_field_classifier",
        opset=opset,
        input_names=["images"],
        output_names=["logits"],
    )
    _fill_constants(proto.graph)
    if path is not None:
        Path(path).write_bytes(proto.SerializeToString())
    return proto


def _fill_constants(graph, min_size: int = 1024) -> None:
    """Replace large initializers holding one repeated value (the solver's zero starts and
    history buffers, which `jax2onnx` stores in full) by `ConstantOfShape` nodes, in `graph` and
    its subgraphs (loop bodies): the file then stays the size of the weights."""
    import onnx
    from onnx import helper, numpy_helper

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _fill_constants(attr.g, min_size)
    keep, fills = [], []
    for init in graph.initializer:
        a = numpy_helper.to_array(init)
        if a.size >= min_size and np.all(a == a.flat[0]):
            shape = numpy_helper.from_array(np.asarray(a.shape, np.int64), init.name + "_shape")
            value = numpy_helper.from_array(a.reshape(-1)[:1])
            fills += [
                helper.make_node("Constant", [], [shape.name], value=shape),
                helper.make_node("ConstantOfShape", [shape.name], [init.name], value=value),
            ]
        else:
            keep.append(init)
    if fills:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = fills + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
