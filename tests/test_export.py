"""Export to serialized StableHLO: the exported classifier computes what JAX computes."""

import jax
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff


@pytest.mark.parametrize("solver", [ff.Naive(), ff.Anderson()])
def test_exported_logits_equal_jax(solver):
    model = ff.make_model("tiny", key=jr.PRNGKey(0), solver=solver, max_steps=40)
    x = np.asarray(jr.normal(jr.PRNGKey(1), (4, 1, 8, 8)), np.float32)  # the exported dtype
    exported = ff.export_classifier(model, x.shape)
    assert "stablehlo.while" in exported.mlir_module()  # the solve stays a loop
    loaded = jax.export.deserialize(exported.serialize())
    got = np.asarray(loaded.call(x))
    want = np.asarray(model.batched(x)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    with pytest.raises(ValueError, match="shape must be"):
        ff.export_classifier(model, (4, 3, 8, 8))


@pytest.mark.parametrize(
    "solver, overrides",
    [
        # HRNet's head in the readout (circular padding, group norm) with the plain solver.
        (ff.Naive(), {"readout_pyramid": (2,), "readout_final": 6, "readout_grid": 1}),
        (ff.Anderson(), {}),
        (ff.Broyden(), {}),
    ],
    ids=["naive_pyramid", "anderson", "broyden"],
)
def test_onnx_logits_equal_jax(solver, overrides, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("jax2onnx")
    model = ff.make_model("tiny", key=jr.PRNGKey(0), solver=solver, max_steps=40, **overrides)
    x = np.asarray(jr.normal(jr.PRNGKey(1), (4, 1, 8, 8)), np.float32)
    path = tmp_path / "model.onnx"
    proto = ff.export_onnx(model, x.shape, path)
    ops = {n.op_type for n in proto.graph.node}
    assert "Loop" in ops  # the solve stays a loop
    assert not any(t.data_type in (14, 15) for t in proto.graph.initializer)  # no complex
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x})[0]
    want = np.asarray(model.batched(x)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_onnx_export_errors():
    model = ff.make_model("tiny", key=jr.PRNGKey(0), solver=ff.Multigrid())
    with pytest.raises(ValueError, match="Naive, Anderson and Broyden"):
        ff.export_onnx(model, (4, 1, 8, 8))
    with pytest.raises(ValueError, match="shape must be"):
        ff.export_onnx(model, (4, 8, 8))
    with pytest.raises(TypeError, match="FieldClassifier"):
        ff.export_onnx(model.cell, (4, 1, 8, 8))
    multi = ff.make_model("tiny", key=jr.PRNGKey(0), scales=2, readout_grid=2)
    with pytest.raises(ValueError, match="single-field"):
        ff.export_onnx(multi, (4, 1, 8, 8))
