"""The factorized space-time U-Net that denoises video latents: LVDM §3.2.

It predicts ε (the paper) or v (diffusion.py's `prediction`; the network is the same):
    out = UNet3D(cfg)(z_t, t, mask=None, s=None, context=None)     z_t: (B, C, T, H, W)

What the paper asks for (§3.2, "Video Generation Backbone"), and where it is:
  * space-only 3D convolutions of shape 1×3×3                      -> conv_1x3x3
  * adaptive group normalization: the timestep embedding gives a
    per-channel scale and shift, GroupNorm(32) then x·(1+scale)+shift -> ResBlock
  * spatial self-attention within each frame and temporal
    self-attention along time at each position (factorized, default),
    or one joint space-time attention (the paper's ablation)          -> AttentionBlock
  * temporal attention knows frame order through learned relative
    position embeddings (Shaw et al. 2018), distances clipped         -> relative_position_bias
Sizes follow the public LVDM release (openaimodel3d.UNetModel with
STAttentionBlock, use_scale_shift_norm, conv up/downsampling): see unet_presets().
Downsampling is spatial only (stride 1×2×2): the latent has few frames.

Inputs for the later stages (§3.3, §5), each behind a config flag:
  mask_channel  one extra input channel, the binary frame mask m of Eq. (8)
  s_embedding   the noise level s of the perturbed conditioning frames, embedded
                like t and added to the timestep embedding (s=None adds nothing)
  context_dim   cross-attention to a context sequence (B, L, context_dim), e.g. text
§5's image model as Stable Diffusion v1 builds it, so its weights load (convert.py --sd):
  block="sd"    Stable Diffusion's attention block (sdblocks.SpatialTransformer: self-attention,
                cross-attention, feed-forward) in place of AttentionBlock
  resblock_scale_shift=False   the timestep embedding added to the features instead of AdaGN
  sd_temporal="inside"         the release's text-to-video model: its temporal attentions inside SD's block

Two deliberate differences from the release: GroupNorm statistics are taken
per frame (so layers without temporal attention really treat frames
independently), and the relative positions enter only on the key side, as an
additive attention bias, so every attention is one call to
F.scaled_dot_product_attention (the release also adds a value-side table).
Both are config fields (norm_over="clip", relative_form="release") that
convert.py sets for the release's own checkpoints; their layers sit at the end
of the file and are chosen when the network is built.

Print the preset sizes:
    python unet3d.py
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sdblocks
from common import UserError, count_params
from vae import FrameGroupNorm


@dataclass
class UNetConfig:
    in_channels: int = 4               # latent channels c (without the mask channel)
    out_channels: int = 4              # ε (or v) has the latent's channels
    model_channels: int = 256
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_resolutions: tuple = (2, 4, 8)  # downsample factors that get attention
    temporal_resolutions: tuple = ()   # downsample factors that get temporal attention only (§3.2's "temporal
                                       # attention in partial layers"); a factor in both lists gets the full block
    num_heads: int = 4
    dropout: float = 0.0
    attention: str = "factorized"      # "factorized" | "joint" | "spatial" (no temporal attention)
    use_relative_position: bool = True
    max_relative_position: int = 20    # frame distances are clipped to ±this
    mask_channel: bool = False
    s_embedding: bool = False
    far_anchor: bool = False           # prediction models: latent 0 of every clip is a keyframe from far back in
                                       # the same video (a long-range anchor, hierarchical.py); relative positions
                                       # put it beyond max_relative_position of every other latent
    position_stride: int = 1           # relative positions count this many latents per clip latent: a prediction
                                       # model's keyframes are --gap latents apart, so with position_stride = gap
                                       # its distances are in the LVDM's latent steps (§3.3's sparse keyframe times)
    context_dim: int = None            # None: no cross-attention
    use_checkpoint: bool = False
    # Stable Diffusion v1's layers (§5's image model; convert.py --sd sets them, sdblocks.py holds the block):
    block: str = "lvdm"                # "lvdm": AttentionBlock; "sd": sdblocks.SpatialTransformer (+ attn_t in video)
    transformer_depth: int = 1         # block="sd": transformer blocks per attention block
    resblock_scale_shift: bool = True  # AdaGN; False: the embedding is added to the features (Stable Diffusion)
    sd_temporal: str = "after"         # block="sd" video models: "after": one temporal attention after each block
                                       # (attn_t); "inside": the release's text-to-video block, two in every
                                       # transformer block (sdblocks.TemporalAttention: attn1_tmp, attn2_tmp)
    # The public release's variants (convert.py sets them for its checkpoints; layers at the end of the file):
    norm_over: str = "frame"           # "clip": ResBlock/output GroupNorm over the whole clip and the temporal
                                       # attention's over (C/G,T) per position, as the release (frames then interact)
    relative_form: str = "key"         # "key": Shaw et al.'s key term as one SDPA bias; "release": the release's
                                       # transposed key term d^-1/4 q_j·a(i-j) plus a value table (explicit softmax)

    def __post_init__(self):  # checkpoints store asdict(cfg): lists come back, make them tuples again
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.temporal_resolutions = tuple(self.temporal_resolutions)
        if self.attention not in ("factorized", "joint", "spatial"):
            raise UserError(f"unknown attention {self.attention!r}; use 'factorized', 'joint' or 'spatial'.")
        if self.norm_over not in ("frame", "clip"):
            raise UserError(f"norm_over must be 'frame' or 'clip', not {self.norm_over!r}.")
        if self.block not in ("lvdm", "sd"):
            raise UserError(f"block must be 'lvdm' or 'sd', not {self.block!r}.")
        if self.block == "sd" and self.attention == "joint":
            raise UserError("block='sd' is Stable Diffusion's per-frame attention; use attention='spatial' (the image "
                            "model) or 'factorized' (with temporal attention).")
        if self.sd_temporal not in ("after", "inside"):
            raise UserError(f"sd_temporal must be 'after' or 'inside', not {self.sd_temporal!r}.")
        if self.sd_temporal == "inside" and (self.block != "sd" or self.temporal_resolutions):
            raise UserError("sd_temporal='inside' is the release's text-to-video block: use it with block='sd' and "
                            "no temporal_resolutions.")
        if self.relative_form not in ("key", "release"):
            raise UserError(f"relative_form must be 'key' or 'release', not {self.relative_form!r}.")
        if self.relative_form == "release" and self.attention == "joint":
            raise UserError("relative_form='release' is the release's temporal attention; use it with "
                            "attention='factorized'.")
        key_positions = self.use_relative_position and self.relative_form == "key" and self.block == "lvdm"
        if self.position_stride < 1 or (self.position_stride > 1 and not key_positions):
            raise UserError("position_stride scales the relative positions: use a positive integer, and one above 1 "
                            "with use_relative_position=True, relative_form='key' and block='lvdm'.")
        if self.far_anchor and not key_positions:
            raise UserError("far_anchor places latent 0 by its relative position: use it with use_relative_position="
                            "True, relative_form='key' and block='lvdm'.")
        for ch in (self.model_channels, *(m * self.model_channels for m in self.channel_mult)):
            if ch % 32 or ch % self.num_heads:
                raise UserError(f"channel count {ch} must be divisible by 32 (GroupNorm) and by num_heads="
                                f"{self.num_heads}; pick model_channels as a multiple of 32 and a matching num_heads.")


def unet_presets():
    """name -> UNetConfig.  'paper': the public release's unconditional 256² model (32² latents, 4 frames)."""
    return {
        # demo: temporal attention at the full latent resolution too, where the 1x3x3 convs and the
        # per-frame norms would otherwise leave every frame on its own (RESULTS.md, 2026-11-30)
        "demo": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), temporal_resolutions=(1,), num_heads=2),
        "paper": UNetConfig(model_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                            attention_resolutions=(2, 4, 8), num_heads=4),
    }


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer steps (Transformer / DDPM): (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B,1)*(1,half) -> (B,half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_module(m):
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def conv_1x3x3(cin, cout, stride=1):
    """Space-only 3D convolution (§3.2): each frame is convolved on its own."""
    return nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))


