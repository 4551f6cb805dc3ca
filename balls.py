"""The built-in dataset of bouncing balls (--data synthetic): renderer, captions, the detector that scores samples.

Named balls.py for what it renders and detects (synthetic.py would stutter: synthetic.synthetic_score).
One or two coloured balls bounce over a still gradient, rendered from seeded parameters (no files)
as the same clips data.py yields. It sits just below data.py in the flow: it imports data.py's clip
conversion, split names and VideoDataset; data.py never imports it. make_dataset, the `--data`
switch (`synthetic` or a folder), lives here because it needs both datasets.

Paper parts that use it: the demo presets' data for every stage (§3.1-3.3, train.py); §5's
text-to-video, whose captions synthetic_caption writes from each video's parameters (held-out
combinations are the evaluation prompts; caption_check stands in for CLIP-score); and the synthetic
sample score (ball_check, synthetic_score, clip_score) that fvd.py and sample.py print next to FVD
(§4.1) and bench.py's study and drift.py measure along long videos (§4.4, Fig. 6-7).

Commands:
  python balls.py preview synthetic out.gif --frames 64 --size 64   # look at a dataset (or a folder)
  python balls.py score [--n 256]          # the synthetic score on real clips, noise and broken videos
"""

import json
import re
import zlib

import numpy as np
import torch
from scipy import ndimage

from common import ArgumentParser, UserError, main_guard, positive_int
from data import (CANONICAL_SPLIT, VideoDataset, _check_size, _ext, _uint8_to_clip, to_uint8, write_grid,
                  write_video)


# ----------------------------------------------------------------------------- SyntheticVideos
PALETTE = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 235), "yellow": (245, 215, 30),
           "cyan": (30, 210, 220), "magenta": (225, 40, 200)}
N_BALLS, RADIUS, SPEED = (1, 2), (0.12, 0.18), (0.008, 0.018)   # SyntheticVideos' ranges (fractions of the frame)
SPLIT_ID = {"train": 0, "test": 1}


def synthetic_version():
    """The built-in generator's ranges, for cache keys (latent caches, FVD's real features): a change
    to them is a different dataset, whose cached latents or features must not be reused."""
    return [N_BALLS, RADIUS, SPEED, sorted(PALETTE.items())]


def _hsv_to_rgb(h, s, v):
    """Vectorized HSV -> RGB in [0,1]; h in cycles (any real), s, v in [0,1]. Returns (...,3)."""
    h = np.mod(h, 1.0) * 6.0
    k = np.stack([np.mod(5 + h, 6), np.mod(3 + h, 6), np.mod(1 + h, 6)], -1)
    return v[..., None] * (1 - s * np.clip(np.minimum(k, 4 - k), 0, 1))


def bounce(p0, v, r, t):
    """Elastic bouncing in [r, 1-r]: position at (real) time t of a point starting at p0 with
    velocity v. Unfold the motion to u = p0 - r + v t, then fold it with a triangle wave of period
    2L, L = 1 - 2r, i.e. reflect at each wall (closed form, so any frame renders independently)."""
    L = 1.0 - 2.0 * r
    m = np.mod(p0 - r + v * t, 2.0 * L)
    return r + np.where(m <= L, m, 2.0 * L - m)


