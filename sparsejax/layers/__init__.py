"""Flax Linen layers. Importing this package registers the built-in components."""

from sparsejax.layers import (attention, block_sparse_linear, dense, ffn,  # noqa: F401
                              memory, moe, norm, nsa, registry, sparse_dense)
