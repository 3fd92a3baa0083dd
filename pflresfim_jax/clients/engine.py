"""Local training of K clients stacked along a leading axis.

Data of a split is ``{'image': [K, Nmax, H, W, C], 'label': [K, Nmax, H, W, 1],
'count': [K]}``; slots at or past ``count[k]`` are padding. A client's epoch visits
its own ``count[k]`` examples in a fresh random order in ``ceil(count[k] / B)`` steps
(a loop whose length is the client's own; vmapped clients, or unrolled loops, run
``ceil(Nmax / B)`` and skip the extra steps with ``jnp.where``: no Python loop over
clients), and the last partial batch is masked, so padding never changes a model
(BatchNorm statistics included: the model's BN takes the example mask).

How the client axis runs is a choice (``engine.client_axis``): 'vmap' vectorises
the clients into one program (every conv becomes a grouped conv), 'map' runs them
one after another inside one program (``lax.map``); 'auto' is 'map' (on an H200 it was
4.6x faster for the UNet, PERFORMANCE.md; on CPU, with the convolutions of
``model.conv='auto'``, local training ran 116 vs 25 images/s: README, Benchmark). The
results agree up to float tolerance.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from pflresfim_jax import losses, models

Array = jax.Array
PyTree = Any

CLIENT_AXES = ('vmap', 'map', 'auto')


def resolve_fisher_chunk(value, unroll: bool, grads: str = 'vmap') -> int:
  """``fisher.chunk_size``: None (auto) -> 1 with compact loops, 4 when unrolled; 8 with
  ``fisher.grads='layers'``.

  Per example, vmap(grad) chunks of 1 were fastest on the 2-core CPU and on the H200
  (README Benchmark), but an unrolled loop (CPU) of 1-example chunks makes a program
  with one gradient per example: compile time doubled the phantom run. 4 was within 7%
  per example on the CPU and compiles a quarter of that. 'layers' runs a chunk as one
  batch: 8 was the fastest of 4-32 on the 2-core CPU at the phantom's size.
  """
  if value is None:
    return 8 if grads == 'layers' else 4 if unroll else 1
  if int(value) < 1:
    raise ValueError(f'fisher.chunk_size must be >= 1 (or None for auto), got {value!r}')
  return int(value)


def resolve_fisher_conv(name: str, model_conv: str) -> str:
  """``fisher.conv``: 'auto' -> the model's own convolution (``model_conv``, resolved).

  The per-example gradients can compute the same convolutions another way than training
  does (the parameters are the same): on an H200, 'im2col' at ``fisher.chunk_size=8``
  gave 1.7x the examples/s of XLA's convolution at chunk 1 (vmapped weight gradients
  become batched matrix products instead of grouped convolutions; README, Benchmark).
  """
  return model_conv if name == 'auto' else resolve_conv(name, field='fisher.conv')


def resolve_unroll(value) -> bool:
  """``engine.unroll``: 'auto' -> False (compact ``lax.scan`` loops) on every backend.

  With autodiff's convolution gradients, XLA:CPU ran them inside a while loop about 10x
  slower than unrolled (they leave the layout of its fast kernels there), so CPU runs
  used to unroll, at the price of long compiles and host memory. With
  ``model.conv='canonical'`` (the CPU default) or 'im2col' loops are as fast, so they
  stay compact; ``True`` unrolls.
  """
  if value == 'auto':
    return False
  if isinstance(value, bool):
    return value
  if str(value).lower() in ('true', 'false'):  # from --config.engine.unroll=false
    return str(value).lower() == 'true'
  raise ValueError(f"engine.unroll must be 'auto', True or False, got {value!r}")


def resolve_conv(name: str, backend: Optional[str] = None, field: str = 'model.conv') -> str:
  """``model.conv``: 'auto' -> 'canonical' on CPU (autodiff's convolution gradients
  run on XLA:CPU's slow path inside loops; ``models.Conv``), 'xla' on accelerators.
  ``field`` names the config field in the error."""
  if name not in ('auto', *models.CONVS):
    raise ValueError(f"{field} must be 'auto' or one of {models.CONVS}, got {name!r}")
  if name != 'auto':
    return name
  return 'canonical' if (backend or jax.default_backend()) == 'cpu' else 'xla'


def resolve_client_axis(name: str) -> str:
  """'auto' -> 'map' on every backend (see the module docstring); checks the name."""
  if name not in CLIENT_AXES:
    raise ValueError(f'engine.client_axis must be one of {CLIENT_AXES}, got {name!r}')
  return 'map' if name == 'auto' else name


def map_clients(fn: Callable, strategy: str, *stacked, mesh=None):
  """Apply ``fn`` to every client's slice of the stacked arguments.

  Args:
    fn: per-client function of unstacked arguments (it may close over traced values
      of the enclosing jit: they are replicated).
    strategy: 'vmap' or 'map' (see module doc; resolve 'auto' first).
    *stacked: pytrees with a leading client axis ``K``.
    mesh: optional Mesh with axis 'clients' (clients/sharding.py; ``K`` a multiple of
      its size). With more than one device, each device runs its own ``K / D``
      clients with ``strategy`` inside a ``shard_map``; no data crosses devices here.

  Returns:
    ``fn``'s outputs stacked along a leading ``K`` axis.
  """
  if mesh is not None and mesh.size > 1:
    from jax.sharding import PartitionSpec as P
    spec = P(mesh.axis_names[0])
    return jax.shard_map(lambda *local: map_clients(fn, strategy, *local), mesh=mesh,
                         in_specs=spec, out_specs=spec, check_vma=False)(*stacked)
  if strategy == 'vmap':
    return jax.vmap(fn)(*stacked)
  if strategy == 'map':
    return jax.lax.map(lambda args: fn(*args), stacked)
  raise ValueError(f'unknown client-axis strategy {strategy!r}')


def adam_l2(learning_rate, weight_decay: float) -> optax.GradientTransformation:
  """Adam with L2 coupled into the gradient: torch's ``Adam(lr, weight_decay=...)``.

  ``add_decayed_weights`` before ``scale_by_adam``, then the (negated) learning rate.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                     optax.scale_by_learning_rate(learning_rate))


