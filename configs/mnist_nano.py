"""MNIST with the Nano field model (< 20,000 real parameters).

python scripts/train.py --config configs/mnist_nano.py --workdir runs/mnist_nano
python scripts/train.py --config configs/mnist_nano.py:smoke --workdir /tmp/smoke
python scripts/train.py --config configs/mnist_nano.py:real --workdir runs/mnist_nano_real
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        name="mnist",
        data_dir=None,
        source="auto",
        # Random shifts of up to 2 pixels (no flips: digits are not mirror-symmetric).
        augment=dict(padding=2, flip=False),
        train_size=0,
        test_size=0,
        # > 0: cut each split into that many shards (a multiple of the processes); each
        # process then loads only its own (`ff.data.ShardedDataset`).
        shards=0,
    )
    # `precision="bfloat16"`: mixed precision (the field's convolution on bfloat16 operands with
    # float32 accumulation; docs/training.md, "Mixed precision").
    c.model = dict(preset="nano", max_steps=25, rtol=1e-3, precision="float32")
    c.solver = dict(name="anderson", history=5)
    # Jacobian-free backprop: the cheap gradient mode, what fits an hour on a 2-core CPU.
    # `adjoint.name=implicit` trains with exact implicit gradients (about 2.5x slower per step).
    c.adjoint = dict(name="jfb")
    c.batch_size = 128
    c.eval_batch_size = 1000
    # The shipped checkpoint's recipe: 99.16% test (trained on an H100, ~25 s per epoch).
    c.epochs = 20
    c.optim = dict(lr=4e-3, warmup_epochs=0.3, weight_decay=1e-4, clip=1.0, final_lr_ratio=1e-2)
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
        c.data = dict(name="synthetic", image_size=8, train_size=256, test_size=128, shards=0)
        c.model = dict(preset="tiny", max_steps=15, rtol=1e-3)
        c.adjoint = dict(name="implicit", max_steps=15, rtol=1e-3, throw=False)
        c.batch_size = 32
        c.eval_batch_size = 64
        c.epochs = 2
        c.optim.lr = 5e-2
        c.checkpoint_every_steps = 4
        c.log_every = 4
    elif variant == "cpu_hour":
        # About an hour on a 2-core CPU: the batch solved as one problem in the planar layout
        # (1.4x faster training steps there, `benchmarks/batch_solve.py`) buys 12 epochs.
        # See docs/results.md for what it reached.
        c.model = dict(c.model, batch_solve="planar")
        c.epochs = 12
    elif variant == "real":
        # The real-valued twin (`field="real"`, docs/models.md): 38 real field channels,
        # 19,504 real parameters against the complex default's 19,190 (+1.6%;
        # `ff.equal_params_channels("nano")`).
        c.model = dict(c.model, field="real", channels=38)
    elif variant == "pyramid":
        # HRNet's classification head as MDEQ uses it (`ff.PyramidHead`, docs/models.md): a
        # bottleneck to 32 maps and 16 final maps, pooled to 4x4 like the default readout
        # (19,942 real parameters). MDEQ's global pooling (`model.readout_grid=1`) learns far
        # more slowly on this one-layer field (docs/models.md).
        c.model = dict(c.model, readout_pyramid=(8,), readout_final=16)
    elif variant in ("short_implicit", "short_reversible", "short_ep"):
        # The adjoint comparison of docs/gradients.md, sized for a busy 2-core CPU (at most
        # 20 minutes each): one epoch (46 steps of 64) on a random 3,000-image train subset,
        # tested on a random 1,000-image test subset.
        c.data = dict(c.data, train_size=3_000, test_size=1_000)
        c.batch_size = 64
        c.eval_batch_size = 500
        c.epochs = 1
        c.log_every = 5
        if variant == "short_implicit":
            c.adjoint = dict(name="implicit")
        elif variant == "short_reversible":
            # The unrelaxed cell (alpha = 1; the solver relaxes): with alpha = 0.5 the
            # backward reconstruction loses all float32 digits (docs/gradients.md).
            c.model = dict(c.model, alpha=1.0)
            c.solver = dict(name="reversible", beta=0.5)
            c.adjoint = dict(name="reversible")
        else:
            # Equilibrium propagation on the energy-based (Hermitian) Nano field.
            c.model = dict(c.model, symmetric=True, activation="phase_tanh")
            c.adjoint = dict(name="ep", beta=0.1, rtol=1e-4, throw=False)
    elif variant:
        raise ValueError(
            f"Unknown variant {variant!r} (use '', 'smoke', 'cpu_hour', 'real', 'pyramid', "
            "'short_implicit', 'short_reversible' or 'short_ep')."
        )
    return c
