"""Independent NumPy references shared by the tests: wrap-around correlation tap by tap, exact
operator norms from dense SVDs, and the elementwise complex activations."""

import numpy as np


def np_correlate(weight, z):
    """`weight (cout, cin, k, k)` cross-correlated with `z (cin, h, w)` on the torus."""
    k = weight.shape[-1]
    c = k // 2
    out = np.zeros((weight.shape[0],) + z.shape[1:], complex)
    for a in range(k):
        for b in range(k):
            shifted = np.roll(z, (-(a - c), -(b - c)), axis=(1, 2))
            out += np.einsum("oi,ihw->ohw", weight[:, :, a, b], shifted)
    return out


def np_conv_norm(weight, h, w):
    """Exact operator norm: the largest singular value of the dense matrix of the map."""
    cin = weight.shape[1]
    n = cin * h * w
    cols = []
    for j in range(n):
        e = np.zeros(n, complex)
        e[j] = 1
        cols.append(np_correlate(weight, e.reshape(cin, h, w)).reshape(-1))
    return np.linalg.norm(np.stack(cols, 1), 2)


def np_modrelu(z, b):
    """modReLU with the per-channel bias clamped to `<= 0`, as `ff.ModReLU` does."""
    r = np.sqrt(np.abs(z) ** 2 + 1e-12)
    return np.maximum(r + np.minimum(b, 0)[:, None, None], 0) / r * z


def np_crelu(z):
    return np.maximum(z.real, 0) + 1j * np.maximum(z.imag, 0)
