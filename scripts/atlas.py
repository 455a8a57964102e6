"""Fractal Atlas: train a master, fit keys, encode/decode books losslessly, sample, report.

python scripts/atlas.py train --config configs/atlas_kjv.py --workdir runs/atlas_kjv
python scripts/atlas.py fit-key --master runs/atlas_kjv/master.eqx --book BOOK.txt --out BOOK.key
python scripts/atlas.py encode --master M.eqx --key BOOK.key --book BOOK.txt --out BOOK.atlas
python scripts/atlas.py decode --master M.eqx --stream BOOK.atlas --out BOOK.txt
python scripts/atlas.py sample --master M.eqx --key BOOK.key --length 4000 --start 0 --end 0.05
python scripts/atlas.py report --workdir runs/atlas_kjv --out benchmarks/results/atlas.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import fractal_field as ff
from fractal_field import atlas


def _books_for(config, data_dir=None):
    d = config.data
    if d.name == "synthetic":
        books = atlas.synthetic_books(d.books, d.length)
    else:
        books = atlas.load_books(data_dir or d.data_dir)
    held = [b for b in books if b in set(d.heldout)]
    if len(held) != len(d.heldout):
        raise ValueError(f"Held-out books {list(d.heldout)} not all found in the library.")
    return {k: v for k, v in books.items() if k not in held}, {k: books[k] for k in held}


def cmd_train(args):
    config = ff.load_config(args.config, args.override)
    train, _ = _books_for(config, args.data_dir)
    out = atlas.train_master(
        config, args.workdir, train, stop_after_steps=args.stop_after_steps, progress=True
    )
    if out["step"] < config.train_steps:
        print(f"Stopped at step {out['step']}; run again to resume.")
        return
    wd = Path(args.workdir)
    atlas.save_master(wd / "master.eqx", out["master"], books=out["names"])
    master = atlas.load_master(wd / "master.eqx")
    for name, key in zip(out["names"], np.asarray(out["keys"]), strict=True):
        atlas.save_key(wd / "keys" / f"{name}.key", master, key)
    print(
        f"Master ({atlas.master_bytes(wd / 'master.eqx')} bytes) and "
        f"{len(out['names'])} keys in {wd}."
    )


def cmd_fit_key(args):
    master = atlas.load_master(args.master)
    data = Path(args.book).read_bytes()
    key = atlas.fit_key(master, data, steps=args.steps, lr=args.lr, progress=True)
    atlas.save_key(args.out, master, key)
    print(f"Key ({master.key_size} numbers) written to {args.out}.")


def cmd_encode(args):
    master = atlas.load_master(args.master)
    key = atlas.load_key(args.key, master)
    data = Path(args.book).read_bytes()
    t = time.perf_counter()
    blob, stats = atlas.encode(master, key, data, return_stats=True)
    dt = time.perf_counter() - t
    Path(args.out).write_bytes(blob)
    print(
        f"{len(data)} bytes -> {len(blob)} bytes ({8 * len(blob) / max(len(data), 1):.3f} "
        f"bits/char, {stats['escapes']} escaped bytes) in {dt:.1f} s."
    )


def cmd_decode(args):
    master = atlas.load_master(args.master)
    blob = Path(args.stream).read_bytes()
    t = time.perf_counter()
    data = atlas.decode(master, blob)
    Path(args.out).write_bytes(data)
    print(f"{len(blob)} bytes -> {len(data)} bytes in {time.perf_counter() - t:.1f} s.")


def cmd_sample(args):
    master = atlas.load_master(args.master)
    key = atlas.load_key(args.key, master)
    text = atlas.sample(
        master,
        key,
        args.length,
        start=args.start,
        end=args.end,
        temperature=args.temperature,
        seed=args.seed,
    )
    sys.stdout.write(text.decode("latin-1") + "\n")


def cmd_report(args):
    from fractal_field.atlas import _report

    _report.run(args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a master and one key per training book")
    t.add_argument("--config", required=True)
    t.add_argument("--workdir", required=True)
    t.add_argument("--data-dir", default=None)
    t.add_argument("--stop-after-steps", type=int, default=None)
    t.add_argument("override", nargs="*", help="key.path=value")
    t.set_defaults(fn=cmd_train)
    k = sub.add_parser("fit-key", help="fit a key for a book with the master frozen")
    k.add_argument("--master", required=True)
    k.add_argument("--book", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--steps", type=int, default=400)
    k.add_argument("--lr", type=float, default=2e-2)
    k.set_defaults(fn=cmd_fit_key)
    e = sub.add_parser("encode", help="store a book losslessly (key + code stream)")
    e.add_argument("--master", required=True)
    e.add_argument("--key", required=True)
    e.add_argument("--book", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_encode)
    d = sub.add_parser("decode", help="restore a book exactly from its stream")
    d.add_argument("--master", required=True)
    d.add_argument("--stream", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(fn=cmd_decode)
    s = sub.add_parser("sample", help="generate text over a coordinate range (no stream)")
    s.add_argument("--master", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--length", type=int, required=True, help="book length n (x = i / n)")
    s.add_argument("--start", type=float, default=0.0)
    s.add_argument("--end", type=float, default=0.01)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_sample)
    r = sub.add_parser("report", help="fit held-out keys, encode/decode all books, write JSON")
    r.add_argument("--workdir", required=True)
    r.add_argument("--config", required=True)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--out", default="benchmarks/results/atlas.json")
    r.add_argument("--books", nargs="*", default=None, help="only these books (default all)")
    r.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
