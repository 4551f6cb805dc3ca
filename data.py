"""Data for LVDM: find videos on disk, sample clips, the built-in synthetic dataset, video I/O.

Training clips are float tensors (3,T,H,W) in [-1,1]; the default collate stacks them into
(B,3,T,H,W). On disk and for FVD, videos are uint8 (N,T,H,W,3).

Layouts found under ROOT (the ones LVDM, TATS, StyleGAN-V, DIGAN, PVDM and FOMM exports use):
  * a folder that directly holds image frames is one video (even if it is named `x.mp4`);
    frames are read in natural order (frame2 before frame10);
  * a video file: .mp4 .avi .webm .mkv .mov (needs PyAV: `pip install av`) or .gif;
  * a StyleGAN-V .zip of frame folders (members read with zipfile, opened lazily per worker);
  * optional split folders train/ test/ (aliases val, sky_train, sky_test); split="all" is
    train + test; without split folders every split is everything;
  * any nesting (UCF-101 train/ClassName/video/frames): leaves are searched recursively.
Dotfiles and `_broken_clips` are skipped. Video-file frame counts are cached in
~/.cache/lvdm/index-<hash of root>.json (`cache_dir=` or env LVDM_CACHE move it).

Commands:
  python data.py prepare SRC DST --size 256        # videos -> JPEG frame folders (resumable)
  python data.py preview synthetic out.gif --frames 64 --size 64   # look at a dataset
"""

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import multiprocessing
import re
import shutil
import sys
import tempfile
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from common import ArgumentParser, UserError, atomic_path, current_umask, main_guard, positive_int


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif"}
SPLIT_ALIASES = {"train": ("train", "sky_train"), "test": ("test", "val", "sky_test")}
CANONICAL_SPLIT = {alias: name for name, aliases in SPLIT_ALIASES.items() for alias in aliases}
LAYOUTS = ("frame folders (video/000001.jpg), video files (.mp4 .avi .webm .mkv .mov .gif) or "
           "StyleGAN-V .zip archives of frame folders, optionally inside train/ and test/ folders")


