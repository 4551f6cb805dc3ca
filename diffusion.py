"""Gaussian diffusion on video latents: LVDM §3.2, Eq. (2)-(7).

The U-Net (unet3d.py) predicts the noise ε (the paper) or, optionally, the
velocity v = √ᾱ_t ε - √(1-ᾱ_t) z_0 (Salimans & Ho 2022; the CPU demo uses it, see
`prediction` in GaussianDiffusion). Everything about the noise schedule lives
here: the forward process q (Eq. 2-3), the ε-parameterized reverse process p_θ
(Eq. 4-6), the simple loss (Eq. 7), DDPM ancestral sampling and DDIM sampling
(Song et al. 2021, Eq. 12 there).

Names follow improved-diffusion / LDM (q_sample, q_posterior_mean_variance,
p_mean_variance, p_sample, ddim_sample) so the code can be read next to them.
Index convention: the paper counts steps t = 1..T; tensors here hold the
training index t-1, i.e. `t` is a LongTensor in [0, num_timesteps).  Buffer
entry [t] therefore belongs to the paper's step t+1.

Every sampler takes a model function, not a model:

    out = model_fn(x_t, t)     # x_t (B, ...), t LongTensor (B,) -> ε (or v) like x_t

so hierarchical.py can wrap the U-Net (mask channel, the noise level s of the
conditioning frames, unconditional guidance Eq. 9) without touching the math
here.  `sample_loop` is the one place that chooses DDPM (steps=None) or DDIM.
The loops also take `after_step(x, t) -> x`, called after every step with the
new sample (a hook for inpainting-style samplers; this project's samplers
condition through the model function instead).

Quick check (prints the schedule ends and DDPM/DDIM samples of N(0.5, 0.5²) data):
    python diffusion.py
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from common import UserError


def make_betas(schedule, steps, start=0.0015, end=0.0155):
    """The variance schedule β_1..β_T of Eq. (3), as float64 numpy (steps,).

    "linear": LDM's form, a linspace of square roots, squared (the paper
    presets use 0.0015 -> 0.0155 over 1000 steps).
    "cosine": Nichol & Dhariwal (2021) Eq. 17, ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2)
    with s = 0.008, β_t = 1 - ᾱ(t)/ᾱ(t-1) clipped at 0.999; start/end ignored.
    """
    if steps < 1:
        raise UserError(f"the number of diffusion steps must be at least 1, got {steps}; pass a positive --timesteps.")
    if schedule == "linear":
        return np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        f = lambda u: math.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=np.float64)
    raise UserError(f"unknown beta schedule {schedule!r}; use 'linear' or 'cosine'.")


def from_train_args(a):
    """The GaussianDiffusion a run trained with, from its arguments (train.py's argparse values, or
    the `train_args` dict a checkpoint stores; older checkpoints without `prediction` / `var_type`
    predicted ε with the posterior variance)."""
    a = a if isinstance(a, dict) else vars(a)
    return GaussianDiffusion(make_betas(a["schedule"], a["timesteps"], a["beta_start"], a["beta_end"]),
                             loss_type=a["loss"], var_type=a.get("var_type") or "fixed_small",
                             prediction=a.get("prediction") or "eps", ddim_spacing=a.get("ddim_spacing") or "linspace",
                             min_snr=a.get("min_snr"))


def _randn(shape, generator, device, dtype):
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class GaussianDiffusion:
    """Forward process, ε-parameterized reverse process, loss and samplers.

    betas: float64 array (T,) from make_betas.
    loss_type: "l2" (Eq. 7) or "l1" (the public LVDM configs train with l1).
    var_type: Σ_θ of Eq. (5): "fixed_small" = posterior variance β̃_t (LDM's
      default), "fixed_large" = β_t (the paper's Eq. 6 text writes β_t², a
      typo for DDPM's σ_t² = β_t).
    prediction: what model_fn returns. "eps": ε, the paper's Eq. (6)-(7). "v": the velocity
      v = √ᾱ_t ε - √(1-ᾱ_t) z_0; it is turned into ε = √ᾱ_t v + √(1-ᾱ_t) z_t before any
      sampling math, and Eq. (7) scores v instead of ε, i.e. the ε-error weighted by 1/ᾱ_t.
      With ε, an error δ in the output near t = T becomes an error δ/√ᾱ_T (~15δ for the linear
      schedule) in ẑ_0, which a small, briefly trained network cannot avoid: its samples drift
      to 1.8x the data's spread (the demo: latent std 1.76 against 0.97, RESULTS.md). With v the
      error in ẑ_0 stays ~δ.
      Both are linear in the network output, so Eq. (9)'s guidance reads the same for either.
    ddim_spacing: which S of the T steps DDIM visits (ddim_timesteps), picked by name. "linspace": evenly
      from 0 to T-1, ending on the predicted ẑ_0 (this project: ddim_timesteps_linspace). "release": the
      public LVDM release's sampler, kept for its converted checkpoints (convert.py; ddim_timesteps_release
      at the end of the file).
    min_snr: γ of Min-SNR-γ loss weighting (Hang et al. 2023), None or 0 = off (the paper's L_simple).
      Every prediction's squared error is a multiple of ẑ_0's: |ε̂-ε|² = SNR_t |ẑ_0-z_0|² and
      |v̂-v|² = (SNR_t + 1) |ẑ_0-z_0|², SNR_t = ᾱ_t / (1-ᾱ_t). The weight min(SNR_t, γ) / SNR_t (ε) or
      min(SNR_t, γ) / (SNR_t + 1) (v) makes the loss min(SNR_t, γ) |ẑ_0-z_0|²: the nearly clean steps,
      whose ẑ_0 is easy, stop dominating the gradient.
    """

    def __init__(self, betas, loss_type="l2", var_type="fixed_small", prediction="eps", ddim_spacing="linspace",
                 min_snr=None):
        if loss_type not in ("l2", "l1"):
            raise UserError(f"unknown loss type {loss_type!r}; use 'l2' or 'l1'.")
        if var_type not in ("fixed_small", "fixed_large"):
            raise UserError(f"unknown variance type {var_type!r}; use 'fixed_small' or 'fixed_large'.")
        if prediction not in ("eps", "v"):
            raise UserError(f"unknown prediction {prediction!r}; use 'eps' or 'v'.")
        if ddim_spacing not in ("linspace", "release"):
            raise UserError(f"unknown DDIM spacing {ddim_spacing!r}; use 'linspace' or 'release'.")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise UserError("betas must be a 1-D array with values in (0, 1]; build them with make_betas.")
        if min_snr is not None and not min_snr >= 0:
            raise UserError(f"--min-snr must be >= 0 (0 = off), got {min_snr}.")
        self.loss_type, self.var_type, self.prediction = loss_type, var_type, prediction
        self.min_snr = min_snr or None
        self.ddim_spacing = ddim_spacing
        self.ddim_respace = {"linspace": ddim_timesteps_linspace, "release": ddim_timesteps_release}[ddim_spacing]
        self.num_timesteps = T = len(betas)

        # Eq. (3): q(z_t | z_{t-1}) = N(√(1-β_t) z_{t-1}, β_t I);  α_t = 1 - β_t.
        self.betas = betas
        alphas = 1.0 - betas
        # Eq. (2)-(3) in closed form: q(z_t | z_0) = N(√ᾱ_t z_0, (1-ᾱ_t) I), ᾱ_t = Π_{s<=t} α_s.
        self.alphas_cumprod = np.cumprod(alphas)
        # ᾱ_{t-1}, with ᾱ_0 = 1 before the first step (z_0 is clean data).
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # z_0 from (z_t, ε) by inverting the closed form: z_0 = z_t/√ᾱ_t - √(1/ᾱ_t - 1) ε.
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(z_{t-1} | z_t, z_0) = N(μ̃_t, β̃_t I) (DDPM Eq. 6-7):
        #   β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
        #   μ̃_t = β_t √ᾱ_{t-1}/(1-ᾱ_t) · z_0 + (1-ᾱ_{t-1}) √α_t/(1-ᾱ_t) · z_t
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃ is 0 at the first step; log uses β̃ of the second step there (never sampled with: no noise at t=0).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if T > 1 else betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Read by the samplers and the loss: log β_t (Σ_θ = β_t), ᾱ with a 1 appended (DDIM's ᾱ_prev at
        # t_prev = -1, before the first step) and SNR_t = ᾱ_t / (1-ᾱ_t) (Min-SNR weighting).
        self.log_betas = np.log(betas)
        self.alphas_cumprod_then_one = np.append(self.alphas_cumprod, 1.0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self._buffers = {}  # (name, device) -> the schedule array as a float64 tensor there (_extract)

    def _extract(self, name, t, x):
        """Entry t of the schedule array `name` for every batch element, shaped to broadcast against x:
        (B,) -> (B,1,...,1). Each array is copied to t's device once and kept there, so a training or
        sampling step indexes it without a host-to-device copy (which waits for the device)."""
        buf = self._buffers.get((name, t.device))
        if buf is None:
            buf = self._buffers[(name, t.device)] = torch.from_numpy(getattr(self, name)).to(t.device)
        return buf[t].to(x.dtype).reshape(t.shape[0], *([1] * (x.dim() - 1)))  # (B,) -> (B,1,1,1,1)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0, t, noise=None):
        """Draw z_t ~ q(z_t | z_0) = N(√ᾱ_t z_0, (1-ᾱ_t) I): Eq. (2)-(3) in closed form."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._extract("sqrt_alphas_cumprod", t, x0) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and log-variance of q(z_{t-1} | z_t, z_0) (DDPM Eq. 6-7)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._extract("posterior_variance", t, x_t),
                self._extract("posterior_log_variance_clipped", t, x_t))

    def predict_xstart_from_eps(self, x_t, t, eps):
        """z_0 = (z_t - √(1-ᾱ_t) ε) / √ᾱ_t, the closed form of Eq. (2)-(3) solved for z_0."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def model_eps(self, model_fn, x_t, t):
        """ε_θ(z_t, t): the model's output, converted from v when prediction == "v"."""
        out = model_fn(x_t, t).to(x_t.dtype)
        if out.shape != x_t.shape:
            raise ValueError(f"model_fn returned shape {tuple(out.shape)}, expected {tuple(x_t.shape)}")
        if self.prediction == "eps":
            return out
        # z_t = √ᾱ z_0 + √(1-ᾱ) ε and v = √ᾱ ε - √(1-ᾱ) z_0  =>  ε = √ᾱ v + √(1-ᾱ) z_t
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * out
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model_fn, x_t, t):
        """Mean and variance of p_θ(z_{t-1} | z_t) (Eq. 5) with ε-parameterization (Eq. 6).

        μ_θ = posterior mean at ẑ_0 = predict_xstart_from_eps(z_t, ε_θ); without clipping this is
        exactly Eq. (6): μ_θ = (z_t - β_t/√(1-ᾱ_t) ε_θ) / √α_t (ẑ_0 is not clipped: latents are unbounded).
        Returns a dict: mean, variance, log_variance, pred_xstart, eps.
        """
        eps = self.model_eps(model_fn, x_t, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        if self.var_type == "fixed_small":  # Σ_θ = β̃_t I
            variance = self._extract("posterior_variance", t, x_t)
            log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        else:  # "fixed_large": Σ_θ = β_t I
            variance = self._extract("betas", t, x_t)
            log_variance = self._extract("log_betas", t, x_t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def training_loss(self, model_fn, x0, t=None, noise=None, generator=None, weight=None):
        """L_simple of Eq. (7), one value per batch element: (B,).

        t: LongTensor (B,) or None (uniform in [0, T) from `generator`); noise: ε or None (from `generator`).
        weight: optional tensor broadcastable to x0 (e.g. 1 - frame mask, so only generated frames are
          scored); the loss is then Σ w·err / Σ w per batch element.
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)  # Eq. (2)-(3)
        out = model_fn(x_t, t)
        target = noise
        if self.prediction == "v":  # v = √ᾱ ε - √(1-ᾱ) z_0
            target = (self._extract("sqrt_alphas_cumprod", t, x0) * noise
                      - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0)
        dtype = torch.promote_types(noise.dtype, torch.float32)  # the loss in at least float32, also under AMP
        diff = out.to(dtype) - target.to(dtype)
        err = diff ** 2 if self.loss_type == "l2" else diff.abs()  # Eq. (7)
        dims = list(range(1, x0.dim()))
        if self.min_snr:  # Min-SNR-γ: the loss becomes min(SNR_t, γ) |ẑ_0 - z_0|² (class docstring)
            snr = self._extract("snr", t, err)  # (B,1,1,1,1)
            err = err * snr.clamp(max=self.min_snr) / (snr + 1 if self.prediction == "v" else snr)
        if weight is None:
            return err.mean(dim=dims)
        w = torch.broadcast_to(weight.to(err.dtype), err.shape)
        return (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-8)

    def p_sample(self, model_fn, x_t, t, generator=None, noise=None):
        """One ancestral step z_{t-1} ~ p_θ(z_{t-1} | z_t) (Eq. 4-5); no noise is added at t = 0.

        noise: the standard normal z of this step, or None to draw it from `generator`.
        Returns a dict: sample, pred_xstart.
        """
        out = self.p_mean_variance(model_fn, x_t, t)
        if noise is None:
            noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))  # (B,) -> (B,1,1,1,1)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise  # Eq. (5): μ_θ + Σ^½ z
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model_fn, shape, noise=None, generator=None, progress=False,
                      after_step=None, device=None):
        """DDPM ancestral sampling (Eq. 4): z_T ~ N(0, I), then T steps of p_sample.

        noise: the starting z_T (shape `shape`), or None to draw it from `generator` on `device`
          (default: the generator's device, else CPU).
        after_step(x, t) -> x: optional; called after every step with the new sample x (now at
          training index t-1; the last call has t = 0 and x is the final sample) and the LongTensor t
          (B,) of the step just taken. Its return value continues the chain.
        """
        x = self._start(shape, noise, generator, device)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in _progress(steps, progress, "DDPM"):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = self.p_sample(model_fn, x, t, generator)["sample"]
            if after_step is not None:
                x = after_step(x, t)
        return x

    # ------------------------------------------------------------------ DDIM
    def ddim_timesteps(self, steps):
        """The training indices DDIM walks down, τ_0 < τ_1 < ... < τ_S: the model runs at τ_S = T-1 (pure
        noise), ..., τ_1, and the last step lands on τ_0 (-1: the clean data, ᾱ = 1). Spaced as ddim_spacing
        names (self.ddim_respace)."""
        if not 1 <= steps <= self.num_timesteps:
            raise UserError(f"DDIM steps must be between 1 and {self.num_timesteps}, got {steps}; pass a valid --steps.")
        return self.ddim_respace(self.num_timesteps, steps)

    def ddim_sample(self, model_fn, x_t, t, t_prev, eta=0.0, generator=None, noise=None):
        """One DDIM step from index t to t_prev < t (t_prev = -1: to clean data, ᾱ = 1).

        Song et al. 2021, Eq. (12):
          z_prev = √ᾱ_prev ẑ_0 + √(1 - ᾱ_prev - σ²) ε_θ + σ z,
          σ = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev).
        With t_prev = t-1 and η = 1, σ² = β̃_t: exactly the DDPM posterior variance; with
        t_prev = -1, σ = 0 and the step returns ẑ_0.  t, t_prev: LongTensors (B,).
        Returns a dict: sample, pred_xstart.
        """
        out = self.p_mean_variance(model_fn, x_t, t)
        eps = out["eps"]
        a_t = self._extract("alphas_cumprod", t, x_t)
        a_prev = self._extract("alphas_cumprod_then_one", t_prev, x_t)  # t_prev = -1 reads the appended 1
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
        if noise is None:
            noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
        direction = torch.sqrt((1 - a_prev - sigma ** 2).clamp_min(0)) * eps
        sample = torch.sqrt(a_prev) * out["pred_xstart"] + direction + sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model_fn, shape, steps, eta=0.0, noise=None, generator=None, progress=False,
                         after_step=None, device=None):
        """DDIM sampling over `steps` uniformly respaced timesteps (ddim_timesteps).

        With all steps and eta = 0 it is deterministic given z_T and ends on the predicted ẑ_0.
        noise / generator / device / after_step: as in p_sample_loop; after_step gets the t of
        the step just taken (x is now at the next lower respaced index, or clean after the last).
        """
        x = self._start(shape, noise, generator, device)
        seq = self.ddim_timesteps(steps)  # τ_0 < ... < τ_S
        for i in _progress(range(len(seq) - 1, 0, -1), progress, "DDIM"):
            t = torch.full((shape[0],), int(seq[i]), device=x.device, dtype=torch.long)
            t_prev = torch.full_like(t, int(seq[i - 1]))
            with torch.no_grad():
                x = self.ddim_sample(model_fn, x, t, t_prev, eta, generator)["sample"]
            if after_step is not None:
                x = after_step(x, t)
        return x

    def sample_loop(self, model_fn, shape, steps=None, eta=0.0, generator=None, device=None, progress=False):
        """The sampler every caller uses: DDPM ancestral sampling over all T steps (Eq. 4-5) when
        steps is None, else DDIM over `steps` respaced steps with this eta."""
        if steps is None:
            return self.p_sample_loop(model_fn, shape, generator=generator, device=device, progress=progress)
        return self.ddim_sample_loop(model_fn, shape, steps, eta=eta, generator=generator, device=device,
                                     progress=progress)

    def _start(self, shape, noise, generator, device):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return _randn(tuple(shape), generator, device, torch.float32)  # z_T ~ N(0, I), Eq. (4)


def ddim_timesteps_linspace(T, steps):
    """This project's DDIM spacing: τ_1..τ_S evenly from 0 to T-1 (S = 1: just T-1), then τ_0 = -1, so the
    last step ends on the predicted ẑ_0 (DESIGN: with all steps and eta = 0, DDIM ends on ẑ_0)."""
    tau = np.array([T - 1]) if steps == 1 else np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    return np.concatenate([[-1], tau])


def _progress(it, on, desc):
    if not on:
        return it
    return tqdm(it, desc=desc, leave=False)


# --------------------------------------------- the public release's variants (convert.py turns them on)
def ddim_timesteps_release(T, steps):
    """ddim_spacing="release", the release's make_ddim_timesteps: τ = (0, c, 2c, ...) + 1 with c = T // S, and
    τ_0 = 0, so the last step lands on ᾱ of index 0, not on ẑ_0. Where S does not divide T that is more than S
    steps (T=1000, S=7: 7 strides of 142, 8 steps). An index that lands on T (e.g. S=3: 999+1, or S=T) lies past
    the schedule, where the release fails with an IndexError; here it is clipped to T-1 (and a repeated index
    dropped), so every S runs."""
    return np.concatenate([[0], np.unique(np.minimum(np.arange(0, T, T // steps) + 1, T - 1))])


if __name__ == "__main__":
    betas = make_betas("linear", 1000, 0.0015, 0.0155)
    d = GaussianDiffusion(betas)
    print(f"linear: beta_1={betas[0]:.5f} beta_T={betas[-1]:.5f} alpha_bar_T={d.alphas_cumprod[-1]:.5f}")
    mu, sd = 0.5, 0.5

    def exact_eps(x, t):  # the posterior-mean ε of N(mu, sd²) data
        a = d._extract("alphas_cumprod", t, x)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * sd ** 2 + 1 - a)

    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(exact_eps, (4096, 1), generator=g)
    print(f"DDPM-1000 on N({mu}, {sd}^2) data: mean={x.mean():.4f} std={x.std():.4f}")
    x = d.ddim_sample_loop(exact_eps, (4096, 1), steps=50, generator=g)
    print(f"DDIM-50   on N({mu}, {sd}^2) data: mean={x.mean():.4f} std={x.std():.4f}  (few steps: a little narrow)")
