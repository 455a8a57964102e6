"""`ff.Broyden` against Naive and Anderson on the trained MNIST model.

The same measurement as `solvers_trained.py` (its `bench_model`: the shipped MNIST Nano
classifier on `--batch` test images drawn at random, seed 0, from `z0 = 0`, `atol=0`, in the
`per_sample` and `planar` layouts; wall and process CPU time are medians of `--repeats`
round-robin rounds, compile time excluded), with its solver table replaced by Naive,
Anderson (history 5) and Broyden variants: `--memory` (default 10) with the default
`when_full="restart"`, the same with `inner_product="real"`, and `when_full="overwrite"` (as
in DEQ/MDEQ).

Run `python benchmarks/broyden.py --data-dir ../shared/data`; writes
`benchmarks/results/broyden_mnist.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

import fractal_field as ff
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import solvers_trained  # noqa: E402


def solvers(memory: int):
    def table(layout: str, grid: int) -> dict:
        del layout, grid
        return {
            "naive": ff.Naive(),
            "anderson5": ff.Anderson(history=5),
            f"broyden{memory}": ff.Broyden(memory=memory),
            f"broyden{memory}_real": ff.Broyden(memory=memory, inner_product="real"),
            f"broyden{memory}_overwrite": ff.Broyden(memory=memory, when_full="overwrite"),
        }

    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rtols", default="1e-3,1e-5")
    p.add_argument("--memory", type=int, default=10)
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "broyden_mnist.json"))
    args = p.parse_args()
    rtols = [float(r) for r in args.rtols.split(",")]

    model = ff.load_model(args.checkpoint)
    with open(args.checkpoint + ".json") as f:
        meta = json.load(f)
    ds = load_dataset("mnist", "test", data_dir=args.data_dir).subset(args.batch, seed=0)
    x = jnp.asarray(ds.normalize(ds.images))

    solvers_trained.solvers = solvers(args.memory)
    rows = solvers_trained.bench_model(
        "mnist", model, x, rtols, args.repeats, ("per_sample", "planar"), print
    )
    results = dict(
        **provenance("benchmarks/broyden.py"),
        batch=args.batch,
        repeats=args.repeats,
        memory=args.memory,
        mnist_checkpoint=os.path.basename(args.checkpoint),
        mnist_checkpoint_epoch=meta.get("epoch"),
        rows=rows,
        summary=solvers_trained.summary(rows),
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for s in results["summary"]:
        print(
            f"{s['layout']:10s} {s['loop']:10s} {s['solver']:18s} rtol={s['rtol']:g} "
            f"evals x{s['evals_ratio']:.2f} time x{s['time_ratio']:.2f} "
            f"cpu x{s['cpu_time_ratio']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