def natural_key(name):
    """Sort key that orders 'frame2' before 'frame10' (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _skipped(name):
    return name.startswith(".") or name in ("_broken_clips", "__MACOSX")


def _ext(name):
    return os.path.splitext(name)[1].lower()


def _import_av(what):
    try:
        import av
    except ImportError:
        raise UserError(f"{what} needs PyAV: run `pip install av`, or convert the videos to frame "
                        f"folders with `python data.py prepare SRC DST --size 256`.") from None
    return av


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        example = {"size": 256, "frames": 16}.get(name, 1)
        raise UserError(f"{name} must be a positive integer (got {value!r}); pass e.g. --{name} {example}.")


# ----------------------------------------------------------------------------- finding videos
# A video source is a tuple (kind, path, members):
#   ("dir", folder, None)        frames are the images in the folder (listed again when read)
#   ("zip", archive, (names...)) frames are these members of the archive, in natural order
#   ("file", path, None)         a video file decoded with PyAV (or Pillow for .gif)

def _zip_sources(archive, top=None):
    """Frame folders inside a .zip; `top` keeps only members under that top-level folder."""
    folders = {}
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            parts = name.rstrip("/").split("/")
            if name.endswith("/") or any(_skipped(p) for p in parts) or _ext(name) not in IMAGE_EXTS:
                continue
            if top is not None and parts[0] != top:
                continue
            folders.setdefault("/".join(parts[:-1]), []).append(name)
    return [("zip", archive, tuple(sorted(names, key=natural_key)))
            for folder, names in sorted(folders.items(), key=lambda kv: natural_key(kv[0]))]


def find_videos(folder):
    """All video sources under `folder` (a folder, a .zip or a single video file), sorted."""
    if os.path.isfile(folder):
        if _ext(folder) == ".zip":
            return _zip_sources(folder)
        return [("file", folder, None)] if _ext(folder) in VIDEO_EXTS else []
    sources = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted((d for d in dirnames if not _skipped(d)), key=natural_key)
        names = sorted((f for f in filenames if not _skipped(f)), key=natural_key)
        if any(_ext(f) in IMAGE_EXTS for f in names):
            sources.append(("dir", dirpath, None))  # a frame folder is a leaf: do not descend
            dirnames[:] = []
            continue
        for f in names:
            path = os.path.join(dirpath, f)
            if _ext(f) in VIDEO_EXTS:
                sources.append(("file", path, None))
            elif _ext(f) == ".zip":
                sources.extend(_zip_sources(path))
    return sources


def _split_entries(root):
    """{canonical split: [paths]} for split folders (or split .zip files / top-level zip folders)."""
    found = {}
    if os.path.isdir(root):
        for name in sorted(os.listdir(root), key=natural_key):
            stem = name[:-4] if name.lower().endswith(".zip") else name
            split = CANONICAL_SPLIT.get(stem.lower())
            path = os.path.join(root, name)
            if split and not _skipped(name) and (os.path.isdir(path) or name.lower().endswith(".zip")):
                found.setdefault(split, []).append(path)
    elif _ext(root) == ".zip":
        with zipfile.ZipFile(root) as zf:
            tops = sorted({n.split("/")[0] for n in zf.namelist() if "/" in n})
        for top in tops:
            if CANONICAL_SPLIT.get(top.lower()):
                found.setdefault(CANONICAL_SPLIT[top.lower()], []).append((root, top))
    return found


def find_split(root, split):
    """Video sources of one split ("train", "test", their aliases, or "all") under root."""
    if not os.path.exists(root):
        raise UserError(f"data root {root} does not exist; pass --data PATH to a folder of videos "
                        f"(or --data synthetic for the built-in dataset).")
    want = split.lower()
    if want != "all" and want not in CANONICAL_SPLIT:
        raise UserError(f"unknown split {split!r}; use train, test (or val), or all.")
    entries = _split_entries(root)
    if not entries:  # no split folders: every split is everything
        return find_videos(root)
    names = ["train", "test"] if want == "all" else [CANONICAL_SPLIT[want]]
    if not any(n in entries for n in names):
        raise UserError(f"split {split!r} not found under {root} (it has {', '.join(sorted(entries))}); "
                        f"pass --split with one of those, or all.")
    sources = []
    for n in names:
        for entry in entries.get(n, []):
            sources += _zip_sources(*entry) if isinstance(entry, tuple) else find_videos(entry)
    return sources


# ----------------------------------------------------------------------------- reading frames
def _count_file_frames(path):
    """Frames in a video file, or -1 when it cannot be read. Counts demuxed packets (fast) after
    decoding the first frame; GIFs are counted with Pillow."""
    try:
        if _ext(path) == ".gif":
            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        av = _import_av(f"reading {path}")
        with av.open(path) as container:
            next(container.decode(video=0))  # raises when nothing decodes
        with av.open(path) as container:
            return sum(1 for p in container.demux(video=0) if p.size > 0)
    except UserError:
        raise
    except Exception:
        return -1


def frame_names(folder):
    """Image files of a frame folder in natural order (dotfiles skipped)."""
    return sorted((f for f in os.listdir(folder) if not _skipped(f) and _ext(f) in IMAGE_EXTS), key=natural_key)


def iter_frames(source, keep=None):
    """Yield the frames of a video source in order as PIL RGB images (decoding sequentially);
    with a set `keep`, frames whose index is not in it are yielded as None without conversion."""
    kind, path, members = source
    if kind in ("dir", "zip"):
        zf = zipfile.ZipFile(path) if kind == "zip" else None
        for k, name in enumerate(members if kind == "zip" else frame_names(path)):
            if keep is not None and k not in keep:
                yield None
                continue
            with Image.open(io.BytesIO(zf.read(name)) if zf else os.path.join(path, name)) as im:
                yield im.convert("RGB")
    elif _ext(path) == ".gif":
        with Image.open(path) as im:
            for k in range(getattr(im, "n_frames", 1)):
                im.seek(k)  # GIF frames are deltas: seek walks through every frame anyway
                yield im.convert("RGB") if keep is None or k in keep else None
    else:  # decode from the start: seeking by pts returns wrong frames on some AVIs
        av = _import_av(f"reading {path}")
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for k, frame in enumerate(container.decode(stream)):
                yield frame.to_image() if keep is None or k in keep else None


def resize_center_crop(img, size):
    """Antialiased resize of the short side to `size`, then a centered size x size crop, as one
    PIL resize of the centered square box (bicubic, reducing_gap for speed on large frames)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)