class SyntheticVideos(torch.utils.data.Dataset):
    """Built-in procedural videos: one or two coloured balls bouncing over a still gradient (no files).

    Generative rules for item i (all random numbers from numpy.random.default_rng([seed, split_id,
    i]), split_id 0 = train, 1 = test, so the splits are disjoint and every item is reproducible);
    coordinates are fractions of the frame, so any `size` renders the same scene:
      * n_balls ~ uniform{N_BALLS}; colors: distinct names from PALETTE (flat RGB, six hues 60 degrees
        apart), drawn in order (the later ball covers the earlier one where they overlap); radius ~
        U(RADIUS) (7.7-11.5 px at 64x64);
      * start position (x0, y0) ~ U(r, 1-r) each; speed ~ U(SPEED) frame-widths per frame
        (0.5-1.2 px/frame at 64x64, 2-4.6 px per latent frame of ft = 4) in a uniform direction; balls
        bounce elastically off the walls (see `bounce`) and pass through each other; frame t shows the
        position at time t, so any length is one continuous trajectory and stride s samples every s-th
        frame of it;
      * edges are antialiased: alpha = clip((r - d)/w + 1/2, 0, 1), d = distance of the pixel
        center to the ball center, w = 1.5 px (a soft edge a small autoencoder can reproduce);
      * background, the same in every frame: a sinusoidal gradient g = 1/2 + 1/2 sin(2 pi f (x cos a
        + y sin a) + phase), f ~ U(0.4, 0.9) (less than one period over the frame: smooth);
        colour = HSV(hue + 0.15 g, sat, val*(0.75 + 0.25 g)), hue ~ U(0, 1), sat ~ U(0.2, 0.4),
        val ~ U(0.45, 0.7): low saturation so the balls stand out.
    Why this size and speed (RESULTS.md, 2026-11-29): with more, larger and faster balls and a drifting
    background the demo's autoencoder and U-Net could not hold the scene (balls changed colour, appeared
    and vanished between latent frames). Motion, occlusion and several objects remain.
    Item i is frames 0..frames-1 (stride s: 0, s, 2s, ...) as float (3,T,size,size) in [-1,1],
    rendered to uint8 first like real data; flip=True mirrors x with default_rng([seed, epoch, i]).
    params(i) returns every generative parameter as a plain json-able dict and its caption (§5), which
    says what a viewer can check: the ball colours, fast or slow motion, the background's colour
    (synthetic_caption). captions=True makes items (clip, caption); held_out="exclude" keeps only the
    items whose caption is not a held-out combination (is_held_out: text-to-video training), "only"
    only those (its evaluation prompts). Item k is then the k-th kept index.
    """

    def __init__(self, n=None, frames=16, size=64, stride=1, split="train", seed=0, flip=False, captions=False,
                 held_out=None):
        for name, value in (("size", size), ("frames", frames), ("stride", stride)):
            _check_size(name, value)
        want = split.lower()
        if want != "all" and want not in CANONICAL_SPLIT:
            raise UserError(f"unknown split {split!r}; use train, test (or val), or all.")
        self.split_id = SPLIT_ID[CANONICAL_SPLIT.get(want, "train")]  # "all" = the train stream
        self.n = int(n) if n is not None else (512 if self.split_id == 1 else 10000)
        self.frames, self.size, self.stride, self.seed, self.flip, self.epoch = frames, size, stride, seed, flip, 0
        self.captions, self.items = captions, None
        if held_out not in (None, "exclude", "only"):
            raise ValueError(f"held_out must be None, 'exclude' or 'only', not {held_out!r}")
        if held_out is not None:
            self.items = [i for i in range(self.n)
                          if is_held_out(self.params(i)["caption"]) == (held_out == "only")]

    def __len__(self):
        return self.n if self.items is None else len(self.items)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def params(self, i):
        rng = np.random.default_rng([self.seed, self.split_id, i])
        n_balls = int(rng.integers(N_BALLS[0], N_BALLS[1] + 1))
        names = [str(c) for c in rng.choice(sorted(PALETTE), size=n_balls, replace=False)]
        balls = []
        for name in names:
            r = float(rng.uniform(*RADIUS))
            x0, y0 = (float(p) for p in rng.uniform(r, 1.0 - r, size=2))
            speed, angle = float(rng.uniform(*SPEED)), float(rng.uniform(0, 2 * np.pi))
            balls.append({"color": name, "rgb": list(PALETTE[name]), "radius": r, "x0": x0, "y0": y0,
                          "vx": speed * float(np.cos(angle)), "vy": speed * float(np.sin(angle)),
                          "speed": speed})
        bg = {"hue": float(rng.uniform()), "sat": float(rng.uniform(0.2, 0.4)), "val": float(rng.uniform(0.45, 0.7)),
              "freq": float(rng.uniform(0.4, 0.9)), "angle": float(rng.uniform(0, 2 * np.pi)),
              "phase": float(rng.uniform(0, 2 * np.pi))}
        return {"index": int(i), "split_id": self.split_id, "seed": int(self.seed), "n_balls": n_balls,
                "balls": balls, "background": bg, "caption": synthetic_caption(balls, bg)}

    def render(self, i, frames=None, stride=None, start=0, size=None):
        """uint8 (T,H,W,3) of item i at times start + stride*k, k < frames (vectorized numpy)."""
        frames, stride, size = frames or self.frames, stride or self.stride, size or self.size
        p = self.params(i)
        bg = p["background"]
        out = np.empty((frames, size, size, 3), np.uint8)
        c = (np.arange(size) + 0.5) / size  # pixel centers as fractions of the frame
        xx, yy = c[None, None, :], c[None, :, None]  # (1,1,W), (1,H,1)
        edge = 1.5 / size  # soft edge width: 1.5 px, in frame fractions
        g = 0.5 + 0.5 * np.sin(2 * np.pi * bg["freq"] * (xx * np.cos(bg["angle"]) + yy * np.sin(bg["angle"]))
                               + bg["phase"])[0]  # (H,W)
        background = _hsv_to_rgb((bg["hue"] + 0.15 * g).astype(np.float32), np.float32(bg["sat"]),
                                 (bg["val"] * (0.75 + 0.25 * g)).astype(np.float32))  # (H,W,3)
        for t0 in range(0, frames, 64):  # chunks of 64 frames bound the memory of long clips
            t = (start + stride * np.arange(t0, min(frames, t0 + 64)))[:, None, None].astype(np.float64)
            img = np.repeat(background[None], len(t), 0)  # (t,H,W,3)
            for b in p["balls"]:
                cx, cy = bounce(b["x0"], b["vx"], b["radius"], t), bounce(b["y0"], b["vy"], b["radius"], t)
                d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)  # (t,H,W)
                alpha = np.clip((b["radius"] - d) / edge + 0.5, 0.0, 1.0).astype(np.float32)[..., None]
                img += alpha * (np.array(b["rgb"], np.float32) / 255.0 - img)  # alpha blend, (t,H,W,3)
            out[t0:t0 + img.shape[0]] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
        return out

    def __getitem__(self, k):
        i = k if self.items is None else self.items[k]
        flip = self.flip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5
        clip = _uint8_to_clip(list(self.render(i)), flip)
        return (clip, self.params(i)["caption"]) if self.captions else clip


