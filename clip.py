"""CLIP from scratch: a ViT image tower, a causal Transformer text tower, one joint space.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Figure 3 (the numpy-like pseudocode, also Figure 2 of Knowledge-CLIP):

    I_f = image_encoder(I)            # (B, d_i)
    T_f = text_encoder(T)             # (B, d_t)
    I_e = l2_normalize(I_f @ W_i)     # (B, D)
    T_e = l2_normalize(T_f @ W_t)     # (B, D)
    logits = I_e @ T_e.T * exp(t)     # (B, B)

This file holds everything up to `logits`; the loss lives in losses.py.
Read it top to bottom: tokenizer -> pixels (load_image, to_input) -> Transformer block -> the two
towers -> CLIP -> sizes -> checkpoints (the one writer and reader of files) and `load`. The export
to Hugging Face: docs/use_student.py.
"""
import contextlib
import io
import json
import math
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------
# Tokenizer: UTF-8 bytes, plus byte-pair merges learned from the training captions (Sennrich
# et al. 2016, in GPT-2's byte-level form, as Karpathy's minbpe teaches it), so it needs no
# downloaded vocabulary and reads any language. id 0 = padding, 1..256 = the bytes, 257 =
# start of text, 258 = end of text, 259 + i = merge i. No merges: the plain byte tokenizer.
# A caption of the embedded data is ~36 bytes but ~8 merged tokens: the text tower, which
# costs per token, gets that much cheaper. The merges are part of the model's config, so a
# checkpoint carries its tokenizer.

PAD, SOT, EOT = 0, 257, 258
N_BASE = 259  # ids before the first merge
WORD = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")  # merges never cross these pieces (GPT-2's split)


def merge(ids, pair, new):  # replace every (a, b) in ids by new
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_bpe(texts, vocab_size):
    """Merges [(a, b), ...] learned from texts: each distinct piece (WORD) is counted once with
    its frequency; the most frequent adjacent pair of ids becomes the next id, until there are
    vocab_size ids or no pair occurs twice. Pair counts are updated only in the pieces a merge
    changes (`where`), so thousands of merges on a sample of real captions take seconds."""
    freq = Counter(w for t in texts for w in WORD.findall(t))
    pieces = {w: [b + 1 for b in w.encode("utf-8")] for w in freq}
    counts, where = Counter(), {}
    for w, ids in pieces.items():
        for pair in zip(ids, ids[1:]):
            counts[pair] += freq[w]
            where.setdefault(pair, set()).add(w)
    merges = []
    while N_BASE + len(merges) < vocab_size and counts:
        pair = max(counts, key=lambda p: (counts[p], p))  # ties: the larger ids, so the result is deterministic
        if counts[pair] < 2:
            break
        new = N_BASE + len(merges)
        merges.append(pair)
        for w in where.pop(pair):
            old, ids = pieces[w], merge(pieces[w], pair, new)
            for p in zip(old, old[1:]):
                counts[p] -= freq[w]
                if counts[p] <= 0:
                    del counts[p]
            for p in zip(ids, ids[1:]):
                counts[p] += freq[w]
                where.setdefault(p, set()).add(w)
            pieces[w] = ids
    return merges


