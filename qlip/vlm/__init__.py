"""A LLaVA-style vision-language model on QLIP's encoder (docs/vlm.md).

``build_vlm(qlip, llm)`` makes one (frozen QLIP vision tower at layer -2, LLaVA-1.5 projector, any
``transformers`` causal LM); recipes with ``task: vlm`` train it in LLaVA-1.5's two stages
through the training engine; ``load(folder)`` reads a saved one and ``generate`` answers.
"""
from ..train import register_task
from .chat import generate
from .model import VLM, VLMConfig, answer_loss, build_vlm, load, splice

register_task("vlm", "qlip.vlm.task:VLMTask")

__all__ = ["VLM", "VLMConfig", "build_vlm", "load", "splice", "answer_loss", "generate"]