def optimizer(weight_decay: float, trainable: Optional[Callable[[Any], bool]] = None
              ) -> optax.GradientTransformation:
  """The clients' optimizer: :func:`adam_l2` with the learning rate held in its state.

  The rate follows the round (:func:`round_schedule`), not the optimizer's step count,
  so it is an ``optax.inject_hyperparams`` hyperparameter that :func:`train_step` sets
  from its ``lr`` argument (:func:`with_learning_rate`).

  Args:
    weight_decay: the L2 coefficient.
    trainable: optional predicate of a parameter's key path (e.g. models.is_head);
      leaves it rejects are frozen (``optax.multi_transform`` with
      ``optax.set_to_zero``: no update, no Adam state).
  """
  def make(learning_rate):
    tx = adam_l2(learning_rate, weight_decay)
    if trainable is None:
      return tx
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if trainable(path) else 'frozen', params)
    return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return optax.inject_hyperparams(make)(learning_rate=0.0)


def with_learning_rate(opt_state, lr):
  """``opt_state`` of :func:`optimizer` with its learning rate set to ``lr``."""
  return opt_state._replace(hyperparams={**opt_state.hyperparams, 'learning_rate': lr})


def round_schedule(config, rounds: int) -> optax.Schedule:
  """The learning rate of round ``r`` (an optax schedule of the round index).

  'step' (default) halves it every ``T // 4`` rounds; 'constant' keeps ``config.lr``.
  """
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(config.lr)
  if config.lr_schedule == 'step':
    return optax.exponential_decay(config.lr, transition_steps=max(1, rounds // 4),
                                   decay_rate=0.5, staircase=True)
  raise ValueError(f"config.lr_schedule must be 'step' or 'constant', got {config.lr_schedule!r}")


def augment(key: Array, image: Array, label: Array, flip: bool, rot90: bool):
  """Random horizontal/vertical flips and a 90-degree rotation (each p=0.5) of ONE example."""
  kh, kv, kr = jax.random.split(key, 3)
  both = jnp.concatenate([image, label.astype(image.dtype)], axis=-1)
  if flip:
    both = jnp.where(jax.random.bernoulli(kh), both[:, ::-1], both)
    both = jnp.where(jax.random.bernoulli(kv), both[::-1], both)
  if rot90:
    if both.shape[0] != both.shape[1]:
      raise ValueError(f'augment.rot90 needs square images, got {both.shape[:2]}; set augment.rot90=False')
    both = jnp.where(jax.random.bernoulli(kr), jnp.rot90(both, axes=(0, 1)), both)
  return both[..., :-label.shape[-1]], both[..., -label.shape[-1]:].astype(label.dtype)


def epoch_order(key: Array, count, nmax: int, length: int) -> Array:
  """A random order of the ``count`` real examples, padded (with 0) to ``length``."""
  score = jnp.where(jnp.arange(nmax) < count, jax.random.uniform(key, (nmax,)), 2.0)
  order = jnp.argsort(score)
  return jnp.pad(order, (0, length - nmax))


def seg_loss(model) -> Callable:
  """``loss(params, batch_stats, batch, mask, aux=None) -> (loss, new_batch_stats)`` in train mode.

  Dice + BCE of the model's logits; ``aux`` (a round constant) is unused here, present
  so the function is a :func:`train_step` loss as it is.
  """
  def loss(params, batch_stats, batch, mask, aux=None):
    del aux
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                                  train=True, mask=mask, mutable=['batch_stats'])
    return losses.dice_bce_loss(logits, batch['label'], mask), updates['batch_stats']
  return loss


