"""The training loop's overhead: `ff.train`'s time per step against the training step alone.

- **isolated**: the jitted training step `ff.train` uses (the same compiled program), called
  on the same batches with the same keys in the same order, all put on the device beforehand,
  waiting for each step's outputs (`block_until_ready`): what the computation itself takes.
- **loop**: `ff.train` for one epoch of `--train-size` training images; the time between
  consecutive calls of the training step (recorded by wrapping it). The first step (which
  compiles) and the evaluation are left out.

overhead = loop time / isolated time - 1, over the same steps (the second to the last but
one), for each `data.prefetch` in `--prefetch` (`0`: the batches are drawn, normalised and
put on the device in the loop; `2`: in a background thread, two ahead). Every run trains the
same steps from the same initial model, so all end with the same parameters (checked and
recorded as `same_parameters`). Each repeat runs the isolated steps, then each loop mode, in
an order rotated between repeats; the table gives medians over repeats. Wall time
(`time.perf_counter`) and the process's CPU time (`time.process_time`, all threads) are both
recorded: on a shared machine wall time also counts waiting for other processes.

    python benchmarks/loop_overhead.py --data-dir ../shared/data   # MNIST Nano
    python benchmarks/loop_overhead.py --smoke --out /tmp/loop_overhead.json   # synthetic, seconds

The first writes `benchmarks/results/loop_overhead.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import fractal_field as ff  # noqa: E402
import fractal_field._train as _train  # noqa: E402


class _SharedStep:
    """`_train.make_train_step` patched: every run gets the step compiled by the first (all
    runs share the optimiser settings), and each call's wall and CPU time is recorded."""

    def __init__(self):
        self.make = _train.make_train_step
        self.step = None
        self.calls: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):
        if self.step is None:
            self.step = self.make(*args, **kwargs)

        def timed(*step_args):
            self.calls.append((time.perf_counter(), time.process_time()))
            return self.step(*step_args)

        return timed


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))]


def _loop(config, shared: _SharedStep, prefetch: int) -> tuple[list, list, list]:
    """One epoch of `ff.train`: per-step wall and CPU seconds between calls, and parameters."""
    run = config.copy_and_resolve_references()
    run.data.prefetch = prefetch
    shared.calls = []
    with tempfile.TemporaryDirectory(prefix="ff-loop-") as tmp:
        summary = ff.train(run, tmp, progress=False)
    wall = np.diff([c[0] for c in shared.calls])
    cpu = np.diff([c[1] for c in shared.calls])
    return list(wall), list(cpu), _params(summary["model"])