def GroupNorm32(channels):
    """GroupNorm(32) with statistics per frame (vae.FrameGroupNorm: (B,C,T,H,W) normalized as B*T images)."""
    return FrameGroupNorm(32, channels)


class ResBlock(nn.Module):
    """Residual block with adaptive group normalization (AdaGN, Dhariwal & Nichol 2021):
    h = conv(SiLU(GN(x))); h = GN(h)·(1 + scale) + shift with (scale, shift) = Linear(SiLU(emb));
    out = skip(x) + conv(SiLU(h)), the second conv zero-initialized so the block starts as the identity.
    scale_shift=False (Stable Diffusion's): h = GN(h + Linear(SiLU(emb))) instead."""

    def __init__(self, channels, emb_channels, out_channels, dropout=0.0, use_checkpoint=False, norm=GroupNorm32,
                 scale_shift=True):
        super().__init__()
        self.use_checkpoint, self.scale_shift = use_checkpoint, scale_shift
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), conv_1x3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_norm = norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_module(conv_1x3x3(out_channels, out_channels)))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv3d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        if not self.scale_shift:
            h = self.out_norm(h + self.emb_layers(emb).to(h.dtype)[:, :, None, None, None])  # (B,C) -> (B,C,1,1,1)
            return self.skip_connection(x) + self.out_layers(h)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)  # (B,2C) -> 2×(B,C,1,1,1)
        h = self.out_norm(h) * (1 + scale) + shift  # AdaGN
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Spatial-only downsampling: a 1×3×3 conv with stride (1,2,2); the frame count is kept."""

    def __init__(self, channels):
        super().__init__()
        self.op = conv_1x3x3(channels, channels, stride=2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Spatial-only nearest upsampling ×2, then a 1×3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = conv_1x3x3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


def relative_position_bias(q, table, frame_index, max_dist):
    """Key-side relative position term of Shaw et al. (2018) as an additive attention bias.

    bias[i, j] = q_i · a_{clip(f_j - f_i)} / √d, where f_i is the frame index of token i, clip to
    [-max_dist, max_dist], and a is a learned table (2·max_dist+1, d).  Added to q·k/√d inside
    softmax, it makes attention depend on frame order.  q: (N, heads, L, d) -> bias (N, heads, L, L).
    """
    dist = frame_index[None, :] - frame_index[:, None]  # (L,L): j - i
    idx = dist.clamp(-max_dist, max_dist) + max_dist
    qa = torch.matmul(q, table.to(q.dtype).t())  # (N,h,L,d) @ (d,2M+1) -> (N,h,L,2M+1)
    bias = qa.gather(-1, idx.expand(*q.shape[:2], -1, -1))  # (N,h,L,2M+1) -> (N,h,L,L)
    return bias / math.sqrt(q.shape[-1])


class SelfAttention(nn.Module):
    """Multi-head self-attention over one axis of a (B,C,T,H,W) tensor, with a residual connection.

    kind = "spatial": tokens are the H·W positions of each frame;
           "temporal": tokens are the T frames at each position (relative positions, if enabled);
           "joint": tokens are all T·H·W positions (relative frame positions, if enabled).
    norm builds the input's GroupNorm (per frame; the release's variants pass theirs).
    The output projection is zero-initialized, so the block starts as the identity.
    """

    def __init__(self, channels, num_heads, kind, max_relative_position=None, norm=GroupNorm32, far_first=False,
                 stride=1):
        super().__init__()
        self.kind, self.num_heads, self.max_dist = kind, num_heads, max_relative_position
        self.far_first = far_first  # frame 0 is a far anchor (UNetConfig.far_anchor): see frame_positions
        self.stride = stride        # frames' positions are stride apart (UNetConfig.position_stride)
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))
        self.rel_k = None
        if kind != "spatial" and max_relative_position is not None:
            self.rel_k = nn.Parameter(torch.empty(2 * max_relative_position + 1, channels // num_heads))
            nn.init.xavier_uniform_(self.rel_k)

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.norm(x)
        if self.kind == "spatial":
            tok = h.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)  # (B,C,T,H,W) -> (B*T,H*W,C)
            frame_index = None
        elif self.kind == "temporal":
            tok = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, C)  # (B,C,T,H,W) -> (B*H*W,T,C)
            frame_index = self.frame_positions(T, x.device)
        else:
            tok = h.permute(0, 2, 3, 4, 1).reshape(B, T * H * W, C)  # (B,C,T,H,W) -> (B,T*H*W,C)
            frame_index = self.frame_positions(T, x.device).repeat_interleave(H * W)
        N, L, _ = tok.shape
        q, k, v = self.qkv(tok).reshape(N, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (N,L,3C) -> 3×(N,heads,L,d)
        out = self.attend(q, k, v, frame_index)
        out = self.proj_out(out.transpose(1, 2).reshape(N, L, C))  # (N,heads,L,d) -> (N,L,C)
        if self.kind == "spatial":
            out = out.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B*T,H*W,C) -> (B,C,T,H,W)
        elif self.kind == "temporal":
            out = out.reshape(B, H, W, T, C).permute(0, 4, 3, 1, 2)  # (B*H*W,T,C) -> (B,C,T,H,W)
        else:
            out = out.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B,T*H*W,C) -> (B,C,T,H,W)
        return x + out

    def frame_positions(self, T, device):
        """(T,) the frames' positions for the relative term: 0, stride, ..., (T-1)·stride, with frame 0 moved
        max_dist back when it is a far anchor, so its distance to every other frame clips to the table's last entry."""
        pos = torch.arange(T, device=device) * self.stride
        if self.far_first and self.max_dist is not None:
            pos[0] = -self.max_dist
        return pos

    def attend(self, q, k, v, frame_index):
        """softmax(q·k/√d + bias) v over (N,heads,L,d), bias the relative positions' key term (or none)."""
        bias = None if self.rel_k is None else relative_position_bias(q, self.rel_k, frame_index, self.max_dist)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class CrossAttention(nn.Module):
    """Every position of every frame attends to a context sequence (B, L, context_dim), e.g. text tokens."""

    def __init__(self, channels, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x, context):
        B, C, T, H, W = x.shape
        d = C // self.num_heads
        tok = self.norm(x).permute(0, 2, 3, 4, 1).reshape(B, T * H * W, C)  # (B,C,T,H,W) -> (B,T*H*W,C)
        q = self.to_q(tok).reshape(B, -1, self.num_heads, d).transpose(1, 2)  # (B,THW,C) -> (B,heads,THW,d)
        k, v = self.to_kv(context).reshape(B, context.shape[1], 2, self.num_heads, d).permute(2, 0, 3, 1, 4)  # (B,L,2C) -> 2×(B,heads,L,d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(out.transpose(1, 2).reshape(B, T * H * W, C))  # (B,heads,THW,d) -> (B,THW,C)
        return x + out.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)  # (B,THW,C) -> (B,C,T,H,W)


