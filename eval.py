"""Evaluation: zero-shot classification, image-text retrieval, linear probe, pictures and plots.

- Zero-shot (Radford et al. 2021, Sec. 3.1.4): each class is the mean of its prompt-template
  text embeddings, renormalised; an image takes the class of highest cosine (`zero_shot`).
- Retrieval: recall@k, image->text and text->image; pairs with the same caption string are one
  right answer, and a tie with a wrong candidate is a miss.
- Linear probe: multinomial logistic regression on frozen, normalised image features, in torch
  (L-BFGS), its weight decay chosen on a validation split, then scored once on the test split.
- On the embedded set: seen and unseen classes, attributes, vocabulary tiers; on named torchvision
  sets; on your pairs' held-out part (and its class names).
- The closing table a run prints; its plots: loss curves, a text-space PCA (its pictures of clusters and
  duplicate groups: losses.py).

`evaluate(model, ...)` is what train.py calls at the end of a run; `python eval.py --ckpt DIR` runs
the same on a saved checkpoint (into DIR/eval.json); `--curves DIR ...` plots runs side by side.
Knowledge-CLIP's other evaluations: docs/em_probe.py (EM, vocabulary tiers), docs/attributes.py (AWA2,
CUB); your own images and the Hugging Face export: docs/use_student.py.
"""
import argparse
import gzip
import json
import os
import shutil

import torch
import torch.nn.functional as F

import clip
import data


@torch.no_grad()
def embed_images(model, images_uint8, device, batch_size=500):  # (N, 3, S, S) uint8 -> (N, D)
    model.eval()
    return torch.cat([model.encode_image(clip.to_input(images_uint8[i:i + batch_size], device)).float().cpu()
                      for i in range(0, len(images_uint8), batch_size)])


@torch.no_grad()
def embed_texts(model, captions, device, batch_size=500):  # list of N str -> (N, D)
    model.eval()
    return torch.cat([model.encode_text(model.tokenize(captions[i:i + batch_size]).to(device)).float().cpu()
                      for i in range(0, len(captions), batch_size)])


def zero_shot_classifier(model, classnames, templates, device):
    """(C, D): for each class, the renormalised mean of its normalised prompt embeddings."""
    weights = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        weights.append(F.normalize(embed_texts(model, prompts, device).mean(0), dim=0))
    return torch.stack(weights)


def top1(scores, labels, candidates=None):
    """% top-1 of (N, C) scores; with candidates (C,) bool, only images of those classes, ranked among them."""
    if candidates is not None:
        keep = candidates[labels]
        scores, labels = scores[keep][:, candidates], (candidates.cumsum(0) - 1)[labels[keep]]
    return 100.0 * scores.argmax(1).eq(labels).float().mean().item()


def retrieval(image_emb, text_emb, captions=None, ks=(1, 5, 10)):
    """Recall@k (%) both ways, and n_pairs: how many pairs the figures are over.

    Right answers (the COCO convention of several correct captions per image): pairs whose
    caption strings are identical are one answer, in both directions, so image i may retrieve
    any caption equal to its own and a caption any image whose caption equals it (captions
    None: pair i alone). A query's rank is how many wrong candidates score at least as high as
    its best right one: an exact tie counts as a miss, so a collapsed tower cannot score above
    chance (a text tower that maps every caption to one vector scores 0 image->text)."""
    sim = image_emb.float() @ text_emb.float().t()  # (N, N)
    n = len(sim)
    if captions is None:
        group = torch.arange(n)
    else:
        ids = {}
        group = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])  # (N,) one id per distinct caption
    right = group[:, None] == group[None, :]  # (N, N) symmetric: image i and caption j match
    out = {"retrieval_n_pairs": n}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        best = s.masked_fill(~right, float("-inf")).max(1, keepdim=True).values  # (N, 1) best right score
        rank = ((s >= best) & ~right).sum(1)  # (N,) wrong candidates at or above it
        for k in ks:
            out[f"retrieval_{name}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    return out


def fit_logistic(x, y, n_classes, weight_decay, iters=100):
    """Multinomial logistic regression by full-batch L-BFGS. x (N, D), y (N,) -> (W (D, C), b (C,))."""
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(train, val, test, n_classes, decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)):
    """train/val/test: (features, labels). Weight decay chosen by validation accuracy; the
    test split is touched once. Returns (test top-1 %, chosen decay)."""
    def acc(Wb, split):
        return 100.0 * (split[0] @ Wb[0] + Wb[1]).argmax(1).eq(split[1]).float().mean().item()
    fits = {wd: fit_logistic(*train, n_classes, wd) for wd in decays}
    best = max(decays, key=lambda wd: acc(fits[wd], val))
    return acc(fits[best], test), best


