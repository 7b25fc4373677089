"""Image-caption data: an embedded procedural set, real CSV / webdataset pairs, eval sets.

1. The embedded set ("shapes"): images of one or two coloured objects, drawn from a seed, with
   captions from several templates and synonyms ("crimson" for red, "disk" for circle), so a
   pretrained text model's knowledge can matter. Nothing to download, any size. Like web data
   it is redundant on purpose: a fraction of near-duplicate pairs (`dup_frac`) and a long-tailed
   class frequency (`imbalance`), so CLIP-CID's semantic balance has something real to remove.
   Held out from training: 8 shape x colour combinations (compositional zero-shot) and one
   word per attribute value plus one template (held-out wordings).
2. Real pairs: open_clip-style CSV/TSV (`filepath`, `title`) and img2dataset webdataset tar
   shards (`{key}.jpg` + `{key}.txt`), read with the standard library; corrupt or missing
   images and empty captions are skipped and counted, never crash a run.
3. Evaluation sets by name through torchvision, with class names and prompt templates.
4. Attribute sets as published (CUB-200-2011, AWA2): images, classes, class x attribute matrix.
"""
import csv
import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

# ----------------------------------------------------------------------------------------
# 1. The embedded set. Attribute values, the words that name them, and the templates.

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]

RGB = {"red": (0.9, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.95, 0.9, 0.1),
       "green": (0.1, 0.75, 0.2), "cyan": (0.1, 0.85, 0.9), "blue": (0.15, 0.3, 1.0),
       "purple": (0.55, 0.15, 0.8), "pink": (1.0, 0.5, 0.75)}

# The words for each value, in three tiers (train.py reports each tier apart):
#   common: the training captions use them all the time (each about equally often);
#   rare: each mention of a colour or shape uses its rare word with probability RARE_FRAC,
#     so each rare word is in a fraction of a percent of the training captions;
#   never-seen: in no training caption; only in the held-out split "wordings", in prompts and in
#     the text-only corpus (`text_corpus`). Sizes and positions have no rare word.
# The rare and never-seen words are ones the default text teacher (all-MiniLM-L6-v2) matches
# to their colour or shape where it can (python eval.py --tiers measures it; it misses some
# colours whichever synonym is taken), and none is a spelling variant of a common word.
RARE_FRAC = 0.02
WORDS = {  # value: (common words, rare word or None, never-seen word)
    "red": (["red", "scarlet"], "ruby", "crimson"), "orange": (["orange", "amber"], "peach", "apricot"),
    "yellow": (["yellow", "golden"], "lemon", "canary"), "green": (["green", "emerald"], "olive", "lime"),
    "cyan": (["cyan", "aqua"], "teal", "turquoise"), "blue": (["blue", "azure"], "cobalt", "navy"),
    "purple": (["purple", "lilac"], "lavender", "violet"), "pink": (["pink", "rose"], "blush", "fuchsia"),
    "circle": (["circle", "disk"], "ball", "orb"), "square": (["square", "box"], "tile", "block"),
    "triangle": (["triangle", "wedge"], "three-sided shape", "pyramid"),
    "diamond": (["diamond", "rhombus"], "lozenge", "gem"), "cross": (["cross", "plus sign"], "x shape", "crucifix"),
    "star": (["star", "five-pointed star"], "pentagram", "asterisk"),
    "hexagon": (["hexagon", "six-sided shape"], "hex", "honeycomb cell"), "ring": (["ring", "hoop"], "bagel", "donut"),
    "small": (["small", "little"], None, "tiny"), "large": (["large", "big"], None, "huge"),
    "top left": (["top left", "upper left"], None, "top-left corner"),
    "top right": (["top right", "upper right"], None, "top-right corner"),
    "bottom left": (["bottom left", "lower left"], None, "bottom-left corner"),
    "bottom right": (["bottom right", "lower right"], None, "bottom-right corner"),
}
TIERS = ("common", "rare", "never-seen")


def tier_words(value, tier):
    """The words of one value in one tier: a list (empty when the value has no rare word)."""
    common, rare, never = WORDS[value]
    return {"common": common, "rare": [rare] if rare else [], "never-seen": [never]}[tier]


TEMPLATES = ["a {size} {colour} {shape} in the {pos}", "a photo of a {colour} {shape}",
             "{size} {colour} {shape}, {pos}", "a {colour} {shape} on a dark background"]
