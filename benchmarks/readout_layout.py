"""The planar batch solve's readout: on the planar fields (`ff.Readout.planar`) against `vmap`
of the per-image readout on the fields moved to `(b, c, h, w)` (`ff.from_planar`, the way
before).

For the shipped CIFAR-10 model (planar batch solve, phase features, 4x4 readout) on a batch of
CIFAR-10 test images (random images without `--data-dir`): the loss and its gradient with
respect to every parameter, as in a training step (encoder, planar solve, implicit backward
solve, readout), each way; and the readout alone on the solved fields, forward and gradient.
Wall time and the process's CPU time (all threads), medians of `--repeats` round-robin rounds,
compile excluded; the two ways' logits and gradients are checked to agree.

Run `python benchmarks/readout_layout.py --data-dir ../shared/data`; writes
`benchmarks/results/readout_layout.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import fractal_field as ff
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset


def readouts() -> dict:
    """`(readout, planar fields) -> logits`, each way."""
    return {
        "planar": lambda r, p: r.planar(p),
        "from_planar_vmap": lambda r, p: jax.vmap(r)(ff.from_planar(p)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/cifar10_small.eqx")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "readout_layout.json"))
    args = ap.parse_args()
    model = ff.load_model(args.checkpoint)
    if model.batch_solve != "planar":
        raise ValueError(f"{args.checkpoint} solves per sample; this compares planar readouts.")
    if args.data_dir:
        ds = load_dataset("cifar10", "test", data_dir=args.data_dir)
        x, y = ds.normalize(ds.images[: args.batch]), ds.labels[: args.batch]
        inputs = "CIFAR-10 test images"
    else:
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (args.batch, 3, 32, 32)))
        y = np.arange(args.batch) % 10
        inputs = "random images"
    x, y = jnp.asarray(x), jnp.asarray(y)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    fields = eqx.filter_jit(lambda m, x: m.solve_planar(x, planar_value=True).value)(model, x)

    def step_fn(read):
        def loss(p):
            m = eqx.combine(p, static)
            sol = m.solve_planar(x, planar_value=True)
            logits = read(m.readout, sol.value)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

        return jax.jit(jax.value_and_grad(loss))

    def readout_fns(read):
        loss = lambda r, p: jnp.sum(jnp.sin(read(r, p)))  # noqa: E731
        grad = eqx.filter_jit(eqx.filter_grad(loss))
        return eqx.filter_jit(read), grad

    ways = readouts()
    fns = {}
    for way, read in ways.items():
        fwd, grad = readout_fns(read)
        fns[(way, "training_gradient")] = (step_fn(read), (params,))
        fns[(way, "readout_forward")] = (fwd, (model.readout, fields))
        fns[(way, "readout_gradient")] = (grad, (model.readout, fields))
    outs = {key: jax.block_until_ready(f(*a)) for key, (f, a) in fns.items()}
    (_, g_a), (_, g_b) = (
        outs[("planar", "training_gradient")],
        outs[("from_planar_vmap", "training_gradient")],
    )
    grad_diff = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(*map(jax.tree_util.tree_leaves, (g_a, g_b)), strict=True)
    )
    logit_diff = float(
        jnp.max(
            jnp.abs(
                outs[("planar", "readout_forward")] - outs[("from_planar_vmap", "readout_forward")]
            )
        )
    )
    wall = {key: [] for key in fns}
    cpu = {key: [] for key in fns}
    for _ in range(args.repeats):
        for key, (f, a) in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*a))
            wall[key].append(1e3 * (time.perf_counter() - t))
            cpu[key].append(1e3 * (time.process_time() - c))
    rows = []
    for way, kind in fns:
        rows.append(
            dict(
                way=way,
                what=kind,
                wall_ms=float(np.median(wall[(way, kind)])),
                cpu_ms=float(np.median(cpu[(way, kind)])),
            )
        )
        print(
            f"{way:18s} {kind:18s} wall {rows[-1]['wall_ms']:8.1f} ms",
            f"cpu {rows[-1]['cpu_ms']:8.1f} ms",
        )
    base = {r["what"]: r for r in rows if r["way"] == "from_planar_vmap"}
    ratios = {
        r["what"]: dict(
            wall=r["wall_ms"] / base[r["what"]]["wall_ms"],
            cpu=r["cpu_ms"] / base[r["what"]]["cpu_ms"],
        )
        for r in rows
        if r["way"] == "planar"
    }
    results = dict(
        **provenance("benchmarks/readout_layout.py"),
        checkpoint=os.path.basename(args.checkpoint),
        batch=args.batch,
        inputs=inputs,
        repeats=args.repeats,
        max_logit_difference=logit_diff,
        max_relative_gradient_difference=grad_diff,
        load_average=[round(v, 2) for v in os.getloadavg()],
        planar_over_from_planar_vmap=ratios,
        rows=rows,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(ratios), f"logits {logit_diff:.1e} gradients {grad_diff:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
