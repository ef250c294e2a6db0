"""The DDPM UNet (Ho et al. 2020, Appendix B), in two layouts of the same parameters.

The module names and parameter shapes are those of the earlier PyTorch port, so its
checkpoints load with ``load_state_dict(strict=True)``. The network computed depends on the
layout:

- ``official`` (the default): as the official TensorFlow code computes it. The stride-2
  downsampling conv is padded TF-"SAME" style (one row and column of zeros after, none
  before), GroupNorm eps is 1e-6, and the timestep table is [sin(t w_k), cos(t w_k)] with
  w_k = 1e4^(-k/(d/2-1)).
- ``port``: as the earlier PyTorch port computes it (called ``seed`` before; that name is
  still accepted), so its trained checkpoints give its
  numbers. Downsampling is Conv2d(stride 2, padding 1), GroupNorm eps 1e-5 (PyTorch's
  default), and the timestep table interleaves sin and cos per frequency w_k = 1e4^(-2k/d).

Both layouts initialise as the official code does (the layers that feed a residual stream
start near zero).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
ZERO_GAIN = 1e-5    # official "variance scaling 1e-10": std scaled by sqrt(1e-10)
LAYOUTS = ("official", "port")
LAYOUT_ALIASES = {"seed": "port"}  # the earlier name of the port's layout
GN_EPS = {"official": 1e-6,  # tf.contrib.layers.group_norm
          "port": 1e-5}      # torch.nn.GroupNorm's default


def check_layout(layout):
    """The layout's name (an old name replaced by today's); ValueError for an unknown one."""
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def timestep_embedding_table(T, dim, layout="official"):
    """Sinusoidal embedding of t = 0..T-1, one row per t.

    official: [sin(t w_0), ..., sin(t w_{d/2-1}), cos(t w_0), ...], w_k = 1e4^(-k/(d/2-1)),
              computed in float64.
    port:     [sin(t w_0), cos(t w_0), sin(t w_1), ...], w_k = 1e4^(-2k/d), computed in
              float32 as the earlier port does, so a model trained in that layout here sees
              the same table bit for bit.
    """
    layout = check_layout(layout)
    if dim % 2:
        raise ValueError(f"ch must be even for the sinusoidal timestep embedding, got {dim}")
    half = dim // 2
    if layout == "port":
        freqs = torch.exp(-(torch.arange(0, dim, 2) / dim * math.log(10000.0)))
        angles = torch.arange(T).float()[:, None] * freqs[None, :]
        return torch.stack([angles.sin(), angles.cos()], dim=-1).view(T, dim)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def check_image_size(size, factor):
    if size % factor:
        raise ValueError(f"img_size {size} is not divisible by {factor}, the "
                         f"{factor.bit_length() - 1} halvings that ch_mult implies: "
                         f"use a multiple of {factor}")


def check_architecture(ch, ch_mult, attn, img_size=None):
    """ValueError naming the argument when the UNet cannot be built as asked."""
    levels = len(ch_mult)
    if levels < 1:
        raise ValueError("ch_mult must name at least one resolution level")
    for level in attn:
        if not 0 <= level < levels:
            raise ValueError(f"attn level {level} is out of range: ch_mult {list(ch_mult)} has "
                             f"levels 0..{levels - 1}")
    for c in [ch] + [ch * m for m in ch_mult]:
        if c % GROUPS:
            raise ValueError(f"ch={ch} with ch_mult={list(ch_mult)} gives {c} channels, which "
                             f"GroupNorm({GROUPS}) cannot split: use multiples of {GROUPS}")
    if img_size is not None:
        check_image_size(img_size, 2 ** (levels - 1))


def group_norm(channels, layout):
    return nn.GroupNorm(GROUPS, channels, eps=GN_EPS[layout])


class TimeEmbedding(nn.Module):
    """Frozen sinusoidal table -> Linear(ch, 4ch) -> Swish -> Linear(4ch, 4ch)."""

    def __init__(self, T, ch, dim, layout):
        super().__init__()
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(timestep_embedding_table(T, ch, layout), freeze=True),
            nn.Linear(ch, dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
        )

    def forward(self, t):
        return self.timembedding(t)


class DownSample(nn.Module):
    """Stride-2 3x3 conv. official: TF "SAME" padding, one row/column of zeros after and
    none before; port: one on every side. The two sample grids are one pixel apart."""

    def __init__(self, ch, layout):
        super().__init__()
        self.same_padding = layout == "official"
        self.main = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.same_padding else 1)

    def forward(self, x, temb):
        return self.main(F.pad(x, (0, 1, 0, 1)) if self.same_padding else x)


class UpSample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, stride=1, padding=1)

    def forward(self, x, temb):
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, added back residually."""

    def __init__(self, ch, layout):
        super().__init__()
        self.group_norm = group_norm(ch, layout)
        self.proj_q = nn.Conv2d(ch, ch, 1)
        self.proj_k = nn.Conv2d(ch, ch, 1)
        self.proj_v = nn.Conv2d(ch, ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x)
        # (B, 1 head, H*W tokens, C): softmax(q k^T / sqrt(C)) v
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1)
                   for p in (self.proj_q, self.proj_k, self.proj_v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class ResBlock(nn.Module):
    """GN-Swish-conv, + Dense(Swish(temb)), GN-Swish-Dropout-conv, shortcut, then attention."""

    def __init__(self, in_ch, out_ch, tdim, dropout, attn, layout):
        super().__init__()
        self.block1 = nn.Sequential(group_norm(in_ch, layout), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        self.block2 = nn.Sequential(group_norm(out_ch, layout), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, layout) if attn else nn.Identity()

    def forward(self, x, temb):
        h = self.block1(x)
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        return self.attn(h + self.shortcut(x))


class UNet(nn.Module):
    """epsilon/x_0/x_{t-1} predictor eps_theta(x_t, t) of Ho et al. 2020, or eps_theta(x_t, t, y)
    of a class-conditional model.

    T: number of diffusion steps (rows of the embedding table); ch: base channels;
    ch_mult: channel multiplier per resolution level; attn: level indices with self-attention;
    num_res_blocks: ResBlocks per level on the way down (one more on the way up);
    in_ch / out_ch: image channels in and out (out_ch = 2 * in_ch for a learned variance);
    img_size, when given, is checked against the number of halvings;
    layout: "official" or "port" (see the module docstring; "seed" is the old name of port);
    num_classes: 0 for the paper's unconditional network. N > 0 adds a learned embedding of
    the class label y in 0..N, N being "no label" (the unconditional branch of classifier-free
    guidance, Ho & Salimans 2022), to the time embedding after its MLP, where every ResBlock
    reads it (improved-diffusion's label_emb, diffusers' num_class_embeds). It starts at zero,
    so a new conditional network computes what the unconditional one of the same weights does.
    """

    def __init__(self, T, ch, ch_mult, attn, num_res_blocks, dropout,
                 in_ch=3, out_ch=None, img_size=None, layout="official", num_classes=0):
        super().__init__()
        ch_mult, attn = list(ch_mult), list(attn)
        layout = check_layout(layout)
        check_architecture(ch, ch_mult, attn, img_size)
        self.layout = layout
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        out_ch = in_ch if out_ch is None else out_ch
        tdim = ch * 4
        self.time_embedding = TimeEmbedding(T, ch, tdim, layout)
        self.num_classes = num_classes
        if num_classes:
            # made from zeros: nn.Embedding's own initialisation would draw from the RNG and
            # so change every later layer's initial weights
            self.class_embedding = nn.Embedding(num_classes + 1, tdim, _weight=torch.zeros(num_classes + 1, tdim))
        block = dict(tdim=tdim, dropout=dropout, layout=layout)

        self.head = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.downblocks = nn.ModuleList()
        skip_chs = [ch]
        now_ch = ch
        levels = len(ch_mult)
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now_ch, ch * mult, attn=i in attn, **block))
                now_ch = ch * mult
                skip_chs.append(now_ch)
            if i != levels - 1:
                self.downblocks.append(DownSample(now_ch, layout))
                skip_chs.append(now_ch)

        self.middleblocks = nn.ModuleList([
            ResBlock(now_ch, now_ch, attn=True, **block),
            ResBlock(now_ch, now_ch, attn=False, **block),
        ])

        self.upblocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(
                    ResBlock(skip_chs.pop() + now_ch, ch * mult, attn=i in attn, **block))
                now_ch = ch * mult
            if i != 0:
                self.upblocks.append(UpSample(now_ch))

        self.tail = nn.Sequential(group_norm(now_ch, layout), nn.SiLU(), nn.Conv2d(now_ch, out_ch, 3, padding=1))
        self.initialize()

    def initialize(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Layers whose output is added to a residual stream start (near) zero, so each
        # block begins as the identity.
        for layer in self.zero_initialised_layers():
            nn.init.xavier_uniform_(layer.weight, gain=ZERO_GAIN)

    def zero_initialised_layers(self):
        layers = [self.tail[-1]]
        for module in self.modules():
            if isinstance(module, ResBlock):
                layers.append(module.block2[-1])
            elif isinstance(module, AttnBlock):
                layers.append(module.proj)
        return layers

    def forward(self, x, t, y=None):
        """y: each example's class in 0..num_classes (num_classes: no label), or (B,
        num_classes + 1) weights of the classes' embeddings (a mixture, for interpolation);
        None for an unconditional network."""
        for size in x.shape[-2:]:
            check_image_size(size, self.downsample_factor)
        if (y is None) != (self.num_classes == 0):
            raise ValueError(f"a network of {self.num_classes} classes takes "
                             f"{'labels y' if self.num_classes else 'no labels'}")
        temb = self.time_embedding(t)
        if y is not None:
            table = self.class_embedding.weight
            temb = temb + (table[y] if not y.is_floating_point() else y.to(table.dtype) @ table)
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)


