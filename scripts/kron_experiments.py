"""Kronecker fractal networks against equal-parameter baselines (`docs/kronecker.md`).

Variants of a body of `N = 3` layers over the base graph `a -> b -> c` (with the skip
`a -> c`):

- `base`: the 3 layers once (order 1);
- `square`: the Kronecker square, paths merged per node (same parameters, 15 layer calls);
- `square_output`: the square with paths averaged at the output (= one path: 9 calls);
- `repeated`: the base network applied 3 times in sequence (same parameters, 9 calls);
- `untied`: the square's graph with 9 distinct layers (3x the body's parameters);
- `square_static`: `square` with learnt static edge weights.

`mnist`: flattened MNIST, `Linear(784, d)` -> body of `LayerNorm -> Linear(d, d) -> GELU`
layers -> `LayerNorm -> Linear(d, 10)`; Adam, test accuracy on the 10k test images.

`text`: a character-level transformer on the King James Bible (whole books held out for
testing); blocks `x + attn(LN x)`, then `+ mlp(LN .)`, with equinox's `MultiheadAttention`;
held-out bits per character, and orders 1-3 at inference for the square trained at order 2.

`graph`: draws the square (`docs/kron_graph.png`).

Run: `python scripts/kron_experiments.py mnist --data-dir ../shared/data` (writes
`benchmarks/results/kron_mnist.json`), `python scripts/kron_experiments.py text --data-dir
../shared/data` (writes `benchmarks/results/kron_text.json`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import shlex
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import fractal_field as ff

A = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
VARIANTS = ("base", "square", "square_output", "repeated", "untied", "square_static")


class Repeated(eqx.Module):
    """`net` applied `times` times in sequence."""

    net: ff.KroneckerNet
    times: int = eqx.field(static=True)

    def __call__(self, x, *, order=None):
        for _ in range(self.times):
            x = self.net(x, order=order)
        return x


def make_body(variant: str, make_layer, key):
    """The body for `variant`, from `make_layer(key)`; call it as `body(x, order=...)`."""
    if variant == "untied":
        layers = [make_layer(k) for k in jr.split(key, 9)]
        return ff.KroneckerNet(ff.kron_adjacency(A, 2), layers, order=1)
    layers = [make_layer(k) for k in jr.split(key, 3)]
    if variant == "base":
        return ff.KroneckerNet(A, layers, order=1)
    if variant == "repeated":
        return Repeated(ff.KroneckerNet(A, layers, order=1), 3)
    if variant == "square":
        return ff.KroneckerNet(A, layers, order=2)
    if variant == "square_output":
        return ff.KroneckerNet(A, layers, order=2, merge="output")
    if variant == "square_static":
        return ff.KroneckerNet(A, layers, order=2, edge_weights="static")
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}.")


def _meta(argv) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/kron_experiments.py " + shlex.join(argv),
        "hardware": "2-core CPU",
        "jax": jax.__version__,
        "equinox": eqx.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }


# -- MNIST -----------------------------------------------------------------------------------


class MLPLayer(eqx.Module):
    norm: eqx.nn.LayerNorm
    lin: eqx.nn.Linear

    def __init__(self, d, *, key):
        self.norm = eqx.nn.LayerNorm(d)
        self.lin = eqx.nn.Linear(d, d, key=key)

    def __call__(self, x):
        return jax.nn.gelu(self.lin(self.norm(x)))


class MLPClassifier(eqx.Module):
    embed: eqx.nn.Linear
    body: eqx.Module
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, variant, d, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.embed = eqx.nn.Linear(784, d, key=k1)
        self.body = make_body(variant, lambda k: MLPLayer(d, key=k), k2)
        self.norm = eqx.nn.LayerNorm(d)
        self.head = eqx.nn.Linear(d, 10, key=k3)

    def __call__(self, x, *, order=None):
        return self.head(self.norm(self.body(self.embed(x), order=order)))


def run_mnist(args, variant, seed, data):
    xtr, ytr, xte, yte = data
    model = MLPClassifier(variant, args.d, key=jr.PRNGKey(seed))
    opt = optax.adam(args.lr)
    params, static = eqx.partition(model, eqx.is_array)
    state = opt.init(params)

    def loss_fn(params, x, y):
        logits = jax.vmap(eqx.combine(params, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def correct(params, x, y):
        return jnp.sum(jnp.argmax(jax.vmap(eqx.combine(params, static))(x), -1) == y)

    rng = np.random.default_rng(seed)
    times, losses = [], []
    t0 = time.perf_counter()
    for i in range(args.steps):
        idx = rng.integers(0, len(xtr), args.batch)
        t = time.perf_counter()
        params, state, loss = step(params, state, xtr[idx], ytr[idx])
        loss = float(loss)
        times.append(time.perf_counter() - t)
        if i % 200 == 0 or i == args.steps - 1:
            losses.append((i, loss))
    train_s = time.perf_counter() - t0
    hits = sum(
        int(correct(params, xte[i : i + 1000], yte[i : i + 1000])) for i in range(0, len(xte), 1000)
    )
    body = eqx.combine(params, static).body
    return {
        "variant": variant,
        "seed": seed,
        "test_accuracy": hits / len(xte),
        "params": ff.count_params(params),
        "body_params": ff.count_params(body),
        "step_ms_median": 1e3 * float(np.median(times[5:])),
        "train_s": train_s,
        "losses": losses,
    }


def mnist(args, argv):
    from fractal_field.data import load_dataset

    def load(split):
        ds = load_dataset("mnist", split, data_dir=args.data_dir, source="local")
        x = ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0
        return (x - 0.1307) / 0.3081, ds.labels

    xtr, ytr = load("train")
    xte, yte = load("test")
    data = (jnp.asarray(xtr), jnp.asarray(ytr), jnp.asarray(xte), jnp.asarray(yte))
    out = pathlib.Path(args.out or "benchmarks/results/kron_mnist.json")
    result = {
        **_meta(argv),
        "task": "MNIST, flattened, MLP layers",
        "d": args.d,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "runs": [],
    }
    for seed in args.seeds:
        for variant in args.variants:
            r = run_mnist(args, variant, seed, data)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            result["runs"].append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


# -- text ------------------------------------------------------------------------------------

HELD_OUT = ("08_Ruth", "32_Jonah", "57_Philemon", "62_1_John", "65_Jude")


class Block(eqx.Module):
    """Pre-norm transformer block on `(tokens, d)`: causal self-attention, then a GELU MLP."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, heads, mlp, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d)
        self.up = eqx.nn.Linear(d, mlp * d, key=k2)
        self.down = eqx.nn.Linear(mlp * d, d, key=k3)

    def __call__(self, x):
        t = x.shape[0]
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((t, t), bool)))
        h = jax.vmap(self.ln2)(x)
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))


