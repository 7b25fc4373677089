"""Image-caption data, from a world of shapes to the batches a run trains on (evaluation sets: eval.py).

1. The embedded "shapes" world: images of one or two coloured objects drawn from a seed, captions in several templates
   and synonyms ("crimson" for red) so a pretrained text model's knowledge can matter, a text-only corpus in the same
   words; redundant on purpose like web data (near-duplicates, a long tail of classes); some combinations and wordings
   held out. Nothing to download, any size.
2. Pairs by row: the embedded set, CSV/TSV rows, webdataset tar shards and text-only lines behind one interface
   (`Pairs`); a corrupt or missing image or an empty caption is skipped and counted, never crashes a run.
3. Data parallelism: which rank takes which rows. 4. Batches: each a pure function of (seed, step).
"""
import contextlib
import copy
import csv
import functools
import hashlib
import itertools
import os
import re
import tarfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import clip

# ----------------------------------------------------------------------------------------
# 1. The embedded set. Attribute values, the words that name them, and the templates.

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]

RGB = {"red": (0.9, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.95, 0.9, 0.1), "green": (0.1, 0.75, 0.2),
       "cyan": (0.1, 0.85, 0.9), "blue": (0.15, 0.3, 1.0), "purple": (0.55, 0.15, 0.8), "pink": (1.0, 0.5, 0.75)}

# The words for each value, in three tiers (eval.py scores each tier apart):
#   common: the training captions use them all the time (each about equally often);
#   rare: each mention of a colour or shape uses its rare word with probability RARE_FRAC, so each rare word is in a
#     fraction of a percent of the training captions;
#   never-seen: in no training caption; only in the held-out split "wordings", in prompts and in the text-only corpus
#     (`text_corpus`). Sizes and positions have no rare word.
# The rare and never-seen words are ones the default text teacher (all-MiniLM-L6-v2) matches to their colour or shape
# where it can (python docs/em_probe.py --tiers measures it; it misses some colours whichever synonym is taken), and
# none is a spelling variant of a common word.
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
SPLITS = {"train": 0, "val": 1, "test": 2, "probe": 3, "wordings": 4, "pretrain": 6}  # a seed's random streams
CORPUS_STREAM = 5  # text_corpus's
EMBEDDED = {"shapes": "train", "shapes-pretrain": "pretrain"}  # --data name -> split


def with_article(text):
    return ("an " if text[0] in "aeiou" else "a ") + text


def fix_articles(text):  # a template's "a" before a vowel: "a amber star" -> "an amber star"
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def word(value, rng, how="train"):
    """A word that names `value`, drawn from rng. how: "train": a common word, or the rare one with probability
    RARE_FRAC; "never-seen": the never-seen word; "every": any of its words, every tier alike; "tiers": a tier first
    (common, rare or never-seen, equally often), then one of its words."""
    common, rare, never = WORDS[value]
    if how == "never-seen":
        return never
    if how == "train" and rare is not None and rng.random() < RARE_FRAC:
        return rare
    if how == "tiers":
        tiers = [t for t in TIERS if tier_words(value, t)]
        words = tier_words(value, tiers[rng.integers(len(tiers))])
    else:
        words = common if how == "train" else common + [w for w in (rare, never) if w]
    return words[rng.integers(len(words))]


def caption(shape, colour, size, pos, rng, held_out=False, second=None, every_wording=False):
    """One caption for an object (and an optional second object (shape, colour)). held_out: the never-seen words and
    the held-out template; every_wording: each word drawn from all of its value's words, every tier alike, and the
    held-out template among the others (the teacher's pretraining pool)."""
    how = "every" if every_wording else "never-seen" if held_out else "train"
    sh, co = word(SHAPES[shape], rng, how), word(COLOURS[colour], rng, how)
    if second is not None:
        text = PAIR_TEMPLATE.format(colour=co, shape=sh, colour2=word(COLOURS[second[1]], rng, how),
                                    shape2=word(SHAPES[second[0]], rng, how))
    else:
        templates = TEMPLATES + [HELD_OUT_TEMPLATE] if every_wording else TEMPLATES
        template = HELD_OUT_TEMPLATE if held_out else templates[rng.integers(len(templates))]
        text = template.format(size=word(SIZES[size], rng, how), colour=co, shape=sh,
                               pos=word(POSITIONS[pos], rng, how))
    return fix_articles(text)


