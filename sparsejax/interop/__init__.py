"""Interoperability with other ecosystems: Hugging Face checkpoints (`hf`)."""

from sparsejax.interop.hf import (HFCheckpointError, HFConfigError, load_hf,
                                  model_variables, save_hf)

__all__ = ["load_hf", "save_hf", "model_variables", "HFCheckpointError",
           "HFConfigError"]
