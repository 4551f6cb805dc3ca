"""Stable Diffusion v1's attention block, for unet3d.py's image model of §5 (UNetConfig(block="sd")).

§5 starts the text-to-video model from a pretrained text-to-image model: "we initialize the spatial
parameters of our model, including the spatial convolutions and spatial attention, using the pre-trained
stable diffusion weights". Stable Diffusion's U-Net (Rombach et al. 2022, LDM) has the same residual blocks,
samplers and skip layout as unet3d.py's; its attention differs, and lives here:

    SpatialTransformer   x + proj_out(blocks(proj_in(GroupNorm(x))))          per frame
    TransformerBlock     x = x + attn1(LN(x))                self-attention over the h*w positions
                         x = x + attn2(LN(x), context)       cross-attention to the text states
                         x = x + ff(LN(x))                   GEGLU feed-forward

Parameter names follow Stable Diffusion's (attn1.to_q, ff.net.0.proj, ...), which its two file layouts
share, so convert.py maps its weights onto these modules by name. Each frame of a (B,C,T,H,W) latent is
one image: GroupNorm statistics per frame, attention within the frame. A video model adds a temporal
attention after the block (unet3d.py passes it in as `temporal`), zero-initialized like unet3d.py's.

The public release's text-to-video model (its BasicTransformerBlockST; UNetConfig(sd_temporal="inside"))
puts two temporal attentions inside every TransformerBlock instead, each with Shaw et al.'s relative
positions on both the key and the value side (TemporalAttention):

    x = x + attn1(LN1(x))          spatial self-attention
    x = x + attn1_tmp(LN4(x))      temporal self-attention over the T frames at each position
    x = x + attn2(LN2(x), text)    spatial cross-attention
    x = x + attn2_tmp(LN5(x))      temporal self-attention again
    x = x + ff(LN3(x))

and takes its GroupNorm over the whole clip (norm_over="clip", as all of the release's models).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vae import FrameGroupNorm


class Attention(nn.Module):
    """Multi-head attention of queries x (N, L, C) to keys and values from `context` (N, M, context_dim),
    or from x itself (self-attention): softmax(q k^T / sqrt(d)) v per head of d = C / heads channels.
    q, k and v have no bias (Stable Diffusion's); the output projection has one."""

    def __init__(self, channels, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or channels
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(kv_dim, channels, bias=False)
        self.to_v = nn.Linear(kv_dim, channels, bias=False)
        self.to_out = nn.Sequential(nn.Linear(channels, channels), nn.Dropout(0.0))  # names: to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context
        N, L, C = x.shape
        d = C // self.heads
        q = self.to_q(x).reshape(N, L, self.heads, d).transpose(1, 2)                    # (N,L,C) -> (N,heads,L,d)
        k = self.to_k(context).reshape(N, -1, self.heads, d).transpose(1, 2)             # (N,M,C) -> (N,heads,M,d)
        v = self.to_v(context).reshape(N, -1, self.heads, d).transpose(1, 2)             # (N,M,C) -> (N,heads,M,d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(N, L, C))                          # (N,heads,L,d) -> (N,L,C)


class RelativePosition(nn.Module):
    """A learned table a (2·max_dist+1, d) of Shaw et al. (2018) read as a[clip(j - i)] for query frame i and key
    frame j, distances clipped to ±max_dist (the release's `temporal_length`)."""

    def __init__(self, d, max_dist):
        super().__init__()
        self.max_dist = max_dist
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_dist + 1, d))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length):
        pos = torch.arange(length, device=self.embeddings_table.device)
        dist = (pos[None, :] - pos[:, None]).clamp(-self.max_dist, self.max_dist)   # (L,L): j - i
        return self.embeddings_table[dist + self.max_dist]                           # (L,L,d)


