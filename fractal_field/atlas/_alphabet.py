"""Byte alphabets: symbol ids, the escape symbol for unseen bytes and the context padding."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def build_alphabet(texts: Iterable[bytes]) -> bytes:
    """The sorted set of bytes occurring in `texts`."""
    seen = np.zeros(256, bool)
    for t in texts:
        if not isinstance(t, bytes | bytearray):
            raise TypeError(f"Texts must be bytes, got {type(t).__name__}.")
        seen[np.frombuffer(bytes(t), np.uint8)] = True
    if not seen.any():
        raise ValueError("Cannot build an alphabet from empty texts.")
    return bytes(np.flatnonzero(seen).astype(np.uint8).tolist())


def check_alphabet(alphabet: bytes) -> None:
    if not isinstance(alphabet, bytes) or len(alphabet) == 0:
        raise ValueError("The alphabet must be a non-empty bytes object.")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("The alphabet has repeated bytes.")


def to_ids(alphabet: bytes, data: bytes) -> np.ndarray:
    """Symbol ids of `data`: the byte's index in `alphabet`, or `len(alphabet)` (the escape
    symbol) for a byte the alphabet lacks."""
    check_alphabet(alphabet)
    lookup = np.full(256, len(alphabet), np.int32)
    lookup[np.frombuffer(alphabet, np.uint8)] = np.arange(len(alphabet), dtype=np.int32)
    return lookup[np.frombuffer(bytes(data), np.uint8)]


def from_ids(alphabet: bytes, ids: np.ndarray, escapes: bytes = b"") -> bytes:
    """Inverse of `to_ids`: escape symbols take the bytes of `escapes` in order."""
    ids = np.asarray(ids)
    table = np.frombuffer(alphabet, np.uint8)
    out = np.zeros(len(ids), np.uint8)
    esc = ids == len(alphabet)
    if int(esc.sum()) != len(escapes):
        raise ValueError(
            f"{int(esc.sum())} escape symbols but {len(escapes)} escaped bytes were stored."
        )
    out[~esc] = table[ids[~esc]]
    out[esc] = np.frombuffer(escapes, np.uint8)
    return out.tobytes()
