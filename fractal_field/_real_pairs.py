"""Evaluating a traced JAX computation with every complex value as a real/imaginary pair.

`real_pairs(fn, *args)` traces `fn` once and returns a function of the same (real) inputs that
replays the trace primitive by primitive, carrying each complex intermediate as two real
arrays: complex products, divisions and matrix products become real ones, FFTs become
products with DFT matrices, a complex linear solve becomes the real solve of its `2n x 2n`
embedding, and loops and conditionals are rebuilt with real carries. Everything real is
replayed unchanged. The replay is itself traceable, so an exporter that has no complex
numbers (ONNX) sees a real program that computes the same values to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from ._loop import plain_batching


class Pair(NamedTuple):
    """A complex array as its real and imaginary parts (a pytree of two real arrays)."""

    re: Any
    im: Any


def _is_complex(aval) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.complexfloating)


def _split(x, aval=None):
    """A complex constant or input as a `Pair`; anything else unchanged."""
    dtype = getattr(aval, "dtype", None) or getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        real = jnp.finfo(dtype).dtype
        if not isinstance(x, jax.core.Tracer):  # a constant: split it now, not in the trace
            x = np.asarray(x, dtype)
            return Pair(np.real(x).astype(real), np.imag(x).astype(real))
        return Pair(jnp.real(x), jnp.imag(x))
    return x


def _parts(args, part: str):
    """The real (`"re"`) or imaginary (`"im"`) operands of a componentwise op: pairs give that
    part, real floats are complex numbers with zero imaginary part, integers and booleans
    (indices, predicates) stay as they are."""
    out = []
    for a in args:
        if isinstance(a, Pair):
            out.append(getattr(a, part))
        elif part == "im" and jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            out.append(jnp.zeros_like(a))
        else:
            out.append(a)
    return out


def _real_params(params: dict) -> dict:
    """Complex dtypes named in a primitive's parameters (e.g. `preferred_element_type`), made
    real."""
    out = dict(params)
    for k, v in params.items():
        is_dtype = isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic))
        if is_dtype and jnp.issubdtype(v, jnp.complexfloating):
            out[k] = jnp.finfo(v).dtype
    return out


# Primitives that act on real and imaginary parts separately (linear in the data, with
# integer/boolean operands such as indices and predicates passed through).
_COMPONENTWISE = {
    "add",
    "add_any",
    "sub",
    "neg",
    "broadcast_in_dim",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "dynamic_update_slice",
    "concatenate",
    "rev",
    "pad",
    "select_n",
    "gather",
    "scatter",
    "reduce_sum",
    "cumsum",
    "copy",
    "copy_p",
    "stop_gradient",
    "split",
}


def _componentwise(eqn, args):
    p = _real_params(eqn.params)
    prim = eqn.primitive
    re, im = prim.bind(*_parts(args, "re"), **p), prim.bind(*_parts(args, "im"), **p)
    if prim.multiple_results:
        return [Pair(r, i) for r, i in zip(re, im, strict=True)]
    return Pair(re, im)


def _as_pair(x) -> Pair:
    if isinstance(x, Pair):
        return x
    x = jnp.asarray(x)
    return Pair(x, jnp.zeros_like(x))


def _mul(eqn, args):
    a, b = args
    if not isinstance(a, Pair):
        return Pair(a * b.re, a * b.im)
    if not isinstance(b, Pair):
        return Pair(a.re * b, a.im * b)
    return Pair(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re)


def _div(eqn, args):
    a, b = args
    if not isinstance(b, Pair):
        return Pair(a.re / b, a.im / b)
    a = _as_pair(a)
    den = b.re * b.re + b.im * b.im
    return Pair((a.re * b.re + a.im * b.im) / den, (a.im * b.re - a.re * b.im) / den)


def _dot_general(eqn, args):
    p = _real_params(eqn.params)

    def dot(x, y):
        return lax.dot_general_p.bind(x, y, **p)

    a, b = args
    if not isinstance(a, Pair):
        return Pair(dot(a, b.re), dot(a, b.im))
    if not isinstance(b, Pair):
        return Pair(dot(a.re, b), dot(a.im, b))
    return Pair(dot(a.re, b.re) - dot(a.im, b.im), dot(a.re, b.im) + dot(a.im, b.re))


def _conj(eqn, args):
    (a,) = args
    a = _as_pair(a)
    return Pair(a.re, -a.im)


def _real(eqn, args):
    return args[0].re


def _imag(eqn, args):
    return args[0].im


def _complex(eqn, args):
    return Pair(*args)


def _abs(eqn, args):
    (a,) = args
    return jnp.sqrt(a.re * a.re + a.im * a.im)


def _exp(eqn, args):
    (a,) = args
    r = jnp.exp(a.re)
    return Pair(r * jnp.cos(a.im), r * jnp.sin(a.im))


def _integer_pow(eqn, args):
    (a,) = args
    y = eqn.params["y"]
    if y < 1:
        raise NotImplementedError(f"complex integer_pow with exponent {y} has no real-pair rule.")
    out = a
    for _ in range(y - 1):
        out = _mul(eqn, (out, a))
    return out


def _convert(eqn, args):
    (a,) = args
    dtype = eqn.params["new_dtype"]
    if jnp.issubdtype(dtype, jnp.complexfloating):
        real = jnp.finfo(dtype).dtype
        a = _as_pair(a)
        return Pair(a.re.astype(real), a.im.astype(real))
    return a.re.astype(dtype)  # complex -> real keeps the real part, as JAX does


def _eq(eqn, args):
    a, b = map(_as_pair, args)
    return (a.re == b.re) & (a.im == b.im)


def _ne(eqn, args):
    return ~_eq(eqn, args)


def _batched_scatter(eqn, args):
    """`h.at[i].set(u)` under `vmap` (one index per batch element) as a scatter without
    batching dimensions (explicit `(n, i_n)` indices), or `None` for other scatters. ONNX
    exporters lack scatters with batching dimensions."""
    operand, idx, upd = args
    dn = eqn.params["dimension_numbers"]
    ndim = len(eqn.invars[0].aval.shape)
    d = dn.inserted_window_dims[0] if len(dn.inserted_window_dims) == 1 else None
    if not (
        tuple(dn.operand_batching_dims) == (0,)
        and tuple(dn.scatter_indices_batching_dims) == (0,)
        and tuple(dn.inserted_window_dims) == tuple(dn.scatter_dims_to_operand_dims) == (d,)
        and tuple(dn.update_window_dims) == tuple(range(1, ndim - 1))
        and tuple(eqn.invars[1].aval.shape) == (eqn.invars[0].aval.shape[0], 1)
        and eqn.params.get("update_jaxpr") is None
        and getattr(eqn.params["mode"], "name", "") != "CLIP"
    ):
        return None
    b = eqn.invars[0].aval.shape[0]
    batch = lax.broadcasted_iota(jnp.int32, (b, 1), 0)
    indices = jnp.concatenate([batch, idx.astype(jnp.int32)], axis=1)  # (b, 2): [n, i_n]
    dn = lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, ndim - 1)),
        inserted_window_dims=(0, d),
        scatter_dims_to_operand_dims=(0, d),
    )

    def scatter(o, u):
        return lax.scatter(o, indices, u, dn, mode=eqn.params["mode"])

    if isinstance(operand, Pair) or isinstance(upd, Pair):
        operand, upd = _as_pair(operand), _as_pair(upd)
        return Pair(scatter(operand.re, upd.re), scatter(operand.im, upd.im))
    return scatter(operand, upd)


def _dft(n: int, inverse: bool, dtype) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(n)
    sign = 1.0 if inverse else -1.0
    m = np.exp(sign * 2j * np.pi * (np.outer(k, k) % n) / n) / (n if inverse else 1)
    return m.real.astype(dtype), m.imag.astype(dtype)


def _fft(eqn, args):
    (a,) = args
    kind = int(eqn.params["fft_type"])  # lax.FftType: FFT 0, IFFT 1, RFFT 2, IRFFT 3
    if kind not in (0, 1):
        raise NotImplementedError(f"fft_type={kind} has no real-pair rule (only FFT and IFFT).")
    inverse = kind == 1
    a = _as_pair(a)
    lengths = eqn.params["fft_lengths"]
    shape = eqn.invars[0].aval.shape
    dtype = jnp.finfo(eqn.invars[0].aval.dtype).dtype
    for axis in range(len(shape) - len(lengths), len(shape)):
        fr, fi = _dft(shape[axis], inverse, dtype)

        def along(x, m, axis=axis):  # the DFT matrix is symmetric: apply it on `axis`
            return jnp.moveaxis(jnp.tensordot(x, m, axes=((axis,), (0,))), -1, axis)

        a = Pair(along(a.re, fr) - along(a.im, fi), along(a.re, fi) + along(a.im, fr))
    return a


def _solve(eqn, args):
    """`jnp.linalg.solve(a, b)`: Gauss-Jordan elimination, on the real `2n x 2n` embedding
    `[[Re a, -Im a], [Im a, Re a]]` for complex operands."""
    a, b = args
    n = eqn.invars[0].aval.shape[-1]
    vector = eqn.invars[1].aval.ndim == eqn.invars[0].aval.ndim - 1
    axis = -1 if vector else -2  # the axis of `b` that `a` acts on
    pair = isinstance(a, Pair) or isinstance(b, Pair)
    if pair:
        a, b = _as_pair(a), _as_pair(b)
        top = jnp.concatenate([a.re, -a.im], axis=-1)
        a = jnp.concatenate([top, jnp.concatenate([a.im, a.re], axis=-1)], axis=-2)
        b = jnp.concatenate([b.re, b.im], axis=axis)
    size = 2 * n if pair else n
    x = _gauss_jordan(jnp.concatenate([a, b[..., None] if vector else b], axis=-1), size)
    x = x[..., 0] if vector else x
    if pair:
        return Pair(*jnp.split(x, [n], axis=axis))
    return x


def _gauss_jordan(m, n: int):
    """The solution of the augmented system `m = [a | b]` (`(..., n, n + k)`), by Gauss-Jordan
    elimination with partial pivoting, unrolled (`n` is small): elementwise operations and
    reductions only, which any runtime has (`jnp.linalg.solve`'s LU and its platform-dependent
    pivoting have no ONNX form)."""
    rows = np.arange(n)
    zero, one = jnp.zeros((), m.dtype), jnp.ones((), m.dtype)  # (no Python scalars in wheres)
    for k in range(n):
        below = jnp.where(rows >= k, jnp.abs(m[..., :, k]), -one)
        hit = rows == jnp.argmax(below, axis=-1)[..., None]  # (..., n): the pivot row
        pivot = jnp.sum(jnp.where(hit[..., None], m, zero), axis=-2)
        here = m[..., k, :]
        # Swap rows k and pivot, then clear column k in every other row.
        m = jnp.where(hit[..., None], here[..., None, :], m)
        m = jnp.where((rows == k)[:, None], pivot[..., None, :], m)
        factor = m[..., :, k] / pivot[..., k, None]
        m = m - jnp.where((rows == k)[:, None], zero, factor[..., None] * pivot[..., None, :])
    diagonal = jnp.sum(jnp.where(np.eye(n, dtype=bool), m[..., :, :n], zero), axis=-1)
    return m[..., :, n:] / diagonal[..., None]


_RULES: dict[str, Callable] = {
    "mul": _mul,
    "div": _div,
    "dot_general": _dot_general,
    "conj": _conj,
    "real": _real,
    "imag": _imag,
    "complex": _complex,
    "abs": _abs,
    "exp": _exp,
    "integer_pow": _integer_pow,
    "convert_element_type": _convert,
    "eq": _eq,
    "ne": _ne,
    "fft": _fft,
}


def _flat(values) -> tuple[list, Any]:
    return jax.tree_util.tree_flatten(list(values))


def _closed(j) -> tuple[Any, list]:
    """`(jaxpr, consts)` of a `ClosedJaxpr` or an open `Jaxpr`."""
    return (j.jaxpr, list(j.consts)) if hasattr(j, "consts") else (j, [])


def _while(eqn, args, live=None):
    """`lax.while_loop` with real carries. `live[i]`: whether the loop's `i`-th result is used
    later (unused carries, e.g. a solver's internal state, need no per-element select)."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = args[:cn], args[cn : cn + bn], args[cn + bn :]
    cj, cc = _closed(p["cond_jaxpr"])
    bj, bc = _closed(p["body_jaxpr"])

    def pred(c):
        return _eval(cj, cc, [*cconsts, *c])[0]

    # A batched predicate (a `vmap`ped loop): as in JAX's lowering, elements whose predicate is
    # false keep their carry. Only the carries the predicate reads or the program uses later
    # need that: the others' values in finished elements never reach either (the elements of
    # a `vmap`ped body do not mix).
    read = _used(cj)
    frozen = [(live is None or live[i]) or (v in read) for i, v in enumerate(cj.invars[cn:])]

    def body(c):
        new = _eval(bj, bc, [*bconsts, *c])
        if cj.outvars[0].aval.shape:
            keep = pred(c)
            new = [
                jax.tree_util.tree_map(lambda n, o: _select(keep, n, o), n, o) if f else n
                for n, o, f in zip(new, c, frozen, strict=True)
            ]
        return new

    return lax.while_loop(lambda c: jnp.any(pred(c)), body, list(init))


def _select(pred, new, old):
    pred = jnp.reshape(pred, pred.shape + (1,) * (jnp.ndim(new) - pred.ndim))
    if jnp.result_type(new) == jnp.bool_:  # logic, not a select (ONNX Runtime has no boolean Where)
        return (pred & new) | (~pred & old)
    return jnp.where(pred, new, old)


def _scan(eqn, args):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = args[:nc], args[nc : nc + ncarry], args[nc + ncarry :]
    jaxpr, jconsts = _closed(p["jaxpr"])

    def body(carry, x):
        out = _eval(jaxpr, jconsts, [*consts, *carry, *x])
        return out[:ncarry], out[ncarry:]

    if p["length"] == 1:  # no loop for one step
        carry, ys = body(list(init), jax.tree_util.tree_map(lambda a: a[0], list(xs)))
        return [*carry, *jax.tree_util.tree_map(lambda a: a[None], ys)]

    carry, ys = lax.scan(
        body, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys]


def _cond(eqn, args):
    index, *ops = args
    branches = [_closed(b) for b in eqn.params["branches"]]
    if not isinstance(index, jax.core.Tracer):  # known now (e.g. a platform test): inline
        jaxpr, consts = branches[int(np.clip(index, 0, len(branches) - 1))]
        return _eval(jaxpr, consts, ops)
    fns = [lambda *o, j=j, c=c: _eval(j, c, list(o)) for j, c in branches]
    return lax.switch(index, fns, *ops)


def _inline(eqn, args):
    p = eqn.params
    j = p.get("call_jaxpr", p.get("jaxpr"))
    if eqn.primitive.name in ("jit", "pjit") and p.get("name") == "solve" and len(args) == 2:
        # `jnp.linalg.solve`: its LU has no real-pair rule and no ONNX form.
        return [_solve(eqn, args)]
    jaxpr, consts = _closed(j)
    return _eval(jaxpr, consts, list(args))


_HIGHER_ORDER: dict[str, Callable] = {
    "while": _while,
    "cond": _cond,
    "scan": _scan,
    "jit": _inline,
    "pjit": _inline,
    "closed_call": _inline,
    "core_call": _inline,
    "remat": _inline,
    "checkpoint": _inline,
    "custom_jvp_call": _inline,
    "custom_vjp_call": _inline,
    "custom_vjp_call_jaxpr": _inline,
}


def _platform_index(eqn, args):
    """`lax.platform_dependent`'s choice: the default implementation (or the CPU one), since
    the exported program runs on none of the platforms JAX distinguishes."""
    platforms = eqn.params["platforms"]
    for i, names in enumerate(platforms):
        if names is None or "cpu" in names:
            return np.int32(i)
    raise NotImplementedError(f"platform_index over {platforms} has no default to export.")


def _foldable(eqn, args) -> bool:
    """Whether a real primitive can run now on constant operands: all known, and no output
    larger than the largest operand (no large constants are created)."""
    if eqn.primitive.name in _HIGHER_ORDER or any(isinstance(a, jax.core.Tracer) for a in args):
        return False
    biggest = max([int(np.size(a)) for a in args], default=0)
    return all(np.prod(v.aval.shape, dtype=int) <= max(biggest, 1) for v in eqn.outvars)


def _optimization_barrier(eqn, args):
    flat, tree = _flat(args)
    return jax.tree_util.tree_unflatten(tree, lax.optimization_barrier(flat))


def _used(jaxpr) -> set:
    """The variables a jaxpr reads (in its equations or as outputs)."""
    refs = [v for e in jaxpr.eqns for v in e.invars] + list(jaxpr.outvars)
    return {v for v in refs if not isinstance(v, jex.Literal)}


def _read(env: dict, v):
    if isinstance(v, jex.Literal):
        return _split(v.val, v.aval)
    return env[v]


def _eval(jaxpr, consts, args) -> list:
    env: dict = {}
    used = _used(jaxpr)
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = _split(x, v.aval)
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        out = _batched_scatter(eqn, ins) if name == "scatter" else None
        if out is not None:
            pass
        elif name == "while":
            out = _while(eqn, ins, [v in used for v in eqn.outvars])
        elif name in _HIGHER_ORDER:
            out = _HIGHER_ORDER[name](eqn, ins)
        elif name == "optimization_barrier":
            out = _optimization_barrier(eqn, ins)
        elif name == "platform_index":
            out = _platform_index(eqn, ins)
        elif not any(isinstance(x, Pair) for x in ins) and not any(
            _is_complex(v.aval) for v in eqn.outvars
        ):
            if _foldable(eqn, ins):
                with jax.ensure_compile_time_eval():
                    out = eqn.primitive.bind(*ins, **eqn.params)
            else:
                out = eqn.primitive.bind(*ins, **eqn.params)
        elif name in _RULES:
            out = _RULES[name](eqn, ins)
        elif name in _COMPONENTWISE:
            out = _componentwise(eqn, ins)
        else:
            raise NotImplementedError(
                f"The primitive {name!r} on complex values has no real-pair rule."
            )
        if not eqn.primitive.multiple_results:
            out = [out]
        for v, x in zip(eqn.outvars, out, strict=True):
            if not isinstance(v, jex.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def real_pairs(fn: Callable, *example_args) -> Callable:
    """`fn` (traced once on arrays shaped like `example_args`) as a function whose complex
    intermediates are real/imaginary pairs. Complex inputs and outputs are `Pair`s."""
    with plain_batching():  # the replay knows JAX's batched loops
        closed = jax.make_jaxpr(fn)(*example_args)
    out_tree = jax.tree_util.tree_structure(jax.eval_shape(fn, *example_args))

    def replay(*args):
        flat = jax.tree_util.tree_leaves(args)
        flat = [_split(x, v.aval) for x, v in zip(flat, closed.jaxpr.invars, strict=True)]
        out = _eval(closed.jaxpr, closed.consts, flat)
        return jax.tree_util.tree_unflatten(out_tree, out)

    return replay
