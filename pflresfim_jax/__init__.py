"""pFL-ResFIM in JAX/Flax: personalized federated segmentation with Residual Fisher Information."""
__version__ = '0.1.0'
