"""Evaluation: zero-shot classification, image-text retrieval, linear probe, attributes, EM.

- Zero-shot (Radford et al. 2021, Sec. 3.1.4): each class is the mean of its prompt-template
  text embeddings, renormalised; an image takes the class of highest cosine.
- Retrieval: recall@k, image->text and text->image; pairs with the same caption string are one
  right answer, and a tie with a wrong candidate is a miss.
- Linear probe: multinomial logistic regression on frozen, normalised image features, in torch
  (L-BFGS), its weight decay chosen on a validation split, then scored once on the test split.
- Attributes (Knowledge-CLIP's AWA2 / CUB evaluation): zero-shot from attribute prompts.
- Vocabulary tiers: zero-shot and a text-space probe with rare and never-seen words.
- Pictures and plots a run writes: clusters, duplicate groups, loss curves, a text-space PCA.
(Knowledge-CLIP's EM text probe trains a model of its own: docs/em_probe.py.)

`evaluate(model, ...)` is what train.py calls at the end of a run; `python eval.py --ckpt DIR`
runs the same on a saved checkpoint (into DIR/eval.json); `--tiers` and `--curves` below;
`--images FOLDER` zero-shots your own images, `--export-hf OUT` writes a transformers folder.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import clip
import data
import teachers


@torch.no_grad()
def embed_images(model, images_uint8, device, batch_size=500):  # (N, 3, S, S) uint8 -> (N, D)
    model.eval()
    return torch.cat([model.encode_image(data.to_input(images_uint8[i:i + batch_size], device)).float().cpu()
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
ATTRIBUTE_SET_PROMPTS = {  # (class-name prompts, attribute prompts)
    "cub": (["a photo of a {}, a type of bird.", "a photo of a {}."], ["a photo of a bird with {}.", "a bird with {}."]),
    "awa2": (["a photo of a {}, a type of animal.", "a photo of a {}."], ["a photo of an animal: {}.", "a photo of a {} animal."]),
}
ATTRIBUTE_PROMPTS = {"shape": data.SHAPES, "colour": data.COLOURS, "size": [f"{s} shape" for s in data.SIZES],
                     "pos": [f"shape in the {p}" for p in data.POSITIONS]}  # the embedded set's attributes, in SHAPE_PROMPTS


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


def eval_named_set(model, name, root, device, max_n=5000):
    """Zero-shot and linear probe on a torchvision set (train split for the probe, 10% of it as val)."""
    S = model.cfg.image_size
    images, labels, classes = data.load_eval_set(name, root, S, max_n=max_n)
    emb = embed_images(model, images, device)
    prompts = SET_PROMPTS.get(name, DEFAULT_PROMPTS)
    res = {f"{name}_zero_shot_top1": top1(emb @ zero_shot_classifier(model, classes, prompts, device).t(), labels)}
    tr_images, tr_labels, _ = data.load_eval_set(name, root, S, max_n=max_n, train=True)
    tr = embed_images(model, tr_images, device)
    n_val = len(tr) // 10
    res[f"{name}_linear_probe_top1"], _ = linear_probe((tr[n_val:], tr_labels[n_val:]), (tr[:n_val], tr_labels[:n_val]),
                                                       (emb, labels), len(classes))
    res.update({f"{name}_n_test": len(labels), f"{name}_n_train": len(tr_labels)})  # images scored (at most max_n each)
    return res


def eval_real_pairs(model, args, device, pairs=None, max_n=2000):
    """Retrieval on the held-out pairs of a CSV / shard set (--val-frac, picked by key: the same
    for every seed), and with --csv-label-key zero-shot and a probe over the class names. pairs:
    the set as training read it (data.Pairs), else it is read again from args.data."""
    if pairs is None:
        store = getattr(args, "store", None)
        pairs = data.real_pairs(args.data, model.cfg.image_size, args.csv_img_key, args.csv_caption_key,
                                getattr(args, "csv_key", None), store and os.path.join(store, "scans"),
                                getattr(args, "csv_label_key", None))
    pairs = pairs.at_size(model.cfg.image_size)
    found = readable(pairs, [i for i, k in enumerate(pairs.keys) if data.is_val(k, args.val_frac)], max_n)
    if len(found) < 2:
        print(f"eval: only {len(found)} held-out pairs (raise --val-frac); retrieval skipped")
        return {}
    images, captions = torch.stack([p[0] for p in found]), [p[1] for p in found]
    emb = embed_images(model, images, device)  # (n, D)
    res = retrieval(emb, embed_texts(model, captions, device), captions)
    if getattr(pairs, "labels", None) is not None:
        rest = [i for i, k in enumerate(pairs.keys) if not data.is_val(k, args.val_frac) and pairs.labels[i]]
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


def evaluate(model, args, device, pairs=None):
    """Everything results.json reports about one model; `args` as train.py parses them (pairs:
    the real data set training read, so that it is not read again)."""
    if getattr(args, "eval_split", "test") == "val":
        return validate_shapes(model, device, seed=args.seed, n=args.n_eval)
    if args.data in data.EMBEDDED:
        res = eval_shapes(model, device, seed=args.seed, n_test=args.n_eval)
    else:
        res = eval_real_pairs(model, args, device, pairs)
    for name in args.eval_sets:
        if name in data.ATTRIBUTE_SETS:
            res.update(eval_attribute_set(model, name, args.data_root, device))
        else:
            res.update(eval_named_set(model, name, args.data_root, device))
    return res


# ----------------------------------------------------------------------------------------
# Attribute evaluation of the image encoder. Knowledge-CLIP reports AWA2 and CUB without a
# protocol; ours, all zero-shot:
# - class-name zero-shot: prompt-ensembled class names, as above;
# - attribute zero-shot, DAP-style (Lampert et al. 2014: a class is known only by its attribute
#   vector): one prompt per attribute, image-attribute cosines (N, A), and a class scores the
#   Pearson correlation between the image's cosine profile and its attribute vector; on AWA2
#   also among the 10 test classes of the proposed split ("unseen");
# - per-attribute prompt AUC: does one attribute prompt's cosine rank the images of classes
#   with the attribute above those without (threshold-free, no calibration of a single prompt)?

def attribute_class_scores(img_attr, class_attr):  # (N, A) cosines, (C, A) -> (N, C)
    """DAP-style class score: Pearson correlation (cosine of the centred vectors) between an
    image's attribute-prompt cosines and a class's attribute vector. Centring removes the
    image's common cosine offset; the class's attributes it lacks count against it."""
    x = F.normalize(img_attr - img_attr.mean(1, keepdim=True), dim=1)
    a = F.normalize(class_attr - class_attr.mean(1, keepdim=True), dim=1)
    return x @ a.t()


def attribute_auc(scores, present):  # (N, A), (N, A) bool -> (A,) ROC AUC, nan where one side is empty
    """Mann-Whitney U / (P Q) per attribute, tied scores counting one half (average ranks)."""
    s, p = scores.t().contiguous(), present.t().float()  # (A, N)
    srt, P = s.sort(1).values, p.sum(1)  # P: positives per attribute
    rank = (torch.searchsorted(srt, s) + torch.searchsorted(srt, s, right=True) + 1) / 2  # (A, N), 1-based
    return ((rank * p).sum(1) - P * (P + 1) / 2) / (P * (len(scores) - P))


def attribute_metrics(image_emb, labels, class_emb, attr_emb, class_attr, threshold=0.5, candidates=None):
    """image_emb (N, D), class_emb (C, D), attr_emb (A, D), all unit; class_attr (C, A) in [0, 1];
    an image has an attribute when its class's value >= threshold. -> unprefixed dict of %."""
    img_attr = image_emb @ attr_emb.t()  # (N, A) cosines
    by_attr = attribute_class_scores(img_attr, class_attr)  # (N, C)
    res = {"zero_shot_top1": top1(image_emb @ class_emb.t(), labels),
           "attr_zero_shot_top1": top1(by_attr, labels),
           "attr_auc": 100.0 * attribute_auc(img_attr, class_attr[labels] >= threshold).nanmean().item()}
    if candidates is not None:  # zero-shot among the unseen classes only
        res["unseen_zero_shot_top1"] = top1(image_emb @ class_emb.t(), labels, candidates)
        res["unseen_attr_zero_shot_top1"] = top1(by_attr, labels, candidates)
    return res