# Background colour names of the captions: hue bins of 1/6 (hue in cycles) centred on these hues.
BACKGROUND_HUES = {"red": 0.0, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6, "magenta": 5 / 6}
FAST = sum(SPEED) / 2   # frame widths per frame: the middle of the speed range
SPEED_SLACK = 0.12 * (SPEED[1] - SPEED[0])  # caption_check's margin around FAST: 0.0012, about the 95th
                                            # percentile of the speed measurement's error on real clips


def synthetic_caption(balls, bg):
    """The caption of one synthetic video, from its parameters: its ball colours (each colour once, in
    alphabetical order), "fast" when the balls' mean speed is at least FAST (else "slowly"), and the
    background hue's colour name (its hue plus the gradient's mean offset 0.075), e.g.
    "a blue ball and a red ball bounce fast over a green background"."""
    names = [("an " if c[0] in "aeiou" else "a ") + c + " ball" for c in sorted(b["color"] for b in balls)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    fast = np.mean([b["speed"] for b in balls]) >= FAST
    hue = (bg["hue"] + 0.075) % 1.0
    colour = min(BACKGROUND_HUES, key=lambda c: abs((hue - BACKGROUND_HUES[c] + 0.5) % 1.0 - 0.5))
    verb = "bounces" if len(names) == 1 else "bounce"
    return f"{listed} {verb} {'fast' if fast else 'slowly'} over a {colour} background"


def is_held_out(caption):
    """Held-out caption combinations (about one in ten, by a hash of the caption): text-to-video trains
    without them and is evaluated on them, so its prompts are combinations it never saw."""
    return zlib.crc32(caption.encode()) % 10 == 0


def held_out_captions(n, seed=0):
    """§5's evaluation prompts: (item indices, captions) of the first n items of the synthetic test split
    whose captions are held-out combinations (is_held_out), in index order."""
    ds, items, captions = SyntheticVideos(n=1, split="test", seed=seed), [], []
    i = 0
    while len(items) < n:
        caption = ds.params(i)["caption"]
        if is_held_out(caption):
            items.append(i)
            captions.append(caption)
        i += 1
    return items, captions


def parse_caption(caption):
    """A caption -> (ball colours, "fast" | "slowly" | None, background colour or None), as
    synthetic_caption writes them; words it does not know are ignored."""
    text = caption.lower()
    colours = {c for c in PALETTE if re.search(rf"\b{c} ball", text)}
    speed = "fast" if re.search(r"\bfast\b", text) else "slowly" if re.search(r"\bslow(ly)?\b", text) else None
    bg = re.search(r"\b(" + "|".join(BACKGROUND_HUES) + r") background", text)
    return colours, speed, bg.group(1) if bg else None


# ----------------------------------------------------------------------------- the synthetic sample score
SCORE_FAILURES = ("no ball", "a blob too large", "a misshapen ball", "a ball that appears and vanishes",
                  "a ball that jumps", "a ball that vanishes")


def find_balls(video, tol=70.0):
    """{(t, palette index): (mask (H,W), area)} of the ball-sized regions near each palette colour in each
    frame of a uint8 video (T,H,W,3); pieces of one colour are merged (a ball cut by two occluders). The
    detection ball_check, video_attributes and caption_check share: pass it as their `found=` to run it once."""
    v = np.asarray(video, np.float32)
    T, S = v.shape[:2]
    palette = np.array(list(PALETTE.values()), np.float32)
    dist = np.sqrt(((v[..., None, :] - palette) ** 2).sum(-1))      # (T,H,W,K): RGB distance to each colour
    nearest, close = dist.argmin(-1), dist.min(-1) < tol
    within_frame = np.zeros((3, 3, 3), bool)
    within_frame[1] = True                                           # connect pixels of one frame only
    a_min = 0.3 * np.pi * (RADIUS[0] * S) ** 2                       # a third of the smallest ball
    found = {}
    for c in range(len(palette)):
        labels, _ = ndimage.label(close & (nearest == c), within_frame)
        for k, box in enumerate(ndimage.find_objects(labels)):
            piece = labels[box] == k + 1                             # (1,h,w)
            if piece.sum() < a_min:
                continue
            t = box[0].start
            mask = found[(t, c)][0] if (t, c) in found else np.zeros((S, S), bool)
            mask[box[1:]] |= piece[0]
            found[(t, c)] = (mask, int(mask.sum()))
    return found


def _regions(found, T, S):
    """Where the balls of find_balls are: (union (T,H,W) of every ball's mask per frame,
    {(t, palette index): (ys, xs, centre y, centre x, touched)}), touched when another ball's region lies
    within 2 px of it (an occluder)."""
    union = np.zeros((T, S, S), bool)
    for (t, c), (mask, _) in found.items():
        union[t] |= mask
    where = {}
    for (t, c), (mask, _) in found.items():
        ys, xs = np.nonzero(mask)
        touched = bool((ndimage.binary_dilation(mask, iterations=2) & union[t] & ~mask).any())
        where[(t, c)] = (ys, xs, ys.mean(), xs.mean(), touched)
    return union, where


def ball_check(video, tol=70.0, found=None):
    """Does a uint8 video (T,H,W,3) look like SyntheticVideos? -> (passed, reason), reason one of
    "ok" or SCORE_FAILURES. A deterministic detector that knows the palette: in every frame, the balls
    are the regions near a palette colour (RGB distance < tol, at least a third of the smallest ball's
    area). A video passes when
      * each region fits in the largest ball (radius RADIUS[1] of the frame) and, where no other ball touches
        it, is round (every pixel within 1.25 equal-area radii of its centre);
      * every colour seen is seen in at least half the frames (no ball appears and vanishes);
      * a ball moves at most 0.1 frame widths per frame (the data: at most SPEED[1]) unless an occluder
        touches it, and is missing only where another ball may cover it (near its last position).
    found: find_balls(video, tol), when the caller has it already."""
    T, S = np.asarray(video).shape[:2]
    found = find_balls(video, tol) if found is None else found
    if not found:
        return False, "no ball"
    union, where = _regions(found, T, S)
    step, r_max = 0.1 * S, RADIUS[1] * S + 1.5
    info = {}
    for (t, c), (_, area) in found.items():
        ys, xs, cy, cx, touched = where[(t, c)]
        if np.hypot(ys - (ys.min() + ys.max()) / 2, xs - (xs.min() + xs.max()) / 2).max() > r_max + 1:
            return False, "a blob too large"
        if not touched and np.hypot(ys - cy, xs - cx).max() > 1.25 * np.sqrt(area / np.pi) + 1.5:
            return False, "a misshapen ball"
        info[(t, c)] = (cy, cx, np.sqrt(area / np.pi), touched)
    for c in {c for _, c in found}:
        frames = [t for t in range(T) if (t, c) in info]
        if len(frames) < T / 2:
            return False, "a ball that appears and vanishes"
        last = frames[0]
        for t in range(frames[0] + 1, T):
            (py, px, pr, ptouch) = info[(last, c)]
            if (t, c) in info:
                y, x, _, touch = info[(t, c)]
                if not (touch or ptouch) and np.hypot(y - py, x - px) > step * (t - last):
                    return False, "a ball that jumps"
                last = t
            else:  # hidden: only behind another ball near where it was
                near = ndimage.distance_transform_edt(~union[t]) if union[t].any() else None
                y, x = int(np.clip(round(py), 0, S - 1)), int(np.clip(round(px), 0, S - 1))
                if near is None or near[y, x] > 2 * pr + step * (t - last) + 2:
                    return False, "a ball that vanishes"
    return True, "ok"


def _hue(rgb):
    """Hue in cycles [0, 1) of RGB values (..., 3)."""
    r, g, b = np.moveaxis(np.asarray(rgb, np.float32), -1, 0)
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    d = hi - lo + 1e-6
    h = np.where(hi == r, np.mod((g - b) / d, 6), np.where(hi == g, (b - r) / d + 2, (r - g) / d + 4))
    return h / 6.0


def video_attributes(video, tol=70.0, found=None):
    """What a viewer reads off a uint8 video (T,H,W,3) of the synthetic data, whether or not its balls
    are well formed: {"colours": palette colours seen in at least half the frames, "speed": the mean
    over those balls of the median distance (frame widths) each moves between consecutive frames where
    no other ball touches it (where that never happens, over all its steps; None without any step),
    "background": the colour name (BACKGROUND_HUES) of the circular mean hue of
    the pixels 3 px or more away from every ball}."""
    v = np.asarray(video)
    T, S = v.shape[:2]
    found = find_balls(v, tol) if found is None else found
    colours = {c for c in {c for _, c in found} if sum((t, c) in found for t in range(T)) >= T / 2}
    union, where = _regions(found, T, S)
    centres = {k: w[2:] for k, w in where.items()}                                # (t, c) -> (y, x, touched)
    speeds = []
    for only_free in (True, False):  # steps of balls nothing touches; if there are none, every step
        for c in colours:
            steps = [np.hypot(a[0] - b[0], a[1] - b[1]) / S for t in range(T - 1)
                     for a, b in [(centres.get((t, c)), centres.get((t + 1, c)))]
                     if a and b and not (only_free and (a[2] or b[2]))]
            if steps:
                speeds.append(np.median(steps))
        if speeds:
            break
    away = ~ndimage.binary_dilation(union, np.ones((1, 7, 7), bool))            # (T,H,W): 3 px from every ball
    angle = 2 * np.pi * _hue(v[away] if away.any() else v.reshape(-1, 3))
    hue = np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi) % 1.0
    background = min(BACKGROUND_HUES, key=lambda n: abs((hue - BACKGROUND_HUES[n] + 0.5) % 1.0 - 0.5))
    return {"colours": {list(PALETTE)[c] for c in colours}, "speed": float(np.mean(speeds)) if speeds else None,
            "background": background, "hue": float(hue)}


