"""Hugging Face models served expert-parallel (needs the ``hf`` extra: transformers)."""

from .checkpoint import CheckpointError, CheckpointReader
from .families import FAMILIES, Family, family_of
from .loading import EPMoEBlock, from_pretrained, moe_config_of
from .lockstep import Lockstep
from .saving import save_pretrained

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "CheckpointReader",
    "EPMoEBlock",
    "Family",
    "Lockstep",
    "family_of",
    "from_pretrained",
    "moe_config_of",
    "save_pretrained",
]
