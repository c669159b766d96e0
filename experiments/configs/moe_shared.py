"""Fine-grained MoE with a shared expert (DeepSeekMoE): 16 small experts, top-4 routed
plus 1 always-active shared expert, each of hidden size d_ff // 5, so the activated FFN
params per token (4 routed + 1 shared) ≈ the dense default's.

  python experiments/train.py --config=experiments/configs/moe_shared.py --workdir=workdir/moe_shared

Add DeepSeek-V3 routing with --config.model.ffn_options.scoring=sigmoid
--config.model.ffn_options.bias_update_rate=1e-3 --config.model.ffn_options.aux_loss_weight=0.
Compare with moe.py (8 experts top-2) and the dense baseline (dense.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dense  # noqa: E402  (the sibling config file)


def get_config():
  config = dense.get_config()
  config.model.update(
      ffn="moe",
      ffn_options=dict(num_experts=16, top_k=4, d_expert=0, num_shared=1,
                       scoring="softmax", renormalize=True, activation="swiglu",
                       impl="auto", capacity_factor=1.25, aux_loss_weight=0.01,
                       z_loss_weight=1e-3, bias_update_rate=0.0))
  return config
