"""Train a fractal-field classifier.

    python scripts/train.py --config configs/mnist_nano.py --workdir runs/mnist_nano \
        [--data-dir DIR] [optim.lr=3e-3 epochs=10 ...]

Resumes automatically from `WORKDIR/checkpoints/last.eqx`. The data directory comes from
`--data-dir` or the `FRACTAL_FIELD_DATA` environment variable (see `fractal_field.data`). Set
`JAX_COMPILATION_CACHE_DIR` to let a restart reuse the compiled steps (`benchmarks/restart.py`).
"""

from __future__ import annotations

import argparse

import fractal_field as ff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    parser.add_argument("--workdir", required=True, help="where logs and checkpoints go")
    parser.add_argument("--data-dir", default=None, help="data directory (or $FRACTAL_FIELD_DATA)")
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop (after checkpointing) at this global step",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() for multi-host training",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = parser.parse_args(argv)
    if args.distributed:
        import jax

        jax.distributed.initialize()
    config = ff.load_config(args.config, args.overrides)
    if args.data_dir is not None:
        config.data.data_dir = args.data_dir
    summary = ff.train(config, args.workdir, stop_after_steps=args.stop_after_steps)
    state = summary["state"]
    print(
        f"done: epoch {state['epoch']} step {state['step']} best test acc {state['best_acc']:.4f}"
    )


if __name__ == "__main__":
    main()
