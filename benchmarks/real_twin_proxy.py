"""MNIST Nano: the real-valued twin (`configs/mnist_nano.py:real`) against the complex default,
a short proxy for catching bugs, not a comparison.

Trains both, seed 0, one epoch on a seeded random 10,000-image train subset (78 steps of 128),
one after the other with `scripts/train.py` under `nice -n 10`, and collects the real parameter
counts, the test accuracy on all 10,000 test images, the mean solver steps (training and test)
and the median training step time. A run this short cannot rank the two fields.

    python benchmarks/real_twin_proxy.py --data-dir ../shared/data [--collect-only]

Writes `benchmarks/results/real_twin_proxy.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import equinox as eqx
import jax

import fractal_field as ff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ("seed=0", "data.train_size=10000", "epochs=1")
# (name, config, workdir)
RUNS = (
    ("complex", "configs/mnist_nano.py", "runs/nano_proxy_complex"),
    ("real", "configs/mnist_nano.py:real", "runs/nano_proxy_real"),
)


def _command(spec: str, workdir: str, data_dir: str) -> list[str]:
    return [
        sys.executable,
        "scripts/train.py",
        "--config",
        spec,
        "--workdir",
        workdir,
        "--data-dir",
        data_dir,
        *OVERRIDES,
    ]


def _summary(name: str, workdir: str) -> dict:
    summary = ff.run_summary(os.path.join(ROOT, workdir))
    path = os.path.join(ROOT, workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = dict(
        name=name,
        workdir=workdir,
        model=summary["config"]["model"],
        params=summary["params"],
        train_steps=len(rows),
        train_mean_fwd_steps=round(statistics.fmean(r["fwd_steps"] for r in rows), 2),
        # The first step includes compilation.
        median_step_time_s=round(statistics.median(r["step_time"] for r in rows[1:]), 3),
    )
    if summary["epochs"]:
        e = summary["epochs"][-1]
        out.update(
            test_accuracy=e["accuracy"],
            test_n=e.get("n"),
            test_mean_steps=e.get("mean_steps"),
            test_failed=e.get("failed"),
            epoch_time_s=e["epoch_time_s"],
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--collect-only", action="store_true", help="read existing workdirs")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    opts = parser.parse_args(argv)
    runs = []
    for name, spec, workdir in RUNS:
        cmd = _command(spec, workdir, opts.data_dir)
        if not opts.collect_only:
            t = time.time()
            with open(os.path.join(ROOT, workdir + ".log"), "w") as log:
                subprocess.run(
                    ["nice", "-n", "10", *cmd],
                    cwd=ROOT,
                    check=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            print(f"{name}: {time.time() - t:.0f}s", flush=True)
        row = _summary(name, workdir)
        row["command"] = " ".join(["python", *cmd[1:]])
        runs.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(
        date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/real_twin_proxy.py", *(argv or sys.argv[1:])]),
        run_commands="each run's `command`, under `nice -n 10`",
        hardware="2-core CPU (shared with other jobs)",
        purpose="a proxy for catching bugs: one short epoch cannot rank the two fields",
        jax=jax.__version__,
        equinox=eqx.__version__,
        python=sys.version.split()[0],
        fractal_field=ff.__version__,
        machine=platform.machine(),
    )
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "real_twin_proxy.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, runs=runs), fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
