"""Export a checkpoint's classifier to serialized StableHLO (`jax.export`) and check it.

The exported module (encoder, fixed-point solve kept as a `while` loop, readout) is run on
test images through `jax.export.deserialize(...).call` and compared with the JAX model:
identical predictions and the largest logit difference are printed (and written as JSON).

    python scripts/export.py --checkpoint checkpoints/mnist_nano.eqx \
        --data-dir ../shared/data/mnist --out mnist_nano.jaxexport --limit 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import fractal_field as ff
from fractal_field.data import load_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="file for the serialized module")
    p.add_argument("--batch-size", type=int, default=100, help="the module's batch size")
    p.add_argument("--limit", type=int, default=1000, help="test images to compare (0: all)")
    p.add_argument("--json", default=None, help="also write the comparison here")
    args = p.parse_args(argv)

    model, meta = ff.load_model(args.checkpoint, with_meta=True)
    ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
    n = args.limit or len(ds.labels)
    n -= n % args.batch_size
    if n == 0:
        raise ValueError(f"--limit must be at least --batch-size={args.batch_size}.")
    image = np.asarray(ds.normalize(ds.images[:1]))[0]
    exported = ff.export_classifier(model, (args.batch_size, *image.shape))
    data = exported.serialize()
    Path(args.out).write_bytes(data)
    loaded = jax.export.deserialize(bytearray(Path(args.out).read_bytes()))
    jax_logits = eqx.filter_jit(lambda m, x: m.batched(x)[0])
    same, diff, correct = 0, 0.0, 0
    for i in range(0, n, args.batch_size):
        x = np.asarray(ds.normalize(ds.images[i : i + args.batch_size]))
        a = np.asarray(loaded.call(x))
        b = np.asarray(jax_logits(model, x))
        same += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        correct += int(np.sum(a.argmax(-1) == ds.labels[i : i + args.batch_size]))
        diff = max(diff, float(np.max(np.abs(a - b))))
    mlir = exported.mlir_module()
    res = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join(["scripts/export.py", *(argv or sys.argv[1:])]),
        hardware="2-core CPU",
        jax=jax.__version__,
        checkpoint=args.checkpoint,
        bytes=len(data),
        platforms=list(exported.platforms),
        while_loop="stablehlo.while" in mlir,
        n=n,
        same_predictions=same,
        accuracy_exported=correct / n,
        max_abs_logit_difference=diff,
    )
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
