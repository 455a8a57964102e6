"""Fractal Atlas kernel variants trained alike: T steps, sparse block updates, fixed point.

Each variant of `configs/atlas_kjv.py` trains a master for `--steps` steps on the config's
training books (same seed, batches and schedule), then is scored on the held-out books with
a zero key (teacher-forced bits/char, no coder) and timed: median training-step time and
inference characters/s (batches of 4096, median of three passes).

    python benchmarks/atlas_variants.py   # writes benchmarks/results/atlas_variants.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from batch_solve import write_results  # noqa: E402

import fractal_field as ff  # noqa: E402
from fractal_field import atlas  # noqa: E402

VARIANTS = {
    "T=1": ["model.steps=1"],
    "T=4": [],
    "T=8, 4 blocks (75% static)": ["model.steps=8", "model.blocks=4"],
    "fixed point (implicit gradients)": ["model.fixed_point=True"],
}


def _score(master, books, positions=20000, seed=0):
    corpus = atlas.Corpus(master.alphabet, books)
    ctx, xs, _, y = corpus.batch(np.random.default_rng(seed), positions, master.context)
    key = jnp.zeros((1, master.key_size))
    # The master is an argument, not a closed-over constant (XLA would constant-fold it).
    jitted = eqx.filter_jit(
        lambda m, c, x, y: atlas.bits_per_char(m, key, c, x, jnp.zeros_like(y), y)
    )

    def fn(c, x, y):
        return jitted(master, c, x, y)

    bits = float(
        np.mean(
            [
                fn(ctx[i : i + 4096], xs[i : i + 4096], y[i : i + 4096])
                for i in range(0, positions, 4096)
            ]
        )
    )
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, positions, 4096):
            fn(ctx[i : i + 4096], xs[i : i + 4096], y[i : i + 4096]).block_until_ready()
        times.append(time.perf_counter() - t)
    return bits, positions / float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/atlas_kjv.py")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--out", default=str(HERE / "results" / "atlas_variants.json"))
    args = p.parse_args(argv)
    rows = []
    for name in args.variants:
        config = ff.load_config(
            args.config,
            VARIANTS[name]
            + [f"train_steps={args.steps}", "checkpoint_every_steps=100000", "log_every=10"],
        )
        books = atlas.load_books(args.data_dir or config.data.data_dir)
        held = {k: v for k, v in books.items() if k in set(config.data.heldout)}
        train = {k: v for k, v in books.items() if k not in held}
        with tempfile.TemporaryDirectory() as wd:
            t = time.perf_counter()
            out = atlas.train_master(config, wd, train, progress=False)
            total = time.perf_counter() - t
            logs = [json.loads(r) for r in (Path(wd) / "metrics.jsonl").read_text().splitlines()]
        bits, cps = _score(out["master"], held)
        row = dict(
            variant=name,
            overrides=VARIANTS[name],
            train_steps=args.steps,
            train_time_s=total,
            median_step_time_s=float(np.median([r["step_time"] for r in logs[1:]])),
            train_bpc_last_10_logs=float(np.mean([r["bpc"] for r in logs[-10:]])),
            heldout_bits_per_char_zero_key=bits,
            inference_chars_per_s=cps,
        )
        rows.append(row)
        print(row, flush=True)
    write_results(
        args.out,
        date=str(datetime.date.today()),
        command="python benchmarks/atlas_variants.py " + " ".join(argv or sys.argv[1:]),
        hardware="2-core CPU (shared with other jobs)",
        rows=rows,
    )


if __name__ == "__main__":
    main()