def caption_check(video, caption, tol=70.0):
    """Does a uint8 video (T,H,W,3) show its caption? -> {"ok", "balls", "colours", "speed",
    "background", "named": bool}: "balls" is ball_check (well-formed balls moving continuously); "colours"
    the captioned colours are exactly those seen ("named": each captioned colour is seen, others may be too); "speed" the median step is on the captioned side of FAST
    (SPEED_SLACK of slack, the measurement's own error on real clips); "background" the mean hue lies in the
    named colour's bin (±1/12) widened by 0.05 (the gradient and the drift move it that much);
    "ok" the first four. A stand-in for CLIP-score, valid only on the built-in data."""
    found = find_balls(video, tol)
    balls = ball_check(video, tol, found)[0]
    a = video_attributes(video, tol, found)
    colours, speed, bg = parse_caption(caption)
    ok_speed = speed is None or (a["speed"] is not None and (a["speed"] >= FAST - SPEED_SLACK if speed == "fast"
                                                             else a["speed"] < FAST + SPEED_SLACK))
    ok_bg = bg is None or abs((a["hue"] - BACKGROUND_HUES[bg] + 0.5) % 1.0 - 0.5) <= 1 / 12 + 0.05
    out = {"balls": bool(balls), "colours": a["colours"] == colours, "speed": bool(ok_speed), "background": bool(ok_bg)}
    out["ok"] = all(out.values())
    out["named"] = colours <= a["colours"]
    return out