HELD_OUT_TEMPLATE = "one {size} {shape} coloured {colour}"
PAIR_TEMPLATE = "a {colour} {shape} and a {colour2} {shape2}"  # two-object images

# Compositional zero-shot: shape i never appears in colour (3i + 1) mod 8 during training.
# One unseen colour per shape and one unseen shape per colour (a Latin pattern).
UNSEEN = {(s, (3 * s + 1) % 8) for s in range(8)}
SEEN_CLASSES = [c for c in range(64) if (c // 8, c % 8) not in UNSEEN]  # class = shape * 8 + colour
UNSEEN_CLASSES = sorted(s * 8 + c for s, c in UNSEEN)
CLASS_NAMES = [f"{COLOURS[c % 8]} {SHAPES[c // 8]}" for c in range(64)]


def with_article(text):
    return ("an " if text[0] in "aeiou" else "a ") + text


def fix_articles(text):  # a template's "a" before a vowel: "a amber star" -> "an amber star"
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(shape, colour, size, pos, rng, held_out=False, second=None):
    """One caption for an object (and an optional second object (shape, colour))."""
    def word(value):
        common, rare, never = WORDS[value]
        if held_out:
            return never
        if rare is not None and rng.random() < RARE_FRAC:
            return rare
        return common[rng.integers(len(common))]
    sh, co = word(SHAPES[shape]), word(COLOURS[colour])
    if second is not None:
        text = PAIR_TEMPLATE.format(colour=co, shape=sh, colour2=word(COLOURS[second[1]]),
                                    shape2=word(SHAPES[second[0]]))
    else:
        template = HELD_OUT_TEMPLATE if held_out else TEMPLATES[rng.integers(len(TEMPLATES))]
        text = template.format(size=word(SIZES[size]), colour=co, shape=sh, pos=word(POSITIONS[pos]))
    return fix_articles(text)


def text_corpus(n=10000, seed=0, exclude=frozenset()):
    """The default text-only corpus of `train.py --text-corpus` (beyond the papers): n phrases
    in the caption templates, every word drawn from a tier chosen at random (common, rare or
    never-seen, equally often), so it holds every never-seen word that no training caption has.
    The student distils the text teacher on these lines as on its captions (L_emb). A phrase in
    `exclude` (the evaluation captions: `eval_captions`) is drawn again, so the corpus never
    holds a caption that retrieval or the EM probe tests on."""
    rng = np.random.default_rng([seed, len(SPLITS)])

    def word(value):
        tiers = [t for t in TIERS if tier_words(value, t)]
        ws = tier_words(value, tiers[rng.integers(len(tiers))])
        return ws[rng.integers(len(ws))]
    templates = TEMPLATES + [HELD_OUT_TEMPLATE]
    lines = []
    while len(lines) < n:
        shape, colour = SHAPES[rng.integers(8)], COLOURS[rng.integers(8)]
        template = templates[rng.integers(len(templates))]
        text = fix_articles(template.format(size=word(SIZES[rng.integers(2)]), colour=word(colour), shape=word(shape),
                                            pos=word(POSITIONS[rng.integers(4)])))
        if text not in exclude:
            lines.append(text)
    return lines


def eval_captions(n_eval, seed=0, image_size=32):
    """The captions that evaluation tests on (the test split, also the EM probe's held-out
    captions, and the held-out wordings), as a set: no text-only corpus may contain them."""
    return {c for split in ("test", "wordings") for c in ShapesDataset(split, n_eval, seed=seed, image_size=image_size).captions}


def shape_mask(shape, u, v):
    """Inside-test of a unit-radius shape; u, v are coordinates in units of the radius."""
    r = np.sqrt(u * u + v * v)
    name = SHAPES[shape]
    if name == "circle":
        return r <= 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if name == "triangle":
        return (v <= 0.75) & (abs(u) <= (v + 0.95) * 0.6)
    if name == "diamond":
        return abs(u) + abs(v) <= 1
    if name == "cross":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    if name == "star":
        theta = np.arctan2(u, -v)
        return r <= 0.4 + 0.6 * np.abs(np.cos(2.5 * theta)) ** 4
    if name == "hexagon":
        return np.maximum(abs(u) * 0.866 + abs(v) * 0.5, abs(v)) <= 0.9
    return (r <= 1) & (r >= 0.5)  # ring


def render(objects, background, size_px, noise_rng=None):
    """objects: list of (shape, colour, size, pos, jitter (2,), shade); background: (level,
    gradient (2,)). Returns a (3, S, S) uint8 image. Sub-pixel sampling smooths the edges."""
    S = size_px
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) / S  # (S, S) in [0, 1)
    level, grad = background
    img = np.empty((3, S, S), np.float32)
    img[:] = level + grad[0] * (xs - 0.5) + grad[1] * (ys - 0.5)
    offsets = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    for shape, colour, size, pos, jitter, shade in objects:
        radius = (0.2, 0.3)[size]
        cx = (0.3, 0.7)[pos % 2] + jitter[0]
        cy = (0.3, 0.7)[pos // 2] + jitter[1]
        cover = sum(shape_mask(shape, (xs + ox / S - cx) / radius, (ys + oy / S - cy) / radius)
                    for ox, oy in offsets) / len(offsets)  # (S, S) in [0, 1]
        rgb = np.array(RGB[COLOURS[colour]], np.float32)[:, None, None] * shade
        img = img * (1 - cover) + rgb * cover
    if noise_rng is not None:
        img += noise_rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


SPLITS = {"train": 0, "val": 1, "test": 2, "probe": 3, "wordings": 4}


class ShapesDataset:
    """The embedded set, generated in memory. Fields:
    images (N, 3, S, S) uint8; captions: list of N str; attributes (N,) int64 each:
    shape, colour, size, pos (of the main object), label = shape * 8 + colour,
    label2 (the second object's class, or -1), n_objects,
    dup_of (index of the pair this one nearly duplicates, or -1).

    train: seen combinations only, long-tailed class frequency, `two_frac` two-object images,
      `dup_frac` near-duplicates (the same scene, new pixel noise, a new caption).
    val / test / probe: one object, all 64 combinations equally often, training wordings.
    wordings: like test, but every caption uses the held-out words and template."""

    def __init__(self, split, n, seed=0, image_size=32, dup_frac=0.3, imbalance=0.8, two_frac=0.2):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        rng = np.random.default_rng([seed, SPLITS[split]])
        train = split == "train"
        classes = np.array(SEEN_CLASSES if train else range(64))
        if train:  # Zipf-like frequencies over a seeded random order of the seen classes
            p = (1.0 + rng.permutation(len(classes))) ** -imbalance
            p /= p.sum()
        else:
            p = np.full(len(classes), 1 / len(classes))
        self.images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
        self.captions, scenes = [], []
        fields = {k: np.zeros(n, np.int64) for k in ("shape", "colour", "size", "pos", "n_objects", "label2")}
        dup_of = np.full(n, -1, np.int64)
        for i in tqdm(range(n), desc=f"drawing {split} pairs", disable=n < 50000, mininterval=2.0):
            if train and i > 0 and rng.random() < dup_frac:
                j = int(rng.integers(i))
                while dup_of[j] >= 0:
                    j = int(dup_of[j])  # point at the original scene
                dup_of[i], scene = j, scenes[j]
            else:
                label = int(rng.choice(classes, p=p))
                objects = [(label // 8, label % 8, int(rng.integers(2)), int(rng.integers(4)),
                            rng.uniform(-0.04, 0.04, 2), rng.uniform(0.8, 1.0))]
                if train and rng.random() < two_frac:
                    second = int(rng.choice(classes, p=p))
                    pos2 = (objects[0][3] + 1 + int(rng.integers(3))) % 4  # another quadrant
                    objects.append((second // 8, second % 8, 0, pos2, rng.uniform(-0.03, 0.03, 2),
                                    rng.uniform(0.8, 1.0)))
                scene = (objects, (rng.uniform(0.0, 0.35), rng.uniform(-0.15, 0.15, 2)))
            scenes.append(scene)
            objects = scene[0]
            sh, co, sz, po = objects[0][:4]
            second = objects[1][:2] if len(objects) > 1 else None
            self.images[i] = torch.from_numpy(render(objects, scene[1], image_size, rng))
            self.captions.append(caption(sh, co, sz, po, rng, held_out=split == "wordings", second=second))
            label2 = second[0] * 8 + second[1] if second else -1
            for k, val in zip(("shape", "colour", "size", "pos", "n_objects", "label2"), (sh, co, sz, po, len(objects), label2)):
                fields[k][i] = val
        self.attributes = {k: torch.from_numpy(v) for k, v in fields.items()}
        self.attributes["label"] = self.attributes["shape"] * 8 + self.attributes["colour"]
        self.attributes["dup_of"] = torch.from_numpy(dup_of)

    def __len__(self):
        return len(self.captions)


# ----------------------------------------------------------------------------------------
# Pixels -> model input. Images travel as uint8 (N, 3, S, S) and are normalised on the fly.

MEAN, STD = 0.45, 0.25


def to_input(images_uint8, device="cpu"):  # (B, 3, S, S) uint8 -> float32 on device
    return (images_uint8.to(device).float() / 255 - MEAN) / STD


def load_image(source, image_size):
    """A path, bytes or PIL image -> (3, S, S) uint8: RGB, shorter side resized to S, centre crop."""
    img = source if isinstance(source, Image.Image) else Image.open(
        io.BytesIO(source) if isinstance(source, bytes) else source)
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------
# 2. Real pairs. A pair whose key hashes below `val_frac` (salted by the seed) is held out
# for validation, the same way for CSV rows and shard members.

def is_val(key, seed, val_frac):
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < val_frac


def skipped(where, why):
    """A pair that cannot be used travels through the DataLoader as this string, its reason
    (`collate` counts and drops it; a run that finds no usable pair prints one)."""
    return f"{where}: {why}"


def utf8(text):  # False for a field read with errors="surrogateescape" from bytes that are not UTF-8
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class CsvPairs(torch.utils.data.Dataset):
    """open_clip-style CSV (comma) or TSV (tab): one row per pair, image path relative to the
    file. Rows with an empty caption or bytes that are not UTF-8 are dropped when the file is
    read (counted in `skipped_rows`, the first one's reason in `skip_reason`); an Excel BOM
    before the header is ignored; an unreadable image makes __getitem__ return its reason."""

    def __init__(self, path, image_size, img_key="filepath", caption_key="title",
                 split="train", seed=0, val_frac=0.0):
        delimiter = "\t" if path.endswith(".tsv") else ","
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = {img_key, caption_key} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: no column {', '.join(sorted(missing))}; columns are "
                                 f"{reader.fieldnames} (set --csv-img-key / --csv-caption-key)")
            rows, bad = [], []
            for line, r in enumerate(reader, start=2):
                img, text = r[img_key] or "", (r[caption_key] or "").strip()
                if not (utf8(img) and utf8(text)):
                    bad.append(skipped(f"{path} line {line}", "bytes that are not UTF-8"))
                elif not text or not img:
                    bad.append(skipped(f"{path} line {line}", "no caption" if not text else "no image path"))
                else:
                    rows.append((img, text))
        root = os.path.dirname(os.path.abspath(path))
        self.skipped_rows, self.skip_reason = len(bad), bad[0] if bad else None
        keep_val = split == "val"
        self.rows = [(os.path.join(root, p), c) for p, c in rows if is_val(p, seed, val_frac) == keep_val]
        self.image_size = image_size

    def __len__(self):
        return len(self.rows)

    @property
    def captions(self):  # all N captions, read without touching an image (a text teacher needs only these)
        return [c for _, c in self.rows]

    def __getitem__(self, i):
        path, text = self.rows[i]
        try:
            return load_image(path, self.image_size), text
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return skipped(path, e)


def expand_braces(pattern):
    """'cc3m-{00000..00002}.tar' -> ['cc3m-00000.tar', 'cc3m-00001.tar', 'cc3m-00002.tar'];
    also '{a,b}' lists. Several patterns may be joined with '::'."""
    out = []
    for part in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if not m:
            out.append(part)
            continue
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        items = ([str(k).zfill(len(rng.group(1))) for k in range(int(rng.group(1)), int(rng.group(2)) + 1)]
                 if rng else body.split(","))
        for item in items:
            out.extend(expand_braces(part[: m.start()] + item + part[m.end():]))
    return out


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardPairs(torch.utils.data.IterableDataset):
    """webdataset tar shards as img2dataset writes them: members `{key}.{jpg,png,webp}` and
    `{key}.txt` side by side. Shards are split over DataLoader workers; pairs with a missing or
    corrupt image, a missing or empty caption, or an unreadable shard are skipped: they come
    out as their reason (`skipped`), which `collate` counts and drops."""

    def __init__(self, pattern, image_size, split="train", seed=0, val_frac=0.0):
        self.shards = expand_braces(pattern)
        missing = [s for s in self.shards if not os.path.exists(s)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards not found, e.g. {missing[0]}")
        self.image_size, self.split, self.seed, self.val_frac = image_size, split, seed, val_frac
        self.epoch = 0  # set by the caller; shard order is shuffled by (seed, epoch)

    def samples(self, shard):
        """Yield (key, image bytes or None, caption or None) for each key of one shard, and its
        reason (`skipped`) once for a shard that cannot be read to its end."""
        current, parts = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if key != current and current is not None:
                        yield current, parts.get("img"), parts.get("txt")
                        parts = {}
                    current = key
                    data = tar.extractfile(member).read()
                    if ext.lower() in IMAGE_EXTS:
                        parts["img"] = data
                    elif ext.lower() == "txt":
                        parts["txt"] = data.decode("utf-8", errors="replace").strip()
        except (tarfile.TarError, OSError, EOFError) as e:
            yield skipped(shard, f"unreadable shard ({e})")  # counted once
        if current is not None:
            yield current, parts.get("img"), parts.get("txt")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        shards = [self.shards[i] for i in order] if self.split == "train" else self.shards
        if info is not None:
            shards = shards[info.id:: info.num_workers]
        keep_val = self.split == "val"
        for shard in shards:
            for item in self.samples(shard):
                if isinstance(item, str):  # the shard could not be read on
                    yield item
                    continue
                key, img, txt = item
                if is_val(key, self.seed, self.val_frac) != keep_val:
                    continue
                where = f"{shard}:{key}"
                if img is None or not txt:
                    yield skipped(where, "no image" if img is None else "no caption (.txt)" if txt is None else "empty caption")
                    continue
                try:
                    yield load_image(img, self.image_size), txt
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    yield skipped(where, e)


def collate(batch):
    """Drop the pairs that failed to load (their reasons, strings). Returns (images (B, 3, S, S)
    uint8, captions, n_skipped, the first skipped pair's reason or None)."""
    good = [b for b in batch if not isinstance(b, str)]
    why = next((b for b in batch if isinstance(b, str)), None)
    if not good:
        return torch.empty(0, dtype=torch.uint8), [], len(batch), why
    return torch.stack([b[0] for b in good]), [b[1] for b in good], len(batch) - len(good), why


def real_pairs(spec, image_size, split="train", seed=0, val_frac=0.0, img_key="filepath", caption_key="title"):
    """`--data` for real pairs: a .csv/.tsv path or a tar shard pattern."""
    if spec.endswith((".csv", ".tsv")):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"--data {spec}: no such file")
        return CsvPairs(spec, image_size, img_key, caption_key, split, seed, val_frac)
    if ".tar" in spec:
        return ShardPairs(spec, image_size, split, seed, val_frac)
    raise ValueError(f"--data {spec!r}: expected 'shapes', a .csv/.tsv file or a .tar shard pattern")


# ----------------------------------------------------------------------------------------
# 3. Evaluation sets through torchvision: images, labels, class names, prompt templates.

EVAL_SETS = {  # name: (torchvision class, how to ask for the test split)
    "cifar10": ("CIFAR10", {"train": False}), "cifar100": ("CIFAR100", {"train": False}),
    "fashion-mnist": ("FashionMNIST", {"train": False}), "mnist": ("MNIST", {"train": False}),
    "stl10": ("STL10", {"split": "test"}),
}
TEMPLATES_BY_SET = {
    "fashion-mnist": ["a photo of a {}.", "a photo of the {}, a type of clothing.", "a black and white photo of a {}."],
    "mnist": ['a photo of the number: "{}".', "a handwritten digit {}."],
}
DEFAULT_EVAL_TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a photo of the small {}.",
                          "a low resolution photo of a {}."]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def prepare_fashion_mnist(root):
    """torchvision's FashionMNIST reads ROOT/FashionMNIST/raw/*-ubyte. Debian's
    dataset-fashion-mnist ships the same files gzipped: unpack them there once, offline."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        dst, src = os.path.join(raw, name), os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")
        if not os.path.exists(dst) and os.path.exists(src):
            os.makedirs(raw, exist_ok=True)
            with gzip.open(src) as fin, open(dst + ".tmp", "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(dst + ".tmp", dst)


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
    """A named torchvision set as (images (N, 3, S, S) uint8, labels (N,), class names, templates):
    its first max_n images (said in one line when that is not all of them)."""
    ds = open_eval_set(name, root, train)
    n = len(ds) if max_n is None else min(max_n, len(ds))
    if n < len(ds):
        print(f"{name}: the first {n} of the {len(ds)} {'train' if train else 'test'} images")
    images = torch.stack([load_image(ds[i][0], image_size) for i in range(n)])
    labels = torch.tensor([int(ds[i][1]) for i in range(n)])
    classes = [c.replace("_", " ") for c in ds.classes]
    if name == "mnist":
        classes = [c.split(" - ")[1] for c in classes]
    return images, labels, classes, TEMPLATES_BY_SET.get(name, DEFAULT_EVAL_TEMPLATES)



# ----------------------------------------------------------------------------------------
# 4. Attribute sets, read from the folders as published (CUB_200_2011.tgz, AwA2-data.zip),
# never downloaded: Knowledge-CLIP evaluates its image encoder on AWA2 and CUB.

@dataclass
class AttributeSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64, index into class_names
    class_names: list  # C readable names: 'black footed albatross', 'grizzly bear'
    attribute_names: list  # A readable names: 'curved (up or down) bill shape', 'black'
    class_attributes: torch.Tensor  # (C, A) float in [0, 1]
    n_skipped: int  # unreadable images
    test_classes: torch.Tensor = None  # (C,) bool: AWA2's proposed zero-shot test classes


def readable(name):  # '001.Black_footed_Albatross' -> 'black footed albatross'; 'grizzly+bear' -> 'grizzly bear'
    return " ".join(re.sub(r"^\d+\.", "", name).replace("_", " ").replace("+", " ").lower().split())


def cub_attribute_name(name):  # 'has_bill_shape::curved_(up_or_down)' -> 'curved (up or down) bill shape'
    part, value = name.split("::")
    return f"{readable(value)} {readable(re.sub(r'^has_', '', part))}"


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
            images.append(load_image(path, image_size))
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
    return AttributeSet(images, labels, [readable(c) for c in classes], attribute_names, class_attributes, skipped)


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
        items += [(os.path.join(folder, f), y) for f in files if f.lower().endswith(IMAGE_EXTS)]
    images, labels, skipped = load_images(items, image_size, max_per_class)
    return AttributeSet(images, labels, [readable(classes[i]) for i in idx], [readable(p) for p in predicates],
                        matrix[idx], skipped, torch.tensor([classes[i] in test for i in idx]))


ATTRIBUTE_SETS = {"cub": load_cub, "awa2": load_awa2}
ATTRIBUTE_FILES = {  # what each attribute set's loader reads, to check before a run trains
    "cub": ("CUB_200_2011", CUB_LAYOUT, ["classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                                         "images", os.path.join("attributes", "class_attribute_labels_continuous.txt")]),
    "awa2": ("Animals_with_Attributes2", AWA2_LAYOUT, ["classes.txt", "predicates.txt", "predicate-matrix-continuous.txt",
                                                      "trainclasses.txt", "testclasses.txt", "JPEGImages"]),
}


def check_eval_set(name, root):
    """A one-line FileNotFoundError now if an --eval-sets set is not under root (train.py asks
    before it trains, so a missing set never costs a run)."""
    if name in ATTRIBUTE_SETS:
        folder, layout, files = ATTRIBUTE_FILES[name]
        for f in files:
            need(os.path.join(inside(root, folder), f), layout)
    else:
        open_eval_set(name, root), open_eval_set(name, root, train=True)  # the probe needs the train split too


if __name__ == "__main__":  # python data.py: look at the embedded data
    import argparse
    import torchvision
    p = argparse.ArgumentParser(description="Write a grid of embedded training pairs and print their captions.")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="shapes.png")
    a = p.parse_args()
    ds = ShapesDataset("train", a.n, seed=a.seed)
    big = torch.nn.functional.interpolate(ds.images.float() / 255, scale_factor=3, mode="nearest")
    torchvision.utils.save_image(big, a.out, nrow=8, padding=2, pad_value=1.0)
    for i, c in enumerate(ds.captions):
        print(f"{i:3d}  {c}" + (f"   (near-duplicate of {int(ds.attributes['dup_of'][i])})" if ds.attributes["dup_of"][i] >= 0 else ""))
    print(f"wrote {a.out}")
