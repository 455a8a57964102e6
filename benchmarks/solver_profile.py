"""Where a solver's time goes on the trained models: per-step cost, fixed cost, and a profile.

For each model (the shipped MNIST Nano and CIFAR-10 classifiers), batch layout and solver, the
solve runs for exactly `S` steps (`rtol=0`, `max_steps=S`) at two step counts; the wall-time
medians (round-robin over all variants, compile excluded) give, by a straight line,

- `step_ms`: the time of one solver step (one map evaluation plus the solver's bookkeeping);
- `fixed_ms`: everything else in a call (encoder, the contraction's operator norm, setup, readout).

A solver that needs `r` times Naive's evaluations then costs about
`(fixed + r * S * step) / (fixed_naive + S * step_naive)` of Naive's time at `S` Naive steps.

Then one JAX profiler trace per variant (at the larger step count) splits the per-step time by
XLA operation: `dot` (matrix-vector products: Anderson's history products; the map's own
products, where it has any, show up in Naive too), `map` (convolutions and FFTs: XNNPACK
`ynn` fusions, `fft`, `convolution`), `elementwise` (the other fusions and copies).

Run `python benchmarks/solver_profile.py --data-dir ../shared/data`; writes
`benchmarks/results/solver_profile.json`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
from solvers_trained import compile_run, time_variants

import fractal_field as ff
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset


def variants(layout: str) -> dict:
    out = {"naive": ff.Naive(), "anderson5": ff.Anderson(history=5)}
    if layout == "per_sample":  # a planar state is real: its weights are real anyway
        out["anderson5_real"] = ff.Anderson(history=5, coefficients="real")
    return out


def category(name: str) -> str:
    if name.startswith("dot"):
        return "dot"
    if name.startswith(("ynn", "fft", "convolution", "conv")):
        return "map"
    return "elementwise"


def profile(fn, steps: int, repeats: int = 3) -> dict[str, float]:
    """Per-step milliseconds by category: ops that run a multiple of `steps` times per call."""
    jax.block_until_ready(fn())
    tmp = tempfile.mkdtemp()
    try:
        jax.profiler.start_trace(tmp)
        for _ in range(repeats):
            jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    out = collections.Counter()
    for name, us in total.items():
        per_call = count[name] // repeats
        skip = "::" in name or name.startswith(("$", "end:"))
        if per_call >= steps and not skip:
            out[category(name)] += us / 1e3 / repeats / steps
    return {k: out[k] for k in ("map", "dot", "elementwise")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", default="5,45", help="the two fixed step counts")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--models", default="mnist,cifar10")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "solver_profile.json"))
    args = p.parse_args()
    s1, s2 = (int(s) for s in args.steps.split(","))
    checkpoints = {
        "mnist": "checkpoints/mnist_nano.eqx",
        "cifar10": "checkpoints/cifar10_small.eqx",
    }
    results = dict(**provenance("benchmarks/solver_profile.py"), batch=args.batch, rows=[])
    for name in args.models.split(","):
        path = checkpoints[name]
        model = ff.load_model(path)
        meta = json.load(open(path + ".json"))
        ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
        ds = ds.subset(args.batch, seed=0)
        x = jnp.asarray(ds.normalize(ds.images))
        runs, keys = [], []
        for layout in ("per_sample", "planar"):
            for sname, solver in variants(layout).items():
                for s in (s1, s2):
                    runs.append(((name, layout, sname, s), None))
                    keys.append(compile_run(model, x, layout, solver, 0.0, "batched", s))
        timed = time_variants(list(zip([r[0] for r in runs], keys, strict=True)), args.repeats)
        ms = {r[0]: t[0] for r, t in zip(runs, timed, strict=True)}
        cpu = {r[0]: t[1] for r, t in zip(runs, timed, strict=True)}
        for i, (key, _) in enumerate(runs):
            if key[3] != s2:
                continue
            _, layout, sname, _ = key
            t1, t2 = ms[(name, layout, sname, s1)], ms[key]
            c1, c2 = cpu[(name, layout, sname, s1)], cpu[key]
            step = (t2 - t1) / (s2 - s1)
            cpu_step = (c2 - c1) / (s2 - s1)
            row = dict(
                model=name,
                layout=layout,
                solver=sname,
                step_ms=step,
                fixed_ms=t1 - s1 * step,
                cpu_step_ms=cpu_step,
                cpu_fixed_ms=c1 - s1 * cpu_step,
                ms_at=dict([(s1, t1), (s2, t2)]),
                cpu_ms_at=dict([(s1, c1), (s2, c2)]),
                profile_step_ms=profile(keys[i], s2),
            )
            results["rows"].append(row)
            prof = " ".join(f"{k}={v:.2f}" for k, v in row["profile_step_ms"].items())
            print(
                f"{name:8s} {layout:10s} {sname:15s} step {step:6.2f} ms (cpu {cpu_step:6.2f})"
                f"  fixed {row['fixed_ms']:6.1f} ms (cpu {row['cpu_fixed_ms']:6.1f})"
                f"  profile/step: {prof}",
                flush=True,
            )
    naive = {(r["model"], r["layout"]): r for r in results["rows"] if r["solver"] == "naive"}
    for r in results["rows"]:
        base = naive[(r["model"], r["layout"])]
        r["step_ratio"] = r["step_ms"] / base["step_ms"]
        r["cpu_step_ratio"] = r["cpu_step_ms"] / base["cpu_step_ms"]
    results["machine_load"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
