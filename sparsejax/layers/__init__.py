"""Flax Linen layers. Importing this package registers the built-in components."""

from sparsejax.layers import (attention, dense, ffn, memory, moe, norm, nsa,  # noqa: F401
                              registry, sparse_dense)
