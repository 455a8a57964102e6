"""Lossless Atlas codec: range coding of each byte under the master's prediction.

A stored book is one file: a header, the book's key (float16) and the range-coded stream
(`constriction`). The master is stored once for the library and identified by its hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from typing import NamedTuple

import constriction
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._alphabet import from_ids, to_ids
from ._model import AtlasMaster, master_config
from ._quant import pack_leaf, round_to_storage, unpack_leaf

MAGIC = b"FFATLAS\x00"
VERSION = 1
# The model's distributions are quantised to integer frequencies summing to at most
# 2**PRECISION before coding, every symbol at least 1 (so every symbol stays codable).
PRECISION = 20
_HEADER = struct.Struct("<8sH16sIQIIH")  # magic, version, master hash, alphabet crc, n,
# chunks, escapes, key size


class AtlasFormatError(ValueError):
    """A stream or key file that is corrupt, truncated or made with another master."""


def master_hash(master: AtlasMaster) -> bytes:
    """16 bytes identifying the master's structure, run mode and stored weights."""
    h = hashlib.sha256(json.dumps(master_config(master), sort_keys=True).encode())
    for leaf in jax.tree_util.tree_leaves(eqx.filter(master, eqx.is_inexact_array)):
        h.update(np.asarray(unpack_leaf(pack_leaf(leaf)), np.float32).tobytes())
    return h.digest()[:16]


# Books are coded as up to MAX_CHUNKS pieces of at least MIN_CHUNK bytes.
MIN_CHUNK = 2048
MAX_CHUNKS = 256


