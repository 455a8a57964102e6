"""MNIST Nano with a float32 and a bfloat16 (mixed-precision) field.

Three parts, each written to the results file as soon as it is done:

- `train`: `configs/mnist_nano.py:short_implicit` (implicit adjoint, batch 64) trained with
  `model.precision=float32` and with `model.precision=bfloat16` (`RUNS`), the same seed, data
  subset and budget (`--train-size`, `--epochs`), each with `scripts/train.py` under
  `nice -n 10` and `--limit-s`, the `--train-runs` side by side; collects the test accuracy
  and mean forward solver steps on the seeded test subset, the training logs' mean forward and
  backward solver steps, and the median training step time.
- `checkpoint`: the shipped `checkpoints/mnist_nano.eqx` (trained in float32) evaluated on
  `--eval-size` seeded random test images (default: all 10,000) as it is and with its field
  switched to bfloat16 (`ff.with_precision`), without retraining: accuracy, agreement with
  float32, mean forward steps and relative residual, failed solves, median seconds per batch
  (after a warm-up); and the residual floor (a batch solved with a tolerance of 1e-7).
- `ops`: one application of the Nano cell's map (operator built outside, batch 64, 14x14
  field, 28 channels) in each layout (direct, spectral, planar), forward and gradient through
  a 10-step loop, float32 against bfloat16 in alternating rounds; median ms per application.

    python benchmarks/mixed_precision.py --data-dir ../shared/data --parts train \
        --train-runs float32,bfloat16
    python benchmarks/mixed_precision.py --data-dir ../shared/data --parts train \
        --train-runs bfloat16_nothrow,bfloat16_adjoint_rtol1e-3
    python benchmarks/mixed_precision.py --data-dir ../shared/data --parts ops
    python benchmarks/mixed_precision.py --data-dir ../shared/data --parts checkpoint

Writes `benchmarks/results/mixed_precision.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from batch_solve import write_results  # noqa: E402

import fractal_field as ff  # noqa: E402
from fractal_field.data import load_dataset  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------
# Training


# (name, model.precision, further overrides). The implicit adjoint's defaults (rtol 1e-4, 100
# steps, throw=True) stop a bfloat16 run when a backward solve ends above its tolerance;
# `adjoint.throw=False` changes nothing in a run whose backward solves all converge (the float32
# one) and lets the bfloat16 run go on with the unconverged gradient, counted in `bwd_failed`.
RUNS = (
    ("float32", "float32", ()),
    ("bfloat16", "bfloat16", ()),
    ("bfloat16_nothrow", "bfloat16", ("adjoint.throw=False",)),
    ("bfloat16_adjoint_rtol1e-3", "bfloat16", ("adjoint.throw=False", "adjoint.rtol=0.001")),
)
# Runs trained side by side (the same load) whose step times compare, over the steps both ran.
# (The other two were also started together, but one of them was stopped by its time limit
# and resumed alone.)
PAIRS = (("float32", "bfloat16"),)


def _train_command(name: str, precision: str, overrides, args) -> list[str]:
    return [
        "python",
        "scripts/train.py",
        "--config",
        "configs/mnist_nano.py:short_implicit",
        "--workdir",
        f"{args.runs}/{name}",
        "--data-dir",
        args.data_dir,
        f"model.precision={precision}",
        f"data.train_size={args.train_size}",
        f"data.test_size={args.test_size}",
        f"epochs={args.epochs}",
        *overrides,
    ]


def _rows(workdir: Path, name: str) -> list[dict]:
    path = workdir / name
    return [json.loads(line) for line in open(path) if line.strip()] if path.exists() else []


def _train_summary(workdir: Path) -> dict:
    rows, evals = _rows(workdir, "metrics.jsonl"), _rows(workdir, "eval.jsonl")
    out = dict(
        train_steps=len(rows),
        train_fwd_steps=statistics.fmean(r["fwd_steps"] for r in rows),
        train_bwd_steps=statistics.fmean(r["bwd_steps"] for r in rows),
        train_fwd_failed=statistics.fmean(r["fwd_failed"] for r in rows),
        train_bwd_failed=statistics.fmean(r["bwd_failed"] for r in rows),
        # The first step includes compilation.
        median_step_time_s=statistics.median(r["step_time"] for r in rows[1:]),
        last10_train_loss=statistics.fmean(r["loss"] for r in rows[-10:]),
    )
    log = workdir.with_suffix(".log")
    errors = [ln for ln in log.read_text().splitlines() if "Error:" in ln] if log.exists() else []
    if errors:
        out["error"] = errors[-1]
    if evals:
        e = evals[-1]
        out.update(
            test_accuracy=e["accuracy"],
            test_n=e["n"],
            test_mean_steps=e["mean_steps"],
            test_mean_residual=e["mean_residual"],
            test_failed=e["failed"],
        )
    return out


def part_train(args) -> dict:
    # The selected runs side by side, so that they share the machine's load alike.
    todo = [] if args.collect_only else args.train_runs.split(",")
    procs = []
    for name, precision, overrides in RUNS:
        if name not in todo:
            continue
        workdir = ROOT / args.runs / name
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["timeout", "-s", "TERM", str(args.limit_s), "nice", "-n", "10", sys.executable]
        log = open(workdir.with_suffix(".log"), "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                cmd + _train_command(name, precision, overrides, args)[1:],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    for proc in procs:
        proc.wait()
    runs = []
    for name, precision, overrides in RUNS:
        workdir = ROOT / args.runs / name
        if not (workdir / "metrics.jsonl").exists():
            continue
        cmd = _train_command(name, precision, overrides, args)
        row = dict(name=name, precision=precision, command=" ".join(cmd))
        row.update(_train_summary(workdir))
        print(json.dumps(row), flush=True)
        runs.append(row)
    pairs = []
    for a, b in PAIRS:
        ra, rb = (_rows(ROOT / args.runs / n, "metrics.jsonl") for n in (a, b))
        n = min(len(ra), len(rb))
        if n < 2:
            continue
        ta, tb = (statistics.median(r["step_time"] for r in rows[1:n]) for rows in (ra, rb))
        pairs.append(
            {"runs": [a, b], "steps": n, f"{a}_median_step_s": ta, f"{b}_median_step_s": tb}
        )
    return dict(
        run_commands=f"each run's `command`, under `timeout -s TERM {args.limit_s} nice -n 10`; "
        "the runs of each pair in `side_by_side` trained at the same time",
        runs=runs,
        side_by_side=pairs,
    )


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint


@eqx.filter_jit
def _predict(model, x):
    logits, sol = model.batched(x)
    return jnp.argmax(logits, -1), sol.stats.num_steps, sol.stats.relative_residual, sol.result


def part_checkpoint(args) -> dict:
    model = ff.load_model(ROOT / args.checkpoint)
    ds = load_dataset("mnist", "test", data_dir=args.data_dir)
    ds = ds.subset(args.eval_size, seed=0)
    labels = np.asarray(ds.labels)
    batches = [
        np.asarray(ds.normalize(images))
        for images, _ in ds.batches(args.batch_size, seed=0, epoch=0, shuffle=False)
    ]
    models = {p: ff.with_precision(model, p) for p in PRECISIONS}
    out = {p: dict(pred=[], steps=[], residual=[], failed=0, seconds=[]) for p in PRECISIONS}
    for p in PRECISIONS:  # warm-up (compilation)
        jax.block_until_ready(_predict(models[p], batches[0]))
    for x in batches:  # alternate, so that machine noise hits both alike
        for p in PRECISIONS:
            t = time.perf_counter()
            pred, steps, res, result = jax.block_until_ready(_predict(models[p], x))
            o = out[p]
            o["seconds"].append(time.perf_counter() - t)
            o["pred"].append(np.asarray(pred))
            o["steps"].append(np.asarray(steps))
            o["residual"].append(np.asarray(res))
            o["failed"] += int(np.sum(np.asarray(result._value) != 0))
    # The residual floor: the first batch solved with a tolerance no solve meets.
    floor = {}
    for p in PRECISIONS:
        _, sol = eqx.filter_jit(
            lambda m, x: m.batched(x, rtol=1e-7, atol=0.0, max_steps=args.floor_steps)
        )(models[p], batches[0][: args.floor_batch])
        res = np.asarray(sol.stats.relative_residual)
        floor[p] = dict(
            median_relative_residual=float(np.median(res)),
            max_relative_residual=float(np.max(res)),
        )
        print(p, floor[p], flush=True)
    rows = []
    ref = np.concatenate(out["float32"]["pred"])
    for p in PRECISIONS:
        o = out[p]
        pred = np.concatenate(o["pred"])
        rows.append(
            dict(
                precision=p,
                accuracy=float(np.mean(pred == labels[: len(pred)])),
                agreement_with_float32=float(np.mean(pred == ref)),
                mean_steps=float(np.mean(np.concatenate(o["steps"]))),
                mean_relative_residual=float(np.mean(np.concatenate(o["residual"]))),
                failed=o["failed"],
                median_batch_seconds=statistics.median(o["seconds"]),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return dict(
        checkpoint=args.checkpoint,
        n=int(len(ref)),
        batch_size=args.batch_size,
        subset="seeded random test subset (ArrayDataset.subset(n, seed=0))",
        rows=rows,
        residual_floor=dict(
            what=f"the first {args.floor_batch} images solved with rtol=1e-7, atol=0, "
            f"max_steps={args.floor_steps}: the relative residual where the solves ended (at "
            "the tolerance, or at max_steps if the rounding keeps them above it)",
            **floor,
        ),
    )


# ---------------------------------------------------------------------------------------------
# The map alone


def _timed(fn, *a, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times.append(time.perf_counter() - t)
    return times


def part_ops(args) -> dict:
    b, loop = 64, 10
    cell = ff.make_model("nano", key=jr.PRNGKey(0)).cell
    z = jr.normal(jr.PRNGKey(1), (b, 28, 14, 14), jnp.complex64) * 0.3
    inj = jr.normal(jr.PRNGKey(2), (b, 28, 14, 14), jnp.complex64) * 0.3
    zp, injp = ff.to_planar(z), ff.to_planar(inj)

    def make(layout):
        if layout == "planar":

            def run(cell, z, inj):
                op = cell.planar_operator(14, 14)
                return jax.lax.fori_loop(0, loop, lambda i, z: cell.planar_step(op, z, inj), z)

            return run, zp, injp

        def run(cell, z, inj):
            op = cell.operator(14, 14)
            step = jax.vmap(lambda z, i: cell.step_with(op, z, i))
            return jax.lax.fori_loop(0, loop, lambda i, z: step(z, inj), z)

        return run, z, inj

    rows = []
    for layout in ("direct", "spectral", "planar"):
        run, z0, i0 = make(layout)
        fns = {}
        for p in PRECISIONS:
            c = ff.with_precision(_with_impl(cell, layout), p)
            fwd = eqx.filter_jit(run)
            grad = eqx.filter_jit(
                eqx.filter_grad(lambda c, z, i, run=run: jnp.sum(jnp.abs(run(c, z, i)) ** 2))
            )
            fns[p] = (c, fwd, grad)
            jax.block_until_ready(fwd(c, z0, i0))
            jax.block_until_ready(grad(c, z0, i0))
        times = {p: dict(forward=[], gradient=[]) for p in PRECISIONS}
        for _ in range(args.rounds):
            for p in PRECISIONS:
                c, fwd, grad = fns[p]
                times[p]["forward"] += _timed(fwd, c, z0, i0, repeats=args.repeats)
                times[p]["gradient"] += _timed(grad, c, z0, i0, repeats=args.repeats)
        row = dict(layout=layout, batch=b, loop_steps=loop)
        for p in PRECISIONS:
            for kind in ("forward", "gradient"):
                row[f"{p}_{kind}_ms_per_application"] = (
                    1e3 * statistics.median(times[p][kind]) / loop
                )
        for kind in ("forward", "gradient"):
            row[f"{kind}_bfloat16_over_float32"] = (
                row[f"bfloat16_{kind}_ms_per_application"]
                / row[f"float32_{kind}_ms_per_application"]
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return dict(
        what="one application of the Nano cell's map, operator built outside a 10-step loop",
        rounds=args.rounds,
        repeats=args.repeats,
        rows=rows,
    )


def _with_impl(cell, layout: str):
    """The cell with its convolution's `impl` set (`planar` keeps it: its own operator)."""
    if layout == "planar":
        return cell
    conv = cell.conv.conv
    new = ff.ToroidalConv(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.dilations,
        impl=layout,
        key=jr.PRNGKey(0),
    )
    return eqx.tree_at(
        lambda c: c.conv.conv, cell, eqx.tree_at(lambda k: k.weight, new, conv.weight)
    )