def resize_short_side(img, size):
    """Resize so the short side is `size`, keeping the aspect ratio (used by `prepare`)."""
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                      reducing_gap=3.0)


def _uint8_to_clip(frames, flip):
    """uint8 (T,H,W,3) -> float (3,T,H,W) in [-1,1]; flip mirrors every frame left-right."""
    x = np.stack(frames)
    if flip:
        x = x[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(3, 0, 1, 2)  # (T,H,W,3) -> (3,T,H,W)
    return x.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- VideoDataset
def _cache_path(root, cache_dir):
    cache_dir = cache_dir or os.environ.get("LVDM_CACHE") or os.path.join("~", ".cache", "lvdm")
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir), f"index-{digest}.json")


class VideoDataset(torch.utils.data.Dataset):
    """Clips of `frames` frames, `stride` apart, from the videos of one split under `root`.

    Item i is a float tensor (3,frames,size,size) in [-1,1]. Its start frame (and flip) are a pure
    function of (seed, epoch, i) through numpy.random.default_rng([seed, epoch, i]), so the same
    item in any worker or after a resume is the same clip; call set_epoch(epoch) every epoch. With
    random_start=False the start comes from default_rng([seed, i]) and ignores the epoch.
    Frame indices are start + stride*k, k = 0..frames-1 (the public LVDM loader ignores its stride).
    Videos shorter than the span stride*(frames-1)+1 and unreadable video files are skipped and
    counted (num_short, num_unreadable); both counts are printed once.
    """

    def __init__(self, root, frames, size, stride=1, split="train", random_start=True, flip=False,
                 seed=0, cache_dir=None, verbose=True, captions=None):
        for name, value in (("size", size), ("frames", frames), ("stride", stride)):
            _check_size(name, value)
        self.root, self.frames, self.size, self.stride = str(root), int(frames), int(size), int(stride)
        self.split, self.random_start, self.flip, self.seed, self.epoch = split, random_start, flip, seed, 0
        self.span = self.stride * (self.frames - 1) + 1
        sources = find_split(self.root, split)
        if not sources:
            raise UserError(f"no videos found under {self.root}; accepted layouts are {LAYOUTS}.")
        if any(s[0] == "file" and _ext(s[1]) != ".gif" for s in sources):
            _import_av(f"reading the video files under {self.root}")
        self.cache_file = _cache_path(self.root, cache_dir)
        counts = self._frame_counts(sources)
        self.num_unreadable = sum(1 for n in counts if n < 0)
        self.num_short = sum(1 for n in counts if 0 <= n < self.span)
        keep = [i for i, n in enumerate(counts) if n >= self.span]
        self.videos = [sources[i] for i in keep]
        self.num_frames = [counts[i] for i in keep]
        if not self.videos:
            raise UserError(f"all {len(sources) - self.num_unreadable} readable videos under {self.root} are "
                            f"shorter than {self.span} frames ({self.frames} frames at stride {self.stride}); "
                            f"lower --frames or --stride.")
        self.captions, self.num_uncaptioned = None, 0
        if captions is not None:  # §5: keep the videos that have a caption, count the others
            found = [caption_for(self.root, path, captions) for _, path, _ in self.videos]
            keep = [i for i, c in enumerate(found) if c]
            self.num_uncaptioned = len(found) - len(keep)
            if not keep:
                raise UserError(f"none of the {len(found)} videos under {self.root} has a caption in "
                                f"{captions}; check that its paths are relative to the dataset root.")
            self.videos, self.num_frames = [self.videos[i] for i in keep], [self.num_frames[i] for i in keep]
            self.captions = [found[i] for i in keep]
        self._zips, self._zips_pid = {}, None
        self.unreadable = torch.zeros(len(self.videos), dtype=torch.uint8).share_memory_()  # see __getitem__
        if verbose:
            print(f"data: {len(self.videos)} videos ({split} split of {self.root}), skipped {self.num_short} "
                  f"shorter than {self.span} frames ({self.frames} frames at stride {self.stride}), "
                  f"{self.num_unreadable} unreadable" +
                  (f", {self.num_uncaptioned} without a caption" if captions is not None else ""))

    def _frame_counts(self, sources):
        """Frame count per source; video-file counts go through the json index cache, which is
        invalidated per file when its (size, mtime) changes and is written atomically."""
        try:
            with open(self.cache_file) as f:
                cache = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            cache = {}
        counts, changed = [], False
        for kind, path, members in sources:
            if kind == "dir":
                counts.append(len(frame_names(path)))
            elif kind == "zip":
                counts.append(len(members))
            else:
                st = os.stat(path)
                key = os.path.abspath(path)
                entry = cache.get(key)
                if not entry or entry.get("size") != st.st_size or entry.get("mtime") != st.st_mtime_ns:
                    entry = {"size": st.st_size, "mtime": st.st_mtime_ns, "frames": _count_file_frames(path)}
                    cache[key], changed = entry, True
                counts.append(entry["frames"])
        if changed:
            try:
                os.makedirs(os.path.dirname(self.cache_file), exist_ok=True)
                with atomic_path(self.cache_file) as tmp, open(tmp, "w") as f:
                    json.dump({"root": os.path.abspath(self.root), "files": cache}, f)
            except OSError as e:
                print(f"data: could not write the index cache {self.cache_file} ({e}); "
                      f"set LVDM_CACHE to a writable folder to keep it", file=sys.stderr)
        return counts

    def __len__(self):
        return len(self.videos)

    def set_epoch(self, epoch):
        """Call before iter(loader) each epoch (workers copy the dataset then; persistent_workers
        would keep the old epoch)."""
        self.epoch = int(epoch)

    def clip_indices(self, i):
        """(frame indices, flip) of item i: a pure function of (seed, epoch, i)."""
        rng = np.random.default_rng([self.seed, self.epoch, i] if self.random_start else [self.seed, i])
        start = int(rng.integers(0, self.num_frames[i] - self.span + 1))
        flip = bool(self.flip and rng.random() < 0.5)
        return start + self.stride * np.arange(self.frames), flip

    def _zip(self, path):
        """The archive at `path`, opened once per process (each DataLoader worker opens its own)."""
        if self._zips_pid != os.getpid():
            self._zips, self._zips_pid = {}, os.getpid()
        if path not in self._zips:
            self._zips[path] = zipfile.ZipFile(path)
        return self._zips[path]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zips"], state["_zips_pid"] = {}, None
        return state

    def read_clip(self, i):
        """uint8 (T,size,size,3) clip of item i (before flip)."""
        indices, _ = self.clip_indices(i)
        kind, path, members = self.videos[i]
        if kind == "file":  # decode sequentially up to the last frame needed
            out, frames = {}, iter_frames(self.videos[i], keep=set(indices.tolist()))
            with contextlib.closing(frames):
                for k, img in enumerate(frames):
                    if img is not None:
                        out[k] = np.asarray(resize_center_crop(img, self.size))
                    if k >= indices[-1]:
                        break
            return np.stack([out[k] for k in indices])  # KeyError if the file holds fewer frames
        names = members if kind == "zip" else frame_names(path)
        clip = []
        for k in indices:
            with Image.open(io.BytesIO(self._zip(path).read(names[k])) if kind == "zip"
                            else os.path.join(path, names[k])) as im:
                im.draft("RGB", (self.size, self.size))  # JPEG: decode at 1/2, 1/4, 1/8 scale if still >= size
                clip.append(np.asarray(resize_center_crop(im.convert("RGB"), self.size)))
        return np.stack(clip)

    @property
    def skipped(self):
        """Videos found unreadable while training (this process and its DataLoader workers)."""
        return int(self.unreadable.sum())

    def __getitem__(self, i):
        """The clip of item i; an unreadable video (broken frame, truncated file, changed on disk) is
        skipped for the next one, deterministically (so resume stays exact), named once, and counted in
        `skipped` through a shared-memory flag per video that DataLoader workers write too."""
        for attempt in range(len(self.videos)):
            j = (i + attempt) % len(self.videos)
            if self.unreadable[j]:
                continue
            try:
                clip = self.read_clip(j)
            except Exception as e:  # named once: later draws skip it without reading
                self.unreadable[j] = 1
                print(f"data: skipping unreadable {self.videos[j][1]} ({type(e).__name__}: {e}); "
                      f"{self.skipped} of {len(self.videos)} videos skipped so far", file=sys.stderr)
                continue
            clip = _uint8_to_clip(list(clip), self.clip_indices(j)[1])
            return clip if self.captions is None else (clip, self.captions[j])
        raise UserError(f"no video under {self.root} could be read; check the files or run "
                        f"`python data.py prepare SRC DST --size 256`.")