class AttentionBlock(nn.Module):
    """The release's STAttentionBlock: spatial then temporal self-attention (factorized, default),
    or one joint space-time self-attention, or spatial only; optional cross-attention after the
    spatial (or joint) part. With temporal_only, just the temporal attention (cfg.temporal_resolutions).

    Cross-attention (§5) sits between the spatial and the temporal attention, so with attention="spatial"
    the block is Stable Diffusion's per-frame self-attention then cross-attention: the image model whose
    weights the video model starts from. (The release's text-to-video block, BasicTransformerBlockST,
    runs spatial self-attention, temporal attention, cross-attention, a second temporal attention, then a
    feed-forward; one temporal attention after the cross-attention is the smaller form of the same idea.)"""

    def __init__(self, channels, cfg, temporal_only=False):
        super().__init__()
        self.use_checkpoint = cfg.use_checkpoint
        rel = cfg.max_relative_position if cfg.use_relative_position else None
        first = "joint" if cfg.attention == "joint" else "spatial"
        # the release's variants are chosen here (end of file): joint attention normalizes like the ResBlocks,
        # spatial attention per frame in both, temporal attention as temporal_attention says
        norm = ClipGroupNorm32 if cfg.norm_over == "clip" and first == "joint" else GroupNorm32
        # temporal_only (cfg.temporal_resolutions): just the temporal attention, in factorized and joint models
        # alike, and nothing for the image model (attention="spatial"), whose video model then adds it
        # zero-initialized like the rest
        self.attn_s = None if temporal_only else SelfAttention(channels, cfg.num_heads, first, rel, norm,
                                                               far_first=cfg.far_anchor, stride=cfg.position_stride)
        self.cross = CrossAttention(channels, cfg.context_dim, cfg.num_heads) if cfg.context_dim and not temporal_only \
            else None
        with_t = cfg.attention == "factorized" or (temporal_only and cfg.attention == "joint")
        self.attn_t = temporal_attention(channels, cfg, rel) if with_t else None

    def forward(self, x, context=None):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x, context):
        if self.attn_s is not None:
            x = self.attn_s(x)
        if self.cross is not None and context is not None:
            x = self.cross(x, context)
        if self.attn_t is not None:
            x = self.attn_t(x)
        return x


