"""The encoder's cost: convolution and pooling fused into one strided convolution, against the
two earlier ways of computing the same map.

- `fused`: `ff.Encoder.batched` (and, per image, `ff.Encoder`): the 3x3 convolution followed by
  `pool x pool` average pooling as one convolution of stride `pool` with the `(pool + 2)`-wide
  kernel the two compose to, on the whole batch;
- `full_resolution`: `vmap` of equinox's circular convolutions at full resolution, then mean
  pooling (the per-image path before);
- `channels_last`: the batch channels-last through `ff.toroidal_correlate` at full resolution,
  then pooling (the planar path before).

For the shipped MNIST Nano and CIFAR-10 models' encoders (the CIFAR-10 one with its 32-map
stem), on a batch of random images: forward, and forward plus the gradient with respect to the
encoder's parameters and its input. Medians of `--repeats` round-robin rounds, compile excluded.

Run `python benchmarks/encoder.py`; writes `benchmarks/results/encoder.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import fractal_field as ff
from fractal_field._provenance import provenance


def full_resolution(enc, x):
    def one(xi):
        h = jax.nn.relu(enc.stem(xi)) if enc.stem is not None else xi
        h = enc.conv(h)
        c, hh, ww = h.shape
        p = enc.pool
        return enc._to_field(h.reshape(c, hh // p, p, ww // p, p).mean((2, 4)), axis=0)

    return jax.vmap(one)(x)


def channels_last(enc, x):
    def corr(conv, h):
        kernel = jnp.transpose(conv.weight, (2, 3, 1, 0))[None]
        return ff.toroidal_correlate(h, kernel) + conv.bias.reshape(-1)

    h = jnp.transpose(x, (0, 2, 3, 1))
    if enc.stem is not None:
        h = jax.nn.relu(corr(enc.stem, h))
    h = corr(enc.conv, h)
    b, hh, ww, c = h.shape
    p = enc.pool
    h = h.reshape(b, hh // p, p, ww // p, p, c).mean((2, 4))
    return jnp.transpose(enc._to_field(h, axis=-1), (0, 3, 1, 2))


WAYS = {
    "fused": lambda enc, x: enc.batched(x),
    "full_resolution": full_resolution,
    "channels_last": channels_last,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "encoder.json"))
    args = p.parse_args()
    results = dict(**provenance("benchmarks/encoder.py"), batch=args.batch, rows=[])
    models = {
        "mnist_nano": ("checkpoints/mnist_nano.eqx", (1, 28, 28)),
        "cifar10_small": ("checkpoints/cifar10_small.eqx", (3, 32, 32)),
    }
    for name, (path, shape) in models.items():
        enc = ff.load_model(path).encoder
        x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *shape))
        ref = full_resolution(enc, x)
        fns = {}
        for way, f in WAYS.items():
            err = float(jnp.max(jnp.abs(f(enc, x) - ref)) / jnp.max(jnp.abs(ref)))

            def loss(e, x, f=f):
                return jnp.sum(jnp.abs(f(e, x)) ** 2)

            fwd = eqx.filter_jit(f)
            grad = eqx.filter_jit(eqx.filter_grad(loss))
            grad_x = eqx.filter_jit(jax.grad(loss, argnums=1))
            fns[way] = (err, fwd, lambda e, x, g=grad, gx=grad_x: (g(e, x), gx(e, x)))
        times = {(way, kind): [] for way in fns for kind in ("forward", "gradient")}
        for _, fwd, grad in fns.values():
            jax.block_until_ready(fwd(enc, x))
            jax.block_until_ready(grad(enc, x))
        for _ in range(args.repeats):
            for way, (_, fwd, grad) in fns.items():
                for kind, fn in (("forward", fwd), ("gradient", grad)):
                    t = time.perf_counter()
                    jax.block_until_ready(fn(enc, x))
                    times[(way, kind)].append(1e3 * (time.perf_counter() - t))
        for way, (err, _, _) in fns.items():
            row = dict(
                model=name,
                way=way,
                forward_ms=float(np.median(times[(way, "forward")])),
                gradient_ms=float(np.median(times[(way, "gradient")])),
                max_relative_difference=err,
            )
            results["rows"].append(row)
            print(
                f"{name:14s} {way:16s} forward {row['forward_ms']:8.1f} ms  gradient "
                f"{row['gradient_ms']:8.1f} ms  diff {err:.1e}",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
