"""Fixed-point solvers on a trained large-grid field: the inpainting field at 64 to 256.

Workload: the inpainting field `ff.InpaintField` trained on 32x32 upsampled MNIST digits with
two large box holes (`checkpoints/inpaint_field.eqx`, `configs/inpaint_field.py`), solved on
`--batch` MNIST test digits upsampled (bilinear) to finer grids with the same holes (the same
fractions of the image), from `z0 = 0`, `atol = 0`: the resolution-agnostic use (trained at
32x32, solved at 64x64 to 256x256). Its fixed point fills each hole from its edges, so the
slow error modes are smooth and their number of steps grows with the grid.

Layouts: `per_sample` (`vmap`; each image stops on its own residual) and `joint` (the batch
as one fixed-point problem `(B, C, H, W)`, one stopping test). Solvers: Naive, Anderson
(history 5) and Multigrid with the settings in `MULTIGRID` per model, levels down to an 8x8
grid (the trained model's chosen with `--tune`: coarsened kernels on the coarser grids, three
Chebyshev smoothing steps fitted to the cell's `smoothing_interval`, unit correction; with
`multigrid_default`, Multigrid's defaults, beside it). Control (`harmonic`):
the same architecture at its noise-free diffusion initialisation, whose fill has no decay per
grid step (per sample, rtol 1e-5 by default). Each variant is compiled first, then timed in
`--repeats` round-robin rounds (so load changes hit all alike): medians of wall time and
process CPU time (`time.process_time`). `evals`: mean fine-grid-equivalent map evaluations
per image.
`hidden_mse`: restoration error on the hidden pixels (against the upsampled digit), to compare
with the training grid (`restoration`: on `--restoration-batch` digits, solved by Anderson to
rtol 1e-5). `slow_mode`: the linearised map's slowest error mode at the fixed point
(power iteration of the Jacobian): its contraction factor and the share of its energy at
frequencies below grid/8 (what an 8x8-coarser grid can represent).

Run `python benchmarks/solvers_field.py --data-dir ../shared/data`; writes
`benchmarks/results/solvers_field.json`. `--tune` times Multigrid variants at 128x128 instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fractal_field as ff
from fractal_field._inpaint import box_masks, hidden_mse, upsample
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from solvers_trained import time_variants  # noqa: E402

# The Multigrid settings per model (chosen with `--tune` on each; `levels_offset` adds levels
# below the 8x8 grid; `chebyshev=s`: `s` smoothing step sizes from `ff.chebyshev_damping` over
# the model's `smoothing_interval`, from `FractalCell.smoothing_interval`).
MULTIGRID = {
    "trained": dict(
        coarsen_layers=True, correction="unit", pre_smooth=3, post_smooth=3, chebyshev=3
    ),
    "harmonic": dict(
        restriction="full_weighting", correction="unit", residual_scale=4.0, levels_offset=1
    ),
}
TUNE = {
    "default": dict(),
    "coarse100": dict(coarse_steps=100),
    "coarse200": dict(coarse_steps=200),
    "coarse100_unit": dict(coarse_steps=100, correction="unit"),
    "coarse100_fw": dict(coarse_steps=100, restriction="full_weighting"),
    "coarse100_levels+1": dict(coarse_steps=100, levels_offset=1),
    "coarse100_pre1_post1": dict(coarse_steps=100, pre_smooth=1, post_smooth=1),
    "coarse100_const": dict(coarse_steps=100, prolongation="constant"),
    "pre3_post3": dict(pre_smooth=3, post_smooth=3),
    "pre4_post4": dict(pre_smooth=4, post_smooth=4),
    "pre3_post3_unit": dict(pre_smooth=3, post_smooth=3, correction="unit"),
    "pre3_post3_levels2": dict(pre_smooth=3, post_smooth=3, levels_offset=-3),
    "fw_unit_s4": dict(restriction="full_weighting", correction="unit", residual_scale=4.0),
    # Over-relaxed and Chebyshev smoothing, coarsened kernels.
    "damping1.7": dict(damping=1.7),
    "coarsened": dict(coarsen_layers=True),
    "coarsened_unit": dict(coarsen_layers=True, correction="unit"),
    "cheb2": dict(chebyshev=2),
    "cheb2_unit": dict(chebyshev=2, correction="unit"),
    "coarsened_cheb2": dict(coarsen_layers=True, chebyshev=2),
    "coarsened_cheb2_unit": dict(coarsen_layers=True, correction="unit", chebyshev=2),
    "coarsened_cheb3_pre3_post3_unit": MULTIGRID["trained"],
    "cheb3_pre3_post3_unit": dict(correction="unit", pre_smooth=3, post_smooth=3, chebyshev=3),
}


def smoothing_interval(model: ff.InpaintField) -> tuple[float, float]:
    """The eigenvalues `mu` of `I - f'` that the smoother must damp: the cell's rough modes
    (`FractalCell.smoothing_interval`) and `mu = 1` on the known pixels (held fixed)."""
    low, high = model.cell.smoothing_interval()
    return low, max(1.0, high)


def levels(grid: int, coarsest: int = 8) -> int:
    """Grids from `grid` down to `coarsest`."""
    return int(math.log2(grid // coarsest)) + 1


def make_multigrid(grid: int, settings: dict, interval=None) -> ff.Multigrid:
    settings = dict(settings)
    offset = settings.pop("levels_offset", 0)
    if "chebyshev" in settings:
        settings["damping"] = ff.chebyshev_damping(*interval, settings.pop("chebyshev"))
    return ff.Multigrid(levels=levels(grid) + offset, **settings)


def solvers(grid: int, settings: dict, interval) -> dict:
    out = {
        "naive": ff.Naive(),
        "anderson": ff.Anderson(history=5),
        "multigrid": make_multigrid(grid, settings, interval),
    }
    if settings:  # the defaults beside the chosen settings
        out["multigrid_default"] = make_multigrid(grid, {})
    return out


class _Batched(eqx.Module):
    """A map on one field as a map on a batch of them (an `eqx.Module`, so that Multigrid
    coarsens the fields it holds)."""

    fmap: ff.InpaintMap

    def __call__(self, z, args):
        return jax.vmap(self.fmap)(z, args)


def compile_run(model, x, m, layout, solver, rtol, max_steps):
    """A compiled `run() -> (restored, stats, result codes)` for one variant."""
    kw = dict(solver=solver, rtol=rtol, atol=0.0, max_steps=max_steps, throw=False)

    def run(model, x, m):
        if layout == "per_sample":
            restored, sol = jax.vmap(lambda xi, mi: model(xi, mi, **kw))(x, m)
            return restored, sol.stats, sol.result._value
        # The batch as one problem: the same map on a (B, C, H, W) state.
        inj = jax.vmap(model.inject)(x, m)
        agnostic = getattr(solver, "resolution_agnostic", False)
        fmap = model.field_map(None if agnostic else inj.shape[-2:])
        fn = _Batched(fmap)
        sol = ff.fixed_point(fn, jnp.zeros_like(inj), (inj, m), **kw)
        restored = jax.vmap(model.readout)(sol.value)
        stats = jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, x.shape[:1]), sol.stats)
        return restored, stats, jnp.broadcast_to(sol.result._value, x.shape[:1])

    dyn, static = eqx.partition(model, eqx.is_array)
    compiled = jax.jit(lambda d, x, m: run(eqx.combine(d, static), x, m)).lower(dyn, x, m)
    compiled = compiled.compile()
    return lambda: compiled(dyn, x, m)


def finish(variants, times, x, m, log):
    rows = []
    for (row, fn), (ms, cpu_ms) in zip(variants, times, strict=True):
        restored, stats, result = fn()
        row.update(
            ms=ms,
            cpu_ms=cpu_ms,
            steps=float(jnp.mean(stats.num_steps)),
            max_steps_taken=int(jnp.max(stats.num_steps)),
            evals=float(jnp.mean(stats.num_fn_evals)),
            relative_residual=float(jnp.max(stats.relative_residual)),
            converged=float(jnp.mean(result == ff.RESULTS.successful._value)),
            hidden_mse=float(hidden_mse(restored, x, m)),
        )
        rows.append(row)
        log(
            f"{row['model']:9s} {row['grid']:4d} {row['layout']:10s} {row['solver']:22s} "
            f"rtol={row['rtol']:g} "
            f"steps={row['steps']:.1f} evals={row['evals']:.1f} res={row['relative_residual']:.1e} "
            f"conv={row['converged']:.2f} {row['ms']:.0f} ms (cpu {row['cpu_ms']:.0f} ms) "
            f"mse={row['hidden_mse']:.4f}"
        )
    return rows


def slow_mode(model, x, m, iters=1000, seed=0):
    """Contraction factor and low-frequency energy share of the slowest error mode of the
    linearised map at the fixed point of the first image (power iteration of the Jacobian)."""
    x, m = x[0], m[0]
    grid = x.shape[-1]
    sol = model.solve(x, m, solver=ff.Anderson(history=5), rtol=1e-6, max_steps=20000)
    inj = model.inject(x, m)
    fmap = model.field_map(None)

    def jvp(v):
        return jax.jvp(lambda z: fmap(z, (inj, m)), (sol.value,), (v,))[1]

    @jax.jit
    def power(v):
        def body(_, v):
            w = jvp(v)
            return w / jnp.linalg.norm(w)

        v = jax.lax.fori_loop(0, iters, body, v)
        return v, jnp.linalg.norm(jvp(v))

    v0 = jr.normal(jr.PRNGKey(seed), sol.value.shape, sol.value.dtype)
    v, rate = power(v0 / jnp.linalg.norm(v0))
    k = np.abs(np.fft.fftfreq(grid) * grid)
    low = (k[:, None] < grid / 16) & (k[None] < grid / 16)  # |k| below grid/8 cycles: 8x coarser
    energy = np.abs(np.fft.fft2(np.asarray(v))) ** 2
    return dict(
        grid=grid,
        rate=float(rate),
        steps_per_decade=float(-1 / np.log10(float(rate))) if rate < 1 else float("inf"),
        low_frequency_share=float(energy[:, low].sum() / energy.sum()),
    )


def data(grids, batch, data_dir, seed=0):
    ds = load_dataset("mnist", "test", data_dir=data_dir).subset(batch, seed=seed)
    digits = jnp.asarray(ds.images, jnp.float32).mean(-1)[:, None] / 255.0
    out = {}
    for g in grids:
        out[g] = (upsample(digits, g), box_masks(jr.PRNGKey(seed + 1), batch, g))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--checkpoint", default="checkpoints/inpaint_field.eqx")
    p.add_argument("--grids", default="64,128,256")
    p.add_argument("--train-grid", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--restoration-batch", type=int, default=16, help="images for hidden_mse")
    p.add_argument("--rtols", default="1e-3,1e-5")
    p.add_argument("--layouts", default="per_sample,joint")
    p.add_argument("--max-steps", type=int, default=20000, help="for Naive and Anderson")
    p.add_argument("--tune", action="store_true", help="time Multigrid variants at 128x128")
    p.add_argument("--harmonic-rtols", default="1e-5", help="rtols for the control")
    p.add_argument("--harmonic-layouts", default="per_sample", help="layouts for the control")
    p.add_argument("--models", default="", help="trained,harmonic (default: both)")
    p.add_argument("--only", default="", help="with --tune: these TUNE entries (comma list)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = args.out or os.path.join(
        "benchmarks", "results", "solvers_field_tune.json" if args.tune else "solvers_field.json"
    )
    rtols = [float(r) for r in args.rtols.split(",")]
    grids = [int(g) for g in args.grids.split(",")]
    layouts = args.layouts.split(",")
    trained = ff.load_inpaint(args.checkpoint)
    meta = json.load(open(args.checkpoint + ".json"))
    models = {"trained": trained, "harmonic": harmonic_field(trained)}
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models.split(",")}
    results = dict(
        **provenance("benchmarks/solvers_field.py", sys.argv[1:]),
        checkpoint=os.path.basename(args.checkpoint),
        checkpoint_command=meta.get("command"),
        checkpoint_test=meta.get("test_after"),
        batch=args.batch,
        multigrid=MULTIGRID,
        rows=[],
    )

    def log(msg):
        print(msg, flush=True)

    def save():
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)

    if args.tune:
        grid = 128
        (x, m) = data([grid], args.batch, args.data_dir)[grid]
        for mname, model in models.items():
            variants = []
            interval = smoothing_interval(model)
            results.setdefault("smoothing_interval", {})[mname] = interval
            for name, solver in solvers(grid, {}, interval).items():
                if name != "multigrid":
                    for rtol in rtols:
                        row = dict(model=mname, grid=grid, layout="per_sample", solver=name)
                        fn = compile_run(model, x, m, "per_sample", solver, rtol, args.max_steps)
                        variants.append((dict(row, rtol=rtol), fn))
            for name, settings in TUNE.items():
                if args.only and name not in args.only.split(","):
                    continue
                solver = make_multigrid(grid, settings, interval)
                for rtol in rtols:
                    row = dict(model=mname, grid=grid, layout="per_sample", solver=name)
                    row.update(settings=settings, rtol=rtol)
                    fn = compile_run(model, x, m, "per_sample", solver, rtol, 300)
                    variants.append((row, fn))
            results["rows"] += finish(variants, time_variants(variants, args.repeats), x, m, log)
            save()
        print(f"wrote {out}")
        return

    sets = data([args.train_grid, *grids], args.batch, args.data_dir)
    wide = data([args.train_grid, *grids], args.restoration_batch, args.data_dir)
    results["restoration"] = []
    results["slow_mode"] = []
    results["smoothing_interval"] = {}
    for mname, model in models.items():
        interval = smoothing_interval(model)
        results["smoothing_interval"][mname] = interval
        log(f"{mname}: smoothing interval {interval}")
        for grid in [args.train_grid, *grids]:
            x, m = wide[grid]
            run = eqx.filter_jit(
                jax.vmap(lambda md, xi, mi: md(xi, mi, rtol=1e-5, max_steps=20000), (None, 0, 0))
            )
            restored, _ = run(model, x, m)
            fill = jnp.sum(x * m, (-2, -1), keepdims=True) / jnp.sum(m, (-2, -1), keepdims=True)
            results["restoration"].append(
                dict(
                    model=mname,
                    grid=grid,
                    hidden_mse=float(hidden_mse(restored, x, m)),
                    mean_fill_mse=float(hidden_mse(jnp.broadcast_to(fill, x.shape), x, m)),
                )
            )
            log(f"restoration: {results['restoration'][-1]}")
            results["slow_mode"].append(dict(model=mname, **slow_mode(model, x, m)))
            log(f"slow mode: {results['slow_mode'][-1]}")
        for grid in grids:
            x, m = sets[grid]
            variants = []
            control = mname == "harmonic"
            for layout in args.harmonic_layouts.split(",") if control else layouts:
                for name, solver in solvers(grid, MULTIGRID[mname], interval).items():
                    max_steps = 300 if name.startswith("multigrid") else args.max_steps
                    for rtol in (
                        [float(r) for r in args.harmonic_rtols.split(",")] if control else rtols
                    ):
                        row = dict(model=mname, grid=grid, layout=layout, solver=name, rtol=rtol)
                        if name.startswith("multigrid"):
                            row["levels"] = solver.levels
                        fn = compile_run(model, x, m, layout, solver, rtol, max_steps)
                        variants.append((row, fn))
            results["rows"] += finish(variants, time_variants(variants, args.repeats), x, m, log)
            results["summary"] = summary(results["rows"])
            results["goals"] = goals(results["summary"])
            save()
    for s in results["summary"]:
        log(
            f"{s['model']:9s} {s['grid']:4d} {s['layout']:10s} rtol={s['rtol']:g} {s['solver']}: "
            f"naive/mg evals x{s['naive_over_mg_evals']:.2f}, cpu vs naive "
            f"x{s['mg_cpu_vs_naive']:.2f}, vs anderson x{s['mg_cpu_vs_anderson']:.2f} "
            f"(wall x{s['mg_wall_vs_naive']:.2f}, x{s['mg_wall_vs_anderson']:.2f})"
        )
    log(f"goals: {json.dumps(results['goals'])}")
    print(f"wrote {out}")


def harmonic_field(model: ff.InpaintField) -> ff.InpaintField:
    """The control: `model`'s architecture at its noise-free diffusion initialisation (the
    image in every channel, kernel the binomial average, readout the channel mean): its fixed
    point fills each hole with the harmonic interpolation of the hole's edge, with no decay."""
    cfg = dict(channels=model.channels, alpha=float(model.cell.alpha()), init_noise=0.0)
    return ff.InpaintField(**cfg, key=jr.PRNGKey(0))


