import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data as D
import train
from data import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))
# A tiny autoencoder run: 32² frames, 8 per clip, 4x4 latents; GAN from step 2 so both players train.
_TINY_VAE = ["--stage", "vae", "--preset", "demo", "--size", "32", "--frames", "8", "--batch-size", "2",
             "--model", "hidden=8", "--model", "ch_mult=(1,1,1)", "--disc-start", "2", "--eval-clips", "2",
             "--log-every", "1", "--lr", "1e-3"]


def _train_state(path):
    ck = torch.load(path, weights_only=True)
    return ck


def _assert_same_tensors(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_train_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, stop, --resume, 2 more: identical weights, optimizers, EMA, RNG."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = _TINY_VAE + ["--save-every", "2", "--sample-every", "1000", "--ema", "0.9"]
    train.main(common + ["--out", a, "--steps", "4"])
    train.main(common + ["--out", b, "--steps", "2"])
    train.main(common + ["--out", b, "--steps", "4", "--resume"])
    ca, cb = _train_state(os.path.join(a, "vae.pt")), _train_state(os.path.join(b, "vae.pt"))
    assert ca["step"] == cb["step"] == 4
    for key in ("model", "ema", "extra", "optimizer", "optimizer_d", "rng", "data_state"):
        _assert_same_tensors(ca[key], cb[key], key)
    assert ca["data_state"]["batch_in_epoch"] == 4


def test_train_weights_change_and_discriminator_trains(tmp_path):
    out = str(tmp_path / "r")
    train.main(_TINY_VAE + ["--out", out, "--steps", "1", "--save-every", "1", "--sample-every", "1000"])
    c1 = _train_state(os.path.join(out, "vae.pt"))
    train.main(_TINY_VAE + ["--out", out, "--steps", "3", "--save-every", "1", "--sample-every", "1000",
                            "--resume"])
    c3 = _train_state(os.path.join(out, "vae.pt"))
    moved = [k for k in c1["model"] if c1["model"][k].dtype.is_floating_point
             and not torch.equal(c1["model"][k], c3["model"][k])]
    assert len(moved) > 0
    # the discriminator starts at step 2, so steps 2 and 3 changed it
    assert any(not torch.equal(c1["extra"][k], c3["extra"][k]) for k in c1["extra"])
    # the latent statistics stored in the checkpoint make the stored latents unit-variance
    import vae as V
    model = V.load_vae(os.path.join(out, "vae.pt"))
    x = train.eval_clips(train.parse_args(_TINY_VAE + ["--out", out]), 2)
    z = model.encode_latents(x)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std(unbiased=False).item() - 1) < 1e-3


def test_ddp_two_processes_equal_one_process(tmp_path):
    """A 2-process gloo step on batches of 1 equals a 1-process step on the same global batch of 2.

    Compared through Adam's first moment after one step, m = (1 - beta1) * g: linear in the averaged
    gradient, so it checks the all-reduce itself (the weights after Adam's sign-like first step would
    amplify float rounding of near-zero gradients into lr-sized differences)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--stage", "vae", "--preset", "demo", "--size", "32", "--frames", "8", "--model", "hidden=8",
              "--model", "ch_mult=(1,1,1)", "--disc-start", "100", "--eval-clips", "2", "--steps", "1",
              "--sample-posterior", "0", "--sample-every", "1000", "--save-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([sys.executable, "train.py", *common, "--batch-size", "2", "--out", one],
                        cwd=_HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "train.py", *common, "--batch-size", "1", "--out", two],
                        cwd=_HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a = torch.load(os.path.join(one, "vae.pt"), weights_only=True)
    b = torch.load(os.path.join(two, "vae.pt"), weights_only=True)
    assert len(b["rng"]) == 2 and len(a["rng"]) == 1
    for opt in ("optimizer",):  # the autoencoder (DDP) and the discriminator (by hand)
        sa, sb = a[opt]["state"], b[opt]["state"]
        assert set(sa) == set(sb) and len(sa) > 0
        # biases right before a GroupNorm have gradients that are zero up to float noise (~1e-8):
        # the tolerance is relative to the largest first moment of the whole model
        scale = max(s["exp_avg"].abs().max().item() for s in sa.values())
        assert scale > 1e-4
        for i in sa:
            torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-3, atol=1e-5 * scale,
                                       msg=f"{opt} param {i}: averaged gradients differ")


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"stage": "vae", "model": {}, "hook": os.system}, path)
    with pytest.raises(UserError, match="plain-tensor"):
        train.load_checkpoint(path)
    import vae as V
    with pytest.raises(Exception):
        V.load_vae(path)


def test_checkpoint_of_another_stage_is_refused(tmp_path):
    path = str(tmp_path / "x.pt")
    train.save_checkpoint(path, {"stage": "lvdm", "step": 0})
    with pytest.raises(UserError, match="'lvdm' checkpoint"):
        train.load_checkpoint(path, "vae")


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "vae.pt")
    train.save_checkpoint(path, {"stage": "vae", "step": 1})

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"stage": "vae", "step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--frames", "10"], "divisible"),
    (["--size", "60"], "divisible"),
    (["--data", "/nonexistent/videos"], "/nonexistent/videos"),
    (["--model", "nonsense=3"], "unknown model field"),
])
def test_user_errors_are_one_sentence(tmp_path, extra, words):
    with pytest.raises(UserError) as e:
        train.main(_TINY_VAE + ["--out", str(tmp_path), "--steps", "1"] + extra)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_paper_preset_without_data_and_cli_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--stage", "vae", "--preset", "sky", "--out", str(tmp_path)],
                       cwd=_HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--data" in lines[0]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    train.main(_TINY_VAE + ["--out", out, "--steps", "2", "--save-every", "2", "--sample-every", "1000"])
    good = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
    orig = D.SyntheticVideos.__getitem__
    monkeypatch.setattr(D.SyntheticVideos, "__getitem__", lambda self, i: orig(self, i) * float("nan"))
    with pytest.raises(UserError, match="non-finite"):
        train.main(_TINY_VAE + ["--out", out, "--steps", "4", "--save-every", "1", "--sample-every", "1000",
                                "--resume"])
    after = torch.load(os.path.join(out, "vae.pt"), weights_only=True)
    assert after["step"] == 2
    _assert_same_tensors(good["model"], after["model"])


def test_ema_warmup_closed_form():
    """decay_n = min(decay, (1+n)/(10+n)); shadow_n = d_n * shadow_{n-1} + (1-d_n) * param_n."""
    p = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p.weight.fill_(1.0)
    ema = train.EMA(p, 0.5)
    expect = 1.0
    for n, v in enumerate([3.0, -2.0, 5.0, 7.0], start=1):
        with torch.no_grad():
            p.weight.fill_(v)
        ema.update(p)
        d = min(0.5, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * v
        assert abs(ema.shadow["weight"].item() - expect) < 1e-6


def test_rng_state_round_trip():
    st = train.rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    train.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 8, 8)
    y = x + 0.02  # mse = 4e-4 on a range of 2 -> 10 log10(4 / 4e-4) = 40 dB
    assert torch.allclose(train.psnr(x, y), torch.tensor([40.0, 40.0]), atol=1e-4)
