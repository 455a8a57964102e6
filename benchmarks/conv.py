"""Direct vs spectral toroidal convolution, the way a DEQ uses it.

Batch 32, complex64, vmapped over the batch; per configuration and implementation:

- `loop_fwd`: 20 applications in a `lax.fori_loop` (operator built once outside the loop);
- `loop_fwd_bwd`: gradient of a scalar loss through those 20 applications (weight and input);
- `vjp_loop`: 20 input-vjps in a `fori_loop` (the implicit-backward linear solve);
- `fwd`, `fwd_bwd`: one standalone application (operator built inside).

All figures are milliseconds per application (medians after warm-up).

Real fields (`real_rows`, problem A of `benchmarks/peers.py`: float32, channels-last, batch 32,
`z <- tanh(conv(z) + x)`): `ff.toroidal_correlate` against the fastest plain-`lax`
formulation (wrap padding + NHWC `lax.conv_general_dilated`, with a `custom_vjp` whose
transpose is the same conv with the flipped kernel), same loop measurements.

Run: `python benchmarks/conv.py [--quick]`; writes `benchmarks/results/conv.json`.
"""

import argparse
import json
import pathlib
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from fractal_field._conv import ToroidalConv

N_LOOP = 20
BATCH = 32


def _median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _bench(conv, size, impl, repeats):
    h = w = size
    key = jax.random.PRNGKey(1)
    z = jax.random.normal(key, (BATCH, conv.in_channels, h, w), jnp.complex64)
    conv = eqx.tree_at(lambda c: c.weight, conv, conv.weight * 0.1)

    def loop(conv, z):
        op = conv.operator(h, w, impl=impl)
        body = lambda _, u: jax.vmap(op)(u) + z
        return jax.lax.fori_loop(0, N_LOOP, body, z)

    def loss_loop(conv, z):
        return jnp.sum(jnp.abs(loop(conv, z)) ** 2)

    def vjp_loop(conv, z):
        op = conv.operator(h, w, impl=impl)
        _, vjp = jax.vjp(jax.vmap(op), z)
        return jax.lax.fori_loop(0, N_LOOP, lambda _, u: vjp(u)[0] + z, z)

    def one(conv, z):
        return jax.vmap(lambda u: conv(u, impl=impl))(z)

    def loss_one(conv, z):
        return jnp.sum(jnp.abs(one(conv, z)) ** 2)

    grad_both = lambda f: eqx.filter_jit(jax.grad(f, argnums=(0, 1)))
    return {
        "loop_fwd": _median_ms(eqx.filter_jit(loop), conv, z, repeats=repeats) / N_LOOP,
        "loop_fwd_bwd": _median_ms(grad_both(loss_loop), conv, z, repeats=repeats) / N_LOOP,
        "vjp_loop": _median_ms(eqx.filter_jit(vjp_loop), conv, z, repeats=repeats) / N_LOOP,
        "fwd": _median_ms(eqx.filter_jit(one), conv, z, repeats=repeats),
        "fwd_bwd": _median_ms(grad_both(loss_one), conv, z, repeats=repeats),
    }


