"""fractal-field against the libraries a user would pick instead, on identical DEQ problems.

Problems (float32 unless noted; `z0 = 0`; loss `mean(|z*|^2)`; gradient by each library's
implicit (IFT) mode):

- `A`: real state `(32, 32, 28, 28)` `[batch, channels, H, W]`,
  `f(z) = tanh(conv3x3_circular(z; W) + x)`, `W` scaled so that the EXACT operator norm of the
  circular convolution (largest singular value over the per-frequency channel matrices of the
  kernel's 2-D DFT) is 0.9; `x` standard normal. Gradient w.r.t. `W`.
- `Aprime`: the same with operator norm 0.99.
- `B_nano` / `B_cifar`: fractal-field's complex toroidal cell
  `z <- (1 - a) z + a modReLU(K z + u)` (`a = 0.5`, 3x3 complex conv, spectral, exact operator
  norm 0.9 via `ff.FractalCell`'s normalisation, modReLU bias in [-0.25, -0.05]) at the Nano
  (24 channels, 14x14, batch 128) and CIFAR (64 channels, 16x16, batch 128) sizes; `u` complex
  standard normal per component. Gradient w.r.t. `(Re W, Im W, bias)`. fractal-field solves the
  complex state natively; the peers get the real/imaginary split `(2, B, C, H, W)` of the same
  map (the split is an exact re-parametrisation: same residual norms, same fixed point).

The whole batch is one state for every library (one global stopping test, one set of Anderson
weights), so every library solves the same problem.

Equal tolerance. Forward: `||f(z) - z||_2 <= 1e-4 ||f(z)||_2` (at most 100 steps).
Backward: `||g - (I - J^T) u||_2 <= 1e-4 ||g||_2` for the adjoint `u` (`g = dL/dz*`; at most
100 J^T-products, or the nearest whole number of GMRES restart cycles). Libraries whose tests
are relative use `1e-4` directly; libraries that only offer absolute (or elementwise) tests get
an absolute tolerance of `1e-4` times the float64 reference norm of the tested quantity
(`||z*||` forward, `||g||` backward), which makes the tests the same.

Reference: fractal-field `Anderson` + `ImplicitAdjoint(Anderson)` in float64 to a relative
residual of 1e-10 (forward and backward), from the float32 problem data upcast. Residuals are
recomputed independently in float64 numpy (FFT convolution), never taken from a library.

Every (library, problem) case runs in its own process (`--_worker`): forward time (solve only),
forward+backward time (value and gradient of the loss: one training step), medians over
`--repeats` runs after a warm-up (compile excluded, reported separately), forward map
evaluations and backward J^T-products (counted by an instrumented map in separate, untimed
runs), final residual, agreement with the reference, process peak RSS. Ratios are computed in
the same run.

    python benchmarks/peers.py [--problems A,Aprime,B_nano,B_cifar]
        [--libs ff,optimistix,jaxopt,torchdeq,banax] [--repeats 5] [--rounds 1] [--small]
        [--conv taps|nhwc-vjp|nhwc|nchw|fft] [--peer-conv nhwc-vjp|same|taps|nhwc|nchw|fft]

Libraries (variants in parentheses, selectable with `--libs`):

- `ff` (`ff-naive`): `ff.fixed_point`, `Anderson(history=5)` (`Naive`), `ImplicitAdjoint` with
  the same solver on the backward.
- `optimistix`: `optx.fixed_point(optx.FixedPointIteration)` (it has no Anderson), adjoint
  `optx.ImplicitAdjoint(lx.GMRES(restart=20))` (the default dense solve cannot run at this size).
- `jaxopt` (`jaxopt-fpi`): `AndersonAcceleration(history_size=5)` (`FixedPointIteration`),
  `implicit_diff=True`, `implicit_diff_solve=solve_gmres(tol=1e-4)` (the default
  `solve_normal_cg` squares the condition number).
- `torchdeq` (`torchdeq-fpi`, `torchdeq-batched`): `get_deq(f_solver="anderson",
  b_solver="anderson", ift=True)` (`"fixed_point_iter"` both ways), PyTorch CPU, 2 threads; the
  state is viewed as batch 1 so that Anderson and the stopping test are global like everyone
  else's (`torchdeq-batched`: its native per-sample mode).
- `banax` (`banax-picard`): `Implicit(Anderson(depth=5), b_solver=Anderson(depth=5))` (`Picard`
  both ways). Needs Python >= 3.12: run from the interpreter in `--py312` (default
  `.venv-peers312/bin/python` next to the repo).

Every library is offered both its Anderson and its plain-iteration configuration; "vs fastest
peer" compares with the fastest converged peer row of any configuration.

`--rounds R` runs every case R times, interleaved (round r visits the libraries in an order
rotated by r), and reports the median over rounds of the per-round medians, so slow drifts of a
noisy machine fall on every library alike; the per-round figures are kept in the JSON.

Conv formulation for problem A (`--conv` for fractal-field, `--peer-conv` for the JAX peers;
`same` = the one fractal-field uses, where the peer's autodiff allows it):

- `taps` (fractal-field's default): `ff.toroidal_correlate`, the library's channels-last
  toroidal correlation: per kernel row-shift stacked along channels, one
  `(n h w, 3 cin) @ (3 cin, 3 cout)` product, column shifts added on the output; explicit VJP
  of the same form. About 2x faster than XLA:CPU's convolution at 32 channels
  (`benchmarks/conv.py`).
- `nhwc-vjp` (the JAX peers' default: the fastest plain-`lax` formulation, already more tuned
  than what most users write): state kept NHWC, wrap padding + `lax.conv_general_dilated` with
  `("NHWC", "HWIO", "NHWC")`, and a `jax.custom_vjp` whose transpose is the same fast conv with
  the flipped, channel-swapped kernel and whose kernel gradient is 9 channel contractions.
- `nhwc`: the same conv, autodiff transposes.
- `nchw`: NCHW state and conv, autodiff (what a PyTorch-minded user writes first).
- `fft`: spectral: `rfft2`, per-frequency channel mixing, `irfft2`.

optimistix differentiates by forward mode + transposition, which a `custom_vjp` does not allow:
with a `*-vjp` or `taps` formulation it falls back to the plain `nhwc` one (noted in the
results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RTOL = 1e-4
MAX_STEPS = 100
HISTORY = 5
GMRES_RESTART = 20
REF_TOL = 1e-10
REF_MAX_STEPS = 5000

PROBLEMS = {
    "A": dict(kind="A", batch=32, channels=32, size=28, norm=0.9, seed=0),
    "Aprime": dict(kind="A", batch=32, channels=32, size=28, norm=0.99, seed=0),
    "B_nano": dict(kind="B", batch=128, channels=24, size=14, norm=0.9, seed=1),
    "B_cifar": dict(kind="B", batch=128, channels=64, size=16, norm=0.9, seed=2),
}
SMALL = {
    "A": dict(batch=2, channels=4, size=8),
    "Aprime": dict(batch=2, channels=4, size=8),
    "B_nano": dict(batch=2, channels=4, size=6),
    "B_cifar": dict(batch=2, channels=6, size=8),
}
LIBS = ["ff", "optimistix", "jaxopt", "torchdeq", "banax"]
ALL_LIBS = LIBS + [
    "ff-naive",
    "ff-complex",
    "jaxopt-fpi",
    "torchdeq-fpi",
    "torchdeq-batched",
    "banax-picard",
]
CONVS = ["taps", "nhwc-vjp", "nhwc", "nchw", "fft"]
PEER_OF = {"ff": None, "ff-naive": None, "ff-complex": None}  # everything else is a peer


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _median(times):
    return 1e3 * statistics.median(times)


#
# Problem data and the independent float64 numpy maps (no JAX, no torch).
#


def np_spectrum(w: np.ndarray, h: int, wd: int) -> np.ndarray:
    """`S[o, i, fy, fx] = sum_ab w[o, i, a, b] exp(2 pi i (fy (a - c) / h + fx (b - c) / wd))`:
    the per-frequency channel matrices of the circular cross-correlation with `w`."""
    k = w.shape[-1]
    a = np.arange(k) - k // 2
    py = np.exp(2j * np.pi * np.outer(a, np.arange(h)) / h)
    px = np.exp(2j * np.pi * np.outer(a, np.arange(wd)) / wd)
    return np.einsum("oiab,ay,bx->oiyx", w.astype(np.complex128), py, px)


def np_opnorm(w: np.ndarray, h: int, wd: int) -> float:
    s = np_spectrum(w, h, wd)
    return float(np.linalg.svd(np.transpose(s, (2, 3, 0, 1)), compute_uv=False).max())


def np_conv(z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Circular cross-correlation of `z (B, C, H, W)` via the spectrum `s (O, C, H, W)`."""
    zf = np.fft.fft2(z.astype(np.complex128))
    return np.fft.ifft2(np.einsum("oiyx,biyx->boyx", s, zf))


