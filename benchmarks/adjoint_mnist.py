"""MNIST Nano with the reversible adjoint, the implicit adjoint and equilibrium propagation,
under the same short CPU budget.

Trains `configs/mnist_nano.py:short_reversible` (and again with `solver.beta=0.8`, and with
`model.rtol=0.01 model.max_steps=15`),
`:short_implicit` and `:short_ep` (and its symmetric field with the implicit adjoint; one epoch,
46 steps of 64 images from a seeded random 3,000-image train subset; test on a seeded
random 1,000-image test subset) one after the other with `scripts/train.py`, each under
`nice -n 10` and a 20-minute limit, then collects the test accuracy, the mean forward solver
steps at test time and the training logs' means (forward steps, backward steps: reversible
steps run backwards, or nudged-solve steps for equilibrium propagation; the backward
"residual": the reversible reconstruction error, or the nudged solves' largest relative
residual; training step time).

    python benchmarks/adjoint_mnist.py --data-dir ../shared/data [--collect-only]

Writes `benchmarks/results/adjoint_mnist.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_runs import ROOT, run_meta, train_runs, write_runs  # noqa: E402

# (config variant, workdir, overrides)
RUNS = (
    ("short_reversible", "runs/nano_short_reversible", ()),
    ("short_implicit", "runs/nano_short_implicit", ()),
    ("short_ep", "runs/nano_short_ep", ()),
    ("short_reversible", "runs/nano_short_reversible_b08", ("solver.beta=0.8",)),
    # Short, loosely converged solves, where the reconstruction stays accurate in float32.
    (
        "short_reversible",
        "runs/nano_short_reversible_loose",
        ("model.rtol=0.01", "model.max_steps=15"),
    ),
    # The symmetric field of short_ep, trained with the implicit adjoint instead.
    (
        "short_ep",
        "runs/nano_short_ep_implicit",
        ("adjoint.name=implicit", "adjoint.beta=None", "adjoint.rtol=None", "adjoint.throw=None"),
    ),
)


def _summary(variant: str, workdir: str) -> dict:
    path = os.path.join(ROOT, workdir)
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl")) if line.strip()]
    evals = [json.loads(line) for line in open(os.path.join(path, "eval.jsonl")) if line.strip()]
    config = json.load(open(os.path.join(path, "config.json")))

    def mean(key, skip=0):
        return statistics.fmean(r[key] for r in rows[skip:])

    def finite(x):
        return x if math.isfinite(x) else str(x)

    out = dict(
        variant=variant,
        workdir=workdir,
        model=config["model"],
        solver=config["solver"],
        adjoint=config["adjoint"],
        train_steps=len(rows),
        train_fwd_steps=mean("fwd_steps"),
        train_bwd_steps=mean("bwd_steps"),
        train_bwd_residual_median=finite(statistics.median(r["bwd_residual"] for r in rows)),
        train_bwd_residual_max=finite(max(r["bwd_residual"] for r in rows)),
        train_grad_norm_median=finite(statistics.median(r["grad_norm"] for r in rows)),
        # The first step includes compilation.
        median_step_time_s=statistics.median(r["step_time"] for r in rows[1:]),
        last10_train_acc=mean("acc", skip=len(rows) - 10),
    )
    log = path + ".log"
    errors = (
        [ln for ln in open(log).read().splitlines() if "Error" in ln] if os.path.exists(log) else []
    )
    if errors:
        out["error"] = errors[-1]
    if evals:
        e = evals[-1]
        out.update(
            test_accuracy=e["accuracy"],
            test_n=e["n"],
            test_mean_steps=e["mean_steps"],
            test_failed=e["failed"],
            epoch_time_s=e["epoch_time"],
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--collect-only", action="store_true", help="read existing workdirs")
    parser.add_argument("--limit-s", type=int, default=1200)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    opts = parser.parse_args()
    runs = train_runs(
        [(v, f"configs/mnist_nano.py:{v}", workdir, *over) for v, workdir, over in RUNS],
        _summary,
        data_dir=opts.data_dir,
        prefix=("timeout", "-s", "TERM", str(opts.limit_s), "nice", "-n", "10"),
        train=lambda name: not opts.collect_only,
        check=False,
    )
    meta = run_meta(
        "benchmarks/adjoint_mnist.py",
        None,
        run_commands="each run's `command`, under `timeout -s TERM 1200 nice -n 10`",
    )
    write_runs(opts.out, "adjoint_mnist.json", meta, runs)


if __name__ == "__main__":
    main()
