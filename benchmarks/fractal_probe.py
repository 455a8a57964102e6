"""Cost of the phase-flow probe (`fractal_probe_every`) against a training step.

    python benchmarks/fractal_probe.py [--config configs/mnist_nano.py] [--batch 128]
                                       [--repeats 7] [--out benchmarks/results/fractal_probe.json]

Times, interleaved and after one warm-up each (compilation reported separately): one training
step of the config (forward solve, gradient, AdamW update) and one probe
(`ff.fractal.log_phase_flow`: loss, gradient and per-segment norms, one JSON line written).
Synthetic 28x28 images (the cost does not depend on the pixel values beyond the solver's step
count, which is reported). Overhead of probing every N steps = probe / (N * step).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fractal_field as ff
from fractal_field._provenance import provenance
from fractal_field._train import build_model, build_optimizer, make_train_step, synthetic_dataset

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE.parent / "configs" / "mnist_nano.py"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--segment", type=int, default=8, help="segment size r of the probe")
    p.add_argument("--out", default=str(HERE / "results" / "fractal_probe.json"))
    args = p.parse_args(argv)

    config = ff.load_config(args.config)
    model = build_model(config, key=jr.PRNGKey(0))
    optimizer, _ = build_optimizer(config, 100)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer, config.data.get("augment", False))
    ds = synthetic_dataset(args.batch, image_size=28, channels=model.encoder.in_channels)
    x = jnp.asarray(ds.normalize(ds.images))
    y = jnp.asarray(ds.labels)
    state = [model, opt_state]
    log = Path(tempfile.mkdtemp()) / "fractal.jsonl"

    def run_step():
        xc, yc = jax.block_until_ready((jnp.copy(x), jnp.copy(y)))
        t = time.perf_counter()
        state[0], state[1], m = step(jr.PRNGKey(0), state[0], state[1], xc, yc)
        m = jax.device_get(m)
        return time.perf_counter() - t, float(m["fwd_steps"])

    def run_probe():
        t = time.perf_counter()
        ff.fractal.log_phase_flow(log, state[0], x, y, step=0, epoch=0, r=args.segment)
        return time.perf_counter() - t, None

    first_step, _ = run_step()
    first_probe, _ = run_probe()
    steps, probes, fwd = [], [], []
    for _ in range(args.repeats):
        t, f = run_step()
        steps.append(t)
        fwd.append(f)
        probes.append(run_probe()[0])
    step_s, probe_s = float(np.median(steps)), float(np.median(probes))
    rec = json.loads(log.read_text().splitlines()[-1])
    out = dict(
        **provenance("benchmarks/fractal_probe.py", argv),
        config=Path(args.config).name,
        batch=args.batch,
        segment=args.segment,
        repeats=args.repeats,
        note="medians over interleaved repeats; first calls include compilation",
        step_s=step_s,
        probe_s=probe_s,
        probe_over_step=probe_s / step_s,
        overhead_every={n: probe_s / (n * step_s) for n in (10, 50, 100, 500)},
        first_step_s=first_step,
        first_probe_s=first_probe,
        step_times_s=[round(t, 4) for t in steps],
        probe_times_s=[round(t, 4) for t in probes],
        fwd_steps=float(np.median(fwd)),
        record_bytes=len(json.dumps(rec)),
        record_segments=sum(len(v["norms"]) for v in rec["layers"].values()),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("times_s")}, indent=1))


if __name__ == "__main__":
    main()
