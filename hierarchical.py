"""Hierarchical LVDM for long videos (paper §3.3).

One U-Net (unet3d.py, with `mask_channel` and `s_embedding` on) is trained jointly for
unconditional generation and for conditional prediction or interpolation, by feeding a
binary frame mask as an extra channel (Eq. 8). At sampling time the same network gives the
conditional output (masks as given) and the unconditional one (all masks zero), combined by
unconditional guidance (Eq. 9); the output is ε or v (diffusion.py's `prediction`), and Eq. (9)
reads the same for both because both are linear in the network output. Conditioning latents
are perturbed to a small noise level s (conditional latent perturbation), so errors
accumulated by earlier steps look like noise the network was trained to ignore.

Long videos:
  autoregressive   each new clip of l latents is conditioned on the last k latents made so far;
  hierarchical     the prediction model (trained on latents `gap` apart) lays down sparse
                   keyframe latents autoregressively, then the interpolation model (trained on
                   gap+1 consecutive latents, first and last given) infills every pair.
Both are generators of latents, and `stream_decode` turns them into frames chunk by chunk with
overlapping decoder context, so memory does not grow with the video's length.

This file re-implements no sampling math: it only wraps the network into the `model_fn(z_t, t)`
that diffusion.py's samplers call.

Glossary, the public release's names -> this file's:
  max_noise_level -> s_max        noisy_cond -> perturb          n_prevs -> k
  latent_frame_strde -> gap       overlapped_decode -> stream_decode

    python sample.py --ckpt runs/demo/pred.pt --interp runs/demo/interp.pt --mode hierarchical --frames 1024
    python bench.py study ...       # the degradation study of §4.4 (Fig. 6-7)
"""
import copy

import torch

from common import UserError, checkpoint_weights

# The public release's joint-training probabilities p_c (conditional) / p_u = 1 - p_c.
P_COND = {"pred": 0.5, "interp": 0.9}


# ----------------------------------------------------------------------------- masks, Eq. (8)
def frame_mask(batch, length, given, device=None):
    """Binary mask m of Eq. (8), one value per latent frame: (B,1,l,1,1), 1 where the latent is given."""
    m = torch.zeros(batch, 1, length, 1, 1, device=device)  # (B,1,l,1,1): broadcasts over (c,h,w)
    for i in given:  # integer indices: a fill on the device (a list index would be copied there first)
        m[:, :, i] = 1.0
    return m


def given_frames(stage, length, k=1):
    """Which latents are conditions: prediction gives the first k, interpolation the first and last."""
    if stage == "pred":
        return list(range(k))
    if stage == "interp":
        return [0, length - 1]
    raise ValueError(f"no conditioning pattern for stage '{stage}'")


def sample_train_masks(stage, batch, length, k=1, p_cond=None, generator=None, device=None, anchor=False):
    """Joint training (§3.3): with probability p_c the stage's conditioning pattern, else all zeros (p_u).
    pred with k > 1: each conditioned sample is given its first k_b ~ U{1..k} latents, so one model learns
    to continue from 1 up to k of them (autoregressive(k=...) then conditions on that many).
    anchor: latent 0 is a far anchor (UNetConfig.far_anchor), given whenever the rest is conditioned."""
    if anchor:
        m = sample_train_masks(stage, batch, length - 1, k, p_cond, generator, device)  # (B,1,l-1,1,1)
        return torch.cat([m.amax(2, keepdim=True), m], 2)                               # (B,1,l,1,1)
    p = P_COND[stage] if p_cond is None else p_cond
    use = (torch.rand(batch, generator=generator, device=device) < p).float()  # (B,)
    if stage == "pred" and k > 1:
        k_b = torch.randint(1, k + 1, (batch,), generator=generator, device=device)           # (B,)
        m = (torch.arange(length, device=device) < k_b[:, None]).float().view(batch, 1, length, 1, 1)  # (B,l) -> (B,1,l,1,1)
    else:
        m = frame_mask(batch, length, given_frames(stage, length, k), device)
    return m * use.view(batch, 1, 1, 1, 1)  # (B,) -> (B,1,1,1,1)


