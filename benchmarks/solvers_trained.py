"""Fixed-point solvers on trained models: evaluations, wall time and residual per tolerance.

Workloads: the shipped MNIST Nano classifier (`checkpoints/mnist_nano.eqx`) and the CIFAR-10
config's model (`--cifar-checkpoint`, by default the 40-epoch run's best checkpoint so far),
each on `--batch` test images drawn at random (seed 0), from the encoder's injection
(`z0 = 0`), `atol=0`, in both batch layouts:

- `per_sample`: `vmap` of the model; each image stops on its own residual;
- `planar`: the batch as one fixed-point problem (`ff.to_planar`), one stopping test.

`loop=while_loop` re-runs the per-sample solves with JAX's own batching of `lax.while_loop`
(which copies and selects the whole solver state, Anderson's history included, after every
step) in place of the library's batched loop, as the baseline of that change.

Wall and process CPU time: medians of `--repeats` rounds in which every variant runs once
(compiled beforehand, so compile time is excluded; round-robin, so load changes hit all alike).
`evals`: mean fine-grid-equivalent map evaluations per image (`stats.num_fn_evals`).

Run `python benchmarks/solvers_trained.py --data-dir ../shared/data`; writes
`benchmarks/results/solvers_trained.json`.
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
import fractal_field._fixed_point as fixed_point_module
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset


def _plain_while(body, operands, carry, **_):
    """JAX's own batching of the loop: the baseline."""
    return jax.lax.while_loop(lambda c: ~c["done"], lambda c: body(operands, c), carry)


def _levels(grid: int) -> int:
    """The most multigrid levels (at most 3) that the torus grid divides into."""
    levels = 1
    while levels < 3 and grid % 2**levels == 0:
        levels += 1
    return levels


def solvers(layout: str, grid: int) -> dict:
    out = {
        "naive": ff.Naive(),
        "anderson5": ff.Anderson(history=5),
        "anderson3": ff.Anderson(history=3),
        # Periodic Anderson: mix every 2nd / 3rd evaluation, plain steps between.
        "anderson3_p2": ff.Anderson(history=3, period=2),
        "anderson5_p3": ff.Anderson(history=5, period=3),
        "broyden": ff.Broyden(memory=10),
    }
    if layout == "per_sample":  # the planar layout needs a solver that stays on one grid
        out["multigrid"] = ff.Multigrid(levels=_levels(grid))
    return out


def compile_run(model, x, layout, solver, rtol, loop, max_steps=500):
    """A compiled `run(model, x) -> (logits, stats, result codes)` for one variant."""
    kw = dict(solver=solver, rtol=rtol, atol=0.0, max_steps=max_steps, throw=False)

    def run(model, x):
        if layout == "per_sample":
            logits, sol = jax.vmap(lambda xi: model(xi, **kw))(x)
        else:
            sol = model.solve_planar(x, **kw)
            logits = jax.vmap(model.readout)(sol.value)
        return logits, sol.stats, sol.result._value

    original = fixed_point_module.while_done
    if loop == "while_loop":
        fixed_point_module.while_done = _plain_while
    try:
        dyn, static = eqx.partition(model, eqx.is_array)
        compiled = jax.jit(lambda d, x: run(eqx.combine(d, static), x)).lower(dyn, x).compile()
    finally:
        fixed_point_module.while_done = original
    return lambda: compiled(dyn, x)


def time_variants(variants, repeats):
    """Round-robin timing: `(wall, cpu)` medians per variant, in ms."""
    walls = [[] for _ in variants]
    cpus = [[] for _ in variants]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(variants):
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            walls[i].append(time.perf_counter() - t)
            cpus[i].append(time.process_time() - c)
    return [
        (1e3 * float(np.median(w)), 1e3 * float(np.median(c)))
        for w, c in zip(walls, cpus, strict=True)
    ]