def _lax_conv():
    """Wrap padding + NHWC `lax.conv_general_dilated`, explicit fast transpose (peers.py's
    `nhwc-vjp`)."""

    def plain(z, k):
        zp = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
        return jax.lax.conv_general_dilated(
            zp, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    @jax.custom_vjp
    def conv(z, k):
        return plain(z, k)

    def fwd(z, k):
        return plain(z, k), (z, k)

    def bwd(res, ct):
        z, k = res
        ct_z = plain(ct, jnp.swapaxes(jnp.flip(k, (0, 1)), 2, 3))
        zp = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
        h, w = z.shape[1:3]
        taps = [
            jnp.einsum("nhwi,nhwo->io", zp[:, a : a + h, b : b + w], ct)
            for a in range(3)
            for b in range(3)
        ]
        return ct_z, jnp.stack(taps).reshape(k.shape)

    conv.defvjp(fwd, bwd)
    return conv


def _bench_real(size, c, impl, repeats):
    import fractal_field as ff

    key_z, key_k = jax.random.split(jax.random.PRNGKey(2))
    x = jax.random.normal(key_z, (BATCH, size, size, c), jnp.float32)
    k = 0.3 * jax.random.normal(key_k, (3, 3, c, c), jnp.float32) / (3 * np.sqrt(c))
    conv = _lax_conv() if impl == "lax" else (lambda z, k: ff.toroidal_correlate(z, k[None]))

    def loop(k, x):
        return jax.lax.fori_loop(0, N_LOOP, lambda _, z: jnp.tanh(conv(z, k) + x), x)

    def loss_loop(k, x):
        return jnp.sum(loop(k, x) ** 2)

    def vjp_loop(k, x):
        _, vjp = jax.vjp(lambda z: conv(z, k), x)
        return jax.lax.fori_loop(0, N_LOOP, lambda _, u: vjp(u)[0] + x, x)

    flops = 2 * BATCH * size * size * 9 * c * c
    fwd = _median_ms(jax.jit(loop), k, x, repeats=repeats) / N_LOOP
    return {
        "loop_fwd": fwd,
        "loop_fwd_bwd": _median_ms(jax.jit(jax.grad(loss_loop)), k, x, repeats=repeats) / N_LOOP,
        "vjp_loop": _median_ms(jax.jit(vjp_loop), k, x, repeats=repeats) / N_LOOP,
        "loop_fwd_gflops": flops / fwd / 1e6,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-direct-work", type=int, default=9 * 64 * 64, help="skip direct above taps*C^2"
    )
    args = parser.parse_args()
    real_rows = []
    for c in (16, 32) if args.quick else (16, 32, 64):
        for impl in ("lax", "toroidal_correlate"):
            res = _bench_real(28, c, impl, args.repeats)
            real_rows.append(dict(size=28, channels=c, impl=impl, **res))
            print(
                f"real 28x28 C={c:3d} {impl:18s} "
                + " ".join(f"{k}={v:8.2f}" for k, v in res.items()),
                flush=True,
            )
    _write([], real_rows)
    sizes = (28,) if args.quick else (28, 32)
    channels = (16, 32) if args.quick else (16, 32, 64)
    dilation_sets = ((1,), (1, 2, 4))
    rows = []
    for dilations in dilation_sets:
        for size in sizes:
            for c in channels:
                conv = ToroidalConv(c, c, 3, dilations, key=jax.random.PRNGKey(0))
                for impl in ("direct", "spectral"):
                    if impl == "direct" and len(dilations) * 9 * c * c > args.max_direct_work:
                        # Minutes per run on 2 CPU cores; spectral already wins >5x below this.
                        print(f"skip direct d={dilations} {size}x{size} C={c}", flush=True)
                        continue
                    res = _bench(conv, size, impl, args.repeats)
                    row = dict(dilations=list(dilations), size=size, channels=c, impl=impl, **res)
                    rows.append(row)
                    _write(rows, real_rows)
                    print(
                        f"k=3 d={dilations!s:9} {size}x{size} C={c:3d} {impl:8s} "
                        + " ".join(f"{k}={v:8.2f}" for k, v in res.items()),
                        flush=True,
                    )
    _table(rows, real_rows)


def _write(rows, real_rows):
    out = {
        "units": "ms per application, batch 32, complex64, median",
        "n_loop": N_LOOP,
        "batch": BATCH,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "rows": rows,
        "real_units": "ms per application, batch 32, float32, NHWC, median; GFLOP/s of loop_fwd",
        "real_rows": real_rows,
    }
    path = pathlib.Path(__file__).parent / "results" / "conv.json"
    path.parent.mkdir(exist_ok=True, parents=True)
    path.write_text(json.dumps(out, indent=2))


def _table(rows, real_rows):
    rk = ("loop_fwd", "loop_fwd_bwd", "vjp_loop", "loop_fwd_gflops")
    print("\n| real grid | C | impl | " + " | ".join(rk) + " |")
    print("|" + "---|" * (3 + len(rk)))
    for r in real_rows:
        cells = " | ".join(f"{r[k]:.1f}" for k in rk)
        print(f"| {r['size']} | {r['channels']} | {r['impl']} | {cells} |")
    keys = ("loop_fwd", "loop_fwd_bwd", "vjp_loop", "fwd", "fwd_bwd")
    print("\n| dilations | grid | C | impl | " + " | ".join(keys) + " |")
    print("|" + "---|" * (4 + len(keys)))
    for r in rows:
        d = ",".join(map(str, r["dilations"]))
        cells = " | ".join(f"{r[k]:.1f}" for k in keys)
        print(f"| ({d}) | {r['size']} | {r['channels']} | {r['impl']} | {cells} |")


if __name__ == "__main__":
    main()
