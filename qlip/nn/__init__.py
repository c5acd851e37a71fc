"""Building blocks with no QLIP knowledge: attention (torch SDPA), 2D RoPE, MLPs, blocks."""
from .layers import ACTIVATIONS, MLP, Attention, Block, BlockConfig, SwiGLU, Transformer
from .rope import RoPE2D, rope_2d_table, rotate_pairs

__all__ = ["ACTIVATIONS", "MLP", "Attention", "Block", "BlockConfig", "SwiGLU", "Transformer",
           "RoPE2D", "rope_2d_table", "rotate_pairs"]
