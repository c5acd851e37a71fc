"""The QLIP model: ViT encoder -> MLP bottleneck + BSQ -> ViT decoder, plus a CLIP text tower.

Data flow (paper Fig. 2, official release):

    pixels (B,3,H,W), normalised
     └ visual: conv patchify + [cls] + learned pos-emb -> blocks (2D RoPE skips cls)
        ├ cls -> ln_post -> proj                        image embedding (B,P)
        └ patches z (B,N,D) -> down MLP -> L2 norm -> BSQ -> up MLP = z_hat (B,N,Dq)
     └ decoder: z_hat + pos-emb -> blocks -> LN -> Linear+Tanh -> Linear(3p^2) -> unpatchify
    tokens -> text: CLIP causal transformer -> ln_final at eos -> proj   (T,P)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, QLIPError
from ..nn import RoPE2D, Transformer
from ..quant import BinarySphericalQuantizer, check_ids
from .config import QLIPConfig
from .preprocess import denormalize, normalize, pil_to_tensor, resize_center_crop, tensor_to_pil, to_rgb


# The writer of our checkpoint format (qlip.io.save_pretrained). The model layer sits below qlip.io
# and may not import it; qlip.io hands its writer down with register_checkpoint_writer instead.
_checkpoint_writer: Optional[Callable[..., None]] = None


def register_checkpoint_writer(writer: Callable[..., None]) -> None:
    """Set the function behind ``QLIP.save_pretrained``: ``writer(model, folder, **kwargs)``."""
    global _checkpoint_writer
    _checkpoint_writer = writer


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"):
    log2(patch) 3x3 stride-2 convolutions with GELU (channels ``channels, 2*channels, ...`` capped
    at ``width``), then a 1x1 convolution to ``width``: the same (B, width, H/p, W/p) output as
    the patchify convolution, with local nonlinear features inside each patch."""

    def __init__(self, width: int, patch_size: int, channels: int = 32):
        super().__init__()
        n = patch_size.bit_length() - 1
        chans = [3] + [min(channels * 2 ** i, width) for i in range(n)]
        layers: List[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chans[-1], width, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:  # dtype/device probe, like the patchify conv's
        return self.proj.weight

    def reset_parameters(self) -> None:
        """PyTorch's default (Kaiming-uniform) conv init: the ViT-style std 0.02 would shrink the
        signal through the stack."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: QLIPConfig):
        super().__init__()
        v = cfg.vision
        self.patch_size, self.grid = v.patch_size, cfg.grid
        if v.stem == "conv":
            self.patch_embed = ConvStem(v.width, v.patch_size, v.stem_channels)
        else:
            self.patch_embed = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(v.width))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid ** 2 + 1, v.width))
        self.rope = RoPE2D(v.width // v.heads, self.grid, skip=1) if v.rope else None
        self.transformer = Transformer(v)
        self.ln_post = nn.LayerNorm(v.width, eps=v.ln_eps)
        self.proj = nn.Linear(v.width, cfg.embed_dim, bias=v.projection_bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[cls; patches] + pos`` of shape (B, N+1, D). No pre-LayerNorm."""
        B, _, H, W = x.shape
        if H != W or H != self.grid * self.patch_size:
            raise DataError(f"expected images of {self.grid * self.patch_size}x{self.grid * self.patch_size}, "
                            f"got {H}x{W}")
        p = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(p.dtype).expand(B, 1, -1)
        return torch.cat([cls, p], dim=1) + self.pos_embed.to(p.dtype)

    def forward(self, x: torch.Tensor, return_layers: bool = False):
        """Last hidden state (B, N+1, D) (no final norm), and every block's output if asked."""
        return self.transformer(self.embed(x), rope=self.rope, return_layers=return_layers)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Un-normalised image embedding from the last hidden state: ``proj(ln_post(cls))``."""
        return self.proj(self.ln_post(h[:, 0]))


class MLP2(nn.Module):
    """``proj(gelu(fc x))``: the bottleneck's down / up projections (paper eq. 5)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.proj = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))

    def forward_fp32(self, x):
        """The same in (at least) float32 whatever the autocast state and the weights' dtype."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            h = F.gelu(F.linear(x.to(dt), self.fc.weight.to(dt), _to(self.fc.bias, dt)))
            return F.linear(h, self.proj.weight.to(dt), _to(self.proj.bias, dt))


def _to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class Bottleneck(nn.Module):
    """``down`` MLP (D -> D -> L), L2 norm, BSQ, ``up`` MLP (L -> Dq -> Dq)."""

    def __init__(self, cfg: QLIPConfig):
        super().__init__()
        q, D, Dq = cfg.quantizer, cfg.vision.width, cfg.decoder.width
        mlp = q.embed_type == "mlp"
        self.down = MLP2(D, D, q.bits) if mlp else nn.Identity()
        self.up = MLP2(q.bits, Dq, Dq) if mlp else nn.Identity()
        self.input_l2_norm = q.input_l2_norm
        self.quantizer = BinarySphericalQuantizer(
            embed_dim=q.bits, group_size=q.group_size, inv_temperature=q.inv_temperature, l2_norm=q.l2_norm,
            beta=q.beta, gamma_0=q.gamma_0, gamma_1=q.gamma_1, persample_entropy=q.persample_entropy)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder patch features (B, N, D) -> pre-quantisation vectors u (B, N, L).

        Under autocast or with reduced-precision features/weights this runs in float32 (the
        down MLP is ~0.3% of B-16's FLOPs): the signs of ``u`` are the token bits, and a bf16
        projection of the same features flips ~0.1% of them (docs/performance.md).
        """
        reduced = z.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(z.device.type)
        if isinstance(self.down, MLP2) and reduced:
            u = self.down.forward_fp32(z)
        else:
            u = self.down(z).float() if reduced else self.down(z)
        return F.normalize(u, dim=-1) if self.input_l2_norm else u

    def forward(self, z: torch.Tensor, compute_loss: Optional[bool] = None):
        u = self.project(z)
        codes, ids, loss, stats = self.quantizer(u, compute_loss=compute_loss)
        return self.up(codes.to(z.dtype)), ids, loss, stats  # u may be float32 when z is not


class ConvHead(nn.Module):
    """The decoder's ``head: conv`` (ours, DecoderConfig): token grid (B, N, D) -> 1x1 conv ->
    log2(patch) x [nearest 2x upsample, 3x3 conv, GELU] -> 3x3 conv to RGB, (B, 3, H, W).
    Channels halve at every stage and end at ``channels`` (the first is capped at ``width``)."""

    def __init__(self, width: int, patch_size: int, grid: int, channels: int = 16):
        super().__init__()
        n = patch_size.bit_length() - 1
        chans = [min(channels * 2 ** (n - i), width) for i in range(n + 1)]
        self.grid = grid
        self.proj = nn.Conv2d(width, chans[0], kernel_size=1)
        layers: List[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU()]
        self.ups = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], 3, kernel_size=3, padding=1)

    def reset_parameters(self) -> None:
        """PyTorch's default conv init (see ConvStem.reset_parameters)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        x = h.transpose(1, 2).reshape(B, D, self.grid, self.grid)
        return self.out(self.ups(self.proj(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: QLIPConfig):
        super().__init__()
        d = cfg.decoder
        self.patch_size, self.grid = cfg.vision.patch_size, cfg.grid
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, d.width))
        self.rope = RoPE2D(d.width // d.heads, self.grid, skip=0) if d.rope else None
        self.transformer = Transformer(d)
        self.norm = nn.LayerNorm(d.width, eps=d.ln_eps)
        if d.head == "conv":
            self.conv_head = ConvHead(d.width, self.patch_size, self.grid, d.head_channels)
        else:
            hidden = d.head_dim or d.mlp_dim
            self.head_fc = nn.Linear(d.width, hidden)
            self.head_out = nn.Linear(hidden, 3 * self.patch_size ** 2)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.transformer(z_hat + self.pos_embed.to(z_hat.dtype), rope=self.rope))
        if hasattr(self, "conv_head"):
            return self.conv_head(h)
        return self.unpatchify(self.head_out(torch.tanh(self.head_fc(h))))

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, 3 p p) with per-token order (c, y, x) -> (B, 3, H, W)."""
        B, g, p = h.shape[0], self.grid, self.patch_size
        h = h.view(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return h.reshape(B, 3, g * p, g * p)


class TextEncoder(nn.Module):
    def __init__(self, cfg: QLIPConfig):
        super().__init__()
        t = cfg.text
        self.context_length, self.eos_token_id, self.legacy_pooling = t.context_length, t.eos_token_id, t.legacy_pooling
        self.token_embed = nn.Embedding(t.vocab_size, t.width)
        self.pos_embed = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t)
        self.ln_final = nn.LayerNorm(t.width, eps=t.ln_eps)
        self.proj = nn.Linear(t.width, cfg.embed_dim, bias=t.projection_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states after ``ln_final``, (T, S, Dt)."""
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise DataError(f"text tokens must be a 2-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise DataError(f"text has {tokens.shape[1]} tokens; the context length is {self.context_length}")
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]]
        return self.ln_final(self.transformer(x, causal=True))

    def eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.legacy_pooling:
            return tokens.argmax(dim=-1)
        is_eos = tokens == self.eos_token_id
        # first eos; rows without one fall back to the last position
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(-1), first, torch.full_like(first, tokens.shape[1] - 1))

    def pool(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(h[torch.arange(h.shape[0], device=h.device), self.eos_positions(tokens)])


_PASS_STAGES = ("encode", "project", "quantize", "decode")


@dataclass
class ImagePass:
    """What one encode -> quantize -> decode pass computed (fields not asked for are None).

    ``h``: encoder tokens (B, 1 + N, D), cls first; ``image_embeds``: the normalised pooled
    embedding (at least float32); ``u``: the pre-quantisation vectors (B, N, L) whose signs are the
    token bits; ``z_hat``: the up-projected codes the decoder reads; ``ids``: (B, N) int64."""
    h: torch.Tensor
    image_embeds: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    z_hat: Optional[torch.Tensor] = None
    quant_loss: Optional[torch.Tensor] = None
    quant_stats: Optional[Dict[str, torch.Tensor]] = None
    recon: Optional[torch.Tensor] = None

    @property
    def z(self) -> torch.Tensor:
        """The encoder's patch tokens (what the bottleneck reads)."""
        return self.h[:, 1:]


@dataclass
class QLIPOutput:
    recon: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: Optional[torch.Tensor]
    logit_scale: torch.Tensor
    quant_loss: torch.Tensor
    quant_stats: Dict[str, torch.Tensor]
    ids: torch.Tensor
    z: torch.Tensor
    z_hat: torch.Tensor


class QLIP(nn.Module):
    """A text-aligned visual tokenizer. See ``docs/CONTRACT.md`` and the README for the API."""

    def __init__(self, config: QLIPConfig, init: bool = True):
        super().__init__()
        self.config = config.validate()
        self.visual = VisionEncoder(config)
        self.bottleneck = Bottleneck(config)
        self.decoder = Decoder(config)
        self.text = TextEncoder(config) if config.text is not None else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self._tokenizer = None
        self.precision_choice = None  # set by qlip.load(..., precision=...): a model.precision.PrecisionChoice
        if init:
            self.init_weights()

    # ---- properties ----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.config.vision.patch_size

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def num_bits(self) -> int:
        return self.config.quantizer.bits

    @property
    def image_mean(self):
        return tuple(self.config.preprocess.mean)

    @property
    def image_std(self):
        return tuple(self.config.preprocess.std)

    @property
    def quantizer(self) -> BinarySphericalQuantizer:
        return self.bottleneck.quantizer

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---- init ------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Initialisation for training from scratch (ViT/CLIP conventions)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if isinstance(self.visual.patch_embed, ConvStem):
            self.visual.patch_embed.reset_parameters()
        if hasattr(self.decoder, "conv_head"):
            self.decoder.conv_head.reset_parameters()
        nn.init.normal_(self.visual.cls_token, std=0.02)
        nn.init.normal_(self.visual.pos_embed, std=0.02)
        nn.init.normal_(self.decoder.pos_embed, std=0.02)
        if self.text is not None:
            nn.init.normal_(self.text.pos_embed, std=0.01)

    def with_decoder_head(self, head: str, channels: int = 16) -> "QLIP":
        """A copy whose decoder has a fresh pixel ``head`` (DecoderConfig.head: ``linear`` / ``conv``);
        every other weight (encoder, text tower, bottleneck, decoder transformer and norm) is kept.
        For stage 2 (``model.decoder_head`` in a recipe): the new head learns behind the frozen encoder."""
        cfg = self.config.replace(**{"decoder.head": head, "decoder.head_channels": channels})
        new = QLIP(cfg).to(device=self.device, dtype=self.dtype)
        new.init_weights()
        missing, _ = new.load_state_dict(self.state_dict(), strict=False)
        fresh = ("decoder.conv_head.", "decoder.head_fc.", "decoder.head_out.")
        kept = [k for k in missing if not k.startswith(fresh)]
        if kept:
            raise QLIPError(f"with_decoder_head: weights missing from the source model: {kept[:5]}")
        return new

    def drop_text(self) -> None:
        """Remove the text tower (stage 2 / tokenizer-only use)."""
        self.text = None
        self.config.text = None

    # ---- the image pass: the one place where encode -> quantize -> decode is written -------
    def image_pass(self, x: torch.Tensor, *, embed: bool = True, until: str = "decode",
                   quant_loss: Optional[bool] = None, encoder_grad: bool = True) -> ImagePass:
        """Encoder -> bottleneck projection -> BSQ -> decoder, stopping after ``until``.

        ``until``: ``"encode"`` (encoder tokens only), ``"project"`` (+ the pre-quantisation
        vectors ``u``), ``"quantize"`` (+ ids, up-projected codes, BSQ loss), ``"decode"`` (+ the
        reconstruction). ``embed``: also pool the normalised image embedding. ``quant_loss``:
        compute the BSQ loss terms (default: in training mode). ``encoder_grad=False`` runs the
        encoder without a graph (stage 2 trains the bottleneck and decoder behind a frozen
        encoder). ``forward``, ``reconstruct``, the training task and the demo's evaluation all
        go through here.
        """
        if until not in _PASS_STAGES:
            raise ValueError(f"until must be one of {', '.join(_PASS_STAGES)}, got {until!r}")
        if encoder_grad:
            h = self.visual(x)
        else:
            with torch.no_grad():
                h = self.visual(x)
        out = ImagePass(h=h)
        if embed:
            e = self.visual.pool(h)
            out.image_embeds = F.normalize(e.to(torch.promote_types(e.dtype, torch.float32)), dim=-1)
        if until == "encode":
            return out
        if until == "project":
            out.u = self.bottleneck.project(h[:, 1:])
            return out
        out.z_hat, out.ids, out.quant_loss, out.quant_stats = self.bottleneck(h[:, 1:], compute_loss=quant_loss)
        if until == "decode":
            out.recon = self.decoder(out.z_hat)
        return out

    # ---- training forward ------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_tokens: Optional[torch.Tensor] = None,
                compute_quant_loss: Optional[bool] = None) -> QLIPOutput:
        p = self.image_pass(images, quant_loss=compute_quant_loss)
        text_embeds = None
        if text_tokens is not None:
            text_embeds = self.encode_text(text_tokens, normalize=True)
        return QLIPOutput(recon=p.recon, image_embeds=p.image_embeds, text_embeds=text_embeds,
                          logit_scale=self.logit_scale.exp(), quant_loss=p.quant_loss, quant_stats=p.quant_stats,
                          ids=p.ids.view(-1, self.grid, self.grid), z=p.z, z_hat=p.z_hat)

    # ---- images <-> tokens -----------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) or paths -> (B, 3, H, W) normalised float tensor on the model's device."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        from .preprocess import open_image
        pp = self.config.preprocess
        out = []
        for im in images:
            im = to_rgb(im) if hasattr(im, "mode") else open_image(im)
            out.append(pil_to_tensor(resize_center_crop(im, pp.resize, pp.crop, pp.interpolation)))
        x = normalize(torch.stack(out), pp.mean, pp.std)
        return x.to(self.device)

    def postprocess(self, y: torch.Tensor) -> List:
        """Normalised (B, 3, H, W) -> list of RGB PIL images (inverse-normalised, clamped)."""
        x01 = denormalize(y.float(), self.image_mean, self.image_std)
        return [tensor_to_pil(im) for im in x01]

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> token ids (B, H/p, W/p), int64 in [0, 2**L)."""
        u = self.image_pass(x, embed=False, until="project").u
        if not torch.isfinite(u).all():
            # a NaN would silently become bit 0 (reduced-precision overflow, a broken kernel)
            raise QLIPError(f"non-finite pre-quantization values while tokenizing (model dtype {self.dtype}, "
                            f"autocast {torch.is_autocast_enabled(u.device.type)}); the ids would be wrong. "
                            "Check the inputs, or use precision fp32 (docs/performance.md)")
        return self.quantizer.codes_to_ids(u).view(-1, self.grid, self.grid)

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 3 or tuple(ids.shape[1:]) != (self.grid, self.grid):
            raise DataError(f"token ids must have shape (B, {self.grid}, {self.grid}) for this model, "
                            f"got {tuple(ids.shape)}")
        check_ids(ids, self.num_bits, "token ids")

    @torch.no_grad()
    def detokenize(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, H/p, W/p) -> images (B, 3, H, W) in the normalised pixel space."""
        ids = torch.as_tensor(ids, device=self.device)
        self.check_ids(ids)
        codes = self.quantizer.ids_to_codes(ids.flatten(1), dtype=self.dtype)
        return self.decoder(self.bottleneck.up(codes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Tokenize and detokenize in one pass."""
        return self.image_pass(x, embed=False, quant_loss=False).recon

    # ---- CLIP side -------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        e = self.visual.pool(self.visual(x))
        return F.normalize(e, dim=-1) if normalize else e

    def _require_text(self):
        if self.text is None:
            raise QLIPError("this model has no text tower (it was dropped, e.g. after stage 2); "
                            "zero-shot and text encoding need a checkpoint with one")

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self._require_text()
        tokens = tokens.to(self.device)
        e = self.text.pool(self.text(tokens), tokens)
        return F.normalize(e, dim=-1) if normalize else e

    @property
    def tokenizer(self):
        """Callable: list of strings -> (T, 77) int64 CLIP BPE tokens."""
        self._require_text()
        if self._tokenizer is None:
            from ..text import Tokenizer
            self._tokenizer = Tokenizer(context_length=self.config.text.context_length)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    @torch.no_grad()
    def zero_shot(self, x: torch.Tensor, prompts: Union[Sequence[str], torch.Tensor],
                  temperature: Optional[float] = None) -> torch.Tensor:
        """Softmax over prompts, (B, len(prompts)). Uses ``exp(logit_scale)`` unless
        ``temperature`` is given (the official notebook uses 100)."""
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenizer(list(prompts))
        img = self.encode_image(x, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        scale = self.logit_scale.exp() if temperature is None else temperature
        return (scale * img @ txt.T).softmax(dim=-1)

    @torch.no_grad()
    def encode_image_features(self, x: torch.Tensor, layer: int = -1, include_cls: bool = False) -> torch.Tensor:
        """Patch features (B, N, D) of hidden state ``layer``, without the final norm.

        The hidden states are numbered like transformers' ``output_hidden_states`` (what LLaVA's
        ``mm_vision_select_layer`` indexes): 0 = the embeddings (stem + cls + position), ``k`` =
        the output of block ``k``, python indexing from the end: -1 = the last block, -2 = the
        second-to-last hidden state (LLaVA's choice; for a one-block encoder, the embeddings).
        ``include_cls`` prepends the cls token."""
        v = self.visual
        emb = v.embed(x)
        _, layers = v.transformer(emb, rope=v.rope, return_layers=True)
        hidden = [emb, *layers]
        try:
            h = hidden[layer]
        except IndexError:
            raise QLIPError(f"layer {layer} out of range: an encoder with {len(layers)} blocks has {len(hidden)} "
                            f"hidden states (0 = embeddings, {len(layers)} = last block; -1 .. -{len(hidden)})") from None
        return h if include_cls else h[:, 1:]

    # ---- persistence -----------------------------------------------------------------------
    def save_pretrained(self, folder, **kwargs) -> None:
        """Write our checkpoint format (``config.json`` + ``model.safetensors``) into ``folder``;
        ``qlip.load(folder)`` reads it back exactly. The format is written by ``qlip.io``, a layer
        above this one, which registers its writer here when imported (``import qlip`` does)."""
        if _checkpoint_writer is None:
            raise QLIPError("no checkpoint writer registered: import qlip (or qlip.io) first")
        _checkpoint_writer(self, folder, **kwargs)

    def num_params(self) -> Dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        parts = {"visual": count(self.visual), "bottleneck": count(self.bottleneck),
                 "decoder": count(self.decoder), "text": count(self.text)}
        parts["total"] = sum(p.numel() for p in self.parameters())
        return parts

    def compression_ratio(self) -> float:
        """Raw 24-bit RGB bits per token-bit: ``24 p^2 / L`` (paper Table 2)."""
        return 24 * self.patch_size ** 2 / self.num_bits
