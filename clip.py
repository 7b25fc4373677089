"""CLIP from scratch: a ViT image tower, a causal Transformer text tower, one joint space.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Figure 3 (the numpy-like pseudocode, also Figure 2 of Knowledge-CLIP):

    I_f = image_encoder(I)            # (B, d_i)
    T_f = text_encoder(T)             # (B, d_t)
    I_e = l2_normalize(I_f @ W_i)     # (B, D)
    T_e = l2_normalize(T_f @ W_t)     # (B, D)
    logits = I_e @ T_e.T * exp(t)     # (B, B)

This file holds everything up to `logits`; the loss lives in losses.py.
Read it top to bottom: tokenizer -> Transformer block -> the two towers -> CLIP -> sizes ->
checkpoints and `load` -> the export to Hugging Face.
"""
import math
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        crop (data.load_image), then normalised (data.to_input)."""
        import data  # here, not at the top: data.py imports this file
        images = images if isinstance(images, (list, tuple)) else [images]
        S = self.cfg.image_size
        return data.to_input(torch.stack([data.load_image(x, S) for x in images]), self.logit_scale.device)

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


def build(size="small", **overrides):
    """A CLIP of a named size; keyword overrides change single fields (e.g. image_size=64)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return CLIP(CLIPConfig(**{**asdict(SIZES[size]), **overrides}))


# ----------------------------------------------------------------------------------------
# Checkpoints: every .pt file of this project is read here, as weights only (no unpickling).

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


# ----------------------------------------------------------------------------------------
# Export to Hugging Face (transformers' CLIPModel, the same network under its names). Our towers
# are CLIP's (pre-norm blocks, exact GELU, LayerNorm eps 1e-5, class-token and end-of-text
# pooling, no projection bias), so the weights are renamed, not converted: the fused qkv is
# split into q, k, v and the projections W_i, W_t are transposed into nn.Linear weights. The
# tokenizer is rebuilt in the `tokenizers` library from the same parts: the pieces of WORD, the
# bytes, our merges in order, SOT ... EOT around the ids.

def hf_config(cfg):
    """Our CLIPConfig -> transformers.CLIPConfig: the sizes, exact GELU (transformers' default is
    quick_gelu), the text tower pooling at the first EOT (eos_token_id) and padding with PAD."""
    from transformers import CLIPConfig as HFConfig
    text = dict(vocab_size=N_BASE + len(cfg.merges), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                pad_token_id=PAD, bos_token_id=SOT, eos_token_id=EOT, projection_dim=cfg.embed_dim)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=cfg.embed_dim)
    return HFConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def hf_block(block, prefix):  # one Block -> {transformers' CLIPEncoderLayer name: tensor}
    out = {}
    for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("proj", "self_attn.out_proj"),
                         ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
        for kind in ("weight", "bias"):
            out[f"{prefix}.{theirs}.{kind}"] = block.get_submodule(ours).get_parameter(kind)
    for kind in ("weight", "bias"):  # qkv (3W, ...) rows: q, then k, then v, each head after head
        for name, part in zip("qkv", block.qkv.get_parameter(kind).chunk(3)):
            out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part
    return out


def hf_state_dict(model):
    """Our parameters under transformers' CLIPModel names."""
    v, t, out = model.visual, model.text, {}
    for prefix, ours in (("vision_model.pre_layrnorm", v.ln_pre), ("vision_model.post_layernorm", v.ln_post),
                         ("text_model.final_layer_norm", t.ln_final)):
        out.update({f"{prefix}.weight": ours.weight, f"{prefix}.bias": ours.bias})
    for i, b in enumerate(v.blocks):
        out.update(hf_block(b, f"vision_model.encoder.layers.{i}"))
    for i, b in enumerate(t.blocks):
        out.update(hf_block(b, f"text_model.encoder.layers.{i}"))
    out.update({"vision_model.embeddings.patch_embedding.weight": v.patchify.weight,
                "vision_model.embeddings.class_embedding": v.cls_token,
                "vision_model.embeddings.position_embedding.weight": v.pos_emb,
                "text_model.embeddings.token_embedding.weight": t.token_emb.weight,
                "text_model.embeddings.position_embedding.weight": t.pos_emb,
                "visual_projection.weight": model.image_proj.t(),  # (D, W): x @ W_i == Linear(x)
                "text_projection.weight": model.text_proj.t(), "logit_scale": model.logit_scale})
    return {k: x.detach().float().cpu().contiguous() for k, x in out.items()}