class CharModel(eqx.Module):
    embed: jax.Array
    pos: jax.Array
    body: eqx.Module
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, variant, d, heads, mlp, context, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.embed = 0.02 * jr.normal(k1, (256, d))
        self.pos = 0.02 * jr.normal(k2, (context, d))
        self.body = make_body(variant, lambda k: Block(d, heads, mlp, key=k), k3)
        self.norm = eqx.nn.LayerNorm(d)
        self.head = eqx.nn.Linear(d, 256, key=k4)

    def __call__(self, tokens, *, order=None):
        x = self.embed[tokens] + self.pos[: tokens.shape[0]]
        return jax.vmap(self.head)(jax.vmap(self.norm)(self.body(x, order=order)))


def load_kjv(data_dir):
    root = pathlib.Path(data_dir) / "text" / "kjv"
    files = sorted(root.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No KJV books (*.txt) under {root}.")
    train, test = [], []
    for f in files:
        (test if f.stem in HELD_OUT else train).append(f.read_bytes())
    if len(test) != len(HELD_OUT):
        raise FileNotFoundError(f"Held-out books {HELD_OUT} not all found under {root}.")
    cat = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8).astype(np.int32)
    return cat(train), cat(test)


def run_text(args, variant, seed, data):
    train, test = data
    t = args.context
    model = CharModel(variant, args.d, args.heads, args.mlp, t, key=jr.PRNGKey(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    params, static = eqx.partition(model, eqx.is_array)
    state = opt.init(params)

    def nll(params, windows, order=None):
        m = eqx.combine(params, static)
        logits = jax.vmap(lambda w: m(w[:-1], order=order))(windows)
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    @jax.jit
    def step(params, state, windows):
        loss, g = jax.value_and_grad(nll)(params, windows)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(nll, static_argnums=2)
    starts = np.arange(0, len(test) - t - 1, t)
    test_windows = np.stack([test[s : s + t + 1] for s in starts])

    def bits_per_char(params, order=None):
        chunks = [test_windows[i : i + 128] for i in range(0, len(test_windows), 128)]
        total = sum(float(evaluate(params, c, order)) * len(c) for c in chunks)
        return total / len(test_windows) / np.log(2)

    rng = np.random.default_rng(seed)
    times, losses = [], []
    t0 = time.perf_counter()
    for i in range(args.steps):
        idx = rng.integers(0, len(train) - t - 1, args.batch)
        windows = np.stack([train[s : s + t + 1] for s in idx])
        t1 = time.perf_counter()
        params, state, loss = step(params, state, windows)
        loss = float(loss)
        times.append(time.perf_counter() - t1)
        if i % 100 == 0 or i == args.steps - 1:
            losses.append((i, loss / np.log(2)))
    train_s = time.perf_counter() - t0
    model = eqx.combine(params, static)
    out = {
        "variant": variant,
        "seed": seed,
        "heldout_bits_per_char": bits_per_char(params),
        "params": ff.count_params(params),
        "body_params": ff.count_params(model.body),
        "step_ms_median": 1e3 * float(np.median(times[5:])),
        "train_s": train_s,
        "train_bits_per_char": losses,
    }
    if variant.startswith("square"):
        out["heldout_bits_per_char_by_order"] = {k: bits_per_char(params, k) for k in args.orders}
    if variant == "square_static":
        out["edge_weights"] = np.asarray(model.body.weights[0]).tolist()
    return out, model


def text(args, argv):
    data = load_kjv(args.data_dir)
    out = pathlib.Path(args.out or "benchmarks/results/kron_text.json")
    result = {
        **_meta(argv),
        "task": "KJV characters (bytes), held-out books " + ", ".join(HELD_OUT),
        "train_chars": int(len(data[0])),
        "heldout_chars": int(len(data[1])),
        **{k: getattr(args, k) for k in ("d", "heads", "mlp", "context", "steps", "batch", "lr")},
        "runs": [],
    }
    for seed in args.seeds:
        for variant in args.variants:
            r, model = run_text(args, variant, seed, data)
            print(
                json.dumps({k: v for k, v in r.items() if k != "train_bits_per_char"}), flush=True
            )
            result["runs"].append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            if variant == "square_static" and args.figure:
                from fractal_field import viz

                viz.plot_edge_weights(
                    model.body,
                    title=f"learnt edge weights, KJV square, seed {seed} ({result['date']}, "
                    "2-core CPU)",
                    path=pathlib.Path(args.figure).with_suffix(f".seed{seed}.png"),
                )
    print(f"wrote {out}")


def edge_weight_figures(files, out):
    """`viz.plot_edge_weights` of each `square_static` run recorded in `files`."""
    from fractal_field import viz

    for f in files:
        res = json.loads(pathlib.Path(f).read_text())
        for r in res["runs"]:
            if "edge_weights" not in r:
                continue
            net = ff.KroneckerNet(A, [lambda x: x] * 3, edge_weights="static")
            net = eqx.tree_at(lambda n: n.weights, net, (jnp.asarray(r["edge_weights"]),))
            path = pathlib.Path(out).with_suffix(f".seed{r['seed']}.png")
            viz.plot_edge_weights(
                net,
                title=f"learnt edge weights, {r['variant']}, seed {r['seed']} ({res['date']}, "
                f"{res['hardware']}): {res['task'].split(',')[0]}",
                path=path,
            )
            print(f"wrote {path}")


def summary(result: dict) -> str:
    """A markdown table: per variant, the metric's mean +- std over seeds, parameters, step."""
    metric = "test_accuracy" if "test_accuracy" in result["runs"][0] else "heldout_bits_per_char"
    scale, unit = (
        (100, "test accuracy %") if metric == "test_accuracy" else (1, "held-out bits/char")
    )
    lines = [
        f"{result['task']} ({result['date']}, {result['hardware']}): `{result['command']}`",
        "",
        f"| variant | seeds | {unit} | params (body) | step ms (median) |",
        "|---|---|---|---|---|",
    ]
    variants = dict.fromkeys(r["variant"] for r in result["runs"])
    for v in variants:
        rs = sorted((r for r in result["runs"] if r["variant"] == v), key=lambda r: r["seed"])
        x = scale * np.array([r[metric] for r in rs])
        spread = f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else ""
        lines.append(
            f"| {v} | {len(x)} | {x.mean():.2f}{spread} ({', '.join(f'{y:.2f}' for y in x)}) | "
            f"{rs[0]['params']:,} ({rs[0]['body_params']:,}) | "
            f"{np.median([r['step_ms_median'] for r in rs]):.1f} |"
        )
    by_order = [r for r in result["runs"] if "heldout_bits_per_char_by_order" in r]
    if by_order:
        lines += [
            "",
            "| variant (trained at order 2), seed | "
            + " | ".join(f"order {k}" for k in by_order[0]["heldout_bits_per_char_by_order"])
            + " |",
        ]
        lines.append("|---" * (1 + len(by_order[0]["heldout_bits_per_char_by_order"])) + "|")
        for r in by_order:
            vals = r["heldout_bits_per_char_by_order"].values()
            lines.append(
                f"| {r['variant']}, {r['seed']} | " + " | ".join(f"{x:.3f}" for x in vals) + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    m = sub.add_parser("mnist")
    m.add_argument("--data-dir", default="../shared/data")
    m.add_argument("--d", type=int, default=64)
    m.add_argument("--steps", type=int, default=1500)
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    m.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    m.add_argument("--out", default=None)
    t = sub.add_parser("text")
    t.add_argument("--data-dir", default="../shared/data")
    t.add_argument("--d", type=int, default=48)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--mlp", type=int, default=2)
    t.add_argument("--context", type=int, default=64)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    t.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    t.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3])
    t.add_argument("--figure", default="docs/kron_edge_weights.png")
    t.add_argument("--out", default=None)
    r = sub.add_parser("summary", help="markdown tables (mean +- std over seeds) of results")
    r.add_argument("files", nargs="+")
    e = sub.add_parser("edge-weights", help="figure of the learnt weights recorded in results")
    e.add_argument("files", nargs="+")
    e.add_argument("--out", default="docs/kron_edge_weights.png")
    g = sub.add_parser("graph", help="draw the square of the base graph")
    g.add_argument("--out", default="docs/kron_graph.png")
    args = parser.parse_args(argv)
    if args.task == "mnist":
        mnist(args, argv)
    elif args.task == "text":
        text(args, argv)
    elif args.task == "summary":
        merged: dict[str, dict] = {}
        for f in args.files:
            res = json.loads(pathlib.Path(f).read_text())
            if res["task"] in merged:  # runs of one task split over files (e.g. by seed)
                merged[res["task"]]["runs"] += res["runs"]
                merged[res["task"]]["command"] += "`, `" + res["command"]
            else:
                merged[res["task"]] = res
        print("\n\n".join(summary(res) for res in merged.values()))
    elif args.task == "edge-weights":
        edge_weight_figures(args.files, args.out)
    else:
        from fractal_field import viz

        viz.plot_kron_graph(
            ff.kron_adjacency(A, 2),
            names=ff.kron_labels("abc", 2),
            title="Kronecker square of a -> b -> c (with the skip a -> c)",
            path=args.out,
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
