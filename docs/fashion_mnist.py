"""Fashion-MNIST: the papers' regime on real images, small enough for a laptop.

`python docs/fashion_mnist.py` (needs Debian's dataset-fashion-mnist: 70,000 real 28 x 28
photos of clothing in 10 classes) does, resumably, into runs/fmnist:
1. the data: every training image as a PNG with a caption made from its class name, a synonym
   and a template (`caption`), in pairs.csv (filepath, title, category); the 10,000 test images
   as PNGs in one folder per class (test/<class>/), for `python docs/use_student.py --images`;
2. a CLIP teacher (`--model teacher`) trained on all 58,788 training pairs (the 2% held out by
   --val-frac aside), as the papers' teachers know far more data than their students;
3. students (the same 0.65M `small` model, the same steps) trained on a small part of the
   pairs (`--train-frac`: 2,992, the same part every seed): CLIP, Knowledge-CLIP (MiniLM as
   text teacher) and CLIP-CID (the teacher of step 2; with the paper's semantic balance, and on
   the full set), seeds 0 1 2;
4. each model scored on the 10,000 test images: zero-shot over the 10 class names and a linear
   probe on frozen image features (trained on 10,000 training images), then runs/fmnist/table.md
   with mean ± std and each method's per-seed difference from CLIP.
"""
import argparse
import csv
import gzip
import os
import sys
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402

# torchvision's class names: what zero-shot scores against. Captions name each class by its own
# name half the time and by a synonym otherwise, so a text teacher that knows the synonyms has
# something to teach.
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYNONYMS = [["t-shirt", "tee", "top"], ["trousers", "pants", "jeans"], ["pullover", "sweater", "jumper"],
            ["dress", "frock", "gown"], ["coat", "jacket", "overcoat"], ["sandal", "flip-flop", "open shoe"],
            ["shirt", "blouse", "button-up shirt"], ["sneaker", "trainer", "running shoe"], ["bag", "handbag", "purse"],
            ["ankle boot", "boot", "bootie"]]
TEMPLATES = ["a photo of a {}", "a {}", "a black and white picture of a {}", "{}, product photo",
             "a small grayscale image of the {}"]

TEACHER = ["--method", "clip", "--model", "teacher", "--steps", "800", "--train-frac", "1", "--seed", "0"]
STUDENT = ["--model", "small", "--steps", "300", "--train-frac", "0.05"]
COMMON = ["--val-frac", "0.02", "--csv-label-key", "category", "--batch-size", "256"]
ROWS = [("clip", "CLIP", ["--method", "clip"]), ("kclip", "Knowledge-CLIP (MiniLM)", ["--method", "kclip"]),
        ("cid", "CLIP-CID (the teacher above), balance at cos >= 0.99", ["--method", "cid", "--balance-threshold", "0.99"]),
        ("cid-full", "CLIP-CID, full set (--no-balance)", ["--method", "cid", "--no-balance"])]
TABLE = [("test_zero_shot", "zero-shot, 10,000 test images"), ("test_probe", "linear probe"),
         ("zero_shot_top1", "zero-shot, held-out pairs"), ("retrieval_i2t_r1", "R@1 i2t"),
         ("pairs_trained_on", "pairs")]


def read_idx(path):  # a gzipped IDX file (LeCun's MNIST format) -> uint8 array
    with gzip.open(path) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def caption(label, rng):
    """A caption for class `label`: a template around its name (half the time) or a synonym."""
    word = CLASSES[label] if rng.random() < 0.5 else SYNONYMS[label][rng.integers(len(SYNONYMS[label]))]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(word)


def folder_name(label):  # 'T-shirt/top' -> 'T-shirt or top': a class per test folder, named for zero-shot
    return CLASSES[label].replace("/", " or ")


