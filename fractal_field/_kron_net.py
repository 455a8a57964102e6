"""Kronecker fractal networks: a layer graph grown by Kronecker powers of its adjacency."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._kron_graph import as_key, check_adjacency, kron_labels, make_plan, repeat_factors
from ._misc import describe

EdgeWeights = Literal["static", "dynamic"] | None
Merge = Literal["node", "output"]


def _default_names(sizes: Sequence[int]) -> tuple[tuple[str, ...], ...]:
    out, start = [], 0
    for n in sizes:
        out.append(
            tuple(
                chr(ord("a") + start + i) if start + i < 26 else f"L{start + i}" for i in range(n)
            )
        )
        start += n
    return tuple(out)


class KroneckerNet(eqx.Module):
    """A network whose layer graph is the `order`-th Kronecker power of a small base graph.

    `adjacency` is the base graph: lower-triangular with ones on the diagonal; row `i` marks
    the nodes whose outputs are summed into node `i`, which then runs `layers[i]`. A node of
    the order-`k` power is a word `i_1 ... i_k` of base nodes (`kron_labels`); it reads node
    `j_1 ... j_k` when every `A[i_p, j_p]` is 1, and it has `k` *paths*: path `p` runs
    `layers[i_p]`. Down the diagonal of the square of `a -> b -> c`, path 1 runs `aaabbbccc`
    and path 2 `abcabcabc`. Nodes without inputs read the network input; the network returns
    the last node's state.

    How the paths merge (`merge`):

    - `"node"` (default): each node's state is the mean of its paths' layers applied to the
      same input (the weighted sum of its inputs' states): in the square node `ab` computes
      `(a(u) + b(u)) / 2`, so 3 layers make 18 layer calls (15 distinct: on `aa`, `bb`, `cc`
      both paths run one layer, which is called once).
    - `"output"`: each path keeps its own states and the paths are averaged at the last node.
      Swapping two factors of the same base graph maps the graph onto itself and one path onto
      the other, fixing the first and the last node, so those paths compute *the same
      function*: `aaabbbccc` and `abcabcabc` are two orderings of one data flow. Only one path
      per base graph is evaluated (9 layer calls for the square).

    Pass tuples `(A, B)` and `(layers_a, layers_b)` to combine two base graphs: path `p` then
    follows base `p mod 2` (at any `order`). The untied comparison is one base graph
    `kron_adjacency(A, k)` with its own `N^k` layers at `order=1`.

    `edge_weights`:

    - `None`: plain sums.
    - `"static"`: a learnt weight per base edge (and per diagonal entry); an edge of the power
      is weighted by the product of its factors' weights, so the same parameters serve every
      order. Initially all ones.
    - `"dynamic"`: the static weights times a gate `2 sigmoid(q . x_u)` computed from each
      incoming state `x_u` by a learnt vector `q` of the receiving layer (initially zero, so
      gate 1). States of shape `(..., features)` get one gate per leading index (per token).

    Layers take and return unbatched arrays; `vmap` the network over a batch. When all layers
    share one structure and map the input's shape to itself, the layer calls of each depth
    level (nodes whose inputs are all computed) run as one `vmap` over the stacked layers;
    otherwise (or with `vectorise=False`) one by one, with clear errors when shapes do not
    chain.
    """

    layers: tuple[tuple[PyTree, ...], ...]
    weights: tuple[Float[Array, "n n"], ...] | None
    gates: tuple[Float[Array, "n features"], ...] | None
    adjacencies: tuple[tuple[tuple[int, ...], ...], ...] = eqx.field(static=True)
    names: tuple[tuple[str, ...], ...] = eqx.field(static=True)
    order: int = eqx.field(static=True)
    edge_weights: EdgeWeights = eqx.field(static=True)
    merge: Merge = eqx.field(static=True)

    def __init__(
        self,
        adjacency,
        layers: Sequence[PyTree] | tuple[Sequence[PyTree], ...],
        order: int | None = None,
        *,
        names=None,
        edge_weights: EdgeWeights = None,
        features: int | None = None,
        merge: Merge = "node",
    ):
        if isinstance(adjacency, tuple):
            if not isinstance(layers, tuple) or len(layers) != len(adjacency):
                raise TypeError(
                    f"{len(adjacency)} base adjacencies need a tuple of as many layer lists."
                )
            mats, layer_lists = adjacency, layers
        else:
            mats, layer_lists = (adjacency,), (layers,)
        mats = tuple(check_adjacency(m, f"adjacency {b}") for b, m in enumerate(mats))
        layer_lists = tuple(tuple(ls) for ls in layer_lists)
        for b, (m, ls) in enumerate(zip(mats, layer_lists, strict=True)):
            if len(ls) != len(m):
                raise ValueError(
                    f"Base graph {b} has {len(m)} nodes but {len(ls)} layers were given."
                )
        if names is None:
            names = _default_names([len(m) for m in mats])
        else:
            names = (names,) if len(mats) == 1 else tuple(names)
            names = tuple(kron_labels(n, 1) for n in names)
            if [len(n) for n in names] != [len(m) for m in mats]:
                raise ValueError(f"names {names} do not match the base sizes.")
        order = len(mats) if order is None and len(mats) > 1 else (order or 2)
        if order < 1:
            raise ValueError(f"KroneckerNet(order={order}) must be >= 1.")
        if edge_weights not in (None, "static", "dynamic"):
            raise ValueError(f"edge_weights={edge_weights!r} must be None, 'static' or 'dynamic'.")
        if edge_weights == "dynamic" and not (isinstance(features, int) and features > 0):
            raise ValueError("edge_weights='dynamic' needs features= (the states' last axis).")
        if merge not in ("node", "output"):
            raise ValueError(f"merge={merge!r} must be 'node' or 'output'.")
        self.merge = merge
        self.layers = layer_lists
        self.adjacencies = tuple(as_key(m) for m in mats)
        self.names = names
        self.order = int(order)
        self.edge_weights = edge_weights
        self.weights = (
            None if edge_weights is None else tuple(jnp.asarray(m, jnp.float32) for m in mats)
        )
        self.gates = (
            tuple(jnp.zeros((len(m), features), jnp.float32) for m in mats)
            if edge_weights == "dynamic"
            else None
        )

    # -- the graph at a given order ------------------------------------------------------

    def _factors(self, order: int | None) -> list[int]:
        order = self.order if order is None else order
        if not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}.")
        return repeat_factors(range(len(self.adjacencies)), int(order))

    def plan(self, order: int | None = None):
        return make_plan(tuple(self.adjacencies[b] for b in self._factors(order)))

    def adjacency(self, order: int | None = None) -> np.ndarray:
        """The `(V, V)` adjacency of the graph at `order` (default: the network's)."""
        return self.plan(order).adjacency

    def labels(self, order: int | None = None) -> tuple[str, ...]:
        """Node labels at `order`: the word of layer names that node's paths run."""
        return tuple("".join(w) for w in self.path_names(order))

    def path_names(self, order: int | None = None) -> list[tuple[str, ...]]:
        factors = self._factors(order)
        return [
            tuple(self.names[b][d] for b, d in zip(factors, digits, strict=True))
            for digits in self.plan(order).digits
        ]

    def edge_matrix(self, order: int | None = None) -> Float[Array, "V V"]:
        """Weights of the edges (zero off the graph) at `order`: products of base weights."""
        factors = self._factors(order)
        mats = [
            jnp.asarray(np.asarray(self.adjacencies[b], np.float32))
            * (1.0 if self.weights is None else self.weights[b])
            for b in factors
        ]
        out = mats[0]
        for m in mats[1:]:
            out = jnp.kron(out, m)
        return out * (1 - jnp.eye(out.shape[0]))

    # -- evaluation -----------------------------------------------------------------------

    def _pairs(self, order: int | None):
        """The layer calls: arrays `(v, slot, layer, share)` (a call at node `v` adds `share`
        times its output to state slot `(v, slot)`), the slots' weights in the output, and
        each node's path names."""
        factors = self._factors(order)
        offsets = np.cumsum([0] + [len(a) for a in self.adjacencies])
        digits = self.plan(order).digits
        layer = digits + offsets[np.asarray(factors)][None, :]  # (V, P)
        k = len(factors)
        rows = []
        if self.merge == "node":
            for v in range(len(digits)):
                for li in dict.fromkeys(layer[v].tolist()):
                    rows.append((v, 0, li, np.count_nonzero(layer[v] == li) / k))
            out_weights = np.ones(1)
        else:
            # Paths of the same base are images of each other under the automorphism that
            # swaps their factors (it fixes the first and the last node), so they compute the
            # same function: evaluate one path per base, weighted by its count.
            reps = {b: p for p, b in reversed(list(enumerate(factors)))}
            reps = sorted(reps.items(), key=lambda t: t[1])
            for v in range(len(digits)):
                for r, (_, p) in enumerate(reps):
                    rows.append((v, r, int(layer[v, p]), 1.0))
            out_weights = np.array([factors.count(b) / k for b, _ in reps])
        pairs = np.array(rows, dtype=np.float64)
        return (
            pairs[:, 0].astype(np.int64),
            pairs[:, 1].astype(np.int64),
            pairs[:, 2].astype(np.int64),
            pairs[:, 3],
            out_weights,
        )

    def __call__(self, x: PyTree, *, order: int | None = None, vectorise: bool = True) -> PyTree:
        """Run the graph at `order` (default: the network's own) on one unbatched input."""
        flat = [layer for ls in self.layers for layer in ls]
        x = jnp.asarray(x)
        if vectorise and _stackable(flat, x):
            return self._run_levels(x, order, flat)
        return self._run_nodes(x, order, flat)

    def _gate(self, q, state):
        if state.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"edge_weights='dynamic' with features={q.shape[-1]} got a state of shape "
                f"{state.shape}; its last axis must be the features."
            )
        return 2 * jax.nn.sigmoid(state @ q.astype(state.dtype))

    def _run_nodes(self, x, order, flat):
        plan = self.plan(order)
        w = self.edge_matrix(order)
        labels = self.labels(order)
        pv, pr, pli, share, out_weights = self._pairs(order)
        names = [n for ns in self.names for n in ns]
        gates = None if self.gates is None else jnp.concatenate(self.gates)
        states: dict[tuple[int, int], Array] = {}
        for v, r, li, m in zip(pv, pr, pli, share, strict=True):
            preds = plan.preds[v]
            where = f"node {v} ('{labels[v]}')"
            if not preds:
                u = x
            else:
                srcs = [states[j, r] for j in preds]
                if len({(s.shape, s.dtype) for s in srcs}) > 1:
                    got = ", ".join(
                        f"node {j}: {describe(s)}" for j, s in zip(preds, srcs, strict=True)
                    )
                    raise ValueError(
                        f"{where}: the outputs summed into it have different shapes ({got})."
                        " The layers' shapes do not chain."
                    )
                u = 0
                for j, s in zip(preds, srcs, strict=True):
                    c = w[v, j].astype(s.dtype)
                    if gates is not None:
                        c = c * self._gate(gates[li], s)[..., None]
                    u = u + c * s
            layer = flat[li]
            try:
                jax.eval_shape(layer, u)
            except Exception as e:
                raise ValueError(
                    f"{where}: layer '{names[li]}' cannot take an input {describe(u)}; the "
                    f"layers' shapes do not chain ({type(e).__name__}: {e})."
                ) from e
            y = m * layer(u)
            if (v, r) in states:
                if states[v, r].shape != y.shape:
                    raise ValueError(
                        f"{where}: its layers return different shapes "
                        f"({describe(states[v, r])} and {describe(y)}); they cannot be merged."
                    )
                y = states[v, r] + y
            states[v, r] = y
        last = [states[len(plan.preds) - 1, r] for r in range(len(out_weights))]
        if len({s.shape for s in last}) > 1:
            raise ValueError(
                f"The paths end in different shapes {[s.shape for s in last]}; they cannot "
                "be averaged."
            )
        return sum(float(c) * s for c, s in zip(out_weights, last, strict=True))

    def _run_levels(self, x, order, flat):
        plan = self.plan(order)
        pv, pr, pli, share, out_weights = self._pairs(order)
        w = self.edge_matrix(order).astype(x.dtype)
        params = [eqx.filter(layer, eqx.is_array) for layer in flat]
        stacked = jtu.tree_map(lambda *a: jnp.stack(a), *params)
        static = eqx.filter(flat[0], eqx.is_array, inverse=True)
        gates = None if self.gates is None else jnp.concatenate(self.gates).astype(x.dtype)

        def apply(p, u):
            return eqx.combine(p, static)(u)

        level_of = np.zeros(len(plan.preds), np.int64)
        for d, nodes in enumerate(plan.levels):
            level_of[nodes] = d
        states = jnp.zeros((len(plan.preds), len(out_weights)) + x.shape, x.dtype)
        for d in range(len(plan.levels)):
            sel = np.flatnonzero(level_of[pv] == d)
            n = len(sel)
            v, r, li = pv[sel], pr[sel], pli[sel]
            if d == 0:
                u = jnp.broadcast_to(x, (n,) + x.shape)
            else:
                src = jnp.moveaxis(states[:, r], 1, 0)  # (n, V, ...)
                c = w[v]  # (n, V)
                if gates is not None:
                    g = 2 * jax.nn.sigmoid(jnp.einsum("nu...f,nf->nu...", src, gates[li]))
                    c = c[(...,) + (None,) * (g.ndim - 2)] * g
                c = c[(...,) + (None,) * (src.ndim - c.ndim)]
                u = jnp.sum(c * src, axis=1)
            idx = jnp.asarray(li)
            p_sel = jtu.tree_map(lambda a, idx=idx: a[idx], stacked)
            out = jax.vmap(apply)(p_sel, u)
            m = jnp.asarray(share[sel], x.dtype)[(...,) + (None,) * x.ndim]
            states = states.at[v, r].add(m * out)
        return jnp.tensordot(jnp.asarray(out_weights, x.dtype), states[-1], axes=1)


def _stackable(layers: Sequence[PyTree], x: Array) -> bool:
    """Whether all layers share one structure and map `x`'s shape and dtype to itself."""
    first = layers[0]
    p0, s0 = eqx.partition(first, eqx.is_array)
    leaves0 = jtu.tree_leaves(p0)
    for layer in layers[1:]:
        p, s = eqx.partition(layer, eqx.is_array)
        if jtu.tree_structure(p) != jtu.tree_structure(p0):
            return False
        if any(
            a.shape != b.shape or a.dtype != b.dtype
            for a, b in zip(jtu.tree_leaves(p), leaves0, strict=True)
        ):
            return False
        if not eqx.tree_equal(s, s0):
            return False
    try:
        out = jax.eval_shape(first, x)
    except Exception:
        return False
    return isinstance(out, jax.ShapeDtypeStruct) and out.shape == x.shape and out.dtype == x.dtype
