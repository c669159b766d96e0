"""Config-driven decoder LM."""

from sparsejax.models.config import ModelConfig, parse_model_config
from sparsejax.models.transformer import DecoderLM