def np_map(data: dict, z: np.ndarray) -> np.ndarray:
    """The problem's map in float64/complex128 numpy (`z` in NCHW, complex for B)."""
    if data["kind"] == "A":
        s = np_spectrum(data["W"].astype(np.float64), *z.shape[-2:])
        return np.tanh(np_conv(z, s).real + data["x"].astype(np.float64))
    w = data["w_re"].astype(np.float64) + 1j * data["w_im"].astype(np.float64)
    s = np_spectrum(w, *z.shape[-2:])
    u = np_conv(z, s) + (data["u_re"].astype(np.float64) + 1j * data["u_im"].astype(np.float64))
    b = np.minimum(data["bias"].astype(np.float64), 0.0)[None, :, None, None]
    r = np.sqrt(u.real**2 + u.imag**2 + 1e-12)
    act = np.maximum(r + b, 0.0) / r * u
    a = float(data["alpha"])
    return (1 - a) * z + a * act


def rel_residual(data: dict, z: np.ndarray) -> float:
    z = z.astype(np.complex128 if data["kind"] == "B" else np.float64)
    fz = np_map(data, z)
    return float(np.linalg.norm(fz - z) / np.linalg.norm(fz))


def make_data(name: str, small: bool) -> dict:
    """Problem data as numpy arrays (float32 / complex64 parameters, the problem's dtype)."""
    p = dict(PROBLEMS[name])
    if small:
        p.update(SMALL[name])
    b, c, n = p["batch"], p["channels"], p["size"]
    rng = np.random.default_rng(p["seed"])
    data = dict(kind=p["kind"], name=name, batch=b, channels=c, size=n)
    if p["kind"] == "A":
        w = rng.standard_normal((c, c, 3, 3))
        w = (w * (p["norm"] / np_opnorm(w, n, n))).astype(np.float32)
        data["W"] = w
        data["x"] = rng.standard_normal((b, c, n, n)).astype(np.float32)
        data["opnorm"] = np_opnorm(w.astype(np.float64), n, n)
        return data
    # B: fractal-field's own cell and normalisation (needs JAX + fractal_field).
    import jax

    import fractal_field as ff

    cell = ff.FractalCell(
        c,
        gamma=p["norm"],
        norm_grid=(n, n),
        activation="modrelu",
        alpha=0.5,
        key=jax.random.PRNGKey(p["seed"]),
    ).normalized()
    w = np.asarray(cell.conv.weight)[0]  # (C, C, 3, 3) complex64, one dilation
    data["w_re"] = np.ascontiguousarray(w.real).astype(np.float32)
    data["w_im"] = np.ascontiguousarray(w.imag).astype(np.float32)
    data["bias"] = (-(0.05 + 0.2 * rng.uniform(size=c))).astype(np.float32)
    data["u_re"] = rng.standard_normal((b, c, n, n)).astype(np.float32)
    data["u_im"] = rng.standard_normal((b, c, n, n)).astype(np.float32)
    data["alpha"] = 0.5
    wd = data["w_re"].astype(np.float64) + 1j * data["w_im"].astype(np.float64)
    data["opnorm"] = np_opnorm(wd, n, n)
    return data


