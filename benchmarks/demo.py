"""How long the web demo (`scripts/demo.py`) takes per input, for the shipped checkpoints.

For each checkpoint, over its ten shipped test images: the first solve with each solver
(which compiles it), the later solves (the demo's `FieldDemo.run` at the model's own
`max_steps` as budget, a new image each time, so nothing is read off an earlier record), and
drawing the pictures (`pictures`: the GIF, the magnitude/phase grid and the residual curve).

    python benchmarks/demo.py   # writes benchmarks/results/demo.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _demo_script():
    spec = importlib.util.spec_from_file_location("ff_demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoints", default="checkpoints/mnist_nano.eqx,checkpoints/cifar10_small.eqx"
    )
    parser.add_argument("--pictures", type=int, default=5, help="images whose pictures are drawn")
    parser.add_argument("--out", default=str(HERE / "results" / "demo.json"))
    args = parser.parse_args(argv)

    demo = _demo_script()
    workdir = Path(tempfile.mkdtemp(prefix="ff-demo-bench-"))
    rows = []
    for checkpoint in args.checkpoints.split(","):
        t0 = time.perf_counter()
        field = demo.FieldDemo.from_checkpoint(ROOT / checkpoint)
        load_s = time.perf_counter() - t0
        budget = min(field.model.max_steps, field.max_budget)
        images = list(demo.example_images(field.dataset).values())
        row = dict(
            checkpoint=Path(checkpoint).name,
            dataset=field.dataset.name,
            budget=budget,
            load_s=round(load_s, 2),
            solvers={},
        )
        for solver in field.solvers:
            times, steps = [], []
            for image in images:
                t0 = time.perf_counter()
                run = field.run(image, solver, budget)
                times.append(time.perf_counter() - t0)
                steps.append(run.steps)
            row["solvers"][solver] = dict(
                first_s=round(times[0], 2),
                later_median_s=round(statistics.median(times[1:]), 3),
                later_s=[round(t, 3) for t in times[1:]],
                steps=steps,
            )
        runs = [field.run(image, field.default_solver, budget) for image in images]
        draw = []
        for run in runs[: args.pictures]:
            t0 = time.perf_counter()
            demo.pictures(run, workdir)
            draw.append(time.perf_counter() - t0)
        row["pictures_median_s"] = round(statistics.median(draw), 2)
        row["pictures_s"] = [round(t, 2) for t in draw]
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = dict(
        date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/demo.py", *sys.argv[1:]]),
        hardware="2-core CPU (shared with other jobs)",
        load_average=os.getloadavg()[0],
        device=str(jax.devices()[0].device_kind),
        platform=platform.platform(),
        jax=jax.__version__,
        equinox=eqx.__version__,
        note="seconds; the first solve per solver compiles it; later solves: the other nine "
        "shipped images at the model's max_steps as budget (median); pictures: median over "
        "the first images",
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n| model | solver | first solve (compiles) s | later solves s (median) | steps |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        for name, s in r["solvers"].items():
            print(
                f"| {r['checkpoint']} | {name} | {s['first_s']:.1f} | {s['later_median_s']:.3f} "
                f"| {min(s['steps'])}-{max(s['steps'])} |"
            )
    for r in rows:
        print(f"{r['checkpoint']}: pictures {r['pictures_median_s']:.2f} s (median)")


if __name__ == "__main__":
    main()
