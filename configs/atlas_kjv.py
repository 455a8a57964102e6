"""Fractal Atlas on the King James Bible: a master trained on 60 books, 6 held out.

python scripts/atlas.py train --config configs/atlas_kjv.py --workdir runs/atlas_kjv
python scripts/atlas.py train --config configs/atlas_kjv.py:smoke --workdir /tmp/atlas_smoke
"""

import ml_collections

# Books the master never sees: their keys are fitted with the master frozen.
HELDOUT = ["08_Ruth", "17_Esther", "32_Jonah", "48_Galatians", "59_James", "65_Jude"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="kjv", data_dir="../shared/data/text/kjv", heldout=HELDOUT)
    c.model = dict(
        context=16,
        embed_dim=12,
        width=256,
        octaves=8,
        grid_levels=8,
        table_size=1024,
        grid_features=2,
        key_size=48,
        steps=4,
        blocks=1,
        fixed_point=False,
    )
    c.batch_size = 256
    c.train_steps = 16000
    # Fraction of training contexts cut short (as at the start of a coded chunk).
    c.truncate = 0.05
    c.optim = dict(lr=3e-3, warmup=300, clip=1.0, final_lr_ratio=0.05)
    c.key_fit = dict(steps=400, batch_size=256, lr=2e-2)
    c.checkpoint_every_steps = 1000
    c.log_every = 100

    if variant == "smoke":
        c.data = dict(name="synthetic", books=3, length=3000, heldout=["02_Synthetic"])
        c.model = dict(
            c.model,
            context=4,
            embed_dim=4,
            width=16,
            grid_levels=2,
            table_size=16,
            key_size=4,
            steps=2,
        )
        c.batch_size = 32
        c.train_steps = 12
        c.key_fit = dict(steps=5, batch_size=32, lr=2e-2)
        c.checkpoint_every_steps = 4
        c.log_every = 4
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} (use '' or 'smoke').")
    return c
