"""Flax Linen layers. Importing this package registers the built-in components."""

from sparsejax.layers import (attention, dense, ffn, memory, moe, norm, registry,  # noqa: F401
                              sparse_dense)
