"""Post-training quantisation: round trips, per-channel scales, the re-checked certificate."""

import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff
from fractal_field._contraction import ContractiveToroidalConv


def _weights(shape, complex_, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) * rng.uniform(0.01, 10, size=(1, shape[1], *[1] * (len(shape) - 2)))
    if complex_:
        w = w + 1j * rng.normal(size=shape) * 0.3
        return w.astype(np.complex64)
    return w.astype(np.float32)


def _qmax(bits):
    return 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("complex_", [False, True])
def test_round_trip_error_at_most_half_a_step(bits, complex_):
    w = _weights((3, 5, 2, 3), complex_)
    q = ff.QuantisedArray(w, bits, axis=1, complex_format="reim")
    assert q.shape == w.shape and q.scale.shape == (1, 5, 1, 1)
    d = np.asarray(q.dequantise())
    assert d.dtype == w.dtype
    s = np.asarray(q.scale, np.float64)
    tol = s / 2 * (1 + 1e-5) + 1e-6 * np.abs(w)
    assert np.all(np.abs(d.real - w.real) <= tol)
    assert np.all(np.abs(d.imag - w.imag) <= tol)
    # Integer range, and each channel's largest part maps to the largest integer.
    v = np.asarray(q.values).astype(int)
    assert v.min() >= -_qmax(bits) and v.max() <= _qmax(bits)
    channel = 2 if complex_ else 1  # "reim" stacks the two parts in front
    top = np.abs(v).max(axis=tuple(i for i in range(v.ndim) if i != channel))
    np.testing.assert_array_equal(top, np.full(5, _qmax(bits)))


@pytest.mark.parametrize("bits", [8, 4])
def test_polar_round_trip(bits):
    w = _weights((4, 6, 3), True, seed=1)
    q = ff.QuantisedArray(w, bits, axis=0, complex_format="polar")
    d = np.asarray(q.dequantise()).astype(np.complex128)
    s = np.asarray(q.scale, np.float64)
    mag_err = np.abs(np.abs(d) - np.abs(w))
    assert np.all(mag_err <= s / 2 * (1 + 1e-5) + 1e-6 * np.abs(w))
    big = np.abs(d) > 0
    dphi = np.angle(d[big] * np.conj(w[big]))
    assert np.all(np.abs(dphi) <= math.pi / 2**bits * (1 + 1e-4))
    assert np.asarray(q.values).max() <= 2**bits - 1
    assert (
        -(2 ** (bits - 1))
        <= np.asarray(q.phase).min()
        <= np.asarray(q.phase).max()
        < 2 ** (bits - 1)
    )


