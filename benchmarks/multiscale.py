"""Single-scale against multi-scale, expanded and normalised fields in the CIFAR-10 training step.

One full training step (planar batch solve, implicit gradients, AdamW update) of
`configs/cifar10_small.py` at batch 128 on real images, for the config's single-scale field,
multi-scale fields (`model.scales`, `model.channels`), the expanded cell (`model.hidden`) and
the group-normalised cell (`model.norm_groups`, with or without the Jacobian penalty;
`--variants` picks some). The variants alternate over
`--rounds` rounds of `--repeats` steps each (after a warm-up), so machine noise hits all alike;
the table gives parameters, medians over all steps and the ratio to the single-scale field.

    python benchmarks/multiscale.py   # writes benchmarks/results/multiscale.json
    python benchmarks/multiscale.py --variants "single 64" "expanded 32x96" \
        --out benchmarks/results/expanded.json
    python benchmarks/multiscale.py --variants "single 64" "normalised 64" \
        "normalised 64 + jac" --out benchmarks/results/normalised.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax.random as jr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from batch_solve import ADJOINTS, _case, write_results  # noqa: E402

import fractal_field as ff  # noqa: E402
from fractal_field._train import build_model  # noqa: E402

CONFIG = "configs/cifar10_small.py"
VARIANTS = {
    "single 64": [],
    "2 scales x 48": ["model.scales=2", "model.channels=48"],
    "3 scales x 40": ["model.scales=3", "model.channels=40"],
    "expanded 32x96": ["model.channels=32", "model.hidden=96", "model.hidden_activation=crelu"],
    "normalised 64": ["model.norm_groups=8"],
    "normalised 64 + jac": ["model.norm_groups=8", "jacobian_penalty=2.0"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adjoint", default="implicit", choices=sorted(ADJOINTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "multiscale.json"))
    args = parser.parse_args(argv)

    runs, params = {}, {}
    if "single 64" not in args.variants:
        parser.error("--variants must include 'single 64' (the baseline of the ratios).")
    for name in args.variants:
        overrides = VARIANTS[name]
        runs[name] = _case(CONFIG, args.adjoint, "planar", args.data_dir, overrides)
        config = ff.load_config(CONFIG, overrides)
        params[name] = ff.count_params(build_model(config, key=jr.PRNGKey(0)))
    metrics = {}
    for name, run in runs.items():  # compile and warm up
        run()
        metrics[name] = run()[1]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.repeats):
                times[name].append(run()[0])
    base = statistics.median(times["single 64"])
    rows = []
    for name in runs:
        med = statistics.median(times[name])
        rows.append(
            dict(
                variant=name,
                overrides=VARIANTS[name],
                params=params[name],
                step_ms=1e3 * med,
                ratio=med / base,
                times_ms=[round(1e3 * t, 1) for t in times[name]],
                fwd_steps=float(metrics[name]["fwd_steps"]),
                bwd_steps=float(metrics[name]["bwd_steps"]),
            )
        )
    write_results(
        args.out,
        adjoint=args.adjoint,
        note="training step at batch 128 on the first training batch, freshly initialised "
        "parameters, planar batch solve; medians of rounds x repeats, variants interleaved",
        rows=rows,
    )
    print("\n| field | params | step ms | vs single | fwd steps | bwd steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params']:,} | {r['step_ms']:.0f} | {r['ratio']:.2f}x | "
            f"{r['fwd_steps']:.0f} | {r['bwd_steps']:.0f} |"
        )


if __name__ == "__main__":
    main()
