"""Mixture-of-Experts: the default model with an 8-expert top-2 MoE FFN in every block
(SwiGLU experts; d_expert = d_ff // 2 so the activated FFN params per token equal the
dense default's, total FFN params 4×).

  python experiments/train.py --config=experiments/configs/moe.py --workdir=workdir/moe

Per-block routing metrics are logged as e.g. block_0/ffn/load_max_over_mean and
block_0/ffn/load_3; the Switch aux loss (α=0.01) and router z-loss (β=1e-3) are in
aux_loss. Variants: --config.model.ffn_options.dispatch=capacity (GShard dropping, see
block_*/ffn/dropped_fraction), --config.model.ffn_options.scoring=sigmoid
--config.model.ffn_options.bias_update_rate=1e-3 --config.model.ffn_options.aux_loss_weight=0
(DeepSeek-V3 aux-loss-free balancing). Compare with the dense baseline (dense.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dense  # noqa: E402  (the sibling config file)


def get_config():
  config = dense.get_config()
  config.model.update(
      ffn="moe",
      ffn_options=dict(num_experts=8, top_k=2, d_expert=0, num_shared=0,
                       scoring="softmax", renormalize=True, activation="swiglu",
                       dispatch="auto", capacity_factor=1.25, aux_loss_weight=0.01,
                       z_loss_weight=1e-3, bias_update_rate=0.0))
  return config
