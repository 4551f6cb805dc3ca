"""Caption files for text-to-video (§5): which caption belongs to which video of a dataset on disk.

A CSV or JSON-lines table of video path and caption (WebVid-style datasets ship one), or a .txt file
beside each video. data.VideoDataset(captions=...) reads its videos' captions through `caption_for`;
the built-in dataset writes its own captions (balls.py).
"""
import csv
import functools
import json
import os

from common import UserError


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