def caption_scores(videos, captions):
    """Share of uint8 videos (N,T,H,W,3) for which each part of caption_check holds, and all of them
    ("ok": the caption accuracy)."""
    checks = [caption_check(v, c) for v, c in zip(videos, captions)]
    return {k: float(np.mean([c[k] for c in checks])) if checks else 0.0
            for k in ("ok", "balls", "colours", "speed", "background", "named")}


def caption_accuracy(videos, captions):
    """Share of uint8 videos (N,T,H,W,3) that show everything their caption says (caption_check):
    how well samples follow prompts."""
    return caption_scores(videos, captions)["ok"]


def synthetic_score(videos, start=0, end=None):
    """Share of uint8 videos (N,T,H,W,3), or of their frames [start, end), that pass ball_check, and how
    many failed for each reason. `videos` may be any iterable of (T,H,W,3) videos (a memory-mapped .npy)."""
    reasons = {}
    for video in videos:
        why = ball_check(np.asarray(video[start:end]))[1]
        reasons[why] = reasons.get(why, 0) + 1
    return reasons.get("ok", 0) / max(sum(reasons.values()), 1), reasons


def clip_score(videos, start, end, clip=16):
    """synthetic_score of frames [start, end) of long videos taken clip by clip: the mean over the
    consecutive `clip`-frame clips in that range (a 128-frame window of a long video is 8 clips), the
    long-video study's measure (a window scored whole fails on one bad clip)."""
    return float(np.mean([synthetic_score(videos, a, a + clip)[0] for a in range(start, end - clip + 1, clip)]))


