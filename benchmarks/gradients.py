"""Reversible solves and equilibrium propagation against the exact gradients.

Problems (each one field, unbatched, under `jax.jit`):

- Reversible: a Nano-like `ff.FractalCell` (8 complex channels, 3x3 kernel, modReLU,
  `gamma = 0.9`) on a 14 x 14 torus with a random injection, solved from zero by
  `ff.Reversible(beta=0.5)` to `rtol`; loss `sum(w |z*|^2)` with random weights `w`. The
  reference is `ff.UnrolledAdjoint` of the same iteration (the exact derivative of what was
  computed, in the same precision); we compare `ff.ReversibleAdjoint` and
  `ff.ImplicitAdjoint` (backward solve to 1e-10 in float64, 1e-6 in float32) with it, for the
  cell unrelaxed (`alpha = 1`) and relaxed (`alpha = 0.5`). Errors are relative 2-norms over
  all parameter and injection gradients. `recon` is the reversible backward pass's
  reconstruction error of `z0` relative to `||z_n||` (the `stats_probe`).
- Memory: XLA's compiled memory analysis (temp bytes) of the gradient as `max_steps` grows
  (`rtol = 0`: every step is taken), float32, and the median wall time of a gradient at
  `rtol = 1e-3`.
- Equilibrium propagation: an `ff.SymmetricCell` (8 channels, phase_tanh) on 14 x 14 in
  float64 solved to 1e-13; relative error of `ff.EquilibriumPropagation` against
  `ff.ImplicitAdjoint` as `beta` shrinks, two-sided and one-sided.

Run `python benchmarks/gradients.py`; writes `benchmarks/results/gradients.json` and the
figure `docs/gradients.png` (`--plot-only` redraws the figure from the results file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fractal_field as ff

C, N = 8, 14


def _cast(tree, dtype):
    cdtype = jnp.complex128 if dtype == jnp.float64 else jnp.complex64

    def cast(x):
        if not eqx.is_inexact_array(x):
            return x
        return x.astype(cdtype if jnp.iscomplexobj(x) else dtype)

    return jax.tree.map(cast, tree)


def _injection(dtype):
    k1, k2 = jr.split(jr.PRNGKey(1))
    inj = 0.5 * (jr.normal(k1, (C, N, N)) + 1j * jr.normal(k2, (C, N, N)))
    return _cast(inj, dtype)


def _weights(dtype):
    return jr.uniform(jr.PRNGKey(2), (C, N, N), dtype)


def _flat(tree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.concatenate([jnp.ravel(x).astype(jnp.complex128) for x in leaves])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _fractal_loss(adjoint, rtol, max_steps, w, atol=0.0):
    def loss(cell, inj, probe):
        fn = cell.bind(N, N) if isinstance(cell, ff.SymmetricCell) else None
        if fn is None:
            op = cell.operator(N, N)

            def fn(z, x):
                return cell.step_with(op, z, x)

        sol = ff.fixed_point(
            fn,
            jnp.zeros_like(inj),
            inj,
            solver=ff.Reversible(0.5) if not isinstance(cell, ff.SymmetricCell) else ff.Naive(),
            adjoint=adjoint,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
            throw=False,
            stats_probe=probe,
        )
        return jnp.sum(w * jnp.abs(sol.value) ** 2), sol.stats.num_steps

    return loss


def reversible_errors():
    rows = []
    settings = ((jnp.float64, (1e-3, 1e-6), 1e-10), (jnp.float32, (1e-2, 1e-3), 1e-6))
    for dtype, rtols, brtol in settings:
        inj, w = _injection(dtype), _weights(dtype)
        for alpha in (1.0, 0.5):
            cell = ff.FractalCell(C, norm_grid=(N, N), alpha=alpha, key=jr.PRNGKey(0))
            cell = _cast(cell, dtype)
            for rtol in rtols:
                grads = {}
                adjoints = dict(
                    unrolled=ff.UnrolledAdjoint(),
                    reversible=ff.ReversibleAdjoint(),
                    implicit=ff.ImplicitAdjoint(max_steps=400, rtol=brtol, atol=0.0, throw=False),
                )
                for name, adj in adjoints.items():
                    loss = _fractal_loss(adj, rtol, 200, w)
                    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
                    grads[name] = g(cell, inj, ff.backward_stats_probe())
                (g_ref, steps) = grads["unrolled"]
                row = dict(
                    dtype=jnp.dtype(dtype).name,
                    alpha=alpha,
                    rtol=rtol,
                    steps=int(steps),
                    reversible_error=_rel(grads["reversible"][0][:2], g_ref[:2]),
                    implicit_error=_rel(grads["implicit"][0][:2], g_ref[:2]),
                    reconstruction_error=float(grads["reversible"][0][2][1]),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def memory_and_time():
    dtype = jnp.float32
    inj, w = _injection(dtype), _weights(dtype)
    cell = ff.FractalCell(C, norm_grid=(N, N), alpha=1.0, key=jr.PRNGKey(0))
    adjoints = dict(
        reversible=ff.ReversibleAdjoint(),
        unrolled=ff.UnrolledAdjoint(),
        implicit=ff.ImplicitAdjoint(),
    )
    memory, timing = [], []
    for name, adj in adjoints.items():
        for steps in (10, 30, 100, 300):
            loss = _fractal_loss(adj, 0.0, steps, w)
            grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
            m = grad.lower(cell, inj, None).compile().memory_analysis()
            memory.append(dict(adjoint=name, max_steps=steps, temp_bytes=m.temp_size_in_bytes))
            print(json.dumps(memory[-1]), flush=True)
        loss = _fractal_loss(adj, 1e-3, 100, w)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        (_, steps) = jax.block_until_ready(grad(cell, inj, None))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(grad(cell, inj, None))
            times.append(time.perf_counter() - t)
        timing.append(
            dict(adjoint=name, rtol=1e-3, steps=int(steps), grad_ms=1e3 * statistics.median(times))
        )
        print(json.dumps(timing[-1]), flush=True)
    return memory, timing


def ep_errors():
    dtype = jnp.float64
    inj, w = _injection(dtype), _weights(dtype)
    cell = ff.SymmetricCell(
        C, activation="phase_tanh", norm_grid=(N, N), dtype=jnp.complex128, key=jr.PRNGKey(0)
    )
    tol = dict(max_steps=1000, rtol=0.0, atol=1e-13)
    implicit = ff.ImplicitAdjoint(solver=ff.Naive(), **tol)
    ref, steps = jax.jit(jax.grad(_fractal_loss(implicit, 0.0, 1000, w, 1e-13), (0, 1), True))(
        cell, inj, None
    )
    rows = []
    for symmetric in (True, False):
        for beta in (0.2, 0.1, 0.05, 0.025, 0.0125):
            adj = ff.EquilibriumPropagation(beta=beta, symmetric=symmetric, rtol=0.0, atol=1e-13)
            loss = _fractal_loss(adj, 0.0, 1000, w, 1e-13)
            g, _ = jax.jit(jax.grad(loss, (0, 1, 2), True))(cell, inj, ff.backward_stats_probe())
            rows.append(
                dict(
                    symmetric=symmetric,
                    beta=beta,
                    error=_rel(g[:2], ref),
                    free_steps=int(steps),
                    nudged_steps=int(g[2][0]),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(results: dict, path: str) -> None:
    """Gradient errors against the tolerance, memory against the steps, EP against beta."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for row_kind, marker in (("reversible_error", "o"), ("implicit_error", "s")):
        for dtype, alpha, style in (("float64", 1.0, "-"), ("float32", 1.0, "--")):
            rows = [r for r in results["reversible"] if r["dtype"] == dtype and r["alpha"] == alpha]
            ax.loglog(
                [r["rtol"] for r in rows],
                [r[row_kind] for r in rows],
                style,
                marker=marker,
                label=f"{row_kind.split('_')[0]}, {dtype}",
            )
    ax.set_xlabel("forward rtol (Reversible(0.5), cell alpha = 1)")
    ax.set_ylabel("relative error vs unrolled gradient")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in ("reversible", "unrolled", "implicit"):
        rows = [r for r in results["memory"] if r["adjoint"] == name]
        ax.loglog([r["max_steps"] for r in rows], [r["temp_bytes"] for r in rows], "o-", label=name)
    ax.set_xlabel("max_steps (all taken)")
    ax.set_ylabel("gradient temp bytes (XLA)")
    ax.legend(fontsize=7)
    ax = axes[2]
    for symmetric in (True, False):
        rows = [r for r in results["ep"] if r["symmetric"] == symmetric]
        label = "two-sided" if symmetric else "one-sided"
        ax.loglog([r["beta"] for r in rows], [r["error"] for r in rows], "o-", label=label)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("EP beta (SymmetricCell, float64)")
    ax.set_ylabel("relative error vs implicit gradient")
    ax.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(
        f"{meta['date']}, {meta['hardware']}, jax {meta['jax']}: `{meta['command']}`", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure only")
    opts = parser.parse_args()
    figure = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    figure = os.path.join(figure, "gradients.png")
    if opts.plot_only:
        with open(os.path.join(opts.out, "gradients.json")) as fh:
            plot(json.load(fh), figure)
        return
    with jax.enable_x64(True):
        errors = reversible_errors()
        ep = ep_errors()
    memory, timing = memory_and_time()
    meta = dict(
        date=datetime.date.today().isoformat(),
        command="python benchmarks/gradients.py",
        hardware="2-core CPU (shared with other jobs)",
        problem="\n\n".join(__doc__.split("\n\n")[1:-1]),
        jax=jax.__version__,
        equinox=eqx.__version__,
        numpy=np.__version__,
        python=sys.version.split()[0],
        fractal_field=ff.__version__,
        backend=jax.default_backend(),
        machine=platform.machine(),
        load_average=os.getloadavg(),
    )
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "gradients.json")
    results = dict(meta=meta, reversible=errors, memory=memory, timing=timing, ep=ep)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {path}")
    plot(results, figure)


if __name__ == "__main__":
    main()
