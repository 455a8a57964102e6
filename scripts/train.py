"""Train a fractal-field classifier.

    python scripts/train.py --config configs/mnist_nano.py --workdir runs/mnist_nano \
        [--data-dir DIR] [optim.lr=3e-3 epochs=10 ...]

Resumes automatically from `WORKDIR/checkpoints/last.eqx`, saved every
`checkpoint_every_steps` steps, every `checkpoint_every_secs` seconds, at the end of each
epoch and when stopped. Ctrl-C (SIGINT) or SIGTERM stops at the next step boundary after
saving it: exit code 130 after Ctrl-C, 0 after SIGTERM (the scheduler's or
`scripts/sweep.py`'s time limit). With `--distributed`, when a process is lost the others
stop within `--heartbeat-timeout` seconds, naming it (exit code 75); starting all processes
again resumes. The data comes from `--data-dir` (that directory only), or
from the places `fractal_field.data` searches ($FRACTAL_FIELD_DATA, ./data, ../shared/data),
then tensorflow_datasets. Set `JAX_COMPILATION_CACHE_DIR` to let a restart reuse the compiled
steps (`benchmarks/restart.py`). See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys

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
        help="multi-process training: start jax.distributed (the cluster is detected, or set "
        "--coordinator, --num-processes and --process-id)",
    )
    parser.add_argument("--coordinator", default=None, help="process 0's HOST:PORT")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument(
        "--init-timeout", type=float, default=300.0, help="seconds to wait for the coordinator"
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        help="seconds without a heartbeat after which a process counts as lost: the others "
        f"then stop, naming it (exit code {ff.EXIT_PROCESS_LOST})",
    )
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args = parser.parse_args(argv)
    if args.distributed:
        try:
            ff.initialize_distributed(
                args.coordinator,
                args.num_processes,
                args.process_id,
                timeout=args.init_timeout,
                heartbeat_timeout=args.heartbeat_timeout,
            )
        except (ConnectionError, TypeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    config = ff.load_config(args.config, args.overrides)
    if args.data_dir is not None:
        config.data.data_dir = args.data_dir
    workdir = args.workdir
    try:
        summary = ff.train(config, workdir, stop_after_steps=args.stop_after_steps)
    except KeyboardInterrupt:
        # Before training started (loading data, building the model), or a third Ctrl-C.
        print(f"Aborted; checkpoints in {workdir} (if any) are unchanged.", file=sys.stderr)
        return 130
    except (
        FileNotFoundError,
        ff.data.DataFormatError,
        ff.CheckpointError,
        ff.ConfigMismatchError,
    ) as e:
        # No data, a corrupt or incompatible checkpoint, processes that disagree: the message
        # says it all.
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = summary["state"]
    where = f"epoch {state['epoch']} step {state['step']}"
    best = state["best_acc"]
    best = f"best test acc {best:.4f}" if best >= 0 else "no evaluation yet"
    stopped = summary["stopped"]
    if stopped is None:
        print(f"done: {where}, {best}")
        return 0
    if stopped == "stop_after_steps":
        print(f"done: {where} (--stop-after-steps), {best}; run again to continue.")
        return 0
    print(f"stopped ({stopped}) at {where}, {best}; run the same command to resume.")
    return 130 if stopped == "SIGINT" else 0


if __name__ == "__main__":
    sys.exit(main())