def make_dataset(data, frames, size, stride=1, split="train", random_start=True, flip=False, seed=0, captions=None,
                 **kw):
    """SyntheticVideos when data == "synthetic", else VideoDataset(data, ...). captions (§5): items become
    (clip, caption); for the synthetic data any true value (its own captions, held-out combinations left
    out unless held_out= says otherwise), for a dataset on disk a caption file or "txt" (read_captions)."""
    if str(data) == "synthetic":
        return SyntheticVideos(n=kw.get("n"), frames=frames, size=size, stride=stride, split=split, seed=seed,
                               flip=flip, captions=bool(captions),
                               held_out=kw.get("held_out", "exclude" if captions else None))
    return VideoDataset(data, frames, size, stride=stride, split=split, random_start=random_start, flip=flip,
                        seed=seed, cache_dir=kw.get("cache_dir"), verbose=kw.get("verbose", True), captions=captions)


# ----------------------------------------------------------------------------- the detector's own check
def score_table(n):
    """synthetic_score on what should pass (n real clips per split, the ends of real 1024-frame videos) and what
    should not (noise, flat frames, shuffled frames, frames from different clips): a markdown table."""
    rng = np.random.default_rng(0)
    test = SyntheticVideos(n=n, frames=16, size=64, split="test")
    train_ds = SyntheticVideos(n=n, frames=16, size=64, split="train")
    real = np.stack([test.render(i) for i in range(n)])                    # (n,16,64,64,3)
    flat = np.broadcast_to(real[:32].mean(axis=(2, 3), keepdims=True).astype(np.uint8), real[:32].shape)
    long = SyntheticVideos(n=8, frames=1024, size=64, split="test")
    long_videos = np.stack([long.render(i) for i in range(8)])
    cases = [("held-out (test) clips", real), ("training clips", np.stack([train_ds.render(i) for i in range(n)])),
             ("uniform noise", rng.integers(0, 256, (32, 16, 64, 64, 3), dtype=np.uint8)),
             ("each frame replaced by its mean colour", flat),
             ("real clips, frames shuffled", real[:64, rng.permutation(16)]),
             ("every frame from another real clip",
              np.stack([real[(np.arange(16) + i) % n, np.arange(16)] for i in range(min(64, n))])),
             ("8 real 1024-frame videos, first 128 frames", long_videos[:, :128]),
             ("8 real 1024-frame videos, last 128 frames", long_videos[:, -128:])]
    rows = ["| videos (64², 16 frames unless said) | pass | failures |", "|---|---|---|"]
    for name, videos in cases:
        share, reasons = synthetic_score(videos)
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()) if k != "ok") or "none"
        rows.append(f"| {name} ({len(videos)}) | {100 * share:.1f}% | {fails} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- preview and score (CLI)
def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("preview", help="write clips of a dataset as a gif/mp4 (first clip) or png grid")
    v.add_argument("data"), v.add_argument("out")
    v.add_argument("--frames", type=positive_int, default=16), v.add_argument("--size", type=positive_int, default=64)
    v.add_argument("--stride", type=positive_int, default=1), v.add_argument("--split", default="train")
    v.add_argument("--n", type=positive_int, default=4)
    sc = sub.add_parser("score", help="the synthetic score on real clips, noise and broken videos (a markdown table)")
    sc.add_argument("--n", type=positive_int, default=256, help="real clips per split")
    args = ap.parse_args(argv)
    if args.cmd == "score":
        return print(score_table(args.n))
    ds = make_dataset(args.data, args.frames, args.size, args.stride, args.split, random_start=False)
    videos = to_uint8(torch.stack([ds[i] for i in range(min(args.n, len(ds)))]))
    if _ext(args.out) == ".png":
        write_grid(args.out, videos)
    else:
        write_video(args.out, videos[0])
    if isinstance(ds, SyntheticVideos):
        for i in range(len(videos)):
            print(json.dumps(ds.params(i)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main_guard(main)