def params_np(data: dict) -> list[np.ndarray]:
    if data["kind"] == "A":
        return [data["W"]]
    return [data["w_re"], data["w_im"], data["bias"]]


def n_state(data: dict) -> int:
    return data["batch"] * data["channels"] * data["size"] ** 2


#
# JAX maps (imported lazily: the torch worker never imports JAX).
#


def jax_problem_a(conv: str, dtype):
    """`(prep, apply, to_layout, from_layout)` for problem A with the given conv formulation.

    `prep(W_oihw) -> P` runs once per solve (outside the loop); `apply(z, P, x)` is the map on the
    state in its layout; `to_layout`/`from_layout` convert NCHW <-> the state layout.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    def pad_nhwc(z):
        return jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")

    def conv_nhwc(z, k):  # k HWIO
        return lax.conv_general_dilated(
            pad_nhwc(z), k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    @jax.custom_vjp
    def conv_nhwc_vjp(z, k):
        return conv_nhwc(z, k)

    def _fwd(z, k):
        return conv_nhwc(z, k), (z, k)

    def _bwd(res, ct):
        z, k = res
        # Transpose of a circular correlation: correlation with the flipped, channel-swapped
        # kernel (fast NHWC conv, not autodiff's transposed conv).
        ct_z = conv_nhwc(ct, jnp.swapaxes(jnp.flip(k, (0, 1)), 2, 3))
        zp = pad_nhwc(z)
        h, w = z.shape[1], z.shape[2]
        taps = [
            jnp.einsum("nhwi,nhwo->io", zp[:, a : a + h, b : b + w, :], ct)
            for a in range(3)
            for b in range(3)
        ]
        return ct_z, jnp.stack(taps).reshape(3, 3, *taps[0].shape).astype(k.dtype)

    conv_nhwc_vjp.defvjp(_fwd, _bwd)

    nhwc = (lambda z: jnp.transpose(z, (0, 2, 3, 1)), lambda z: jnp.transpose(z, (0, 3, 1, 2)))
    ident = (lambda z: z, lambda z: z)

    if conv == "taps":
        try:
            from fractal_field import toroidal_correlate
        except ImportError:  # a peer's venv without fractal-field (banax, Python 3.12)
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "_ff_tapconv", REPO / "fractal_field" / "_tapconv.py"
            )
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            toroidal_correlate = mod.toroidal_correlate

        def c(z, k):
            return toroidal_correlate(z, k[None])

    if conv in ("nhwc-vjp", "nhwc", "taps"):
        if conv != "taps":
            c = conv_nhwc_vjp if conv == "nhwc-vjp" else conv_nhwc

        def prep(w):
            return jnp.transpose(w, (2, 3, 1, 0)).astype(dtype)  # OIHW -> HWIO

        def apply(z, k, x):
            return jnp.tanh(c(z, k) + x)

        return prep, apply, *nhwc
    if conv == "nchw":

        def prep(w):
            return w.astype(dtype)

        def apply(z, w, x):
            zp = jnp.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="wrap")
            y = lax.conv_general_dilated(
                zp, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
            )
            return jnp.tanh(y + x)

        return prep, apply, *ident
    if conv == "fft":
        cdtype = jnp.complex128 if jnp.dtype(dtype) == jnp.float64 else jnp.complex64

        def prep(w):
            o, i, k, _ = w.shape
            n = prep.size
            a = np.arange(k) - k // 2
            py = jnp.asarray(np.exp(2j * np.pi * np.outer(a, np.arange(n)) / n), cdtype)
            px = jnp.asarray(np.exp(2j * np.pi * np.outer(a, np.arange(n // 2 + 1)) / n), cdtype)
            return jnp.einsum("oiab,ay,bx->yxoi", w.astype(cdtype), py, px)

        def apply(z, s, x):
            n = z.shape[-1]
            zf = jnp.fft.rfft2(z)
            yf = jnp.einsum("yxoi,biyx->boyx", s, zf)
            return jnp.tanh(jnp.fft.irfft2(yf, s=(z.shape[-2], n)) + x)

        prep.size = None  # set by the caller (grid size)
        return prep, apply, *ident
    raise ValueError(f"unknown conv {conv!r}; choose from {CONVS}")


def jax_problem_b_split(n: int, alpha: float):
    """The B cell on the real/imag split state `(2, B, C, H, W)`, in plain jnp (the same
    spectral algorithm as ff's `SpectralOperator`): `(prep, apply)`."""
    import jax.numpy as jnp
    from jax import lax

    a_ = np.arange(3) - 1
    ph = np.exp(2j * np.pi * np.outer(a_, np.arange(n)) / n)

    def prep(params):
        w_re, w_im, bias = params
        w = lax.complex(w_re, w_im)
        p = jnp.asarray(ph, w.dtype)
        s = jnp.einsum("oiab,ay,bx->yxoi", w, p, p).reshape(n * n, *w.shape[:2])
        return s, jnp.minimum(bias, 0.0)

    def apply(zs, prepped, u):
        s, b = prepped
        z = lax.complex(zs[0], zs[1])
        bsz, c = z.shape[:2]
        zf = jnp.fft.fft2(z).reshape(bsz, c, n * n)
        y = jnp.fft.ifft2(jnp.einsum("foi,bif->bof", s, zf).reshape(bsz, c, n, n))
        y = y + lax.complex(u[0], u[1])
        r = jnp.sqrt(jnp.real(y) ** 2 + jnp.imag(y) ** 2 + 1e-12)
        act = (jnp.maximum(r + b[None, :, None, None], 0.0) / r) * y
        out = (1 - alpha) * z + alpha * act
        return jnp.stack([jnp.real(out), jnp.imag(out)]).astype(zs.dtype)

    return prep, apply


def ff_problem_b(data: dict, dtype, planar: bool = False):
    """fractal-field's own cell code, parameters `(Re W, Im W, bias)`: `(prep, apply, u)`.

    `planar=False`: `FractalCell.step_with` + `ToroidalConv.operator` on the complex state
    `(B, C, H, W)` (each field through `vmap`). `planar=True`: `FractalCell.planar_step` +
    `ToroidalConv.planar_operator` on the batched planar state `ff.to_planar(z)`
    `(2, H, W, C, B)`; the caller converts the injection in and the fixed point out."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from jax import lax

    import fractal_field as ff

    c, n = data["channels"], data["size"]
    cdtype = jnp.complex128 if jnp.dtype(dtype) == jnp.float64 else jnp.complex64
    template = ff.FractalCell(
        c,
        gamma=0.9,
        norm_grid=(n, n),
        activation="modrelu",
        alpha=float(data["alpha"]),
        key=jax.random.PRNGKey(0),
    ).normalized()

    def prep(params):
        w_re, w_im, bias = params
        w = lax.complex(w_re, w_im).astype(cdtype)[None]
        cell = eqx.tree_at(lambda t: (t.conv.weight, t.act.bias), template, (w, bias))
        # Spectrum computed once per solve.
        op = cell.conv.planar_operator(n, n) if planar else cell.conv.operator(n, n)
        return cell.act, op

    def apply(z, prepped, u):
        act, op = prepped
        cell = eqx.tree_at(lambda t: t.act, template, act)
        if planar:
            return cell.planar_step(op, z, u)
        return jax.vmap(lambda zi, ui: cell.step_with(op, zi, ui))(z, u)

    u = jnp.asarray(data["u_re"] + 1j * data["u_im"], cdtype)
    return prep, apply, u


#
# Instrumented maps for the (untimed) counting runs.
#

COUNTS = {"fwd": 0, "bwd": 0}


def _bump(key):
    def cb():
        COUNTS[key] += 1

    return cb


def count_primal(apply):
    """`apply` that counts its evaluations (forward-only runs)."""
    import jax

    def f(*a):
        jax.debug.callback(_bump("fwd"))
        return apply(*a)

    return f


def count_vjp(apply):
    """`apply` whose VJPs (J^T-products) are counted: for reverse-mode (vjp-based) adjoints."""
    import jax

    @jax.custom_vjp
    def f(*a):
        return apply(*a)

    def fwd(*a):
        out, vjp = jax.vjp(apply, *a)
        return out, vjp

    def bwd(vjp, ct):
        jax.debug.callback(_bump("bwd"))
        return vjp(ct)

    f.defvjp(fwd, bwd)
    return f


#
# Setup + float64 reference (own process).
#


def run_setup(name: str, small: bool, out_dir: pathlib.Path) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import fractal_field as ff

    t0 = time.perf_counter()
    data = make_data(name, small)
    params = [jnp.asarray(p, jnp.float64) for p in params_np(data)]
    solver = ff.Anderson(history=HISTORY)
    adj = ff.ImplicitAdjoint(solver=solver, rtol=REF_TOL, atol=0.0, max_steps=REF_MAX_STEPS)
    kw = dict(solver=solver, adjoint=adj, max_steps=REF_MAX_STEPS, rtol=REF_TOL, atol=0.0)
    if data["kind"] == "A":
        prep, apply, to_l, from_l = jax_problem_a("nchw", jnp.float64)
        x = jnp.asarray(data["x"], jnp.float64)

        def solve(params):
            sol = ff.fixed_point(
                lambda z, a: apply(z, *a), jnp.zeros_like(x), (prep(params[0]), x), **kw
            )
            return sol.value, sol.stats.num_steps

    else:
        prep, apply, u = ff_problem_b(data, jnp.float64)

        def solve(params):
            sol = ff.fixed_point(
                lambda z, a: apply(z, *a), jnp.zeros_like(u), (prep(params), u), **kw
            )
            return sol.value, sol.stats.num_steps

    def loss(params):
        z, steps = solve(params)
        return jnp.sum(jnp.real(z * jnp.conj(z))) / n_state(data), (z, steps)

    (lval, (z, steps)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    z = np.asarray(z)
    g_flat = np.concatenate([np.asarray(x).ravel() for x in g])
    zn = float(np.linalg.norm(z))
    n_complex = n_state(data)
    ref = dict(
        fwd_steps=int(steps),
        loss=float(lval),
        residual=rel_residual(data, z),
        z_norm=zn,
        # ||dL/dz*|| for L = sum |z|^2 / N.
        cot_norm=2 * zn / n_complex,
        g_norm=float(np.linalg.norm(g_flat)),
        seconds=time.perf_counter() - t0,
        opnorm=float(data["opnorm"]),
    )
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in data.items() if not isinstance(v, np.ndarray)}
    np.savez(out_dir / f"{name}.npz", z_ref=z, g_ref=g_flat, **arrays)
    (out_dir / f"{name}.json").write_text(json.dumps(dict(data=scalars, ref=ref)))
    return ref


def load_case(name: str, out_dir: pathlib.Path):
    meta = json.loads((out_dir / f"{name}.json").read_text())
    arr = dict(np.load(out_dir / f"{name}.npz"))
    data = dict(meta["data"])
    data.update({k: v for k, v in arr.items() if k not in ("z_ref", "g_ref")})
    return data, meta["ref"], arr["z_ref"], arr["g_ref"]


#
# JAX workers.
#


def _time_jax(fn, args, repeats):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return out, _median(times), first


def jax_case(lib: str, data: dict, ref: dict, conv: str, repeats: int) -> dict:
    """Build `solve(params) -> (z_nchw, info)` for a JAX library and measure it."""
    import jax
    import jax.numpy as jnp

    notes = []
    fatol = RTOL * ref["z_norm"]  # absolute forward tolerance equal to the relative one
    batol = RTOL * ref["cot_norm"]  # absolute backward tolerance equal to the relative one
    kind = data["kind"]
    params = [jnp.asarray(p) for p in params_np(data)]

    # --- the map, in the library's state layout: fn(z, (prep(params), inj)) -----------------
    planar = lib in ("ff", "ff-naive") and kind == "B"
    if lib.startswith("ff") and kind == "B":
        prep, apply, inj = ff_problem_b(data, jnp.float32, planar=planar)
        if planar:
            notes.append("planar batch-last state (ff.to_planar), converted inside the timing")

        def to_nchw(z):
            return z

    elif kind == "B":
        prep, apply = jax_problem_b_split(data["size"], float(data["alpha"]))
        inj = jnp.stack([jnp.asarray(data["u_re"]), jnp.asarray(data["u_im"])])

        def to_nchw(z):
            return z[0] + 1j * z[1]

        notes.append("real/imag split state")
    else:
        if lib == "optimistix" and (conv.endswith("-vjp") or conv == "taps"):
            to = "nhwc" if conv == "taps" else conv[:-4]
            notes.append(f"{conv} -> {to} (custom_vjp cannot be forward-differentiated)")
            conv = to
        prep_a, apply, to_l, to_nchw = jax_problem_a(conv, jnp.float32)
        if conv == "fft":
            prep_a.size = data["size"]
        inj = to_l(jnp.asarray(data["x"]))

        def prep(params):
            return prep_a(params[0])

        notes.append(f"conv={conv}")
    z0 = jnp.zeros_like(inj)

    def build(params, wrap):
        f = wrap(apply)
        return (lambda z, a: f(z, a[0], a[1])), (prep(params), inj)

    # --- the library's solve ----------------------------------------------------------------
    bwd_info = {}

    if lib in ("ff", "ff-naive", "ff-complex"):
        import fractal_field as ff

        s = ff.Naive() if lib == "ff-naive" else ff.Anderson(history=HISTORY)
        adj = ff.ImplicitAdjoint(solver=s, rtol=0.0, atol=batol, max_steps=MAX_STEPS, throw=False)

        def solve(params, wrap=lambda f: f, probe=None):
            fn, a = build(params, wrap)
            start = z0
            if planar:  # one conversion in, one out, per solve
                a = (a[0], ff.to_planar(a[1]))
                start = jnp.zeros_like(a[1])
            sol = ff.fixed_point(
                fn,
                start,
                a,
                solver=s,
                adjoint=adj,
                max_steps=MAX_STEPS,
                rtol=RTOL,
                atol=0.0,
                throw=False,
                stats_probe=probe,
            )
            ok = sol.result == ff.RESULTS.successful
            value = ff.from_planar(sol.value) if planar else sol.value
            return value, dict(steps=sol.stats.num_steps, ok=ok)

    elif lib == "optimistix":
        import lineax as lx
        import optimistix as optx

        class CountingGMRES(lx.GMRES):
            def compute(self, state, vector, options):
                sol, res, stats = super().compute(state, vector, options)
                jax.debug.callback(
                    lambda k: bwd_info.__setitem__("gmres_cycles", int(k)), stats["num_steps"]
                )
                return sol, res, stats

        cycles = MAX_STEPS // GMRES_RESTART + 1
        gm = dict(rtol=0.0, atol=batol, norm=optx.two_norm, restart=GMRES_RESTART, max_steps=cycles)
        s = optx.FixedPointIteration(rtol=0.0, atol=fatol, norm=optx.two_norm)
        notes.append(f"GMRES restart {GMRES_RESTART}, <= {cycles} cycles")

        def solve(params, wrap=lambda f: f, probe=None, counting=False):
            fn, a = build(params, wrap)
            linear = CountingGMRES(**gm) if counting else lx.GMRES(**gm)
            sol = optx.fixed_point(
                fn,
                s,
                z0,
                a,
                max_steps=MAX_STEPS,
                throw=False,
                adjoint=optx.ImplicitAdjoint(linear_solver=linear),
            )
            ok = sol.result == optx.RESULTS.successful
            return sol.value, dict(steps=sol.stats["num_steps"], ok=ok)

    elif lib in ("jaxopt", "jaxopt-fpi"):
        import functools

        import jaxopt
        from jaxopt import linear_solve

        gmres = functools.partial(
            linear_solve.solve_gmres,
            tol=RTOL,
            atol=0.0,
            restart=GMRES_RESTART,
            maxiter=MAX_STEPS // GMRES_RESTART,
        )
        notes.append(f"GMRES restart {GMRES_RESTART}, <= {MAX_STEPS // GMRES_RESTART} cycles")

        def solve(params, wrap=lambda f: f, probe=None):
            fn, a = build(params, wrap)
            kw = dict(maxiter=MAX_STEPS, tol=fatol, implicit_diff=True, implicit_diff_solve=gmres)
            if lib == "jaxopt":
                it = jaxopt.AndersonAcceleration(fn, history_size=HISTORY, **kw)
            else:
                it = jaxopt.FixedPointIteration(fn, **kw)
            z, state = it.run(z0, a)
            return z, dict(steps=state.iter_num, ok=state.error <= fatol)

    elif lib in ("banax", "banax-picard"):
        from banax.adjoint import Implicit
        from banax.solver import Anderson, Picard

        if lib == "banax":
            fs = Anderson(depth=HISTORY, damp=1.0, rtol=RTOL, atol=0.0, max_steps=MAX_STEPS)
            bs = Anderson(depth=HISTORY, damp=1.0, rtol=0.0, atol=batol, max_steps=MAX_STEPS)
        else:
            fs = Picard(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS)
            bs = Picard(rtol=0.0, atol=batol, max_steps=MAX_STEPS)
        adj = Implicit(solver=fs, b_solver=bs)

        def solve(params, wrap=lambda f: f, probe=None):
            fn, a = build(params, wrap)
            sol = adj((fn, (a,)), z0)
            return sol.value, dict(steps=sol.stats.steps, ok=sol.result == 0)

    else:
        raise ValueError(lib)

    n_complex = n_state(data)  # the loss is mean |z|^2 over the complex (or real) field

    def sq(z):
        return jnp.sum(jnp.real(z * jnp.conj(z))) / n_complex

    def loss(params, probe=None):
        z, info = solve(params, probe=probe)
        return sq(z), (z, info)

    fwd = jax.jit(lambda p: solve(p))
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))

    (z, info), fwd_ms, fwd_first = _time_jax(fwd, (params,), repeats)
    ((lval, (_, sinfo)), g), step_ms, step_first = _time_jax(step, (params,), repeats)

    # --- counting runs (untimed) ------------------------------------------------------------
    COUNTS.update(fwd=0, bwd=0)
    jax.block_until_ready(jax.jit(lambda p: solve(p, wrap=count_primal))(params))
    fwd_evals = COUNTS["fwd"]
    bwd_vjps = None
    extra = {}
    if lib == "optimistix":
        jax.block_until_ready(jax.jit(jax.grad(lambda p: sq(solve(p, counting=True)[0])))(params))
        k = bwd_info.get("gmres_cycles")
        if k is not None:
            # first pass: 1 matvec; each further cycle: `restart` Arnoldi + 1 residual matvec
            bwd_vjps = 1 + (k - 1) * (GMRES_RESTART + 1)
            extra["gmres_cycles"] = k
    else:
        COUNTS.update(fwd=0, bwd=0)

        def closs(p):
            z, _ = solve(p, wrap=count_vjp)
            return sq(z)

        jax.block_until_ready(jax.jit(jax.grad(closs))(params))
        bwd_vjps = COUNTS["bwd"]
    if lib.startswith("ff"):
        import fractal_field as ff

        probe = ff.backward_stats_probe()
        _, (g2, pg) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, probe)
        extra["ff_bwd_steps"] = float(pg[0])
        extra["ff_bwd_failed"] = bool(pg[2] > 0)

    return dict(
        z=np.asarray(to_nchw(z)),
        g=np.concatenate([np.asarray(t).ravel() for t in g]),
        fwd_ms=fwd_ms,
        step_ms=step_ms,
        compile_s=fwd_first - fwd_ms / 1e3 + step_first - step_ms / 1e3,
        fwd_iters=fwd_evals,
        bwd_iters=bwd_vjps,
        lib_steps=int(info["steps"]),
        converged=bool(info["ok"]),
        loss=float(lval),
        notes=notes,
        **extra,
    )


#
# torch worker.
#


def torch_case(lib: str, data: dict, ref: dict, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torchdeq import get_deq

    torch.set_num_threads(2)
    counts = {"fwd": 0, "bwd": 0}
    notes = []
    kind = data["kind"]
    batol = RTOL * ref["cot_norm"]
    n = data["size"]
    cache = {}

    def bump_bwd(grad):
        counts["bwd"] += 1

    if kind == "A":
        params = [torch.tensor(data["W"], requires_grad=True)]
        inj = torch.tensor(data["x"])

        def fmap(z):
            zp = F.pad(z, (1, 1, 1, 1), mode="circular")
            return torch.tanh(F.conv2d(zp, params[0]) + inj)

        state_shape = tuple(inj.shape)

        def to_nchw(z):
            return z.numpy()

    else:
        params = [torch.tensor(data[k], requires_grad=True) for k in ("w_re", "w_im", "bias")]
        u = torch.complex(torch.tensor(data["u_re"]), torch.tensor(data["u_im"]))
        a_ = np.arange(3) - 1
        ph = torch.tensor(
            np.exp(2j * np.pi * np.outer(a_, np.arange(n)) / n), dtype=torch.complex64
        )
        alpha = float(data["alpha"])

        def spectrum():
            # Built once per solve (per training step, with autograd on), like the JAX versions.
            if "s" not in cache:
                w = torch.complex(params[0], params[1])
                cache["s"] = torch.einsum("oiab,ay,bx->yxoi", w, ph, ph).reshape(
                    n * n, *w.shape[:2]
                )
            return cache["s"]

        def fmap(zs):
            z = torch.complex(zs[0], zs[1])
            bsz, c = z.shape[:2]
            zf = torch.fft.fft2(z).reshape(bsz, c, n * n)
            y = (
                torch.fft.ifft2(torch.einsum("foi,bif->bof", spectrum(), zf).reshape(bsz, c, n, n))
                + u
            )
            r = torch.sqrt(y.real**2 + y.imag**2 + 1e-12)
            b = torch.clamp(params[2], max=0.0)[None, :, None, None]
            out = (1 - alpha) * z + alpha * (torch.relu(r + b) / r) * y
            return torch.stack([out.real, out.imag])

        state_shape = (2, *u.shape)

        def to_nchw(z):
            z = z.numpy()
            return z[0] + 1j * z[1]

        notes.append("real/imag split state")

    batched = lib == "torchdeq-batched"
    if batched and kind == "B":
        notes.append("batched view moves the split axis: (B, 2, C, H, W)")

    def to_solver(z):  # state -> torchdeq layout (leading axis = torchdeq's batch)
        if not batched:
            return z[None]
        return z.transpose(0, 1) if kind == "B" else z

    def from_solver(z):
        if not batched:
            return z[0]
        return z.transpose(0, 1) if kind == "B" else z

    def func(zt):
        counts["fwd"] += 1
        out = to_solver(fmap(from_solver(zt)))
        if out.requires_grad:
            out.register_hook(bump_bwd)
        return out

    solver = "fixed_point_iter" if lib == "torchdeq-fpi" else "anderson"
    deq = get_deq(
        f_solver=solver,
        b_solver=solver,
        f_max_iter=MAX_STEPS,
        b_max_iter=MAX_STEPS,
        f_tol=RTOL,
        f_stop_mode="rel",
        b_tol=batol,
        b_stop_mode="abs",
        ift=True,
    )
    if batched:
        notes.append("per-sample Anderson and stopping test (max over samples)")
    z0 = to_solver(torch.zeros(state_shape))
    skw = dict(m=HISTORY)

    def forward():
        cache.clear()
        deq.eval()
        with torch.no_grad():
            zs, info = deq(func, z0, solver_kwargs=skw)
        return zs[-1], info

    bwd_stat = {}

    def bwd_writer(info):
        bwd_stat["steps"] = int(info["nstep"].max().item())
        bwd_stat["abs"] = float(info["abs_lowest"].max().item())

    def train_step():
        cache.clear()
        if kind == "B":
            spectrum()  # outside torchdeq's no_grad solve, so the weights get gradients
        for p in params:
            p.grad = None
        deq.train()
        zs, info = deq(func, z0, solver_kwargs=skw, backward_writer=bwd_writer)
        loss = (zs[-1] ** 2).sum() / n_state(data)
        loss.backward()
        return loss.detach(), info

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, _median(times), first

    (z, info), fwd_ms, _ = timed(forward)
    counts.update(fwd=0, bwd=0)
    forward()
    fwd_evals = counts["fwd"]
    (lval, tinfo), step_ms, _ = timed(train_step)
    counts.update(fwd=0, bwd=0)
    lval, tinfo = train_step()
    bwd_vjps = counts["bwd"]
    g = np.concatenate([p.grad.detach().numpy().ravel() for p in params])
    rel = info["rel_lowest"].max().item()
    return dict(
        z=to_nchw(from_solver(z).detach()),
        g=g,
        fwd_ms=fwd_ms,
        step_ms=step_ms,
        compile_s=0.0,
        fwd_iters=fwd_evals,
        bwd_iters=bwd_vjps,
        lib_steps=int(info["nstep"].max().item()),
        torchdeq_bwd_steps=bwd_stat.get("steps"),
        torchdeq_bwd_abs=bwd_stat.get("abs"),
        torchdeq_bwd_tol=batol,
        converged=bool(rel < RTOL),
        loss=float(lval),
        notes=notes,
    )


#
# One case, in its own process.
#


def run_worker(lib: str, name: str, out_dir: pathlib.Path, conv: str, peer_conv: str, repeats: int):
    data, ref, z_ref, g_ref = load_case(name, out_dir)
    t0 = time.perf_counter()
    if lib.startswith("torchdeq"):
        r = torch_case(lib, data, ref, repeats)
    else:
        c = conv if lib.startswith("ff") else (conv if peer_conv == "same" else peer_conv)
        r = jax_case(lib, data, ref, c, repeats)
    z, g = r.pop("z"), r.pop("g")
    r["residual"] = rel_residual(data, z)
    r["z_err"] = float(np.linalg.norm(z - z_ref) / np.linalg.norm(z_ref))
    r["g_err"] = float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref))
    r["peak_rss_mb"] = _peak_rss_mb()
    r["wall_s"] = time.perf_counter() - t0
    r["python"] = platform.python_version()
    return r


def _versions(lib: str) -> str:
    mods = {
        "ff": ["jax", "equinox"],
        "optimistix": ["optimistix", "lineax", "jax"],
        "jaxopt": ["jaxopt", "jax"],
        "torchdeq": ["torchdeq", "torch"],
        "banax": ["banax", "jax"],
    }[lib.split("-")[0]]
    from importlib import metadata

    out = []
    for m in mods:
        try:
            out.append(f"{m} {metadata.version(m)}")
        except Exception:  # noqa: BLE001
            out.append(f"{m} ?")
    return ", ".join(out)


#
# Driver.
#


def _python_for(lib: str, args) -> str | None:
    if not lib.startswith("banax"):
        return sys.executable
    if sys.version_info >= (3, 12):
        return sys.executable
    py = pathlib.Path(args.py312)
    return str(py) if py.exists() else None


def _subprocess(cmd, timeout):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    tail = (p.stdout + p.stderr)[-3000:]
    if p.returncode != 0:
        return None, tail
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT ") :]), f"{time.perf_counter() - t0:.0f} s"
    return None, tail


def main():
    global GMRES_RESTART
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="A,Aprime,B_nano,B_cifar")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved runs of every case")
    ap.add_argument("--small", action="store_true", help="tiny sizes, for checking")
    ap.add_argument("--conv", default="taps", choices=CONVS, help="fractal-field's conv (A)")
    ap.add_argument("--peer-conv", default="nhwc-vjp", choices=["same", *CONVS])
    ap.add_argument("--gmres-restart", type=int, default=GMRES_RESTART, help="optimistix/jaxopt")
    ap.add_argument("--py312", default=str(REPO / ".venv-peers312" / "bin" / "python"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    ap.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    ap.add_argument("--_setup", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    GMRES_RESTART = args.gmres_restart

    if args._setup:
        ref = run_setup(args._setup, args.small, pathlib.Path(args._dir))
        ref["peak_rss_mb"] = _peak_rss_mb()
        print("@@RESULT " + json.dumps(ref))
        return
    if args._worker:
        lib, name = args._worker
        r = run_worker(lib, name, pathlib.Path(args._dir), args.conv, args.peer_conv, args.repeats)
        r["versions"] = _versions(lib)
        print("@@RESULT " + json.dumps(r))
        return

    problems = [p for p in args.problems.split(",") if p]
    libs = [lib for lib in args.libs.split(",") if lib]
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"unknown problem {p!r}; choose from {list(PROBLEMS)}")
    for lib in libs:
        if lib not in ALL_LIBS:
            ap.error(f"unknown lib {lib!r}; choose from {ALL_LIBS}")

    me = str(pathlib.Path(__file__).resolve())
    common = ["--repeats", str(args.repeats), "--conv", args.conv, "--peer-conv", args.peer_conv]
    common += ["--gmres-restart", str(args.gmres_restart)]
    if args.small:
        common.append("--small")
    results = dict(
        settings=dict(
            rtol=RTOL,
            max_steps=MAX_STEPS,
            history=HISTORY,
            gmres_restart=GMRES_RESTART,
            ref_tol=REF_TOL,
            repeats=args.repeats,
            rounds=args.rounds,
            small=args.small,
            conv=args.conv,
            peer_conv=args.peer_conv,
        ),
        machine=dict(
            platform=platform.platform(), cpu_count=os.cpu_count(), python=platform.python_version()
        ),
        problems={},
        rows=[],
    )
    with tempfile.TemporaryDirectory(prefix="ff-peers-") as tmp:
        for name in problems:
            ref, msg = _subprocess(
                [sys.executable, me, "--_setup", name, "--_dir", tmp, *common], args.timeout
            )
            if ref is None:
                print(f"[{name}] reference FAILED: {msg}", flush=True)
                continue
            print(
                f"[{name}] reference: {ref['fwd_steps']} steps, residual {ref['residual']:.1e}, "
                f"||W||_op {ref['opnorm']:.4f} ({msg})",
                flush=True,
            )
            meta = json.loads((pathlib.Path(tmp) / f"{name}.json").read_text())["data"]
            results["problems"][name] = dict(data=meta, ref=ref)
            rows = {lib: dict(lib=lib, problem=name) for lib in libs}
            runs = {lib: [] for lib in libs}
            for rnd in range(args.rounds):
                order = libs[rnd % len(libs) :] + libs[: rnd % len(libs)]
                for lib in order:
                    row = rows[lib]
                    py = _python_for(lib, args)
                    if py is None:
                        row["status"] = "not run (needs Python >= 3.12)"
                    elif row.get("status") != "failed":
                        cmd = [py, me, "--_worker", lib, name, "--_dir", tmp, *common]
                        r, msg = _subprocess(cmd, args.timeout)
                        if r is None:
                            row["status"] = "failed"
                            row["error"] = msg
                        else:
                            runs[lib].append(r)
                            row.update(_merge_rounds(runs[lib]))
                            row["status"] = "ok" if r["converged"] else "not converged"
                    tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
                    print(f"[{name}] {lib}{tag}: {row['status']} {_brief(row)}", flush=True)
                    if row["status"] == "failed":
                        err = row["error"].strip().replace("\n", "\n    ")[-1500:]
                        print("    " + err, flush=True)
                    # Write after every case, so an interrupted run keeps what it measured.
                    partial = results["rows"] + [rows[x] for x in libs if "status" in rows[x]]
                    _ratios(partial)
                    _write(args.out, dict(results, rows=partial))
            for lib in libs:
                results["rows"].append(rows[lib])
            _ratios(results["rows"])
            _write(args.out, results)
    _ratios(results["rows"])
    _write(args.out, results)
    print()
    print(table(results))


def _merge_rounds(runs: list[dict]) -> dict:
    """The last run's record, with timings replaced by their median over the runs so far."""
    out = dict(runs[-1])
    for key in ("fwd_ms", "step_ms"):
        vals = [r[key] for r in runs]
        out[key] = statistics.median(vals)
        if len(runs) > 1:
            out[f"{key}_rounds"] = vals
    return out


def _brief(row):
    if "fwd_ms" not in row:
        return ""
    return f"fwd {row['fwd_ms']:.1f} ms, step {row['step_ms']:.1f} ms"


def _ratios(rows):
    for name in {r["problem"] for r in rows}:
        rs = [r for r in rows if r["problem"] == name and "fwd_ms" in r]
        peers = [r for r in rs if not r["lib"].startswith("ff") and r["status"] == "ok"]
        for key in ("fwd_ms", "step_ms"):
            best = min((r[key] for r in peers), default=None)
            for r in rs:
                r[f"{key[:-3]}_vs_fastest_peer"] = None if best is None else r[key] / best


def _write(path, results):
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(results, indent=2))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results) -> str:
    head = (
        "| lib | problem | fwd ms | fwd+bwd ms | fwd iters | bwd iters | residual | "
        "\\|z-z_ref\\|/\\|z_ref\\| | \\|g-g_ref\\|/\\|g_ref\\| | peak RSS MB | "
        "vs fastest peer (fwd / fwd+bwd) | notes |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results["rows"]:
        if "fwd_ms" not in r:
            lines.append(f"| {r['lib']} | {r['problem']} | {r['status']} |" + " |" * 9)
            continue
        notes = list(r.get("notes", []))
        if r["status"] != "ok":
            notes.insert(0, "**" + r["status"] + "**")
        ratio = (
            "-"
            if r.get("fwd_vs_fastest_peer") is None
            else f"{r['fwd_vs_fastest_peer']:.2f} / {r['step_vs_fastest_peer']:.2f}"
        )
        bwd = _fmt(r.get("bwd_iters"), "d")
        if r["lib"] == "optimistix" and r.get("bwd_iters") is not None:
            bwd = f"~{bwd}"
        lines.append(
            f"| {r['lib']} | {r['problem']} | {r['fwd_ms']:.1f} | {r['step_ms']:.1f} | "
            f"{r['fwd_iters']} | {bwd} | {r['residual']:.1e} | {r['z_err']:.1e} | "
            f"{r['g_err']:.1e} | {r['peak_rss_mb']:.0f} | {ratio} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
