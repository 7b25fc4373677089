"""Your own folder of images -> image-caption pairs, as CSV and as webdataset shards.

`python docs/convert_folder.py FOLDER --out DIR` writes DIR/pairs.csv (filepath, title, category),
DIR/images/*.jpg and DIR/shards/pairs-{00000..}.tar: the same pairs twice, so that both of
train.py's real-data readers (data.CsvPairs, data.ShardPairs) can be tried on them. A caption is
the image's .txt beside it if there is one, else its folders and file name as words (noisy, like
web alt-text); `category` is its first folder (train.py --csv-label-key category). Real images to
try it on: `apt-get install openclipart-png && python docs/convert_folder.py /usr/share/openclipart/png --out /tmp/oc`.
"""
import argparse
import csv
import io
import os
import re
import sys
import tarfile

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402


def folder_caption(rel_path):
    """'animals/birds/red_parrot_01.png' -> 'animals birds red parrot': the folders and the file
    name as words, digits and separators dropped (noisy, like web alt-text)."""
    words = re.split(r"[\W_]+", os.path.splitext(rel_path)[0].replace(os.sep, " "))
    return " ".join(w.lower() for w in words if w and not w.isdigit())


def web_image(path, max_side):
    """An image as img2dataset would store it: RGB (transparency composited on white), the
    shorter side at most max_side (aspect kept), JPEG bytes. None if it cannot be read."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced size
            img = img.convert("RGBA")
            scale = max_side / min(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img, mask=img.getchannel("A"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def convert_folder(folder, out, shard_size=1000, max_side=256):
    """A folder of images (any tree) -> out/images/*.jpg, out/pairs.csv (filepath, title, category:
    the image's first folder, for --csv-label-key category) and
    out/shards/pairs-{00000..}.tar (webdataset: {key}.jpg + {key}.txt): the same pairs in the
    same order, each image resized as img2dataset does (`web_image`). An image's caption: its
    sidecar FILE.txt if there is one, else `folder_caption`. Unreadable images are left out and
    counted. Returns (pairs written, images left out, the shard pattern)."""
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                   for f in fs if f.lower().endswith(data.IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"{folder}: no .jpg, .png or .webp image in it")
    for sub in ("images", "shards"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    rows, bad = [], 0
    for rel in tqdm(files, desc="resizing images", unit="image", mininterval=2.0):
        jpeg = web_image(os.path.join(folder, rel), max_side)
        if jpeg is None:
            bad += 1
            continue
        side = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
        text = open(side, encoding="utf-8", errors="replace").read() if os.path.isfile(side) else folder_caption(rel)
        key = f"{len(rows):09d}"
        with open(os.path.join(out, "images", key + ".jpg"), "wb") as f:
            f.write(jpeg)
        rows.append((key, jpeg, " ".join(text.split()), rel.split(os.sep)[0] if os.sep in rel else ""))
    with clip.atomic(os.path.join(out, "pairs.csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "category"])
        w.writerows((os.path.join("images", key + ".jpg"), text, category.replace("_", " ")) for key, _, text, category in rows)
    n_shards = -(-len(rows) // shard_size)
    for s in range(n_shards):
        path = os.path.join(out, "shards", f"pairs-{s:05d}.tar")
        with clip.atomic(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, text, _ in rows[s * shard_size:(s + 1) * shard_size]:
                for name, payload in ((key + ".jpg", jpeg), (key + ".txt", text.encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return len(rows), bad, os.path.join(out, "shards", f"pairs-{{00000..{n_shards - 1:05d}}}.tar")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Turn a folder of images into pairs.csv and webdataset shards.")
    p.add_argument("folder", help="e.g. /usr/share/openclipart/png (Debian's openclipart-png)")
    p.add_argument("--out", default="pairs", help="the output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard")
    p.add_argument("--max-side", type=int, default=256, help="images resized to this shorter side at most")
    a = p.parse_args()
    if not os.path.isdir(a.folder):
        p.exit(2, f"error: {a.folder}: no such folder\n")
    n, bad, pattern = convert_folder(a.folder, a.out, a.shard_size, a.max_side)
    print(f"wrote {n} pairs ({bad} unreadable images left out): {os.path.join(a.out, 'pairs.csv')} and {pattern}")
