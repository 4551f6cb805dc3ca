"""Tests for data.py: layouts, clip sampling, determinism, synthetic data, video I/O, prepare."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data
from data import UserError

torch.set_num_threads(1)


def _data_frame(k, w=16, h=12):
    """A uniform frame whose pixels encode the frame number k: R = k % 256, G = 7 * (k // 256)."""
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0], f[..., 1], f[..., 2] = k % 256, 7 * (k // 256), 200
    return f


def _data_write_folder(folder, n, name="frame{k}.png", w=16, h=12):
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        Image.fromarray(_data_frame(k, w, h)).save(os.path.join(folder, name.format(k=k)))


def _data_decode(clip):
    """Frame numbers of a (3,T,H,W) clip made of _data_frame frames (read at the center pixel)."""
    u8 = ((clip + 1) * 127.5).round().long()
    h, w = u8.shape[2] // 2, u8.shape[3] // 2
    return (u8[0, :, h, w] + 256 * (u8[1, :, h, w] // 7)).tolist()


def _data_write_gif(path, n, w=16, h=12):
    frames = [Image.fromarray(_data_frame(10 * k % 256, w, h)) for k in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _data_ds(root, tmp_path, **kw):
    kw = {"frames": 4, "size": 8, "cache_dir": str(tmp_path / "cache"), **kw}
    return data.VideoDataset(str(root), kw.pop("frames"), kw.pop("size"), **kw)


# ----------------------------------------------------------------------------- layouts
def test_natural_order():
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.png"]
    assert sorted(names, key=data.natural_key) == ["frame1.png", "frame2.png", "Frame3.png", "frame10.png"]


def test_split_layouts_aliases_classes_and_skips(tmp_path):
    a = tmp_path / "ucf"
    _data_write_folder(a / "train" / "ClassX" / "v1", 6)
    _data_write_folder(a / "train" / "ClassY" / "sub" / "v2", 6)
    _data_write_folder(a / "train" / ".hidden" / "v", 6)
    _data_write_folder(a / "train" / "_broken_clips" / "v", 6)
    _data_write_folder(a / "train" / "ClassX" / ".v4", 6)
    (a / "train" / ".DS_Store").write_bytes(b"junk")
    _data_write_folder(a / "val" / "v3.mp4", 9)  # a frame folder with a video-like name
    (a / "notes").mkdir()
    assert len(_data_ds(a, tmp_path, split="train")) == 2
    test = _data_ds(a, tmp_path, split="test")
    assert len(test) == 1 and test.videos[0][0] == "dir" and test.num_frames == [9]
    assert len(_data_ds(a, tmp_path, split="val")) == 1
    assert len(_data_ds(a, tmp_path, split="all")) == 3

    b = tmp_path / "sky"
    _data_write_folder(b / "sky_train" / "v", 6)
    _data_write_folder(b / "sky_test" / "w", 6)
    _data_write_folder(b / "sky_test" / "w2", 6)
    assert (len(_data_ds(b, tmp_path, split="train")), len(_data_ds(b, tmp_path, split="test"))) == (1, 2)

    c = tmp_path / "flat"  # no split folders: every split is everything
    for name in ("v1", "v2", "v3"):
        _data_write_folder(c / name, 6)
    assert [len(_data_ds(c, tmp_path, split=s)) for s in ("train", "test", "all")] == [3, 3, 3]

    with pytest.raises(UserError, match="split 'test' not found.*train"):
        _data_write_folder(tmp_path / "only" / "train" / "v", 6)
        _data_ds(tmp_path / "only", tmp_path, split="test")


def test_zip_layouts_read_lazily_and_in_workers(tmp_path):
    z = tmp_path / "stylegan_v.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for split, vids in (("train", 3), ("test", 1)):
            for v in range(vids):
                for k in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 11):  # stored out of order on purpose
                    buf = io.BytesIO()
                    Image.fromarray(_data_frame(k + 20 * v)).save(buf, format="PNG")
                    zf.writestr(f"{split}/vid{v}/img_{k}.png", buf.getvalue())
        zf.writestr("train/.hidden/img_0.png", b"not an image")
    ds = _data_ds(z, tmp_path, frames=3, stride=4, random_start=False)
    assert len(ds) == 3 and len(_data_ds(z, tmp_path, split="test")) == 1
    assert ds._zips == {}  # nothing opened at construction
    for i in range(3):
        idx = _data_decode(ds[i])  # video i holds frames 20 i + (0..11); members sorted naturally
        assert np.diff(idx).tolist() == [4, 4] and 0 <= idx[0] - 20 * i <= 12 - 9
    assert len(ds._zips) == 1
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers get no open handle
    assert clone._zips == {} and torch.equal(clone[1], ds[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    assert all(torch.equal(b[0], ds[i]) for i, b in enumerate(loader))

    outer = tmp_path / "outer"  # a zip inside a folder without splits
    outer.mkdir()
    os.replace(z, outer / "frames.zip")
    assert len(_data_ds(outer, tmp_path)) == 4


def test_stride_and_natural_order_through_the_dataset(tmp_path):
    _data_write_folder(tmp_path / "videos" / "v", 40, name="frame{k}.png")  # lexicographic order would break
    ds = _data_ds(tmp_path / "videos", tmp_path, frames=5, stride=3, seed=7)
    assert ds.span == 13
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        idx = _data_decode(ds[0])
        start = int(np.random.default_rng([7, epoch, 0]).integers(0, 40 - 13 + 1))
        assert idx == [start + 3 * k for k in range(5)]
        starts.add(idx[0])
    assert len(starts) > 1  # different epochs, different starts
    ev = _data_ds(tmp_path / "videos", tmp_path, frames=5, stride=3, seed=7, random_start=False)
    firsts = set()
    for epoch in range(4):
        ev.set_epoch(epoch)
        firsts.add(tuple(_data_decode(ev[0])))
    assert len(firsts) == 1


def test_determinism_same_item_any_worker(tmp_path):
    for v in range(6):
        _data_write_folder(tmp_path / "d" / f"v{v}", 30)
    ds1 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=3)
    ds2 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=3)
    ds1.set_epoch(5), ds2.set_epoch(5)
    direct = torch.stack([ds2[i] for i in range(6)])
    loader = torch.utils.data.DataLoader(ds1, batch_size=3, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), direct)
    ds2.set_epoch(6)
    assert not torch.equal(torch.stack([ds2[i] for i in range(6)]), direct)
    ds3 = _data_ds(tmp_path / "d", tmp_path, frames=4, stride=2, seed=4)
    ds3.set_epoch(5)
    assert not torch.equal(torch.stack([ds3[i] for i in range(6)]), direct)


def test_flip_is_one_mirror_per_clip(tmp_path):
    folder = tmp_path / "f" / "v"
    os.makedirs(folder)
    for k in range(10):  # horizontal ramp, different per frame
        ramp = np.tile((np.arange(16) * 12 + k).astype(np.uint8)[None, :, None], (16, 1, 3))
        Image.fromarray(ramp).save(folder / f"{k}.png")
    plain = _data_ds(tmp_path / "f", tmp_path, frames=4, size=16, random_start=False)
    flip = _data_ds(tmp_path / "f", tmp_path, frames=4, size=16, random_start=False, flip=True)
    seen = set()
    for seed in range(12):
        plain.seed = flip.seed = seed
        a, b = plain[0], flip[0]
        seen.add(torch.equal(a, b))
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    assert seen == {True, False}


def test_resize_is_antialiased_and_center_cropped():
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (20, 1, 3))  # value = column
    out = np.asarray(data.resize_center_crop(Image.fromarray(ramp), 20))
    assert out.shape == (20, 20, 3) and out[5, :, 0].tolist() == list(range(10, 30))
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    small = np.asarray(data.resize_center_crop(Image.fromarray(stripes), 16)).astype(int)
    assert abs(small.mean() - 127.5) < 3 and small.std() < 4  # aliasing would give 0s and 255s


def test_short_and_broken_videos_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "mix"
    _data_write_folder(root / "long", 20)
    _data_write_folder(root / "short", 5)
    _data_write_gif(root / "ok.gif", 12)
    (root / "broken.gif").write_bytes(b"GIF89a but not really")
    try:
        import av  # noqa: F401  (without PyAV an .mp4 is a UserError, tested elsewhere)
        (root / "broken.mp4").write_bytes(os.urandom(2000))
        broken = 2
    except ImportError:
        broken = 1
    ds = _data_ds(root, tmp_path, frames=4, stride=3)  # span 10
    assert (len(ds), ds.num_short, ds.num_unreadable) == (2, 1, broken)
    line = capsys.readouterr().out
    assert "2 videos" in line and "skipped 1 shorter than 10 frames" in line and f"{broken} unreadable" in line
    with pytest.raises(UserError, match="shorter than 25 frames.*--frames or --stride"):
        _data_ds(root, tmp_path, frames=25)


def test_user_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _data_ds(tmp_path / "nope", tmp_path)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match=r"no videos found.*\.mp4.*train/"):
        _data_ds(tmp_path / "empty", tmp_path)
    _data_write_folder(tmp_path / "ok" / "v", 8)
    for bad in (0, -3, 2.5, "256", None):
        with pytest.raises(UserError, match="size must be a positive integer"):
            _data_ds(tmp_path / "ok", tmp_path, size=bad)
        with pytest.raises(UserError, match="size must be a positive integer"):
            data.SyntheticVideos(size=bad)
    with pytest.raises(UserError, match="unknown split"):
        _data_ds(tmp_path / "ok", tmp_path, split="training")


