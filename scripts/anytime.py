"""Anytime inference of a checkpoint: test accuracy against the solver budget.

For Naive and Anderson: accuracy and mean steps used at every step budget 1..N and at a
range of tolerances, and with per-image early exit once the prediction has been stable for
`s` steps (all read from one recorded solve per solver, `ff.anytime_trace`); warm starts on
shifted images (each image solved from the fixed point of the unshifted one). Writes JSON and
a figure.

    python scripts/anytime.py --checkpoint checkpoints/mnist_nano.eqx \
        --data-dir ../shared/data/mnist --limit 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import fractal_field as ff
from fractal_field.data import load_dataset

RTOLS = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)
STABLE = (1, 2, 3, 4, 6, 8)
SOLVERS = {"naive": ff.Naive(), "anderson": ff.Anderson(history=5)}


@eqx.filter_jit
def _solve(model, x, z0, solver):
    def one(x, z0):
        logits, sol = model(x, z0=z0, solver=solver)
        return logits.argmax(), sol.stats.num_steps, sol.value

    return jax.vmap(one)(x, z0)


def warm_start(model, x, labels, solver, shifts, batch_size) -> list[dict]:
    """Steps and accuracy on images shifted right by `shift` pixels, solved from zero (cold)
    and from the fixed point of the unshifted image (warm)."""
    cold = {shift: ([], []) for shift in shifts}
    warm = {shift: ([], []) for shift in shifts}
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        zero = np.zeros((len(xb), *model.encoder(xb[0]).shape), np.complex64)
        _, _, z = _solve(model, xb, zero, solver)
        for shift in shifts:
            xs = np.roll(xb, shift, axis=-1)
            for out, start in ((cold, zero), (warm, z)):
                pred, steps, _ = _solve(model, xs, start, solver)
                out[shift][0].append(np.asarray(pred))
                out[shift][1].append(np.asarray(steps))
    rows = []
    for shift in shifts:
        row = dict(shift=shift)
        for name, out in (("cold", cold), ("warm", warm)):
            pred, steps = (np.concatenate(a) for a in out[shift])
            row[f"{name}_accuracy"] = float(np.mean(pred == labels))
            row[f"{name}_mean_steps"] = float(np.mean(steps))
        rows.append(row)
        print(f"  warm start, shift {shift}px: {row}", flush=True)
    return rows


def curves(trace: ff.AnytimeTrace, labels, atol: float, rtol: float) -> dict:
    def point(pred_steps):
        pred, steps = pred_steps
        return float(np.mean(pred == labels)), float(np.mean(steps))

    budget = [point(trace.budget(k)) for k in range(1, trace.max_steps + 1)]
    tol = [point(trace.tolerance(r, atol)) for r in RTOLS]
    exit_ = [point(trace.early_exit(s, rtol, atol)) for s in STABLE]
    return dict(
        max_steps=list(range(1, trace.max_steps + 1)),
        budget_accuracy=[a for a, _ in budget],
        budget_mean_steps=[s for _, s in budget],
        rtols=list(RTOLS),
        tolerance_accuracy=[a for a, _ in tol],
        tolerance_mean_steps=[s for _, s in tol],
        stable=list(STABLE),
        early_exit_rtol=rtol,
        early_exit_accuracy=[a for a, _ in exit_],
        early_exit_mean_steps=[s for _, s in exit_],
        full_accuracy=float(np.mean(np.argmax(trace.final_logits, -1) == labels)),
        full_mean_steps=float(np.mean(trace.num_steps)),
    )


def figure(results: dict, path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, r), colour in zip(results["solvers"].items(), ("C0", "C1"), strict=False):
        acc = 100 * np.asarray(r["budget_accuracy"])
        ax.plot(r["budget_mean_steps"], acc, "-", color=colour, label=f"{name}: max steps 1..N")
        ax.plot(
            r["tolerance_mean_steps"],
            100 * np.asarray(r["tolerance_accuracy"]),
            "s--",
            color=colour,
            ms=4,
            label=f"{name}: rtol {RTOLS[0]:g}..{RTOLS[-1]:g}",
        )
        ax.plot(
            r["early_exit_mean_steps"],
            100 * np.asarray(r["early_exit_accuracy"]),
            "^:",
            color=colour,
            ms=5,
            label=f"{name}: early exit, stable s={STABLE[0]}..{STABLE[-1]}",
        )
    ax.set_xlabel("mean solver steps per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, ax.get_ylim()[0]), min(100, ax.get_ylim()[1] + 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    subtitle = "\n".join(textwrap.fill(line, 120) for line in subtitle.splitlines())
    ax.set_title(f"Anytime inference, {results['checkpoint']}\n{subtitle}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/mnist_nano.eqx")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=1000, help="first N test images (0: all)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="N random test images instead of the first N "
        "(for test sets sorted by class, like the CIFAR-10 image folders)",
    )
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--shifts", default="1,2", help="warm-start pixel shifts")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="benchmarks/results/anytime_mnist.json")
    p.add_argument("--figure", default="docs/anytime.png")
    args = p.parse_args(argv)

    model, meta = ff.load_model(args.checkpoint, with_meta=True)
    ds = load_dataset(meta["config"]["data"]["name"], "test", data_dir=args.data_dir)
    if args.limit:
        ds = ds.subset(args.limit, seed=args.seed)
    n = len(ds.labels)
    x = np.asarray(ds.normalize(ds.images))
    labels = np.asarray(ds.labels)
    command = "python " + " ".join(["scripts/anytime.py", *(argv or sys.argv[1:])])
    results = dict(
        date=datetime.date.today().isoformat(),
        command=command,
        hardware="2-core CPU",
        platform=platform.platform(),
        jax=jax.__version__,
        equinox=eqx.__version__,
        checkpoint=args.checkpoint,
        n=n,
        model_max_steps=model.max_steps,
        model_rtol=model.rtol,
        trace_rtol=min(RTOLS),
        solvers={},
        warm_start={},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, solver in SOLVERS.items():
        trace = ff.anytime_trace(
            model,
            x,
            solver=solver,
            max_steps=args.max_steps,
            rtol=min(RTOLS),
            batch_size=args.batch_size,
        )
        results["solvers"][name] = curves(trace, labels, model.atol, model.rtol)
        r = results["solvers"][name]
        print(f"{name}: full solve {r['full_accuracy']:.4f} in {r['full_mean_steps']:.2f} steps")
        for k in sorted(
            {k for k in (1, 2, 3, 5, 8, 12, 20) if k < args.max_steps} | {args.max_steps}
        ):
            print(f"  max_steps {k:3d}: accuracy {r['budget_accuracy'][k - 1]:.4f}", flush=True)
        out.write_text(json.dumps(results, indent=1))
        shifts = [int(s) for s in args.shifts.split(",") if s]
        results["warm_start"][name] = warm_start(model, x, labels, solver, shifts, args.batch_size)
        out.write_text(json.dumps(results, indent=1))
    if args.figure:
        label = {"mnist": "MNIST", "cifar10": "CIFAR-10"}.get(ds.name, ds.name)
        pick = "random " if args.limit and args.seed is not None else ""
        subtitle = f"{n} {pick}{label} test images, {results['date']}, 2-core CPU\n{command}"
        figure(results, Path(args.figure), subtitle)
    print(f"wrote {out}" + (f" and {args.figure}" if args.figure else ""))


if __name__ == "__main__":
    main()
