"""MNIST Nano: variants of the field classifier against the complex default, a short proxy
for catching bugs, not a comparison. The variants: the real-valued twin
(`configs/mnist_nano.py:real`) and HRNet's classification head (`configs/mnist_nano.py:pyramid`,
pooled to 4x4, and with MDEQ's global pooling).

Trains each, seed 0, one epoch on a seeded random 10,000-image train subset (78 steps of 128),
one after the other with `scripts/train.py` under `nice -n 10`, and collects the real parameter
counts, the test accuracy on all 10,000 test images, the mean solver steps (training and test)
and the median training step time. A run this short cannot rank them.

    python benchmarks/variant_proxy.py --data-dir ../shared/data [--only NAME ...] [--collect-only]

Writes `benchmarks/results/variant_proxy.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import fractal_field as ff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_runs import ROOT, run_meta, train_runs, write_runs  # noqa: E402

OVERRIDES = ("seed=0", "data.train_size=10000", "epochs=1")
# (name, config, workdir, *overrides)
RUNS = (
    ("complex", "configs/mnist_nano.py", "runs/nano_proxy_complex"),
    ("real", "configs/mnist_nano.py:real", "runs/nano_proxy_real"),
    ("pyramid", "configs/mnist_nano.py:pyramid", "runs/nano_proxy_pyramid"),
    # MDEQ's global pooling, with 64 final maps to use the parameters the 4x4 pooling takes.
    (
        "pyramid_global",
        "configs/mnist_nano.py:pyramid",
        "runs/nano_proxy_pyramid_global",
        "model.readout_final=64",
        "model.readout_grid=1",
    ),
)


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
    parser.add_argument(
        "--only", nargs="+", choices=[r[0] for r in RUNS], help="train only these (default: all)"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    opts = parser.parse_args(argv)
    runs = train_runs(
        [(name, spec, workdir, *OVERRIDES, *extra) for name, spec, workdir, *extra in RUNS],
        _summary,
        data_dir=opts.data_dir,
        train=lambda name: not opts.collect_only and (opts.only is None or name in opts.only),
    )
    meta = run_meta(
        "benchmarks/variant_proxy.py",
        argv,
        run_commands="each run's `command`, under `nice -n 10`",
        purpose="a proxy for catching bugs: one short epoch cannot rank the variants",
    )
    write_runs(opts.out, "variant_proxy.json", meta, runs)


if __name__ == "__main__":
    main()
