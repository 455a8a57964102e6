"""Training throughput and FLOP utilisation of the shipped presets, on whatever device JAX sees.

For each preset (MNIST Nano, CIFAR-10 small) at its training batch size:

- **train step**: one full training step (forward solve, gradient with the config's adjoint,
  optimiser update), median wall time over `--repeats` steps after a warm-up (compile
  excluded); images/s = batch / median.
- **eval**: one forward pass (solve + readout) on the evaluation batch, images/s.
- **field iteration**: `--iters` applications of the cell (one fixed-point iteration each,
  the solver's own inner work) in a `fori_loop`, batch-vmapped, median time per application.
- **FLOPs**: *model* FLOPs count the field's complex 3x3 convolution as a direct convolution
  (8 real FLOPs per complex multiply-add: `8 * 9 * C^2 * h * w` per image and application) plus
  the encoder and readout. *XLA* FLOPs are XLA's own count for one batched cell application as
  compiled (the FFT form). A training step is counted as `fwd_steps + 1` cell applications
  forward plus `2 x` (backward cell VJPs + 1), using the measured mean solver steps.
- **peak**: a square float32 matrix multiply measured in the same run, at `highest` precision
  (true float32) and at the default precision (TF32 on NVIDIA tensor cores), and bfloat16.
  MFU = model FLOP rate / float32 peak.

Inputs are real images if the data are found (`--data-dir`, `$FRACTAL_FIELD_DATA`), random
normal otherwise (recorded in the results); parameters are the freshly initialised model's.

    python benchmarks/gpu.py            # writes benchmarks/results/gpu.json (or gpu_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from fractal_field._train import (  # noqa: E402
    build_model,
    build_optimizer,
    eval_step,
    load_data,
    make_train_step,
)

PRESETS = {
    "mnist_nano": "configs/mnist_nano.py",
    "cifar10_small": "configs/cifar10_small.py",
}


def _median_s(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(n: int, dtype, precision: str | None, repeats: int) -> float:
    """FLOP/s of an `n x n x n` matrix product (median of `repeats`)."""
    a = jr.normal(jr.key(0), (n, n), dtype)
    b = jr.normal(jr.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    return 2 * n**3 / _median_s(lambda: f(a, b), repeats)


def _xla_flops(fn, *args) -> float | None:
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        return float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is optional on some backends
        return None


def _batch(config, split, n, in_shape, data_dir):
    """A fixed batch of `n` normalised images: real data if found, else random normal."""
    try:
        if data_dir is not None:
            config.data.data_dir = data_dir
        ds = load_data(config, split)
        images, labels = next(ds.batches(n, seed=0, epoch=0))
        return jnp.asarray(ds.normalize(images)), jnp.asarray(labels), "real"
    except Exception as e:  # noqa: BLE001 - fall back to random inputs, recorded
        print(f"  (no data for {config.data.name}: {type(e).__name__}; random inputs)")
        x = jr.normal(jr.key(0), (n, *in_shape), jnp.float32)
        return x, jr.randint(jr.key(1), (n,), 0, 10), "random"


def bench_preset(name: str, path: str, *, repeats: int, iters: int, data_dir) -> dict:
    config = ff.load_config(str(HERE.parent / path))
    model = build_model(config, key=jr.key(config.seed))
    enc = model.encoder
    in_shape = (enc.in_channels, model_image_size(config), model_image_size(config))
    bs, ebs = config.batch_size, config.eval_batch_size
    x, y, source = _batch(config, "train", bs, in_shape, data_dir)
    xe, ye, _ = _batch(config, "test", ebs, in_shape, data_dir)

    optimizer, _ = build_optimizer(config, 1000)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer, False)
    key = jr.key(0)

    state = {"model": model, "opt": opt_state, "m": None}

    def train_once():
        # Re-applying the step to the updated model, as training does (buffers are donated).
        state["model"], state["opt"], state["m"] = step(key, state["model"], state["opt"], x, y)
        return state["m"]

    t0 = time.perf_counter()
    jax.block_until_ready(train_once())
    compile_s = time.perf_counter() - t0
    train_s = _median_s(train_once, repeats, warmup=1)
    m = {k: float(v) for k, v in state["m"].items()}
    model = state["model"]
    eval_s = _median_s(lambda: eval_step(model, xe, ye)["correct"], repeats)

    # One fixed-point iteration of the cell, batch-vmapped, `iters` times in a loop.
    inj = jax.vmap(model.encoder)(x)
    c, h, w = inj.shape[1:]
    op = model.cell.conv.operator(h, w)

    def one(z):
        return jax.vmap(lambda zi, ui: model.cell.step_with(op, zi, ui))(z, inj)

    loop = jax.jit(lambda z: jax.lax.fori_loop(0, iters, lambda _, z: one(z), z))
    z0 = jnp.zeros_like(inj)
    iter_s = _median_s(lambda: loop(z0), repeats) / iters

    # The contraction's operator norm (once per solve), and its gradient, by each method.
    conv = model.cell.conv
    norm_ms = {}
    for method in ("svd", "power"):
        g = eqx.filter_jit(eqx.filter_grad(lambda cm, method=method: cm.scale(method)))
        norm_ms[method] = 1e3 * _median_s(lambda g=g: g(conv).conv.weight, repeats)

    cell_model = 8 * 9 * c * c * h * w  # per image and application
    cell_xla = _xla_flops(one, z0)
    cin, cout = enc.conv.in_channels, enc.conv.out_channels
    hin = in_shape[1]
    enc_flops = 2 * 9 * cin * cout * hin * hin
    feats = model.readout.linear.in_features
    read_flops = 2 * feats * model.readout.linear.out_features
    bwd_apps = m["bwd_steps"] + 1  # J^T products + the final parameter VJP
    train_model = bs * (
        cell_model * (m["fwd_steps"] + 1 + 2 * bwd_apps) + 3 * (enc_flops + read_flops)
    )
    return dict(
        preset=name,
        params=ff.count_params(model),
        field=[int(c), int(h), int(w)],
        batch=bs,
        eval_batch=ebs,
        inputs=source,
        adjoint=type(model.adjoint).__name__,
        compile_s=compile_s,
        train_step_ms=1e3 * train_s,
        train_images_per_s=bs / train_s,
        eval_ms=1e3 * eval_s,
        eval_images_per_s=ebs / eval_s,
        fwd_steps=m["fwd_steps"],
        bwd_steps=m["bwd_steps"],
        cell_iter_ms=1e3 * iter_s,
        norm_grad_ms=norm_ms,
        cell_model_flops_per_image=cell_model,
        cell_xla_flops_per_batch=cell_xla,
        cell_model_flops_per_s=bs * cell_model / iter_s,
        cell_xla_flops_per_s=(cell_xla / iter_s) if cell_xla else None,
        train_model_flops_per_step=train_model,
        train_model_flops_per_s=train_model / train_s,
    )


def model_image_size(config) -> int:
    return ff.PRESETS[config.model.preset]["image_size"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--iters", type=int, default=20, help="cell applications per timed loop")
    ap.add_argument("--matmul-n", type=int, default=None, help="peak matmul size")
    ap.add_argument("--data-dir", default=os.environ.get("FRACTAL_FIELD_DATA"))
    ap.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", args.precision)

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    n = args.matmul_n or (8192 if on_gpu else 2048)
    peaks = {
        "f32_highest": matmul_peak(n, jnp.float32, "highest", args.repeats),
        "f32_default": matmul_peak(n, jnp.float32, "default", args.repeats),
        "bf16": matmul_peak(n, jnp.bfloat16, "default", args.repeats),
    }
    rows = []
    for name in args.presets.split(","):
        row = bench_preset(
            name, PRESETS[name], repeats=args.repeats, iters=args.iters, data_dir=args.data_dir
        )
        row["cell_mfu_f32"] = row["cell_model_flops_per_s"] / peaks["f32_highest"]
        row["train_mfu_f32"] = row["train_model_flops_per_s"] / peaks["f32_highest"]
        rows.append(row)
        print(f"{name}: done", flush=True)

    result = dict(
        device=getattr(dev, "device_kind", str(dev)),
        platform=dev.platform,
        device_count=jax.device_count(),
        jax=jax.__version__,
        host=platform.node(),
        matmul_precision=args.precision,
        matmul_n=n,
        peak_flops=peaks,
        rows=rows,
    )
    out = Path(args.out or HERE / "results" / ("gpu.json" if on_gpu else "gpu_cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(_table(result))
    print(f"wrote {out}")


def _table(r) -> str:
    p = r["peak_flops"]
    lines = [
        f"device: {r['device']} ({r['platform']}), jax {r['jax']}, "
        f"matmul precision {r['matmul_precision']}",
        f"peak matmul {r['matmul_n']}^3: f32 {p['f32_highest'] / 1e12:.2f} TFLOP/s, "
        f"f32 default {p['f32_default'] / 1e12:.2f}, bf16 {p['bf16'] / 1e12:.2f}",
        "",
        "| preset | batch | train step ms | train img/s | eval img/s | fwd/bwd steps "
        "| cell iter ms | cell model TFLOP/s (MFU f32) | train model TFLOP/s (MFU f32) "
        "| norm+grad ms svd / power |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['preset']} | {x['batch']} | {x['train_step_ms']:.1f} | "
            f"{x['train_images_per_s']:.0f} | {x['eval_images_per_s']:.0f} | "
            f"{x['fwd_steps']:.1f}/{x['bwd_steps']:.1f} | {x['cell_iter_ms']:.3f} | "
            f"{x['cell_model_flops_per_s'] / 1e12:.3f} ({100 * x['cell_mfu_f32']:.1f}%) | "
            f"{x['train_model_flops_per_s'] / 1e12:.3f} ({100 * x['train_mfu_f32']:.1f}%) | "
            f"{x['norm_grad_ms']['svd']:.2f} / {x['norm_grad_ms']['power']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
