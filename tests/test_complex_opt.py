import jax
import jax.numpy as jnp
import optax

from fractal_field._complex_opt import complex_safe, conjugate_complex_grads


def _run(optimizer, steps=300):
    params = {"p": jnp.array([1.0 + 2.0j, -0.5 + 0.3j, 2.0 - 1.0j], jnp.complex64), "r": 1.5}
    loss = lambda params: jnp.sum(jnp.abs(params["p"]) ** 2) + params["r"] ** 2
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, float(loss(params))


def test_grad_is_conjugate_of_ascent():
    g = jax.grad(lambda p: jnp.abs(p) ** 2)(jnp.asarray(1.0 + 1.0j))
    assert jnp.allclose(g, 2.0 - 2.0j)


def test_adam_converges_only_with_fix():
    params, loss = _run(complex_safe(optax.adam(0.05)))
    assert loss < 1e-3
    assert params["p"].dtype == jnp.complex64
    _, loss_bad = _run(optax.adam(0.05))
    assert loss_bad > 1.0


def test_real_leaves_untouched():
    t = conjugate_complex_grads()
    updates = {"a": jnp.array([1.0 + 2.0j]), "b": jnp.array([3.0]), "c": None}
    out, _ = t.update(updates, t.init(updates))
    assert jnp.all(out["a"] == jnp.array([1.0 - 2.0j]))
    assert jnp.all(out["b"] == updates["b"]) and out["c"] is None