# ----------------------------------------------------------------------------- captions (§5)
def read_captions(path):
    """A caption file -> {video path relative to the dataset root: caption}. CSV with a header naming a
    path column (path, video, videoid, file, filename or name) and a caption column (caption, text,
    name, prompt), as WebVid-style datasets ship it; or JSON lines with the same keys."""
    if not os.path.isfile(path):
        raise UserError(f"caption file {path} does not exist; pass a CSV or JSONL of video path and caption.")
    path_keys, text_keys = ("path", "video", "videoid", "file", "filename", "name"), ("caption", "text", "prompt", "name")
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith((".jsonl", ".json")):
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {e.lineno} is not JSON; write one object per line.") from None
        else:
            rows = list(csv.DictReader(f))
    if not rows or not isinstance(rows[0], dict):
        raise UserError(f"{path} holds no captions; write a header line such as `path,caption`.")
    keys = {k.lower(): k for k in rows[0]}
    p = next((keys[k] for k in path_keys if k in keys), None)
    c = next((keys[k] for k in text_keys if k in keys and keys[k] != p), None)
    if p is None or c is None:
        raise UserError(f"{path} needs a path column ({', '.join(path_keys)}) and a caption column "
                        f"({', '.join(text_keys)}); its columns are {list(rows[0])}.")
    return {os.path.normpath(str(r[p])): str(r[c]).strip() for r in rows if r.get(c) and str(r[c]).strip()}