def test_without_pyav_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    with pytest.raises(UserError, match=r"pip install av.*python data.py prepare"):
        _data_ds(tmp_path / "v", tmp_path)
    with pytest.raises(UserError, match="pip install av"):
        data.read_video(str(tmp_path / "v" / "a.mp4"))
    with pytest.raises(UserError, match="pip install av"):
        data.write_video(str(tmp_path / "o.mp4"), np.zeros((2, 8, 8, 3), np.uint8))


def test_index_cache_outside_root_and_invalidated_per_file(tmp_path, monkeypatch):
    root = tmp_path / "gifs"
    root.mkdir()
    _data_write_gif(root / "a.gif", 20)
    _data_write_gif(root / "b.gif", 20)
    monkeypatch.setenv("LVDM_CACHE", str(tmp_path / "envcache"))
    calls = []
    real = data._count_file_frames
    monkeypatch.setattr(data, "_count_file_frames", lambda p: calls.append(p) or real(p))
    ds = data.VideoDataset(str(root), 4, 8)
    assert len(calls) == 2 and sorted(ds.num_frames) == [20, 20]
    assert ds.cache_file.startswith(str(tmp_path / "envcache")) and not ds.cache_file.startswith(str(root))
    cached = json.load(open(ds.cache_file))["files"]
    assert sorted(e["frames"] for e in cached.values()) == [20, 20]
    assert not [f for f in os.listdir(tmp_path / "envcache") if f.startswith(".")]  # no temp left
    data.VideoDataset(str(root), 4, 8)
    assert len(calls) == 2  # all from the cache
    _data_write_gif(root / "b.gif", 30)
    st = os.stat(root / "b.gif")
    os.utime(root / "b.gif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds = data.VideoDataset(str(root), 4, 8)
    assert calls[2:] == [str(root / "b.gif")] and sorted(ds.num_frames) == [20, 30]
    other = data.VideoDataset(str(root), 4, 8, cache_dir=str(tmp_path / "explicit"))
    assert other.cache_file.startswith(str(tmp_path / "explicit"))


# ----------------------------------------------------------------------------- video I/O
def test_gif_png_npz_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (6, 3)).astype(np.uint8)
    video = palette[rng.integers(0, 6, (7, 10, 12))]  # few colors: GIF keeps them exactly
    data.write_video(str(tmp_path / "v.gif"), video, fps=5)
    back = data.read_video(str(tmp_path / "v.gif"))
    assert back.shape == video.shape and np.abs(back.astype(int) - video).max() <= 2
    assert Image.open(tmp_path / "v.gif").info.get("loop") == 0
    data.write_video(str(tmp_path / "v.png"), video)
    strip = np.asarray(Image.open(tmp_path / "v.png"))
    assert strip.shape == (10, 7 * 12, 3) and np.array_equal(strip[:, 3 * 12:4 * 12], video[3])

    videos = rng.integers(0, 256, (3, 4, 6, 5, 3)).astype(np.uint8)
    data.save_npz(str(tmp_path / "s.npz"), videos)
    assert list(np.load(tmp_path / "s.npz").keys()) == ["arr_0"]  # the LVDM release's key
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "s.npz").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert np.array_equal(data.load_npz(str(tmp_path / "s.npz")), videos)
    assert np.array_equal(data.read_video(str(tmp_path / "s.npz")), videos[0])
    np.savez(tmp_path / "k.npz", videos=videos, labels=np.arange(3))
    np.savez(tmp_path / "o.npz", samples=videos)
    np.savez(tmp_path / "bad.npz", a=videos, b=videos)
    assert np.array_equal(data.load_npz(str(tmp_path / "k.npz")), videos)
    assert np.array_equal(data.load_npz(str(tmp_path / "o.npz")), videos)
    with pytest.raises(UserError, match="arr_0"):
        data.load_npz(str(tmp_path / "bad.npz"))
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "k.npz", "o.npz", "s.npz", "v.gif", "v.png"]


