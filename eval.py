"""Evaluation: zero-shot classification, image-text retrieval, linear probe.

- Zero-shot (Radford et al. 2021, Sec. 3.1.4): each class is the mean of its prompt-template
  text embeddings, renormalised; an image takes the class of highest cosine.
- Retrieval: recall@k, image->text and text->image, pair i being the only right answer for i.
- Linear probe: multinomial logistic regression on frozen, normalised image features, in torch
  (L-BFGS), its weight decay chosen on a validation split, then scored once on the test split.

`evaluate(model, ...)` is what train.py calls at the end of a run; `python eval.py --ckpt DIR`
runs the same on a saved checkpoint.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import torchvision

import clip
import data


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


def retrieval(image_emb, text_emb, ks=(1, 5, 10)):
    """Recall@k (%) both ways; pair i's right answer is index i."""
    sim = image_emb @ text_emb.t()  # (N, N)
    target = torch.arange(len(sim)).unsqueeze(1)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s.gather(1, target)).sum(1)  # how many candidates beat the right one
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
# The embedded set: zero-shot on seen and unseen shape x colour combinations, per attribute,
# retrieval on the test pairs and on the held-out wordings, linear probe over all 64 classes.

SHAPE_PROMPTS = ["a photo of {}", "{} on a dark background"]  # {} = 'a red circle', 'an orange star'
ATTRIBUTE_PROMPTS = {"shape": data.SHAPES, "colour": data.COLOURS, "size": [f"{s} shape" for s in data.SIZES],
                     "pos": [f"shape in the {p}" for p in data.POSITIONS]}


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
    res.update(retrieval(img["test"], embed_texts(model, test.captions, device)))
    held = retrieval(img["wordings"], embed_texts(model, splits["wordings"].captions, device), ks=(1,))
    res["retrieval_heldout_wordings_i2t_r1"] = held["retrieval_i2t_r1"]  # captions in held-out words
    res["linear_probe_top1"], res["linear_probe_wd"] = linear_probe(
        (img["probe"], lab["probe"]), (img["val"], lab["val"]), (img["test"], lab["test"]), 64)
    return res


def eval_named_set(model, name, root, device, max_n=5000):
    """Zero-shot and linear probe on a torchvision set (train split for the probe, 10% of it as val)."""
    S = model.cfg.image_size
    images, labels, classes, templates = data.load_eval_set(name, root, S, max_n=max_n)
    emb = embed_images(model, images, device)
    res = {f"{name}_zero_shot_top1": top1(emb @ zero_shot_classifier(model, classes, templates, device).t(), labels)}
    tr_images, tr_labels, _, _ = data.load_eval_set(name, root, S, max_n=max_n, train=True)
    tr = embed_images(model, tr_images, device)
    n_val = len(tr) // 10
    res[f"{name}_linear_probe_top1"], _ = linear_probe((tr[n_val:], tr_labels[n_val:]), (tr[:n_val], tr_labels[:n_val]),
                                                       (emb, labels), len(classes))
    return res


def eval_real_pairs(model, args, device, max_n=2000):
    """Retrieval on the held-out slice of a CSV / shard set (--val-frac, fixed by the seed)."""
    ds = data.real_pairs(args.data, model.cfg.image_size, "val", args.seed, args.val_frac,
                         args.csv_img_key, args.csv_caption_key)
    pairs = []
    for item in (ds[i] for i in range(len(ds))) if isinstance(ds, data.CsvPairs) else ds:
        if item is not None:
            pairs.append(item)
        if len(pairs) >= max_n:
            break
    if len(pairs) < 2:
        print(f"eval: only {len(pairs)} held-out pairs (raise --val-frac); retrieval skipped")
        return {}
    images = torch.stack([p[0] for p in pairs])
    return retrieval(embed_images(model, images, device), embed_texts(model, [p[1] for p in pairs], device))


def evaluate(model, args, device):
    """Everything results.json reports about one model; `args` as train.py parses them."""
    if args.data == "shapes":
        res = eval_shapes(model, device, seed=args.seed, n_test=args.n_eval)
    else:
        res = eval_real_pairs(model, args, device)
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

ATTRIBUTE_TEMPLATES = {  # (class-name prompts, attribute prompts); ours
    "cub": (["a photo of a {}, a type of bird.", "a photo of a {}."], ["a photo of a bird with {}.", "a bird with {}."]),
    "awa2": (["a photo of a {}, a type of animal.", "a photo of a {}."], ["a photo of an animal: {}.", "a photo of a {} animal."]),
}


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
    name_t, attr_t = ATTRIBUTE_TEMPLATES[name]
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
    row = F.interpolate(images_uint8.float() / 255, scale_factor=scale, mode="nearest")
    return torch.cat([row, torch.zeros(per_row - len(row), *row.shape[1:])])


def save_duplicate_groups(images, groups, path, n_groups=8, per_row=8):
    """CLIP-CID semantic balance: one row per group of near-duplicates, largest groups first;
    the kept image comes first, framed in green, then the removed ones."""
    rows = []
    for members in sorted(groups, key=len, reverse=True)[:n_groups]:
        row = picture_row(images[torch.as_tensor(members[:per_row])], per_row)
        frame = torch.ones_like(row[0], dtype=torch.bool)
        frame[:, 2:-2, 2:-2] = False
        row[0][frame] = torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand_as(row[0])[frame]  # green
        rows.append(row)
    if rows:
        torchvision.utils.save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
        print(f"wrote {path} (kept image framed in green, removed duplicates beside it)")


def save_cluster_grid(images, emb, centroids, labels, path, n_clusters=12, per_row=10):
    """One row per cluster (the most populous first): its members nearest the centroid."""
    counts = torch.bincount(labels, minlength=len(centroids))
    rows = []
    for k in counts.argsort(descending=True)[:n_clusters].tolist():
        members = torch.nonzero(labels == k).squeeze(1)
        best = members[(emb[members] @ centroids[k].cpu()).argsort(descending=True)[:per_row]]
        rows.append(picture_row(images[best], per_row))
    torchvision.utils.save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
    print(f"wrote {path} (one row per cluster: the pairs nearest its centroid)")


def load_checkpoint(path, device="cpu"):
    """A run folder or a ckpt.pt -> (model, saved config dict). Loaded with weights_only=True."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = clip.CLIP(clip.CLIPConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt["config"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a CLIP checkpoint (zero-shot, retrieval, linear probe).")
    p.add_argument("--ckpt", required=True, help="run folder (DIR/ckpt.pt) or checkpoint file")
    p.add_argument("--eval-sets", nargs="*", default=None, help="torchvision sets, e.g. fashion-mnist cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    model, cfg = load_checkpoint(a.ckpt, a.device)
    run = argparse.Namespace(**cfg)
    if a.eval_sets is not None:
        run.eval_sets = a.eval_sets
    if a.data_root is not None:
        run.data_root = a.data_root
    res = evaluate(model, run, a.device)
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:{width}s} {v:8.2f}" if isinstance(v, float) else f"{k:{width}s} {v}")
    out = os.path.join(a.ckpt if os.path.isdir(a.ckpt) else os.path.dirname(a.ckpt), "eval.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
