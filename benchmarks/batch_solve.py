"""Per-sample (`vmap`) against planar batch solves in the training step.

For each config (MNIST Nano, CIFAR-10 small) and adjoint (Jacobian-free, implicit), one full
training step (forward solve, gradient, AdamW update) at the config's batch size on real
images, with `model.batch_solve` set to `"per_sample"` and to `"planar"`. The two layouts of a
case alternate over `--rounds` rounds of `--repeats` steps each (after a warm-up), so machine
noise hits both alike; the table gives medians over all steps and their ratio.

    python benchmarks/batch_solve.py   # writes benchmarks/results/batch_solve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fractal_field as ff  # noqa: E402
from fractal_field._provenance import provenance  # noqa: E402
from fractal_field._train import (  # noqa: E402
    build_model,
    build_optimizer,
    load_data,
    make_train_step,
)

CONFIGS = {"mnist_nano": "configs/mnist_nano.py", "cifar10_small": "configs/cifar10_small.py"}
ADJOINTS = {
    "jfb": dict(name="jfb"),
    "implicit": dict(name="implicit", max_steps=30, rtol=1e-3, throw=False),
}


def _case(config_path: str, adjoint: str, layout: str, data_dir, overrides=()):
    """A closure running one training step of the config with these settings."""
    config = ff.load_config(config_path, [f"model.batch_solve={layout}", *overrides])
    if data_dir:
        config.data.data_dir = data_dir
    config.adjoint = ADJOINTS[adjoint]
    model = build_model(config, key=jr.PRNGKey(0))
    optimizer, _ = build_optimizer(config, 100)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer, False, config.get("jacobian_penalty", 0.0))
    ds = load_data(config, "train")
    images, labels = next(ds.batches(config.batch_size, seed=0, epoch=0))
    x, y = jnp.asarray(ds.normalize(images)), jnp.asarray(labels, jnp.int32)
    state = [model, opt_state]

    def run():
        """One training step (the state moves on, as in training); its seconds and metrics.
        The step donates its inputs, so each call gets its own copy of the batch."""
        xc, yc = jax.block_until_ready((jnp.copy(x), jnp.copy(y)))
        t = time.perf_counter()
        state[0], state[1], metrics = step(jr.PRNGKey(0), state[0], state[1], xc, yc)
        metrics = jax.device_get(metrics)
        return time.perf_counter() - t, metrics

    return run


def write_results(path: str | Path, **fields) -> None:
    """Write `fields` to `path` as JSON, after the device and library versions."""
    # The caller's fields win over the provenance (some give their own command or hardware).
    out = {
        **provenance("benchmarks/" + Path(sys.argv[0]).name),
        "device": str(jax.devices()[0].device_kind),
        **fields,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="mnist_nano,cifar10_small")
    parser.add_argument("--adjoints", default="jfb,implicit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "batch_solve.json"))
    args = parser.parse_args(argv)

    rows = []
    for name in args.configs.split(","):
        for adjoint in args.adjoints.split(","):
            runs = {lay: _case(CONFIGS[name], adjoint, lay, args.data_dir) for lay in LAYOUTS}
            times: dict[str, list[float]] = {lay: [] for lay in LAYOUTS}
            metrics = {}
            for lay in LAYOUTS:  # compile and warm up
                runs[lay]()
                metrics[lay] = runs[lay]()[1]
            for _ in range(args.rounds):
                for lay in LAYOUTS:
                    for _ in range(args.repeats):
                        times[lay].append(runs[lay]()[0])
            med = {lay: statistics.median(times[lay]) for lay in LAYOUTS}
            row = dict(
                config=name,
                adjoint=adjoint,
                per_sample_ms=1e3 * med["per_sample"],
                planar_ms=1e3 * med["planar"],
                speedup=med["per_sample"] / med["planar"],
                times_ms={lay: [round(1e3 * t, 1) for t in times[lay]] for lay in LAYOUTS},
                loss={lay: float(metrics[lay]["loss"]) for lay in LAYOUTS},
                fwd_steps={lay: float(metrics[lay]["fwd_steps"]) for lay in LAYOUTS},
                bwd_steps={lay: float(metrics[lay]["bwd_steps"]) for lay in LAYOUTS},
            )
            rows.append(row)
            print(
                f"{name:14s} {adjoint:9s} per-sample {row['per_sample_ms']:8.1f} ms  "
                f"planar {row['planar_ms']:8.1f} ms  {row['speedup']:.2f}x",
                flush=True,
            )
    write_results(
        args.out,
        note="training step at the config's batch size on its first training batch, "
        "freshly initialised parameters; medians of rounds x repeats, layouts interleaved",
        rows=rows,
    )
    print("\n| config | adjoint | per-sample ms | planar ms | speed-up |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['adjoint']} | {r['per_sample_ms']:.0f} | "
            f"{r['planar_ms']:.0f} | {r['speedup']:.2f}x |"
        )


LAYOUTS = ("per_sample", "planar")

if __name__ == "__main__":
    main()
