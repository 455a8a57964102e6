"""Train an inpainting fractal field (`ff.InpaintField`) and save it.

    python scripts/train_inpaint.py --config configs/inpaint_field.py \
        --out checkpoints/inpaint_field.eqx [--data-dir DIR] [steps=100 model.channels=8 ...]

A small dedicated loop (`ff.train_inpaint`: Adam on the squared error over the hidden pixels,
random box holes per step, implicit gradients), since `ff.train` is for classifiers. Images are
upsampled bilinearly to `data.grid`; the test split (with fixed masks) gives the hidden-pixel
error before and after training, and that of filling each hole with the mean known pixel.
Writes the weights to `--out` and the config, the loss history and the errors to `--out.json`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fractal_field as ff
from fractal_field._inpaint import box_masks, hidden_mse, make_inpaint, smooth_images, upsample
from fractal_field._provenance import provenance
from fractal_field.data import load_dataset


def load_images(data: dict, split: str, n: int, *, data_dir=None, seed: int = 0):
    """`n` images `(n, 1, grid, grid)` in `[0, 1]` from `data` (a config's `data` section)."""
    grid = data["grid"]
    if data["name"] == "smooth":
        return smooth_images(jr.PRNGKey(seed + (split == "test")), n, grid)
    ds = load_dataset(data["name"], split, data_dir=data_dir or data.get("data_dir"))
    ds = ds.subset(n, seed=seed)
    x = jnp.asarray(ds.images, jnp.float32).mean(-1)[:, None] / 255.0
    return upsample(x, grid)


def evaluate(model, images, masks, batch=64):
    """Hidden-pixel MSE of `model` and of the mean-fill baseline, and mean solver steps."""
    run = jax.jit(jax.vmap(lambda x, m: model(x, m)))
    errs, base, steps = [], [], []
    for i in range(0, len(images), batch):
        x, m = images[i : i + batch], masks[i : i + batch]
        restored, sol = run(x, m)
        fill = jnp.sum(x * m, (-2, -1), keepdims=True) / jnp.sum(m, (-2, -1), keepdims=True)
        w = float(jnp.sum(1 - m))
        errs.append(float(hidden_mse(restored, x, m)) * w)
        base.append(float(hidden_mse(jnp.broadcast_to(fill, x.shape), x, m)) * w)
        steps.append(np.asarray(sol.stats.num_steps))
    total = float(jnp.sum(1 - masks))
    return dict(
        hidden_mse=sum(errs) / total,
        mean_fill_mse=sum(base) / total,
        solver_steps=float(np.mean(np.concatenate(steps))),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="configs/inpaint_field.py[:variant]")
    p.add_argument("--out", required=True, help="weights file (config and history: OUT.json)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. steps=100")
    args = p.parse_args(argv)
    c = ff.load_config(args.config, args.overrides)
    key = jr.PRNGKey(c.seed)
    mkey, tkey, ekey = jr.split(key, 3)
    model = make_inpaint(c.model, c.solver, c.adjoint, key=mkey)
    train = load_images(c.data, "train", c.data.train_size, data_dir=args.data_dir, seed=c.seed)
    test = load_images(c.data, "test", c.data.test_size, data_dir=args.data_dir, seed=c.seed)
    grid = c.data.grid
    test_masks = box_masks(ekey, len(test), grid, c.data.boxes, tuple(c.data.box_size))
    before = evaluate(model, test, test_masks)
    print(f"before: {json.dumps(before)}", flush=True)
    t0 = time.time()
    model, history = ff.train_inpaint(
        model,
        train,
        steps=c.steps,
        batch_size=c.batch_size,
        lr=c.lr,
        boxes=c.data.boxes,
        box_size=tuple(c.data.box_size),
        key=tkey,
        log=lambda s: print(s, flush=True),
        log_every=c.log_every,
    )
    seconds = time.time() - t0
    after = evaluate(model, test, test_masks)
    print(f"after: {json.dumps(after)} ({seconds:.0f} s)", flush=True)
    ff.save_inpaint(
        args.out,
        model,
        c,
        **provenance("scripts/train_inpaint.py", argv),
        data=c.data.to_dict(),
        steps=c.steps,
        batch_size=c.batch_size,
        lr=c.lr,
        train_seconds=seconds,
        test_before=before,
        test_after=after,
        history=history,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