class Tokenizer:
    """Captions -> (N, context_length) int64 ids: [SOT, tokens..., EOT, PAD...]. Captions longer
    than the context are cut, and the last slot still holds EOT. Each piece's ids are computed
    once (`cache`): a data set repeats its words."""

    def __init__(self, merges=()):
        self.merges = [tuple(m) for m in merges]
        self.rank = {pair: N_BASE + i for i, pair in enumerate(self.merges)}
        self.cache = {}

    def encode(self, text):  # str -> ids of its bytes, merged in the order the merges were learned
        if not self.merges:
            return [b + 1 for b in text.encode("utf-8")]
        out = []
        for w in WORD.findall(text):
            if w not in self.cache:
                ids = [b + 1 for b in w.encode("utf-8")]
                while len(ids) > 1:
                    pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, math.inf))
                    if pair not in self.rank:
                        break
                    ids = merge(ids, pair, self.rank[pair])
                self.cache[w] = ids
            out += self.cache[w]
        return out

    def __call__(self, texts, context_length):
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"caption {i} is {type(t).__name__} ({t!r:.40}), expected str")
            ids = [SOT] + self.encode(t)[: context_length - 2] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens):
        """(L,) ids -> the caption (inverse of the call for captions that fit)."""
        parts = {N_BASE + i: pair for i, pair in enumerate(self.merges)}

        def expand(t):
            return [b for half in parts[t] for b in expand(half)] if t in parts else [t - 1]
        body = [b for t in tokens if 0 < int(t) and int(t) not in (SOT, EOT) for b in expand(int(t))]
        return bytes(body).decode("utf-8", errors="replace")


def tokenize(texts, context_length):
    """The byte tokenizer (no merges)."""
    return Tokenizer()(texts, context_length)


def decode(tokens):
    return Tokenizer().decode(tokens)


# ----------------------------------------------------------------------------------------
# Pixels -> model input. Images travel as uint8 (N, 3, S, S) and are normalised on the fly;
# every image of the project (training, teachers, evaluation, `preprocess`) is read by load_image.

MEAN, STD = 0.45, 0.25


def to_input(images_uint8, device="cpu"):  # (B, 3, S, S) uint8 -> float32 on device
    return (images_uint8.to(device).float() / 255 - MEAN) / STD


def load_image(source, image_size, crop=None):
    """A path, bytes, PIL image or (3, H, W) uint8 tensor -> (3, C, C) uint8: RGB, shorter side
    resized to image_size (bicubic; the longer side to int(image_size * long / short), rounded down
    as CLIP's preprocessing, torchvision's Resize and transformers' CLIPImageProcessor do), centre
    crop of C = crop (default image_size). A tensor that already has the asked size is returned as
    it is."""
    crop = crop or image_size
    if torch.is_tensor(source):
        if source.shape[-2:] == (crop, crop) and crop == image_size:
            return source
        source = Image.fromarray(source.permute(1, 2, 0).numpy())
    img = source if isinstance(source, Image.Image) else Image.open(
        io.BytesIO(source) if isinstance(source, bytes) else source)
    img = img.convert("RGB")
    w, h = img.size
    long = int(image_size * max(w, h) / min(w, h))
    img = img.resize((image_size, long) if w <= h else (long, image_size), Image.BICUBIC)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------
# One pre-norm Transformer block, shared by both towers (causal=True for text).

class Block(nn.Module):
    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.fused = True  # False: the textbook formula (docs/bench.py times both)
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def attention(self, x):  # x: (B, L, W)
        B, L, W = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:  # one kernel that never materialises the (L, L) scores
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, h, L, W/h)
        else:  # softmax(q k^T / sqrt(d) + causal mask) v, step by step
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, L, L)
            if self.causal:
                scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = scores.softmax(-1) @ v  # (B, h, L, W/h)
        return self.proj(y.transpose(1, 2).reshape(B, L, W))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------
# The towers.

class VisionTransformer(nn.Module):
    """Dosovitskiy et al. 2021: patchify conv, class token, learned positions, pre-norm blocks.
    The class token's final state is the image feature I_f."""

    def __init__(self, image_size, patch_size, width, layers, heads):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        n_patches = (image_size // patch_size) ** 2
        self.patchify = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.pos_emb = nn.Parameter(torch.randn(n_patches + 1, width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images):  # (B, 3, H, W) -> (B, width)
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, n_patches, W)
        cls = self.cls_token.expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.pos_emb)  # (B, 1 + n_patches, W)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0])


def text_length(tokens):  # (B, L) ids -> L', the longest caption with its SOT and EOT: the columns the tower runs
    return int(tokens.ne(PAD).sum(1).max())