def text_corpus(n=10000, seed=0, exclude=frozenset()):
    """The default text-only corpus of `train.py --text-corpus` (beyond the papers), which the student distils the
    text teacher on as on its captions (L_emb): n phrases in the caption templates, each word drawn by tier (`word`),
    so it holds every never-seen word. A phrase in `exclude` (`eval_captions`) is drawn again."""
    rng = np.random.default_rng([seed, CORPUS_STREAM])
    templates, lines = TEMPLATES + [HELD_OUT_TEMPLATE], []
    while len(lines) < n:
        shape, colour = SHAPES[rng.integers(8)], COLOURS[rng.integers(8)]
        template = templates[rng.integers(len(templates))]
        text = fix_articles(template.format(size=word(SIZES[rng.integers(2)], rng, "tiers"),
                                            colour=word(colour, rng, "tiers"), shape=word(shape, rng, "tiers"),
                                            pos=word(POSITIONS[rng.integers(4)], rng, "tiers")))
        if text not in exclude:
            lines.append(text)
    return lines


def eval_captions(n_eval, seed=0, image_size=32):
    """The captions that retrieval and the EM probe test on (the test and wordings splits), as a set: no text-only
    corpus may contain them."""
    return {c for split in ("test", "wordings") for c in ShapesDataset(split, n_eval, seed=seed, image_size=image_size).captions}


def shape_mask(shape, u, v):
    """Inside-test of a unit-radius shape; u, v are coordinates in units of the radius."""
    r = np.sqrt(u * u + v * v)
    return {"circle": lambda: r <= 1, "square": lambda: np.maximum(abs(u), abs(v)) <= 0.8,
            "triangle": lambda: (v <= 0.75) & (abs(u) <= (v + 0.95) * 0.6), "diamond": lambda: abs(u) + abs(v) <= 1,
            "cross": lambda: ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95)),
            "star": lambda: r <= 0.4 + 0.6 * np.abs(np.cos(2.5 * np.arctan2(u, -v))) ** 4,
            "hexagon": lambda: np.maximum(abs(u) * 0.866 + abs(v) * 0.5, abs(v)) <= 0.9,
            "ring": lambda: (r <= 1) & (r >= 0.5)}[SHAPES[shape]]()


