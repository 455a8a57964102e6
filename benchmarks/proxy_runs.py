"""Collect finished training runs (workdirs of `scripts/train.py`) into one results file.

For each run: its overrides against a base config, real parameter count, and per-epoch test
accuracy, solver steps and epoch time (`ff.run_summary`). Prints a table; writes JSON.

    python benchmarks/proxy_runs.py --out benchmarks/results/cifar10_expanded_cpu.json \\
        --what "..." single=runs/exp_single c32h96=runs/exp_c32h96
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fractal_field as ff  # noqa: E402


def config_diff(config: dict, base: dict, prefix: str = "") -> list[str]:
    """`key.path=value` for every entry of `config` that differs from `base`."""
    out = []
    for k in sorted(set(config) | set(base)):
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


def print_table(runs: list[dict]) -> None:
    width = max(len(r["name"]) for r in runs)
    num_epochs = max(len(r["epochs"]) for r in runs)
    print(
        f"{'run':<{width}} {'params':>8} " + " ".join(f"{f'ep{i}':>7}" for i in range(num_epochs))
    )
    for r in runs:
        accs = " ".join(f"{100 * e['accuracy']:6.2f}%" for e in r["epochs"])
        print(f"{r['name']:<{width}} {r['params']:>8,} {accs}   {' '.join(r['overrides'])}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    p.add_argument("--base", default="configs/cifar10_small.py", help="config overrides are from")
    p.add_argument("--out", required=True)
    p.add_argument("--what", default="", help="what the runs compare (recorded in the file)")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    named = dict(spec.split("=", 1) for spec in args.runs)
    runs = summarize(named, args.base)
    result = dict(what=args.what, base=args.base, note=args.note, runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(runs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
