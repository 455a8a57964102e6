"""Fixed-point solver benchmark: work, wall time and residual; memory of a training step.

Problem (chosen so that the slow modes are smooth, as in a diffusion-like field model): an
8-channel real field on an `N x N` torus and the map

    f(z) = tanh(conv3x3(z, W) + x),    W[o, c] = gain * M[o, c] * B,

with `B` the binomial 3x3 average `[1, 2, 1] x [1, 2, 1] / 16` (periodic, via `jnp.roll`, so
the map runs at any resolution), `M = 11^T / C + 0.3 P Q P` (`Q` random orthogonal, `P` the
projector off the channel mean) and `gain = 0.99`: operator norm of the linear part 0.99,
attained by the spatially constant channel mean. `x` is a smooth random field (Gaussian
low-pass at ~3 cycles per period, rms 0.02), so `|z*| <= ~0.4` and `tanh' >= ~0.85`.
The slowest error modes of plain iteration are the smooth channel-mean modes.

Solvers run from `z0 = 0` to `rtol` (relative residual, `atol=0`) under `jax.jit`; wall time
is the median of several runs after a warm-up (compile excluded). Multigrid work is in
fine-grid-equivalent evaluations. Memory: `jax.grad` of a loss through `ff.fixed_point`
(Naive, fixed `max_steps`, `throw=False`), measured with XLA's compiled memory analysis
(temp + argument + output bytes).

Scaling: grid sizes 32 to 256 (one solve each), batch sizes 1 to 64 at 64 x 64 (a `vmap`-ed
solve in which each sample stops on its own residual), and training-step memory as `max_steps`
grows, all in one results file.

Run `python benchmarks/solvers.py` (or `--quick`); writes `benchmarks/results/solvers.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fractal_field as ff
from fractal_field._solver.multigrid import Multigrid

CHANNELS = 8
GAIN = 0.99
AMPLITUDE = 0.02
RTOL = 1e-5


def conv3x3(z, w):
    """Periodic 3x3 convolution: `z (C, H, W)`, `w (C, C, 3, 3)`."""
    out = 0
    for i in range(3):
        for j in range(3):
            tap = jnp.roll(z, (1 - i, 1 - j), (-2, -1))
            out = out + jnp.einsum("oc,chw->ohw", w[:, :, i, j], tap)
    return out


def field_map(z, args):
    x, w = args
    return jnp.tanh(conv3x3(z, w) + x)


def make_weights(c=CHANNELS, gain=GAIN, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    p = np.eye(c) - np.ones((c, c)) / c
    mix = np.ones((c, c)) / c + 0.3 * p @ q @ p
    b = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16
    w = gain * mix[:, :, None, None] * b
    return jnp.asarray(w, jnp.float32), float(np.linalg.norm(gain * mix, 2))


def make_field(n, c=CHANNELS, amp=AMPLITUDE, seed=1):
    x = np.random.default_rng(seed).normal(size=(c, n, n))
    k2 = (np.fft.fftfreq(n)[:, None] * n) ** 2 + (np.fft.fftfreq(n)[None] * n) ** 2
    x = np.fft.ifft2(np.fft.fft2(x) * np.exp(-k2 / 8)).real
    return jnp.asarray(amp * x / np.std(x), jnp.float32)


def solvers():
    return {"naive": ff.Naive(), "anderson": ff.Anderson(), "multigrid": Multigrid()}


def _solve(solver, x, w, max_steps):
    """The benchmark's solve from `z0 = 0` to relative residual `RTOL`."""
    return ff.fixed_point(
        field_map,
        jnp.zeros_like(x),
        (x, w),
        solver=solver,
        max_steps=max_steps,
        rtol=RTOL,
        atol=0.0,
        throw=False,
    )


def bench_solver(name, solver, n, repeats, max_steps=5000):
    x = make_field(n)
    w, _ = make_weights()

    @jax.jit
    def solve(x, w):
        sol = _solve(solver, x, w, max_steps)
        return sol.value, sol.stats, sol.result._value

    t0 = time.perf_counter()
    jax.block_until_ready(solve(x, w))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value, stats, result = jax.block_until_ready(solve(x, w))
        times.append(time.perf_counter() - t0)
    fz = field_map(value, (x, w))
    residual = float(jnp.linalg.norm(fz - value) / jnp.linalg.norm(fz))
    return dict(
        solver=name,
        n=n,
        steps=int(stats.num_steps),
        fn_evals=float(stats.num_fn_evals),
        wall_s=statistics.median(times),
        first_call_s=compile_s,
        relative_residual=residual,
        converged=bool(int(result) == 0),
    )


def bench_batch(name, solver, n, batch, repeats, max_steps=5000):
    """One `vmap`-ed solve of `batch` different injections (each sample stops on its own)."""
    x = jnp.stack([make_field(n, seed=10 + i) for i in range(batch)])
    w, _ = make_weights()

    @jax.jit
    def solve(x, w):
        def one(xi):
            sol = _solve(solver, xi, w, max_steps)
            return sol.stats.num_steps, sol.result._value

        return jax.vmap(one)(x)

    jax.block_until_ready(solve(x, w))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        steps, result = jax.block_until_ready(solve(x, w))
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    return dict(
        solver=name,
        n=n,
        batch=batch,
        wall_s=wall,
        ms_per_sample=1e3 * wall / batch,
        mean_steps=float(jnp.mean(steps)),
        max_steps=int(jnp.max(steps)),
        converged=bool(jnp.all(result == 0)),
    )