def eval_attribute_set(model, name, root, device, max_per_class=50):
    """CUB: the official test images, 200 classes. AWA2: all 50 classes, and the proposed split's
    10 test classes alone ("unseen_"); its attributes binarised at the matrix's overall mean, ≈ how
    the release's predicate-matrix-binary.txt is. Keys '{name}_...'."""
    ds = data.ATTRIBUTE_SETS[name](root, model.cfg.image_size, "test" if name == "cub" else "all", max_per_class)
    name_t, attr_t = ATTRIBUTE_SET_PROMPTS[name]
    res = attribute_metrics(embed_images(model, ds.images, device), ds.labels,
                            zero_shot_classifier(model, ds.class_names, name_t, device),
                            zero_shot_classifier(model, ds.attribute_names, attr_t, device), ds.class_attributes,
                            ds.class_attributes.mean().item() if name == "awa2" else 0.5, ds.test_classes)
    res.update(n_images=len(ds.labels), n_skipped=ds.n_skipped)
    return {f"{name}_{k}": v for k, v in res.items()}


# ----------------------------------------------------------------------------------------
# Pictures (PNG through torchvision).

def picture_row(images_uint8, per_row, scale=2):
    """(n <= per_row, 3, S, S) uint8 -> (per_row, 3, scale*S, scale*S) floats in [0, 1]: upscaled so
    32-pixel images are visible, padded with black tiles to a full row."""
    scale = scale if images_uint8.shape[-1] <= 32 else 1
    row = F.interpolate(images_uint8.float() / 255, scale_factor=scale, mode="nearest")
    return torch.cat([row, torch.zeros(per_row - len(row), *row.shape[1:])])