# WORD for the `tokenizers` library (Oniguruma regexes): Python's \w, \d and \s spelt out as the
# Unicode classes they mean in Python's re (\w: letters and every number, \d: decimal digits,
# \s: also the separators \x1c-\x1f). A letter run ([^\W\d_]) is then letters, letter-numbers
# and other numbers; '_' goes with the punctuation. Exact for every character Python's
# unicodedata knows; a character newer than it may split otherwise.
SPACE = r"\s\x{1c}-\x{1f}"
HF_WORD = (rf" ?[\p{{L}}\p{{Nl}}\p{{No}}]+| ?\p{{Nd}}+| ?[^{SPACE}\p{{L}}\p{{N}}]+|[{SPACE}]+(?![^{SPACE}])|[{SPACE}]+")


def byte_chars():
    """Byte -> the printable character GPT-2's byte-level BPE (and tokenizers' ByteLevel) writes it as."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = iter(range(256, 512))
    return {b: chr(b if b in keep else next(moved)) for b in range(256)}


SPECIAL = {PAD: "<|pad|>", SOT: "<|startoftext|>", EOT: "<|endoftext|>"}


def hf_tokenizer(cfg):
    """Our Tokenizer as a transformers tokenizer (a `tokenizers` BPE): the same ids for a caption
    called with truncation=True (cut to context_length, EOT kept), padded with PAD by
    padding="max_length" or padding=True. Special-token text in a caption is read as bytes, as ours
    reads it (split_special_tokens)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    char = byte_chars()
    strings = {b + 1: char[b] for b in range(256)}  # id -> its bytes as characters
    for i, (a, b) in enumerate(cfg.merges):
        strings[N_BASE + i] = strings[a] + strings[b]
    vocab = {s: i for i, s in strings.items()}
    if len(vocab) != len(strings):
        print(f"warning: {len(strings) - len(vocab)} merges give bytes another merge gives; the exported "
              "tokenizer gives one id for them")
    vocab.update({s: i for i, s in SPECIAL.items()})
    tok = HFTokenizer(models.BPE(vocab, [(strings[a], strings[b]) for a, b in cfg.merges]))
    pieces = [pre_tokenizers.Split(Regex(HF_WORD), behavior="removed", invert=True)] if cfg.merges else []  # as encode
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[SOT]} $A {SPECIAL[EOT]}", special_tokens=[(SPECIAL[SOT], SOT), (SPECIAL[EOT], EOT)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[SOT], eos_token=SPECIAL[EOT],
                                   pad_token=SPECIAL[PAD], model_max_length=cfg.context_length, padding_side="right",
                                   split_special_tokens=True)


def export_hf(model, out):
    """Write `out`, a folder that transformers' CLIPModel.from_pretrained, AutoTokenizer and
    AutoProcessor read offline: the weights (hf_state_dict), the tokenizer (hf_tokenizer) and a
    CLIPImageProcessor with our preprocessing (shorter side to S, bicubic; centre crop; MEAN, STD)."""
    import data  # here, not at the top: data.py imports this file
    from transformers import CLIPImageProcessor, CLIPModel as HFModel, CLIPProcessor
    hf = HFModel(hf_config(model.cfg))
    hf.load_state_dict(hf_state_dict(model))
    hf.save_pretrained(out)
    S = model.cfg.image_size
    images = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, resample=3,  # PIL's BICUBIC
                                image_mean=[data.MEAN] * 3, image_std=[data.STD] * 3)
    CLIPProcessor(image_processor=images, tokenizer=hf_tokenizer(model.cfg)).save_pretrained(out)
    return hf


if __name__ == "__main__":
    for name in SIZES:
        m = build(name)
        print(f"{name:8s} {count_params(m) / 1e6:6.2f}M params, {m.cfg.image_size} px, {m.cfg.context_length} tokens  "
              f"(image {count_params(m.visual) / 1e6:.2f}M, text {count_params(m.text) / 1e6:.2f}M)")
