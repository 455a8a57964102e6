"""Inpainting field: MNIST digits upsampled to 32x32 with two large box holes, filled by the
fixed point of a 4-channel fractal field (`ff.InpaintField`), trained with implicit gradients.

python scripts/train_inpaint.py --config configs/inpaint_field.py \
    --out checkpoints/inpaint_field.eqx --data-dir ../shared/data
python scripts/train_inpaint.py --config configs/inpaint_field.py:smoke --out /tmp/inpaint.eqx
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # `name`: "mnist" (upsampled from 28x28) or "smooth" (random low-pass images, no files).
    c.data = dict(
        name="mnist",
        data_dir=None,
        grid=32,
        train_size=4096,
        test_size=256,
        boxes=2,
        box_size=(0.25, 0.5),
    )
    c.model = dict(
        channels=4,
        gamma=1.0,
        alpha=0.5,
        activation="modrelu",
        norm_grid=(32, 32),
        diffusion_init=True,
        init_noise=0.1,
        max_steps=200,
        rtol=1e-4,
    )
    c.solver = dict(name="anderson", history=5)
    c.adjoint = dict(name="implicit", max_steps=200, rtol=1e-4, throw=False)
    c.steps = 200
    c.batch_size = 32
    c.lr = 1e-2
    c.log_every = 10
    if variant == "smoke":
        c.data = dict(c.data, name="smooth", grid=16, train_size=64, test_size=16)
        c.model = dict(c.model, channels=2, norm_grid=(16, 16), max_steps=60, rtol=1e-3)
        c.adjoint = dict(c.adjoint, max_steps=60, rtol=1e-3)
        c.steps = 8
        c.batch_size = 8
        c.lr = 3e-3
        c.log_every = 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r}: use '' or 'smoke'.")
    return c
