"""Training-time and post-training sparsity: masks, pruning algorithms, calibration."""

from sparsejax.sparsity.hessian import accumulate_act_sqnorm, accumulate_hessian, psum_hessian
from sparsejax.sparsity.posttrain import magnitude_mask, sparsegpt_prune, wanda_mask
