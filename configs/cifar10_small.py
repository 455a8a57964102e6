"""CIFAR-10 with the small field model (<= 170,000 real parameters).

python scripts/train.py --config configs/cifar10_small.py --workdir runs/cifar10_small
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        name="cifar10",
        data_dir=None,
        source="auto",
        augment=False,
        train_size=0,
        test_size=0,
        # > 0: cut each split into that many shards (a multiple of the processes); each
        # process then loads only its own (`ff.data.ShardedDataset`).
        shards=0,
    )
    # The `cifar_small` preset (64 complex field channels, 3x3 kernel, 4x4 readout with phase
    # features) with a 32-map ReLU stem in the encoder (142,410 real parameters), the batch
    # solved as one problem in the planar layout. The 71.1% H100 run in docs/results.md predates the
    # stem and the planar solve: `model.stem=0 model.batch_solve=per_sample model.channels=80`.
    # `model.precision=bfloat16`: mixed precision (docs/training.md, "Mixed precision").
    c.model = dict(
        preset="cifar_small",
        stem=32,
        batch_solve="planar",
        max_steps=30,
        rtol=1e-3,
        precision="float32",
    )
    c.solver = dict(name="anderson", history=5)
    c.adjoint = dict(name="implicit", max_steps=30, rtol=1e-3, throw=False)
    c.batch_size = 128
    c.eval_batch_size = 500
    c.epochs = 40
    c.optim = dict(lr=3e-3, warmup_epochs=1.0, weight_decay=5e-4, clip=1.0, final_lr_ratio=1e-2)
    c.checkpoint_every_steps = 200
    # Also save `last` every 5 minutes of training (0: only by steps, epochs and stops).
    c.checkpoint_every_secs = 300.0
    c.log_every = 50
    # > 0: add that multiple of the Jacobian penalty (`FieldClassifier.jacobian_penalty`).
    c.jacobian_penalty = 0.0
    # > 0: cross-entropy against targets smoothed by this much (`optax.smooth_labels`).
    c.label_smoothing = 0.0
    # > 0: evaluate and keep a moving average of the parameters with this decay (e.g. 0.999).
    c.ema = 0.0
    # > 0: the first that many steps train the cell iterated `pretrain_unroll` times from zero,
    # backpropagated through (MDEQ pretrains 3,000 steps unrolled 10 times), then the solver.
    c.pretrain_steps = 0
    c.pretrain_unroll = 10
    # > 0: every that many steps, log per-segment gradient norms and the loss to
    # `fractal.jsonl` in the workdir (`ff.fractal.log_phase_flow`; a phase-flow probe).
    c.fractal_probe_every = 0

    if variant == "smoke":
        c.data = dict(name="synthetic", image_size=8, train_size=128, test_size=64, shards=0)
        c.model = dict(preset="tiny", stem=4, batch_solve="planar", max_steps=10, rtol=1e-3)
        c.batch_size = 32
        c.epochs = 1
        c.checkpoint_every_steps = 2
    elif variant == "multiscale":
        # Three coupled tori (16x16, 8x8, 4x4), 40 complex channels each (154,946 real
        # parameters): `ff.MultiScaleCell`. See docs/results.md for how it compares.
        c.model = dict(c.model, scales=3, channels=40)
    elif variant == "expanded":
        # An expanded cell (`FractalCell(hidden=...)`, MDEQ's widen-activate-project block): 32
        # complex field channels widened to 96 through a CReLU at every step (145,386 real
        # parameters). See docs/results.md for how it compares.
        c.model = dict(c.model, channels=32, hidden=96, hidden_activation="crelu")
    elif variant == "mdeq":
        # MDEQ-small's ingredients in the complex toroidal form (Bai, Koltun & Kolter 2020,
        # `cls_mdeq_TINY.yaml`): an expanded, group-normalised, weight-normalised cell
        # (32 -> 96 -> 32 complex channels, CReLU), variational dropout 0.25 inside the
        # equilibrium, HRNet's classification head (`ff.PyramidHead`: a bottleneck to 64 maps,
        # 200 final maps, global pooling), 3,000 steps of unrolled pretraining (10
        # iterations), Adam at lr 1e-3 decayed by cosine to 1e-6, 50 epochs, no augmentation
        # (156,978 real parameters). Not yet run at full length.
        c.model = dict(
            c.model,
            channels=32,
            hidden=96,
            hidden_activation="crelu",
            norm_groups=4,
            weight_norm=True,
            field_dropout=0.25,
            readout_pyramid=(16,),
            readout_final=200,
            readout_grid=1,
        )
        c.pretrain_steps = 3000
        c.pretrain_unroll = 10
        c.epochs = 50
        c.optim = dict(c.optim, lr=1e-3, final_lr_ratio=1e-3)
    elif variant == "real":
        # The real-valued twin (`field="real"`, docs/models.md): 96 real field channels with
        # the same stem and readout, 142,410 real parameters, exactly the complex default's
        # (`ff.equal_params_channels(config.model)`). Solved per sample: the planar layout
        # carries complex fields.
        c.model = dict(c.model, field="real", channels=96, batch_solve="per_sample")
    elif variant == "cpu_short":
        # About an hour on a 2-core CPU: a training step takes ~3.7 s there (planar batch
        # solve, stem), ~25 min per epoch with its evaluation; docs/results.md has what it
        # reached.
        c.epochs = 2
    elif variant:
        raise ValueError(
            f"Unknown variant {variant!r} (use '', 'smoke', 'multiscale', 'expanded', 'mdeq', "
            "'real' or 'cpu_short')."
        )
    return c