class TimestepEmbedSequential(nn.ModuleList):
    """Runs its layers in order, giving the embedding to ResBlocks and the context to attention blocks."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (AttentionBlock, sdblocks.SpatialTransformer)):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet3D(nn.Module):
    """ε_θ(z_t, t) of Eq. (6)-(7) (or v) for latents (B, C, T, H, W); H and W divisible by 2^(levels-1)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        norm = ClipGroupNorm32 if cfg.norm_over == "clip" else GroupNorm32  # the release's variant: end of file
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.s_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if cfg.s_embedding else None

        def res(cin, cout):
            return ResBlock(cin, emb_dim, cout, cfg.dropout, cfg.use_checkpoint, norm, cfg.resblock_scale_shift)

        def block(ch, temporal_only=False):  # the attention block: this project's, or Stable Diffusion's (§5)
            if cfg.block == "lvdm" or temporal_only:
                return AttentionBlock(ch, cfg, temporal_only)
            rel = cfg.max_relative_position if cfg.use_relative_position else None
            video, inside = cfg.attention == "factorized", cfg.sd_temporal == "inside"
            return sdblocks.SpatialTransformer(ch, cfg.num_heads, cfg.context_dim, cfg.transformer_depth,
                                               temporal_attention(ch, cfg, rel) if video and not inside else None,
                                               cfg.use_checkpoint, inner_temporal=video and inside, max_dist=rel,
                                               clip_norm=cfg.norm_over == "clip")

        def attention(ch, ds):  # the block a level gets: full, temporal only, or none ([] then)
            if ds in cfg.attention_resolutions or ds in cfg.temporal_resolutions:
                return [block(ch, temporal_only=ds not in cfg.attention_resolutions)]
            return []

        cin = cfg.in_channels + (1 if cfg.mask_channel else 0)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([conv_1x3x3(cin, mc)])])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                layers += attention(ch, ds)
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential([res(ch, ch), block(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * mc)]
                ch = mult * mc
                layers += attention(ch, ds)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(conv_1x3x3(mc, cfg.out_channels)))

    def forward(self, x, t, mask=None, s=None, context=None):
        """x: (B, in_channels, T, H, W); t: LongTensor (B,) in [0, steps); mask: (B,1,T,H,W) binary frame
        mask (zeros when None; needs mask_channel); s: LongTensor (B,) noise level of the conditioning
        frames (needs s_embedding; None adds nothing); context: (B, L, context_dim) (needs context_dim;
        None skips cross-attention).  Returns ε̂ (or v̂) with x's shape."""
        self.check_inputs(x, mask, s, context)
        B, _, T, H, W = x.shape
        t = t.expand(B) if t.dim() == 0 else t
        if self.cfg.mask_channel:  # Eq. (8)'s frame mask as one more input channel (no frames given: zeros)
            mask = torch.zeros(B, 1, T, H, W, device=x.device, dtype=x.dtype) if mask is None else mask
            x = torch.cat([x, mask.to(x.dtype)], dim=1)  # (B,C,T,H,W) -> (B,C+1,T,H,W)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if s is not None:  # the noise level s of the perturbed conditioning frames (§3.3), embedded like t
            s = s.expand(B) if s.dim() == 0 else s
            emb = emb + self.s_embed(timestep_embedding(s, self.cfg.model_channels).to(dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)  # skip connection along channels
        return self.out(h)

    def check_inputs(self, x, mask, s, context):
        """A UserError naming the fix for inputs this U-Net cannot take (see forward)."""
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise UserError(f"the U-Net expects latents (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}; "
                            f"check that the VAE's latent channels match the U-Net's in_channels.")
        B, _, T, H, W = x.shape
        f = 2 ** (len(cfg.channel_mult) - 1)
        if H % f or W % f:
            raise UserError(f"latent size {H}×{W} must be divisible by {f} for this U-Net; pick a video size whose "
                            f"latent is a multiple of {f}.")
        if mask is not None and not cfg.mask_channel:
            raise UserError("this U-Net has no mask channel; build it with mask_channel=True (a prediction/"
                            "interpolation model) or pass mask=None.")
        if mask is not None and tuple(mask.shape) != (B, 1, T, H, W):
            raise UserError(f"mask must have shape {(B, 1, T, H, W)}, got {tuple(mask.shape)}.")
        if s is not None and self.s_embed is None:
            raise UserError("this U-Net has no noise-level embedding; build it with s_embedding=True or pass s=None.")
        if context is not None and not cfg.context_dim:
            raise UserError("this U-Net has no cross-attention; build it with context_dim set or pass context=None.")
        if context is not None and (context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim):
            raise UserError(f"context must have shape (B={B}, L, {cfg.context_dim}), got {tuple(context.shape)}.")


TEMPORAL_KEYS = (".attn_t.", ".attn1_tmp.", ".attn2_tmp.", ".norm4.", ".norm5.")  # what a video model adds


def init_from_image(model, state, source="the image model"):
    """§5's initialization of the video model from the image model: copy every weight of `state` (the
    image checkpoint's state dict: spatial layers, cross-attention, text encoder); the temporal attention
    it lacks keeps its fresh initialization, whose zero output projection makes each block the identity,
    so until training moves them the video model computes the image model frame by frame."""
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"{source} has weights this video model lacks ({extra[0]}, ...); use the same --preset "
                        f"and --model overrides as the image run.")
    for k, v in own.items():
        if k in state:
            if state[k].shape != v.shape:
                raise UserError(f"{source} does not match this video model at '{k}' ({tuple(state[k].shape)} vs "
                                f"{tuple(v.shape)}); use the same --preset and --model overrides as the image run.")
            v.copy_(state[k])
        elif not any(t in k for t in TEMPORAL_KEYS):
            raise UserError(f"{source} lacks '{k}', which is not temporal attention; pass the image model's "
                            f"checkpoint (train.py --stage image).")