@functools.lru_cache(maxsize=8)
def _caption_table(path):
    """read_captions(path), each key also without its extension (a frame folder `c/` for `c.mp4`)."""
    table = read_captions(path)
    return {**{os.path.splitext(k)[0]: v for k, v in table.items()}, **table}


def caption_for(root, video_path, captions):
    """The caption of one video: from the caption file `captions` (keyed by the path relative to
    `root`, with or without its extension, or by the bare file name), or "txt" for a .txt file beside
    the video (video.mp4 -> video.txt, a frame folder video/ -> video.txt). None when it has none."""
    rel = os.path.normpath(os.path.relpath(video_path, root))
    if captions == "txt":
        txt = os.path.splitext(video_path.rstrip(os.sep))[0] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                return f.read().strip() or None
        return None
    table = _caption_table(captions)
    stem = os.path.splitext(rel)[0]
    for key in (rel, stem, os.path.basename(stem)):
        if key in table:
            return table[key]
    return None


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
    The demo's size (issue 13's sweeps, README "Results"): the first version had 1-3 balls of radius
    0.08-0.20, eight colours and a background drifting in phase and hue; the demo's then 8x8 latent
    could not hold it (autoencoder 26.2 dB, 37.5% of reconstructions passing ball_check). The second
    moved the balls at 0.02-0.045 frame widths per frame, about a ball radius per latent frame: the
    demo U-Net's samples then changed colour and gained or lost balls between latent frames (4.7% of
    samples passing ball_check), and at the present speed 35.9% after 2500 LVDM steps (70.7% of 256
    after the default 5000, DDIM eta 1). Motion, occlusion and several objects remain.
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