# ---------------------------------------------------------------------------------------------


def cpu_bfloat16_flags() -> list[str]:
    """The CPU's bfloat16 instruction-set flags (Linux), on which XLA:CPU's bfloat16 speed
    depends."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if "bf16" in f})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="train,checkpoint,ops")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--runs", default="runs/mixed_precision", help="training workdirs")
    p.add_argument("--train-size", type=int, default=6400)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-s", type=int, default=1800)
    p.add_argument("--collect-only", action="store_true", help="read existing training workdirs")
    p.add_argument(
        "--train-runs",
        default=",".join(name for name, _, _ in RUNS),
        help="names of the RUNS to train (side by side); the others' workdirs are read",
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--eval-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--floor-batch", type=int, default=100)
    p.add_argument("--floor-steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hardware", default="2-core CPU (shared with other jobs)")
    p.add_argument("--out", default=str(HERE / "results" / "mixed_precision.json"))
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"train", "checkpoint", "ops"}
    if unknown:
        raise ValueError(f"Unknown parts {sorted(unknown)}: use train, checkpoint, ops.")
    os.chdir(ROOT)
    command = " ".join(["python", "benchmarks/mixed_precision.py", *(argv or sys.argv[1:])])
    for part in parts:
        t = time.time()
        result = dict(
            {"train": part_train, "checkpoint": part_checkpoint, "ops": part_ops}[part](args),
            date=datetime.date.today().isoformat(),
            command=command,
            hardware=args.hardware,
            seconds=round(time.time() - t),
        )
        # The parts run separately: keep the others' results already in the file.
        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.exists() else {}
        results = {k: previous[k] for k in ("train", "checkpoint", "ops") if k in previous}
        results[part] = result
        write_results(
            out,
            numpy=np.__version__,
            python=sys.version.split()[0],
            fractal_field=ff.__version__,
            cpu_bfloat16_flags=cpu_bfloat16_flags(),
            **results,
        )


if __name__ == "__main__":
    main()