def test_mp4_roundtrip_and_dataset_stride(tmp_path):
    pytest.importorskip("av")
    t = np.arange(20)[:, None, None, None]
    video = np.broadcast_to((t * 12).astype(np.uint8), (20, 31, 33, 3)).copy()  # odd size: padded
    video[..., 2] = 100
    data.write_video(str(tmp_path / "vids" / "a.mp4"), video, fps=8)
    back = data.read_video(str(tmp_path / "vids" / "a.mp4"))
    assert back.shape == (20, 32, 34, 3)
    assert np.abs(back[:, :31, :33].astype(int) - video).mean() < 3
    ds = _data_ds(tmp_path / "vids", tmp_path, frames=4, stride=2, seed=1)
    assert ds.num_frames == [20]
    for epoch in range(3):
        ds.set_epoch(epoch)
        level = ((ds[0][0, :, 4, 4] + 1) * 127.5).numpy()
        idx = np.round(level / 12).astype(int)
        start = int(np.random.default_rng([1, epoch, 0]).integers(0, 20 - 7 + 1))
        assert idx.tolist() == [start + 2 * k for k in range(4)]
        assert np.abs(level - 12 * idx).max() < 4


def test_write_grid_and_to_uint8(tmp_path):
    videos = np.zeros((2, 3, 4, 5, 3), np.uint8)
    for n in range(2):
        for t in range(3):
            videos[n, t] = 40 * n + 10 * t + 1
    data.write_grid(str(tmp_path / "g.png"), videos, max_frames=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 4 + 2, 2 * 5 + 2, 3)
    assert grid[4 + 2 + 1, 5 + 2 + 1, 0] == 40 + 10 + 1 and grid[4, 0, 0] == 255
    x = torch.zeros(1, 3, 2, 2, 2)
    x[0, 0, 1, 0, 1] = 100.6 / 127.5 - 1  # rounds to 101 (truncation would give 100)
    x[0, 1] = 5.0  # clamped to 255
    x[0, 2] = -1.0
    u = data.to_uint8(x)
    assert u.shape == (1, 2, 2, 2, 3) and u.dtype == np.uint8
    assert u[0, 1, 0, 1, 0] == 101 and (u[..., 1] == 255).all() and (u[..., 2] == 0).all()
    assert u[0, 0, 0, 0, 0] == 128  # 0.0 -> 127.5 -> 128


