"""Fractal Atlas: train a master, fit keys, encode/decode books losslessly, sample, report.

python scripts/atlas.py train --config configs/atlas_kjv.py --workdir runs/atlas_kjv
python scripts/atlas.py fit-key --master runs/atlas_kjv/master.eqx --book BOOK.txt --out BOOK.key
python scripts/atlas.py encode --master M.eqx --key BOOK.key --book BOOK.txt --out BOOK.atlas
python scripts/atlas.py decode --master M.eqx --stream BOOK.atlas --out BOOK.txt
python scripts/atlas.py sample --master M.eqx --key BOOK.key --length 4000 --start 0 --end 0.05
python scripts/atlas.py report --workdir runs/atlas_kjv --config configs/atlas_kjv.py \
    --out benchmarks/results/atlas.json --figure docs/atlas.png
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

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


def _compressed_sizes(data: bytes) -> dict:
    """Bytes after `gzip -9`, `bzip2 -9` and `xz -9e` (the command-line tools)."""
    out = {}
    for name, cmd in (
        ("gzip", ["gzip", "-9", "-c"]),
        ("bzip2", ["bzip2", "-9", "-c"]),
        ("xz", ["xz", "-9e", "-c"]),
    ):
        out[name] = len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)
    return out


def _contexts(master, ids):
    """Teacher-forced contexts (full, no chunk padding) and coordinates for every position."""
    n = len(ids)
    padded = np.concatenate([np.full(master.context, master.pad, np.int32), ids])
    idx = np.arange(n)[:, None] + np.arange(master.context)[None, :]
    return padded[idx], (np.arange(n) / n).astype(np.float32)


def _teacher_forced(master, key, data, *, batch=4096):
    """Per-position (bits, chars/s) of the float model on true contexts (no coder)."""
    ids = atlas.to_ids(master.alphabet, data)
    ctx, xs = _contexts(master, ids)
    # The master is an argument, not a closed-over constant (XLA would constant-fold it).
    jitted = eqx.filter_jit(
        lambda m, k, c, x: jax.nn.log_softmax(jax.vmap(m, in_axes=(0, 0, None))(c, x, k))
    )

    def fn(c, x):
        return jitted(master, key, c, x)

    fn(ctx[:batch], xs[:batch]).block_until_ready()
    times = []
    for _ in range(3):  # median of three passes
        t = time.perf_counter()
        logp = np.concatenate(
            [
                np.asarray(fn(ctx[i : i + batch], xs[i : i + batch]))
                for i in range(0, len(ids), batch)
            ]
        )
        times.append(time.perf_counter() - t)
    return -logp[np.arange(len(ids)), ids] / np.log(2), len(ids) / float(np.median(times))


def _static_fraction(master, key, data, tol=1e-3, sample=2000):
    """Fraction of (unit, step) updates that change a unit by less than `tol` (dense run)."""
    ids = atlas.to_ids(master.alphabet, data)
    ctx, xs = _contexts(master, ids)
    sel = np.linspace(0, len(ids) - 1, min(sample, len(ids))).astype(int)
    u = jax.vmap(master.injection, in_axes=(0, 0, None))(ctx[sel], xs[sel], key)
    hs = jax.vmap(lambda u: atlas.iterate(master.kernel, u, master.steps, record=True))(u)
    prev = jnp.concatenate([jnp.zeros_like(hs[:, :1]), hs[:, :-1]], axis=1)
    return float(jnp.mean(jnp.abs(hs - prev) < tol))


def _ablations(master, key, data):
    rows = []
    variants = [dict(steps=t) for t in (1, 2, 4, 8)] + [
        dict(fixed_point=True),
        dict(steps=8, blocks=2),
        dict(steps=8, blocks=4),
        dict(steps=16, blocks=4),
    ]
    for v in variants:
        m = atlas.with_iterations(master, **v)
        bits, cps = _teacher_forced(m, key, data)
        row = dict(v, bits_per_char=float(bits.mean()), chars_per_s=cps)
        if "blocks" in v:
            row["static_fraction"] = 1 - 1 / v["blocks"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _figure(master, key, data, name, path, command):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = atlas.to_ids(master.alphabet, data)
    ctx, xs = _contexts(master, ids)
    steps = 2 * master.steps
    m = atlas.with_iterations(master, steps)
    jitted = eqx.filter_jit(
        lambda m, k, c, x: jax.nn.softmax(jax.vmap(m.iterates, in_axes=(0, 0, None))(c, x, k))
    )

    def fn(c, x):
        return jitted(m, key, c, x)

    p = np.concatenate(
        [np.asarray(fn(ctx[i : i + 2048], xs[i : i + 2048])) for i in range(0, len(ids), 2048)]
    )  # (n, steps, symbols)
    p_true = p[np.arange(len(ids)), :, ids]  # (n, steps)
    conf = p_true[:, master.steps - 1]
    width = 120
    rows = int(np.ceil(len(ids) / width))
    img = np.full(rows * width, np.nan)
    img[: len(ids)] = conf
    fig, ax = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw=dict(width_ratios=[2.2, 1, 1.4]))
    im = ax[0].imshow(
        img.reshape(rows, width),
        aspect="auto",
        cmap="magma",
        vmin=0,
        vmax=1,
        extent=(0, width, 1, 0),
    )
    ax[0].set_title(f"{name}: p(true character) along x (rows of {width} chars)")
    ax[0].set_xlabel("character within row")
    ax[0].set_ylabel("x = i / n")
    fig.colorbar(im, ax=ax[0], fraction=0.04)
    t = np.arange(1, steps + 1)
    ent = -(p * np.log2(np.clip(p, 1e-12, None))).sum(-1)
    ax[1].plot(t, p_true.mean(0), "o-", label="mean p(true)")
    ax[1].plot(t, (p.argmax(-1) == ids[:, None]).mean(0), "s-", label="top-1 accuracy")
    ax2 = ax[1].twinx()
    ax2.plot(t, ent.mean(0), "^-", color="tab:red", label="entropy (bits)")
    ax2.set_ylabel("entropy (bits)", color="tab:red")
    ax[1].axvline(master.steps, color="grey", ls=":", label=f"trained T = {master.steps}")
    ax[1].set_xlabel("kernel iteration")
    ax[1].legend(loc="center right", fontsize=8)
    ax[1].set_title("prediction over the T iterations")
    seg = slice(0, 60)
    ax[2].imshow(
        p_true[seg].T, aspect="auto", cmap="magma", vmin=0, vmax=1, extent=(0, 60, steps + 0.5, 0.5)
    )
    ax[2].set_xticks(np.arange(60) + 0.5)
    ax[2].set_xticklabels([chr(b) if 32 < b < 127 else "_" for b in data[:60]], fontsize=6)
    ax[2].set_ylabel("iteration")
    ax[2].set_title("p(true) per iteration, first 60 characters")
    fig.suptitle(f"Fractal Atlas, {datetime.date.today()}, 2-core CPU: `{command}`", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"Figure written to {path}.")


def cmd_report(args):
    config = ff.load_config(args.config)
    train, held = _books_for(config, args.data_dir)
    wd = Path(args.workdir)
    master = atlas.load_master(wd / "master.eqx")
    everything = {**train, **held}
    names = sorted(everything) if not args.books else list(args.books)
    keys, fit_times = {}, {}
    for name in names:
        path = wd / "keys" / f"{name}.key"
        if name in held and not path.exists():
            t = time.perf_counter()
            key = atlas.fit_key(master, held[name], **config.key_fit.to_dict(), progress=True)
            fit_times[name] = time.perf_counter() - t
            atlas.save_key(path, master, key)
        keys[name] = atlas.load_key(path, master)
    rows = []
    for name in tqdm(names, desc="encode/decode"):
        data = everything[name]
        t = time.perf_counter()
        blob, stats = atlas.encode(master, keys[name], data, return_stats=True)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        back = atlas.decode(master, blob)
        t_dec = time.perf_counter() - t
        if back != data:
            raise RuntimeError(f"Round trip failed for {name}.")
        (wd / "streams").mkdir(exist_ok=True)
        (wd / "streams" / f"{name}.atlas").write_bytes(blob)
        n = len(data)
        row = dict(
            book=name,
            heldout=name in held,
            chars=n,
            stored_bytes=len(blob),
            key_bytes=2 * master.key_size,
            stream_bytes=stats["stream_bits"] // 8,
            bits_per_char=8 * len(blob) / n,
            model_bits_per_char=stats["ideal_bits"] / n,
            top1_teacher_forced=stats["top1"],
            escapes=stats["escapes"],
            encode_chars_per_s=n / t_enc,
            decode_chars_per_s=n / t_dec,
            exact=True,
            **_compressed_sizes(data),
        )
        if name in fit_times:
            row["key_fit_s"] = fit_times[name]
        rows.append(row)
    # Free-running reconstruction (no stream) for the held-out books and three trained ones.
    trained_small = sorted((n for n in names if n in train), key=lambda n: len(everything[n]))[:3]
    for row in rows:
        if row["heldout"] or row["book"] in trained_small:
            data = everything[row["book"]]
            rec = atlas.reconstruct(master, keys[row["book"]], len(data))
            row["top1_free_running"] = float(np.mean(rec == atlas.to_ids(master.alphabet, data)))
    mb = atlas.master_bytes(wd / "master.eqx")
    result = dict(
        date=str(datetime.date.today()),
        command="python scripts/atlas.py " + " ".join(sys.argv[1:]),
        hardware="2-core CPU (shared with other jobs)",
        versions=dict(
            python=platform.python_version(),
            jax=jax.__version__,
            equinox=eqx.__version__,
            numpy=np.__version__,
            constriction=importlib.metadata.version("constriction"),
        ),
        config=config.to_dict(),
        master=dict(
            bytes=mb,
            params=atlas.master_size(master),
            key_size=master.key_size,
            hash=atlas.master_hash(master).hex(),
        ),
        training=_training_summary(wd),
        books=rows,
    )
    for subset, sel in (
        ("heldout", [r for r in rows if r["heldout"]]),
        ("trained", [r for r in rows if not r["heldout"]]),
    ):
        if sel:
            result[subset] = _totals(sel)
    if len(names) == len(everything):
        lib = b"".join(everything[n] for n in names)
        total = _totals(rows)
        total.update(
            master_bytes=mb,
            total_bytes=mb + total["stored_bytes"],
            **{f"{k}_library": v for k, v in _compressed_sizes(lib).items()},
        )
        total["total_bits_per_char"] = 8 * total["total_bytes"] / total["chars"]
        total["beats_gzip"] = total["total_bytes"] < total["gzip_library"]
        total["beats_xz"] = total["total_bytes"] < total["xz_library"]
        result["library"] = total
    abl = args.ablation_book or sorted(held)[0]
    result["ablation_book"] = abl
    abl_key = keys[abl] if abl in keys else atlas.load_key(wd / "keys" / f"{abl}.key", master)
    result["ablations"] = _ablations(master, abl_key, everything[abl])
    result["static_fraction_dense"] = _static_fraction(master, abl_key, everything[abl])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"Results written to {args.out}.")
    if args.figure:
        _figure(master, abl_key, everything[abl], abl, args.figure, result["command"])


def _totals(rows):
    keys = ("chars", "stored_bytes", "key_bytes", "stream_bytes", "gzip", "bzip2", "xz")
    out = {k: int(sum(r[k] for r in rows)) for k in keys}
    out["books"] = len(rows)
    out["bits_per_char"] = 8 * out["stored_bytes"] / out["chars"]
    out["books_under_gzip"] = int(sum(r["stored_bytes"] < r["gzip"] for r in rows))
    out["top1_teacher_forced"] = float(
        sum(r["top1_teacher_forced"] * r["chars"] for r in rows) / out["chars"]
    )
    return out


def _training_summary(wd):
    meta = json.loads((wd / "checkpoints" / "last.eqx.json").read_text())
    rows = [json.loads(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
    return dict(
        steps=meta["step"],
        books=len(meta["books"]),
        final_batch_bpc_mean_last_10_logs=float(np.mean([r["bpc"] for r in rows[-10:]])),
        median_step_time_s=float(np.median([r["step_time"] for r in rows])),
    )


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
    r.add_argument("--ablation-book", default=None, help="book for the T/fixed-point/sparse runs")
    r.add_argument("--figure", default=None, help="also write the confidence figure here")
    r.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
