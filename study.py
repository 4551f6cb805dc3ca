"""Quality studies on the built-in data: §4.4's long videos judged as whole videos (Fig. 6-7), where
hierarchical sampling loses its scene, §5 on held-out captions, and the checks behind the scores.

    python study.py long --pred runs/demo/pred.pt --interp runs/demo/interp.pt --ar-pred runs/demo-ar/pred.pt \
        --frames 1024 --n 16 --seeds 3 [--i3d PATH]   # §4.4: six settings, drift curves, a table per claim, a page
    python study.py keyframes --pred runs/demo/pred.pt --interp runs/demo/interp.pt   # does hierarchical sampling
                                           # lose quality in the keyframes or in the interpolation?
    python study.py t2v --ckpt runs/demo-t2v/t2v.pt --n 64 --i3d PATH   # §5: caption accuracy and FVD on
                                           # held-out prompts, text-conditional vs unconditional samples
    python study.py psnr --vae RUN/vae.pt  # autoencoder PSNR on 256 held-out 16-frame synthetic clips

bench.py measures speed and memory; this file measures what the models make. Each subcommand prints
markdown tables (and writes its files under --out). No other file imports this one.
"""
import argparse
import csv
import html
import json
import os
import sys

import numpy as np
import torch

import balls
import data
import drift
import fvd
import hierarchical
import sample
import vae
from common import UserError, atomic_path, load_checkpoint, main_guard, plot_lines

# ----------------------------------------------------------------------------- §4.4: long videos as whole videos
STUDY = {  # name -> (mode, cond-noise s, guidance w); Fig. 6-7 of the paper
    "hierarchical": ("hierarchical", 100, 0.1),
    "hierarchical, neither": ("hierarchical", 0, 0.0),
    "autoregressive": ("autoregressive", 100, 0.1),
    "autoregressive, no perturbation": ("autoregressive", 0, 0.1),
    "autoregressive, no guidance": ("autoregressive", 100, 0.0),
    "autoregressive, neither": ("autoregressive", 0, 0.0),
}
REAL = "real videos"

# Per-video measures (video_measures): key -> (what, scale for the tables, +1 if higher is better, -1 if lower).
MEASURES = {
    "same_next": ("next clip has the same balls (%)", 100, +1),
    "keeps_first": ("clips showing the first clip's balls (%)", 100, +1),
    "kept_last": ("clips of the last window showing the first clip's balls (%)", 100, +1),
    "background_change": ("background change, first vs last window (/255)", 1, -1),
    "score_drop": ("per-clip score, first minus last window (points)", 100, -1),
    "balls_drop": ("balls per clip, first minus last window", 1, -1),
}

# The paper's claims (§4.4, Fig. 6-7), each tested on pairs (the setting that should be better, the other one).
# Error accumulation is tested against real videos: the measures are changes over the video, which real
# videos of the built-in data do not have.
CLAIMS = [
    ("error accumulates without the remedies", [(REAL, "autoregressive, neither")]),
    ("conditional latent perturbation reduces it", [("autoregressive, no guidance", "autoregressive, neither"),
                                                    ("autoregressive", "autoregressive, no perturbation")]),
    ("unconditional guidance reduces it", [("autoregressive, no perturbation", "autoregressive, neither"),
                                           ("autoregressive", "autoregressive, no guidance")]),
    ("hierarchical degrades more slowly than autoregressive", [("hierarchical", "autoregressive"),
                                                               ("hierarchical, neither", "autoregressive, neither")]),
]


def run_folder(out, name, seed):
    return os.path.join(out, name.replace(", ", "-").replace(" ", "-"), f"seed-{seed}")


def clip_records(video, clip=drift.CLIP):
    """Per consecutive `clip`-frame clip of a uint8 video (T,H,W,3): balls.video_attributes (colours, speed,
    background) and "ok", whether the clip passes balls.ball_check; one ball detection serves both."""
    v = np.asarray(video)
    out = []
    for a in range(0, len(v) - clip + 1, clip):
        c = v[a:a + clip]
        found = balls.find_balls(c)
        out.append({**balls.video_attributes(c, found=found), "ok": balls.ball_check(c, found=found)[0]})
    return out


def cached_records(path, videos, key):
    """clip_records of every video, kept in the JSON file `path` for the videos named by `key` (e.g. their
    file's size and time): a study read again skips the ball detection, the slow part of its analysis."""
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return [[{**r, "colours": set(r["colours"])} for r in video] for video in saved["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records = [clip_records(v) for v in videos]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump({"key": key, "records": [[{**r, "colours": sorted(r["colours"])} for r in video]
                                           for video in records]}, f)
    return records


