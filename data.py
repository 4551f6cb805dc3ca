"""Data for LVDM: find videos on disk, sample clips, video I/O (the built-in dataset is balls.py).

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
"""

import contextlib
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

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from captions import caption_for
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
    sub.add_parser("throughput", help="moved: python bench.py loader", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "throughput":  # the old spelling of the loader benchmark, which lives in bench.py now
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
        os.execv(sys.executable, [sys.executable, bench, "loader", *rest])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    prepare(args.src, args.dst, args.size, args.split_layout, args.format, args.quality, args.workers)


if __name__ == "__main__":
    main_guard(main)
