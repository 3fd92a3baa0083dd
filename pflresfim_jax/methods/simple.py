"""The methods that differ from the base only in what they keep local.

Each is a static mask (True = the entry never enters the mean) and whether the
BatchNorm running statistics are averaged; training is the base's local Adam and
aggregation METHOD.md 4's masked mean (methods/base.py).
"""
from __future__ import annotations

from pflresfim_jax import masks
from pflresfim_jax.methods.base import Contract, Method


class Local(Method):
  """Each client trains alone: every entry stays local, nothing is sent."""

  def static_mask(self, params):
    return masks.constant(params, True)


class FedAvg(Method):
  """FedAvg (McMahan et al., 2017): parameters and BatchNorm statistics averaged."""
  contract = Contract(batch_stats=True)


class SiloBN(Method):
  """SiloBN (Andreux et al., 2020): parameters averaged, BatchNorm statistics local."""


class FedBN(Method):
  """FedBN (Li et al., 2021): BatchNorm scale and bias (and statistics) stay local."""

  def static_mask(self, params):
    return masks.batchnorm(params)


class FedPer(Method):
  """FedPer (Arivazhagan et al., 2019): the output layer (head) stays local.

  As FL-MedSegBench's server (server_funct.py ``Server_update``, 'fedper': every
  state-dict key without 'seg1' is averaged), the BatchNorm running statistics are
  averaged too.
  """
  contract = Contract(batch_stats=True)

  def static_mask(self, params):
    return masks.head(params)


class LGFedAvg(Method):
  """LG-FedAvg (Liang et al., 2020): the body stays local, the head is averaged."""

  def static_mask(self, params):
    return masks.body(params)