def replace_given(z_t, cond, m):
    """Eq. (8): z̃_t <- z̃_t ⊙ (1 - m) + z̃_0 ⊙ m, here with the (perturbed) conditions in place of z̃_0."""
    return z_t * (1 - m) + cond * m


def full_mask(m, z):
    """(B,1,l,1,1) -> (B,1,l,h,w): the mask channel concatenated to the U-Net input."""
    return m.expand(z.shape[0], 1, z.shape[2], z.shape[3], z.shape[4])  # (B,1,l,1,1) -> (B,1,l,h,w)


def perturb(diffusion, z0, s, noise):
    """Conditional latent perturbation: z_s after s forward steps of Eq. (3), in closed form.

    s is a count of steps (B,): s = 0 leaves the latents unchanged, s >= 1 is diffusion.q_sample
    at training index s - 1 (z_s = sqrt(ᾱ_s) z_0 + sqrt(1 - ᾱ_s) ε)."""
    zs = diffusion.q_sample(z0, (s - 1).clamp_min(0), noise)
    return torch.where((s > 0).view(-1, *([1] * (z0.dim() - 1))), zs, z0)  # (B,) -> (B,1,1,1,1)


# ----------------------------------------------------------------------------- training
def init_from_unconditional(model, ckpt):
    """pred/interp start from the unconditional LVDM (§4.1): copy every weight; the input conv's extra
    mask channel and the s-embedding's output layer, absent there, start at zero, so the new model
    computes exactly what the unconditional one did until training moves them."""
    src = checkpoint_weights(ckpt)
    own = model.state_dict()
    for k, v in own.items():
        if k not in src:
            if k.startswith("s_embed.2."):  # the s-embedding's output layer: zero, so s adds nothing at first
                v.zero_()
            continue
        saved = src[k]
        if saved.shape == v.shape:
            v.copy_(saved)
        elif saved.dim() == v.dim() and saved.shape[1] + 1 == v.shape[1] and saved.shape[0] == v.shape[0]:
            v.zero_()
            v[:, : saved.shape[1]].copy_(saved)  # (out, c, ...) -> (out, c+1, ...): mask channel weights = 0
        else:
            raise UserError(f"--init checkpoint does not match this U-Net at '{k}' ({tuple(saved.shape)} vs "
                            f"{tuple(v.shape)}); use the same --preset and --model overrides as the lvdm run.")


def training_loss(diffusion, model, z0, stage, s_max=250, k=1, p_cond=None, generator=None, anchor=False):
    """Eq. (7) for the conditional models: (B,) mean squared error of the prediction (ε or v) over the
    latents to generate.

    Conditional latent perturbation: the given latents are diffused to a random level
    s ~ U{0..s_max} with Eq. (3) (`perturb`) and s is fed to the network.
    Samples drawn unconditional (all masks zero) get s = 0.
    anchor: latent 0 of z0 is a far anchor (UNetConfig.far_anchor), given whenever the rest is conditioned.
    """
    B, length = z0.shape[0], z0.shape[2]
    dev = z0.device
    m = sample_train_masks(stage, B, length, k=k, p_cond=p_cond, generator=generator, device=dev,
                           anchor=anchor)  # (B,1,l,1,1)
    conditioned = m.flatten(1).amax(1) > 0                                       # (B,1,l,1,1) -> (B,l) -> (B,)
    s = torch.randint(0, s_max + 1, (B,), generator=generator, device=dev) * conditioned.long()
    z_cond = perturb(diffusion, z0, s, torch.randn(z0.shape, generator=generator, device=dev))

    def model_fn(z_t, t):  # Eq. (8): the given latents replace the noisy ones, the mask is an extra channel
        return model(replace_given(z_t, z_cond, m), t, mask=full_mask(m, z0), s=s)
    # The given latents are not predicted, so they carry no loss: weight = 1 - m.
    return diffusion.training_loss(model_fn, z0, generator=generator, weight=(1 - m).expand_as(z0))  # (B,1,l,1,1) -> (B,c,l,h,w)