def save_duplicate_groups(images, groups, path, n_groups=8, per_row=8):
    """CLIP-CID semantic balance: one row per group of near-duplicates, largest groups first;
    the kept image comes first, framed in green, then the removed ones. images(rows) -> uint8."""
    rows = []
    for members in sorted(groups, key=len, reverse=True)[:n_groups]:
        row = picture_row(images(torch.as_tensor(members[:per_row])), per_row)
        frame = torch.ones_like(row[0], dtype=torch.bool)
        frame[:, 2:-2, 2:-2] = False
        row[0][frame] = torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand_as(row[0])[frame]  # green
        rows.append(row)
    if rows:
        torchvision.utils.save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
        print(f"wrote {path} (kept image framed in green, removed duplicates beside it)")


def save_cluster_grid(images, emb, centroids, labels, rows, path, n_clusters=12, per_row=10):
    """One row per cluster (the most populous first): its members nearest the centroid.
    labels (M,) the clusters of the data rows `rows` (M,); emb(positions) -> their (n, D)
    embeddings, images(data rows) -> (n, 3, S, S) uint8."""
    counts = torch.bincount(labels, minlength=len(centroids))
    pictures = []
    for k in counts.argsort(descending=True)[:n_clusters].tolist():
        members = torch.nonzero(labels == k).squeeze(1)  # positions in rows
        best = members[(emb(members) @ centroids[k].cpu()).argsort(descending=True)[:per_row]]
        pictures.append(picture_row(images(torch.as_tensor(rows)[best]), per_row))
    torchvision.utils.save_image(torch.cat(pictures), path, nrow=per_row, padding=2, pad_value=1.0)
    print(f"wrote {path} (one row per cluster: the pairs nearest its centroid)")


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


def in_batches(encode, captions, batch_size=256):
    """encode (list of str -> (n, D)) over all captions, batch by batch -> (N, D) on the CPU."""
    return torch.cat([encode(captions[i:i + batch_size]).cpu() for i in range(0, len(captions), batch_size)])


def print_tiers(a):
    """python eval.py --tiers: how often the nearest common word is right, per vocabulary tier."""
    model, cfg = clip.load_checkpoint(a.ckpt, a.device) if a.ckpt else (None, {})
    teacher = teachers.load_text_teacher(a.text_teacher or cfg.get("text_teacher") or teachers.DEFAULT_TEXT_TEACHER,
                                         a.device, cfg.get("pool", "mean"), a.trust_remote_code)
    encoders = {f"text teacher {teacher.name}": lambda t: in_batches(teacher.encode_texts, t)}
    if model is not None:
        encoders[f"{cfg['method']} ({a.ckpt})"] = lambda t: embed_texts(model, t, a.device)
    print("| text encoder | common | rare | never-seen | rare and never-seen words it gets right |\n|---|---|---|---|---|")
    for name, encode in encoders.items():
        hits = tier_hits(encode)
        right = [w for tier in ("rare", "never-seen") for w, r in hits[tier] if r]
        print(f"| {name} | " + " | ".join(f"{percent_right(h):.1f}" for h in hits.values())
              + f" | {', '.join(right) or '-'} |")


