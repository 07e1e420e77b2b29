"""The lecture's U-Net for denoising diffusion (Ho et al. 2020, Appendix B; Foster ch. 8).

    x [B, C, H, W], t [B] -> eps_theta(x, t) [B, C, H, W]

- the diffusion step t is embedded sinusoidally (Vaswani et al. 2017) and passed through a
  2-layer MLP; every residual block adds a projection of it to its feature maps;
- residual blocks: GroupNorm, swish, 3x3 conv, + time embedding, GroupNorm, swish, dropout,
  3x3 conv, plus the input (through a 1x1 conv when the number of channels changes); with
  ``adaptive_norm`` the time embedding scales and shifts the second GroupNorm's output instead
  of being added before it (AdaGN, Dhariwal & Nichol 2021, sec. 3);
- self-attention over the pixels at the resolutions in ``attention_resolutions`` (Down, Up and
  middle blocks alike);
- DownBlocks convolve and downsample, keeping each residual block's output; UpBlocks upsample,
  concatenate those kept tensors (the skip connections) and convolve.

Level ``i`` of ``channel_mults`` works at resolution ``size / 2**i`` with ``base * mult``
channels; the last level is the middle block. 28x28 inputs with three levels run at 28, 14 and 7.

Conditioning hook (for text-to-image): ``forward(..., cond=...)`` adds an embedding [B, time_dim]
to the time embedding (Imagen's CombineEmbs), and with ``context_dim`` set, the attention layers
also attend to context tokens ``context`` [B, L, context_dim] (Imagen concatenates the projected
text tokens to the keys and values of its self-attention); ``context_mask`` [B, L] (True on real
tokens) keeps padding out of the softmax. ``out_channels`` differs from ``in_channels`` when
extra input channels carry a conditioning image (a super-resolution stage).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import check_batch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0
                         ) -> torch.Tensor:
    """[B] steps -> [B, dim]: (sin(t w_0), ..., sin(t w_{d/2-1}), cos(t w_0), ...) with
    w_k = max_period^(-k / (d/2)), the Transformer's positional encoding as in Ho et al.'s code."""
    if dim % 2:
        raise ValueError(f"the time embedding dimension must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in Ho et al. (Wu & He's default), fewer in layers narrower
    than 128 channels so that every group keeps 4 channels."""
    groups = min(32, channels // 4)
    if groups == 0 or channels % groups:
        raise ValueError(f"GroupNorm cannot split {channels} channels into {groups} groups: use "
                         f"at least 4 channels, and a multiple of 32 from 128 on")
    return nn.GroupNorm(groups, channels)


# Sizes far beyond any course model: a stored config outside them is refused before a layer is
# allocated (base=4096 alone would ask for tens of gigabytes, num_steps=1e12 for a schedule of
# that length).
LIMITS = {"in_channels": 64, "base": 512, "depth": 8, "image_size": 1024, "num_steps": 100_000,
          "channel_mult": 16, "levels": 8}


def check_sizes(*, base: int, channel_mults, depth: int, image_size: int, num_steps: int,
                in_channels: int = 1, dropout: float = 0.0, **others) -> None:
    """A ``ValueError`` naming the first U-Net size that is not a positive integer within
    :data:`LIMITS` (or a dropout outside [0, 1)); ``others`` (attention resolutions, context
    sizes, a loader's extra fields) are not sizes and pass. :class:`UNet` checks its arguments
    with it; a loader calls it on a stored config before building anything."""
    sizes = {"in_channels": in_channels, "base": base, "depth": depth, "image_size": image_size,
             "num_steps": num_steps}
    mults = list(channel_mults) if isinstance(channel_mults, (list, tuple)) else None
    if mults is None or not 2 <= len(mults) <= LIMITS["levels"]:
        raise ValueError(f"channel_mults must be a list of 2 to {LIMITS['levels']} integers, got "
                         f"{channel_mults!r}")
    sizes |= {f"channel_mults[{i}]": m for i, m in enumerate(mults)}
    for name, value in sizes.items():
        limit = LIMITS["channel_mult" if name.startswith("channel_mults") else name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"U-Net {name} must be an integer in 1..{limit}, got {value!r}; "
                             f"a stored config with it was edited or made for another model")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
            not 0.0 <= dropout < 1.0:
        raise ValueError(f"U-Net dropout must be in [0, 1), got {dropout!r}")


class ResBlock(nn.Module):
    """GN, swish, conv, + time embedding, GN, swish, dropout, conv; plus the (1x1-convolved)
    input. With ``adaptive_norm`` the second GN is AdaGN(h, e) = (1 + e_s) GN(h) + e_b, where
    [e_s, e_b] is a linear projection of the time embedding (Dhariwal & Nichol 2021, sec. 3)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, dropout: float = 0.0,
                 adaptive_norm: bool = False):
        super().__init__()
        self.adaptive_norm = adaptive_norm
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, (1 + adaptive_norm) * c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.time(F.silu(emb))[:, :, None, None]  # [B, c_out or 2 c_out, 1, 1]
        if self.adaptive_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W pixels, with a residual connection. With
    ``context_dim``, projected context tokens are appended to the keys and values; a
    ``context_mask`` [B, L] (True on real tokens) hides padding tokens from every query."""

    def __init__(self, channels: int, context_dim: int | None = None):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        mask = None
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # [B, HW, C]
        if context is not None:
            if self.context_kv is None:
                raise ValueError("this U-Net was built without context_dim, so it takes no "
                                 "context; build it with context_dim=...")
            k_ctx, v_ctx = self.context_kv(context).chunk(2, dim=2)  # [B, L, C] each
            k, v = torch.cat([k, k_ctx], dim=1), torch.cat([v, v_ctx], dim=1)
            if context_mask is not None:
                pixels = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
                mask = torch.cat([pixels, context_mask.bool()], dim=1)[:, None]  # [B, 1, HW + L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q k^T / sqrt(C)) v, [B, HW, C]
        return x + self.out(out.transpose(1, 2).reshape(b, c, h, w))


class DownBlock(nn.Module):
    """``depth`` residual blocks (each followed by attention if asked), every output kept for
    the skips, then a stride-2 3x3 convolution that halves the resolution."""

    def __init__(self, c_in: int, c_out: int, depth: int, time_dim: int, attention: bool,
                 dropout: float, context_dim: int | None, adaptive_norm: bool = False):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, time_dim, dropout,
                                          adaptive_norm) for i in range(depth))
        self.attn = nn.ModuleList(Attention(c_out, context_dim) for _ in range(depth * attention))
        self.down = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
                context: torch.Tensor | None, context_mask: torch.Tensor | None
                ) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn:
                x = self.attn[i](x, context, context_mask)
            skips.append(x)
        return self.down(x)