def summary(rows) -> list[dict]:
    """Multigrid against Naive and Anderson, same grid, layout and rtol."""
    key = lambda r: (r["model"], r["grid"], r["layout"], r["rtol"])  # noqa: E731
    by = {(key(r), r["solver"]): r for r in rows}
    out = []
    for r in rows:
        if not r["solver"].startswith("multigrid"):
            continue
        naive, anderson = by[(key(r), "naive")], by[(key(r), "anderson")]
        out.append(
            dict(
                solver=r["solver"],
                model=r["model"],
                grid=r["grid"],
                layout=r["layout"],
                rtol=r["rtol"],
                all_converged=min(naive["converged"], anderson["converged"], r["converged"]) == 1,
                naive_over_mg_evals=naive["evals"] / r["evals"],
                anderson_over_mg_evals=anderson["evals"] / r["evals"],
                mg_cpu_vs_naive=r["cpu_ms"] / naive["cpu_ms"],
                mg_cpu_vs_anderson=r["cpu_ms"] / anderson["cpu_ms"],
                mg_wall_vs_naive=r["ms"] / naive["ms"],
                mg_wall_vs_anderson=r["ms"] / anderson["ms"],
            )
        )
    return out


def goals(summary) -> dict:
    """The issue's goals on the trained model, over every layout and tolerance at the grids
    measured."""
    big = [
        s
        for s in summary
        if s["grid"] >= 128 and s["model"] == "trained" and s["solver"] == "multigrid"
    ]
    return {
        "mg_3x_less_work_than_naive_at_128_up": bool(big)
        and all(s["naive_over_mg_evals"] >= 3 for s in big),
        "mg_less_cpu_time_than_naive_and_anderson_at_128_up": bool(big)
        and all(s["mg_cpu_vs_naive"] < 1 and s["mg_cpu_vs_anderson"] < 1 for s in big),
        "mg_less_wall_time_than_naive_and_anderson_at_128_up": bool(big)
        and all(s["mg_wall_vs_naive"] < 1 and s["mg_wall_vs_anderson"] < 1 for s in big),
    }


if __name__ == "__main__":
    main()
