"""Building blocks with no QLIP knowledge: attention (torch SDPA), 2D RoPE, MLPs, blocks."""
from .causal_attention import CausalSelfAttention, sdpa
from .causal_transformer import CausalLMConfig, CausalTransformer, DecoderBlock
from .feed_forward import SwiGLUFeedForward
from .hf_llama import causal_lm_config_from_hf, state_dict_from_hf
from .intra_chain import IntraChain
from .kv_cache import KVCache
from .layers import ACTIVATIONS, MLP, Attention, Block, BlockConfig, SwiGLU, Transformer
from .masks import causal_mask, causal_padding_mask, decode_mask, padded_positions, prefix_lm_mask, with_key_padding
from .rmsnorm import RMSNorm
from .rope import RoPE2D, rope_2d_table, rotate_pairs
from .rope_1d import (Llama3RopeScaling, apply_rotary, llama3_scale_inv_freq, rope_1d_table, rope_inv_freq,
                      rope_table_from_angles, rotate_half)
from .sampling import cfg_logits, sample, top_k_filter, top_p_filter

__all__ = ["IntraChain", "ACTIVATIONS", "MLP", "Attention", "Block", "BlockConfig", "SwiGLU", "Transformer",
           "RoPE2D", "rope_2d_table", "rotate_pairs",
           # causal language models
           "RMSNorm", "Llama3RopeScaling", "rope_inv_freq", "llama3_scale_inv_freq", "rope_1d_table",
           "rope_table_from_angles", "rotate_half", "apply_rotary",
           "causal_mask", "decode_mask", "with_key_padding", "causal_padding_mask", "prefix_lm_mask",
           "padded_positions", "KVCache", "CausalSelfAttention", "sdpa", "SwiGLUFeedForward",
           "CausalLMConfig", "DecoderBlock", "CausalTransformer", "causal_lm_config_from_hf",
           "state_dict_from_hf", "cfg_logits", "top_k_filter", "top_p_filter", "sample"]
