"""MoBA (Mixture of Block Attention) for long-context serving over paged KV caches."""

from moba_backend.config import MobaConfig, parse_moba_config, attention_backend_from_env

__all__ = ["MobaConfig", "parse_moba_config", "attention_backend_from_env"]
__version__ = "0.1.0"
