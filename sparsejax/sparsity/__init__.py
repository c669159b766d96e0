"""Training-time and post-training sparsity: masks, density distributions, schedules,
the optax `Sparsifier` (pruning, SNIP, STE, SET, RigL, L1 during training), one-shot
pruning (magnitude, Wanda, SparseGPT; layer ops and the sequential whole-model driver)
with its calibration statistics and compressed N:M / block export, shape shrink of
pruned channels and heads, and gradient compression (top-k + error feedback, DGC)."""

from sparsejax.sparsity.algorithms import global_topk_mask
from sparsejax.sparsity.compress import (compress_blocks, compress_nm, decompress_blocks,
                                        decompress_nm, export_compressed, load_compressed)
from sparsejax.sparsity.config import SparsityConfig
from sparsejax.sparsity.distributions import erk_densities, uniform_densities
from sparsejax.sparsity.dst import rigl_update, set_update
from sparsejax.sparsity.gradient import (GradCompressionConfig, dgc_accumulate,
                                        error_feedback, topk_compress)
from sparsejax.sparsity.hessian import accumulate_act_sqnorm, accumulate_hessian, psum_hessian
from sparsejax.sparsity.masks import block_mask, channel_mask, nm_mask, topk_mask
from sparsejax.sparsity.posttrain import magnitude_mask, sparsegpt_prune, wanda_mask
from sparsejax.sparsity.prune_model import PruneResult, PruneSettings, prune_model
from sparsejax.sparsity.schedules import cosine_drop_fraction, polynomial_sparsity
from sparsejax.sparsity.shrink import channel_masks, shrink
from sparsejax.sparsity.sparsifier import Sparsifier, SparsifierState, apply_masks
