"""TopK sparse autoencoders (Gao et al. 2024) on the activations of sparsejax models.

`model`: the SAE math (encode/decode, AuxK loss, decoder constraints, geometric-median
init); `sharded_topk`: the exact top-k of latents split over "tensor"; `capture`: activations at a named site of a `DecoderLM`, streamed, and the
downstream loss with an SAE spliced in; `trainer`: the jitted, sharded SAE train step
and the checkpointed training loop behind `experiments/sae.py`.
"""

from sparsejax.sae.capture import (activation_stream, capture_fn, check_site,
                                   run_at_site, site_names, spliced_losses)
from sparsejax.sae.model import (SAEConfig, decode, encode, geometric_median,
                                 init_params, input_stats, loss_fn, normalized_mse,
                                 param_specs, pre_activations, reconstruct,
                                 remove_parallel_grad, unit_norm_rows,
                                 update_dead_counter)