# --------------------------------------------- the public release's variants (convert.py turns them on)
def ClipGroupNorm32(channels):
    """The release's GroupNorm(32) with norm_over="clip": nn.GroupNorm on (B,C,T,H,W), statistics over
    (C/G,T,H,W) of the whole clip, so frames interact (same parameters as GroupNorm32)."""
    return nn.GroupNorm(32, channels)


class PositionGroupNorm32(nn.GroupNorm):
    """The release's temporal-attention GroupNorm(32) with norm_over="clip": statistics over (C/G,T) at each
    position (the spatial attention's stay per frame, as here)."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = super().forward(x.permute(0, 3, 4, 1, 2).reshape(B * H * W, C, T))  # (B,C,T,H,W) -> (B*H*W,C,T)
        return h.reshape(B, H, W, C, T).permute(0, 3, 4, 1, 2)                  # (B*H*W,C,T) -> (B,C,T,H,W)


def release_relative_attention(q, k, v, table_k, table_v, max_dist):
    """The release's temporal attention with relative positions (its QKVAttention with rp), written out.

    logits[i, j] = q_i·k_j/√d + d^-1/4 q_j·a^K_{clip(i-j)}     (its key term: transposed and scaled once)
    out_i = Σ_j w_ij (v_j + a^V_{clip(j-i)}),   w = softmax_j(logits)   (Shaw et al.'s value term)
    q, k, v: (N, heads, L, d) over the frames of each position; tables (2·max_dist+1, d)."""
    L, d = q.shape[2], q.shape[3]
    pos = torch.arange(L, device=q.device)
    ij = pos[:, None] - pos[None, :]                                   # (L,L): i - j
    a_k = table_k.to(q.dtype)[ij.clamp(-max_dist, max_dist) + max_dist]   # (L,L,d): a^K_{i-j}
    a_v = table_v.to(q.dtype)[(-ij).clamp(-max_dist, max_dist) + max_dist]  # (L,L,d): a^V_{j-i}
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)        # (N,h,L,d)@(N,h,d,L) -> (N,h,L,L)
    logits = logits + torch.einsum("nhjc,ijc->nhij", q, a_k) * d ** -0.25
    w = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(w, v) + torch.einsum("nhij,ijc->nhic", w, a_v)  # (N,h,L,d)


class ReleaseTemporalAttention(SelfAttention):
    """Temporal SelfAttention with relative_form="release": a value-side table rel_v next to rel_k, and the
    release's attention (release_relative_attention) in place of the key-side bias."""

    def __init__(self, channels, num_heads, max_relative_position, norm=GroupNorm32):
        super().__init__(channels, num_heads, "temporal", max_relative_position, norm)
        self.rel_v = nn.Parameter(torch.empty(2 * max_relative_position + 1, channels // num_heads))
        nn.init.xavier_uniform_(self.rel_v)

    def attend(self, q, k, v, frame_index):  # frame_index is arange(T) here, as release_relative_attention's
        return release_relative_attention(q, k, v, self.rel_k, self.rel_v, self.max_dist)


def temporal_attention(channels, cfg, rel):
    """The temporal SelfAttention cfg asks for: this project's (GroupNorm32, the key-side bias), or with the
    release's per-position norm (norm_over="clip") and value table (relative_form="release")."""
    norm = PositionGroupNorm32 if cfg.norm_over == "clip" else GroupNorm32
    if cfg.relative_form == "release" and rel is not None:
        return ReleaseTemporalAttention(channels, cfg.num_heads, rel, norm)
    return SelfAttention(channels, cfg.num_heads, "temporal", rel, norm, far_first=cfg.far_anchor,
                         stride=cfg.position_stride)


if __name__ == "__main__":
    for name, cfg in unet_presets().items():
        with torch.device("meta"):
            model = UNet3D(cfg)
        print(f"{name}: {count_params(model):,} parameters  {asdict(cfg)}")