class UpBlock(nn.Module):
    """Nearest-neighbour 2x upsampling, then ``depth`` residual blocks, each on the
    concatenation of the current tensor and the matching DownBlock output (Foster's UpBlock)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, depth: int, time_dim: int,
                 attention: bool, dropout: float, context_dim: int | None,
                 adaptive_norm: bool = False):
        super().__init__()
        self.res = nn.ModuleList(ResBlock((c_in if i == 0 else c_out) + c_skip, c_out, time_dim,
                                          dropout, adaptive_norm) for i in range(depth))
        self.attn = nn.ModuleList(Attention(c_out, context_dim) for _ in range(depth * attention))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
                context: torch.Tensor | None, context_mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        for i, res in enumerate(self.res):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attn:
                x = self.attn[i](x, context, context_mask)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t): noise prediction for images [B, in_channels, size, size].

    ``t`` holds integer steps in 0..num_steps-1 (the schedule's 0-based index, see
    :mod:`course_lib.diffusion`); ``num_steps`` is recorded so a sampler can check that its
    schedule has the T the network was trained with.
    """

    def __init__(self, in_channels: int = 1, base: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), depth: int = 2,
                 attention_resolutions: tuple[int, ...] = (7, 8), image_size: int = 28,
                 dropout: float = 0.1, num_steps: int = 1000, context_dim: int | None = None,
                 out_channels: int | None = None, adaptive_norm: bool = False):
        check_sizes(base=base, channel_mults=channel_mults, depth=depth, image_size=image_size,
                    num_steps=num_steps, in_channels=in_channels, dropout=dropout)
        super().__init__()
        if not isinstance(adaptive_norm, bool):
            raise ValueError(f"adaptive_norm must be True or False, got {adaptive_norm!r}")
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2 once per level "
                             f"below the first ({len(channel_mults)} levels)")
        self.in_channels, self.image_size, self.num_steps = in_channels, image_size, num_steps
        self.time_dim = 4 * base
        widths = [base * m for m in channel_mults]
        sizes = [image_size // 2 ** i for i in range(len(widths))]
        attn = [s in attention_resolutions for s in sizes]
        block = dict(depth=depth, time_dim=self.time_dim, dropout=dropout,
                     context_dim=context_dim, adaptive_norm=adaptive_norm)

        self.time_mlp = nn.Sequential(nn.Linear(base, self.time_dim), nn.SiLU(),
                                      nn.Linear(self.time_dim, self.time_dim))
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.downs = nn.ModuleList(
            DownBlock(base if i == 0 else widths[i - 1], widths[i], attention=attn[i], **block)
            for i in range(len(widths) - 1))
        self.mid1 = ResBlock(widths[-2], widths[-1], self.time_dim, dropout, adaptive_norm)
        self.mid_attn = Attention(widths[-1], context_dim) if attn[-1] else None
        self.mid2 = ResBlock(widths[-1], widths[-1], self.time_dim, dropout, adaptive_norm)
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], attention=attn[i], **block)
            for i in reversed(range(len(widths) - 1)))
        self.norm_out = group_norm(widths[0])
        self.out_channels = out_channels or in_channels
        self.conv_out = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting eps = 0
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        t = self._check(x, t, cond)
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_mlp[0].in_features))
        if cond is not None:
            emb = emb + cond
        skips: list[torch.Tensor] = []
        h = self.conv_in(x)
        for down in self.downs:
            h = down(h, emb, skips, context, context_mask)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context, context_mask)
        h = self.mid2(h, emb)
        for up in self.ups:
            h = up(h, emb, skips, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None
               ) -> torch.Tensor:
        """The checked steps t [B] (an int or 0-d t is the step of every image)."""
        check_batch(x, (self.in_channels, self.image_size, self.image_size), "the U-Net's images",
                    dtype=self.conv_in.weight.dtype)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(len(x))
        if t.shape != (len(x),) or t.is_floating_point():
            raise ValueError(f"t must be integer steps [B] = [{len(x)}], got {t.dtype} "
                             f"{tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.num_steps:
            raise ValueError(f"t must be in 0..{self.num_steps - 1} (the network was built for "
                             f"T = {self.num_steps}), got values in [{t.min().item()}, "
                             f"{t.max().item()}]")
        if cond is not None and cond.shape != (len(x), self.time_dim):
            raise ValueError(f"cond must be [B, time_dim] = [{len(x)}, {self.time_dim}], got "
                             f"{tuple(cond.shape)}")
        return t


def level_table(model: UNet) -> list[dict]:
    """The U-Net's stages in the order a tensor passes them, one dict each: ``part``,
    ``resolution`` (in -> out), ``channels`` (in -> out; an UpBlock's input is the upsampled
    tensor plus the skip), ``residual blocks``, ``self-attention`` and ``parameters`` (which
    add up to the model's)."""
    def count(*modules: nn.Module | None) -> int:
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    size, rows = model.image_size, []

    def add(part, resolution, channels, blocks, attention, *modules):
        rows.append({"part": part, "resolution": resolution, "channels": channels,
                     "residual blocks": blocks, "self-attention": attention,
                     "parameters": count(*modules)})

    add("time embedding (sinusoid + MLP)", "-", f"{model.time_mlp[0].in_features} -> "
        f"{model.time_dim}", 0, False, model.time_mlp)
    add("input convolution", f"{size}x{size}", f"{model.in_channels} -> "
        f"{model.conv_in.out_channels}", 0, False, model.conv_in)
    for i, down in enumerate(model.downs, 1):
        add(f"down {i}", f"{size}x{size} -> {size // 2}x{size // 2}",
            f"{down.res[0].conv1.in_channels} -> {down.res[-1].conv2.out_channels}",
            len(down.res), bool(len(down.attn)), down)
        size //= 2
    add("middle", f"{size}x{size}", f"{model.mid1.conv1.in_channels} -> "
        f"{model.mid2.conv2.out_channels}", 2, model.mid_attn is not None, model.mid1,
        model.mid_attn, model.mid2)
    channels = model.mid2.conv2.out_channels
    for i, up in zip(range(len(model.ups), 0, -1), model.ups):
        skip = up.res[0].conv1.in_channels - channels
        add(f"up {i}", f"{size}x{size} -> {2 * size}x{2 * size}",
            f"{channels} + {skip} skip -> {up.res[-1].conv2.out_channels}", len(up.res),
            bool(len(up.attn)), up)
        channels, size = up.res[-1].conv2.out_channels, 2 * size
    add("output (GroupNorm, swish, convolution)", f"{size}x{size}",
        f"{channels} -> {model.out_channels}", 0, False, model.norm_out, model.conv_out)
    return rows
