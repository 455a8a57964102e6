"""What each input of a trained Atlas master contributes: context, coordinate, key.

Teacher-forced bits/char (float model, no coder) of the held-out books with their fitted keys,
then with one input taken away: the coordinate replaced by a random one, the key set to zero,
or the context replaced by padding (coordinate and key only: the field alone).

    python benchmarks/atlas_inputs.py --workdir runs/atlas_kjv
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from batch_solve import write_results  # noqa: E402

import fractal_field as ff  # noqa: E402
from fractal_field import atlas  # noqa: E402


@eqx.filter_jit
def _bits(master, key, ctx, xs, ids):
    logp = jax.nn.log_softmax(jax.vmap(master, in_axes=(0, 0, None))(ctx, xs, key))
    return -jnp.take_along_axis(logp, ids[:, None], 1)[:, 0] / jnp.log(2.0)


def _score(master, key, data, *, coordinate="true", context=True, seed=0):
    ids = atlas.to_ids(master.alphabet, data)
    n, c = len(ids), master.context
    padded = np.concatenate([np.full(c, master.pad, np.int32), ids])
    ctx = padded[np.arange(n)[:, None] + np.arange(c)[None, :]]
    if not context:
        ctx = np.full_like(ctx, master.pad)
    xs = (np.arange(n) / n).astype(np.float32)
    if coordinate == "random":
        xs = np.random.default_rng(seed).random(n).astype(np.float32)
    bits = [
        np.asarray(_bits(master, key, ctx[i : i + 4096], xs[i : i + 4096], ids[i : i + 4096]))
        for i in range(0, n, 4096)
    ]
    return float(np.concatenate(bits).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="configs/atlas_kjv.py")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "atlas_inputs.json"))
    args = p.parse_args(argv)
    config = ff.load_config(args.config)
    wd = Path(args.workdir)
    master = atlas.load_master(wd / "master.eqx")
    books = atlas.load_books(args.data_dir or config.data.data_dir, config.data.heldout)
    cases = {
        "context + coordinate + key": {},
        "random coordinate": dict(coordinate="random"),
        "zero key": dict(zero_key=True),
        "coordinate + key only (no context)": dict(context=False),
    }
    rows = []
    for name, data in books.items():
        key = atlas.load_key(wd / "keys" / f"{name}.key", master)
        row = dict(book=name, chars=len(data))
        for case, kw in cases.items():
            kw = dict(kw)
            k = jnp.zeros_like(key) if kw.pop("zero_key", False) else key
            row[case] = _score(master, k, data, **kw)
        rows.append(row)
        print(row, flush=True)
    total = sum(r["chars"] for r in rows)
    mean = {c: sum(r[c] * r["chars"] for r in rows) / total for c in cases}
    print("all held-out books:", mean)
    write_results(
        args.out,
        date=str(datetime.date.today()),
        command="python benchmarks/atlas_inputs.py " + " ".join(argv or sys.argv[1:]),
        hardware="2-core CPU (shared with other jobs)",
        what="teacher-forced bits/char of the float model on the held-out books",
        rows=rows,
        heldout_mean=mean,
    )


if __name__ == "__main__":
    main()