# ----------------------------------------------------------------------------- reading / writing
def to_uint8(x, rounding="round"):
    """float (B,3,T,H,W) in [-1,1] -> numpy uint8 (B,T,H,W,3).

    round: to the nearest level, which recovers the stored bytes of data read by this file.
    truncate: floor((x+1)*255/2), what the public LVDM/TATS evaluation does (fvd.py's `lvdm`
    protocol); it biases every pixel down by half a level and loses one level on 63 byte values."""
    y = (x.detach().float().clamp(-1, 1) + 1) * 127.5
    y = y.floor() if rounding == "truncate" else y.round()
    return y.to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()  # (B,3,T,H,W) -> (B,T,H,W,3)


def save_npz(path, videos):
    """uint8 (N,T,H,W,3) -> npz under key 'arr_0' (what the public LVDM release writes and reads)."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5:
        raise ValueError(f"save_npz wants uint8 (N,T,H,W,3), got {videos.dtype} {videos.shape}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=videos)


def load_npz(path):
    """uint8 videos from an npz: key 'videos', 'arr_0' or the only key."""
    with np.load(path) as z:
        keys = list(z.keys())
        key = next((k for k in ("videos", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise UserError(f"{path} holds {keys}, none of 'videos', 'arr_0'; save it with data.save_npz.")
        return z[key]


def read_video(path):
    """uint8 (T,H,W,3) from a frame folder, .gif, .npz (its first video) or any PyAV video."""
    if not os.path.exists(path):
        raise UserError(f"video {path} does not exist; check the path.")
    if _ext(path) == ".npz":
        return np.asarray(load_npz(path)[0])
    source = ("dir", path, None) if os.path.isdir(path) else ("file", path, None)
    frames = [np.asarray(im) for im in iter_frames(source)]
    if not frames:
        raise UserError(f"{path} holds no frames; check that it is a video or a folder of images.")
    return np.stack(frames)


def write_video(path, frames, fps=8):
    """Write uint8 (T,H,W,3): .gif (Pillow, loops forever; 256 colors per frame, and Pillow merges
    identical consecutive frames), .png (one row of frames), or a PyAV video (.mp4/.mkv/.mov/.avi:
    libx264 yuv420p crf 18, .webm: vp9; odd sizes padded to even by repeating the edge)."""
    if not hasattr(frames, "shape"):  # arrays and array-likes (a lazy frame reader) pass through uncopied
        frames = np.asarray(frames)
    if frames.dtype != np.uint8 or len(frames.shape) != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video wants uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
    ext = _ext(path)
    with atomic_path(path) as tmp:
        if ext == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        elif ext == ".png":
            Image.fromarray(np.concatenate(list(frames), axis=1)).save(tmp)  # (T,H,W,3) -> (H,T*W,3)
        elif ext in VIDEO_EXTS:
            av = _import_av(f"writing {path}")
            T, H, W, _ = frames.shape
            with av.open(tmp, "w") as container:
                stream = container.add_stream("libvpx-vp9" if ext == ".webm" else "libx264", rate=round(fps))
                stream.width, stream.height, stream.pix_fmt = W + W % 2, H + H % 2, "yuv420p"
                if ext != ".webm":
                    stream.options = {"crf": "18"}
                for f in frames:  # frame by frame: a long video is never copied whole
                    f = np.pad(np.asarray(f), ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
                container.mux(stream.encode())
        else:
            raise UserError(f"cannot write {path}: use a .gif, .png, .mp4, .webm, .mkv, .mov or .avi name.")


def write_grid(path, videos, max_frames=None, gap=2):
    """PNG grid of uint8 (N,T,H,W,3): row n = video n, column t = frame t, `gap` white pixels apart."""
    videos = np.asarray(videos)[:, :max_frames]
    N, T, H, W, _ = videos.shape
    grid = np.full((N * H + (N - 1) * gap, T * W + (T - 1) * gap, 3), 255, np.uint8)
    for n in range(N):
        for t in range(T):
            grid[n * (H + gap):n * (H + gap) + H, t * (W + gap):t * (W + gap) + W] = videos[n, t]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# ----------------------------------------------------------------------------- prepare (CLI)
def _prepare_one(job):
    """Convert one source to a frame folder; returns 'done', 'skipped' or an error string."""
    source, dst, size, fmt, quality = job
    if os.path.isdir(dst):
        return "skipped"
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", dir=parent)  # dotfolders are ignored
    try:
        n = 0
        for k, img in enumerate(iter_frames(source)):
            img = resize_short_side(img, size)
            img.save(os.path.join(tmp, f"{k:06d}.{fmt}"), **({"quality": quality} if fmt == "jpg" else {}))
            n += 1
        if n == 0:
            raise ValueError("no frames")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders
        os.replace(tmp, dst)
        return "done"
    except Exception as e:
        return f"{source[1]}: {type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful os.replace


def prepare(src, dst, size=256, layout="preserved", fmt="jpg", quality=95, workers=1):
    """Convert every video under src (any layout) to frame folders under dst, mirroring relative
    paths (layout="flat" keeps only the split folder: dst/train/<video>/000000.jpg, as LVDM's UCF
    loader wants). Atomic per video and resumable: finished videos are skipped."""
    _check_size("size", size)
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist; pass the folder that holds your videos.")
    jobs = []
    for source in find_videos(src):
        kind, path, members = source
        rel = "" if path == src else os.path.relpath(path, src)
        if kind == "zip":  # archive.zip/folder/frames -> archive/folder
            rel = os.path.join(os.path.splitext(rel)[0], os.path.dirname(members[0]))
        elif kind == "file":
            rel = os.path.splitext(rel)[0]
        parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
        parts = parts or [os.path.splitext(os.path.basename(os.path.abspath(src)))[0]]
        if layout == "flat":
            split = [parts[0]] if parts[0].lower() in CANONICAL_SPLIT and len(parts) > 1 else []
            parts = split + [parts[-1]]
        jobs.append((source, os.path.join(dst, *parts), size, fmt, quality))
    if not jobs:
        raise UserError(f"no videos found under {src}; accepted layouts are {LAYOUTS}.")
    if any(j[0][0] == "file" and _ext(j[0][1]) != ".gif" for j in jobs):
        _import_av(f"converting the video files under {src}")
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    results = pool.imap_unordered(_prepare_one, jobs) if pool else map(_prepare_one, jobs)
    stats = {"done": 0, "skipped": 0, "failed": 0}
    for r in tqdm(results, total=len(jobs), desc="prepare"):
        if r in stats:
            stats[r] += 1
        else:
            stats["failed"] += 1
            tqdm.write(f"prepare: unreadable, skipped: {r}", file=sys.stderr)
    if pool is not None:
        pool.close()
    print(f"prepare: {stats['done']} converted, {stats['skipped']} already done, {stats['failed']} unreadable -> {dst}")
    return stats


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="convert videos to frame folders")
    p.add_argument("src"), p.add_argument("dst")
    p.add_argument("--size", type=positive_int, default=256, help="short side in pixels (aspect kept)")
    p.add_argument("--split-layout", choices=["preserved", "flat"], default="preserved")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--quality", type=positive_int, default=95)
    p.add_argument("--workers", type=positive_int, default=1)
    v = sub.add_parser("preview", help="write clips of a dataset as a gif/mp4 (first clip) or png grid")
    v.add_argument("data"), v.add_argument("out")
    v.add_argument("--frames", type=positive_int, default=16), v.add_argument("--size", type=positive_int, default=64)
    v.add_argument("--stride", type=positive_int, default=1), v.add_argument("--split", default="train")
    v.add_argument("--n", type=positive_int, default=4)
    sub.add_parser("throughput", help="moved: python bench.py loader", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "throughput":  # the old spelling of the loader benchmark, which lives in bench.py now
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
        os.execv(sys.executable, [sys.executable, bench, "loader", *rest])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "prepare":
        prepare(args.src, args.dst, args.size, args.split_layout, args.format, args.quality, args.workers)
        return
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
