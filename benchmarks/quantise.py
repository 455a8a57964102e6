"""Size, test accuracy and solver steps of a checkpoint at float32, int8 and int4.

Each variant is `ff.quantise(model, bits, complex_format=...)` followed by `ff.dequantise`,
evaluated on the test set with the checkpoint's solver settings. Also records the operator
norm of the quantised field convolution (before and after rescaling into its bound) and the
fraction of test images whose prediction equals float32's. Writes JSON after every variant.

    python benchmarks/quantise.py --checkpoint checkpoints/mnist_nano.eqx \
        --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from batch_solve import write_results  # noqa: E402

import fractal_field as ff  # noqa: E402
from fractal_field.data import load_dataset  # noqa: E402

VARIANTS = ("float32", "int8-reim", "int8-polar", "int4-reim", "int4-polar")


@eqx.filter_jit
def _predict(model, x):
    logits, sol = model.batched(x)
    return jnp.argmax(logits, -1), sol.stats.num_steps


def predictions(model, ds, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and forward solver steps of every example of `ds`."""
    preds, steps = [], []
    for images, _ in ds.batches(batch_size, seed=0, epoch=0, shuffle=False, drop_last=False):
        p, s = _predict(model, np.asarray(ds.normalize(images)))
        preds.append(np.asarray(p))
        steps.append(np.asarray(s))
    return np.concatenate(preds), np.concatenate(steps)


def _norm_before_rescale(model, bits: int, fmt: str) -> float:
    """Largest operator norm of the quantised contractive convolutions, before rescaling."""
    try:
        ff.quantise(model, bits, complex_format=fmt, on_violation="raise")
    except ValueError as e:  # the message carries the norm
        return float(str(e).split("operator norm ")[1].split(" ")[0])
    return max(r["norm"] for r in ff.contraction_report(ff.quantise(model, bits)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N test images")
    p.add_argument("--seed", type=int, default=None, help="N random test images instead")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(HERE / "results" / "quantise_mnist.json"))
    args = p.parse_args(argv)

    model, meta = ff.load_model(args.checkpoint, with_meta=True)
    ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
    if args.limit:
        ds = ds.subset(args.limit, seed=args.seed)
    labels = np.asarray(ds.labels)
    rows, ref = [], None
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"Unknown variant {name!r}: use some of {VARIANTS}.")
        t = time.perf_counter()
        if name == "float32":
            stored, run, norm_q = model, model, None
        else:
            bits, fmt = int(name[3]), name.split("-")[1]
            stored = ff.quantise(model, bits, complex_format=fmt)
            run = ff.dequantise(stored)
            norm_q = _norm_before_rescale(model, bits, fmt)
        pred, steps = predictions(run, ds, args.batch_size)
        if name == "float32":
            ref = pred
        report = ff.contraction_report(stored)[0]
        row = dict(
            variant=name,
            bytes=ff.model_nbytes(stored),
            accuracy=float(np.mean(pred == labels)),
            mean_steps=float(np.mean(steps)),
            agreement_with_float32=None if ref is None else float(np.mean(pred == ref)),
            field_norm_quantised=norm_q,
            field_norm_stored=report["norm"],
            gamma=report["gamma"],
            cell_lipschitz=float(
                ff.dequantise(stored).cell.lipschitz_bound(*run.cell.conv.norm_grid)
            ),
            seconds=time.perf_counter() - t,
        )
        rows.append(row)
        print({k: v for k, v in row.items()}, flush=True)
        write_results(
            args.out,
            date=datetime.date.today().isoformat(),
            command="python " + " ".join(["benchmarks/quantise.py", *(argv or sys.argv[1:])]),
            hardware="2-core CPU",
            checkpoint=args.checkpoint,
            n=len(labels),
            rows=rows,
        )


if __name__ == "__main__":
    main()
