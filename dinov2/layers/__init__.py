"""Building blocks of the DINOv2 backbone and heads."""

from .attention import Attention, xformers_attention
from .block import Block, BlockChunk
from .dino_head import DINOHead
from .layer_norm import LayerNorm
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "BlockChunk",
    "DINOHead",
    "LayerNorm",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "swiglu_hidden_features",
    "xformers_attention",
]
