"""Long videos judged as whole videos (§3.3, §4.4): does a 1024-frame video stay one video?

A per-clip score (balls.ball_check on each 16-frame clip) is blind to a video that slowly turns into
another one: every clip can be a plausible scene while the scene changes. These measures read what a
viewer of the built-in data would check over the whole video, from balls.video_attributes of every
16-frame clip (its ball colours, their speed, the background's hue):

  per video (`persistence`)
    same_next          share of consecutive clips that show the same set of ball colours
    keeps_first        share of the clips after the first that show the first clip's colours
    background_change  how far the border ring's colour moved: the per-pixel median over the first
                       `window` frames against the last `window`, mean |difference| in levels of 255
  per window of `window` frames, over a set of videos against real videos at the same N (`window_stats`,
  `population_distance`)
    balls              the distribution of the number of balls per clip (0, 1, 2, 3+)
    colours            the distribution of ball colours over the clips
    background         the distribution of the clips' background colour names
    speed              the mean ball speed (frame widths per frame); 0 for frozen frames

Real videos of the built-in data stay flat on every one of them, and scene cuts, a gradual colour drift,
a ball removed part way and frozen frames each move at least one (test_all.py, RESULTS.md). FVD per window
with the real I3D is fvd.fvd_curve over the same windows.

    python drift.py runs/demo/samples-hierarchical/long.npy      # its rows next to real videos' rows
    python drift.py --validate 8 --frames 1024                   # real videos and four corruptions of them
"""
import argparse

import numpy as np

import balls
import data
from common import ArgumentParser, UserError, main_guard, positive_int

CLIP, WINDOW = 16, 128
BALL_BINS = 4                                         # 0, 1, 2, 3 or more balls in a clip


def clip_attributes(video, clip=CLIP):
    """balls.video_attributes of every consecutive `clip`-frame clip of a uint8 video (T,H,W,3)."""
    v = np.asarray(video)
    return [balls.video_attributes(v[a:a + clip]) for a in range(0, len(v) - clip + 1, clip)]


def border_median(video, width=3):
    """The per-pixel median over frames of a uint8 video's border ring `width` px wide, (P,3) floats: the
    background where it is least often covered, with passing balls removed by the median."""
    v = np.asarray(video, np.float32)
    ring = np.ones(v.shape[1:3], bool)
    ring[width:-width, width:-width] = False
    return np.median(v[:, ring], axis=0)                                     # (T,H,W,3) -> (T,P,3) -> (P,3)


def background_change(first, last):
    """How far the background moved between two stretches of frames (uint8 (T,H,W,3) each): the mean absolute
    difference (/255) of their border medians."""
    return float(np.abs(border_median(first) - border_median(last)).mean())


