"""An ordinary CNN of the MNIST Nano model's size, trained with the same optimiser, schedule,
augmentation and data code, and measured like `scripts/fractal_report.py` measures the field.

    python scripts/fractal_cnn_baseline.py [--config configs/mnist_nano.py] [--epochs 2]
        [--data-dir ../shared/data] [--per-class 10]
        [--json benchmarks/results/fractal_cnn.json]

The CNN: 3x3 convolution to 28 maps (circular padding) and ReLU, 2x2 average pooling to 14x14,
two 3x3 convolutions 28 -> 28 with ReLU (the last one's output `h` plays the part of the field
`|z*|`), average pooling to 4x4, linear readout: 18,938 parameters against the Nano model's
19,190. Each 28 -> 28 kernel is a `(28, 252)` grid under `ff.fractal.as_matrix`, the shape of the
cell kernel `K`. Reports test accuracy, `D` of the weights (against shuffled entries) and of `h`
per channel and per class (occupied above the channel's mean), as the report does for `|z*|`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import fractal_field as ff
from fractal_field import fractal
from fractal_field._model import _pool_matrix
from fractal_field._provenance import provenance
from fractal_field._train import augment_options, build_optimizer, load_data
from fractal_field.data import augment

ROOT = Path(__file__).resolve().parents[1]


class PlainCNN(eqx.Module):
    """Image `(1, 28, 28)` -> logits; `features` gives the last `(28, 14, 14)` maps."""

    convs: tuple[eqx.nn.Conv2d, ...]
    linear: eqx.nn.Linear

    def __init__(self, channels: int = 28, *, key):
        k = jr.split(key, 4)
        conv = lambda cin, kk: eqx.nn.Conv2d(  # noqa: E731
            cin, channels, 3, padding=1, padding_mode="CIRCULAR", key=kk
        )
        self.convs = (conv(1, k[0]), conv(channels, k[1]), conv(channels, k[2]))
        self.linear = eqx.nn.Linear(channels * 16, 10, key=k[3])

    def features(self, x):
        h = jax.nn.relu(self.convs[0](x))
        c, hh, ww = h.shape
        h = h.reshape(c, hh // 2, 2, ww // 2, 2).mean((2, 4))
        for conv in self.convs[1:]:
            h = jax.nn.relu(conv(h))
        return h

    def __call__(self, x):
        h = self.features(x)
        # Average pooling to 4x4 near-equal bins, as the field model's readout pools |z*|.
        ph, pw = (jnp.asarray(_pool_matrix(n, 4)) for n in h.shape[1:])
        pooled = jnp.einsum("ih,chw,jw->cij", ph, h, pw)
        return self.linear(pooled.reshape(-1))


@eqx.filter_jit
def _features(model, x):
    return jax.vmap(model.features)(x)


def _nan(v) -> float | None:
    v = float(v)
    return round(v, 4) if math.isfinite(v) else None


def field_dimension(f) -> float:
    try:
        return fractal.box_counting_dimension(f, threshold="mean").dimension
    except ValueError:
        return math.nan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist_nano.py"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--null-draws", type=int, default=20)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fractal_cnn.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", "Mean of empty slice")
    t0 = time.time()

    config = ff.load_config(args.config, [f"epochs={args.epochs}"])
    if args.data_dir:
        config.data.data_dir = args.data_dir
    train_ds, test_ds = load_data(config, "train"), load_data(config, "test")
    bs = config.batch_size
    steps_per_epoch = train_ds.num_batches(bs)
    optimizer, _ = build_optimizer(config, steps_per_epoch)
    model = PlainCNN(key=jr.PRNGKey(config.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    aug = augment_options(config.data.get("augment", False))

    @eqx.filter_jit
    def step(key, model, opt_state, x, y):
        if aug is not None:
            x = augment(key, x, **aug)

        def loss_fn(m):
            logits = jax.vmap(m)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    @eqx.filter_jit
    def correct(model, x, y):
        return jnp.sum(jnp.argmax(jax.vmap(model)(x), -1) == y)

    key = jr.PRNGKey(config.seed + 1)
    losses = []
    for epoch in range(args.epochs):
        for i, (images, labels) in enumerate(train_ds.batches(bs, seed=config.seed, epoch=epoch)):
            x = jnp.asarray(train_ds.normalize(images))
            key, sub = jr.split(key)
            model, opt_state, loss = step(sub, model, opt_state, x, jnp.asarray(labels))
            if i % 50 == 0:
                losses.append(float(loss))
                print(f"epoch {epoch} step {i} loss {float(loss):.4f}", flush=True)
    n_correct = 0
    for images, labels in test_ds.batches(1000, seed=0, epoch=0, shuffle=False, drop_last=False):
        x = jnp.asarray(test_ds.normalize(images))
        n_correct += int(correct(model, x, jnp.asarray(labels)))
    acc = n_correct / len(test_ds)
    print(f"test accuracy {acc:.4f}")

    rng = np.random.default_rng(0)
    weights = {}
    for i, conv in enumerate(model.convs):
        m = fractal.as_matrix(np.asarray(conv.weight))
        if min(m.shape) < 4:
            continue
        d = fractal.box_counting_dimension(m, threshold="mean").D
        shuffled = [
            fractal.box_counting_dimension(
                rng.permutation(m.ravel()).reshape(m.shape), threshold="mean"
            ).D
            for _ in range(args.null_draws)
        ]
        dsi = fractal.scale_invariance(m, r0=4, lam=2, num=3, tol=0.1)
        weights[f"conv{i}"] = dict(
            shape=list(m.shape),
            D=_nan(d),
            shuffled_D_mean=_nan(np.mean(shuffled)),
            shuffled_D_std=_nan(np.std(shuffled)),
            dsi_D=[_nan(v) for v in dsi.dimensions],
            dsi_spread=_nan(dsi.spread),
            dsi_holds=dsi.holds,
        )

    idx = np.concatenate([np.flatnonzero(test_ds.labels == c)[: args.per_class] for c in range(10)])
    x = jnp.asarray(test_ds.normalize(test_ds.images[idx]))
    labels = np.asarray(test_ds.labels[idx])
    h = np.asarray(_features(model, x))
    d = np.array([[field_dimension(c) for c in img] for img in h])
    maps = dict(
        mean=_nan(np.nanmean(d)),
        std_over_images=_nan(np.nanstd(np.nanmean(d, 1))),
        per_channel=[_nan(v) for v in np.nanmean(d, 0)],
        per_class={int(c): _nan(np.nanmean(d[labels == c])) for c in range(10)},
        constant_maps=int(np.isnan(d).sum()),
        n_maps=int(d.size),
        occupied_fraction=_nan(np.mean(h > h.mean((2, 3), keepdims=True))),
    )
    out = dict(
        **provenance("scripts/fractal_cnn_baseline.py", argv),
        params=int(n_params),
        epochs=args.epochs,
        steps=args.epochs * steps_per_epoch,
        test_accuracy=acc,
        train_loss_every_50_steps=[round(v, 4) for v in losses],
        weights=weights,
        feature_maps=maps,
        images=int(len(idx)),
        seconds=round(time.time() - t0, 1),
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("train_loss_every_50_steps",)}))


if __name__ == "__main__":
    main()