class TextTransformer(nn.Module):
    """A causal Transformer over the tokens; the state at the end-of-text token is T_f."""

    def __init__(self, context_length, width, layers, heads, vocab_size=N_BASE):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([Block(width, heads, causal=True) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.trim = True  # False: run all context_length positions (docs/bench.py times both)

    def forward(self, tokens):  # (B, L) int64 -> (B, width)
        # Causal attention: positions after EOT never reach the EOT state, so the padding
        # columns that no caption of this batch uses can be cut off without changing the result.
        if self.trim:
            tokens = tokens[:, : text_length(tokens)]  # (B, L') with L' <= L
        x = self.token_emb(tokens) + self.pos_emb[: tokens.shape[1]]  # (B, L', W)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        eot = tokens.ne(PAD).sum(1) - 1  # (B,) position of EOT, the last token before the padding
        return x[torch.arange(x.shape[0], device=x.device), eot]


# ----------------------------------------------------------------------------------------
# CLIP: the two towers, the projections W_i, W_t and the learned temperature t.

@dataclass
class CLIPConfig:  # the defaults are the `small` size
    embed_dim: int = 64  # D, the joint space
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    context_length: int = 64
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    merges: tuple = ()  # the tokenizer's byte-pair merges ((a, b), ...); () = bytes alone

    def __post_init__(self):  # a checkpoint stores lists: back to the tuples a config compares by
        self.merges = tuple(tuple(m) for m in self.merges)


MAX_LOGIT_SCALE = math.log(100)  # exp(t) is clipped at 100 after every update (CLIP, Sec. 2.5)


def logit_scale():
    """A learned temperature t, initialised at ln(1 / 0.07) (CLIP, Sec. 2.5): CLIP's, and CLIP-CID's
    instance loss's s'."""
    return nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads)
        self.text = TextTransformer(cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads,
                                    N_BASE + len(cfg.merges))
        self.tokenizer = Tokenizer(cfg.merges)
        self.image_proj = nn.Parameter(torch.randn(cfg.vision_width, cfg.embed_dim) * cfg.vision_width ** -0.5)  # W_i
        self.text_proj = nn.Parameter(torch.randn(cfg.text_width, cfg.embed_dim) * cfg.text_width ** -0.5)  # W_t
        self.logit_scale = logit_scale()  # t; exp(t) scales the logits

    def encode_image(self, images, normalize=True):  # (B, 3, H, W) floats, or PIL images / paths -> (B, D)
        if not torch.is_tensor(images):
            images = self.preprocess(images)
        x = self.visual(images) @ self.image_proj
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=True):  # (B, L) ids, or a str / list of str -> (B, D)
        if not torch.is_tensor(tokens):
            tokens = self.tokenize(tokens).to(self.logit_scale.device)
        x = self.text(tokens) @ self.text_proj
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts):  # a str or list of N str -> (N, context_length) ids
        return self.tokenizer(texts, self.cfg.context_length)

    def preprocess(self, images):
        """A PIL image, an image file's path, or a list of them -> (N, 3, S, S) floats on the model's
        device, read as training reads an image: RGB, shorter side resized to S (bicubic), centre
        crop (load_image), then normalised (to_input)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        S = self.cfg.image_size
        return to_input(torch.stack([load_image(x, S) for x in images]), self.logit_scale.device)

    def forward(self, images, tokens):
        """Returns I_e (B, D), T_e (B, D) and exp(t), the inputs of losses.clip_loss."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


# ----------------------------------------------------------------------------------------
# Named sizes. `teacher` is several times `small`: CLIP-CID distils it into a student.

