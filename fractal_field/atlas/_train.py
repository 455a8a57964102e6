"""Training the master with one key per book, and fitting a key with the master frozen."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_collections
import numpy as np
import optax

from .._checkpoint import load_checkpoint, read_meta, save_checkpoint
from .._train import _all_finite, _Interrupt, _plain
from ._alphabet import build_alphabet
from ._data import Corpus
from ._model import AtlasMaster, master_config

LN2 = math.log(2.0)


def bits_per_char(master: AtlasMaster, keys, ctx, xs, book, y) -> jax.Array:
    """Mean cross-entropy in bits of the targets `y` (keys indexed by `book`)."""
    logits = jax.vmap(master)(ctx, xs, keys[book])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() / LN2


def make_optimizer(optim, total_steps: int):
    o = dict(optim)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        o["lr"],
        min(o.get("warmup", 100), max(1, total_steps // 2)),
        max(total_steps, 2),
        o["lr"] * o.get("final_lr_ratio", 0.05),
    )
    return optax.chain(optax.clip_by_global_norm(o.get("clip", 1.0)), optax.adam(schedule))


def make_step(optimizer, *, freeze_master: bool):
    """A jitted `(master, keys, opt_state, batch) -> (master, keys, opt_state, bits)`.

    `freeze_master=True` differentiates and updates the keys only: the master passes through
    unchanged.
    """

    @eqx.filter_jit
    def step(master, keys, opt_state, ctx, xs, book, y):
        if freeze_master:
            frozen = jax.lax.stop_gradient(master)
            bits, grads = jax.value_and_grad(lambda k: bits_per_char(frozen, k, ctx, xs, book, y))(
                keys
            )
            updates, opt_state = optimizer.update(grads, opt_state, keys)
            return master, optax.apply_updates(keys, updates), opt_state, bits
        params = (eqx.filter(master, eqx.is_inexact_array), keys)

        def loss(p):
            m = eqx.combine(p[0], master)
            return bits_per_char(m, p[1], ctx, xs, book, y)

        bits, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params, keys = optax.apply_updates(params, updates)
        return eqx.combine(new_params, master), keys, opt_state, bits

    return step


def build_from_config(config, alphabet: bytes, *, key) -> AtlasMaster:
    return AtlasMaster(alphabet, key=key, **_plain(config.model))


def train_master(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    books: dict[str, bytes],
    *,
    stop_after_steps: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Train a master and one key per book on `books`, resuming from
    `workdir/checkpoints/last.eqx` if present. Writes `metrics.jsonl` and atomic checkpoints
    every `config.checkpoint_every_steps`; stops after `stop_after_steps` (as if killed) or on
    SIGTERM after saving. Returns `dict(master, keys, names, step, alphabet)`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoints" / "last.eqx"
    if progress is None:
        progress = sys.stderr.isatty()
    names = list(books)
    alphabet = build_alphabet(books.values())
    model_key, keys_key = jr.split(jr.PRNGKey(config.seed))
    master = build_from_config(config, alphabet, key=model_key)
    keys = 0.01 * jr.normal(keys_key, (len(names), master.key_size))
    optimizer = make_optimizer(config.optim, config.train_steps)
    params = (eqx.filter(master, eqx.is_inexact_array), keys)
    opt_state = optimizer.init(params)
    step = 0
    if ckpt.exists():
        meta = read_meta(ckpt)
        # `train_steps` may change on resume (to extend or shorten a run; the learning-rate
        # schedule is rebuilt for the new length); nothing else may.
        same = {k: v for k, v in meta["config"].items() if k != "train_steps"} == {
            k: v for k, v in config.to_dict().items() if k != "train_steps"
        }
        if not same or meta["books"] != names:
            raise ValueError(
                f"The checkpoint in {ckpt.parent} was made with another config or book list; "
                "use a new workdir or the original config."
            )
        master, keys, opt_state = load_checkpoint(ckpt, (master, keys, opt_state))
        step = meta["step"]
        print(f"Resumed from {ckpt} at step {step}.", flush=True)
    corpus = Corpus(alphabet, books)
    train_step = make_step(optimizer, freeze_master=False)

    def save():
        if not bool(_all_finite(eqx.filter((master, keys), eqx.is_inexact_array))):
            raise FloatingPointError(f"Non-finite parameters at step {step}; not saving.")
        save_checkpoint(
            ckpt,
            (master, keys, opt_state),
            dict(config=config.to_dict(), books=names, step=step, master=master_config(master)),
        )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.train_steps, initial=step, desc="atlas master")
    log = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
    stopped = False
    try:
        with _Interrupt() as interrupt:
            while step < config.train_steps:
                # The batch depends only on (seed, step): a resumed run sees the same data.
                rng = np.random.default_rng([config.seed, step])
                batch = corpus.batch(rng, config.batch_size, master.context, config.truncate)
                # Only logged steps wait for the device (the others run ahead); a logged step
                # starts from an idle device so that its time is its own.
                logged = (step + 1) % config.log_every == 0 or step + 1 == config.train_steps
                if logged:
                    jax.block_until_ready((master, keys))
                t0 = time.perf_counter()
                master, keys, opt_state, bits = train_step(master, keys, opt_state, *batch)
                step += 1
                if bar is not None:
                    bar.update(1)
                if logged:
                    bits = float(bits)
                    if bar is not None:
                        bar.set_postfix(bpc=f"{bits:.3f}")
                    row = dict(step=step, bpc=bits, step_time=time.perf_counter() - t0)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if step % config.checkpoint_every_steps == 0 or step == config.train_steps:
                    save()
                if interrupt.flag or (stop_after_steps is not None and step >= stop_after_steps):
                    save()
                    stopped = True
                    break
    except KeyboardInterrupt:
        save()
        raise
    finally:
        log.close()
        if bar is not None:
            bar.close()
    return dict(
        master=master, keys=keys, names=names, step=step, alphabet=alphabet, stopped=stopped
    )


def fit_key(
    master: AtlasMaster,
    data: bytes,
    *,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    truncate: float = 0.05,
    progress: bool = False,
) -> jax.Array:
    """A key for the book `data` with the master frozen (only the key is optimised)."""
    if steps < 0:
        raise ValueError(f"fit_key(steps={steps}) must be >= 0.")
    corpus = Corpus(master.alphabet, {"book": data})
    keys = jnp.zeros((1, master.key_size))
    optimizer = make_optimizer(dict(lr=lr, warmup=min(20, steps)), max(steps, 1))
    opt_state = optimizer.init(keys)
    step_fn = make_step(optimizer, freeze_master=True)
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="fit key")
    for s in it:
        batch = corpus.batch(np.random.default_rng([seed, s]), batch_size, master.context, truncate)
        _, keys, opt_state, _ = step_fn(master, keys, opt_state, *batch)
    return keys[0]
