"""pFL-ResFIM: keep local the parameters whose Fisher information moves with the style.

One round, as each client runs it (METHOD.md 1-5):

1. train: local Adam from the last aggregation (the base method's training);
2. simulate styles: render ``fisher.num_examples`` of its own training images in
   other clients' styles (low-frequency amplitude swap, spectral.py; only the
   amplitude windows of the bank ever left their owners);
3. Fisher on both: the diagonal empirical Fisher of the real and the restyled batch
   (per-example gradients, fisher.py);
4. residual: ResFIM = |F_real - F_styled| per entry (``resfim.residual``);
5. partition: the top ``resfim.ratio`` of each tensor (``resfim.scope``) is
   domain-sensitive and stays local: the client's new local mask;

and on the server, 6. masked mean: METHOD.md 4's weighted mean of every other entry
(the base aggregation). Steps 2-4 are ``resfim.estimator`` (here its two halves,
``resfim.fisher_pair`` and ``resfim.residual``, inside ``selectors.select``). Masks are re-estimated
every ``resfim.every`` rounds after ``resfim.warmup_rounds`` of plain FedAvg.
``resfim.selector`` swaps step 4's ranking for an ablation (selectors.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pflresfim_jax import masks, resfim, selectors
from pflresfim_jax.clients import engine
from pflresfim_jax.methods.base import Method, where_tree


class PFLResFIM(Method):
  dynamic_mask = True

  def __init__(self, ctx):
    super().__init__(ctx)
    cfg = self.config
    # fisher.conv: the same parameters through another convolution (speed only).
    conv = engine.resolve_fisher_conv(cfg.fisher.get('conv', 'auto'), self.model.conv)
    model = self.model if conv == self.model.conv else self.model.clone(conv=conv)
    grads = cfg.fisher.get('grads', 'vmap')
    self.fisher_pair = resfim.fisher_pair(
        model, loss=cfg.fisher.loss,
        chunk_size=engine.resolve_fisher_chunk(cfg.fisher.chunk_size, self.unroll, grads),
        spectral_ratio=cfg.spectral.ratio, lam_range=(cfg.spectral.lam_min, cfg.spectral.lam_max),
        unroll=self.unroll, grads=grads)

  def fresh_masks(self, state, start, data, bank, keys, client_ids):
    """Steps 2-5 on every client: the new local masks (``resfim.selector`` ranks)."""
    nmax = data['image'].shape[1]
    m = min(int(self.config.fisher.num_examples), nmax)
    rc = self.config.resfim

    def one(params, stats, start, d, key, client_id, bank):
      k_pick, k_sim = jax.random.split(key)
      fishers = None
      if rc.selector in selectors.NEEDS_FISHER:
        order = engine.epoch_order(k_pick, d['count'], nmax, nmax)[:m]
        batch = {'image': d['image'][order], 'label': d['label'][order],
                 'mask': jnp.arange(m) < d['count'], 'key': k_sim,
                 'style': bank['windows'], 'style_owner': bank['owner'], 'client_id': client_id}
        fishers = self.fisher_pair({'params': params, 'batch_stats': stats}, batch)
      return selectors.select(rc.selector, rc.ratio, rc.scope, fishers=fishers, params=params,
                              start=start, key=k_sim, residual=rc.residual, eps=rc.eps)
    # The (small) bank goes to every client as an argument, not a closure: inside a
    # shard_map over devices a closed-over sharded array cannot be indexed.
    return self.over_clients(one, state['params'], state['batch_stats'], start, data, keys,
                             client_ids, masks.stack(bank, self.num_clients))

  def client_stats(self, state, start, data, bank, keys, rnd, client_ids):
    rc, mask = self.config.resfim, state['local_mask']
    due = (rnd >= rc.warmup_rounds) & ((rnd - rc.warmup_rounds) % rc.every == 0)
    fresh = lambda: self.fresh_masks(state, start, data, bank, keys, client_ids)
    if self.unroll:
      # XLA:CPU is slow on gradients inside a conditional's branch (as in loops):
      # estimate every round and select.
      mask = where_tree(due, fresh(), mask)
    else:
      mask = jax.lax.cond(due, fresh, lambda: mask)
    # Warm-up rounds are plain FedAvg; the mask is kept for later rounds.
    state = {**state, 'local_mask': mask}
    agg_mask = where_tree(rnd < rc.warmup_rounds, jax.tree.map(jnp.zeros_like, mask), mask)
    return state, agg_mask
