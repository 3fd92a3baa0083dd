"""A new mask rule as a plug-in method: keep local what this round moved the most.

After local training each client marks, per tensor, the ``RATIO`` fraction of entries
with the largest update |theta - theta_start| as client-specific; those stay local,
every other entry is averaged (METHOD.md 4's masked mean, inherited from the base).

Run it without editing the package:

  python experiments/main.py --config=configs/vessel.py \
      --config.method=examples/update_mask.py:UpdateMask

(or ``--config.method=fedavg,examples/update_mask.py:UpdateMask`` to compare). A
deployment (deploy.py, Flower) runs it too: the base contract uploads the entries
outside the mask, so nothing else is needed.
"""
import jax
import jax.numpy as jnp

from pflresfim_jax import masks, methods


class UpdateMask(methods.Method):
  """Per tensor, the RATIO of entries with the largest local update stay local."""

  RATIO = 0.1           # a setting of this method; subclass to change it
  dynamic_mask = True   # the mask changes every round: log per-layer fractions

  def client_stats(self, state, start, data, bank, keys, rnd, client_ids):
    # state['params'] and start: [K, ...] (every client's model after and before training)
    moved = jax.tree.map(lambda new, old: jnp.abs(new - old), state['params'], start)
    mask = jax.vmap(lambda m: masks.top_fraction(m, self.RATIO, 'tensor'))(moved)
    return {**state, 'local_mask': mask}, mask   # (new state, entries left out of the mean)


# Optional: a short name for --config.method=update_mask once this module is imported
# (e.g. from your own launcher); the 'file.py:Class' form needs no import at all.
methods.register('update_mask', UpdateMask)
