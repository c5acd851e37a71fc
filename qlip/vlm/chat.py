"""Answering: images + prompts -> text, with the language model's own ``generate`` (KV cache).

The prompt is one user turn (``<image>\\n`` + the prompt unless it holds the placeholder),
rendered with the model's template and its generation prompt; prompts of a batch are left-padded;
the spliced embeddings go to ``llm.generate(inputs_embeds=...)``, which returns the new tokens.
Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k`` / ``top_p``
(seed with ``torch.manual_seed`` for repeatable samples).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .data import VLMProcessor
from .model import VLM


@torch.no_grad()
def generate_ids(model: VLM, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, use_cache: bool = True) -> torch.Tensor:
    """New token ids (B, <= max_new_tokens), padded with the pad id after an early end."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    proc = VLMProcessor(model)
    samples = [proc.encode([{"role": "user", "content": p}], image=im, train=False) for im, p in zip(images, prompts)]
    batch = proc.collate(samples, padding_side="left")
    dev = next(model.projector.parameters()).device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    embeds = model.embed(ids, batch["pixel_values"].to(dev))
    kw = dict(do_sample=do_sample)
    if do_sample:
        kw.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:  # no sampling knobs (a model's generation_config may carry some: silence them)
        kw.update(temperature=None, top_k=None, top_p=None)
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             use_cache=use_cache, pad_token_id=model.pad_token_id,
                             eos_token_id=model.tokenizer.eos_token_id, **kw)
    return out


def generate(model: VLM, images, prompts: Union[str, Sequence[str]], max_new_tokens: int = 32,
             **kw) -> Union[str, List[str]]:
    """Answers to ``prompts`` about ``images`` (PIL images or paths; one of each gives one string)."""
    single = isinstance(prompts, str)
    if single:
        prompts, images = [prompts], [images]
    new = generate_ids(model, list(images), list(prompts), max_new_tokens=max_new_tokens, **kw)
    texts = model.tokenizer.batch_decode(new, skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    return texts[0] if single else texts
