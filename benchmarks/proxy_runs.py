"""Collect finished training runs (workdirs of `scripts/train.py`) into one results file.

For each run: its overrides against a base config, real parameter count, and per-epoch test
accuracy, solver steps and epoch time (`ff.run_summary`). Prints a table; writes JSON.

    python benchmarks/proxy_runs.py --out benchmarks/results/cifar10_expanded_cpu.json \\
        --what "..." single=runs/exp_single c32h96=runs/exp_c32h96
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fractal_field as ff  # noqa: E402


def config_diff(config: dict, base: dict, prefix: str = "") -> list[str]:
    """`key.path=value` for every entry of `config` that differs from `base` (keys the run's
    config lacks, added since, are skipped)."""
    out = []
    for k in sorted(set(config) | set(base)):
        if k not in config:  # a key added to the config after the run
            continue
        a, b = config.get(k), base.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={a}")
    return out


def summarize(named_workdirs: dict[str, str], base_spec: str) -> list[dict]:
    base = ff.load_config(base_spec).to_dict()
    runs = []
    for name, workdir in named_workdirs.items():
        s = ff.run_summary(workdir)
        overrides = config_diff(s.pop("config"), base)
        runs.append(dict(name=name, overrides=overrides, **s))
    return runs


def step_window(workdir: str, lo: int, hi: int) -> dict:
    """Training-step metrics of `workdir` over steps `lo <= step < hi`."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if lo <= r["step"] < hi]
    if not rows:
        raise ValueError(f"{workdir}: no training steps in [{lo}, {hi}).")
    out = dict(steps=[lo, hi], n=len(rows))
    for k in ("loss", "acc", "fwd_steps", "bwd_steps", "jac"):
        if all(k in r for r in rows):
            out[f"mean_{k}"] = round(statistics.mean(r[k] for r in rows), 4)
    for k in ("fwd_failed", "bwd_failed"):
        out[k] = round(sum(r[k] for r in rows), 2)
    # The first step of a process includes compilation.
    out["median_step_time_s"] = round(statistics.median(r["step_time"] for r in rows[1:]), 3)
    return out


def print_table(runs: list[dict]) -> None:
    width = max(len(r["name"]) for r in runs)
    num_epochs = max(len(r["epochs"]) for r in runs)
    print(
        f"{'run':<{width}} {'params':>8} " + " ".join(f"{f'ep{i}':>7}" for i in range(num_epochs))
    )
    for r in runs:
        accs = " ".join(f"{100 * e['accuracy']:6.2f}%" for e in r["epochs"])
        print(f"{r['name']:<{width}} {r['params']:>8,} {accs}   {' '.join(r['overrides'])}")
        if "window" in r:
            print(f"{'':<{width}} steps {r['window']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    p.add_argument("--base", default="configs/cifar10_small.py", help="config overrides are from")
    p.add_argument("--out", required=True)
    p.add_argument("--what", default="", help="what the runs compare (recorded in the file)")
    p.add_argument("--note", default="")
    p.add_argument("--steps", default=None, help="LO:HI, a window of training steps to summarise")
    args = p.parse_args(argv)
    named = dict(spec.split("=", 1) for spec in args.runs)
    runs = summarize(named, args.base)
    if args.steps:
        lo, hi = (int(v) for v in args.steps.split(":"))
        for r in runs:
            r["window"] = step_window(r["workdir"], lo, hi)
    result = dict(what=args.what, base=args.base, note=args.note, runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(runs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