# ----------------------------------------------------------------------------------------
# Prompts: every prompt template of the evaluation, in one place (ours unless said).

SHAPE_PROMPTS = ["a photo of {}", "{} on a dark background"]  # the embedded set; {} = 'a red circle'
SET_PROMPTS = {  # torchvision sets, by name; the rest take DEFAULT_PROMPTS (after CLIP's ImageNet prompts)
    "fashion-mnist": ["a photo of a {}.", "a photo of the {}, a type of clothing.", "a black and white photo of a {}."],
    "mnist": ['a photo of the number: "{}".', "a handwritten digit {}."],
}
DEFAULT_PROMPTS = ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the small {}.", "a low resolution photo of a {}."]
LABEL_PROMPTS = ["{}", "a photo of a {}."]  # your own data's class names (--csv-label-key): bare, and CLIP's first
ATTRIBUTE_PROMPTS = {"shape": data.SHAPES, "colour": data.COLOURS, "size": [f"{s} shape" for s in data.SIZES],
                     "pos": [f"shape in the {p}" for p in data.POSITIONS]}  # the embedded set's attributes, in SHAPE_PROMPTS


@torch.no_grad()
def zero_shot(model, images, classnames, templates=LABEL_PROMPTS, device="cpu"):
    """CLIP's zero-shot classifier (Sec. 3.1.4) on any images: PIL images or paths (read as
    training reads them, clip.load_image) or (N, 3, S, S) uint8 -> (N, C) probabilities over
    classnames: softmax of exp(t) x the cosine to each class's prompt-ensembled embedding."""
    if not torch.is_tensor(images):
        images = torch.stack([clip.load_image(x, model.cfg.image_size) for x in images])
    scores = embed_images(model, images, device) @ zero_shot_classifier(model, classnames, templates, device).t()  # (N, C)
    return (model.logit_scale.exp().item() * scores).softmax(1)


# ----------------------------------------------------------------------------------------
# The embedded set: zero-shot on seen and unseen shape x colour combinations, per attribute,
# retrieval on the test pairs and on the held-out wordings, linear probe over all 64 classes.


def classifier_for(model, names, device):
    return zero_shot_classifier(model, [data.with_article(n) for n in names], SHAPE_PROMPTS, device)