def layout(n: int) -> tuple[int, int]:
    """`(chunks, chunk_length)`: the book is cut into `chunks` consecutive pieces coded in
    lockstep (one model call predicts one position of every piece; a piece's first symbols
    see a context padded at its start)."""
    chunks = max(1, min(MAX_CHUNKS, n // MIN_CHUNK))
    return chunks, max(1, math.ceil(n / chunks))


def quantise(probs: Float[Array, "... symbols"]) -> Int[Array, "... symbols"]:
    """Integer frequencies `floor(p * (2**PRECISION - S)) + 1` (sum <= 2**PRECISION)."""
    s = probs.shape[-1]
    return (jnp.floor(probs * (2**PRECISION - s)) + 1).astype(jnp.int32)


@eqx.filter_jit
def step_counts(
    master: AtlasMaster,
    key: Float[Array, " key_size"],
    contexts: Int[Array, "chunks context"],
    xs: Float[Array, " chunks"],
) -> Int[Array, "chunks symbols"]:
    """Quantised next-symbol frequencies for one position of every chunk.

    Encoder and decoder call this same function with the same shapes, so the float
    arithmetic (and hence the frequencies) is bit-identical on both sides.
    """
    logits = jax.vmap(master, in_axes=(0, 0, None))(contexts, xs, key)
    return quantise(jax.nn.softmax(logits, axis=-1))


def _coordinates(n: int, chunks: int, length: int) -> np.ndarray:
    return (
        (np.arange(chunks * length, dtype=np.float64) / max(n, 1))
        .astype(np.float32)
        .reshape(chunks, length)
    )


def _rows(chunks: int) -> int:
    """Batch rows for `chunks` pieces: the next power of two, so that books of different
    lengths share compiled shapes (the extra rows are padding, never coded)."""
    return 1 << (chunks - 1).bit_length()


def _counts(master, key, hist, xs, t):
    """`step_counts` at step `t` on a batch padded to `_rows` rows."""
    c = master.context
    rows = _rows(hist.shape[0])
    ctx = np.full((rows, c), master.pad, np.int32)
    ctx[: hist.shape[0]] = hist[:, t : t + c]
    x = np.zeros(rows, np.float32)
    x[: hist.shape[0]] = xs[:, t]
    return np.asarray(step_counts(master, key, ctx, x))[: hist.shape[0]]


def model_counts(master: AtlasMaster, key, ids: np.ndarray, chunks: int, length: int):
    """Frequencies for every position (chunk-major `(chunks, length, symbols)`) given the true
    symbols, in the coder's batch layout."""
    n = len(ids)
    c = master.context
    grid = np.full(chunks * length, master.pad, np.int32)
    grid[:n] = ids
    grid = grid.reshape(chunks, length)
    hist = np.concatenate([np.full((chunks, c), master.pad, np.int32), grid], axis=1)
    xs = _coordinates(n, chunks, length)
    out = np.empty((chunks, length, master.num_symbols), np.int32)
    for t in range(length):
        out[:, t] = _counts(master, key, hist, xs, t)
    return out, grid


def ideal_bits(counts: np.ndarray, symbols: np.ndarray) -> float:
    """Information content `-sum log2 q(symbol)` under quantised frequencies."""
    counts = counts.astype(np.float64)
    p = counts[np.arange(len(symbols)), symbols] / counts.sum(-1)
    return float(-np.log2(p).sum())


def _check_key(master: AtlasMaster, key) -> jnp.ndarray:
    key = jnp.asarray(key, jnp.float32)
    if key.shape != (master.key_size,):
        raise ValueError(f"Key of shape {key.shape}; this master takes ({master.key_size},).")
    return round_to_storage(key)


class Header(NamedTuple):
    version: int
    master_hash: bytes
    alphabet_crc: int
    length: int
    chunks: int
    escapes: int
    key_size: int


def encode(master: AtlasMaster, key, data: bytes, *, return_stats: bool = False):
    """`data` -> the bytes of a stored book (header, key, escaped bytes, code stream).

    Bytes outside the master's alphabet are coded as the escape symbol and stored raw, in
    order, after the key (one byte each). `return_stats=True` also returns
    `dict(ideal_bits, stream_bits, escapes, top1)`: the information content under the
    quantised model, the code stream's length, the number of escaped bytes and the fraction
    of positions whose most likely symbol (given the true preceding ones) is the true one.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"encode takes bytes, got {type(data).__name__}.")
    master = round_to_storage(master)
    key = _check_key(master, key)
    data = bytes(data)
    n = len(data)
    ids = to_ids(master.alphabet, data)
    escapes = np.frombuffer(data, np.uint8)[ids == master.escape].tobytes()
    chunks, length = layout(n)
    words = np.zeros(0, np.uint32)
    bits, top1 = 0.0, 0.0
    if n:
        counts, grid = model_counts(master, key, ids, chunks, length)
        active = (np.arange(chunks * length).reshape(chunks, length) < n).T  # (length, chunks)
        symbols = grid.T[active].astype(np.int32)  # coding order: position, then chunk
        freqs = counts.transpose(1, 0, 2)[active]
        encoder = constriction.stream.queue.RangeEncoder()
        family = constriction.stream.model.Categorical(perfect=False)
        encoder.encode(symbols, family, freqs.astype(np.float64))
        words = encoder.get_compressed().astype(np.uint32)
        bits = ideal_bits(freqs, symbols)
        top1 = float(np.mean(freqs.argmax(-1) == symbols))
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        master_hash(master),
        zlib.crc32(master.alphabet),
        n,
        chunks,
        len(escapes),
        master.key_size,
    )
    body = header + np.asarray(key, np.float16).tobytes() + escapes + words.tobytes()
    blob = body + struct.pack("<I", zlib.crc32(body))
    if return_stats:
        return blob, dict(
            ideal_bits=bits, stream_bits=32 * len(words), escapes=len(escapes), top1=top1
        )
    return blob


def read_header(blob: bytes) -> Header:
    """Parse and check a stored book's header and checksum."""
    if len(blob) < _HEADER.size + 4 or blob[:8] != MAGIC:
        raise AtlasFormatError("Not an Atlas stream (bad magic or too short).")
    magic, version, mhash, acrc, n, chunks, n_esc, key_size = _HEADER.unpack_from(blob)
    if version != VERSION:
        raise AtlasFormatError(f"Atlas stream version {version}; this code reads {VERSION}.")
    (crc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    if zlib.crc32(blob[:-4]) != crc:
        raise AtlasFormatError("Atlas stream is corrupt (checksum mismatch).")
    return Header(version, mhash, acrc, n, chunks, n_esc, key_size)


def stream_key(blob: bytes) -> np.ndarray:
    """The key stored in a book's file."""
    h = read_header(blob)
    return np.frombuffer(blob, np.float16, h.key_size, _HEADER.size).astype(np.float32)


def decode(master: AtlasMaster, blob: bytes) -> bytes:
    """Inverse of `encode`: the exact original bytes."""
    master = round_to_storage(master)
    h = read_header(blob)
    if h.master_hash != master_hash(master):
        raise AtlasFormatError(
            "This stream was encoded with another master (master hash mismatch); decode it "
            "with the master it was made with."
        )
    if h.alphabet_crc != zlib.crc32(master.alphabet) or h.key_size != master.key_size:
        raise AtlasFormatError("Stream header does not match the master (alphabet/key size).")
    off = _HEADER.size
    key = jnp.asarray(np.frombuffer(blob, np.float16, h.key_size, off).astype(np.float32))
    off += 2 * h.key_size
    escapes = blob[off : off + h.escapes]
    off += h.escapes
    payload = blob[off:-4]
    if len(payload) % 4:
        raise AtlasFormatError("Atlas stream is truncated (code stream not whole words).")
    n = h.length
    if n == 0:
        return b""
    chunks, length = layout(n)
    if chunks != h.chunks:
        raise AtlasFormatError(f"Header says {h.chunks} chunks; a book of {n} bytes has {chunks}.")
    c = master.context
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, np.uint32).copy())
    family = constriction.stream.model.Categorical(perfect=False)
    hist = np.full((chunks, c + length), master.pad, np.int32)
    xs = _coordinates(n, chunks, length)
    pos = np.arange(chunks * length).reshape(chunks, length)
    for t in range(length):
        counts = _counts(master, key, hist, xs, t)
        k = int((pos[:, t] < n).sum())
        hist[:k, c + t] = decoder.decode(family, counts[:k].astype(np.float64))
    ids = hist[:, c:].reshape(-1)[:n]
    try:
        return from_ids(master.alphabet, ids, escapes)
    except ValueError as e:
        raise AtlasFormatError(f"Atlas stream is corrupt: {e}") from e
