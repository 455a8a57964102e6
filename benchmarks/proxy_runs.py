"""Collect finished training runs (workdirs of `scripts/train.py`) into one results file.

For each run: its model overrides against a base config, real parameter count (from the saved
config, without initialising weights), and per-epoch test accuracy, solver steps and epoch
time from `eval.jsonl`. Prints a table; writes JSON.

    python benchmarks/proxy_runs.py --out benchmarks/results/cifar10_expanded_cpu.json \\
        --what "..." single=runs/exp_single c32h96=runs/exp_c32h96
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax.random as jr
import ml_collections

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fractal_field._config import load_config  # noqa: E402
from fractal_field._model import count_params  # noqa: E402
from fractal_field._train import build_model  # noqa: E402


def _diff(config: dict, base: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(config) | set(base)):
        a, b = config.get(k), base.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={a}")
    return out


def collect(name: str, workdir: Path, base: dict) -> dict:
    config = json.loads((workdir / "config.json").read_text())
    model = eqx.filter_eval_shape(
        lambda: build_model(ml_collections.ConfigDict(config), key=jr.PRNGKey(0))
    )
    lines = (workdir / "eval.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if line.strip()]
    return dict(
        name=name,
        workdir=str(workdir),
        overrides=_diff(config, base),
        params=count_params(model),
        epochs=[
            dict(
                epoch=e["epoch"],
                accuracy=e["accuracy"],
                mean_steps=round(e["mean_steps"], 2),
                epoch_time_s=round(e["epoch_time"], 1),
                failed=e["failed"],
                n=e.get("n"),
            )
            for e in epochs
        ],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    p.add_argument(
        "--base", default="configs/cifar10_small.py", help="config the overrides are against"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--what", default="", help="what the runs compare (recorded in the file)")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    base = load_config(args.base).to_dict()
    runs = []
    for spec in args.runs:
        name, _, workdir = spec.partition("=")
        runs.append(collect(name, Path(workdir), base))
    result = dict(what=args.what, base=args.base, note=args.note, runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    width = max(len(r["name"]) for r in runs)
    num_epochs = max(len(r["epochs"]) for r in runs)
    print(f"{'run':<{width}} {'params':>8} " + " ".join(f"ep{i:<2} acc" for i in range(num_epochs)))
    for r in runs:
        accs = " ".join(f"{100 * e['accuracy']:6.2f}%" for e in r["epochs"])
        print(f"{r['name']:<{width}} {r['params']:>8,} {accs}   {' '.join(r['overrides'])}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
