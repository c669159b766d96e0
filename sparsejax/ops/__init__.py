"""Pure-JAX ops: the math of every technique, XLA references and `impl=` dispatch."""

from sparsejax.ops.dispatch import resolve_impl
from sparsejax.ops.topk import nm_mask, nm_sparsify, topk_mask, topk_sparsify
from sparsejax.ops.quant import absmax_quantize, fake_absmax, fake_ternary, ternary_quantize
from sparsejax.ops.ternary_pack import pack_ternary, unpack_ternary
from sparsejax.ops.moe import expert_load, moe_decode, moe_ffn, route, router_z_loss, switch_aux_loss, update_bias
from sparsejax.ops.memory import memory_lookup
from sparsejax.ops.memory_sharded import memory_lookup_sharded
from sparsejax.ops.product_keys import (implicit_value_expansion, pkm_retrieve, tdqkr_retrieve,
                                        tucker_rank_one, tucker_singular_value_loss)
from sparsejax.ops.sparse_attention import block_sparse_attention
from sparsejax.ops.block_sparse_matmul import (block_sparse_matmul, from_block_sparse,
                                               to_block_sparse)
from sparsejax.ops.masks import (And, CausalMask, ChunkedCausalMask, DocumentMask, GlobalMask,
                                 LocalMask, MultiHeadMask, Or, StridedMask, mask_info)