SIZES = {
    "tiny": CLIPConfig(embed_dim=64, vision_width=64, vision_layers=2, vision_heads=2,
                       text_width=64, text_layers=2, text_heads=2),
    "small": CLIPConfig(),
    "base": CLIPConfig(embed_dim=128, vision_width=128, vision_layers=4, vision_heads=4,
                       text_width=128, text_layers=3, text_heads=4),
    "teacher": CLIPConfig(embed_dim=128, vision_width=160, vision_layers=6, vision_heads=5,
                          text_width=128, text_layers=3, text_heads=4),
    # The `gpu` preset's student and own teacher: ViT-S- and ViT-B-like towers on the embedded 32-pixel images
    # (4-pixel patches: 64 image tokens), wide enough that a GPU's matmuls, not its kernel launches, set the pace.
    "vit-s-4": CLIPConfig(embed_dim=384, patch_size=4, vision_width=384, vision_layers=12, vision_heads=6,
                          context_length=32, text_width=384, text_layers=6, text_heads=6),
    "vit-b-4": CLIPConfig(embed_dim=512, patch_size=4, vision_width=768, vision_layers=12, vision_heads=12,
                          context_length=32, text_width=512, text_layers=8, text_heads=8),
    # 224-pixel sizes for real data (CC3M): CLIP ViT-B/32's shape (Radford et al. 2021, Table 19:
    # the byte tokenizer makes its embedding table 259 rows, not 49,408) and a ViT-S/32 student.
    "vit-b-32": CLIPConfig(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                           vision_heads=12, context_length=77, text_width=512, text_layers=12, text_heads=8),
    "vit-s-32": CLIPConfig(embed_dim=384, image_size=224, patch_size=32, vision_width=384, vision_layers=12,
                           vision_heads=6, context_length=77, text_width=384, text_layers=6, text_heads=6),
}


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def count_flops(fn):
    """(fn(), the FLOPs it ran), by torch's FlopCounterMode: matmuls, convolutions and attention
    (elementwise work is not counted), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def step_shape(tokens, corpus_tokens=None, trimmed=True):
    """What a training step's FLOPs depend on: its batch size and text length (a trimmed text tower runs
    only the columns some caption uses, text_length; untrimmed, all of them), and the text-only lines'
    (--text-corpus). train.py counts a step's FLOPs the first time its shape comes up and adds that
    count for every step of the same shape. Not in the key: partial class sampling's K' (--class-frac
    < 1) moves the cluster loss's B x K' x D_t by a few classes."""
    length = text_length if trimmed else (lambda t: t.shape[1])
    corpus = (len(corpus_tokens), length(corpus_tokens)) if corpus_tokens is not None else None
    return len(tokens), length(tokens), corpus


def flop_accounting(student, teachers_):
    """results.json's "flops": the student's training (the sum over its steps, step_shape; None when a resumed
    checkpoint had no count), each teacher's forward passes over the data and training (None: trained elsewhere,
    e.g. a Hugging Face model), and the total, every teacher counted in full (shared by N students, each would
    pay forward + training / N: docs/teacher.md)."""
    out = {"student_training": student, **teachers_}
    out["total"] = sum(v for k, v in out.items() if not k.endswith("by_this_run") and v is not None) \
        if student is not None else None
    return out


def build(size="small", **overrides):
    """A CLIP of a named size; keyword overrides change single fields (e.g. image_size=64)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return CLIP(CLIPConfig(**{**asdict(SIZES[size]), **overrides}))


# ----------------------------------------------------------------------------------------
# The optimiser and its schedule; checkpoints: every .pt file of this project is written and read
# here, read as weights only (no unpickling). A training checkpoint holds the model, the method's
# heads, the optimiser, the step, the run's flags and the RNG states: a resumed run continues bit
# for bit.

