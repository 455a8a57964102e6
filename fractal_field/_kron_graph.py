"""Kronecker powers of lower-triangular layer graphs: adjacency, labels and evaluation plans."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import numpy as np


def check_adjacency(adjacency, name: str = "adjacency") -> np.ndarray:
    """`adjacency` as a 0/1 integer matrix, or a clear error: it must be square, binary,
    lower-triangular (row `i` lists the inputs of node `i`) with a full diagonal (every node
    runs its layer)."""
    a = np.asarray(adjacency)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {a.shape}.")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name} must hold numbers 0/1, got dtype {a.dtype}.")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold only 0 and 1, got {sorted(set(a.ravel().tolist()))}.")
    upper = np.argwhere(np.triu(a, 1))
    if len(upper):
        i, j = upper[0]
        raise ValueError(
            f"{name} must be lower-triangular (node i may only read nodes j < i), but "
            f"{name}[{i}, {j}] = 1 ({len(upper)} entr{'y' if len(upper) == 1 else 'ies'} above "
            "the diagonal)."
        )
    missing = np.flatnonzero(np.diag(a) == 0)
    if len(missing):
        raise ValueError(
            f"{name} must have ones on the diagonal (each node runs its layer); node(s) "
            f"{missing.tolist()} have a zero."
        )
    return a.astype(np.int64)


def kron_adjacency(adjacency, k_or_other=2) -> np.ndarray:
    """The Kronecker power `A ⊗ A ⊗ ... ⊗ A` (`k` factors), or `A ⊗ B` for a second matrix.

    Node `(i, j)` of `A ⊗ B` is node `i * len(B) + j`; it reads node `(i', j')` when `A[i, i']`
    and `B[j, j']` are both 1. The result is again lower-triangular with a full diagonal.
    """
    a = check_adjacency(adjacency)
    if isinstance(k_or_other, (int, np.integer)) and not isinstance(k_or_other, bool):
        k = int(k_or_other)
        if k < 1:
            raise ValueError(f"kron_adjacency: the order k must be >= 1, got {k}.")
        return functools.reduce(np.kron, [a] * k)
    b = check_adjacency(k_or_other, "second adjacency")
    return np.kron(a, b)


def _as_names(names, what: str = "names") -> tuple[str, ...]:
    if isinstance(names, str):
        names = tuple(names)
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must be a non-empty sequence of non-empty strings, got {names!r}.")
    return names


def _word(*parts: str) -> str:
    """Product in the string semiring: concatenation, with "1" the unit and "0" absorbing."""
    if "0" in parts:
        return "0"
    letters = "".join(p for p in parts if p != "1")
    return letters or "1"


def kron_labels(names, k_or_other=2, *, adjacency=None):
    """Node labels of a Kronecker graph: the words `names[i] names[j] ...` of each node, in node
    order (`kron_labels("abc", 2) == ("aa", "ab", "ac", "ba", ..., "cc")`).

    With `adjacency` (the base matrix, or a pair `(A, B)` when `k_or_other` is a second list of
    names) the whole string table is returned instead: the Kronecker power of the string matrix
    that has the names on its diagonal, "1" on edges and "0" elsewhere, multiplying by
    concatenation ("1" is the unit, "0" absorbs). Its diagonal holds the node labels; an edge
    entry spells the layers of the factors that stay on their node along that edge.
    """
    first = _as_names(names)
    if isinstance(k_or_other, (int, np.integer)) and not isinstance(k_or_other, bool):
        if k_or_other < 1:
            raise ValueError(f"kron_labels: the order k must be >= 1, got {k_or_other}.")
        factors = [first] * int(k_or_other)
    else:
        factors = [first, _as_names(k_or_other, "second names")]
    if adjacency is None:
        return tuple("".join(w) for w in itertools.product(*factors))
    if len(factors) == 2 and factors[1] is not first:
        if not (isinstance(adjacency, tuple) and len(adjacency) == 2):
            raise TypeError("kron_labels(names_a, names_b, adjacency=(A, B)) needs both matrices.")
        mats = [check_adjacency(m) for m in adjacency]
    else:
        mats = [check_adjacency(adjacency)] * len(factors)
    tables = []
    for n, m in zip(factors, mats, strict=True):
        if len(n) != len(m):
            raise ValueError(f"{len(n)} names for a {len(m)}-node adjacency.")
        t = np.where(m == 1, "1", "0").astype(object)
        t[np.diag_indices(len(n))] = n
        tables.append(t)
    out = tables[0]
    for t in tables[1:]:
        out = np.array(
            [
                [
                    _word(out[i // len(t), j // len(t)], t[i % len(t), j % len(t)])
                    for j in range(len(out) * len(t))
                ]
                for i in range(len(out) * len(t))
            ],
            dtype=object,
        )
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to evaluate a Kronecker graph of `sizes` (one base size per factor)."""

    adjacency: np.ndarray  # (V, V) 0/1
    digits: np.ndarray  # (V, P): node v's index in factor p
    levels: tuple[np.ndarray, ...]  # nodes grouped by longest-path depth; level 0 = sources
    preds: tuple[tuple[int, ...], ...]


@functools.lru_cache(maxsize=64)
def make_plan(adjacencies: tuple[tuple[tuple[int, ...], ...], ...]) -> Plan:
    """A `Plan` for the Kronecker product of the given (hashable) base adjacencies."""
    mats = [np.asarray(a, np.int64) for a in adjacencies]
    adj = functools.reduce(np.kron, mats)
    sizes = [len(m) for m in mats]
    digits = np.array(list(itertools.product(*[range(n) for n in sizes])), np.int64)
    v = len(adj)
    preds = tuple(tuple(np.flatnonzero(adj[i, :i]).tolist()) for i in range(v))
    depth = np.zeros(v, np.int64)
    for i in range(v):
        depth[i] = 1 + max((depth[j] for j in preds[i]), default=-1)
    levels = tuple(np.flatnonzero(depth == d) for d in range(depth.max() + 1))
    return Plan(adj, digits.reshape(v, len(sizes)), levels, preds)


def as_key(adjacency: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in np.asarray(adjacency))


def repeat_factors(items: Sequence, order: int) -> list:
    """Factor `p` of an order-`order` product uses base `p mod len(items)`."""
    return [items[p % len(items)] for p in range(order)]
