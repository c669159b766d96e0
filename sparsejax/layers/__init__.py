"""Flax Linen layers. Importing this package registers the built-in components."""

from sparsejax.layers import attention, dense, ffn, moe, norm, registry, sparse_dense  # noqa: F401