def persistence(video, clip=CLIP, window=WINDOW, attributes=None):
    """{same_next, keeps_first, background_change} of one uint8 video (T,H,W,3) (module docstring);
    attributes: its clip_attributes, when the caller has them."""
    a = clip_attributes(video, clip) if attributes is None else attributes
    sets = [x["colours"] for x in a]
    if len(sets) < 2:
        raise UserError(f"a video of {len(video)} frames has fewer than two {clip}-frame clips; persistence needs "
                        f"a longer video.")
    v = np.asarray(video)
    w = min(window, len(v) // 2)
    return {"same_next": float(np.mean([s == t for s, t in zip(sets, sets[1:])])),
            "keeps_first": float(np.mean([s == sets[0] for s in sets[1:]])),
            "background_change": background_change(v[:w], v[-w:])}


def keeps_first_curve(attributes, length, clip=CLIP, window=WINDOW):
    """The drift curve of a set of videos, from their clip_attributes: per `window`-frame window, the share of
    its clips (over all videos) that show their video's first-clip colours -> [{"end", "keeps_first"}]."""
    points = []
    for start in range(0, length - window + 1, window):
        same = [a["colours"] == video[0]["colours"] for video in attributes for a in video[start // clip:
                                                                                            (start + window) // clip]]
        points.append({"end": start + window, "keeps_first": float(np.mean(same))})
    return points


def mean_persistence(videos, attributes=None, clip=CLIP, window=WINDOW):
    """`persistence` of each uint8 video (N,T,H,W,3), averaged over the videos; attributes: their
    clip_attributes, when the caller has them."""
    each = [persistence(np.asarray(v), clip, window, a) for v, a in zip(videos, attributes or [None] * len(videos))]
    return {k: float(np.mean([p[k] for p in each])) for k in each[0]}


def window_stats(attributes, start, end, clip=CLIP):
    """Population statistics of the clips that lie in frames [start, end) of a set of videos, from their
    clip_attributes (a list per video): ball-count, colour and background histograms (normalized) and
    the mean speed of the clips that have one."""
    clips = [a for video in attributes for a in video[start // clip:end // clip]]
    counts = [min(len(a["colours"]), BALL_BINS - 1) for a in clips]
    count_hist = np.bincount(counts, minlength=BALL_BINS)
    colours = np.array([sum(c in a["colours"] for a in clips) for c in balls.PALETTE], np.float64)
    backgrounds = np.array([sum(a["background"] == b for a in clips) for b in balls.BACKGROUND_HUES], np.float64)
    speeds = [a["speed"] for a in clips if a["speed"] is not None]
    return {"balls": count_hist / max(count_hist.sum(), 1), "colours": colours / max(colours.sum(), 1),
            "background": backgrounds / max(backgrounds.sum(), 1),
            "balls_mean": float(np.mean(counts)) if clips else 0.0,
            "speed": float(np.mean(speeds)) if speeds else 0.0}


def population_distance(stats, real):
    """How far one window's statistics are from real ones: the total variation distance (half the L1
    distance, in [0, 1]) of each histogram, and the relative difference of the mean speed."""
    out = {k: 0.5 * float(np.abs(stats[k] - real[k]).sum()) for k in ("balls", "colours", "background")}
    out["speed"] = (stats["speed"] - real["speed"]) / max(real["speed"], 1e-9)
    return out


def real_videos(n, frames, size, seed=0):
    """n real long videos of the built-in data (its test split, items seed*n .. seed*n+n-1): uint8 (n,T,H,W,3)."""
    ds = balls.SyntheticVideos(n=seed * n + n, frames=frames, size=size, split="test")
    return np.stack([ds.render(i) for i in range(seed * n, seed * n + n)])


class _WithoutLastBall(balls.SyntheticVideos):
    """The built-in data's scenes, rendered without their last ball."""

    def params(self, i):
        p = super().params(i)
        return {**p, "balls": p["balls"][:-1]}


def corrupted(n, frames, size, at=None):
    """Real long videos of the built-in data and four corruptions of them from frame `at` on (default the
    middle), each uint8 (n,T,H,W,3): a scene cut (another real video), a tint drifting toward teal over the
    whole video (up to 30 levels), the last ball removed, and frozen frames."""
    at = frames // 2 if at is None else at
    real = real_videos(n, frames, size)
    cut, removed, frozen = real.copy(), real.copy(), real.copy()
    cut[:, at:] = real_videos(n, frames, size, seed=3)[:, at:]
    without = _WithoutLastBall(n=n, frames=frames, size=size, split="test")
    for i in range(n):
        removed[i, at:] = without.render(i, frames=frames - at, start=at)
    frozen[:, at:] = real[:, at - 1:at]
    ramp = np.arange(frames, dtype=np.float32)[None, :, None, None, None] / (frames - 1)
    tint = np.clip(np.round(real + ramp * np.array([-30, 20, 20], np.float32)), 0, 255).astype(np.uint8)
    return {"real": real, "scene cut": cut, "tint drift": tint, "ball removed": removed, "frozen": frozen}


def validate(n, frames, size, clip=CLIP, window=WINDOW):
    """Markdown rows: the persistence of real videos and of each corruption (`corrupted`, from the middle on),
    and the balls per clip and speed of their first and last window."""
    rows = [f"| {n} videos x {frames} frames, {size}² | same balls in the next clip | first clip's balls | "
            f"background change (/255) | balls per clip, first → last window | speed, first → last window |",
            "|---|---|---|---|---|---|"]
    for name, vids in corrupted(n, frames, size).items():
        attrs = [clip_attributes(v, clip) for v in vids]
        p = mean_persistence(vids, attrs, clip, window)
        first, last = window_stats(attrs, 0, window, clip), window_stats(attrs, frames - window, frames, clip)
        rows.append(f"| {name} | " + " | ".join(f"{p[k]:.2f}" for k in p)
                    + f" | {first['balls_mean']:.2f} → {last['balls_mean']:.2f} | {first['speed']:.4f} → "
                      f"{last['speed']:.4f} |")
    return "\n".join(rows)


def report(videos, real, clip=CLIP, window=WINDOW, pool=64):
    """Rows of two markdown tables: the persistence of `videos` and of `real` videos at the same N (mean ±
    std over videos); then per window the balls per clip, the mean speed and the distances from a pool of
    `pool` further real videos' first window (real videos are stationary: every window is the same
    population). The real rows' distances are the floor that N videos' sampling noise sets."""
    T = min(len(videos[0]), len(real[0]))
    size = np.asarray(videos[0]).shape[1]
    ref_attrs = [clip_attributes(v, clip) for v in real_videos(pool, window, size, seed=1 + len(real) // pool)]
    ref = window_stats(ref_attrs, 0, window, clip)
    rows = ["| videos | same balls in the next clip | first clip's balls | background change (/255) |",
            "|---|---|---|---|"]
    attrs = {}
    for name, vids in (("real", real), ("these", videos)):
        attrs[name] = [clip_attributes(np.asarray(v[:T]), clip) for v in vids]
        p = [persistence(np.asarray(v[:T]), clip, window, a) for v, a in zip(vids, attrs[name])]
        rows.append(f"| {name} ({len(vids)}) | " + " | ".join(
            f"{np.mean([q[k] for q in p]):.2f} ± {np.std([q[k] for q in p]):.2f}"
            for k in ("same_next", "keeps_first", "background_change")) + " |")
    rows += ["", f"| frames | videos | balls per clip | speed (frame widths / frame) | distance from {pool} real "
                 f"videos: balls, colours, background (TV) |", "|---|---|---|---|---|"]
    for start in range(0, T - window + 1, window):
        for name in ("real", "these"):
            st = window_stats(attrs[name], start, start + window, clip)
            d = population_distance(st, ref)
            rows.append(f"| {start}-{start + window - 1} | {name} | {st['balls_mean']:.2f} | {st['speed']:.4f} | "
                        f"{d['balls']:.2f}, {d['colours']:.2f}, {d['background']:.2f} |")
    rows.append(f"| reference | {pool} real | {ref['balls_mean']:.2f} | {ref['speed']:.4f} | 0 |")
    return "\n".join(rows)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="?", help="long videos: a .npy or .npz of uint8 (N,T,H,W,3) (sample.py's long.npy)")
    p.add_argument("--real-n", type=positive_int, help="real videos of the reference rows (default: as many)")
    p.add_argument("--window", type=positive_int, default=WINDOW)
    p.add_argument("--validate", metavar="N", type=positive_int, help="instead: the measures on N real videos and "
                   "on four corruptions of them (--frames, --size)")
    p.add_argument("--frames", type=positive_int, default=1024); p.add_argument("--size", type=positive_int, default=64)
    args = p.parse_args(argv)
    if args.validate:
        return print(validate(args.validate, args.frames, args.size, window=args.window))
    if not args.videos:
        raise UserError("pass the long videos (e.g. runs/demo/samples-hierarchical/long.npy), or --validate N.")
    videos = data.load_npz(args.videos) if args.videos.endswith(".npz") else np.load(args.videos, mmap_mode="r")
    if videos.ndim != 5 or videos.dtype != np.uint8:
        raise UserError(f"{args.videos} holds {videos.dtype} {videos.shape}, not uint8 (N,T,H,W,3) videos.")
    real = real_videos(args.real_n or len(videos), videos.shape[1], videos.shape[2])
    print(report(videos, real, window=args.window))


if __name__ == "__main__":
    main_guard(main)
