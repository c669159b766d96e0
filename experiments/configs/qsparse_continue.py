"""Q-Sparse continue-training: start from a dense run's params and turn on top-K sparsity.

The paper's continue-train / finetune setting: keep the dense model's SwiGLU FFN and
sparsify the input of every projection from the first step. First train the dense model

  python experiments/train.py --config=experiments/configs/dense.py --workdir=workdir/dense

then:

  python experiments/train.py --config=experiments/configs/qsparse_continue.py \
      --workdir=workdir/qsparse_continue --config.train.init_from=workdir/dense

`init_from` is only read when the workdir has no checkpoint yet; rerunning resumes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dense  # noqa: E402  (the sibling config file)


def get_config():
  config = dense.get_config()
  config.model.update(linear="qsparse",
                      linear_options=dict(topk_ratio=0.7, mode="topk", n=2, m=4,
                                          rescale=False, impl="auto"))
  config.optim.update(learning_rate=1e-3, warmup_steps=20)
  config.train.update(num_steps=200, init_from="workdir/dense")
  return config
