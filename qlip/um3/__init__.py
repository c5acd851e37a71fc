"""UM3: one autoregressive model for text, image-to-text and text-to-image (paper Sec. 4.1).

A Llama-3 decoder with QK-norm over a vocabulary extended with QLIP's visual sub-tokens
(:mod:`.model`, :mod:`.vocab`), trained with Eq. 6's separate softmax (:mod:`.loss`) on batches
mixed by Eq. 7's calm-down schedule (:mod:`.schedule`, :mod:`.mixing`) through the training
engine (:mod:`.task`, task ``um3``), sampled with a KV cache and classifier-free guidance
(:mod:`.generate`). docs/um3.md.
"""
from ..train import register_task

register_task("um3", "qlip.um3.task:UM3Task")
