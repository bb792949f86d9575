"""Small Flax (linen) models whose variables follow the names the spec builders expect.

`MLP` -> `mlp_spec`, `ResNet` -> `resnet_spec`, `ViT` -> `vit_spec`. They are deliberately tiny: the
tests build them with random weights and the digits example trains the MLP on CPU.
All models run in inference mode (`apply(variables, x)`); BatchNorm uses its running statistics, which
`drm_jax.permute.recompute_batch_stats` fills from data.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """x (batch, features) -> logits (batch, num_classes); ReLU between Dense_0 .. Dense_{L}."""

    hidden: Sequence[int] = (64, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def _norm(kind: str, groups: int, name: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=True, name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=groups, name=name)
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'group'")


class ResNet(nn.Module):
    """x (batch, H, W, C) -> logits. Stem conv + norm, basic blocks (conv-norm-relu-conv-norm + shortcut),
    global mean pooling, Dense head. Stage s > 0 starts with a stride-2 block with a projection shortcut.

    norm: "batch" (BatchNorm, running statistics) or "group" (GroupNorm with `groups` groups).
    """

    widths: Sequence[int] = (8, 16)
    blocks_per_stage: int = 1
    num_classes: int = 10
    norm: str = "batch"
    groups: int = 2

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(self.widths[0], (3, 3), name="stem_conv")(x)
        x = nn.relu(_norm(self.norm, self.groups, "stem_norm")(x))
        for s, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                x = _BasicBlock(width, stride, self.norm, self.groups, name=f"stage{s}_block{b}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class _BasicBlock(nn.Module):
    width: int
    stride: int
    norm: str
    groups: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        strides = (self.stride, self.stride)
        y = nn.Conv(self.width, (3, 3), strides=strides, name="conv1")(x)
        y = nn.relu(_norm(self.norm, self.groups, "norm1")(y))
        y = nn.Conv(self.width, (3, 3), name="conv2")(y)
        y = _norm(self.norm, self.groups, "norm2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = nn.Conv(self.width, (1, 1), strides=strides, name="proj_conv")(x)
            shortcut = _norm(self.norm, self.groups, "proj_norm")(shortcut)
        return nn.relu(y + shortcut)


class ViT(nn.Module):
    """x (batch, H, W, C) -> logits. Non-overlapping patches, Dense embedding, learned positions,
    pre-LayerNorm transformer blocks, final LayerNorm, mean pooling over tokens, Dense head."""

    patch: int = 2
    width: int = 16
    depth: int = 2
    heads: int = 2
    mlp_width: int = 32
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        x = nn.Dense(self.width, name="embed")(x)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos
        for i in range(self.depth):
            x = _Block(self.heads, self.mlp_width, name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


class _Block(nn.Module):
    heads: int
    mlp_width: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_width, name="mlp_in")(y))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(y)
