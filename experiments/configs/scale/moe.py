"""Mixture-of-Experts at pod scale: the scale/dense.py backbone with a 64-expert top-8
SwiGLU MoE FFN in every block (fine-grained experts, d_expert = d_ff / 8, so the
activated FFN params per token equal the dense model's: "1b" 1.0B activated
(non-embedding) of 6.9B, "8b" 7.0B of 47.5B), expert parallel: the experts split over
the mesh's "expert" axis (8) with all-to-all dispatch (capacity factor 1.25), FSDP over
the rest.

  python experiments/aot_compile.py --config=experiments/configs/scale/moe.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/moe.py:8b --topology=v6e:16x16 --fit_layers=1,2
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config(size: str = "1b"):
  config = dense["get_config"](size)
  config.model.update(
      ffn="moe",
      ffn_options=dict(num_experts=64, top_k=8, d_expert=config.model.d_ff // 8,
                       dispatch="capacity", capacity_factor=1.25, expert_parallel=True,
                       aux_loss_weight=0.01, z_loss_weight=1e-3, log_expert_load=False))
  config.mesh.update(expert=8)
  return config