def bench_memory(adjoint_name, max_steps, n=64):
    x = make_field(n)
    w, _ = make_weights()
    target = make_field(n, seed=3)
    adjoint = {"implicit": ff.ImplicitAdjoint(), "unrolled": ff.UnrolledAdjoint()}[adjoint_name]

    def loss(params):
        sol = ff.fixed_point(
            field_map,
            jnp.zeros_like(x),
            params,
            solver=ff.Naive(),
            adjoint=adjoint,
            max_steps=max_steps,
            rtol=1e-12,  # never stops early: every step is taken
            atol=0.0,
            throw=False,
        )
        return jnp.sum((sol.value - target) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower((x, w)).compile()
    m = compiled.memory_analysis()
    parts = dict(
        temp=m.temp_size_in_bytes,
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
    )
    return dict(adjoint=adjoint_name, max_steps=max_steps, n=n, bytes=sum(parts.values()), **parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, fewer repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    opts = parser.parse_args()
    sizes = [32, 64] if opts.quick else [32, 64, 128, 256]
    repeats = 2 if opts.quick else 5
    mem_steps = [10, 30] if opts.quick else [10, 30, 100]
    batches = [1, 4] if opts.quick else [1, 4, 16, 64]
    batch_n = 32 if opts.quick else 64
    _, norm = make_weights()

    rows = []
    print(f"f(z) = tanh(conv3x3(z) + x), C={CHANNELS}, ||W|| = {norm:.3f}, rtol={RTOL}")
    header = f"{'N':>5} {'solver':>10} {'steps':>6} {'fn evals':>9} {'vs naive':>9} "
    header += f"{'wall ms':>9} {'vs naive':>9} {'rel. resid':>11}"
    print(header)
    for n in sizes:
        base = None
        for name, solver in solvers().items():
            row = bench_solver(name, solver, n, repeats)
            base = base or row
            row["work_ratio_vs_naive"] = base["fn_evals"] / row["fn_evals"]
            row["time_ratio_vs_naive"] = base["wall_s"] / row["wall_s"]
            rows.append(row)
            print(
                f"{n:>5} {name:>10} {row['steps']:>6} {row['fn_evals']:>9.1f} "
                f"{row['work_ratio_vs_naive']:>8.2f}x {1e3 * row['wall_s']:>9.1f} "
                f"{row['time_ratio_vs_naive']:>8.2f}x {row['relative_residual']:>11.2e}"
                + ("" if row["converged"] else "  (not converged)"),
                flush=True,
            )

    print(f"\nBatch scaling (vmap, per-sample stopping), N={batch_n}:")
    print(f"{'batch':>5} {'solver':>10} {'wall ms':>9} {'ms/sample':>10} {'mean/max steps':>15}")
    batch_rows = []
    for b in batches:
        for name, solver in solvers().items():
            row = bench_batch(name, solver, batch_n, b, repeats)
            batch_rows.append(row)
            print(
                f"{b:>5} {name:>10} {1e3 * row['wall_s']:>9.1f} {row['ms_per_sample']:>10.2f} "
                f"{row['mean_steps']:>9.1f}/{row['max_steps']:<5}"
                + ("" if row["converged"] else "  (not converged)"),
                flush=True,
            )

    print("\nTraining-step memory (jax.grad through fixed_point, Naive, N=64), MiB:")
    print(f"{'max_steps':>9} {'implicit':>9} {'unrolled':>9}")
    memory = []
    for steps in mem_steps:
        pair = [bench_memory(a, steps) for a in ("implicit", "unrolled")]
        memory.extend(pair)
        print(f"{steps:>9} {pair[0]['bytes'] / 2**20:>9.2f} {pair[1]['bytes'] / 2**20:>9.2f}")
    implicit = [m["bytes"] for m in memory if m["adjoint"] == "implicit"]
    unrolled = [m["bytes"] for m in memory if m["adjoint"] == "unrolled"]

    def ratio(name, n):
        get = lambda s: next(r["fn_evals"] for r in rows if r["solver"] == s and r["n"] == n)
        return get("naive") / get(name)

    goals = {
        "anderson_2x_fewer_evals_all_sizes": all(ratio("anderson", n) >= 2 for n in sizes),
        "multigrid_3x_less_work_at_128": 128 in sizes and ratio("multigrid", 128) >= 3,
        "multigrid_more_at_256_than_128": 256 in sizes
        and ratio("multigrid", 256) > ratio("multigrid", 128),
        "implicit_memory_flat_within_10pct": max(implicit) <= 1.1 * min(implicit),
        "unrolled_memory_grows": unrolled[-1] > 1.5 * unrolled[0],
    }
    print("\nGoals:", json.dumps(goals, indent=1))
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "solvers.json")
    meta = dict(
        problem=__doc__.split("\n\n")[1],
        channels=CHANNELS,
        gain=GAIN,
        operator_norm=norm,
        injection_rms=AMPLITUDE,
        rtol=RTOL,
        quick=opts.quick,
        jax=jax.__version__,
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        load_average=os.getloadavg(),
    )
    with open(path, "w") as fh:
        json.dump(
            dict(meta=meta, solvers=rows, batch=batch_rows, memory=memory, goals=goals),
            fh,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