# ----------------------------------------------------------------------------- synthetic
def _data_simulate(ball, steps):
    """Independent reference: step the ball one frame at a time, reflecting at the walls."""
    r, pos, vel, out = ball["radius"], [ball["x0"], ball["y0"]], [ball["vx"], ball["vy"]], []
    for _ in range(steps):
        out.append(tuple(pos))
        for a in range(2):
            pos[a] += vel[a]
            if pos[a] > 1 - r:
                pos[a], vel[a] = 2 * (1 - r) - pos[a], -vel[a]
            if pos[a] < r:
                pos[a], vel[a] = 2 * r - pos[a], -vel[a]
    return np.array(out)


def test_synthetic_params_match_rendered_pixels():
    size = 64
    ds = data.SyntheticVideos(frames=24, size=size, seed=0)
    checked_centers = checked_blobs = 0
    for i in range(12):
        p = ds.params(i)
        json.dumps(p)
        assert p["n_balls"] == len(p["balls"]) and 1 <= p["n_balls"] <= 3
        video = ds.render(i).astype(int)
        paths = [_data_simulate(b, 24) for b in p["balls"]]
        for t in range(0, 24, 3):
            for j, b in enumerate(p["balls"]):
                cx, cy = paths[j][t] * size
                covered = any(np.hypot(*(paths[k][t] - paths[j][t])) < p["balls"][k]["radius"] + 2 / size
                              for k in range(j + 1, len(paths)))
                if not covered:
                    assert np.abs(video[t, int(cy), int(cx)] - b["rgb"]).max() <= 2
                    checked_centers += 1
            apart = all(np.hypot(*(paths[j][t] - paths[k][t])) > p["balls"][j]["radius"] + p["balls"][k]["radius"]
                        + 3 / size for j in range(len(paths)) for k in range(j))
            if apart:  # every ball is one blob of its colour, centered where the trajectory says
                blobs = 0
                for j, b in enumerate(p["balls"]):
                    labels, n = ndimage.label(np.abs(video[t] - b["rgb"]).max(-1) <= 30)
                    blobs += n
                    if n == 1:
                        cy, cx = ndimage.center_of_mass(labels > 0)
                        assert np.hypot(cx + 0.5 - paths[j][t][0] * size, cy + 0.5 - paths[j][t][1] * size) < 0.5
                assert blobs == p["n_balls"]
                checked_blobs += 1
    assert checked_centers > 50 and checked_blobs > 20


