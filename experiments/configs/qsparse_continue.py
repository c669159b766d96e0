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
import runpy

HERE = os.path.dirname(__file__)
dense = runpy.run_path(os.path.join(HERE, "dense.py"))
qsparse = runpy.run_path(os.path.join(HERE, "qsparse.py"))


def get_config():
  config = qsparse["get_config"]()
  config.model.ffn = dense["get_config"]().model.ffn   # the dense run's FFN (SwiGLU)
  config.optim.update(learning_rate=1e-3, warmup_steps=20)
  config.train.update(num_steps=200, init_from="workdir/dense")
  return config