# ----------------------------------------------------------------------------------------
# Your own images (python eval.py --ckpt DIR --images FOLDER --labels "cat,dog"), and the model
# handed to Hugging Face users (--export-hf OUT: clip.export_hf, checked here).

@torch.no_grad()
def zero_shot(model, images, classnames, templates=LABEL_PROMPTS, device="cpu"):
    """CLIP's zero-shot classifier (Sec. 3.1.4) on any images: PIL images or paths (read as
    training reads them, data.load_image) or (N, 3, S, S) uint8 -> (N, C) probabilities over
    classnames: softmax of exp(t) x the cosine to each class's prompt-ensembled embedding."""
    if not torch.is_tensor(images):
        images = torch.stack([data.load_image(x, model.cfg.image_size) for x in images])
    scores = embed_images(model, images, device) @ zero_shot_classifier(model, classnames, templates, device).t()  # (N, C)
    return (model.logit_scale.exp().item() * scores).softmax(1)


def class_key(name):  # 'Golden_Retriever' and 'golden retriever' name one class
    return " ".join(name.replace("_", " ").lower().split())


def image_folder(folder):
    """Every image under folder -> [(path relative to it, its first subfolder or None)], sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such folder")
    found = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                   for f in fs if f.lower().endswith(data.IMAGE_EXTS))
    if not found:
        raise ValueError(f"--images {folder}: no {', '.join(data.IMAGE_EXTS)} image in it")
    return [(rel, rel.split(os.sep)[0] if os.sep in rel else None) for rel in found]


def read_images(folder, files, image_size):  # relative paths -> (N, 3, S, S) uint8, or one line naming the unreadable
    images, bad = [], []
    for rel in files:
        try:
            images.append(data.load_image(os.path.join(folder, rel), image_size))
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(rel)
    if bad:
        raise ValueError(f"--images {folder}: {len(bad)} of {len(files)} files are not readable images: "
                         f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} (remove them)")
    return torch.stack(images)


def read_labels(spec, classes):
    """--labels 'cat,dog' or a file with a class name a line; None: the folder's subfolder names."""
    if spec is None:
        names = sorted({c.replace("_", " ") for c in classes if c})
        if len(names) < 2:
            raise ValueError("give --labels 'cat,dog,...' (or a file, a name a line): the folder has no class subfolders")
    else:
        try:
            lines = open(spec, encoding="utf-8").read().splitlines() if os.path.isfile(spec) else spec.split(",")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--labels {spec}: cannot read it ({e.__class__.__name__})") from None
        names = [n.strip() for n in lines if n.strip()]
        if len(names) < 2:
            raise ValueError(f"--labels {spec!r}: {len(names) or 'no'} class name{'s' * (len(names) != 1)}; "
                             "zero-shot needs at least 2")
    twice = sorted({n for n in names if [class_key(m) for m in names].count(class_key(n)) > 1})
    if twice:
        raise ValueError(f"--labels: {', '.join(twice)} given twice")
    return names


def classify_folder(model, folder, labels, device):
    """--images: print each image's zero-shot class and probability; where the image lies in a
    subfolder named after a label, the accuracy over those images. -> the summary dict."""
    items = image_folder(folder)
    names = read_labels(labels, [c for _, c in items])
    images = read_images(folder, [rel for rel, _ in items], model.cfg.image_size)  # (N, 3, S, S) uint8
    p, pred = zero_shot(model, images, names, device=device).max(1)  # (N,) probability and index of the top class
    width, name_width = max(len(rel) for rel, _ in items), max(map(len, names))
    for (rel, _), k, q in zip(items, pred.tolist(), p.tolist()):
        print(f"{rel:{width}s}  {names[k]:{name_width}s}  {q:.3f}")
    index = {class_key(n): k for k, n in enumerate(names)}
    truth = [(i, index[class_key(c)]) for i, (_, c) in enumerate(items) if c is not None and class_key(c) in index]
    res = {"images": len(items), "classes": len(names)}
    if truth:
        right = sum(int(pred[i]) == k for i, k in truth)
        res.update(accuracy=100.0 * right / len(truth), scored=len(truth))
        print(f"zero-shot accuracy {res['accuracy']:.1f}% ({right} of {len(truth)} images in a subfolder named after a "
              f"label; {len(items) - len(truth)} not scored)")
    return res