def test_synthetic_deterministic_disjoint_and_learnable_ranges():
    a, b = data.SyntheticVideos(frames=8, size=32), data.SyntheticVideos(frames=8, size=32)
    test = data.SyntheticVideos(frames=8, size=32, split="test")
    assert (len(a), len(test)) == (10000, 512) and len(data.SyntheticVideos(n=7)) == 7
    assert torch.equal(a[3], b[3]) and a.params(3) == b.params(3)
    assert a.params(3) != test.params(3) and not torch.equal(a[3], test[3])
    for i in range(50):
        for ball in a.params(i)["balls"]:
            assert 0.08 <= ball["radius"] <= 0.2 and 1.0 <= ball["speed"] * 64 <= 3.0
        x = a[i]
        assert x.shape == (3, 8, 32, 32) and x.min() >= -1 and x.max() <= 1
    p = a.params(0)
    video = data.SyntheticVideos(frames=4, size=64).render(0).astype(int)
    yy, xx = np.mgrid[:64, :64] + 0.5
    far = np.ones((64, 64), bool)
    for ball in p["balls"]:
        path = _data_simulate(ball, 4)
        for t in range(4):
            far &= np.hypot(xx - path[t][0] * 64, yy - path[t][1] * 64) > ball["radius"] * 64 + 2
    smooth = np.abs(np.diff(video, axis=2)).max(-1)[:, :, :-1] * (far[:, :-1] & far[:, 1:])[None, :, :-1]
    assert smooth.max() <= 6  # background gradient is smooth


