"""Interoperability with other ecosystems: Hugging Face checkpoints (`hf`)."""

from sparsejax.interop.hf import HFCheckpointError, HFConfigError, load_hf, save_hf

__all__ = ["load_hf", "save_hf", "HFCheckpointError", "HFConfigError"]
