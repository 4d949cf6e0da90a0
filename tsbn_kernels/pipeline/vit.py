"""ViT-S encoder for dense multi-task prediction (PASCAL-Context), with timm's parameter names (patch_embed.proj,
cls_token, pos_embed, blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm), so a timm ViT-S/16
state_dict loads with ``--pretrained``. The LayerNorms become task-specific (TSσLN) by ``convert_layernorm``.

Replicated batch: the patch embedding and the position embedding run once on the N images; the tokens are
repeated T times just before the first norm (block 0's norm1), where the tasks' features start to differ.
Attention mixes tokens of one sample only, so per-task gradients from one backward (mtl.OneBackward) hold for
every Linear layer of the blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mtl.per_task_grads import replicate as replicate_batch


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT: embedding dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT that returns the patch tokens as a feature map [B, dim, H/p, W/p]. The position embedding is
    stored for ``image_size`` and resized bicubically for other input sizes (so one checkpoint serves any size)."""

    def __init__(self, image_size: int | tuple[int, int] = 224, patch_size: int = 16, dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"ViT: image size {height}×{width} is not a multiple of the patch size {patch_size}")
        self.grid = (height // patch_size, width // patch_size)
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_channels = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _position_embedding(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patches = patches.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor, replicate: int = 1, stem_once: bool = True) -> Tensor:
        if replicate > 1 and not stem_once:
            x = x.repeat(replicate, 1, 1, 1)
        patches = self.patch_embed(x)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._position_embedding(grid)
        if replicate > 1 and stem_once:   # every task's block starts at block 0's (task-specific) norm1
            tokens = replicate_batch(tokens, replicate)
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def vit_small(image_size: int | tuple[int, int] = 224, width: int = 64, depth: int = 12) -> VisionTransformer:
    """ViT-S/16 (dim 384, 6 heads, 12 blocks) at ``width=64``; dim = 6·width keeps 6 heads at smaller widths."""
    return VisionTransformer(image_size, 16, 6 * width, depth, 6)


def load_timm_state(model: VisionTransformer, state: dict[str, Tensor]) -> None:
    """Load a timm ViT state_dict (classifier head dropped; a position embedding of another grid is resized)."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        side = int(math.isqrt(pos.shape[1] - 1))
        if side * side != pos.shape[1] - 1:
            raise ValueError(f"pretrained pos_embed of {pos.shape[1] - 1} patches is not a square grid")
        resized = F.interpolate(pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2), size=model.grid,
                                mode="bicubic", align_corners=False)
        state["pos_embed"] = torch.cat([pos[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the pretrained state does not match the ViT: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
