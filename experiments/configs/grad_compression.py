"""Sparse gradient exchange on a tiny LM, data parallel over 8 devices (fake CPU
devices on a CPU host). Pick a variant after a colon:

  python experiments/train.py --config=experiments/configs/grad_compression.py:dgc_999 \\
      --workdir=workdir/gc_dgc_999
  python experiments/grad_compression.py --record        # all variants side by side

Variants (ratio = fraction of each matrix's entries a device sends per step; every
sparse variant sends bfloat16 values + uint16 chunk-local indices, 4 bytes per entry):
  dense        the plain step's dense all-reduce (AdamW, b1 = 0.9)
  dgc_dense    DGC's dense counterpart: DGC's optimizer with ratio 1 (momentum 0.9
               applied on the devices and all-reduced dense, local clipping, AdamW with
               b1 = 0): the baseline with the same optimizer as the dgc_* variants
  topk_ef_99   top-k + error feedback, ratio 0.01 (99% sparsity), AdamW
  topk_ef_999  top-k + error feedback, ratio 0.001 (99.9%), AdamW
  dgc_99       DGC (momentum 0.9, local clipping, warm-up 75% → 99.6% over the first
               quarter of the steps), ratio 0.01, AdamW with b1 = 0 (DGC's momentum
               correction is the momentum)
  dgc_993      the same at ratio 0.007 (99.3%: ≈100× fewer bytes)
  dgc_995      the same at ratio 0.005 (99.5%)
  dgc_999      the same at ratio 0.001 (99.9%)
  sgd_dense    the DGC paper's setting: momentum SGD (momentum 0.9, L2 weight decay,
               global-norm clipping) with the dense all-reduce
  sgd_dgc_993  DGC at ratio 0.007 on it: the momentum moves into the devices' momentum
               correction (optimizer SGD without momentum), the clipping into their
               local clipping
  sgd_dgc_999  the same at ratio 0.001
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))

NUM_STEPS = 300
WIRE = dict(value_dtype="bfloat16", index_dtype="uint16")
DGC = dict(method="dgc", warmup_steps=NUM_STEPS // 4, **WIRE)
SGD = dict(name="sgd", learning_rate=0.3, weight_decay=1e-4)
VARIANTS = {
    "dense": dict(method="none"),
    "dgc_dense": dict(DGC, ratio=1.0),
    "topk_ef_99": dict(method="topk_ef", ratio=0.01, **WIRE),
    "topk_ef_999": dict(method="topk_ef", ratio=0.001, **WIRE),
    "dgc_99": dict(DGC, ratio=0.01),
    "dgc_993": dict(DGC, ratio=0.007),
    "dgc_995": dict(DGC, ratio=0.005),
    "dgc_999": dict(DGC, ratio=0.001),
    "sgd_dense": dict(method="none"),
    "sgd_dgc_993": dict(DGC, ratio=0.007),
    "sgd_dgc_999": dict(DGC, ratio=0.001),
}


def get_config(variant: str = "dense"):
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r} must be one of {sorted(VARIANTS)}")
  config = dense["get_config"]()
  config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2)
  config.data.update(seq_len=64, batch_size=32)          # 4 sequences per device
  config.optim.update(warmup_steps=20)
  config.train.update(num_steps=NUM_STEPS, log_every=10, eval_every=50, eval_batches=8,
                      checkpoint_every=NUM_STEPS // 2, sample_tokens=0)
  config.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
  config.train.grad_compression = VARIANTS[variant]
  if variant.startswith("sgd"):
    config.optim.update(SGD)
  if VARIANTS[variant]["method"] == "dgc":
    config.optim.b1 = 0.0
  return config