def bench_model(name, model, x, rtols, repeats, layouts, log) -> list[dict]:
    """Compile every variant, then time them round-robin (`repeats` rounds), so that a
    change in the machine's load hits all variants alike."""
    grid = model.encoder(x[0]).shape[-1]
    variants = []
    for layout in layouts:
        loops = ["batched", "while_loop"] if layout == "per_sample" else ["batched"]
        for loop in loops:
            for sname, solver in solvers(layout, grid).items():
                if loop == "while_loop" and sname not in ("naive", "anderson5"):
                    continue
                for rtol in rtols:
                    row = dict(model=name, layout=layout, loop=loop, solver=sname, rtol=rtol)
                    if sname == "multigrid":
                        row["levels"] = solver.levels
                    fn = compile_run(model, x, layout, solver, rtol, loop)
                    variants.append((row, fn))
    rows = []
    for (row, fn), (ms, cpu_ms) in zip(variants, time_variants(variants, repeats), strict=True):
        logits, stats, result = fn()
        row.update(
            ms=ms,
            cpu_ms=cpu_ms,
            steps=float(jnp.mean(stats.num_steps)),
            max_steps=int(jnp.max(stats.num_steps)),
            evals=float(jnp.mean(stats.num_fn_evals)),
            relative_residual=float(jnp.max(stats.relative_residual)),
            converged=float(jnp.mean(result == ff.RESULTS.successful._value)),
            predictions=np.asarray(jnp.argmax(logits, -1)).tolist(),
        )
        rows.append(row)
        log(
            f"{name:8s} {row['layout']:10s} {row['loop']:10s} {row['solver']:9s} "
            f"rtol={row['rtol']:g} steps={row['steps']:.1f} evals={row['evals']:.1f} "
            f"res={row['relative_residual']:.1e} {row['ms']:.0f} ms (cpu {row['cpu_ms']:.0f} ms)"
        )
    return rows


def summary(rows) -> list[dict]:
    """Anderson (history 5) and Multigrid against Naive, same model, layout, loop and rtol."""
    out = []
    key = lambda r: (r["model"], r["layout"], r["loop"], r["rtol"])  # noqa: E731
    naive = {key(r): r for r in rows if r["solver"] == "naive"}
    for r in rows:
        base = naive.get(key(r))
        if r["solver"] == "naive" or base is None:
            continue
        out.append(
            dict(
                model=r["model"],
                layout=r["layout"],
                loop=r["loop"],
                solver=r["solver"],
                rtol=r["rtol"],
                evals_ratio=r["evals"] / base["evals"],
                time_ratio=r["ms"] / base["ms"],
                cpu_time_ratio=r["cpu_ms"] / base["cpu_ms"],
            )
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rtols", default="1e-3,1e-5")
    p.add_argument("--mnist-checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument(
        "--cifar-checkpoint",
        default="resume/cifar10_small/checkpoints/best.eqx",
        help="'' to skip CIFAR-10",
    )
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "solvers_trained.json"))
    args = p.parse_args()
    rtols = [float(r) for r in args.rtols.split(",")]
    results = dict(**provenance("benchmarks/solvers_trained.py"), batch=args.batch, rows=[])

    def log(msg):
        print(msg, flush=True)

    workloads = [("mnist", args.mnist_checkpoint)]
    if args.cifar_checkpoint:
        workloads.append(("cifar10", args.cifar_checkpoint))
    for name, path in workloads:
        model = ff.load_model(path)
        meta = json.load(open(path + ".json"))
        ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
        # A seeded random sample: the CIFAR-10 image folders are sorted by class.
        ds = ds.subset(args.batch, seed=0)
        x = jnp.asarray(ds.normalize(ds.images))
        results[f"{name}_checkpoint"] = os.path.basename(path)
        results[f"{name}_checkpoint_epoch"] = meta.get("epoch")
        results["rows"] += bench_model(
            name, model, x, rtols, args.repeats, ("per_sample", "planar"), log
        )
        results["summary"] = summary(results["rows"])
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for s in results["summary"]:
        log(
            f"{s['model']:8s} {s['layout']:10s} {s['loop']:10s} {s['solver']:9s} "
            f"rtol={s['rtol']:g} evals x{s['evals_ratio']:.2f} time x{s['time_ratio']:.2f} "
            f"cpu x{s['cpu_time_ratio']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
