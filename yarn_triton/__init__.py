"""yarn-triton: YaRN rotary position embeddings, applied in place by one Triton kernel."""

from .rope import RopeParams, RopeTracker
from .config import SUPPORTED_ROPE_TYPES, rope_params_from_config
from .reference import rope_reference
from .op import (QueryScale, apply_mla_rope_and_cache_, apply_qk_norm_rope, apply_qk_norm_rope_, apply_rope,
                 apply_rope_, apply_rope_and_cache_)
from .module import YarnRotaryEmbedding
from .attention import YarnGQAAttention, YarnMLAAttention

__all__ = [
    "RopeParams",
    "RopeTracker",
    "SUPPORTED_ROPE_TYPES",
    "rope_params_from_config",
    "apply_rope",
    "apply_rope_",
    "apply_qk_norm_rope",
    "apply_qk_norm_rope_",
    "apply_rope_and_cache_",
    "apply_mla_rope_and_cache_",
    "QueryScale",
    "rope_reference",
    "YarnRotaryEmbedding",
    "YarnGQAAttention",
    "YarnMLAAttention",
]
__version__ = "0.1.0"
