"""TopK SAE on the residual stream after block 1 of a small trained dense model.

Train the model first (≈3 min on a 2-core CPU), then the SAE (a few minutes):

  python experiments/train.py --config=experiments/configs/dense.py --workdir=workdir/dense
  python experiments/sae.py --config=experiments/configs/sae.py --workdir=workdir/sae \
      --config.source.workdir=workdir/dense

Rerunning the same command resumes. Other sites: --config.source.site=ffn_in_2 (an
unknown site lists the valid ones); a Hugging Face model: --config.source.workdir= \
--config.source.hf_path=/path/to/checkpoint. The reproduction (NMSE vs k and vs the
number of latents, dead latents with and without AuxK + tied init):

  python experiments/sae.py --config=experiments/configs/sae.py --workdir=workdir/sae_record \
      --config.source.workdir=workdir/dense --record
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = dict(workdir="workdir/dense", hf_path="", site="resid_1", data_path="",
                       batch_size=8, seq_len=128)
  config.sae = dict(num_latents=1024, k=16, k_aux=64, aux_coeff=1 / 32,
                    dead_tokens=50_000, tied_init=True, normalize_input=True,
                    impl="auto")
  config.optim = dict(learning_rate=1e-3, warmup_steps=20, b1=0.9, b2=0.999,
                      eps=6.25e-10, grad_clip_norm=0.0)
  config.train = dict(num_steps=400, seed=0, init_batches=4, log_every=25,
                      eval_every=200, eval_batches=4, checkpoint_every=100,
                      keep_checkpoints=2)
  config.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  return ml_collections.ConfigDict(config)
