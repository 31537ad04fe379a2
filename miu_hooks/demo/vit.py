"""The demo's model: a tiny Vision Transformer for 8x8 colour images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyViT", "tiny_vit"]


class TinyViT(nn.Module):
    """A small Vision Transformer: patch embedding, CLS token, pre-norm encoder, linear head.

    Args:
        image_size: Input side (square images).
        patch_size: Patch side; ``image_size`` must be a multiple.
        channels: Input channels.
        dim: Token width.
        depth: Encoder layers.
        heads: Attention heads.
        num_classes: Logits.

    Example:
        >>> tiny_vit()(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 4,
        channels: int = 3,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        for param in (self.cls_token, self.position):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits [B, num_classes] for images [B, C, H, W]."""
        z = self.patch(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls_token.expand(len(z), -1, -1), z], dim=1) + self.position
        logits: Tensor = self.classifier(self.norm(self.encoder(z))[:, 0])
        return logits


def tiny_vit() -> TinyViT:
    """The demo's architecture, for ``--arch miu_hooks.demo:tiny_vit``."""
    return TinyViT()
