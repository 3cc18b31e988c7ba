"""Deep prompts on frozen open_clip towers (image and text), without forking open_clip.

N learnable tokens sit right after the first token (class token, or start-of-text). They enter at the
input and are replaced by a fresh learned set before each of the first D transformer blocks, as in
VPT-deep / IVLP / PromptSRC. The frozen blocks are called exactly as open_clip calls them.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn


def _replace_prompts(x: torch.Tensor, prompt: torch.Tensor, n: int, batch_first: bool) -> torch.Tensor:
    """Swap the n tokens after the first for `prompt`: [n, width] for every sequence of the batch, or
    [batch, n, width], one set per sequence (a shared backbone serving several domains in one batch)."""
    prompt = prompt.to(x.dtype)
    if batch_first:
        rows = prompt if prompt.dim() == 3 else prompt.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], rows, x[:, 1 + n :]], dim=1)
    rows = prompt.transpose(0, 1) if prompt.dim() == 3 else prompt.unsqueeze(1).expand(-1, x.shape[1], -1)
    return torch.cat([x[:1], rows, x[1 + n :]], dim=0)


class PromptedVisionTower(nn.Module):
    """Prompts enter through ln_pre like every other token and are dropped before pooling, so pooling sees
    exactly the tokens the tower was trained on."""

    def __init__(self, visual: nn.Module, num_tokens: int = 4, depth: int = 9) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"deep visual prompts need an open_clip VisionTransformer image tower, got {type(visual).__name__}"
            )
        self.visual = visual
        width = visual.class_embedding.shape[-1]
        layers = len(visual.transformer.resblocks)
        self.num_tokens = num_tokens
        self.depth = max(1, min(depth, layers))
        self.prompts = nn.Parameter(torch.randn(self.depth, num_tokens, width) * 0.02)

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images, self.prompts)

    def encode(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output with `prompts`: [depth, n, width] for the whole batch (the trained
        student), or [batch, depth, n, width], each image with its own (the shared backbone graph)."""
        visual = self.visual
        x = visual._embeds(images)  # [B, 1 + patches, W], ln_pre applied
        n = self.num_tokens
        per_row = prompts.dim() == 4
        layer = (lambda i: prompts[:, i]) if per_row else (lambda i: prompts[i])
        # LayerNorm is per token, so normalising the prompts alone equals normalising the whole sequence.
        first = visual.ln_pre(layer(0)).to(x.dtype)
        x = torch.cat([x[:, :1], first if per_row else first.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(transformer.resblocks):
            if 0 < i < self.depth:
                x = _replace_prompts(x, layer(i), n, transformer.batch_first)
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled


class PromptedTextTower(nn.Module):
    """The text tower of an open_clip CLIP with deep prompts standing in for the first words of the prompt.

    Class names are tokenised as "X X X X {name}."; the placeholder embeddings are replaced by the learned
    context (initialised from the embeddings of `init_words`, e.g. "a photo of a").
    """

    def __init__(self, clip: nn.Module, tokenizer, num_tokens: int = 4, depth: int = 9,
                 init_words: str | None = "a photo of a") -> None:
        super().__init__()
        if not isinstance(clip, CLIP):
            raise TypeError(
                f"text prompts need an open_clip CLIP with its built-in text tower, got {type(clip).__name__}"
            )
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.depth = max(1, min(depth, len(clip.transformer.resblocks)))
        width = clip.token_embedding.weight.shape[1]
        prompts = torch.randn(self.depth, num_tokens, width) * 0.02
        if init_words and num_tokens:
            with torch.no_grad():
                ids = tokenizer([init_words])
                words = int((ids[0] != 0).sum()) - 2  # minus start and end of text
                if words == num_tokens:
                    prompts[0] = self.token_embedding(ids)[0, 1 : 1 + num_tokens]
        self.prompts = nn.Parameter(prompts)

    def tokenize(self, classnames: list[str]) -> torch.Tensor:
        prefix = " ".join(["X"] * self.num_tokens)
        return self.tokenizer([f"{prefix} {name}.".strip() for name in classnames])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.num_tokens
        transformer = self.transformer
        cast = transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast)
        x = _replace_prompts(x, self.prompts[0], n, batch_first=True)
        x = x + self.positional_embedding.to(cast)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(transformer.resblocks):
            if 0 < i < self.depth:
                x = _replace_prompts(x, self.prompts[i], n, transformer.batch_first)
            x = block(x, attn_mask=self.attn_mask)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x