def video_curves(video, records, window=drift.WINDOW, clip=drift.CLIP):
    """The drift curves of one video, per `window`-frame window: the share of its clips that pass ball_check
    (score), balls per clip, the share of its clips showing the first clip's colours (the first clip itself
    not counted), and the background's distance from the first window (drift.border_median, /255)."""
    v = np.asarray(video)
    ref, first = drift.border_median(v[:window]), records[0]["colours"]
    points = []
    for start in range(0, len(v) - window + 1, window):
        recs = records[start // clip:(start + window) // clip]
        later = recs[1:] if start == 0 else recs
        points.append({"start": start, "end": start + window, "score": float(np.mean([r["ok"] for r in recs])),
                       "balls": float(np.mean([len(r["colours"]) for r in recs])),
                       "keeps_first": float(np.mean([r["colours"] == first for r in later])),
                       "background": float(np.abs(drift.border_median(v[start:start + window]) - ref).mean())})
    return points


def video_measures(video, records, window=drift.WINDOW, clip=drift.CLIP):
    """MEASURES of one video, and its curves (video_curves)."""
    pts = video_curves(video, records, window, clip)
    p = drift.persistence(video, clip, window, attributes=records)
    return {"same_next": p["same_next"], "keeps_first": p["keeps_first"], "kept_last": pts[-1]["keeps_first"],
            "background_change": pts[-1]["background"], "score_drop": pts[0]["score"] - pts[-1]["score"],
            "balls_drop": pts[0]["balls"] - pts[-1]["balls"]}, pts


def mean_se(values):
    """Mean and standard error (ddof=1) of per-video values."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def verdict(gain, se):
    """A difference in the claimed direction (gain > 0) against its standard error: shown beyond two standard
    errors, refuted beyond two in the other direction, else the direction only or not even that."""
    if gain > 2 * se:
        return "shown"
    if gain < -2 * se:
        return "refuted"
    return "direction only" if gain > 0 else "not shown"


def claims_tables(per_video):
    """Markdown: per claim (CLAIMS), each pair and measure with both settings' mean ± standard error over their
    videos, the difference in the claimed direction ± its standard error (independent samples), and the verdict;
    then one summary line per claim. per_video: setting -> [video_measures dicts] (all seeds' videos)."""
    out = []
    for claim, pairs in CLAIMS:
        pairs = [(a, b) for a, b in pairs if a in per_video and b in per_video]
        if not pairs:
            continue
        lines = [f"**Claim: {claim}.**", "", "| better | worse | measure | better | worse | difference, claimed "
                 "direction | verdict |", "|---|---|---|---|---|---|---|"]
        verdicts = []
        for a, b in pairs:
            for key, (what, scale, sign) in MEASURES.items():
                (ma, sa), (mb, sb) = mean_se([m[key] for m in per_video[a]]), mean_se([m[key] for m in per_video[b]])
                gain, se = sign * (ma - mb), float(np.hypot(sa, sb))
                verdicts.append(verdict(gain, se))
                lines.append(f"| {a} | {b} | {what} | {scale * ma:.1f} ± {scale * sa:.1f} | {scale * mb:.1f} ± "
                             f"{scale * sb:.1f} | {scale * gain:+.1f} ± {scale * se:.1f} | {verdicts[-1]} |")
        summary = ", ".join(f"{v} {verdicts.count(v)}" for v in ("shown", "direction only", "not shown", "refuted")
                            if v in verdicts)
        out.append("\n".join(lines) + f"\n\nOf {len(verdicts)} measures: {summary}.")
    return "\n\n".join(out)


def curve_bands(curves, key, lo=0.0, hi=None):
    """Per setting, per window: the mean over its videos and a band of two standard errors, kept within the
    quantity's range [lo, hi] -> plot_lines' points with "lo" and "hi". curves: setting -> [video_curves]."""
    out = {}
    for label, videos in curves.items():
        out[label] = []
        for k in range(len(videos[0])):
            m, se = mean_se([v[k][key] for v in videos])
            se = 0.0 if np.isnan(se) else se
            out[label].append({"end": videos[0][k]["end"], key: m, "lo": max(m - 2 * se, lo),
                               "hi": m + 2 * se if hi is None else min(m + 2 * se, hi)})
    return out


def strip(path, video, every=drift.WINDOW):
    """One row of frames 0, every, 2*every, ... and the last of a uint8 video (T,H,W,3), as a PNG."""
    data.write_grid(path, np.asarray(video)[None, list(range(0, len(video), every)) + [len(video) - 1]])  # (1,F,H,W,3)


def write_page(out, head, tables, settings, real_dir, plots):
    """OUT/index.html: per setting (and real videos) the first video and a strip of frames every window, side by
    side; the drift curves; the tables (study.md)."""
    rows = ""
    for label, folder in [(REAL, real_dir)] + settings:
        rows += (f"<tr><td>{html.escape(label)}</td><td>"
                 + sample.html_figure(out, os.path.join(folder, "long_000.mp4"), "the first video", width=128)
                 + "</td><td>" + sample.html_figure(out, os.path.join(folder, "strip.png"), "frames 0, 128, ...")
                 + "</td></tr>\n")
    figures = "".join(sample.html_figure(out, p, what, width=480) for p, what in plots)
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Long videos (§4.4)</title>\n"
            "<style>body{font-family:sans-serif;max-width:1300px;margin:auto}img,video{max-width:100%;"
            "image-rendering:pixelated}figure{display:inline-block;margin:4px}td{padding:2px 8px}</style>"
            "</head><body>\n<h1>Long videos as whole videos (§4.4, Fig. 6-7)</h1>\n"
            f"<p>{html.escape(head)}</p>\n<table>{rows}</table>\n<h2>Drift curves (mean ± 2 standard errors over the "
            f"videos)</h2>\n{figures}\n<h2>Tables</h2>\n<pre>{html.escape(tables)}</pre>\n</body></html>\n")
    with atomic_path(os.path.join(out, "index.html")) as tmp, open(tmp, "w") as f:
        f.write(page)


def long_videos(argv):
    """The long-video settings of §4.4 (Fig. 6-7), --seeds runs of --n videos each, judged as whole videos.

    python study.py long --pred runs/demo/pred.pt --interp runs/demo/interp.pt \\
        --ar-pred runs/demo-ar/pred.pt --frames 1024 --n 16 --seeds 3 [--i3d PATH]

    Every setting's videos are sampled once into OUT/SETTING/seed-S/long.npy (sample.py); a run folder that
    holds them already is read, not sampled again (delete it to redo it), so an interrupted study resumes.
    Then, per video: persistence (drift.py) and the drift curves per --window frames (clip_records,
    video_curves); per claim of the paper (CLAIMS) a table of differences with standard errors over the
    videos and a verdict; per point the synthetic score and, with --i3d, FVD (fvd.fvd_curve).
    Writes OUT/study.csv (setting, seed, point), OUT/videos.csv (one row per video), OUT/study.md, the curves
    OUT/study-*.png and OUT/index.html (a video and a strip per setting next to real videos, curves, tables)."""
    p = argparse.ArgumentParser(prog="study.py long", description=long_videos.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="prediction model on sparse latents (--gap 4)")
    p.add_argument("--interp", required=True)
    p.add_argument("--ar-pred", help="prediction model on consecutive latents (--gap 1); needed by the "
                   "autoregressive settings")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"), help="I3D weights; without them no FVD")
    p.add_argument("--frames", type=int, default=1024); p.add_argument("--n", type=int, default=16)
    p.add_argument("--real-n", type=int, default=256, help="real synthetic clips for the FVD reference")
    p.add_argument("--steps", type=int, default=hierarchical.LONG_VIDEO_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=hierarchical.DDIM_ETA, help="DDIM eta")
    p.add_argument("--seeds", default="3", help="independent runs per setting: a count (seeds SEED, SEED+1, ...) or "
                   "a comma-separated list of seeds (e.g. 0,2)")
    p.add_argument("--window", type=int, help=f"frames per point of the curves, a multiple of {drift.CLIP} (default "
                   f"{drift.WINDOW}, or half of --frames if less); the first and last window are the tables' first and last")
    p.add_argument("--threads", type=int, help="sample.py --threads")
    p.add_argument("--keep-first", type=int, help="sample.py --keep-first, for every setting")
    p.add_argument("--only", action="append", choices=sorted(STUDY), help="run only these settings (repeatable)")
    p.add_argument("--out", default="runs/study")
    args = p.parse_args(argv)
    settings = {name: v for name, v in STUDY.items() if not args.only or name in args.only}
    args.window = args.window or min(drift.WINDOW, args.frames // 2)
    try:
        seeds = ([int(x) for x in args.seeds.split(",") if x] if "," in args.seeds else
                 list(range(args.seed, args.seed + int(args.seeds))))
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        p.error(f"--seeds takes a count of 1 or more or a comma-separated list of distinct seeds (one seed: "
                f"'2,'), not {args.seeds!r}")
    if any(mode == "autoregressive" for mode, _, _ in settings.values()) and not args.ar_pred:
        p.error("the autoregressive settings need --ar-pred (a pred model trained with --gap 1), or pick "
                "settings with --only hierarchical")
    if args.window % drift.CLIP or not 2 * drift.CLIP <= args.window <= args.frames // 2:
        p.error(f"--window must be a multiple of {drift.CLIP} between {2 * drift.CLIP} and half of --frames")
    model = fvd.load_i3d(args.i3d) if args.i3d else None
    os.makedirs(args.out, exist_ok=True)
    size = sample.load_model(args.pred, "cpu")[2]["size"]
    real_feats = None
    if model is not None:
        real_ds = balls.SyntheticVideos(n=args.real_n, frames=16, size=size, split="test")
        real = np.stack([data.to_uint8(real_ds[i][None])[0] for i in range(len(real_ds))])  # N x (16,H,W,3)
        real_feats = fvd.i3d_features(real, model, progress=True, desc="real clips")
    labels = {name: f"{name} (s={s}, w={w})" for name, (_, s, w) in settings.items()}
    points, rows, per_video, curves, video_rows = {}, [], {}, {}, []
    for seed in seeds:  # seed by seed, so an interrupted study has every setting's first seeds
        for name, (mode, s, w) in settings.items():
            out = run_folder(args.out, name, seed)
            path = os.path.join(out, "long.npy")
            if not os.path.exists(path):
                ckpt = args.pred if mode == "hierarchical" else args.ar_pred
                sample.main(["--ckpt", ckpt, "--interp", args.interp, "--mode", mode, "--frames", str(args.frames),
                             "--n", str(args.n), "--batch-size", str(args.n), "--steps", str(args.steps),
                             "--eta", str(args.eta), "--cond-noise", str(s), "--guidance", str(w), "--seed", str(seed),
                             "--out", out] + (["--threads", str(args.threads)] if args.threads else [])
                            + (["--keep-first", str(args.keep_first)] if args.keep_first else []))
            videos = np.load(path, mmap_mode="r")
            if videos.shape[:2] != (args.n, args.frames):
                raise UserError(f"{path} holds {videos.shape[0]} videos of {videos.shape[1]} frames, not {args.n} of "
                                f"{args.frames}; delete {out} or pass another --out.")
            pts = (fvd.fvd_curve(real_feats, videos, model, pool=args.window // drift.CLIP) if model is not None else
                   [dict(c, fvd=float("nan"), kvd=float("nan"))
                    for c in fvd.curve_points(args.frames, pool=args.window // drift.CLIP)])
            st = os.stat(path)
            records = cached_records(os.path.join(out, "clips.json"), videos, [st.st_size, st.st_mtime_ns])
            measured = [video_measures(v, r, args.window) for v, r in zip(videos, records)]
            for k, c in enumerate(pts):  # per point: the same frames' clips, over the videos
                ws = drift.window_stats(records, c["start"], c["end"])
                c.update(score=float(np.mean([m[1][k]["score"] for m in measured])), balls=ws["balls_mean"],
                         speed=ws["speed"], keeps_first=float(np.mean([m[1][k]["keeps_first"] for m in measured])),
                         background=float(np.mean([m[1][k]["background"] for m in measured])))
                rows.append([labels[name], seed, c["clip"], c["start"], c["end"], f"{c['fvd']:.3f}", f"{c['kvd']:.5f}",
                             f"{c['score']:.4f}", f"{c['balls']:.4f}", f"{c['speed']:.5f}", f"{c['keeps_first']:.4f}",
                             f"{c['background']:.3f}"])
            points.setdefault(labels[name], []).append(pts)
            per_video.setdefault(name, []).extend(m for m, _ in measured)
            curves.setdefault(labels[name], []).extend(c for _, c in measured)
            video_rows += [[name, seed, i] + [f"{m[key]:.4f}" for key in MEASURES] for i, (m, _) in enumerate(measured)]
            if seed == seeds[0] and not os.path.exists(os.path.join(out, "strip.png")):
                strip(os.path.join(out, "strip.png"), videos[0], args.window)
            print(labels[name], f"seed {seed}:", " ".join(f"{100 * c['score']:.0f}%/{100 * c['keeps_first']:.0f}%"
                                                           for c in pts), flush=True)
    # The reference: as many real videos of the same length (the test split), measured the same way.
    real_dir = os.path.join(args.out, "real")
    os.makedirs(real_dir, exist_ok=True)
    reals = drift.real_videos(args.n * len(seeds), args.frames, videos.shape[2])
    records = cached_records(os.path.join(real_dir, "clips.json"), reals, list(reals.shape))
    measured = [video_measures(v, r, args.window) for v, r in zip(reals, records)]
    per_video[REAL], curves[REAL] = [m for m, _ in measured], [c for _, c in measured]
    video_rows += [[REAL, "-", i] + [f"{m[key]:.4f}" for key in MEASURES] for i, (m, _) in enumerate(measured)]
    strip(os.path.join(real_dir, "strip.png"), reals[0], args.window)
    sample.write_one(os.path.join(real_dir, "long_000"), reals[0], 8, long=True)
    for name, table in (("study.csv", [["setting", "seed", "clip", "start", "end", "fvd", "kvd", "score", "balls",
                                         "speed", "keeps_first", "background"]] + rows),
                        ("videos.csv", [["setting", "seed", "video"] + list(MEASURES)] + video_rows)):
        with atomic_path(os.path.join(args.out, name)) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(table)
    whole = {label: [{k: float(np.mean([m[k] for m in per_video[name][i * args.n:(i + 1) * args.n]])) for k in MEASURES}
                     for i in range(len(seeds))] for name, label in {**labels, REAL: f"{REAL} ({args.n} a seed)"}.items()}
    table = "\n\n".join([whole_table(whole), claims_tables(per_video)] + [study_table(points, *t) for t in (
        ("score", "synthetic score per 16-frame clip (%)", 100.0), ("balls", "balls per 16-frame clip", 1.0, 2),
        ("keeps_first", "clips showing the first clip's balls (%)", 100.0))] + (
        [study_table(points, "fvd", "FVD", 1.0)] if model is not None else []))
    head = (f"{args.n} videos x {args.frames} frames per seed, {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
            f"DDIM-{args.steps} (eta {args.eta:g}); a point is {args.window} frames (its 16-frame clips, every video)"
            + (f", FVD against {args.real_n} real clips" if model is not None else "")
            + f"; standard errors over the {args.n * len(seeds)} videos of a setting.")
    with atomic_path(os.path.join(args.out, "study.md")) as tmp, open(tmp, "w") as f:
        f.write(head + "\n\n" + table + "\n")
    plots = []
    for key, what, hi in (("keeps_first", "share of clips showing the first clip's balls", 1.0),
                          ("background", "background's distance from the first window (/255)", None),
                          ("score", "share of 16-frame clips passing ball_check", 1.0),
                          ("balls", "balls per 16-frame clip", None)):
        png = os.path.join(args.out, f"study-{key}.png")
        plot_lines(png, curve_bands(curves, key, hi=hi), f"{what}: mean ± 2 standard errors over the videos", y_key=key,
                   x_label=f"frame (end of each {args.window}-frame window)", y_label=what.split(" (")[0])
        plots.append((png, what))
    write_page(args.out, head, table, [(labels[n], run_folder(args.out, n, seeds[0])) for n in settings], real_dir,
               plots)
    print(head + "\n\n" + table)
    print(f"wrote {args.out}/study.csv, videos.csv, study.md, study-*.png and index.html")


def _cell(values, scale=1.0, digits=1):
    """mean ± sample standard deviation (ddof=1) of per-seed values, or the one value."""
    v = scale * np.asarray(values, np.float64)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def whole_table(whole):
    """Markdown: per setting, drift.persistence of its videos (the mean over the videos of a seed), mean ±
    standard deviation over the seeds."""
    lines = ["the videos as whole videos (drift.py; mean over the videos of a seed, then mean ± std over the "
             "seeds):", "", "| setting | same balls in the next clip (%) | first clip's balls (%) | "
             "background change, first vs last 128 frames (/255) |", "|---|---|---|---|"]
    for label, seeds in whole.items():
        lines.append(f"| {label} | {_cell([s['same_next'] for s in seeds], 100)} | "
                     f"{_cell([s['keeps_first'] for s in seeds], 100)} | "
                     f"{_cell([s['background_change'] for s in seeds])} |")
    return "\n".join(lines)


def study_table(curves, key, what, scale, digits=1):
    """Markdown: per setting, each point's mean ± standard deviation over the seeds (ddof=1 when there are
    several), and the last point minus the first, whose spread is taken over the seeds' own differences."""
    first = next(iter(curves.values()))[0]
    head = "| setting | " + " | ".join(f"{c['start'] + 1}–{c['end']}" for c in first) + " | last − first |"
    lines = [f"{what}:", "", head, "|---" * (len(first) + 2) + "|"]
    cell = lambda values: _cell(values, scale, digits)

    for label, seeds in curves.items():
        cells = [cell([pts[k][key] for pts in seeds]) for k in range(len(first))]
        cells.append(cell([pts[-1][key] - pts[0][key] for pts in seeds]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- where hierarchical videos fail
def key_detections(chunks):
    """The keyframes of one video, chunks of uint8 (f,H,W,3) (each keyframe latent decoded by itself), each
    detected once -> [(balls.ball_check's (passed, reason), the ball colours seen)] per keyframe."""
    out = []
    for chunk in chunks:
        found = balls.find_balls(chunk)
        out.append((balls.ball_check(chunk, found=found), frozenset(balls.video_attributes(chunk, found=found)["colours"])))
    return out


def key_check(detections):
    """Keyframes alone, key_detections of one video -> (passed, reason). They pass when each passes
    balls.ball_check and all show the same ball colours: the identities a video keeps between frames `gap`
    latents apart. Reasons: the first failing keyframe's ball_check reason, or "the colours change between
    keyframes"."""
    why = next((why for (ok, why), _ in detections if not ok), None)
    if why is not None:
        return False, why
    return (True, "ok") if len({c for _, c in detections}) == 1 else (False, "the colours change between keyframes")


def key_background_change(chunks, m=4):
    """How far a keyframe sequence's background moved (drift.background_change) between its first and its last m
    keyframes (at most half of them), chunks of uint8 (f,H,W,3). The median over m keyframes far apart removes
    the balls that cross the border in one of them."""
    m = max(1, min(m, len(chunks) // 2))
    return drift.background_change(np.concatenate(chunks[:m]), np.concatenate(chunks[-m:]))


def keyframes(argv):
    """Where hierarchical sampling (§3.3) loses quality: the prediction model's keyframes, or the interpolation
    between them? On --n held-out synthetic clips, the synthetic score per 16-frame clip of the first
    --frames frames of
      * the autoencoder's reconstructions (the ceiling of everything below),
      * real keyframes (every gap-th latent of the encoded clip) infilled by --interp (hierarchical.infill),
      * --pred's keyframes (its first clip unconditional, then autoregressive) infilled by --interp, which is
        hierarchical sampling itself;
    and the keyframes alone, real and predicted, each keyframe latent decoded by itself (key_check), with
    the share of keyframes that pass ball_check and of consecutive keyframes that show the same colours,
    and how far the background moved from the first keyframes to the last (key_background_change).

    python study.py keyframes --pred runs/demo/pred.pt --interp runs/demo/interp.pt --n 32"""
    p = argparse.ArgumentParser(prog="study.py keyframes", description=keyframes.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="prediction model (--stage pred; any --gap)")
    p.add_argument("--interp", help="interpolation model with the same gap; without it, the keyframe rows only")
    p.add_argument("--vae", help="autoencoder (default: the one --pred records)")
    p.add_argument("--n", type=int, default=32); p.add_argument("--frames", type=int, default=64)
    p.add_argument("--steps", type=int, default=hierarchical.LONG_VIDEO_STEPS)
    p.add_argument("--eta", type=float, default=hierarchical.DDIM_ETA)
    p.add_argument("--cond-noise", type=int, default=100); p.add_argument("--guidance", type=float, default=0.1)
    p.add_argument("--k", type=int, default=1, help="keyframes each prediction step conditions on (sample.py --k)")
    p.add_argument("--keep-first", type=int, help="sample.py --keep-first (default: k, as hierarchical sampling)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    net, gd, targs = sample.load_model(args.pred, "cpu")
    if targs["stage"] != "pred":
        p.error(f"--pred {args.pred} is a '{targs['stage']}' checkpoint; pass one from --stage pred")
    ae = sample.load_decoder(targs, args.vae, "cpu")
    c, ft, hw = sample.latent_shape(net, targs, ae)
    gap, n_lat = targs["gap"], args.frames // ft
    if args.frames % (16 * gap * ft // np.gcd(16, gap * ft)):
        p.error(f"--frames must be a multiple of 16 and of gap x ft = {gap * ft}")
    interp = None
    if args.interp:
        interp, _, iargs = sample.load_model(args.interp, "cpu")
        if iargs["stage"] != "interp" or iargs["gap"] != gap:
            p.error(f"--interp must be an interp checkpoint with gap {gap}; got stage {iargs['stage']} gap {iargs['gap']}")
    n_key = n_lat // gap + 1                                       # keyframes 0, gap, ..., n_lat: the last pair's end
    real = balls.SyntheticVideos(n=args.n, frames=(n_lat + gap) * ft, size=targs["size"], split="test")
    per = lambda frames: max(1, min(8, 2048 // frames))  # clips a batch: 8 up to 256 frames, 1-2 of 1024 (memory)
    with torch.no_grad():
        b = per((n_lat + gap) * ft)
        z = torch.cat([ae.encode_latents(torch.stack([real[j] for j in range(i, min(i + b, args.n))]))
                       for i in range(0, args.n, b)])              # (N,c,n_lat+gap,h,w)
        def decode(lat):  # (N,c,l,h,w) -> (N,l*ft,H,W,3)
            b = per(lat.shape[2] * ft)
            return np.concatenate([data.to_uint8(ae.decode_latents(lat[i:i + b])) for i in range(0, len(lat), b)])
        kw = dict(s=args.cond_noise, w=args.guidance, steps=args.steps, eta=args.eta)
        g = lambda: torch.Generator().manual_seed(args.seed)
        pred_keys = hierarchical.keyframes(net, gd, (args.n, c, targs["frames"] // ft, hw, hw), n_key, k=args.k,
                                           generator=g(), keep_first=args.keep_first, **kw)  # (N,c,n_key,h,w)
        real_keys = z[:, :, ::gap][:, :, :n_key]                   # (N,c,n_key,h,w)
        videos = [("reconstructions", decode(z[:, :, :n_lat]))]
        if interp is not None:
            for name, keys in (("real keyframes + interpolation", real_keys),
                               ("predicted keyframes + interpolation (hierarchical)", pred_keys)):
                videos.append((name, decode(torch.cat(list(hierarchical.infill(interp, gd, keys, n_lat, gap=gap,
                                                                                 generator=g(), **kw)), 2))))
        scored = []
        for name, v in videos:  # as whole videos (drift.persistence) where there are two clips or more
            p = drift.mean_persistence(v) if args.frames >= 32 else None
            scored.append((f"{name}, per 16-frame clip",
                           balls.synthetic_score([x[a:a + 16] for x in v for a in range(0, args.frames, 16)]),
                           "– | " + (f"{100 * p['same_next']:.1f}% | {100 * p['keeps_first']:.1f}% | "
                                     f"{p['background_change']:.1f}" if p else "– | – | –")))
        for name, keys in (("real", real_keys), ("predicted", pred_keys)):
            alone = decode(keys.transpose(1, 2).flatten(0, 1)[:, :, None])  # (N,c,K,h,w) -> (N*K,c,1,h,w) -> (N*K,ft,H,W,3)
            alone = alone.reshape(args.n, n_key, *alone.shape[1:])              # (N,K,ft,H,W,3)
            dets = [key_detections(list(video)) for video in alone]
            whys = [key_check(d)[1] for d in dets]
            formed = np.mean([ok for d in dets for (ok, _), _ in d])                    # each keyframe alone
            same = np.mean([a[1] == b[1] for d in dets for a, b in zip(d, d[1:])])      # consecutive keyframes
            first = np.mean([b[1] == d[0][1] for d in dets for b in d[1:]])              # the first keyframe's
            moved = np.mean([key_background_change(list(video)) for video in alone])
            scored.append((f"{name} keyframes alone, {n_key} per video (key_check)",
                           (whys.count("ok") / args.n, {w: whys.count(w) for w in set(whys)}),
                           f"{100 * formed:.1f}% | {100 * same:.1f}% | {100 * first:.1f}% | {moved:.1f}"))
    rows = [f"| {args.n} held-out clips, {args.frames} frames, gap {gap} (keyframes {gap * ft} frames apart), "
            f"DDIM-{args.steps} eta {args.eta:g}, s = {args.cond_noise}, w = {args.guidance:g}, k = {args.k} | pass | "
            "failures "
            "| keyframes that pass ball_check | same colours as the previous clip or keyframe | the first one's "
            "colours | background change (/255): first vs last 4 keyframes, or 128 frames |", "|---|---|---|---|---|---|---|"]
    for name, (share, reasons), columns in scored:
        fails = ", ".join(f"{k}: {n}" for k, n in sorted(reasons.items()) if k != "ok") or "none"
        rows.append(f"| {name} | {100 * share:.1f}% | {fails} | {columns} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- §5 on the built-in captions
def t2v(argv):
    """§5 on the built-in data: text-to-video checkpoints sampled on held-out caption combinations (the
    first --n of the synthetic test split), scored with balls.caption_scores against their prompts, and
    FVD16 against the real clips of those prompts (with --i3d). Per checkpoint one row per --w (text
    guidance), plus "unconditional": the same network given the empty prompt, scored on the same prompts.

    python study.py t2v --ckpt runs/demo-t2v/t2v.pt --n 64 --w 0 --w 2 --i3d i3d-kinetics-400.ckpt"""
    p = argparse.ArgumentParser(prog="study.py t2v", description=t2v.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="image or t2v checkpoint (repeatable)")
    p.add_argument("--n", type=int, default=64); p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eta", type=float, default=hierarchical.DDIM_ETA, help="DDIM eta")
    p.add_argument("--w", type=float, action="append", help="text guidance values (default: 2)")
    p.add_argument("--no-uncond", action="store_true", help="skip the unconditional row")
    p.add_argument("--i3d", default=os.environ.get("LVDM_I3D"))
    p.add_argument("--seed", type=int, default=0); p.add_argument("--out", default="runs/bench-t2v")
    args = p.parse_args(argv)
    size = load_checkpoint(args.ckpt[0])["train_args"]["size"]
    items, prompts = balls.held_out_captions(args.n)
    ds = balls.SyntheticVideos(n=items[-1] + 1, frames=16, size=size, split="test")
    os.makedirs(args.out, exist_ok=True)
    prompt_file = os.path.join(args.out, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    i3d_model = fvd.load_i3d(args.i3d) if args.i3d else None
    real = np.stack([ds.render(i) for i in items])                              # (n,16,H,W,3)
    real_feats = fvd.i3d_features(real, i3d_model) if i3d_model else None
    rows = ["| checkpoint | step | samples | caption accuracy | balls | colours | speed | background | "
            "captioned colours seen | FVD16 |", "|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, step, setting, videos):
        s = balls.caption_scores(videos, prompts)
        f = fvd.frechet_distance(real_feats, fvd.i3d_features(videos, i3d_model)) if i3d_model else float("nan")
        rows.append(f"| {name} | {step} | {setting} | {100 * s['ok']:.1f}% | {100 * s['balls']:.1f}% | "
                    f"{100 * s['colours']:.1f}% | {100 * s['speed']:.1f}% | {100 * s['background']:.1f}% | "
                    f"{100 * s['named']:.1f}% | {f:.0f} |")
        print(rows[-1], flush=True)

    other = balls.SyntheticVideos(n=args.n, frames=16, size=size, split="train")
    row("real clips of other captions", "-", "training clips", np.stack([other.render(i) for i in range(args.n)]))
    row("real clips of these captions", "-", "their own clips", real)
    for k, ckpt in enumerate(args.ckpt):
        step = load_checkpoint(ckpt).get("step")
        settings = [(f"text, w={w:g}", ["--prompts", prompt_file, "--text-guidance", str(w)]) for w in (args.w or [2.0])]
        if not args.no_uncond:
            settings.append(("unconditional (empty prompt)", ["--prompt", "", "--text-guidance", "0"]))
        for setting, extra in settings:
            out = os.path.join(args.out, f"{k}-" + os.path.basename(ckpt).replace(".pt", ""), setting.split(" ")[0] + extra[-1])
            sample.main(["--ckpt", ckpt, "--n", str(args.n), "--steps", str(args.steps), "--eta", str(args.eta),
                         "--seed", str(args.seed), "--npz", "--out", out, *extra])
            row(os.path.basename(ckpt), step, setting, np.load(os.path.join(out, "samples.npz"))["arr_0"])
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the measures themselves
def psnr(argv):
    """Held-out reconstruction PSNR of any autoencoder checkpoint: --n-score synthetic test clips of --frames
    frames at the size it was trained on (mean and std over clips); --npz also writes its reconstructions of
    as many training clips, the fake side of its FVD floor."""
    p = argparse.ArgumentParser(prog="study.py psnr", description=psnr.__doc__)
    p.add_argument("--vae", required=True, help="an autoencoder checkpoint")
    p.add_argument("--n-score", type=int, default=256); p.add_argument("--frames", type=int, default=16)
    p.add_argument("--npz", help="also write its reconstructions of --n-score training clips here (for fvd.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model = vae.load_vae(args.vae, args.device)
    size = load_checkpoint(args.vae).get("train_args", {}).get("size", 64)

    def clips(split):  # the first --n-score synthetic clips of a split, (N,3,T,H,W)
        ds = balls.SyntheticVideos(n=args.n_score, frames=args.frames, size=size, split=split)
        return torch.stack([ds[i] for i in range(len(ds))])

    x = clips("test")
    p = vae.psnr(vae.reconstruct(model, x, args.device), x)
    line = (f"{args.vae}: {p.mean():.2f} dB ± {p.std():.2f} over {len(x)} held-out synthetic clips of "
            f"{args.frames} frames at {size}² (fs={model.fs}, ft={model.ft}, {model.cfg.z_channels} latent channels)")
    if args.npz:  # the FVD floor: reconstructions of the training clips fvd.py's reference row uses
        rec = vae.reconstruct(model, clips("train"), args.device)
        data.save_npz(args.npz, data.to_uint8(rec))
        line += (f"\nreconstructions of {len(rec)} training clips -> {args.npz}: pass them to `python fvd.py --real "
                 f"synthetic --fake {args.npz} --n {len(rec)} --runs 1`, the FVD no model on these latents can beat")
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"long": long_videos, "keyframes": keyframes, "t2v": t2v, "psnr": psnr}
    if not argv or argv[0] not in commands:
        raise UserError(f"name a study: python study.py {{{','.join(commands)}}} ... (python study.py long --help)")
    table = commands[argv[0]](argv[1:])
    if table:
        print(table)


if __name__ == "__main__":
    main_guard(main)
