"""Text from the field alone (no code stream): greedy reconstruction and sampling."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._alphabet import from_ids
from ._codec import _coordinates, _counts, layout, round_to_storage
from ._model import AtlasMaster


def reconstruct(master: AtlasMaster, key, n: int) -> np.ndarray:
    """The most likely symbol at every position of a book of length `n`, each predicted from
    the field's own previous guesses (no stream), in the codec's chunk layout."""
    master = round_to_storage(master)
    key = round_to_storage(jnp.asarray(key, jnp.float32))
    chunks, length = layout(n)
    c = master.context
    hist = np.full((chunks, c + length), master.pad, np.int32)
    xs = _coordinates(n, chunks, length)
    for t in range(length):
        counts = _counts(master, key, hist, xs, t)
        hist[:, c + t] = counts.argmax(-1)
    return hist[:, c:].reshape(-1)[:n]


def sample(
    master: AtlasMaster,
    key,
    length: int,
    *,
    start: float = 0.0,
    end: float = 0.01,
    temperature: float = 0.0,
    seed: int = 0,
) -> bytes:
    """Generate the text at coordinates `[start, end)` of a book of `length` bytes, starting
    from an empty context (`temperature=0`: greedy). Escapes print as `?`."""
    if not 0 <= start < end <= 1:
        raise ValueError(f"Need 0 <= start < end <= 1, got start={start}, end={end}.")
    if length < 1 or temperature < 0:
        raise ValueError(f"Need length >= 1 and temperature >= 0 ({length}, {temperature}).")
    master = round_to_storage(master)
    key = jnp.asarray(key, jnp.float32)
    i0, i1 = int(start * length), max(int(start * length) + 1, int(end * length))
    ctx = [master.pad] * master.context
    out = []
    logits_fn = eqx.filter_jit(lambda m, k, c, x: m(c, x, k))
    rng = jr.PRNGKey(seed)
    for i in range(i0, i1):
        c = jnp.asarray(ctx[len(ctx) - master.context :], jnp.int32)
        logits = logits_fn(master, key, c, jnp.float32(i / length))
        if temperature == 0:
            s = int(jnp.argmax(logits))
        else:
            rng, sub = jr.split(rng)
            s = int(jr.categorical(sub, logits / temperature))
        out.append(s)
        ctx.append(s)
    # The escape symbol is the index just past the alphabet: shown as "?".
    return from_ids(master.alphabet + b"?", np.asarray(out))