def train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """One optimisation step over ``carry = (params, batch_stats, opt_state)``.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, mask, aux) -> (loss, new_batch_stats)``.
    tx: the optimizer (:func:`optimizer`; frozen entries are its business).

  Returns:
    ``step(carry, aux, batch, mask, lr) -> (carry, loss)``; ``lr`` is the round's rate.
  """
  def step(carry, aux, batch, mask, lr):
    params, stats, opt_state = carry
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, batch, mask, aux)
    updates, opt_state = tx.update(grads, with_learning_rate(opt_state, lr), params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss
  return step


def local_train(step: Callable, carry: PyTree, aux: PyTree, data: Mapping[str, Array], key: Array,
                lr, epochs: int, batch_size: int, flip: bool = True, rot90: bool = False,
                unroll: bool = False) -> Tuple[PyTree, Array]:
  """``epochs`` passes over ONE client's training data.

  Args:
    step: ``step(carry, aux, batch, mask, lr) -> (carry, loss)`` (e.g. :func:`train_step`);
      ``batch = {'image': [B,H,W,C], 'label': [B,H,W,1], 'key': PRNG key}``, the key
      this step's own (for a loss that draws, e.g. FedRDN's statistics).
    carry: the client's trainable state.
    aux: constants of the round (e.g. a proximal anchor), passed to ``step``.
    data: ``{'image': [Nmax,H,W,C], 'label': [Nmax,H,W,1], 'count': []}``.
    key: PRNG key (shuffling and augmentation).
    lr: learning rate (may be traced).
    epochs, batch_size: E and B.
    flip, rot90: augmentation switches.
    unroll: unroll the epoch and step loops (see :func:`resolve_unroll`). Unrolled,
      every client runs ``ceil(Nmax / batch_size)`` steps and the ones past its
      ``count`` are discarded; compact, it runs its own ``ceil(count / batch_size)``
      (the same result; under vmap over clients the loop runs to the largest).

  Returns:
    ``(carry, mean training loss over the steps taken)`` (0 if none).
  """
  if epochs <= 0:
    return carry, jnp.zeros((), jnp.float32)
  images, labels, count = data['image'], data['label'], data['count']
  nmax = images.shape[0]
  steps = -(-nmax // batch_size)

  def epoch(state, ekey):
    carry, total, taken = state
    k_order, k_aug = jax.random.split(ekey)
    order = epoch_order(k_order, count, nmax, steps * batch_size)

    def one_step(state, s):
      carry, total, taken = state
      idx = jax.lax.dynamic_slice(order, (s * batch_size,), (batch_size,))
      mask = s * batch_size + jnp.arange(batch_size) < count
      keys = jax.random.split(jax.random.fold_in(k_aug, s), batch_size)
      x, y = jax.vmap(lambda k, a, b: augment(k, a, b, flip, rot90))(keys, images[idx], labels[idx])
      batch = {'image': x, 'label': y, 'key': jax.random.fold_in(k_order, s)}
      new, loss = step(carry, aux, batch, mask, lr)
      active = s * batch_size < count
      carry = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry)
      return (carry, total + jnp.where(active, loss, 0.0), taken + active), None

    state = (carry, total, taken)
    if unroll:
      state, _ = jax.lax.scan(one_step, state, jnp.arange(steps), unroll=steps)
    else:   # only this client's own steps: a small client does not pay for the largest
      state = jax.lax.fori_loop(0, jnp.minimum(-(-count // batch_size), steps),
                                lambda s, st: one_step(st, s)[0], state)
    return state, None

  init = (carry, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (carry, total, taken), _ = jax.lax.scan(epoch, init, jax.random.split(key, epochs),
                                          unroll=epochs if unroll else 1)
  return carry, total / jnp.maximum(taken, 1)
