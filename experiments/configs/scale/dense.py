"""Dense decoder at pod scale, Llama-3-shaped: "1b" (d 2048, 16 blocks, 32 heads / 8 KV
heads, d_ff 8192, tied embeddings: 1.24B params) and "8b" (d 4096, 32 blocks, 32 / 8
heads, d_ff 14336, untied: 8.03B), vocab 128,256, bf16 compute with f32 master weights,
blocks rematerialized, global batch 256 × 4096 tokens, FSDP over every chip. The base of
the other scale/ configs. Planned on paper (no pod needed):

  python experiments/aot_compile.py --config=experiments/configs/scale/dense.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/dense.py:8b --topology=v6e:16x16 --fit_layers=1,2

Training it needs a tokenized corpus (--config.data.path, --config.data.tokenizer).
"""

import ml_collections

SIZES = {
    "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, d_ff=8192,
               tie_embeddings=True),
    "8b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
               tie_embeddings=False),
}


def get_config(size: str = "1b") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"size={size!r} must be one of {sorted(SIZES)}")
  config = ml_collections.ConfigDict()
  config.model = dict(vocab_size=128256, rope_theta=500_000.0, dtype="bfloat16",
                      param_dtype="float32", remat=True, attention="mha", ffn="swiglu",
                      linear="dense", kernel_impl="auto", attention_options={},
                      ffn_options={}, linear_options={}, memory_options={},  # overridable
                      **SIZES[size])
  config.data = dict(path="", seq_len=4096, batch_size=256)
  config.optim = dict(learning_rate=3e-4, warmup_steps=2000, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0)
  config.train = dict(num_steps=100_000, sample_tokens=0)
  config.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  return ml_collections.ConfigDict(config)