def eval_shapes(model, device, seed=0, n_test=2000):
    S, n_probe, n_val = model.cfg.image_size, 2 * n_test, n_test // 2
    splits = {name: data.ShapesDataset(name, n, seed=seed, image_size=S)
              for name, n in (("test", n_test), ("probe", n_probe), ("val", n_val), ("wordings", n_test))}
    test = splits["test"]
    img = {k: embed_images(model, v.images, device) for k, v in splits.items()}
    lab = {k: v.attributes["label"] for k, v in splits.items()}
    seen = ~torch.isin(lab["test"], torch.tensor(data.UNSEEN_CLASSES))  # (n_test,) bool
    class_scores = img["test"] @ classifier_for(model, data.CLASS_NAMES, device).t()  # (n_test, 64)
    res = {"zero_shot_top1": top1(class_scores[seen], lab["test"][seen]),
           "zero_shot_unseen_top1": top1(class_scores[~seen], lab["test"][~seen])}
    # Attributes: zero-shot over each attribute's values ('a red' ... ; 'a small shape' ...), then the
    # 64 classes composed from attribute scores alone: cos(shape prompt) + cos(colour prompt).
    cos = {k: img["test"] @ classifier_for(model, names, device).t() for k, names in ATTRIBUTE_PROMPTS.items()}
    res.update({f"zero_shot_{k}_top1": top1(cos[k], test.attributes[k]) for k in cos})
    by_attr = (cos["shape"][:, :, None] + cos["colour"][:, None, :]).flatten(1)  # (n_test, 64), shape * 8 + colour
    res["zero_shot_by_attributes_top1"] = top1(by_attr[seen], lab["test"][seen])
    res["zero_shot_by_attributes_unseen_top1"] = top1(by_attr[~seen], lab["test"][~seen])
    for tier, key in (("rare", "rare"), ("never-seen", "never")):  # the same 64 classes, prompts in that tier's words
        names = [f"{data.tier_words(data.COLOURS[c % 8], tier)[0]} {data.tier_words(data.SHAPES[c // 8], tier)[0]}"
                 for c in range(64)]
        scores = img["test"] @ classifier_for(model, names, device).t()
        res[f"zero_shot_{key}_words_top1"] = top1(scores[seen], lab["test"][seen])
    res.update({f"text_probe_{k}": v for k, v in tier_probe(lambda t: embed_texts(model, t, device)).items()})
    res.update(retrieval(img["test"], embed_texts(model, test.captions, device), test.captions))
    held = retrieval(img["wordings"], embed_texts(model, splits["wordings"].captions, device), splits["wordings"].captions,
                     ks=(1,))
    res["retrieval_heldout_wordings_i2t_r1"] = held["retrieval_i2t_r1"]  # captions in held-out words
    res["linear_probe_top1"], res["linear_probe_wd"] = linear_probe(
        (img["probe"], lab["probe"]), (img["val"], lab["val"]), (img["test"], lab["test"]), 64)
    return res


def validate_shapes(model, device, seed=0, n=2000):
    """Zero-shot on the validation split (the seed's random stream 1: drawn like the test split,
    all 64 combinations, never trained on, never the test pairs). What settings are chosen by
    (train.py --eval-split val; docs/reproduce.py --tune); no test number is computed."""
    val = data.ShapesDataset("val", n, seed=seed, image_size=model.cfg.image_size)
    label = val.attributes["label"]  # (n,)
    scores = embed_images(model, val.images, device) @ classifier_for(model, data.CLASS_NAMES, device).t()  # (n, 64)
    seen = ~torch.isin(label, torch.tensor(data.UNSEEN_CLASSES))
    return {"val_zero_shot_top1": top1(scores[seen], label[seen]), "val_zero_shot_unseen_top1": top1(scores[~seen], label[~seen]),
            "val_zero_shot_all_top1": top1(scores, label), "val_n": n}


# Vocabulary tiers (data.WORDS: common, rare, never-seen words). Above: zero-shot with the class
# prompts worded in each tier. Here: a text-space probe. A word is placed in the 8 phrases 'a photo
# of a ruby circle', ... (the other attribute's common words), embedded, normalised and averaged;
# it is right when its nearest of the 8 first common words of its attribute ('red', 'orange', ...)
# is its own value's. The common tier asks the second common word ('scarlet' -> 'red').

def word_vectors(encode, words, kind):  # encode: list of str -> (N, D); kind 'colour' or 'shape' -> (W, D)
    others = data.SHAPES if kind == "colour" else data.COLOURS
    phrases = [SHAPE_PROMPTS[0].format(data.with_article(f"{w} {o}" if kind == "colour" else f"{o} {w}"))
               for w in words for o in others]
    e = F.normalize(encode(phrases).float(), dim=-1).view(len(words), len(others), -1)  # (W, 8, D)
    return F.normalize(e.mean(1), dim=-1)


def nearest_word_hits(queries, candidates, targets):  # (Q, D), (C, D), (Q,) -> (Q,) bool: nearest is the target
    return (queries @ candidates.t()).argmax(1) == targets