def _isolated(config, shared: _SharedStep) -> tuple[list, list, list, dict]:
    """The same steps as `_loop`, on batches put on the device beforehand: seconds per step,
    parameters, and the CPU milliseconds of preparing a batch and of reading metrics."""
    train_ds = _train.load_data(config, "train")
    bs = config.batch_size
    steps = train_ds.num_batches(bs)
    model_key, aug_key = jr.split(jr.PRNGKey(config.seed))
    model = _train.build_model(config, key=model_key)
    optimizer, _ = _train.build_optimizer(config, steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    mesh = _train._mesh()
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    model, opt_state = eqx.filter_shard((model, opt_state), replicated)
    # What the loop adds per step, timed alone: preparing a batch as `ff.train` does (draw,
    # normalise, put on the device, the step's key) and reading a step's metrics.
    batches, prepare, read = [], [], []
    for i, (images, labels) in enumerate(train_ds.batches(bs, seed=config.seed, epoch=0)):
        c = time.process_time()
        batch = (
            _train._host_batch_to_global(np.asarray(train_ds.normalize(images)), data),
            _train._host_batch_to_global(labels, data),
            jr.fold_in(aug_key, i),
        )
        batches.append(jax.block_until_ready(batch))
        prepare.append(time.process_time() - c)
    step = shared.step
    wall, cpu = [], []
    for x, y, key in batches:
        t, c = time.perf_counter(), time.process_time()
        model, opt_state, metrics = jax.block_until_ready(step(key, model, opt_state, x, y))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        c = time.process_time()
        _ = {k: float(v) for k, v in jax.device_get(metrics).items()}  # as `report` does
        read.append(time.process_time() - c)
    host = dict(prepare_cpu_ms=1e3 * np.median(prepare), metrics_cpu_ms=1e3 * np.median(read))
    return wall, cpu, _params(model), host


def _overhead(loop: list, isolated: list) -> dict:
    """Loop against isolated over the same steps: intervals 1..n-2 against steps 1..n-2."""
    n = len(isolated)
    lo, iso = np.asarray(loop[1 : n - 1]), np.asarray(isolated[1 : n - 1])
    return dict(
        overhead=float(lo.sum() / iso.sum() - 1),
        overhead_of_medians=float(np.median(lo) / np.median(iso) - 1),
        loop_step_s=float(lo.mean()),
        isolated_step_s=float(iso.mean()),
    )


def _median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_nano.py", help="CONFIG.py[:variant]")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-size", type=int, default=5120, help="training images: one epoch")
    p.add_argument("--test-size", type=int, default=500, help="test images (evaluation untimed)")
    p.add_argument("--prefetch", default="0,2", help="data.prefetch values to compare")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="synthetic data, 4 steps, 1 repeat")
    p.add_argument("--hardware", default=None, help='e.g. "NVIDIA H100" (default: detected)')
    p.add_argument("--out", default=str(HERE / "results" / "loop_overhead.json"))
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = p.parse_args(argv)
    spec, overrides = args.config, list(args.overrides)
    if args.smoke:
        spec = "configs/mnist_nano.py:smoke"
        args.train_size, args.test_size, args.repeats = 128, 64, 1
    modes = [int(m) for m in args.prefetch.split(",")]
    config = ff.load_config(
        str(ROOT / spec) if not os.path.isabs(spec.partition(":")[0]) else spec,
        [
            f"data.train_size={args.train_size}",
            f"data.test_size={args.test_size}",
            f"eval_batch_size={args.test_size}",
            "epochs=1",
            *overrides,
        ],
    )
    if args.data_dir is not None:
        config.data.data_dir = args.data_dir
    steps = args.train_size // config.batch_size
    if steps < 4:
        raise ValueError(f"--train-size {args.train_size} gives {steps} steps; 4 are needed.")

    shared = _SharedStep()
    _train.make_train_step = shared
    try:
        # Warm-up: compiles the step (and the loop's smaller functions), not timed.
        _loop(config, shared, modes[0])
        reference = None
        same = True
        per_repeat: dict[str, list[dict]] = {str(m): [] for m in modes}
        for r in range(args.repeats):
            iso_wall, iso_cpu, params, host = _isolated(config, shared)
            reference = params if reference is None else reference
            same &= all(np.array_equal(a, b) for a, b in zip(params, reference, strict=True))
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for m in order:
                wall, cpu, params = _loop(config, shared, m)
                same &= all(np.array_equal(a, b) for a, b in zip(params, reference, strict=True))
                row = _overhead(wall, iso_wall)
                cpu_row = _overhead(cpu, iso_cpu)
                row.update({f"cpu_{k}": v for k, v in cpu_row.items()}, **host)
                # Each compared step's wall milliseconds, for a look at the spread.
                row["loop_ms"] = [round(1e3 * t, 2) for t in wall[1 : steps - 1]]
                row["isolated_ms"] = [round(1e3 * t, 2) for t in iso_wall[1 : steps - 1]]
                per_repeat[str(m)].append(row)
                print(
                    f"repeat {r} prefetch={m}: loop {1e3 * row['loop_step_s']:.1f} ms/step, "
                    f"isolated {1e3 * row['isolated_step_s']:.1f} ms/step, overhead "
                    f"{100 * row['overhead']:+.2f}% wall, {100 * row['cpu_overhead']:+.2f}% CPU",
                    flush=True,
                )
    finally:
        _train.make_train_step = shared.make

    rows = []
    for m in modes:
        reps = per_repeat[str(m)]
        rows.append(
            dict(
                prefetch=m,
                overhead=_median(reps, "overhead"),
                cpu_overhead=_median(reps, "cpu_overhead"),
                overhead_of_medians=_median(reps, "overhead_of_medians"),
                loop_step_ms=1e3 * _median(reps, "loop_step_s"),
                isolated_step_ms=1e3 * _median(reps, "isolated_step_s"),
                loop_cpu_step_ms=1e3 * _median(reps, "cpu_loop_step_s"),
                isolated_cpu_step_ms=1e3 * _median(reps, "cpu_isolated_step_s"),
                prepare_cpu_ms=_median(reps, "prepare_cpu_ms"),
                metrics_cpu_ms=_median(reps, "metrics_cpu_ms"),
                repeats=reps,
            )
        )
    backend = jax.default_backend()
    hardware = args.hardware or (
        f"{os.cpu_count()}-core CPU" if backend == "cpu" else jax.devices()[0].device_kind
    )
    results = dict(
        date=datetime.date.today().isoformat(),
        command="python benchmarks/loop_overhead.py " + " ".join(argv or sys.argv[1:]),
        hardware=hardware,
        backend=backend,
        devices=jax.device_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        equinox=eqx.__version__,
        fractal_field=ff.__version__,
        config=spec,
        overrides=overrides,
        batch_size=config.batch_size,
        train_size=args.train_size,
        steps_per_run=steps,
        steps_compared=steps - 2,
        repeats=args.repeats,
        same_parameters=bool(same),
        load_average=list(os.getloadavg()),
        note="overhead = loop / isolated - 1 on the same steps, median over repeats; wall "
        "(time.perf_counter) and process CPU time (time.process_time, all threads); the "
        "loop's time per step is between consecutive calls of the training step",
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(
        "\n| data.prefetch | loop ms/step | isolated ms/step | overhead (wall) | overhead (CPU) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['prefetch']} | {r['loop_step_ms']:.1f} | {r['isolated_step_ms']:.1f} | "
            f"{100 * r['overhead']:+.2f}% | {100 * r['cpu_overhead']:+.2f}% |"
        )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
