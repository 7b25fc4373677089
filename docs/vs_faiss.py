"""kmeans.py beside faiss-cpu on the same synthetic data (docs/data.md "At scale", docs/performance.md).

faiss never enters requirements.txt: install it in a venv of its own (`python -m venv peer &&
peer/bin/pip install faiss-cpu numpy`). Four steps, each its own process, all on the same file:

    python docs/vs_faiss.py make                      # the rows and their true centres
    peer/bin/python docs/vs_faiss.py faiss --seed 0   # faiss.Kmeans, 20 iterations
    python docs/vs_faiss.py ours --seed 0             # kmeans.fit as teachers.store_clusters calls it
    python docs/vs_faiss.py ours --seed 0 --minibatch # the mini-batch path instead
    python docs/vs_faiss.py table                     # both runs' times; inertia by kmeans.inertia

--data store (default): 1M x 512 float16 teacher-like embeddings (bench.synthetic_store, docs/bench.py),
spherical. Both fit on 256 rows per centroid (faiss's default sample; kmeans.settings_at_scale),
then assign every row. faiss takes float32, so its time includes converting the float16 file
("read"); ours reads the float16 rows chunk by chunk inside fit and assign.
--data blobs --n 100000 --d 256: float32 points around N(0, I) centres (bench.blobs, the
`python docs/bench.py --kmeans` data), L2; every row fits (N < 256 K), then every row is assigned.
The inertia of every run's centroids is measured by the same function (kmeans.inertia), against
that of the true centres.
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
p.add_argument("--data", choices=["store", "blobs"], default="store")
p.add_argument("--n", type=int, default=1_000_000)
p.add_argument("--d", type=int, default=512)
p.add_argument("--k", type=int, default=1000)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--dir", default="/tmp/vs_faiss")
p.add_argument("--minibatch", action="store_true", help="ours: mini-batch k-means over every row (3 epochs of "
               "max(4096, 4 K)), the path settings_at_scale takes when the 256 K sample would not fit in memory")
a = p.parse_args()
os.makedirs(a.dir, exist_ok=True)
tag = f"{a.data}-{a.n}x{a.d}-k{a.k}"
data_file, true_file = os.path.join(a.dir, f"x-{tag}.npy"), os.path.join(a.dir, f"true-{tag}.npy")
spherical = a.data == "store"


def save(who, centroids, read_s, fit_s, assign_s, iters):
    np.save(os.path.join(a.dir, f"{who}-{tag}-s{a.seed}.npy"), centroids)
    with open(os.path.join(a.dir, f"{who}-{tag}-s{a.seed}.json"), "w") as f:
        json.dump({"read_s": read_s, "fit_s": fit_s, "assign_s": assign_s, "iters": iters}, f)
    print(f"{who} seed {a.seed}: read {read_s:.1f} s, fit {fit_s:.1f} s, assign all {a.n:,} rows {assign_s:.1f} s")


if a.step == "faiss":  # the peer venv: numpy and faiss only
    import faiss
    faiss.omp_set_num_threads(a.threads)
    t_read = time.time()
    x = np.ascontiguousarray(np.load(data_file, mmap_mode="r"), dtype=np.float32)  # faiss takes float32
    t0 = time.time()
    km = faiss.Kmeans(a.d, a.k, niter=20, spherical=spherical, seed=a.seed)
    km.train(x)
    t1 = time.time()
    km.index.search(x, 1)
    save("faiss", km.centroids, t0 - t_read, t1 - t0, time.time() - t1, len(km.iteration_stats))
    sys.exit()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench  # noqa: E402
import kmeans  # noqa: E402

torch.set_num_threads(a.threads)
if a.step == "make":
    if a.data == "store":
        bench.synthetic_store(data_file, a.n, a.d, a.k)
        centres = F.normalize(torch.randn(a.k, a.d, generator=torch.Generator().manual_seed(0)), dim=1)  # its first draw
    else:
        x, centres = bench.blobs(a.n, a.d, a.k)
        np.save(data_file, x.numpy())
    np.save(true_file, centres.numpy())
    print(f"wrote {data_file}")
elif a.step == "ours":
    x = np.load(data_file, mmap_mode="r")
    t0 = time.time()
    settings = ({"batch_size": max(4096, 4 * a.k), "iters": 3} if a.minibatch
                else kmeans.settings_at_scale(a.n, a.k, a.d))
    c, hist = kmeans.fit(x, a.k, spherical=spherical, seed=a.seed, return_history=True, **settings)
    t1 = time.time()
    kmeans.assign(x, c, spherical=spherical)
    save("ours_minibatch" if a.minibatch else "ours", c.numpy(), 0.0, t1 - t0, time.time() - t1, len(hist))  # reads inside fit / assign
else:
    x = np.load(data_file, mmap_mode="r")
    truth, d_true = kmeans.assign(x, torch.from_numpy(np.load(true_file)), spherical=spherical)
    true = d_true.double().sum().item()


    def merged(labels):
        """True clusters whose points mostly go to a centroid that another true cluster's also go to."""
        counts = torch.zeros(a.k, a.k).index_put_((truth, labels), torch.ones(len(labels)), accumulate=True)
        return a.k - len(counts.argmax(1).unique())
    print(f"{a.n:,} x {a.d} {x.dtype}, K = {a.k}, {'spherical' if spherical else 'L2'}, {a.threads} threads; "
          f"inertia of the true centres {true:.4g}")
    print("| run | seed | read s | fit s | iterations | assign s | total s | inertia / true | true clusters sharing a centroid |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(a.dir, f"*-{tag}-s*.json"))):
        who, seed = os.path.basename(path).split("-")[0], path[:-5].rsplit("-s", 1)[1]
        t = json.load(open(path))
        labels, d = kmeans.assign(x, torch.from_numpy(np.load(path[:-5] + ".npy")), spherical=spherical)
        total = t["read_s"] + t["fit_s"] + t["assign_s"]
        print(f"| {who} | {seed} | {t['read_s']:.1f} | {t['fit_s']:.1f} | {t['iters']} | {t['assign_s']:.1f} | {total:.1f} | "
              f"{d.double().sum().item() / true:.4f} | {merged(labels)} |")
