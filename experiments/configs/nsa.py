"""Native Sparse Attention: the dense baseline with "nsa" attention in every block
(compression l=16, d=8; selection of n=2 blocks of l'=32 incl. the current one; window
w=32), sized for seq_len 128 so each branch is sparse: a query late in the sequence reads
15 compressed blocks + 64 selected + 32 window tokens instead of up to 128.

  python experiments/train.py --config=experiments/configs/nsa.py --workdir=workdir/nsa

Variants: --config.model.attention_options.shared_kv=True (one K/V projection for the
three branches, as in the fla reference), --config.model.attention_options.compress=mean
(mean-pool φ). Compare with the dense baseline (dense.py) at equal tokens.
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(
      attention="nsa",
      attention_options=dict(block_len=16, stride=8, select_block=32, num_selected=2,
                             window=32, num_initial=1, num_local=2, shared_kv=False,
                             compress="mlp", compress_hidden=0, cmp_rope=True,
                             window_impl="auto", selection_impl="auto"))
  return config