@pytest.mark.parametrize("fmt", ["reim", "polar"])
def test_scales_are_per_channel(fmt):
    w = _weights((4, 6), True).T.copy()
    q = ff.QuantisedArray(w, 8, axis=0, complex_format=fmt)
    levels = _qmax(8) if fmt == "reim" else 2**8 - 1
    top = np.maximum(np.abs(w.real), np.abs(w.imag)) if fmt == "reim" else np.abs(w)
    np.testing.assert_allclose(q.scale[:, 0], top.max(1) / levels, rtol=1e-6)
    # Scaling one channel changes only that channel's scale, not the other channels' codes.
    w2 = w.copy()
    w2[2] *= 1000
    q2 = ff.QuantisedArray(w2, 8, axis=0, complex_format=fmt)
    keep = np.arange(6) != 2
    np.testing.assert_array_equal(
        np.asarray(q2.values)[..., keep, :], np.asarray(q.values)[..., keep, :]
    )
    np.testing.assert_allclose(q2.scale[2], q.scale[2] * 1000, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_requantising_is_exact(bits):
    w = _weights((5, 7), False, seed=3)
    q = ff.QuantisedArray(w, bits)
    q2 = ff.QuantisedArray(q.dequantise(), bits)
    np.testing.assert_array_equal(q2.values, q.values)
    np.testing.assert_allclose(q2.scale, q.scale, rtol=1e-6)


@pytest.mark.parametrize(
    "bits, fmt, size",
    [(8, "reim", 42 + 12), (4, "reim", 21 + 12), (4, "polar", 21 + 12), (4, None, 11 + 12)],
)
def test_packed_size(bits, fmt, size):
    # 3 x 7 weights, 3 channels: 21 integers (42 for complex) at `bits` bits, 3 float32 scales.
    w = np.ones((3, 7), np.float32 if fmt is None else np.complex64)
    q = ff.QuantisedArray(w, bits, complex_format=fmt or "reim")
    assert q.nbytes == size


def _positive_kernel_conv(gamma):
    conv = eqx.filter_eval_shape(
        ContractiveToroidalConv, 1, 1, 3, gamma=gamma, norm_grid=(4, 4), key=jr.PRNGKey(0)
    )
    # A positive real 1-channel kernel: the operator norm is the kernel's sum (zero frequency),
    # and at int4 rounding 0.57 * 7 = 3.99 up to 4 (magnitudes: 0.57 * 15 = 8.55 up to 9)
    # pushes the norm above `gamma`.
    k = np.full((1, 1, 1, 3, 3), 0.57, np.complex64)
    k[..., 0, 0] = 1.0
    return eqx.tree_at(lambda c: c.conv.weight, conv, jnp.asarray(k))


@pytest.mark.parametrize("fmt", ["reim", "polar"])
def test_certificate_rechecked_and_rescaled(fmt):
    gamma = 0.9
    conv = _positive_kernel_conv(gamma)
    with pytest.raises(ValueError, match="operator norm 0.9"):
        ff.quantise(conv, 4, complex_format=fmt, on_violation="raise")
    q = ff.quantise(conv, 4, complex_format=fmt)
    kernel = np.asarray(q.conv.weight.dequantise(), np.complex128)
    exact = abs(kernel.sum())  # independent reference for this kernel
    (rep,) = ff.contraction_report(q)
    assert rep["gamma"] == gamma
    np.testing.assert_allclose(rep["norm"], exact, rtol=1e-5)
    assert gamma * (1 - 1e-5) < exact <= gamma
    # Rescaling changed the scales only: the integer codes are those of the unrescaled ones.
    folded = ff.QuantisedArray(conv.normalised().weight, 4, axis=1, complex_format=fmt)
    np.testing.assert_array_equal(q.conv.weight.values, folded.values)


@pytest.fixture(scope="module")
def model():
    return ff.make_model("tiny", key=jr.PRNGKey(0))


def test_quantised_model_weights_and_certificate(model):
    q = ff.quantise(model, 8)
    assert isinstance(q.encoder.conv.weight, ff.QuantisedArray)
    assert isinstance(q.cell.conv.conv.weight, ff.QuantisedArray)
    assert isinstance(q.readout.linear.weight, ff.QuantisedArray)
    d = ff.dequantise(q)
    # Biases and other parameters unchanged; weights within half a step.
    np.testing.assert_array_equal(d.encoder.conv.bias, model.encoder.conv.bias)
    np.testing.assert_array_equal(d.cell.act.bias, model.cell.act.bias)
    for qa, w in [
        (q.encoder.conv.weight, model.encoder.conv.weight),
        (q.readout.linear.weight, model.readout.linear.weight),
    ]:
        assert np.all(np.abs(qa.dequantise() - w) <= qa.scale / 2 * (1 + 1e-5) + 1e-7)
    folded = model.cell.conv.normalised().weight
    (rep,) = ff.contraction_report(q)
    assert rep["norm"] <= rep["gamma"] and rep["applied"] <= rep["gamma"]
    assert float(d.cell.lipschitz_bound(*model.cell.conv.norm_grid)) < 1
    qa = q.cell.conv.conv.weight
    err = np.abs(np.asarray(qa.dequantise()) - np.asarray(folded))
    assert np.all(err <= qa.scale * (math.sqrt(2) / 2) * (1 + 1e-4) + 1e-7)
    # Packed sizes: int4 about half of int8, both far below float32.
    assert ff.model_nbytes(ff.quantise(model, 4)) < ff.model_nbytes(q) < ff.model_nbytes(model)
    with pytest.raises(ValueError, match="already quantised"):
        ff.quantise(q, 8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(bits=3), ValueError, "bits=3 is not supported"),
        (dict(bits=16), ValueError, "bits=16"),
        (dict(bits=8.0), TypeError, "must be an int"),
        (dict(bits=True), TypeError, "must be an int"),
        (dict(complex_format="cartesian"), ValueError, "complex_format"),
        (dict(on_violation="ignore"), ValueError, "on_violation"),
    ],
)
def test_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        ff.quantise(model, **kwargs)


def test_bad_arrays():
    with pytest.raises(TypeError, match="float or complex"):
        ff.QuantisedArray(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="axis=2"):
        ff.QuantisedArray(np.ones((2, 2), np.float32), axis=2)
    with pytest.raises(ValueError, match="bits=2"):
        ff.QuantisedArray(np.ones((2, 2), np.float32), 2)