def make_optimizer(modules, lr, weight_decay, fused=False):
    """AdamW; no weight decay on gains, biases and logit scales (every tensor with < 2 dims).
    On CUDA the fused kernel updates every parameter at once (the default loop launches a
    handful of kernels per tensor, which dominates a small model's step: docs/bench.py)."""
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def lr_at(step, lr, warmup, steps):
    """Linear warmup to lr, then cosine to zero. A pure function of the step: the schedule's
    whole state is the step counter stored in the checkpoint."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(progress, 1.0)))


@contextlib.contextmanager
def atomic(path):
    """The one way this project writes a file: yields a temporary name (path + '.tmp') to write
    to, renamed over `path` only when the block ends without an error, so a kill or a full disk
    never leaves half a file (checkpoints, the teacher store, results.json, converted data)."""
    yield path + ".tmp"
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def load_file(path, device="cpu"):
    """torch.load(path, weights_only=True), with one-line errors: no file, a truncated or
    corrupt file, or a pickled file (which we refuse to unpickle: it could run any code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a weights-only checkpoint (it holds pickled objects); "
                         "we will not unpickle it, since unpickling can run arbitrary code") from None
    except (RuntimeError, EOFError) as e:  # a truncated zip archive, an empty file
        raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]})") from None


def finite_weights(*modules):  # False if any floating tensor of their state holds a NaN or inf
    return all(torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point())


def save_checkpoint(path, model, heads, optimizer, step, config, flops=None):
    """Write to a temp file, then rename: a killed run never leaves a half-written ckpt.pt.
    Weights with a NaN or inf are never written (the good checkpoint on disk stays): False then."""
    if not finite_weights(model, heads):
        return False
    state = {"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "model_config": asdict(model.cfg), "config": config, "flops": flops,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with atomic(path) as tmp:
        torch.save(state, tmp)
    return True


def load_for_resume(path, model, heads, optimizer, config, must_match=()):
    """Continue a run: its weights, optimiser state and RNG, if the flags that decide the run
    (must_match: keys of config, train.RESUME_MUST_MATCH) are the checkpoint's. -> (step, the
    student's FLOPs so far, None for a checkpoint that had no count)."""
    ckpt = load_file(path, config["device"])
    diff = [k for k in must_match if ckpt["config"].get(k, config[k]) != config[k]]  # absent: older flag
    if diff:
        raise SystemExit("error: cannot resume " + path + ": " + ", ".join(
            f"--{k.replace('_', '-')} was {ckpt['config'].get(k)!r}, now {config[k]!r}" for k in diff)
            + f" (pass the flags it was made with, or move {os.path.dirname(path) or '.'} away to start afresh)")
    if CLIPConfig(**ckpt["model_config"]).merges != model.cfg.merges:
        raise SystemExit(f"error: cannot resume {path}: the tokenizer learned from the data now differs from the "
                         "checkpoint's (the training captions changed)")
    model.load_state_dict(ckpt["model"])
    heads.load_state_dict(ckpt["heads"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # RNG states are CPU tensors, also when loaded onto CUDA
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in ckpt["rng"]["cuda"]])
    return ckpt["step"], ckpt.get("flops")  # no "flops": an older checkpoint, the count is unknown


def trim_log(path, step):
    """Drop log lines past the checkpoint's step (a killed run may have logged beyond it)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with atomic(path) as tmp, open(tmp, "w") as f:
            f.writelines(lines)


def load_checkpoint(path, device="cpu"):
    """A run folder or a ckpt.pt of train.py -> (CLIP model, the run's saved config dict)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    ckpt = load_file(path, device)
    model = CLIP(CLIPConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt["config"]


def load(path, device="cpu"):
    """A run folder or ckpt.pt -> (model, preprocess, tokenize), as open_clip's
    create_model_and_transforms: the model in eval mode; preprocess: PIL images or paths -> its
    input (CLIP.preprocess); tokenize: strings -> its ids (CLIP.tokenize). encode_image and
    encode_text also take the images and strings themselves."""
    model, _ = load_checkpoint(path, device)
    return model.eval(), model.preprocess, model.tokenize


if __name__ == "__main__":
    for name in SIZES:
        m = build(name)
        print(f"{name:8s} {count_params(m) / 1e6:6.2f}M params, {m.cfg.image_size} px, {m.cfg.context_length} tokens  "
              f"(image {count_params(m.visual) / 1e6:.2f}M, text {count_params(m.text) / 1e6:.2f}M)")
