"""`ff.KroneckerNet`: depth levels vmapped over stacked layers vs one layer call at a time.

Base graph `a -> b -> c` with the skip `a -> c` (full lower-triangular 3x3), layers
`x + gelu(Linear(d, d) x)`, batch 64 (the network vmapped over it), float32. Per order `k`, merge
and evaluation (`vectorise=True`: one vmapped call per depth level; `False`: node by node):
`merge="untied"` is the order-`k` power with `3^k` distinct layers. Reported:
compile time (s) and median milliseconds (wall and process CPU time) of a jitted forward pass
and of a jitted gradient of a scalar loss with respect to the parameters.

Run: `python benchmarks/kron.py [--quick]`; writes `benchmarks/results/kron.json`.
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fractal_field as ff

A = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


class MLPLayer(eqx.Module):
    lin: eqx.nn.Linear

    def __init__(self, d, *, key):
        self.lin = eqx.nn.Linear(d, d, key=key)

    def __call__(self, x):
        return x + jax.nn.gelu(self.lin(x))


def _times_ms(fn, *args, repeats):
    """Median wall and process-CPU milliseconds per call (CPU time, summed over threads, is
    less disturbed by other processes on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def bench(order, merge, vectorise, d, batch, repeats):
    if merge == "untied":  # 3^order distinct layers on the order-th power, evaluated at order 1
        keys = jr.split(jr.PRNGKey(0), 3**order)
        net = ff.KroneckerNet(ff.kron_adjacency(A, order), [MLPLayer(d, key=k) for k in keys], 1)
        order = 1
    else:
        layers = [MLPLayer(d, key=k) for k in jr.split(jr.PRNGKey(0), 3)]
        net = ff.KroneckerNet(A, layers, merge=merge)
    x = jr.normal(jr.PRNGKey(1), (batch, d))

    @eqx.filter_jit
    def fwd(net, x):
        return jax.vmap(lambda u: net(u, order=order, vectorise=vectorise))(x)

    @eqx.filter_jit
    def grad(net, x):
        return eqx.filter_grad(lambda n: jnp.sum(fwd(n, x) ** 2))(net)

    out = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", grad)):
        t = time.perf_counter()
        jax.block_until_ready(fn(net, x))
        out[f"{name}_compile_s"] = time.perf_counter() - t
        out[f"{name}_ms"], out[f"{name}_cpu_ms"] = _times_ms(fn, net, x, repeats=repeats)
    plan = net.plan(order)
    out["layer_calls"] = int(len(net._pairs(order)[0]))
    out["levels"] = len(plan.levels)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, orders 1-2 only")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/kron.json")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    orders = (1, 2) if args.quick else (1, 2, 3)
    rows = []
    for order in orders:
        for merge in ("node", "output", "untied") if order > 1 else ("node",):
            for vectorise in (True, False):
                r = bench(order, merge, vectorise, args.d, args.batch, repeats)
                r.update(order=order, merge=merge, vectorise=vectorise)
                rows.append(r)
                print(json.dumps(r))
    result = {
        "what": "KroneckerNet forward and gradient: vmapped depth levels vs node by node",
        "units": "ms per batch (median wall, median process CPU), compile seconds",
        "d": args.d,
        "batch": args.batch,
        "repeats": repeats,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(["benchmarks/kron.py"] + sys.argv[1:]),
        "hardware": "2-core CPU",
        "jax": jax.__version__,
        "equinox": eqx.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "rows": rows,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
