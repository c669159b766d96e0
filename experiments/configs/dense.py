"""Dense baseline: a small dense decoder LM on the embedded stdlib corpus (≈3 min on a
2-core CPU). Every other config starts from this one.

  python experiments/train.py --config=experiments/configs/dense.py --workdir=workdir/dense
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = dict(vocab_size=256, d_model=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, d_ff=0, tie_embeddings=True, dtype="float32",
                      attention="mha", ffn="swiglu", linear="dense", kernel_impl="auto",
                      # present (empty: the component's defaults) so that any option
                      # can be set from the command line, e.g.
                      # --config.model.attention_options.pattern=local
                      attention_options={}, ffn_options={}, linear_options={},
                      memory_options={})
  config.data = dict(path="", seq_len=128, batch_size=16, val_fraction=0.05, seed=0)
  config.optim = dict(learning_rate=3e-3, warmup_steps=30, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0)
  config.train = dict(num_steps=360, seed=0, log_every=20, eval_every=120,
                      eval_batches=8, checkpoint_every=120, sample_prompt="def ",
                      sample_tokens=300)
  config.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  return ml_collections.ConfigDict(config)