def test_synthetic_long_clip_is_one_continuous_trajectory():
    import time
    ds = data.SyntheticVideos(frames=16, size=64)
    t0 = time.perf_counter()
    long = ds.render(5, frames=1024)
    assert time.perf_counter() - t0 < 5.0
    assert np.array_equal(ds.render(5, frames=512, stride=2), long[::2])
    assert np.array_equal(ds.render(5, frames=16, start=1000), long[1000:1016])
    assert torch.equal(data.SyntheticVideos(frames=8, stride=3)[5], data.SyntheticVideos(frames=22)[5][:, ::3])
    for ball in ds.params(5)["balls"]:
        ref = _data_simulate(ball, 1024)
        t = np.arange(1024)
        got = np.stack([data.bounce(ball["x0"], ball["vx"], ball["radius"], t),
                        data.bounce(ball["y0"], ball["vy"], ball["radius"], t)], 1)
        assert np.abs(got - ref).max() < 1e-9
    step = np.abs(np.diff(long.astype(int), axis=0)).mean(axis=(1, 2, 3))
    assert step.max() < 8  # no jumps anywhere in 1024 frames


def test_synthetic_flip_and_make_dataset(tmp_path):
    plain, flip = data.SyntheticVideos(frames=4, size=32), data.SyntheticVideos(frames=4, size=32, flip=True)
    outcomes = set()
    for i in range(10):
        a, b = plain[i], flip[i]
        outcomes.add(torch.equal(a, b))
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    assert outcomes == {True, False}
    assert isinstance(data.make_dataset("synthetic", 4, 32), data.SyntheticVideos)
    _data_write_folder(tmp_path / "v" / "a", 6)
    ds = data.make_dataset(str(tmp_path / "v"), 4, 8, split="test", random_start=False)
    assert isinstance(ds, data.VideoDataset) and len(ds) == 1
    assert data.measure_loader(data.SyntheticVideos(n=8, frames=4, size=16), 2, 0, 3) > 0


# ----------------------------------------------------------------------------- prepare
def test_prepare_mirrors_layout_atomically_and_resumes(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    os.makedirs(src / "train" / "ClassA")
    _data_write_gif(src / "train" / "ClassA" / "v1.gif", 12, w=40, h=30)
    _data_write_folder(src / "train" / "ClassA" / "v2", 7, w=30, h=60)
    os.makedirs(src / "test")
    _data_write_gif(src / "test" / "v3.gif", 9, w=40, h=30)
    (src / "test" / "bad.gif").write_bytes(b"nope")
    data.main(["prepare", str(src), str(dst), "--size", "16"])
    out = dst / "train" / "ClassA" / "v1"
    assert sorted(os.listdir(out)) == [f"{k:06d}.jpg" for k in range(12)]
    assert Image.open(out / "000000.jpg").size == (21, 16)  # short side 16, aspect kept
    assert Image.open(dst / "train" / "ClassA" / "v2" / "000000.jpg").size == (16, 32)
    assert "3 converted, 0 already done, 1 unreadable" in capsys.readouterr().out
    assert not [d for d in os.listdir(dst / "test") if d.startswith(".")]
    data.main(["prepare", str(src), str(dst), "--size", "16"])
    assert "0 converted, 3 already done" in capsys.readouterr().out
    ds = _data_ds(dst, tmp_path, frames=9, size=16, split="all")
    assert len(ds) == 2 and ds.num_short == 1  # v2 has only 7 frames
    center = ((ds[0] + 1) * 127.5)[:, :, 8, 8]  # v1 frame k: red 10 k, blue 200 (through JPEG)
    k = torch.round(center[0] / 10)
    assert torch.equal(k - k[0], torch.arange(9.0)) and (center[0] - 10 * k).abs().max() < 4
    assert (center[2] - 200).abs().max() < 4
    data.main(["prepare", str(src), str(tmp_path / "flat"), "--size", "16", "--split-layout", "flat"])
    assert sorted(os.listdir(tmp_path / "flat" / "train")) == ["v1", "v2"]


def test_cli_user_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(data.__file__), "data.py"), "prepare",
                        str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not exist" in r.stderr
