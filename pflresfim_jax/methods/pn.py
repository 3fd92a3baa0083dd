"""PN (Population Normalization): FedAvg of a UNet whose BatchNorms are PopulationNorms.

As FL-MedSegBench (utils.py ``init_model``: ``Unet2D(norm='pn')`` for method 'PN';
``set_server_method``: local training, FedAvg server): every normalisation layer
normalises by a learned, averaged population mean and variance instead of batch
statistics (models.PopulationNorm), so training and inference compute the same
function and no client-specific statistics exist. Training and aggregation are FedAvg's.
"""
from __future__ import annotations

import dataclasses

from pflresfim_jax.methods.simple import FedAvg


class PN(FedAvg):
  def __init__(self, ctx):
    super().__init__(dataclasses.replace(ctx, model=ctx.model.clone(norm='pn')))
