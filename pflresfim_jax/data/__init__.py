"""Federations: clients with train / val / test splits, as stacked padded arrays."""
from pflresfim_jax.data.federation import Federation, Split, stack_clients, split_indices

__all__ = ['Federation', 'Split', 'stack_clients', 'split_indices']