def render(objects, background, size_px, noise_rng=None):
    """objects: list of (shape, colour, size, pos, jitter (2,), shade); background: (level, gradient (2,)).
    Returns a (3, S, S) uint8 image. Sub-pixel sampling smooths the edges."""
    S, (level, grad) = size_px, background
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) / S  # (S, S) in [0, 1)
    img = np.empty((3, S, S), np.float32)
    img[:] = level + grad[0] * (xs - 0.5) + grad[1] * (ys - 0.5)
    offsets = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    for shape, colour, size, pos, jitter, shade in objects:
        radius = (0.2, 0.3)[size]
        cx, cy = (0.3, 0.7)[pos % 2] + jitter[0], (0.3, 0.7)[pos // 2] + jitter[1]
        cover = sum(shape_mask(shape, (xs + ox / S - cx) / radius, (ys + oy / S - cy) / radius)
                    for ox, oy in offsets) / len(offsets)  # (S, S) in [0, 1]
        rgb = np.array(RGB[COLOURS[colour]], np.float32)[:, None, None] * shade
        img = img * (1 - cover) + rgb * cover
    if noise_rng is not None:
        img += noise_rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ShapesDataset:
    """The embedded set, generated in memory. Fields: images (N, 3, S, S) uint8; captions: list of N str;
    attributes (N,) int64 each: shape, colour, size, pos (of the main object), label = shape * 8 + colour, label2 (the
    second object's class, or -1), n_objects, dup_of (index of the pair this one nearly duplicates, or -1).

    train: seen combinations only, long-tailed class frequency, `two_frac` two-object images, `dup_frac`
      near-duplicates (the same scene, new pixel noise, a new caption).
    val / test / probe: one object, all 64 combinations equally often, training wordings.
    wordings: like test, but every caption uses the held-out words and template.
    pretrain: the CLIP-CID teacher's pretraining pool (`--data shapes-pretrain`), broader than any student's data:
      like train, but all 64 combinations (the held-out ones too) and every wording (`caption`'s every_wording)."""

    def __init__(self, split, n, seed=0, image_size=32, dup_frac=0.3, imbalance=0.8, two_frac=0.2):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        rng = np.random.default_rng([seed, SPLITS[split]])
        train = split in ("train", "pretrain")  # the pools models train on
        classes = np.array(SEEN_CLASSES if split == "train" else range(64))
        # train: Zipf-like frequencies over a seeded random order of the seen classes; else all equally often
        p = (1.0 + rng.permutation(len(classes))) ** -imbalance if train else np.ones(len(classes))
        p /= p.sum()
        self.images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
        self.captions, scenes, dup_of = [], [], np.full(n, -1, np.int64)
        info = np.zeros((n, 6), np.int64)  # per pair: shape, colour, size, pos, n_objects, label2
        for i in tqdm(range(n), desc=f"drawing {split} pairs", disable=n < 50000, mininterval=2.0):
            if train and i > 0 and rng.random() < dup_frac:
                j = int(rng.integers(i))
                dup_of[i] = j if dup_of[j] < 0 else dup_of[j]  # point at the original scene (j's own if j is a copy)
                scene = scenes[j]
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
            self.captions.append(caption(sh, co, sz, po, rng, held_out=split == "wordings", second=second,
                                         every_wording=split == "pretrain"))
            info[i] = sh, co, sz, po, len(objects), second[0] * 8 + second[1] if second else -1
        self.attributes = {k: torch.from_numpy(info[:, j].copy())
                           for j, k in enumerate(("shape", "colour", "size", "pos", "n_objects", "label2"))}
        self.attributes["label"] = self.attributes["shape"] * 8 + self.attributes["colour"]
        self.attributes["dup_of"] = torch.from_numpy(dup_of)

    def __len__(self):
        return len(self.captions)


def training_set(cfg):
    """The embedded pairs a run trains on, from its config (train.py's flags, or a checkpoint's saved config): every
    place that needs them again (the EM probe, the pretrained teacher's pool check) draws them here."""
    return ShapesDataset(EMBEDDED[cfg["data"]], cfg["n_train"], seed=cfg["seed"], image_size=cfg["image_size"],
                         dup_frac=cfg["dup_frac"], imbalance=cfg["imbalance"])


# ----------------------------------------------------------------------------------------
# 2. Pairs by row. A `Pairs` is every pair of a data set in a fixed order: the embedded set, CSV rows, webdataset
# shards (read by row too: one scan of their headers records where each member's bytes lie) and text-only lines
# answer alike, so they shuffle, resume mid-epoch and split over ranks the same way. Row i has a stable key
# (`keys[i]`), and reading it gives (image (3, S, S) uint8, caption, i), or the reason it cannot be used. Rows come in
# `parts`: the teacher store (teachers.py) builds, fingerprints and resumes one part at a time.
# A pair whose key hashes below `val_frac` is held out for evaluation: the same pairs for every seed, so a seed spread
# measures training, not the split. `--train-frac` trains on a part of the rest, drawn by a second hash: the same part
# for every seed, and a teacher trained on the whole set (--train-frac 1) has seen none of the held-out pairs either.

def key_hash(key, salt):  # a pair's key -> a number in [0, 1), the same on every machine
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2 ** 64


def is_val(key, val_frac):
    return key_hash(key, 0) < val_frac


def in_part(key, train_frac):
    return train_frac >= 1 or key_hash(key, "part") < train_frac


def skipped(where, why):
    """A pair that cannot be used travels through the DataLoader as this string, its reason (`collate` counts and
    drops it; a run that finds no usable pair prints one)."""
    return f"{where}: {why}"


def chunks(n, size):  # [(start, stop)] covering range(n) in pieces of `size`
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def fingerprint_of(*parts):
    """A short hash: tensors by their bytes, everything else by its repr."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.contiguous().numpy().tobytes() if torch.is_tensor(p) else repr(p).encode())
    return h.hexdigest()[:16]


class Pairs(torch.utils.data.Dataset):
    """What every data set answers. Subclasses set `keys` (N str), `parts` [(name, start, stop)], the lists `sources`
    (a path, bytes or uint8 tensor per row; None: no image) and `captions` (str; None: none) or define source(i) and
    caption(i), and define where(i) (row i, for messages) and part_content(start, stop) (what the part's fingerprint
    hashes: it changes when the part's pairs change). `spec`: what --data named; `skipped_rows` / `skip_reason`: the
    pairs dropped when the listing was read."""
    image_size, crop, skipped_rows, skip_reason, spec = 32, None, 0, None, None

    def __len__(self):
        return len(self.keys)

    def source(self, i):
        return self.sources[i]

    def caption(self, i):
        return self.captions[i]

    def at_size(self, image_size, crop=None):
        """The same pairs read at another size (a teacher's own input size)."""
        view = copy.copy(self)
        view.image_size, view.crop = image_size, crop
        return view

    def __getitem__(self, i):
        text = self.caption(i)
        if not text:
            return skipped(self.where(i), "no caption (.txt)" if text is None else "empty caption")
        source = self.source(i)
        if source is None:
            return skipped(self.where(i), "no image")
        try:
            return clip.load_image(source, self.image_size, self.crop), text, i
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return skipped(self.where(i), e)

    def part_fingerprint(self, j):  # hashed once per part and run: the store asks for it often
        memo = self.__dict__.setdefault("fingerprints", {})
        if j not in memo:
            memo[j] = fingerprint_of(*self.part_content(*self.parts[j][1:]))
        return memo[j]

    def fingerprint(self):
        """A short hash of every part's fingerprint: names this data in results.json."""
        return hashlib.sha1(repr([self.part_fingerprint(j) for j in range(len(self.parts))]).encode()).hexdigest()[:16]


class ShapesPairs(Pairs):
    """The embedded set (a ShapesDataset in memory) by row: key the pair's index, parts of 5,000 pairs."""

    def __init__(self, ds, part_rows=5000):
        self.ds, self.image_size, self.sources, self.captions = ds, ds.images.shape[-1], ds.images, ds.captions
        self.keys = [str(i) for i in range(len(ds))]
        self.parts = [(f"pairs-{a:07d}", a, b) for a, b in chunks(len(ds), part_rows)]

    def where(self, i):
        return f"pair {i}"

    def part_content(self, a, b):
        return self.sources[a:b], self.captions[a:b]


class TextLines(Pairs):
    """Text-only lines (a Knowledge-CLIP text corpus) by row, for the text teacher's store: key the line's index,
    parts of 10,000 lines, no images."""

    def __init__(self, lines, part_rows=10000):
        self.captions, self.sources, self.keys = lines, [None] * len(lines), [str(i) for i in range(len(lines))]
        self.parts = [(f"lines-{a:09d}", a, b) for a, b in chunks(len(lines), part_rows)]

    def where(self, i):
        return f"line {i + 1}"

    def part_content(self, a, b):
        return (self.captions[a:b],)


class CsvPairs(Pairs):
    """open_clip-style CSV (comma) or TSV (tab): one row per pair, image path relative to the file, parts of 10,000
    rows. Rows with an empty caption or bytes that are not UTF-8 are dropped when the file is read (counted in
    `skipped_rows`, the first one's reason in `skip_reason`); an Excel BOM before the header is ignored. Key: the
    `key_column` if given, else the image path as written (the k-th repeat of a path gets '#k')."""

    def __init__(self, path, image_size=32, img_key="filepath", caption_key="title", key_column=None, part_rows=10000,
                 label_key=None):
        root, bad, seen, labels = os.path.dirname(os.path.abspath(path)), [], {}, []
        self.spec, self.image_size, self.keys, self.sources, self.captions = path, image_size, [], [], []
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            missing = {img_key, caption_key, *(k for k in (key_column, label_key) if k)} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: no column {', '.join(sorted(missing))}; columns are {reader.fieldnames} "
                                 "(set --csv-img-key / --csv-caption-key / --csv-key / --csv-label-key)")
            for line, r in enumerate(reader, start=2):
                img, text = r[img_key] or "", (r[caption_key] or "").strip()
                if re.search("[\ud800-\udfff]", img + text):  # bytes that are not UTF-8, read as surrogates
                    bad.append(skipped(f"{path} line {line}", "bytes that are not UTF-8"))
                elif not text or not img:
                    bad.append(skipped(f"{path} line {line}", "no caption" if not text else "no image path"))
                else:
                    key = r[key_column] if key_column else img
                    seen[key] = seen.get(key, 0) + 1
                    self.keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
                    self.sources.append(os.path.join(root, img))
                    self.captions.append(text)
                    labels.append(" ".join((r[label_key] or "").split()) if label_key else "")
        self.skipped_rows, self.skip_reason = len(bad), bad[0] if bad else None
        self.labels = labels if label_key else None  # a class name per row ('' where none): eval.eval_labelled_pairs
        self.parts = [(f"rows-{a:09d}", a, b) for a, b in chunks(len(self.keys), part_rows)]

    where = Pairs.source  # a row is named by its image path

    def part_content(self, a, b):
        return self.keys[a:b], list(zip(self.sources[a:b], self.captions[a:b]))


def expand_braces(pattern):
    """'cc3m-{00000..00002}.tar' -> ['cc3m-00000.tar', 'cc3m-00001.tar', 'cc3m-00002.tar'];
    also '{a,b}' lists. Several patterns may be joined with '::'."""
    out = []
    for part in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if not m:
            out.append(part)
            continue
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
        items = ([str(k).zfill(len(rng.group(1))) for k in range(int(rng.group(1)), int(rng.group(2)) + 1)]
                 if rng else m.group(1).split(","))
        for item in items:
            out.extend(expand_braces(part[: m.start()] + item + part[m.end():]))
    return out


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def scan_shard(path):
    """Where each sample of a tar shard lies, from its headers alone (the data is seeked over): ([(key, image
    (offset, size) or None, caption (offset, size) or None)], reason or None). Members `{key}.{jpg,png,webp}` and
    `{key}.txt` make a sample; a shard that cannot be read to its end keeps the samples before the break, says why."""
    samples, reason, size, end = {}, None, os.path.getsize(path), 0
    try:
        with tarfile.open(path, "r:") as tar:  # plain tar: random access needs it uncompressed
            for m in tar:
                end = m.offset_data + -(-m.size // 512) * 512  # where the member's padded data ends
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    break
                folder, name = os.path.split(m.name)
                stem, _, ext = name.partition(".")
                parts = samples.setdefault(os.path.join(folder, stem), {})
                if ext.lower() in IMAGE_EXTS:
                    parts["img"] = (m.offset_data, m.size)
                elif ext.lower() == "txt":
                    parts["txt"] = (m.offset_data, m.size)
        if size < end + 1024:  # a whole tar ends with two zero blocks: this one was cut short
            reason = "truncated shard: the samples before the cut are read"
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = f"unreadable shard ({e})"
    return [(k, p.get("img"), p.get("txt")) for k, p in samples.items()], reason


def scan_cached(path, cache):
    """scan_shard, kept in the folder `cache` (None: not kept) and reused while the shard's path, size, modification
    time and first and last 64 KiB are unchanged (size and time alone miss a shard rewritten within one clock tick:
    tar pads every file to 10 KiB records): a CC3M-sized listing is scanned once, not per run."""
    if cache is None:
        return scan_shard(path)
    st, path = os.stat(path), os.path.abspath(path)
    with open(path, "rb") as f:
        ends = f.read(65536)
        f.seek(max(0, st.st_size - 65536))
        stamp = [path, st.st_size, st.st_mtime_ns, hashlib.sha1(ends + f.read()).hexdigest()]
    file = os.path.join(cache, hashlib.sha1(path.encode()).hexdigest()[:16] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # none kept yet, or unreadable: scan again
        old = clip.read_json(file)
        if old["stamp"] == stamp:
            return [(k, img and tuple(img), txt and tuple(txt)) for k, img, txt in old["samples"]], old["reason"]
    samples, reason = scan_shard(path)
    with contextlib.suppress(OSError):  # a read-only or full disk: the scan is still right, only not kept
        os.makedirs(cache, exist_ok=True)
        clip.write_json(file, {"stamp": stamp, "samples": samples, "reason": reason})
    return samples, reason


def read_bytes(path, span):  # span (offset, size): a member's bytes, without reading the rest of the shard
    with open(path, "rb") as f:
        f.seek(span[0])
        return f.read(span[1])


class ShardPairs(Pairs):
    """webdataset tar shards as img2dataset writes them, by row: one part per shard, key 'shard/__key__'. A sample
    with no image, no or an empty caption, or a corrupt image comes out as its reason; an unreadable or truncated
    shard is counted once in `skipped_rows`. Each shard's header scan is kept in `scan_cache` (scan_cached)."""

    def __init__(self, pattern, image_size=32, scan_cache=None):
        self.shards, self.spec = expand_braces(pattern), pattern
        missing = [s for s in self.shards if not os.path.exists(s)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards not found, e.g. {missing[0]}")
        names = [os.path.basename(s) for s in self.shards]
        names = names if len(set(names)) == len(names) else self.shards  # two folders with the same shard names
        self.image_size, self.keys, self.spans, self.parts, self.listing, problems = image_size, [], [], [], [], []
        for s, (shard, name) in enumerate(tqdm(list(zip(self.shards, names)), desc="scanning shards", unit="shard",
                                                disable=len(self.shards) < 50, mininterval=2.0)):
            samples, reason = scan_cached(shard, scan_cache)
            problems += [skipped(shard, reason)] if reason else []
            self.parts.append((name, len(self.keys), len(self.keys) + len(samples)))
            self.listing.append(f"{name}:{os.path.getsize(shard)} bytes:{fingerprint_of(samples)}")
            self.keys += [f"{name}/{k}" for k, _, _ in samples]
            self.spans += [(s, img, txt) for _, img, txt in samples]
        self.skipped_rows, self.skip_reason = len(problems), problems[0] if problems else None

    def source(self, i):
        shard, img, _ = self.spans[i]
        return None if img is None else read_bytes(self.shards[shard], img)

    def caption(self, i):
        shard, _, txt = self.spans[i]
        return None if txt is None else read_bytes(self.shards[shard], txt).decode("utf-8", errors="replace").strip()

    def where(self, i):
        return f"{self.shards[self.spans[i][0]]}:{self.keys[i].rpartition('/')[2]}"

    def part_fingerprint(self, j):  # the shard's name, size and member listing
        return self.listing[j]


def collate(batch, tokenizer=None, context_length=32):
    """Drop the pairs that failed to load (their reasons, strings). Returns (images (B, 3, S, S) uint8, captions,
    [their tokens (B, L) if a tokenizer is given: RealStream's, in the loader's workers,] rows (B,) int64, n_skipped,
    the first skipped pair's reason or None)."""
    good = [b for b in batch if not isinstance(b, str)]
    captions, why = [b[1] for b in good], next((b for b in batch if isinstance(b, str)), None)
    images = torch.stack([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)
    tokens = (tokenizer(captions, context_length),) if tokenizer else ()
    return images, captions, *tokens, torch.tensor([b[2] for b in good], dtype=torch.int64), len(batch) - len(good), why


def real_pairs(spec, image_size=32, img_key="filepath", caption_key="title", key_column=None, scan_cache=None,
               label_key=None):
    """`--data` for real pairs: a .csv/.tsv path or a tar shard pattern (header scans kept in `scan_cache`);
    label_key: a CSV column of class names."""
    if spec.endswith((".csv", ".tsv")):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"--data {spec}: no such file")
        return CsvPairs(spec, image_size, img_key, caption_key, key_column, label_key=label_key)
    if label_key:
        raise ValueError(f"--csv-label-key {label_key}: class names are read from a CSV column; --data {spec} is not a CSV")
    if ".tar" in spec:
        if spec.endswith((".tar.gz", ".tgz")):
            raise ValueError(f"--data {spec}: compressed shards cannot be read by row; unpack them to plain .tar")
        return ShardPairs(spec, image_size, scan_cache)
    raise ValueError(f"--data {spec!r}: expected 'shapes', a .csv/.tsv file or a .tar shard pattern")


# ----------------------------------------------------------------------------------------
# 3. Data parallelism: which rank takes which rows. torchrun starts N processes; each takes 1/N of every global batch
# (the streams below) and of every store k-means fits on (`shard`); DistributedDataParallel averages the gradients.
# One process: every helper is a no-op.

def world():  # (rank, world_size); (0, 1) when torch.distributed is not initialised
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def barrier():  # wait for every rank (nothing to wait for in one process)
    if world()[1] > 1:
        dist.barrier()


def shard(x):
    """This rank's contiguous slice of the rows of x (all of x when not distributed): what each rank passes to
    `kmeans.fit` so that the ranks together hold every row once, in order."""
    (rank, n_ranks), n = world(), len(x)
    return x[rank * n // n_ranks:(rank + 1) * n // n_ranks]


# ----------------------------------------------------------------------------------------
# 4. Batches. Each one is a pure function of (seed, step), so a resumed run sees the same data.

BPE_SAMPLE = 20000  # captions the tokenizer learns its merges from (evenly spaced over the pool)


def step_generator(seed, step, stream):
    """The random draws a step makes inside the loop come from here, a pure function of (seed, step, stream), never
    from the global RNG: a resumed run draws exactly what an unbroken one did, wherever it was stopped. stream 0:
    text-only lines; 1: partial class sampling."""
    return torch.Generator().manual_seed(seed * 1000003 + step + stream * 2 ** 40)


class Stream:
    def learn_tokenizer(self, captions, vocab_size):
        """The run's byte-pair tokenizer, learned from its training captions (its merges go into every checkpoint)."""
        self.merges = clip.learn_bpe(captions, vocab_size) if vocab_size > clip.N_BASE else []
        self.tokenizer = clip.Tokenizer(self.merges)

    def order(self, epoch):  # (P,) epoch e's order of the pool: a permutation seeded by (seed, e)
        return self.pool[torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))]

    def restrict(self, keep):
        """Train only on the pairs of the pool where keep (N,) bool is True."""
        self.pool = self.pool[torch.as_tensor(keep)[self.pool]]
        if len(self.pool) < self.batch_size:
            raise SystemExit(f"error: only {len(self.pool)} pairs left, fewer than --batch-size {self.batch_size}")


class ShapesStream(Stream):
    """The embedded set in memory, in `order(epoch)` of its pool."""

    def __init__(self, ds, batch_size, seed=0, vocab_size=1024, context_length=32):
        if batch_size > len(ds):
            raise SystemExit(f"error: --batch-size {batch_size} is larger than the {len(ds)} training pairs")
        self.ds, self.pairs = ds, ShapesPairs(ds)  # a ShapesDataset (training_set); its pairs by row, for the store
        self.learn_tokenizer(ds.captions[:BPE_SAMPLE], vocab_size)
        self.tokens = self.tokenizer(ds.captions, context_length)  # (N, L)
        self.batch_size, self.seed, self.perm_epoch, self.skipped = batch_size, seed, None, 0
        self.pool = torch.arange(len(self.ds))  # the pairs we train on (semantic balance may drop some)
        self.fingerprint = fingerprint_of(self.ds.images, self.ds.captions)  # names this data in results.json

    def images(self, idx):  # (n,) rows -> (n, 3, S, S) uint8, for pictures
        return self.ds.images[torch.as_tensor(idx)]

    def batch(self, step):
        epoch, k = divmod(step, len(self.pool) // self.batch_size)
        if self.perm_epoch != epoch:
            self.perm, self.perm_epoch = self.order(epoch), epoch
        idx = self.perm[k * self.batch_size:(k + 1) * self.batch_size]  # (B,) the global batch
        rank, n = world()
        local = idx.view(n, -1)[rank]  # (B / W,) this rank's share
        return {"images": self.ds.images[local], "tokens": self.tokens[local], "index": local, "global_index": idx,
                "skipped": 0}


class RealStream(Stream):
    """CSV rows or tar shards, read by row (Pairs) through a DataLoader, in the same seeded order of the pool per
    epoch as the embedded set: resuming at step s skips the batches already seen without loading their images. The
    pool: the pairs is_val leaves, in_part of them. A batch holds --batch-size rows less the pairs that could not be
    read (under torchrun: trimmed to the smallest share, so every rank gathers as many rows); a batch with fewer than 2
    usable pairs is skipped."""

    def __init__(self, pairs, batch_size, seed=0, vocab_size=1024, context_length=32, val_frac=0.02, train_frac=1.0,
                 workers=2, pin_memory=False):
        self.pairs, self.batch_size, self.seed, self.workers, self.iterator = pairs, batch_size, seed, workers, None
        self.context_length, self.skipped, self.pin_memory = context_length, pairs.skipped_rows, pin_memory  # CUDA: pinned
        self.pool = torch.tensor([i for i, k in enumerate(pairs.keys)
                                  if not is_val(k, val_frac) and in_part(k, train_frac)], dtype=torch.long)
        if not len(self.pool):
            raise ValueError(f"{pairs.spec}: no training pairs left with --val-frac {val_frac} and --train-frac "
                             f"{train_frac}")
        self.fingerprint = pairs.fingerprint()
        sample = self.pool[np.linspace(0, len(self.pool) - 1, min(BPE_SAMPLE, len(self.pool))).astype(np.int64)]
        self.learn_tokenizer([c for c in (pairs.caption(int(i)) for i in sample) if c], vocab_size)

    def images(self, idx):  # pictures: each image at 64 px (a black tile if it cannot be read)
        view = self.pairs.at_size(64)
        return torch.stack([item[0] if not isinstance(item, str) else torch.zeros(3, 64, 64, dtype=torch.uint8)
                            for item in (view[int(i)] for i in idx)])

    def epochs(self, start_step):
        """Yield (images, captions, tokens, local rows, global rows, n_skipped) from step `start_step` on, through one
        DataLoader for the whole run (its workers read on across epochs): epoch e's order of the pool, this rank's share
        of each global batch. A whole pass that yields no batch stops the run with one line that says why."""
        (rank, n), B = world(), self.batch_size
        carry, reason = 0, self.pairs.skip_reason  # skipped pulls not yet reported; an example
        per_epoch = len(self.pool) // B
        if per_epoch == 0:
            dropped = f" ({self.skipped} dropped, e.g. {reason})" if self.skipped else ""
            raise SystemExit(f"error: --data {self.pairs.spec} has {len(self.pool)} training pairs{dropped}, fewer than "
                             f"--batch-size {B}")
        epoch, skip = divmod(start_step, per_epoch)  # skip: the batches of this epoch already trained on

        def mine():  # this rank's rows, epoch after epoch, from the first batch not trained on yet
            for e in itertools.count(epoch):
                yield from self.order(e)[(skip if e == epoch else 0) * B:per_epoch * B].view(-1, n, B // n)[:, rank].flatten().tolist()
        loader = torch.utils.data.DataLoader(self.pairs, sampler=mine(), batch_size=B // n, num_workers=self.workers,
                                             pin_memory=self.pin_memory, collate_fn=functools.partial(
                                                 collate, tokenizer=self.tokenizer, context_length=self.context_length))
        left, full_pass, usable = per_epoch - skip, skip == 0, 0  # batches left in this epoch, usable ones read in it
        for images, captions, tokens, rows, skipped, why in loader:
            reason, k = reason or why, torch.tensor([len(captions)])
            if n > 1:  # every rank keeps as many pairs as the one with fewest
                dist.all_reduce(k, op=dist.ReduceOp.MIN)
            k = int(k)
            if k < 2:  # nothing to contrast: skipped, its pairs counted
                carry += skipped + len(captions)
            else:
                skipped, images, captions, tokens, rows = skipped + len(captions) - k, images[:k], captions[:k], tokens[:k], rows[:k]
                every = rows
                if n > 1:  # (k W,) the global batch's rows, in rank order
                    shares = [torch.empty_like(rows) for _ in range(n)]
                    dist.all_gather(shares, rows)
                    every = torch.cat(shares)
                usable += 1
                yield images, captions, tokens, rows, every, carry + skipped
                carry = 0
            left -= 1
            if left == 0:  # the epoch's last batch
                if full_pass and usable == 0:
                    hint = " (CSV image paths are read relative to the CSV file's folder)" if isinstance(self.pairs, CsvPairs) else ""
                    raise SystemExit(f"error: --data {self.pairs.spec}: no usable pair in a whole pass ({carry} skipped), e.g. {reason}{hint}")
                left, full_pass, usable = per_epoch, True, 0

    def batch(self, step):
        if self.iterator is None:
            self.iterator = self.epochs(step)
        images, captions, tokens, rows, every, skipped = next(self.iterator)
        self.skipped += skipped
        return {"images": images, "tokens": tokens, "captions": captions, "index": rows, "global_index": every,
                "skipped": self.skipped}