class TemporalAttention(Attention):
    """The release's temporal self-attention (TemporalCrossAttention) on tokens (N, T, C), the T frames of one
    position, with relative positions on both sides (Shaw et al. 2018, Eq. 3-4):
        logits_ij = (q_i·k_j + q_i·a^K_{j-i}) / sqrt(d),   out_i = sum_j softmax_j(logits)_ij (v_j + a^V_{j-i})
    max_dist=None: plain attention. The output projection starts at zero, so the block starts as the identity."""

    def __init__(self, channels, heads, max_dist=None):
        super().__init__(channels, heads)
        d = channels // heads
        self.relative_position_k = RelativePosition(d, max_dist) if max_dist else None
        self.relative_position_v = RelativePosition(d, max_dist) if max_dist else None
        nn.init.zeros_(self.to_out[0].weight)
        nn.init.zeros_(self.to_out[0].bias)

    def forward(self, x, context=None):
        if self.relative_position_k is None:
            return super().forward(x)
        N, T, C = x.shape
        d = C // self.heads
        q, k, v = (f(x).reshape(N, T, self.heads, d).transpose(1, 2)                # (N,T,C) -> (N,heads,T,d)
                   for f in (self.to_q, self.to_k, self.to_v))
        a_k, a_v = self.relative_position_k(T).to(x.dtype), self.relative_position_v(T).to(x.dtype)  # (T,T,d)
        logits = (q @ k.transpose(-1, -2) + torch.einsum("nhid,ijd->nhij", q, a_k)) / math.sqrt(d)    # (N,heads,T,T)
        w = torch.softmax(logits, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)
        out = w @ v + torch.einsum("nhij,ijd->nhid", w, a_v)                                           # (N,heads,T,d)
        return self.to_out(out.transpose(1, 2).reshape(N, T, C))                     # (N,heads,T,d) -> (N,T,C)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2*inner channels, split in (a, gate), a * GELU(gate)."""

    def __init__(self, channels, inner):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Stable Diffusion's BasicTransformerBlock on the tokens (B*T, H*W, C) of T-frame clips: pre-LayerNorm
    self-attention, cross-attention to the context (skipped when the context is None) and a GEGLU feed-forward
    4x as wide, each residual. temporal=True (the release's BasicTransformerBlockST): a TemporalAttention after
    the self- and after the cross-attention, relative positions clipped to ±max_dist (None: none)."""

    def __init__(self, channels, heads, context_dim, temporal=False, max_dist=None):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(channels), Attention(channels, heads)
        self.norm2, self.attn2 = nn.LayerNorm(channels), Attention(channels, heads, context_dim)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(channels, 4 * channels), nn.Dropout(0.0), nn.Linear(4 * channels, channels))
        self.temporal = temporal
        if temporal:
            self.norm4, self.attn1_tmp = nn.LayerNorm(channels), TemporalAttention(channels, heads, max_dist)
            self.norm5, self.attn2_tmp = nn.LayerNorm(channels), TemporalAttention(channels, heads, max_dist)

    def forward(self, x, context=None, frames=1):
        x = x + self.attn1(self.norm1(x))
        if self.temporal:
            x = x + over_time(self.attn1_tmp, self.norm4(x), frames)
        if context is not None:
            x = x + self.attn2(self.norm2(x), context)
        if self.temporal:
            x = x + over_time(self.attn2_tmp, self.norm5(x), frames)
        return x + self.ff.net(self.norm3(x))


def over_time(attn, x, T):
    """attn over the T frames at each position of the tokens x (B*T, L, C) of T-frame clips."""
    BT, L, C = x.shape
    tok = x.reshape(BT // T, T, L, C).transpose(1, 2).reshape(-1, T, C)     # (B*T,L,C) -> (B*L,T,C)
    return attn(tok).reshape(BT // T, L, T, C).transpose(1, 2).reshape(BT, L, C)  # (B*L,T,C) -> (B*T,L,C)


class SpatialTransformer(nn.Module):
    """Stable Diffusion's attention block on the frames of (B,C,T,H,W): GroupNorm(32, eps 1e-6) per frame, a
    1x1 projection in, `depth` TransformerBlocks over the H*W positions of each frame, a 1x1 projection out
    (zero-initialized), plus the input. `temporal` (a video model's temporal attention on (B,C,T,H,W), or
    None) runs after it. The release's text-to-video block: inner_temporal=True (two TemporalAttentions in each
    TransformerBlock, relative positions to ±max_dist) and clip_norm=True (GroupNorm over the whole clip)."""

    def __init__(self, channels, heads, context_dim, depth=1, temporal=None, use_checkpoint=False,
                 inner_temporal=False, max_dist=None, clip_norm=False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = nn.GroupNorm(32, channels, eps=1e-6) if clip_norm else FrameGroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv3d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, inner_temporal, max_dist)
                                                for _ in range(depth))
        self.proj_out = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.attn_t = temporal

    def forward(self, x, context=None):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x, context):
        B, C, T, H, W = x.shape
        h = self.proj_in(self.norm(x))
        tok = h.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)                 # (B,C,T,H,W) -> (B*T,H*W,C)
        if context is not None:
            context = context.repeat_interleave(T, dim=0)                      # (B,L,D) -> (B*T,L,D): every frame
        for block in self.transformer_blocks:
            tok = block(tok, context, T)
        h = tok.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)                   # (B*T,H*W,C) -> (B,C,T,H,W)
        x = x + self.proj_out(h)
        return x if self.attn_t is None else self.attn_t(x)
