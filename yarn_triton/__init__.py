"""yarn-triton: YaRN rotary position embeddings, applied in place by one Triton kernel."""

from .rope import RopeParams
from .reference import rope_reference
from .op import apply_rope_
from .module import YarnRotaryEmbedding

__all__ = ["RopeParams", "apply_rope_", "rope_reference", "YarnRotaryEmbedding"]
__version__ = "0.1.0"
