"""Look at the embedded data: `python docs/shapes.py --out docs/shapes.png` writes a grid of training pairs (3x
upscaled) and prints their captions, each near-duplicate with the pair it copies (data.ShapesDataset).
Your own folder of images into pairs: python docs/convert_folder.py."""
import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import data  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="shapes.png", help="the grid's PNG")
    a = p.parse_args(argv)
    ds = data.ShapesDataset("train", a.n, seed=a.seed)
    big = torch.nn.functional.interpolate(ds.images.float() / 255, scale_factor=3, mode="nearest")
    torchvision.utils.save_image(big, a.out, nrow=8, padding=2, pad_value=1.0)
    dup_of = ds.attributes["dup_of"]
    for i, c in enumerate(ds.captions):
        print(f"{i:3d}  {c}" + (f"   (near-duplicate of {int(dup_of[i])})" if dup_of[i] >= 0 else ""))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