def architecture_from_state_dict(state_dict):
    """The UNet arguments (T, ch, ch_mult, attn, num_res_blocks, in_ch, out_ch, num_classes)
    that build a network with exactly this state dict's names and shapes; ValueError if it is
    not one."""
    try:
        ch, in_ch = state_dict["head.weight"].shape[:2]
        T = state_dict["time_embedding.timembedding.0.weight"].shape[0]
        out_ch = state_dict["tail.2.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not a state dict of this UNet: it has no {missing}") from None
    levels = [[]]  # per level, (channels, has attention) of each down ResBlock
    i = 0
    while True:
        prefix = f"downblocks.{i}."
        if prefix + "main.weight" in state_dict:  # a DownSample ends a level
            levels.append([])
        elif prefix + "block1.2.weight" in state_dict:
            levels[-1].append((state_dict[prefix + "block1.2.weight"].shape[0],
                               prefix + "attn.proj.weight" in state_dict))
        else:
            break
        i += 1
    blocks = {len(level) for level in levels}
    if len(blocks) != 1 or 0 in blocks:
        raise ValueError(f"not a state dict of this UNet: its levels hold {sorted(blocks)} ResBlocks")
    return dict(T=T, ch=ch, ch_mult=[level[0][0] // ch for level in levels],
                attn=[i for i, level in enumerate(levels) if level[0][1]],
                num_res_blocks=blocks.pop(), in_ch=in_ch, out_ch=out_ch,
                num_classes=state_dict["class_embedding.weight"].shape[0] - 1
                if "class_embedding.weight" in state_dict else 0)