# ----------------------------------------------------------------------------- sampling
def guided(out_c, out_u, w):
    """Eq. (9): (1 + w) out_c - w out_u. Unconditional guidance here (out_u: all frame masks zero);
    text classifier-free guidance is the same formula with out_u from the empty prompt."""
    return (1 + w) * out_c - w * out_u


def unconditional_fn(model):
    """model_fn for unconditional sampling; a conditional (pred/interp) network gets all masks zero
    and s = 0, as its unconditional training samples had."""
    if not model.cfg.mask_channel:
        return lambda z, t: model(z, t)
    return lambda z, t: model(z, t, mask=torch.zeros_like(z[:, :1]),  # (B,c,l,h,w) -> (B,1,l,h,w)
                              s=torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


def guided_model_fn(model, cond, m, s=0, w=0.0, diffusion=None, generator=None):
    """The `model_fn(z_t, t)` that diffusion.py's samplers call for conditional generation.

    cond: (B,c,l,h,w) latents (only the frames where m = 1 are read); m: (B,1,l,1,1).
    s > 0 perturbs the conditions once to level s (Eq. 3), kept fixed over all sampling steps.
    w > 0 mixes in the unconditional output, Eq. (9) (`guided`).
    """
    B = cond.shape[0]
    s_vec = torch.full((B,), int(s), dtype=torch.long, device=cond.device)
    if s > 0:
        noise = torch.randn(cond.shape, generator=generator, device=cond.device)
        cond = perturb(diffusion, cond, s_vec, noise)
    mask_c = full_mask(m, cond)
    mask_u = torch.zeros_like(mask_c)
    zeros = torch.zeros_like(s_vec)

    def model_fn(z_t, t):
        if w == 0:
            return model(replace_given(z_t, cond, m), t, mask=mask_c, s=s_vec)  # conditional
        both = model(torch.cat([replace_given(z_t, cond, m), z_t]), torch.cat([t, t]),  # one batch: (2B, ...),
                     mask=torch.cat([mask_c, mask_u]), s=torch.cat([s_vec, zeros]))  # the second with all masks zero
        out_c, out_u = both.chunk(2)                                               # (2B,...) -> 2 x (B,...)
        return guided(out_c, out_u, w)
    return model_fn


TEXT_GUIDANCE = 2.0  # default w of text guidance (scale 1 + w = 3); bench.py t2v measures others
DDIM_ETA = 1.0  # default DDIM eta of sample.py, bench.py and training previews, as the release's samplers
                # (fresh noise each step: more samples pass the synthetic score than at 0, RESULTS.md)
# DDIM steps of the long-video studies (study.py) and the main job's 1024-frame videos: at eta 1, 25 to 100
# steps scored alike on short samples (RESULTS.md, 2026-11-29), and 20 cost 2.5x less than 50
LONG_VIDEO_STEPS = 20


def text_guided_fn(model, context, empty=None, w=0.0):
    """model_fn for text-to-video (§5): the prompt's text states `context` (B, L, D) read by cross-attention;
    w > 0 is classifier-free guidance with Eq. (9)'s formula (`guided`), out_u from the empty prompt's
    states `empty` (1 or B, L, D), the captions dropped in training. (1 + w) out_c - w out_u is the usual
    out_u + g (out_c - out_u) with scale g = 1 + w: one formula, so w = 0 is the plain conditional model."""
    def model_fn(z_t, t):
        if w == 0:
            return model(z_t, t, context=context)
        B = z_t.shape[0]
        both = model(torch.cat([z_t, z_t]), torch.cat([t, t]),                    # one batch: (2B, ...)
                     context=torch.cat([context, empty.expand(B, -1, -1)]))
        out_c, out_u = both.chunk(2)                                             # (2B,...) -> 2 x (B,...)
        return guided(out_c, out_u, w)
    return model_fn


def sample_clip(model, diffusion, shape, cond=None, m=None, s=0, w=0.0, steps=50, eta=0.0, generator=None):
    """One clip of latents (B,c,l,h,w); unconditional when cond is None; steps=None samples with DDPM.
    Given latents come back as given."""
    if cond is None:
        fn = unconditional_fn(model)
    else:
        fn = guided_model_fn(model, cond, m, s=s, w=w, diffusion=diffusion, generator=generator)
    dev = cond.device if cond is not None else (generator.device if generator is not None else None)
    z = diffusion.sample_loop(fn, shape, steps, eta=eta, generator=generator, device=dev)
    return z if cond is None else replace_given(z, cond, m)


@torch.no_grad()
def autoregressive(model, diffusion, clip_shape, n_latents, k=1, s=100, w=0.0, steps=50, eta=0.0,
                   generator=None, keep_first=None):
    """Yields latent chunks (B,c,n,h,w) that together hold exactly n_latents latents.

    The first clip is unconditional; each next clip of l latents has its first k given (the last k
    made so far) and contributes l - k new ones.
    keep_first: how many latents of the unconditional first clip the video keeps (None: all l; at least k).
    With keep_first = k the first clip only opens the video, and every later latent is made by a
    conditional call, so no pair of consecutive latents is left to the unconditional model alone.
    A model with a far anchor (UNetConfig.far_anchor) samples clips of 1 + l latents, latent 0 the anchor:
    the first clip is sampled whole and its latent 0 left out of the video; every later clip is given the
    video's first latent as its anchor, so each continuation also sees one fixed latent of the scene
    (long-range context, as FDM's sampling schemes give over 1000 frames). The first latent, rather than
    the first clip's anchor, keeps the first keyframe's colours more often (RESULTS.md, 2026-12-05).
    """
    B, clip_len = clip_shape[0], clip_shape[2]
    if not 0 < k < clip_len:
        raise ValueError(f"k must be in [1, {clip_len - 1}] for clips of {clip_len} latents, got {k}")
    keep_first = clip_len if keep_first is None else keep_first
    if not k <= keep_first <= clip_len:
        raise UserError(f"--keep-first must be in [{k}, {clip_len}] (at least the k = {k} latents each "
                        f"continuation is given, at most a clip of {clip_len}), got {keep_first}")
    a = 1 if model.cfg.far_anchor else 0               # the anchor's slot in front of the clip
    shape = (B, clip_shape[1], a + clip_len, *clip_shape[3:])
    z = sample_clip(model, diffusion, shape, steps=steps, eta=eta, generator=generator)[:, :, a:]  # (B,c,l,h,w)
    anchor = z[:, :, :a]                               # the video's first latent, or nothing: (B,c,a,h,w)
    made = min(keep_first, n_latents)
    yield z[:, :, :made]                               # (B,c,made,h,w)
    tail = z[:, :, made - k:made]                      # the last k latents made so far, (B,c,k,h,w)
    m = frame_mask(B, a + clip_len, range(a + k), z.device)
    while made < n_latents:
        cond = torch.zeros(shape, device=z.device)
        cond[:, :, :a + k] = torch.cat([anchor, tail], 2)  # (B,c,a+k,h,w)
        z = sample_clip(model, diffusion, shape, cond, m, s=s, w=w, steps=steps, eta=eta, generator=generator)[:, :, a:]
        new = min(clip_len - k, n_latents - made)
        yield z[:, :, k:k + new]                       # (B,c,new,h,w)
        tail = z[:, :, new:k + new]
        made += new


@torch.no_grad()
def keyframes(pred_model, diffusion, clip_shape, n_key, k=1, s=100, w=0.0, steps=50, eta=0.0, generator=None,
              keep_first=None):
    """The first level of `hierarchical`: n_key sparse keyframes (B,c,n_key,h,w) from the prediction model.
    keep_first: keyframes kept of its unconditional first clip; None keeps the first k only, so every later
    keyframe is predicted given the last k (and the anchor): the unconditional clip's other keyframes
    changed balls more often (RESULTS.md, 2026-12-06)."""
    return torch.cat(list(autoregressive(pred_model, diffusion, clip_shape, n_key, k=k, s=s, w=w, steps=steps, eta=eta,
                                         generator=generator, keep_first=k if keep_first is None else keep_first)),
                     dim=2)  # chunks -> (B,c,n_key,h,w)


@torch.no_grad()
def hierarchical(pred_model, interp_model, diffusion, clip_shape, n_latents, gap=4, k=1, s=100, w=0.0,
                 steps=50, eta=0.0, generator=None, keep_first=None):
    """Yields latent chunks holding exactly n_latents latents: sparse keyframes `gap` apart from the
    prediction model (`keyframes`), every consecutive pair infilled by the interpolation model (to the end).
    keep_first: as in `keyframes`."""
    n_key = -(-(n_latents - 1) // gap) + 1  # keyframes 0, gap, 2 gap, ... covering the last latent
    keys = keyframes(pred_model, diffusion, clip_shape, n_key, k=k, s=s, w=w, steps=steps, eta=eta,
                     generator=generator, keep_first=keep_first)  # (B,c,n_key,h,w)
    yield from infill(interp_model, diffusion, keys, n_latents, gap=gap, s=s, w=w, steps=steps, eta=eta,
                      generator=generator)


@torch.no_grad()
def infill(interp_model, diffusion, keys, n_latents, gap=4, s=100, w=0.0, steps=50, eta=0.0, generator=None):
    """The second level of `hierarchical`: yields latent chunks holding the first n_latents latents of the
    video whose latents 0, gap, 2 gap, ... are keys (B,c,n_key,h,w), each consecutive pair infilled by the
    interpolation model. Keys from anywhere: the prediction model, or real latents (study.py keyframes)."""
    B, c, n_key, height, width = keys.shape
    ishape = (B, c, gap + 1, height, width)
    m = frame_mask(B, gap + 1, [0, gap], keys.device)
    made = 0
    for i in range(n_key - 1):
        if made >= n_latents:
            return
        cond = torch.zeros(ishape, device=keys.device)
        cond[:, :, 0], cond[:, :, gap] = keys[:, :, i], keys[:, :, i + 1]  # (B,c,h,w) each: the pair's ends
        z = sample_clip(interp_model, diffusion, ishape, cond, m, s=s, w=w, steps=steps, eta=eta,
                        generator=generator)
        chunk = z[:, :, :gap] if i < n_key - 2 else z  # (B,c,gap,h,w): the right keyframe opens the next chunk
        chunk = chunk[:, :, : n_latents - made]
        made += chunk.shape[2]
        yield chunk
    if n_key == 1:
        yield keys[:, :, :n_latents]


# ----------------------------------------------------------------------------- streaming decode
@torch.no_grad()
def temporal_reach(vae, probe=64):
    """How many latents to either side one latent influences in the decoder (its temporal receptive
    field), found by decoding a probe with one latent changed. Finite because vae.py's convolutions
    are local in time and its GroupNorm statistics are per frame. The probe runs on a float64 copy on
    the CPU, where a frame the change cannot reach decodes to exactly the same values (on a GPU,
    cuDNN's algorithms need not be bitwise equal at every position, and fp16/bf16 weights round)."""
    probe_vae = copy.deepcopy(vae).to("cpu", torch.float64)
    z = torch.zeros(1, vae.cfg.z_channels, probe, 1, 1, dtype=torch.float64)
    a = probe_vae.decode(z)
    z[:, :, probe // 2] = 1.0
    changed = ((probe_vae.decode(z) - a).abs().amax(dim=(0, 1, 3, 4)) > 0).nonzero().flatten()  # frame indices
    first, last = (probe // 2) * vae.ft, (probe // 2 + 1) * vae.ft - 1
    return -(-max(first - int(changed.min()), int(changed.max()) - last) // vae.ft)


def decode_latents(vae, z, batch=None):
    """vae.decode_latents on at most `batch` videos at a time (None: all at once): the activations of
    a decode grow with the videos decoded together, the output only with their frames."""
    if batch is None or z.shape[0] <= batch:
        return vae.decode_latents(z)
    return torch.cat([vae.decode_latents(z[i:i + batch]) for i in range(0, z.shape[0], batch)])  # (B,3,n*ft,H,W)


@torch.no_grad()
def overlapped_decode(vae, latent_chunks, window=4, overlap=1, batch=None):
    """For autoencoders whose GroupNorm statistics span the whole clip (the release's, converted by
    convert.py), where no decode of a part equals the one-shot decode: decode windows of `window`
    latents (the release's training clip: 16 frames = 4 latents) that overlap by 2*overlap, and keep
    each window's frames but its first and last `overlap` latents (the release's overlapped_decode).
    Yields frame chunks (B,3,n*ft,H,W) in order; each window is decoded as a clip of its own."""
    if window <= 2 * overlap:
        raise UserError(f"the decode window ({window} latents) must exceed twice the overlap ({overlap}).")
    ft, buf, first = vae.ft, None, True
    for chunk in latent_chunks:
        buf = chunk if buf is None else torch.cat([buf, chunk], 2)   # (B,c,n1+n2,h,w)
        while buf.shape[2] > window:                                  # more follows this window: emit its middle
            x = decode_latents(vae, buf[:, :, :window], batch)        # (B,c,window,h,w) -> (B,3,window*ft,H,W)
            yield x[:, :, (0 if first else overlap) * ft:(window - overlap) * ft]
            buf, first = buf[:, :, window - 2 * overlap:], False      # the next window re-reads 2*overlap latents
    if buf is not None:
        yield decode_latents(vae, buf, batch)[:, :, (0 if first else overlap) * ft:]


@torch.no_grad()
def stream_decode(vae, latent_chunks, context=None, batch=None):
    """Decode a stream of latent chunks (B,c,n,h,w) into frame chunks (B,3,n*ft,H,W), keeping at most
    the current chunk plus `context` latents on each side in memory, and decoding `batch` videos at a
    time (None: all B). With context >= the decoder's temporal reach (the default), every frame equals
    the one-shot decode of the whole video.
    An autoencoder with whole-clip GroupNorm (vae.cfg.norm_over == "clip") has no finite reach:
    it is decoded in overlapping windows instead (overlapped_decode), which is not exact."""
    if vae.cfg.norm_over == "clip":
        yield from overlapped_decode(vae, latent_chunks, batch=batch)
        return
    ft = vae.ft
    context = temporal_reach(vae) if context is None else context
    prev = None    # latents already emitted, last `context` of them kept as left context
    pending = None
    for chunk in latent_chunks:
        pending = chunk if pending is None else torch.cat([pending, chunk], 2)  # (B,c,n1+n2,h,w)
        if pending.shape[2] <= context:
            continue
        emit = pending[:, :, : pending.shape[2] - context]  # keep `context` latents as right context
        left = prev[:, :, max(prev.shape[2] - context, 0):] if prev is not None else emit[:, :, :0]  # not -context: -0 is all
        window = torch.cat([left, pending], 2)               # (B,c,left+n,h,w)
        x = decode_latents(vae, window, batch)
        a = left.shape[2] * ft
        yield x[:, :, a: a + emit.shape[2] * ft]             # (B,3,n_emit*ft,H,W)
        prev = emit if prev is None else torch.cat([prev, emit], 2)
        prev = prev[:, :, max(prev.shape[2] - context, 0):]                             # (B,c,<=context,h,w)
        pending = pending[:, :, emit.shape[2]:]
    if pending is not None and pending.shape[2] > 0:
        left = prev[:, :, max(prev.shape[2] - context, 0):] if prev is not None else pending[:, :, :0]
        x = decode_latents(vae, torch.cat([left, pending], 2), batch)  # (B,c,left+n,h,w) -> (B,3,(left+n)*ft,H,W)
        yield x[:, :, left.shape[2] * ft:]                       # (B,3,n*ft,H,W)


if __name__ == "__main__":  # the old spelling of the degradation study, which is a bench.py subcommand now
    import os
    import sys
    if sys.argv[1:2] != ["study"]:
        sys.exit("usage: python bench.py study --pred P --interp I --ar-pred A [--i3d W] [--frames F] [--n N]")
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
    os.execv(sys.executable, [sys.executable, bench, *sys.argv[1:]])
