"""Export a checkpoint's classifier to StableHLO (`jax.export`) or ONNX and check it.

The exported model (encoder, fixed-point solve kept as a loop, readout) is run on test images
(StableHLO through `jax.export.deserialize(...).call`, ONNX through `onnxruntime`) and
compared with the JAX model: identical predictions, the largest logit difference and, for
ONNX, the time per batch of both runtimes are printed (and written as JSON).

    python scripts/export.py --checkpoint checkpoints/mnist_nano.eqx \\
        --data-dir ../shared/data/mnist --out mnist_nano.jaxexport --limit 1000
    python scripts/export.py --format onnx --data-dir ../shared/data/mnist \\
        --out mnist_nano.onnx --limit 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import fractal_field as ff
from fractal_field.data import load_dataset


def _stablehlo(model, shape, args):
    exported = ff.export_classifier(model, shape)
    data = exported.serialize()
    Path(args.out).write_bytes(data)
    loaded = jax.export.deserialize(bytearray(Path(args.out).read_bytes()))
    info = dict(
        platforms=list(exported.platforms),
        while_loop="stablehlo.while" in exported.mlir_module(),
    )
    return (lambda x: np.asarray(loaded.call(x))), info


def _onnx(model, shape, args):
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    proto = ff.export_onnx(model, shape, args.out)
    export_s = time.perf_counter() - t0
    onnx.checker.check_model(args.out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(args.out, options, providers=["CPUExecutionProvider"])
    info = dict(
        jax2onnx=_version("jax2onnx"),
        onnx=onnx.__version__,
        onnxruntime=ort.__version__,
        opset=max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        loop_nodes=sum(n.op_type == "Loop" for n in proto.graph.node),
        export_seconds=round(export_s, 1),
        onnxruntime_threads=args.threads,
    )
    return (lambda x: session.run(["logits"], {"images": x})[0]), info


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--format", choices=("stablehlo", "onnx"), default="stablehlo")
    p.add_argument("--out", required=True, help="file for the exported model")
    p.add_argument("--batch-size", type=int, default=100, help="the exported batch size")
    p.add_argument("--limit", type=int, default=1000, help="test images to compare (0: all)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime's intra-op threads")
    p.add_argument("--json", default=None, help="also write the comparison here")
    args = p.parse_args(argv)

    model, meta = ff.load_model(args.checkpoint, with_meta=True)
    ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
    n = args.limit or len(ds.labels)
    n -= n % args.batch_size
    if n == 0:
        raise ValueError(f"--limit must be at least --batch-size={args.batch_size}.")
    image = np.asarray(ds.normalize(ds.images[:1]))[0]
    shape = (args.batch_size, *image.shape)
    run, info = (_onnx if args.format == "onnx" else _stablehlo)(model, shape, args)
    jax_logits = eqx.filter_jit(lambda m, x: m.batched(x)[0])
    same, diff, correct = 0, 0.0, 0
    t_exported, t_jax = [], []
    for i in range(0, n, args.batch_size):
        x = np.asarray(ds.normalize(ds.images[i : i + args.batch_size]), np.float32)
        t0 = time.perf_counter()
        a = np.asarray(run(x))
        t1 = time.perf_counter()
        b = np.asarray(jax_logits(model, x).block_until_ready())
        t2 = time.perf_counter()
        t_exported.append(t1 - t0)
        t_jax.append(t2 - t1)
        same += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        correct += int(np.sum(a.argmax(-1) == ds.labels[i : i + args.batch_size]))
        diff = max(diff, float(np.max(np.abs(a - b))))
    res = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join(["scripts/export.py", *(argv or sys.argv[1:])]),
        hardware="2-core CPU",
        jax=jax.__version__,
        checkpoint=args.checkpoint,
        format=args.format,
        bytes=os.path.getsize(args.out),
        **info,
        batch_size=args.batch_size,
        n=n,
        same_predictions=same,
        accuracy_exported=correct / n,
        max_abs_logit_difference=diff,
    )
    if len(t_exported) > 1:  # the first batch includes compilation / session warm-up
        res["median_seconds_per_batch"] = dict(
            exported=round(float(np.median(t_exported[1:])), 4),
            jax=round(float(np.median(t_jax[1:])), 4),
        )
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
