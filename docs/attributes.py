"""Knowledge-CLIP's attribute evaluation of the image encoder, on AWA2 and CUB-200-2011.

`python docs/attributes.py --ckpt DIR --sets cub awa2 --data-root ROOT` scores a trained run
(into DIR/attributes.json). The sets are read from their folders as published
(CUB_200_2011.tgz, AwA2-data.zip), never downloaded. Knowledge-CLIP reports AWA2 and CUB
without a protocol; ours, all zero-shot (eval.py's zero-shot classifier and prompt ensembles):
- class-name zero-shot: prompt-ensembled class names;
- attribute zero-shot, DAP-style (Lampert et al. 2014: a class is known only by its attribute
  vector): one prompt per attribute, image-attribute cosines (N, A), and a class scores the
  Pearson correlation between the image's cosine profile and its attribute vector; on AWA2
  also among the 10 test classes of the proposed split ("unseen");
- per-attribute prompt AUC: does one attribute prompt's cosine rank the images of classes
  with the attribute above those without (threshold-free, no calibration of a single prompt)?
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402

# (class-name prompts, attribute prompts) per set
ATTRIBUTE_SET_PROMPTS = {  # (class-name prompts, attribute prompts)
    "cub": (["a photo of a {}, a type of bird.", "a photo of a {}."], ["a photo of a bird with {}.", "a bird with {}."]),
    "awa2": (["a photo of a {}, a type of animal.", "a photo of a {}."], ["a photo of an animal: {}.", "a photo of a {} animal."]),
}


# ----------------------------------------------------------------------------------------
# The sets, as published: images, classes, the class x attribute matrix.

@dataclass
class AttributeSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64, index into class_names
    class_names: list  # C readable names: 'black footed albatross', 'grizzly bear'
    attribute_names: list  # A readable names: 'curved (up or down) bill shape', 'black'
    class_attributes: torch.Tensor  # (C, A) float in [0, 1]
    n_skipped: int  # unreadable images
    test_classes: torch.Tensor = None  # (C,) bool: AWA2's proposed zero-shot test classes


def plain_name(name):  # '001.Black_footed_Albatross' -> 'black footed albatross'; 'grizzly+bear' -> 'grizzly bear'
    return " ".join(re.sub(r"^\d+\.", "", name).replace("_", " ").replace("+", " ").lower().split())


def cub_attribute_name(name):  # 'has_bill_shape::curved_(up_or_down)' -> 'curved (up or down) bill shape'
    part, value = name.split("::")
    return f"{plain_name(value)} {plain_name(re.sub(r'^has_', '', part))}"


CUB_LAYOUT = ("CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt, "
              "images/<class>/<file>.jpg, attributes/class_attribute_labels_continuous.txt}, "
              "attributes.txt beside or inside CUB_200_2011/")
AWA2_LAYOUT = ("Animals_with_Attributes2/{classes.txt, predicates.txt, predicate-matrix-continuous.txt, "
               "trainclasses.txt, testclasses.txt, JPEGImages/<class>/<class>_10001.jpg}")


def need(path, layout):  # a missing file or folder: one line naming it and the layout
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; expected the published layout {layout}")
    return path


def inside(root, folder):
    return os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root


def read_lines(path, layout):
    with open(need(path, layout), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_matrix(path, layout, shape):  # whitespace-separated numbers -> (C, A) float in [0, 1]
    m = torch.from_numpy(np.loadtxt(need(path, layout), ndmin=2)).float()
    if tuple(m.shape) != shape:
        raise ValueError(f"{path}: a {tuple(m.shape)} matrix, expected {shape} (classes x attributes)")
    return m.clamp(0, 100) / 100  # percentages; AWA2 marks missing values -1: read as 0


def load_images(items, image_size, max_per_class=None):
    """items: (path, label) in order. Keeps the first `max_per_class` readable images of each class;
    unreadable ones are skipped and counted. -> (images (N, 3, S, S) uint8, labels (N,), n_skipped)."""
    images, labels, count, skipped = [], [], {}, 0
    for path, y in items:
        if max_per_class is not None and count.get(y, 0) >= max_per_class:
            continue
        try:
            images.append(clip.load_image(path, image_size))
        except (OSError, ValueError, Image.DecompressionBombError):  # corrupt or missing file
            skipped += 1
            continue
        labels.append(y)
        count[y] = count.get(y, 0) + 1
    if not images:
        raise ValueError(f"no readable images ({skipped} skipped), e.g. {items[0][0] if items else 'none listed'}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped


def load_cub(root, image_size, split="test", max_per_class=None):
    """CUB-200-2011 (Wah et al. 2011), the official image split ('train', 'test' or 'all'):
    200 classes, 312 attributes, class attributes = % of the class's images with the attribute."""
    root, L = inside(root, "CUB_200_2011"), CUB_LAYOUT  # the folder itself or the one holding it
    lines = lambda name: read_lines(os.path.join(root, name), L)  # noqa: E731
    classes = [line.split()[1] for line in lines("classes.txt")]  # '1 001.Black_footed_Albatross'
    paths = dict(line.split(maxsplit=1) for line in lines("images.txt"))  # image id -> path
    label = dict(line.split() for line in lines("image_class_labels.txt"))  # image id -> class id
    train = dict(line.split() for line in lines("train_test_split.txt"))  # image id -> '1' train, '0' test
    where = [os.path.join(d, "attributes.txt") for d in (root, os.path.join(root, "attributes"), os.path.dirname(os.path.abspath(root)))]
    attrs = read_lines(next((p for p in where if os.path.isfile(p)), where[-1]), L)  # the release: beside root
    attribute_names = [cub_attribute_name(line.split(maxsplit=1)[1]) for line in attrs]
    class_attributes = read_matrix(os.path.join(root, "attributes", "class_attribute_labels_continuous.txt"), L,
                                   (len(classes), len(attrs)))
    keep, images = {"train": {"1"}, "test": {"0"}, "all": {"0", "1"}}[split], need(os.path.join(root, "images"), L)
    items = [(os.path.join(images, p), int(label[i]) - 1) for i, p in paths.items() if train[i] in keep]
    images, labels, skipped = load_images(items, image_size, max_per_class)
    return AttributeSet(images, labels, [plain_name(c) for c in classes], attribute_names, class_attributes, skipped)


