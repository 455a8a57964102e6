"""Books as symbol ids and random training batches of (context, coordinate, book, target)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._alphabet import to_ids


def load_books(data_dir: str | os.PathLike, names=None) -> dict[str, bytes]:
    """`{stem: bytes}` of the `*.txt` files in `data_dir` (all, or those whose stem or
    `NN_` number is in `names`), in file-name order."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No *.txt books in {data_dir}.")
    books = {f.stem: f.read_bytes() for f in files}
    if names is None:
        return books
    wanted = {}
    for name in names:
        hits = [s for s in books if s == name or s.split("_", 1)[0] == str(name)]
        if not hits:
            raise ValueError(f"No book {name!r} in {data_dir} (have e.g. {list(books)[:3]}).")
        wanted[hits[0]] = books[hits[0]]
    return wanted


def synthetic_books(count: int = 3, length: int = 3000, seed: int = 0) -> dict[str, bytes]:
    """Small learnable texts for smoke runs: verses built from a few words."""
    rng = np.random.default_rng(seed)
    words = [b"and", b"the", b"lord", b"said", b"unto", b"him", b"of", b"light", b"earth"]
    books = {}
    for b in range(count):
        out, verse = bytearray(), 1
        while len(out) < length:
            line = b" ".join(words[i] for i in rng.integers(0, len(words), rng.integers(4, 10)))
            out += b"%d:%d " % (b + 1, verse) + line.capitalize() + b".\n"
            verse += 1
        books[f"{b:02d}_Synthetic"] = bytes(out[:length])
    return books


class Corpus:
    """Books concatenated as ids, for sampling training positions uniformly over characters."""

    def __init__(self, alphabet: bytes, books: dict[str, bytes]):
        if not books:
            raise ValueError("Corpus needs at least one book.")
        self.names = list(books)
        self.ids = np.concatenate([to_ids(alphabet, t) for t in books.values()])
        self.lengths = np.array([len(t) for t in books.values()], np.int64)
        if (self.lengths == 0).any():
            raise ValueError("Books must not be empty.")
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.pad = len(alphabet) + 1

    def batch(self, rng: np.random.Generator, size: int, context: int, truncate: float = 0.0):
        """`(contexts, xs, books, targets)` for `size` random positions. With probability
        `truncate` a context is cut to a random shorter length (padding before it), as at the
        start of a coded chunk."""
        g = rng.integers(0, len(self.ids), size)
        book = np.searchsorted(self.starts, g, side="right") - 1
        local = g - self.starts[book]
        x = (local / self.lengths[book]).astype(np.float32)
        offs = np.arange(-context, 0)
        idx = g[:, None] + offs[None, :]
        ctx = self.ids[np.clip(idx, 0, None)]
        valid = (local[:, None] + offs[None, :]) >= 0
        if truncate > 0 and context > 0:
            cut = rng.integers(0, context, size)
            trunc = rng.random(size) < truncate
            valid &= ~(trunc[:, None] & (-offs[None, :] > cut[:, None]))
        ctx = np.where(valid, ctx, self.pad).astype(np.int32)
        return ctx, x, book.astype(np.int32), self.ids[g].astype(np.int32)