def convert(out, raw=data.DEBIAN_FASHION_MNIST):
    """Write the pairs (out/train/*.png, out/pairs.csv) and the test folder (out/test/<class>/*.png)
    once; pairs.csv is written last, so a killed conversion is redone, never half used."""
    csv_path = os.path.join(out, "pairs.csv")
    if os.path.exists(csv_path):
        return csv_path
    if not os.path.isdir(raw):
        raise SystemExit(f"error: {raw} not found: apt-get install dataset-fashion-mnist")
    rng = np.random.default_rng(0)
    rows = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte.gz"))  # (N, 28, 28)
        labels = read_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte.gz"))  # (N,)
        for i in tqdm(range(len(images)), desc=f"writing {split} PNGs", mininterval=2.0):
            y = int(labels[i])
            rel = os.path.join("train", f"{i:05d}.png") if split == "train" else os.path.join("test", folder_name(y), f"{i:05d}.png")
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            Image.fromarray(images[i]).save(os.path.join(out, rel))
            if split == "train":
                rows.append((rel, caption(y, rng), CLASSES[y]))
    with clip.atomic(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "category"])
        w.writerows(rows)
    return csv_path


def test_scores(run_dir, root):
    """Zero-shot and linear probe on the 10,000 test images (eval.eval_named_set), kept in
    run_dir/test10k.json."""
    path = os.path.join(run_dir, "test10k.json")
    if not os.path.exists(path):
        model, _ = clip.load_checkpoint(run_dir)
        res = evaluation.eval_named_set(model, "fashion-mnist", root, "cpu", max_n=10000)
        clip.write_json(path, {"test_zero_shot": res["fashion-mnist_zero_shot_top1"],
                               "test_probe": res["fashion-mnist_linear_probe_top1"],
                               "n_test": res["fashion-mnist_n_test"], "n_probe_train": res["fashion-mnist_n_train"]})
    return clip.read_json(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "fmnist"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a, flags = p.parse_known_args(argv)  # any other flag goes to every train.py run (e.g. --device cuda)
    t0 = time.time()
    csv_path = convert(os.path.join(a.out, "data"))
    root = os.path.join(a.out, "torchvision")  # eval.py unpacks Debian's files here for torchvision's loader
    teacher = os.path.join(a.out, "teacher")
    runs = {"teacher (--model teacher, every training pair)": [(teacher, TEACHER)]}
    for folder, row, row_flags in ROWS:
        runs[row] = [(os.path.join(a.out, f"{folder}-s{s}"), [*row_flags, *STUDENT, "--seed", str(s), "--teacher", teacher])
                     for s in a.seeds]
    found = {}
    for row, outs in runs.items():
        found[row] = []
        for out, row_flags in outs:
            if not os.path.exists(os.path.join(out, "results.json")):
                print(f"\nfmnist: {row} -> {out}")
                train.train(train.parse_args(["--data", csv_path, *COMMON, *flags, *row_flags, "--out", out,
                                                        "--resume"]))
            found[row].append({**clip.read_json(os.path.join(out, "results.json")), **test_scores(out, root)})
    lines = [f"Fashion-MNIST: mean ± std over seeds {' '.join(map(str, a.seeds))} (`python docs/fashion_mnist.py`); "
             "the teacher is one run", "", "| | " + " | ".join(c for _, c in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for row, results in found.items():
        lines.append(f"| {row} | " + " | ".join(reproduce.show(key, [r[key] for r in results if r.get(key) is not None])
                                                for key, _ in TABLE) + " |")
    lines += ["", "Each student minus CLIP, per seed (zero-shot on test; linear probe):", ""]
    for row, results in list(found.items())[2:]:
        lines.append(f"- {row}: " + "; ".join(reproduce.seed_diffs([r[k] for r in results], [c[k] for c in found["CLIP"]])
                                                for k in ("test_zero_shot", "test_probe")))
    with clip.atomic(os.path.join(a.out, "table.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nfmnist: done in {(time.time() - t0) / 60:.1f} min (this call)")


if __name__ == "__main__":
    main()
