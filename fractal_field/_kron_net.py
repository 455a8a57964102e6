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

    Layers take and return unbatched arrays; `vmap` the network over a batch. With
    `vectorise=True` the layer calls of one depth level (nodes whose inputs are all computed)
    are grouped: the calls of one layer run as one `vmap` over their inputs, and distinct
    layers of one structure (an untied graph) as one `vmap` over the stacked layers. The
    default, `vectorise=False`, calls the layers one by one: under `jit` XLA sees the whole
    graph either way, and on CPU the grouped form measured slower (`benchmarks/kron.py`).
    Shapes that do not chain raise a `ValueError` naming the node.
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
        if order is None:
            order = len(mats) if len(mats) > 1 else 2
        if not isinstance(order, (int, np.integer)) or order < 1:
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
        """The graph at `order`: adjacency, each node's base digits, its depth levels."""
        return make_plan(tuple(self.adjacencies[b] for b in self._factors(order)))

    def adjacency(self, order: int | None = None) -> np.ndarray:
        """The `(V, V)` adjacency of the graph at `order` (default: the network's)."""
        return self.plan(order).adjacency

    def labels(self, order: int | None = None) -> tuple[str, ...]:
        """Node labels at `order`: the word of layer names that node's paths run."""
        return tuple("".join(w) for w in self.path_names(order))

    def path_names(self, order: int | None = None) -> list[tuple[str, ...]]:
        """Per node, the layer name each of its paths runs."""
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
        """The layer calls, as arrays `(v, slot, layer, share)` in node order (a call at node
        `v` adds `share` times its output to state slot `(v, slot)`), and the slots' weights in
        the output."""
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

    def __call__(self, x: PyTree, *, order: int | None = None, vectorise: bool = False) -> PyTree:
        """Run the graph at `order` (default: the network's own) on one unbatched input."""
        x = jnp.asarray(x)
        plan = self.plan(order)
        w = self.edge_matrix(order)
        labels = self.labels(order)
        pv, pr, pli, share, out_weights = self._pairs(order)
        flat = [layer for ls in self.layers for layer in ls]
        names = [n for ns in self.names for n in ns]
        gates = None if self.gates is None else jnp.concatenate(self.gates)
        level_of = np.zeros(len(plan.preds), np.int64)
        for d, nodes in enumerate(plan.levels):
            level_of[nodes] = d
        if vectorise:
            steps = [np.flatnonzero(level_of[pv] == d) for d in range(len(plan.levels))]
        else:
            steps = [np.array([i]) for i in range(len(pv))]
        stack = vectorise and _same_structure(flat)
        states: dict[tuple[int, int], Array] = {}
        for sel in steps:
            # Each call's input: the weighted sum of its path's states at the node's inputs.
            inputs = {}
            for i in sel:
                v, r, li = pv[i], pr[i], pli[i]
                where = f"node {v} ('{labels[v]}')"
                inputs[i] = self._input(x, v, r, li, plan.preds[v], states, w, gates, where)
                _check_call(flat[li], inputs[i], f"{where}: layer '{names[li]}'")
            # Calls of one layer on inputs of one shape: one vmap over the inputs.
            groups: dict[tuple, list[int]] = {}
            for i in sel:
                groups.setdefault((pli[i], inputs[i].shape, inputs[i].dtype), []).append(i)
            outs = {}
            singles = [g[0] for g in groups.values() if len(g) == 1]
            if stack and len(singles) > 1 and len({inputs[i].shape for i in singles}) == 1:
                # Distinct layers once each (untied graphs): one vmap over stacked layers.
                ys = _stacked_call(flat, pli[singles], inputs, singles)
                outs.update(dict(zip(singles, ys, strict=True)))
                groups = {k: g for k, g in groups.items() if len(g) > 1}
            for (li, _, _), g in groups.items():
                if len(g) == 1:
                    outs[g[0]] = flat[li](inputs[g[0]])
                else:
                    ys = jax.vmap(flat[li])(jnp.stack([inputs[i] for i in g]))
                    outs.update({i: ys[k] for k, i in enumerate(g)})
            for i in sel:
                key, y = (pv[i], pr[i]), float(share[i]) * outs[i]
                if key in states:
                    if states[key].shape != y.shape:
                        raise ValueError(
                            f"node {pv[i]} ('{labels[pv[i]]}'): its layers return different "
                            f"shapes ({describe(states[key])} and {describe(y)}); they cannot "
                            "be merged."
                        )
                    y = states[key] + y
                states[key] = y
        last = [states[len(plan.preds) - 1, r] for r in range(len(out_weights))]
        if len({s.shape for s in last}) > 1:
            raise ValueError(
                f"The paths end in different shapes {[s.shape for s in last]}; they cannot "
                "be averaged."
            )
        return sum(float(c) * s for c, s in zip(out_weights, last, strict=True))

    def _input(self, x, v, r, li, preds, states, w, gates, where):
        if not preds:
            return x
        srcs = [states[j, r] for j in preds]
        if len({(s.shape, s.dtype) for s in srcs}) > 1:
            got = ", ".join(f"node {j}: {describe(s)}" for j, s in zip(preds, srcs, strict=True))
            raise ValueError(
                f"{where}: the outputs summed into it have different shapes ({got}). The "
                "layers' shapes do not chain."
            )
        u = 0
        for j, s in zip(preds, srcs, strict=True):
            c = w[v, j].astype(s.dtype)
            if gates is not None:
                q = gates[li]
                if s.shape[-1:] != q.shape:
                    raise ValueError(
                        f"{where}: edge_weights='dynamic' with features={q.shape[-1]} got a "
                        f"state {describe(s)}; its last axis must be the features."
                    )
                c = c * (2 * jax.nn.sigmoid(s @ q.astype(s.dtype)))[..., None]
            u = u + c * s
        return u


def _check_call(layer, u, where: str) -> None:
    try:
        jax.eval_shape(layer, u)
    except Exception as e:
        raise ValueError(
            f"{where} cannot take an input {describe(u)}; the layers' shapes do not chain "
            f"({type(e).__name__}: {e})."
        ) from e


def _stacked_call(flat, layer_ids, inputs, which):
    params = [eqx.filter(flat[li], eqx.is_array) for li in layer_ids]
    static = eqx.filter(flat[layer_ids[0]], eqx.is_array, inverse=True)
    stacked = jtu.tree_map(lambda *a: jnp.stack(a), *params)
    u = jnp.stack([inputs[i] for i in which])
    ys = jax.vmap(lambda p, u: eqx.combine(p, static)(u))(stacked, u)
    return [ys[k] for k in range(len(which))]


def _same_structure(layers: Sequence[PyTree]) -> bool:
    """Whether all layers share one structure (so they can be stacked and vmapped over)."""
    p0, s0 = eqx.partition(layers[0], eqx.is_array)
    leaves0 = jtu.tree_leaves(p0)
    for layer in layers[1:]:
        p, s = eqx.partition(layer, eqx.is_array)
        if jtu.tree_structure(p) != jtu.tree_structure(p0):
            return False
        leaves = jtu.tree_leaves(p)
        if any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(leaves, leaves0, strict=True)
        ):
            return False
        if not eqx.tree_equal(s, s0):
            return False
    return True