@torch.no_grad()
def compare_hf(model, folder, n=64):
    """Our model against its export read back by transformers (offline, the folder's own
    AutoProcessor): max |difference| of the unit image and text embeddings on n embedded test
    images and their captions (and a few odd ones), and whether the token ids are equal."""
    from transformers import AutoProcessor, CLIPModel as HFModel
    device = model.logit_scale.device
    hf = HFModel.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    test = data.ShapesDataset("test", n, image_size=model.cfg.image_size)
    captions = test.captions + ["", "y" * 500, "naïve café, 3 × 4!", "日本語のキャプション", "<|endoftext|> a_b\t  x²"]
    ids = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    pixels = processor(images=[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in test.images],
                       return_tensors="pt")["pixel_values"]
    image = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text = F.normalize(hf.get_text_features(**ids).pooler_output, dim=-1)
    return {"image_max_abs_diff": (image - embed_images(model, test.images, device)).abs().max().item(),
            "text_max_abs_diff": (text - embed_texts(model, captions, device)).abs().max().item(),
            "token_ids_equal": torch.equal(ids["input_ids"], model.tokenize(captions)), "n_images": n,
            "n_captions": len(captions)}


def export_hf(model, out):
    """--export-hf: write the folder (clip.export_hf), read it back, say how close it is."""
    if os.path.isfile(out):
        raise ValueError(f"--export-hf {out}: a file is there; give a folder")
    clip.export_hf(model, out)
    res = compare_hf(model, out)
    print(f"wrote {out}; read back by transformers (CLIPModel, AutoProcessor) against ours on {res['n_images']} test "
          f"images and {res['n_captions']} captions: "
          f"image embeddings max |diff| {res['image_max_abs_diff']:.1e}, text {res['text_max_abs_diff']:.1e}, "
          f"token ids {'equal' if res['token_ids_equal'] else 'DIFFERENT'}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a CLIP checkpoint (zero-shot, retrieval, linear probe); the EM "
                                            "text probe: python docs/em_probe.py.")
    p.add_argument("--ckpt", help="run folder (DIR/ckpt.pt) or checkpoint file")
    p.add_argument("--curves", nargs="+", metavar="DIR", help="plot these runs' loss curves side by side into --out")
    p.add_argument("--out", default="curves.png", help="with --curves: the PNG to write")
    p.add_argument("--eval-sets", nargs="*", default=None, help="torchvision sets, e.g. fashion-mnist cifar10, or cub awa2")
    p.add_argument("--data-root", default=None)
    p.add_argument("--text-teacher", default=None, help="with --tiers: default, the --ckpt run's text teacher")
    p.add_argument("--tiers", action="store_true", help="text-space probe per vocabulary tier: the text teacher's "
                                                         "own, and --ckpt's if given")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the text teacher's own code (only this "
                                                                     "flag grants it, never a checkpoint)")
    p.add_argument("--images", metavar="FOLDER", help="zero-shot every image under FOLDER (with --ckpt): its class "
                                                         "and probability; with class subfolders, the accuracy")
    p.add_argument("--labels", help="with --images: class names, 'cat,dog,...' or a file with one a line (default: "
                                    "the subfolder names)")
    p.add_argument("--export-hf", metavar="OUT", help="write --ckpt as a Hugging Face folder (CLIPModel, AutoTokenizer, "
                                                      "AutoProcessor) and check it against ours")
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
    if a.ckpt is None and not a.tiers:
        p.error("give --ckpt DIR (or --curves DIR ...)")
    if a.labels is not None and not a.images:
        p.error("--labels goes with --images FOLDER")
    folder = a.ckpt if a.ckpt is None or os.path.isdir(a.ckpt) else os.path.dirname(a.ckpt)
    try:
        if a.tiers:
            return print_tiers(a)
        model, cfg = clip.load_checkpoint(a.ckpt, a.device)
        if a.export_hf or a.images:
            return {**(export_hf(model, a.export_hf) if a.export_hf else {}),
                    **(classify_folder(model, a.images, a.labels, a.device) if a.images else {})}
        run = argparse.Namespace(**cfg)
        if a.eval_sets is not None:
            run.eval_sets = a.eval_sets
        if a.data_root is not None:
            run.data_root = a.data_root
        res = evaluate(model, run, a.device)
    except (OSError, ValueError) as e:  # a missing file or folder, unreadable input
        raise SystemExit(f"error: {e}") from None
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:{width}s} {v:8.2f}" if isinstance(v, float) else f"{k:{width}s} {v}")
    out = os.path.join(folder, "eval.json")
    data.write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

