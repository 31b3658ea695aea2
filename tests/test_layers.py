"""``layers.lora_matmul``'s and ``layers.dense_matmul``'s hand-written backwards equal autodiff of the plain formula
(every input, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np

from medad_jax.model.layers import Linear, dense_matmul, lora_matmul


def test_lora_matmul_gradients_equal_autodiff_of_the_formula():
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (3, 5, 8))
  w = jax.random.normal(ks[1], (8, 6)) * 0.3
  a = jax.random.normal(ks[2], (8, 4)) * 0.3
  b = jax.random.normal(ks[3], (4, 6)) * 0.3
  g = jax.random.normal(ks[4], (3, 5, 6))
  scale = jnp.float32(2.0)
  plain = lambda x, w, a, b: x @ w + ((x @ a) @ b) * scale  # noqa: E731
  ours = lambda x, w, a, b: lora_matmul(x, w, a, b, scale)  # noqa: E731
  np.testing.assert_allclose(ours(x, w, a, b), plain(x, w, a, b), atol=1e-6, rtol=0)
  loss = lambda f: lambda *p: jnp.sum(f(*p) * g)  # noqa: E731
  want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, w, a, b)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))(x, w, a, b)
  for name, gw, gg in zip('xwab', want, got):
    np.testing.assert_allclose(gg, gw, atol=1e-5, rtol=1e-6, err_msg=name)
  # Under vmap (the vision tower's per-image call) too.
  per_row = lambda x_i, g_i, a: jnp.sum(lora_matmul(x_i, w, a, b, scale) * g_i)  # noqa: E731
  vg = jax.vmap(jax.grad(per_row, argnums=2), in_axes=(0, 0, None))(x, g, a)
  np.testing.assert_allclose(vg.sum(0), got[2], atol=1e-5, rtol=1e-6)


def test_dense_matmul_gradients_equal_autodiff_and_linear_uses_it():
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (3, 5, 8))
  w = jax.random.normal(ks[1], (8, 6)) * 0.3
  g = jax.random.normal(ks[2], (3, 5, 6))
  np.testing.assert_array_equal(dense_matmul(x, w), x @ w)  # the forward is the plain matmul
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)  # noqa: E731
  want = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(dense_matmul), argnums=(0, 1)))(x, w)
  for name, gw, gg in zip('xw', want, got):
    np.testing.assert_allclose(gg, gw, atol=1e-5, rtol=1e-6, err_msg=name)
  # A Linear without an adapter differentiates through it: the barrier is in its backward's program.
  from flax import nnx
  lin = Linear(8, 6, use_bias=False, rngs=nnx.Rngs(0))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(lin(x) * g)))
  assert 'optimization_barrier' in grad.lower(x).as_text()