def tier_hits(encode):
    """{tier: [(word, right?)]} for each colour and shape word of each tier (data.TIERS)."""
    res = {}
    for tier in data.TIERS:
        res[tier] = []
        for kind, values in (("colour", data.COLOURS), ("shape", data.SHAPES)):
            candidates = word_vectors(encode, [data.tier_words(v, "common")[0] for v in values], kind)  # (8, D)
            words = [(w, i) for i, v in enumerate(values) for w in data.tier_words(v, tier)[tier == "common":]]
            queries = word_vectors(encode, [w for w, _ in words], kind)  # (Q, D)
            right = nearest_word_hits(queries, candidates, torch.tensor([i for _, i in words]))
            res[tier] += [(w, bool(r)) for (w, _), r in zip(words, right)]
    return res


def percent_right(hits):  # [(word, right?)] -> % right
    return 100.0 * sum(r for _, r in hits) / len(hits)


def tier_probe(encode):
    """{tier key: % of the tier's colour and shape words whose nearest common word is right}."""
    return {key: percent_right(hits) for key, hits in zip(("common", "rare", "never"), tier_hits(encode).values())}


# ----------------------------------------------------------------------------------------
# Named sets through torchvision: images, labels, class names; zero-shot and a linear probe.

EVAL_SETS = {  # name: (torchvision class, how to ask for the test split)
    "cifar10": ("CIFAR10", {"train": False}), "cifar100": ("CIFAR100", {"train": False}),
    "fashion-mnist": ("FashionMNIST", {"train": False}), "mnist": ("MNIST", {"train": False}),
    "stl10": ("STL10", {"split": "test"}),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def prepare_fashion_mnist(root):
    """torchvision's FashionMNIST reads ROOT/FashionMNIST/raw/*-ubyte. Debian's
    dataset-fashion-mnist ships the same files gzipped: unpack them there once, offline."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        dst, src = os.path.join(raw, name), os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")
        if not os.path.exists(dst) and os.path.exists(src):
            os.makedirs(raw, exist_ok=True)
            with clip.atomic(dst) as tmp, gzip.open(src) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def open_eval_set(name, root, train=False):
    """The torchvision dataset object of a named set's test (or train) split. Never downloads:
    a missing set is one clear error saying where it was looked for."""
    import torchvision.datasets as tvd
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r}; choose one of {', '.join(EVAL_SETS)}")
    cls_name, split = EVAL_SETS[name]
    if train:
        split = {"split": "train"} if "split" in split else {"train": True}
    if name == "fashion-mnist":
        prepare_fashion_mnist(root)
    try:
        return getattr(tvd, cls_name)(root, download=False, **split)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(f"eval set {name} not found under {root} ({e}); fetch it once with "
                                f"torchvision.datasets.{cls_name}({root!r}, download=True)") from None


def load_eval_set(name, root, image_size, max_n=None, train=False):
    """A named torchvision set as (images (N, 3, S, S) uint8, labels (N,), class names):
    its first max_n images (said in one line when that is not all of them)."""
    ds = open_eval_set(name, root, train)
    n = len(ds) if max_n is None else min(max_n, len(ds))
    if n < len(ds):
        print(f"{name}: the first {n} of the {len(ds)} {'train' if train else 'test'} images")
    images = torch.stack([clip.load_image(ds[i][0], image_size) for i in range(n)])
    labels = torch.tensor([int(ds[i][1]) for i in range(n)])
    classes = [c.replace("_", " ") for c in ds.classes]
    if name == "mnist":
        classes = [c.split(" - ")[1] for c in classes]
    return images, labels, classes


def check_eval_set(name, root):
    """A one-line FileNotFoundError now if an --eval-sets set is not under root (train.py asks
    before it trains, so a missing set never costs a run); the probe needs the train split too."""
    open_eval_set(name, root), open_eval_set(name, root, train=True)


def eval_named_set(model, name, root, device, max_n=5000):
    """Zero-shot and linear probe on a torchvision set (train split for the probe, 10% of it as val)."""
    S = model.cfg.image_size
    images, labels, classes = load_eval_set(name, root, S, max_n=max_n)
    emb = embed_images(model, images, device)
    prompts = SET_PROMPTS.get(name, DEFAULT_PROMPTS)
    res = {f"{name}_zero_shot_top1": top1(emb @ zero_shot_classifier(model, classes, prompts, device).t(), labels)}
    tr_images, tr_labels, _ = load_eval_set(name, root, S, max_n=max_n, train=True)
    tr = embed_images(model, tr_images, device)
    n_val = len(tr) // 10
    res[f"{name}_linear_probe_top1"], _ = linear_probe((tr[n_val:], tr_labels[n_val:]), (tr[:n_val], tr_labels[:n_val]),
                                                       (emb, labels), len(classes))
    res.update({f"{name}_n_test": len(labels), f"{name}_n_train": len(tr_labels)})  # images scored (at most max_n each)
    return res


def eval_real_pairs(model, pairs, device, val_frac=0.02, max_n=2000):
    """Retrieval on the held-out pairs of a CSV / shard set (data.Pairs; those whose key is_val
    picks at val_frac: the same for every seed), and, where the pairs have class names (a CSV's
    label column), zero-shot and a probe over them."""
    pairs = pairs.at_size(model.cfg.image_size)
    found = readable(pairs, [i for i, k in enumerate(pairs.keys) if data.is_val(k, val_frac)], max_n)
    if len(found) < 2:
        print(f"eval: only {len(found)} held-out pairs (raise --val-frac); retrieval skipped")
        return {}
    images, captions = torch.stack([p[0] for p in found]), [p[1] for p in found]
    emb = embed_images(model, images, device)  # (n, D)
    res = retrieval(emb, embed_texts(model, captions, device), captions)
    if getattr(pairs, "labels", None) is not None:
        rest = [i for i, k in enumerate(pairs.keys) if not data.is_val(k, val_frac) and pairs.labels[i]]
        probe = readable(pairs, rest[::max(1, len(rest) // max_n)], max_n)  # evenly spread over the file
        res.update(eval_labelled_pairs(model, pairs.labels, (emb, [p[2] for p in found]),
                                       (embed_images(model, torch.stack([p[0] for p in probe]), device), [p[2] for p in probe])
                                       if len(probe) >= 10 else None, device))
    return res


def readable(pairs, rows, max_n):  # the first max_n of these rows that can be read: [(image, caption, row)]
    found = []
    for i in rows:
        item = pairs[i]
        if not isinstance(item, str):  # a string: a pair that could not be read (data.skipped)
            found.append(item)
        if len(found) >= max_n:
            break
    return found


def eval_labelled_pairs(model, labels, held, probe, device):
    """Zero-shot over the class names of a CSV's label column (--csv-label-key) on the held-out
    pairs, top-1 and mean per class (with the majority class's share: what always answering it
    scores), and a linear probe trained on `probe` (other pairs of the file; 10% of them as
    val). held, probe: (image embeddings (n, D), their rows); labels: a name per row."""
    classes = sorted({name for name in labels if name})
    index = {name: c for c, name in enumerate(classes)}
    emb, rows = held
    keep = [j for j, i in enumerate(rows) if labels[i]]  # held-out pairs that have a class
    if len(keep) < 2 or len(classes) < 2:
        print("eval: fewer than 2 labelled held-out pairs or classes; zero-shot over --csv-label-key skipped")
        return {}
    emb, y = emb[keep], torch.tensor([index[labels[rows[j]]] for j in keep])  # (n, D), (n,)
    scores = emb @ zero_shot_classifier(model, classes, LABEL_PROMPTS, device).t()  # (n, C)
    own = scores.gather(1, y[:, None])  # (n, 1)
    right = (scores.scatter(1, y[:, None], float("-inf")) < own).all(1).float()  # above every other class: a tie misses
    res = {"zero_shot_top1": 100.0 * right.mean().item(),
           "zero_shot_per_class_top1": 100.0 * torch.stack([right[y == c].mean() for c in y.unique()]).mean().item(),
           "zero_shot_majority": 100.0 * torch.bincount(y).max().item() / len(y), "zero_shot_classes": len(classes),
           "zero_shot_n": len(y)}
    if probe is not None:
        p_emb, p_rows = probe
        p_y = torch.tensor([index[labels[i]] for i in p_rows])
        n_val = len(p_y) // 10
        res["linear_probe_top1"], _ = linear_probe((p_emb[n_val:], p_y[n_val:]), (p_emb[:n_val], p_y[:n_val]), (emb, y),
                                                   len(classes))
    return res


def evaluate(model, device, seed=0, n_eval=2000, pairs=None, val_frac=0.02, eval_sets=(), data_root=None,
             validation=False):
    """Everything results.json reports about one model: on the embedded set drawn from `seed`
    (pairs None) or on your pairs' held-out part, then on the named `eval_sets` under data_root.
    validation: the embedded set's validation split alone (train.py --eval-split val)."""
    if validation:
        return validate_shapes(model, device, seed=seed, n=n_eval)
    res = eval_shapes(model, device, seed=seed, n_test=n_eval) if pairs is None else \
        eval_real_pairs(model, pairs, device, val_frac)
    for name in eval_sets:
        res.update(eval_named_set(model, name, data_root, device))
    return res


def evaluate_run(model, cfg, device, eval_sets=None, data_root=None):
    """evaluate() with a run's saved flags (a checkpoint's config): its data read again."""
    pairs = None if cfg["data"] in data.EMBEDDED else data.real_pairs(
        cfg["data"], model.cfg.image_size, cfg["csv_img_key"], cfg["csv_caption_key"], cfg.get("csv_key"),
        cfg.get("store") and os.path.join(cfg["store"], "scans"), cfg.get("csv_label_key"))
    return evaluate(model, device, cfg["seed"], cfg["n_eval"], pairs, cfg.get("val_frac", 0.02),
                    cfg.get("eval_sets", []) if eval_sets is None else eval_sets, data_root or cfg.get("data_root"),
                    validation=cfg.get("eval_split", "test") == "val")


# ----------------------------------------------------------------------------------------
# The closing table a run prints: the student beside its teachers and plain CLIP.

CLOSING = [("zero_shot_top1", "zero-shot"), ("zero_shot_unseen_top1", "unseen"), ("linear_probe_top1", "probe"),
           ("retrieval_i2t_r1", "R@1 i2t"), ("retrieval_t2i_r1", "R@1 t2i"), ("pairs_trained_on", "pairs"),
           ("wall_seconds", "seconds")]


def closing_table(rows):
    """What a run prints at its end, read in five seconds: [(name, results dict)] -> aligned lines of the
    CLOSING columns (a validation run's val_ numbers where it has no test ones; '-': not measured)."""
    def cell(r, key):
        v = r.get(key, r.get("val_" + key))
        return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.1f}"
    lines = [[""] + [c for _, c in CLOSING]] + [[name] + [cell(r, k) for k, _ in CLOSING] for name, r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def closing_rows(method, seed, results, reference=None):
    """The run's closing table: the student, its teachers (a CLIP teacher's own numbers from its record: the
    pretrained one's manifest or an own teacher's results.json; a text teacher has no image numbers) and plain
    CLIP on the same data and seed (train.clip_reference's (results, where from)). -> (rows, notes: where each row's
    numbers come from). Everything else is in results.json."""
    rows, notes = [(f"student ({method})", results)], []
    record = results.get("teacher_results")
    if "teacher" in results and record and "results" in record:  # a manifest: its evaluation, its pool, its training
        rows.append((f"teacher {os.path.basename(results['teacher'])}", {
            **record["results"], "pairs_trained_on": record["pool"]["n"], "wall_seconds": record["train_seconds"]}))
        notes.append("teacher: its manifest's numbers" + (f" (seed {record['pool']['seed']}'s test set)"
                                                          if record["pool"]["seed"] != seed else ""))
    elif "teacher" in results:
        rows.append((f"teacher {os.path.basename(results['teacher'])}", record or {}))
        notes.append(f"teacher: {'its results.json' if record else 'no record of its own numbers'}")
    if "text_teacher" in results:
        rows.append((f"text teacher {results['text_teacher'].split('@')[0]}", {}))
        notes.append("text teacher: a text model, no image numbers")
    if reference is not None:
        rows.append(("plain CLIP, same data and seed", reference[0]))
        notes.append(f"plain CLIP: {reference[1] or 'trained now'}")
    return rows, notes


# ----------------------------------------------------------------------------------------
# Plots. matplotlib is an optional extra: without it, a run says so in one line and goes on.

def pyplot():
    """matplotlib.pyplot drawing to files only, or None (with one line) when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return None


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(logs, path):
    """Training curves: one panel per loss term, one line per run. logs: {label: log.jsonl records}."""
    plt = pyplot()
    if plt is None:
        return
    terms = [t for t in ("loss", "clip", "emb", "concept", "cd", "id") if any(t in r for rs in logs.values() for r in rs)]
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(terms):]:
        ax.axis("off")
    for ax, term in zip(axes.flat, terms):
        for i, (label, records) in enumerate(logs.items()):
            points = [(r["step"], r[term]) for r in records if term in r]
            if points:
                ax.plot(*zip(*points), color=f"C{i}", label=label)  # one colour per run in every panel
        ax.set(title=term, xlabel="step", yscale="log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def pca_2d(x):  # (N, D) -> (N, 2)
    """The centred rows of x on their first two principal directions (right singular vectors)."""
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # (D', D), rows by decreasing variance
    return x @ vh[:2].t()


def plot_text_pca(panels, labels, path):
    """Knowledge-CLIP's Figures 4-5 at our scale: a 2-D PCA of caption embeddings, one panel per
    encoder (e.g. the teacher's L(x) and the student's T_e), points coloured by concept.
    panels: {title: (N, D) embeddings of the same N captions}; labels (N,) concept ids."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, emb) in zip(axes[0], panels.items()):
        xy = pca_2d(F.normalize(emb.float(), dim=-1))
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=3)
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a CLIP checkpoint (zero-shot, retrieval, linear probe), or plot "
                                "runs' loss curves. Elsewhere: the EM and vocabulary probes (docs/em_probe.py), AWA2 and "
                                "CUB (docs/attributes.py), your own images and the Hugging Face export (docs/use_student.py).")
    p.add_argument("--ckpt", help="run folder (DIR/ckpt.pt) or checkpoint file")
    p.add_argument("--curves", nargs="+", metavar="DIR", help="plot these runs' loss curves side by side into --out")
    p.add_argument("--out", default="curves.png", help="with --curves: the PNG to write")
    p.add_argument("--eval-sets", nargs="*", default=None, help="torchvision sets, e.g. fashion-mnist cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists the flags)\n")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here")
    if a.curves:
        missing = [d for d in a.curves if not os.path.exists(os.path.join(d, "log.jsonl"))]
        if missing:
            raise SystemExit(f"error: no log.jsonl in {', '.join(missing)}")
        return plot_curves({d: read_log(d) for d in a.curves}, a.out)
    if a.ckpt is None:
        p.error("give --ckpt DIR (or --curves DIR ...)")
    try:
        model, cfg = clip.load_checkpoint(a.ckpt, a.device)
        res = evaluate_run(model, cfg, a.device, a.eval_sets, a.data_root)
    except (OSError, ValueError) as e:  # a missing file or folder, unreadable input
        raise SystemExit(f"error: {e}") from None
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:{width}s} {v:8.2f}" if isinstance(v, float) else f"{k:{width}s} {v}")
    out = os.path.join(a.ckpt if os.path.isdir(a.ckpt) else os.path.dirname(a.ckpt), "eval.json")
    clip.write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