def load_awa2(root, image_size, split="test", max_per_class=None):
    """Animals with Attributes 2 (Xian et al. 2018): 50 classes, 85 predicates. split: the
    release's class split ('train': trainclasses.txt, 'test': testclasses.txt) or 'all'; the
    classes (and class_attributes rows) are those of the split."""
    root, L = inside(root, "Animals_with_Attributes2"), AWA2_LAYOUT
    lines = lambda name: read_lines(os.path.join(root, name), L)  # noqa: E731
    classes = [line.split()[-1] for line in lines("classes.txt")]  # '1\tantelope'
    predicates = [line.split()[-1] for line in lines("predicates.txt")]  # '1\tblack'
    matrix = read_matrix(os.path.join(root, "predicate-matrix-continuous.txt"), L, (len(classes), len(predicates)))
    test = set(lines("testclasses.txt"))
    chosen = {"all": set(classes), "test": test, "train": set(lines("trainclasses.txt"))}[split]
    idx = [i for i, c in enumerate(classes) if c in chosen]  # the split's classes, in classes.txt order
    jpegs, items = need(os.path.join(root, "JPEGImages"), L), []  # (path, label), files in name order
    for y, i in enumerate(idx):
        folder = os.path.join(jpegs, classes[i])
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        items += [(os.path.join(folder, f), y) for f in files if f.lower().endswith(data.IMAGE_EXTS)]
    images, labels, skipped = load_images(items, image_size, max_per_class)
    return AttributeSet(images, labels, [plain_name(classes[i]) for i in idx], [plain_name(p) for p in predicates],
                        matrix[idx], skipped, torch.tensor([classes[i] in test for i in idx]))


ATTRIBUTE_SETS = {"cub": load_cub, "awa2": load_awa2}


# ----------------------------------------------------------------------------------------
# The metrics.

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
    res = {"zero_shot_top1": evaluation.top1(image_emb @ class_emb.t(), labels),
           "attr_zero_shot_top1": evaluation.top1(by_attr, labels),
           "attr_auc": 100.0 * attribute_auc(img_attr, class_attr[labels] >= threshold).nanmean().item()}
    if candidates is not None:  # zero-shot among the unseen classes only
        res["unseen_zero_shot_top1"] = evaluation.top1(image_emb @ class_emb.t(), labels, candidates)
        res["unseen_attr_zero_shot_top1"] = evaluation.top1(by_attr, labels, candidates)
    return res


def eval_attribute_set(model, name, root, device, max_per_class=50):
    """CUB: the official test images, 200 classes. AWA2: all 50 classes, and the proposed split's
    10 test classes alone ("unseen_"); its attributes binarised at the matrix's overall mean, ≈ how
    the release's predicate-matrix-binary.txt is. Keys '{name}_...'."""
    ds = ATTRIBUTE_SETS[name](root, model.cfg.image_size, "test" if name == "cub" else "all", max_per_class)
    name_t, attr_t = ATTRIBUTE_SET_PROMPTS[name]
    res = attribute_metrics(evaluation.embed_images(model, ds.images, device), ds.labels,
                            evaluation.zero_shot_classifier(model, ds.class_names, name_t, device),
                            evaluation.zero_shot_classifier(model, ds.attribute_names, attr_t, device), ds.class_attributes,
                            ds.class_attributes.mean().item() if name == "awa2" else 0.5, ds.test_classes)
    res.update(n_images=len(ds.labels), n_skipped=ds.n_skipped)
    return {f"{name}_{k}": v for k, v in res.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run folder (DIR/ckpt.pt) or checkpoint file")
    p.add_argument("--sets", nargs="+", choices=list(ATTRIBUTE_SETS), default=list(ATTRIBUTE_SETS))
    p.add_argument("--data-root", default=os.path.expanduser("~/.cache/clip-distill"), help="the folder that holds "
                   "CUB_200_2011/ and Animals_with_Attributes2/")
    p.add_argument("--max-per-class", type=int, default=50, help="images scored per class")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        model, _ = clip.load_checkpoint(a.ckpt, a.device)
        res = {}
        for name in a.sets:
            res.update(eval_attribute_set(model, name, a.data_root, a.device, a.max_per_class))
    except (OSError, ValueError) as e:  # a missing file or folder, a malformed matrix
        raise SystemExit(f"error: {e}") from None
    for k, v in res.items():
        print(f"{k:40s} {v:8.2f}" if isinstance(v, float) else f"{k:40s} {v}")
    out = os.path.join(a.ckpt if os.path.isdir(a.ckpt) else os.path.dirname(a.ckpt), "attributes.json")
    clip.write_json(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
