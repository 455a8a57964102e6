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
