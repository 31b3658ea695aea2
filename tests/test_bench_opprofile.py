"""The op profiler's HLO classification: on a compiled program with a matmul, a transpose fused with elementwise
work and a reduction, every profiled op lands in its class (the profile itself is a documented command)."""

import jax
import jax.numpy as jnp

from medad_jax.bench import opprofile


def test_classifies_the_ops_of_a_compiled_program():
  def f(a, b):
    g = jnp.tanh(a) * 2.0
    return g.T @ b, jnp.sum(jnp.exp(a), axis=1), (jnp.sin(a) + 1.0).T
  a, b = jnp.ones((64, 32)), jnp.ones((64, 16))
  hlo = jax.jit(f).lower(a, b).compile().as_text()
  instrs, comps = opprofile.parse_hlo(hlo)
  classes = {opprofile.category(n, instrs, comps) for n in instrs}
  assert opprofile.MATMUL in classes and 'reductions (softmax, norms, sampling)' in classes
  assert opprofile.TRANSPOSE in classes   # the transposed sin output
  assert opprofile.category('no_such_op', instrs, comps).startswith('other')
  events = [(n, 10.0) for n in instrs] + [('ThunkExecutor::Execute', 1e6)]
  by_class, top = opprofile.breakdown(events, hlo)
  assert abs(sum(by_class.values()) - 1e-5 * len(instrs)) < 1e-9   # runtime events are not HLO ops
  assert all(c != opprofile.MATMUL for _, _, c, _ in top)
