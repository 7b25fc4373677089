"""Tests, one section per file: clip, losses, data, eval, train, kmeans.
Run: python -m pytest -q test_all.py   (CPU, offline, a few minutes)."""
import csv
import io
import json
import math
import os
import re
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import data
import eval as evaluation
import losses
import train

torch.set_num_threads(2)


# ========================================================================================
# clip.py

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


def test_text_encoder_ignores_padding_after_eot():
    """The causal mask makes the EOT state independent of what follows; the batch-wise trim of
    padding columns must therefore not change a caption's embedding."""
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    short = m.tokenize(["a red circle"])
    both = m.tokenize(["a red circle", "a much longer caption about a purple hexagon in the top right"])
    with torch.no_grad():
        assert torch.allclose(m.encode_text(short)[0], m.encode_text(both)[0], atol=1e-5)


# ========================================================================================
# losses.py

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


# ========================================================================================
# data.py

HELD_OUT_WORDS = [w[-1] for w in data.WORDS.values()]


def has_word(caption, word):
    return re.search(r"\b" + re.escape(word) + r"\b", caption) is not None


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


def write_png(path, colour=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


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
    ds = data.CsvPairs(str(tmp_path / "pairs.csv"), 16)
    assert len(ds) == 5 and ds.skipped_empty == 1
    images, captions, skipped = data.collate([ds[i] for i in range(len(ds))])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert captions == ["a red box", "another", "third"] and skipped == 2
    # TSV with other column names, and a clear error for a wrong key
    with open(tmp_path / "pairs.tsv", "w") as f:
        f.write("img\tcap\nok0.png\thello\n")
    assert len(data.CsvPairs(str(tmp_path / "pairs.tsv"), 16, img_key="img", caption_key="cap")) == 1
    with pytest.raises(ValueError, match="no column filepath"):
        data.CsvPairs(str(tmp_path / "pairs.tsv"), 16)


def test_val_split_is_disjoint_and_seeded(tmp_path):
    for i in range(40):
        write_png(tmp_path / f"{i}.png")
    with open(tmp_path / "p.csv", "w") as f:
        f.write("filepath,title\n" + "".join(f"{i}.png,caption {i}\n" for i in range(40)))
    tr = data.CsvPairs(str(tmp_path / "p.csv"), 8, split="train", seed=0, val_frac=0.25)
    va = data.CsvPairs(str(tmp_path / "p.csv"), 8, split="val", seed=0, val_frac=0.25)
    assert len(tr) + len(va) == 40 and 3 <= len(va) <= 20
    assert not {r[0] for r in tr.rows} & {r[0] for r in va.rows}


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def png_bytes(colour=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


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
    ds = data.ShardPairs(str(tmp_path / "s-{00..02}.tar"), 8)
    images, captions, skipped = data.collate(list(ds))
    assert sorted(captions) == ["a blue square", "green"] and images.shape == (2, 3, 8, 8)
    assert skipped == 4  # corrupt image, missing caption, empty caption, unreadable shard
    with pytest.raises(FileNotFoundError, match="1 of 2 shards"):
        data.ShardPairs(str(tmp_path / "s-{01,09}.tar"), 8)


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_through_torchvision(tmp_path):
    images, labels, classes, templates = data.load_eval_set("fashion-mnist", str(tmp_path), 32, max_n=50)
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) > 3
    assert classes[0] == "T-shirt/top" and len(classes) == 10 and "{}" in templates[0]
    assert (images[:, 0] == images[:, 1]).all()  # grey images, made RGB
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        data.load_eval_set("cifar10", str(tmp_path), 32)


# ========================================================================================
# eval.py

def test_retrieval_hand_cases():
    e = torch.eye(4)
    r = evaluation.retrieval(e, e)
    assert r["retrieval_i2t_r1"] == 100 and r["retrieval_t2i_r1"] == 100
    # text 0 and 1 swapped: images 0, 1 find the wrong caption first (rank 1), 2 and 3 are right
    t = e[[1, 0, 2, 3]]
    r = evaluation.retrieval(e, t, ks=(1, 2))
    assert r["retrieval_i2t_r1"] == 50 and r["retrieval_i2t_r2"] == 100 and r["retrieval_t2i_r1"] == 50


def test_zero_shot_classifier_is_renormalised_mean():
    torch.manual_seed(0)
    m = clip.build("tiny").eval()
    w = evaluation.zero_shot_classifier(m, ["red circle", "blue star"], ["a {}", "a photo of a {}"], "cpu")
    direct = F.normalize(evaluation.embed_texts(m, ["a red circle", "a photo of a red circle"], "cpu").mean(0), dim=0)
    assert torch.allclose(w[0], direct, atol=1e-6) and torch.allclose(w.norm(dim=1), torch.ones(2))
    assert evaluation.top1(torch.stack([w[1], w[0]]), w, torch.tensor([1, 0])) == 100


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


# ========================================================================================
# train.py

def run(tmp_path, *extra, name="run"):
    args = ["--model", "tiny", "--steps", "30", "--batch-size", "64", "--n-train", "1000", "--n-eval", "200",
            "--warmup", "5", "--log-every", "5", "--ckpt-every", "10", "--out", str(tmp_path / name), *extra]
    return train.main(args)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_short_training_run_learns(tmp_path):
    res = run(tmp_path, "--steps", "80", "--lr", "3e-3", "--n-train", "2000")
    log = read_log(tmp_path / "run" / "log.jsonl")
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


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    run(tmp_path, name="whole")
    calls = {"n": 0}
    real_loss = losses.clip_loss

    def killed_at_step_17(*a):
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt
        return real_loss(*a)
    monkeypatch.setattr(losses, "clip_loss", killed_at_step_17)
    with pytest.raises(SystemExit, match="interrupted at step 17"):
        run(tmp_path, name="broken")
    monkeypatch.setattr(losses, "clip_loss", real_loss)
    ckpt = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 17
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path, name="broken")
    run(tmp_path, "--resume", name="broken")
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["step"] for r in read_log(tmp_path / "broken" / "log.jsonl")] == [5, 10, 15, 20, 25, 30]
    with pytest.raises(SystemExit, match="--batch-size was 64, now 32"):
        run(tmp_path, "--resume", "--batch-size", "32", name="broken")


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = losses.clip_loss

    def nan_at_step_12(*a):
        calls["n"] += 1
        out = real_loss(*a)
        return out * float("nan") if calls["n"] == 13 else out
    monkeypatch.setattr(losses, "clip_loss", nan_at_step_12)
    with pytest.raises(SystemExit, match="loss became nan at step 12"):
        run(tmp_path)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_clear_errors_for_bad_flags(tmp_path, capsys):
    for bad in (["--batch-size", "1"], ["--steps", "0"], ["--model", "huge"], ["--lr", "-1"], ["--method", "nope"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="no such file"):
        run(tmp_path, "--data", str(tmp_path / "missing.csv"))
    with pytest.raises(SystemExit, match="larger than the 1000 training pairs"):
        run(tmp_path, "--batch-size", "4000")


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
