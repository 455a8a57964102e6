"""Kronecker fractal networks: adjacency powers, labels and `KroneckerNet`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import fractal_field as ff

A = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # X1 = a(in); X2 = b(X1); X3 = c(X1 + X2)
B = [[1, 0], [1, 1]]  # Y1 = d(in); Y2 = e(Y1)
D = 3

# The square of A, written out: node (i, j) reads (i', j') iff A[i, i'] = A[j, j'] = 1.
A2 = np.array(
    [
        # aa ab ac ba bb bc ca cb cc
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # aa
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # ab
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # ac
        [1, 0, 0, 1, 0, 0, 0, 0, 0],  # ba
        [1, 1, 0, 1, 1, 0, 0, 0, 0],  # bb
        [1, 1, 1, 1, 1, 1, 0, 0, 0],  # bc
        [1, 0, 0, 1, 0, 0, 1, 0, 0],  # ca
        [1, 1, 0, 1, 1, 0, 1, 1, 0],  # cb
        [1, 1, 1, 1, 1, 1, 1, 1, 1],  # cc
    ]
)
# Its string table: names on the diagonal, "1" on edges, "0" elsewhere, multiplied by
# concatenation ("1" the unit): an edge entry spells the factors that stay on their node.
TABLE = [
    "aa 0  0  0  0  0  0  0  0",
    "a  ab 0  0  0  0  0  0  0",
    "a  a  ac 0  0  0  0  0  0",
    "a  0  0  ba 0  0  0  0  0",
    "1  b  0  b  bb 0  0  0  0",
    "1  1  c  b  b  bc 0  0  0",
    "a  0  0  a  0  0  ca 0  0",
    "1  b  0  1  b  0  c  cb 0",
    "1  1  c  1  1  c  c  c  cc",
]
# Inputs of each node of the square, read off A2 by hand.
PREDS2 = [[], [0], [0, 1], [0], [0, 1, 3], [0, 1, 2, 3, 4], [0, 3], [0, 1, 3, 4, 6], list(range(8))]
# ... and of A ⊗ B: nodes ad ae bd be cd ce.
PREDS_AB = [[], [0], [0], [0, 1, 2], [0, 2], [0, 1, 2, 3, 4]]


class Layer(eqx.Module):
    lin: eqx.nn.Linear

    def __init__(self, d_in=D, d_out=D, *, key):
        self.lin = eqx.nn.Linear(d_in, d_out, key=key)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class Tokenwise(eqx.Module):
    layer: Layer

    def __call__(self, x):
        return jax.vmap(self.layer)(x)


def layers(n, *, seed=0, d=D):
    return [Layer(d, d, key=k) for k in jr.split(jr.PRNGKey(seed), n)]


@eqx.filter_jit
def run_all(calls, x):
    """`[net(x, order=order, vectorise=vec) for net, order, vec in calls]`, jitted once (each
    compilation costs about a second)."""
    return [net(x, order=order, vectorise=vec) for net, order, vec in calls]


def reference(x, paths, preds, merge="node", weight=lambda v, u, s, p: 1.0):
    """Node by node from hand-written input lists; `paths[p][v]` is path `p`'s layer at `v`.

    `merge="node"`: a node's state is the mean of its paths' layers; `"output"`: every path
    runs on its own and the last nodes are averaged."""
    if merge == "output":
        runs = [
            reference(x, [path], preds, weight=lambda v, u, s, _, p=p: weight(v, u, s, p))
            for p, path in enumerate(paths)
        ]
        return sum(runs) / len(runs), runs
    xs = []
    for v, ps in enumerate(preds):
        outs = []
        for p, path in enumerate(paths):
            u = x if not ps else sum(weight(v, j, xs[j], p) * xs[j] for j in ps)
            outs.append(path[v](u))
        xs.append(sum(outs) / len(outs))
    return xs[-1]


def test_kron_adjacency_and_labels():
    np.testing.assert_array_equal(ff.kron_adjacency(A, 2), A2)
    np.testing.assert_array_equal(ff.kron_adjacency(A, 1), A)
    np.testing.assert_array_equal(ff.kron_adjacency(A, A), A2)
    a3 = ff.kron_adjacency(A, 3)
    assert a3.shape == (27, 27)
    np.testing.assert_array_equal(a3, np.kron(A2, A))
    ab = ff.kron_adjacency(A, B)
    assert ab.shape == (6, 6)
    for v, ps in enumerate(PREDS_AB):
        assert np.flatnonzero(ab[v, :v]).tolist() == ps
    assert ff.kron_labels("abc", 2) == ("aa", "ab", "ac", "ba", "bb", "bc", "ca", "cb", "cc")
    assert ff.kron_labels(["x1", "x2"], 2) == ("x1x1", "x1x2", "x2x1", "x2x2")
    assert ff.kron_labels("abc", "de") == ("ad", "ae", "bd", "be", "cd", "ce")
    assert len(ff.kron_labels("abc", 3)) == 27 and ff.kron_labels("abc", 3)[5] == "abc"
    table = ff.kron_labels("abc", 2, adjacency=A)
    assert table.tolist() == [row.split() for row in TABLE]
    # Diagonal paths: first letters `aaabbbccc`, second letters `abcabcabc`.
    diag = np.diag(table)
    assert "".join(w[0] for w in diag) == "aaabbbccc"
    assert "".join(w[1] for w in diag) == "abcabcabc"
    assert (table != "0").tolist() == A2.astype(bool).tolist()


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[1, 1], [0, 1]], "lower-triangular"),
        ([[1, 0], [1, 0]], "ones on the diagonal"),
        ([[1, 0], [2, 1]], "only 0 and 1"),
        ([[1, 0, 0], [1, 1, 0]], "square"),
    ],
)
def test_bad_adjacency(bad, match):
    with pytest.raises(ValueError, match=match):
        ff.kron_adjacency(bad, 2)
    with pytest.raises(ValueError, match=match):
        ff.KroneckerNet(bad, layers(len(bad)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="order k must be >= 1"):
        ff.kron_adjacency(A, 0)
    with pytest.raises(ValueError, match="3 nodes but 2 layers"):
        ff.KroneckerNet(A, layers(2))
    with pytest.raises(ValueError, match="edge_weights"):
        ff.KroneckerNet(A, layers(3), edge_weights="learnt")
    with pytest.raises(ValueError, match="features"):
        ff.KroneckerNet(A, layers(3), edge_weights="dynamic")
    with pytest.raises(ValueError, match=r"KroneckerNet\(order=0\) must be >= 1"):
        ff.KroneckerNet(A, layers(3), order=0)
    with pytest.raises(ValueError, match="merge"):
        ff.KroneckerNet(A, layers(3), merge="path")
    with pytest.raises(ValueError, match="order must be an integer"):
        ff.KroneckerNet(A, layers(3))(jnp.ones(D), order=0)


def test_square_matches_hand_evaluation():
    a, b, c = layers(3)
    x = jr.normal(jr.PRNGKey(1), (D,))
    paths = [[a, a, a, b, b, b, c, c, c], [a, b, c, a, b, c, a, b, c]]  # both diagonal paths
    node = ff.KroneckerNet(A, [a, b, c])
    out = ff.KroneckerNet(A, [a, b, c], merge="output")
    calls = [(n, k, vec) for n in (node, out) for k in (None, 1) for vec in (True, False)]
    got = run_all(calls, x)
    expected = reference(x, paths, PREDS2)
    # Paths kept apart: swapping the factors maps the graph onto itself, so path 2 computes
    # exactly what path 1 does.
    expected_out, (path1, path2) = reference(x, paths, PREDS2, "output")
    np.testing.assert_allclose(path1, path2, atol=1e-6)
    assert not np.allclose(expected, expected_out, atol=1e-3)
    # Order 1 is the base network c(a(x) + b(a(x))); the parameters are the same.
    xa = a(x)
    base = c(xa + b(xa))
    wants = [expected] * 2 + [base] * 2 + [expected_out] * 2 + [base] * 2
    for y, want in zip(got, wants, strict=True):
        np.testing.assert_allclose(y, want, atol=1e-6)
    assert node.labels() == ff.kron_labels("abc", 2)
    np.testing.assert_array_equal(node.adjacency(3), ff.kron_adjacency(A, 3))


def test_order_change_at_call_time():
    f = layers(3)
    x = jr.normal(jr.PRNGKey(5), (D,))
    a3 = ff.kron_adjacency(A, 3)
    preds3 = [np.flatnonzero(a3[v, :v]).tolist() for v in range(27)]
    paths = [[f[(v // 3 ** (2 - p)) % 3] for v in range(27)] for p in range(3)]
    nets = [ff.KroneckerNet(A, f, merge=m) for m in ("node", "output")]
    got = run_all([(n, 3, True) for n in nets], x)  # node by node: tested at order 2
    expected = [reference(x, paths, preds3), reference(x, paths, preds3, "output")[0]]
    for y, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(y, want, atol=1e-5)
    assert len(nets[0].plan(3).levels) == 7  # 27 nodes in 3 * (3 - 1) + 1 depth levels


def test_two_base_graphs_and_untied():
    a, b, c, d, e = layers(5)
    x = jr.normal(jr.PRNGKey(2), (D,))
    paths = [[a, a, b, b, c, c], [d, e, d, e, d, e]]
    nets = [ff.KroneckerNet((A, B), ([a, b, c], [d, e]), merge=m) for m in ("node", "output")]
    assert nets[0].order == 2 and nets[0].labels() == ("ad", "ae", "bd", "be", "cd", "ce")
    # Untied: one distinct layer per node of the square, one path.
    nine = layers(9, seed=3)
    untied = ff.KroneckerNet(ff.kron_adjacency(A, 2), nine, order=1)
    calls = [(n, None, vec) for n in nets for vec in (True, False)] + [(untied, None, True)]
    expected = [reference(x, paths, PREDS_AB), reference(x, paths, PREDS_AB, "output")[0]]
    expected = [expected[0]] * 2 + [expected[1]] * 2 + [reference(x, [nine], PREDS2)]
    for y, want in zip(run_all(calls, x), expected, strict=True):
        np.testing.assert_allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("edge_weights", [None, "static", "dynamic"])
def test_parameter_counts(edge_weights):
    per_layer = D * D + D
    tied = ff.KroneckerNet(A, layers(3), edge_weights=edge_weights, features=D)
    untied = ff.KroneckerNet(
        ff.kron_adjacency(A, 2), layers(9), order=1, edge_weights=edge_weights, features=D
    )
    extra = {None: (0, 0), "static": (9, 81), "dynamic": (9 + 3 * D, 81 + 9 * D)}[edge_weights]
    assert ff.count_params(tied) == 3 * per_layer + extra[0]
    assert ff.count_params(untied) == 9 * per_layer + extra[1]


def test_edge_weights_match_hand_evaluation():
    k1, k2, k3 = jr.split(jr.PRNGKey(4), 3)
    w = (1 + 0.5 * jr.normal(k1, (3, 3))) * jnp.asarray(A)
    q = 0.5 * jr.normal(k2, (3, D))
    # Tokens: states (T, D), layers act per token; dynamic gates are per token.
    x = jr.normal(k3, (4, D))
    tokenwise = [Tokenwise(f) for f in layers(3)]
    digits = [(v // 3, v % 3) for v in range(9)]
    paths = [[tokenwise[digits[v][p]] for v in range(9)] for p in range(2)]
    calls, expected = [], []
    for mode in ("static", "dynamic"):

        def weight(v, u, s, p, mode=mode):
            (i, j), (k, m) = digits[v], digits[u]
            g = w[i, k] * w[j, m]
            if mode == "dynamic":
                g = g * 2 * jax.nn.sigmoid(s @ q[digits[v][p]])[:, None]
            return g

        for merge in ("node", "output"):
            want = reference(x, paths, PREDS2, merge, weight)
            expected += [want[0] if merge == "output" else want] * 2
            net = ff.KroneckerNet(A, tokenwise, edge_weights=mode, features=D, merge=merge)
            net = eqx.tree_at(lambda n: n.weights, net, (w,))
            if mode == "dynamic":
                net = eqx.tree_at(lambda n: n.gates, net, (q,))
            calls += [(net, None, True), (net, None, False)]
    for y, want in zip(run_all(calls, x), expected, strict=True):
        np.testing.assert_allclose(y, want, atol=1e-5)


def test_jit_vmap_grad():
    with jax.enable_x64(True):
        a, b, c = [jax.tree_util.tree_map(lambda t: t.astype(jnp.float64), f) for f in layers(3)]
        net = ff.KroneckerNet(A, [a, b, c], edge_weights="static")
        xs = jr.normal(jr.PRNGKey(6), (5, D), jnp.float64)

        @jax.jit
        def loss(w):
            n = eqx.tree_at(lambda n: n.weights, net, (w,))
            ys = jax.vmap(n)(xs)
            return jnp.sum(ys**2), (ys[2], n(xs[2]))

        w0 = net.weights[0] + 0.1 * jr.normal(jr.PRNGKey(7), (3, 3), jnp.float64)
        (value, (batched, one)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(w0)
        np.testing.assert_allclose(value, loss(w0)[0], rtol=1e-12)
        np.testing.assert_allclose(batched, one, rtol=1e-12)  # vmap row == unbatched call
        eps = 1e-6
        for i, j in [(0, 0), (1, 0), (2, 1), (2, 2)]:
            e = jnp.zeros((3, 3), jnp.float64).at[i, j].set(eps)
            fd = (loss(w0 + e)[0] - loss(w0 - e)[0]) / (2 * eps)
            np.testing.assert_allclose(g[i, j], fd, rtol=1e-6, atol=1e-9)
        assert g[0, 1] == 0  # not an edge


def test_training_reduces_loss():
    net = ff.KroneckerNet(A, layers(3, d=4), edge_weights="static")
    k1, k2 = jr.split(jr.PRNGKey(8))
    xs = jr.normal(k1, (32, 4))
    ys = jnp.sin(xs @ jr.normal(k2, (4, 4)))
    opt = optax.adam(3e-2)

    @eqx.filter_jit
    def train(net):
        params, static = eqx.partition(net, eqx.is_array)

        def step(carry, _):
            params, state = carry
            loss_fn = lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(xs) - ys) ** 2)
            loss, g = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(g, state)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(step, (params, opt.init(params)), None, length=40)[1]

    losses = train(net)
    assert losses[-1] < 0.5 * losses[0]


def test_layers_that_do_not_chain():
    k = jr.split(jr.PRNGKey(9), 3)
    shape = lambda net, x, **kw: eqx.filter_eval_shape(lambda n, x: n(x, **kw), net, x)
    # b maps 3 -> 2: c then receives a(x) (3) + b(a(x)) (2).
    net = ff.KroneckerNet(A, [Layer(3, 3, key=k[0]), Layer(3, 2, key=k[1]), Layer(3, 3, key=k[2])])
    with pytest.raises(ValueError, match="different shapes.*do not chain"):
        shape(net, jnp.ones(3), order=1)
    # a maps 4 -> 3: fine for the base graph, but in the square path 1 runs a after a.
    net = ff.KroneckerNet(A, [Layer(4, 3, key=k[0]), Layer(3, 3, key=k[1]), Layer(3, 3, key=k[2])])
    assert shape(net, jnp.ones(4), order=1).shape == (3,)
    with pytest.raises(ValueError, match=r"node 1 \('ab'\): layer 'a' cannot take"):
        shape(net, jnp.ones(4))
    # Node merging: the two layers of node 'ab' give different shapes.
    net = ff.KroneckerNet(A, [Layer(3, 3, key=k[0]), Layer(3, 2, key=k[1]), Layer(3, 3, key=k[2])])
    with pytest.raises(ValueError, match=r"node 1 \('ab'\): its layers return different"):
        shape(net, jnp.ones(3))


def test_figures(tmp_path):
    from matplotlib.patches import PathPatch

    from fractal_field import viz

    net = ff.KroneckerNet(A, layers(3), edge_weights="static")
    fig = viz.plot_kron_graph(net, path=tmp_path / "graph.png")
    arcs = [p for p in fig.axes[1].patches if isinstance(p, PathPatch)]
    assert len(arcs) == 2 * (A2.sum() - 9)  # every edge of the square, once per path
    assert (tmp_path / "graph.png").stat().st_size > 0
    fig = viz.plot_edge_weights(net, order=3)
    assert fig.axes[1].images[0].get_array().shape == (27, 27)
    with pytest.raises(ValueError, match="no learnt edge weights"):
        viz.plot_edge_weights(ff.KroneckerNet(A, layers(3)))
