"""kmeans.py beside faiss-cpu on the same synthetic teacher embeddings (README, "At scale").

faiss never enters requirements.txt: install it in a venv of its own (`python -m venv peer &&
peer/bin/pip install faiss-cpu numpy`). Four steps, each its own process, all on the same file:

    python docs/vs_faiss.py make                      # (N, D) float16 rows around K true centres
    peer/bin/python docs/vs_faiss.py faiss --seed 0   # faiss.Kmeans, spherical, 20 iterations
    python docs/vs_faiss.py ours --seed 0             # kmeans.fit as train.py calls it at scale
    python docs/vs_faiss.py table                     # both runs' times; inertia by kmeans.inertia

Both fit on 256 rows per centroid (faiss's default sample; kmeans.settings_at_scale), then
assign every row. The inertia (sum of 1 - cos to the nearest centroid) of every run's centroids
is measured by the same function, against that of the true centres.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("step", choices=["make", "faiss", "ours", "table"])
p.add_argument("--n", type=int, default=1_000_000)
p.add_argument("--d", type=int, default=512)
p.add_argument("--k", type=int, default=1000)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--dir", default="/tmp/vs_faiss")
a = p.parse_args()
os.makedirs(a.dir, exist_ok=True)
data_file = os.path.join(a.dir, f"x-{a.n}x{a.d}-k{a.k}.npy")


def save(who, centroids, fit_s, assign_s):
    np.save(os.path.join(a.dir, f"{who}-s{a.seed}.npy"), centroids)
    with open(os.path.join(a.dir, f"{who}-s{a.seed}.json"), "w") as f:
        json.dump({"fit_s": fit_s, "assign_s": assign_s}, f)
    print(f"{who} seed {a.seed}: fit {fit_s:.1f} s, assign all {a.n:,} rows {assign_s:.1f} s")


if a.step == "faiss":  # the peer venv: numpy and faiss only
    import faiss
    faiss.omp_set_num_threads(a.threads)
    x = np.ascontiguousarray(np.load(data_file, mmap_mode="r"), dtype=np.float32)  # faiss takes float32
    t0 = time.time()
    km = faiss.Kmeans(a.d, a.k, niter=20, spherical=True, seed=a.seed)
    km.train(x)
    t1 = time.time()
    km.index.search(x, 1)
    save("faiss", km.centroids, t1 - t0, time.time() - t1)
    sys.exit()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kmeans  # noqa: E402
import teachers  # noqa: E402

torch.set_num_threads(a.threads)
if a.step == "make":
    teachers._synthetic_store(data_file, a.n, a.d, a.k)
    centres = F.normalize(torch.randn(a.k, a.d, generator=torch.Generator().manual_seed(0)), dim=1)  # its first draw
    np.save(os.path.join(a.dir, "true.npy"), centres.numpy())
    print(f"wrote {data_file}")
elif a.step == "ours":
    x = np.load(data_file, mmap_mode="r")
    t0 = time.time()
    c = kmeans.fit(x, a.k, spherical=True, seed=a.seed, **kmeans.settings_at_scale(a.n, a.k))
    t1 = time.time()
    kmeans.assign(x, c, spherical=True)
    save("ours", c.numpy(), t1 - t0, time.time() - t1)
else:
    x = np.load(data_file, mmap_mode="r")
    true = kmeans.inertia(x, torch.from_numpy(np.load(os.path.join(a.dir, "true.npy"))), spherical=True)
    print(f"{a.n:,} x {a.d} float16, K = {a.k}, {a.threads} threads; inertia of the true centres {true:.4g}")
    print("| run | seed | fit s | assign s | total s | inertia / true |\n|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(a.dir, "*-s*.json"))):
        who, seed = os.path.basename(path)[:-5].split("-s")
        t = json.load(open(path))
        ratio = kmeans.inertia(x, torch.from_numpy(np.load(path[:-5] + ".npy")), spherical=True) / true
        print(f"| {who} | {seed} | {t['fit_s']:.1f} | {t['assign_s']:.1f} | {t['fit_s'] + t['assign_s']:.1f} | {ratio:.4f} |")
