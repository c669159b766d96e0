"""Fine-grained MoE with a shared expert (DeepSeekMoE): 16 small experts, top-4 routed
plus 1 always-active shared expert, each of hidden size d_ff // 5, so the activated FFN
params per token (4 routed + 1 shared) ≈ the dense default's.

  python experiments/train.py --config=experiments/configs/moe_shared.py --workdir=workdir/moe_shared

Add DeepSeek-V3 routing with --config.model.ffn_options.scoring=sigmoid
--config.model.ffn_options.bias_update_rate=1e-3 --config.model.ffn_options.aux_loss_weight=0.
Compare with moe.py (8 experts top-2) and the dense baseline (dense.py).
"""

import os
import runpy

moe = runpy.run_path(os.path.join(os.path.dirname(__file__), "moe.py"))


def get_config():
  config = moe["get_config"]()
  config.model.ffn_options.update(num_experts=16, top_k=4, num_shared=1)
  return config
