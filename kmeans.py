"""
k-means clustering of embeddings, in plain PyTorch (CPU or CUDA, optionally torch.distributed).

Used to turn CLIP embeddings into "concepts": fit() finds K centroids, assign() gives each
embedding its nearest centroid, soft_assign() gives soft concept labels for Knowledge-CLIP.

The algorithm (Lloyd, "Least squares quantization in PCM", 1957/1982) alternates two steps:
  1. assignment: label every point with its nearest centroid,
  2. update:     move every centroid to the mean of the points labelled with it.
Neither step can increase the inertia sum_i ||x_i - c_label(i)||^2, so it converges (to a
local minimum). Which local minimum depends almost entirely on the initialisation:

  * random init (what faiss does by default) picks K data points uniformly. With K true
    clusters about 1/e of them get no initial centroid and others get two; when the clusters
    are well separated Lloyd can never move a centroid across the gap, so those mistakes stay.
  * k-means++ (Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding", 2007)
    picks the next centroid with probability proportional to D(x)^2, the squared distance to
    the nearest centroid chosen so far, so uncovered clusters are much more likely to get one.
    We use the "greedy" variant from the same paper (also sklearn's): draw 2 + ln K
    candidates per step and keep the one that lowers the potential sum D(x)^2 the most.
    k-means++ is sequential (K steps, each a pass over the data), so it runs on a random
    sample of `init_sample` points (default 8 per centroid: fewer leaves some true clusters
    with no sampled point at all, about K * exp(-S / K) of them), on all D dimensions: a
    random projection to fewer (this file once used 64) adds distance noise as large as the
    gap between covered and uncovered clusters of teacher embeddings, and misses 5x more.
  * over-seeding: in high dimension the noise makes D^2 within a covered cluster (2 sigma^2 D)
    only ~4x smaller than D^2 to an uncovered one, so K greedy picks still miss ~2-4% of the
    clusters. We pick 25% more centres than K, then prune back to K by dropping the centres
    whose removal costs the sample least (a cluster seeded twice loses one of its twins).
    On the k-means bench's data (docs/bench.py --kmeans) this takes the misses from ~15 to ~3
    and the final inertia from ~1.09x to ~1.0x that of the true centres.

Mini-batch k-means (Sculley, "Web-scale k-means clustering", 2010) replaces the full pass by
small random batches; each centroid moves towards its batch points with a per-centre learning
rate 1/count, i.e. every centroid stays the running mean of all points ever assigned to it.

Implementation notes
  * The nearest centroid is the argmax of x.c - ||c||^2 / 2 (from ||x - c||^2 = ||x||^2 +
    ||c||^2 - 2 x.c): one matmul per block of points and centroids, sized by a memory budget
    (chunk_mb: 16 MiB on a CPU, more on a GPU), never an (N, K, D) broadcast. The distance is
    then computed directly, ||x - c||^2 with each row's own centroid.
  * That matmul runs in bf16 where bf16 is faster (CPUs with AVX512-BF16 or AMX, GPUs: 2-4x
    float32), as a screen: a bound on bf16's rounding error says for which rows the best score
    cannot be overtaken, and only the other rows (none to a few % on teacher embeddings) are
    scored again in float32. So the labels are float32's, bit for bit, either way.
  * The expansion cancels catastrophically in float32 far from the origin (tight clusters at
    distance 100 got the wrong centroid for a quarter of their points), and real embeddings
    carry a large common mean. So the L2 case works on centred data: every chunk is shifted by
    one vector (the mean of the init sample, or of the given centroids in assign) as it is
    read, and the centroids are shifted back on return. Distances do not depend on the shift.
  * Data is read chunk by chunk and converted to float32 on `device`, so x can be a torch
    tensor, a numpy array or an np.memmap bigger than memory. Centroid sums are accumulated
    with index_add_ in float32 whatever the input dtype (fp16/bf16 inputs are upcast per chunk).
  * Empty clusters are re-seeded like faiss does: split the largest cluster in two (copy its
    centroid, perturb the two copies symmetrically by a relative epsilon, halve its count).
  * Spherical k-means (cosine similarity): inputs are L2-normalised, centroids re-normalised
    after every update, and the distance reported is 1 - cos(x, c) (= ||x - c||^2 / 2).
  * Under torch.distributed each rank passes its own shard of x (data.shard). Per-centroid sums, counts and
    the inertia are all-reduced, so all ranks hold identical centroids. The init sample is
    drawn from global row indices (shards in rank order), each rank fills in the rows it owns
    and an all-reduce gives every rank the same sample; k-means++ then runs on it and rank 0's
    result is broadcast. So N ranks give the same result as one process on the concatenation.
  * Everything random comes from one torch.Generator seeded with `seed`.

Run `python docs/bench.py --kmeans` for speed and quality figures.
"""

import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

SPLIT_EPS = 1.0 / 1024  # relative perturbation when splitting a cluster (faiss uses the same)
OVERSEED = 0.25  # k-means++ picks (1 + OVERSEED) * K centres, pruned back to K
SAMPLE_BYTES = 4 * 2**30  # fit(max_points=...) holds its sample in memory (float32) up to this size

# -----------------------------------------------------------------------------
# distributed: torch.distributed when it is initialised; one process: no-ops

def _world():
    """(rank, world size); (0, 1) when torch.distributed is not available or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t):
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _shard_sizes(n, device):
    """Number of rows on every rank, (n_ranks,) int64."""
    rank, n_ranks = _world()
    sizes = torch.zeros(n_ranks, dtype=torch.int64, device=device)
    sizes[rank] = n
    return _all_reduce(sizes).cpu()

# -----------------------------------------------------------------------------
# reading data: torch tensor, numpy array or np.memmap, one chunk at a time

def _load(x, index, device, spherical, shift=None):
    """Rows x[index] (a slice or a sorted int64 numpy array) as float32 on device, (B, D),
    minus `shift` (D,) if given (L2 k-means works on centred data)."""
    if isinstance(x, torch.Tensor):
        index = index if isinstance(index, slice) else torch.from_numpy(index).to(x.device)
        xb = x[index].to(device=device, dtype=torch.float32)
    else:  # numpy / memmap: only these rows are read from disk
        xb = torch.from_numpy(np.require(x[index], np.float32, ["C", "W"])).to(device)
    if not torch.isfinite(xb.sum()) and not torch.isfinite(xb).all():  # one NaN / inf makes the sum one
        raise ValueError("kmeans: x contains NaN or inf values")
    if spherical:
        return F.normalize(xb, dim=1)
    return xb if shift is None else xb - shift


def _centre_of(rows):
    """(D,) the mean of rows (R, D), summed in float64: the shift that centres an L2 problem."""
    return rows.double().mean(0).float()


def _chunks(x, rows, device, spherical, shift=None):
    """Yield consecutive chunks of at most `rows` rows, each (B, D) float32 on device."""
    for s in range(0, x.shape[0], rows):
        yield _load(x, slice(s, s + rows), device, spherical, shift)


def _device_for(x, device):
    """The device to work on (default: x's, or CPU for numpy input), once x is checked to be 2-D."""
    if x.ndim != 2:
        raise ValueError(f"kmeans: x must be 2-D (N, D), got shape {tuple(x.shape)}")
    if device is not None:
        return torch.device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")

# -----------------------------------------------------------------------------
# assignment: nearest centroid by blocks of (points x centroids)

def chunk_mb_for(device):  # the budget when chunk_mb is None: 16 MiB on a CPU, 1/16 of a GPU's free memory (<= 1 GiB)
    device = torch.device(device)
    return 16 if device.type != "cuda" else int(min(1024, max(16, torch.cuda.mem_get_info(device)[0] / 16 / 2 ** 20)))


def _blocks(k, d, chunk_mb, device):
    """(rows per point chunk, centroids per centroid chunk) so that a chunk of points plus
    its (rows, kc) score block take about chunk_mb MiB of float32 (None: chunk_mb_for(device))."""
    kc = min(k, 4096)
    rows = max(1, int((chunk_mb or chunk_mb_for(device)) * 2**20) // (4 * (kc + d)))
    return rows, kc


def _argmax_fp32(xb, c, half_sq, kc):
    """Index (B,) of the largest score x.c - ||c||^2 / 2 (= the nearest centroid) of each row of
    xb (B, D) over the centroids c (K, D), in float32, one (B, kc) block of centroids at a time."""
    best, labels = None, None
    for j in range(0, c.shape[0], kc):
        score = torch.addmm(half_sq[j:j + kc], xb, c[j:j + kc].T, alpha=1.0, beta=-1.0)  # (B, kc)
        val, idx = score.max(dim=1)
        if best is None:
            best, labels = val, idx
        else:
            closer = val > best
            best, labels = torch.where(closer, val, best), torch.where(closer, idx + j, labels)
    return labels


def _screen_bf16(xb, c16, half_sq, kc, c_max):
    """The same argmax from bfloat16 scores (2-4x the matmul speed of float32 on CPUs with
    AVX512-BF16 and on GPUs), and the rows (B,) bool where bf16 may have picked wrong.

    Rounding x and c to bf16 (8-bit mantissa, relative error 2^-9 each) and the product to bf16
    moves x.c by at most u |x| |c| with u = 2^-8 + 2^-9 (Cauchy-Schwarz), plus the float32
    accumulation's D 2^-24 (and as much again for the float32 scores we must agree with). So
    when the best bf16 score beats the second best by more than twice that bound, float32 picks
    the same centroid; the other rows are left to _argmax_fp32. (On CUDA, cuBLAS may add
    split-K partial sums in bf16, torch's default: the bound then counts 2^-8 more.)"""
    x16 = xb.bfloat16()
    u = 2.0 ** -8 + 2.0 ** -9 + 2 * xb.shape[1] * 2.0 ** -24
    if xb.is_cuda and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
        u += 2.0 ** -8
    err = u * xb.norm(dim=1) * c_max + 2.0 ** -23 * c_max ** 2  # (B,) bound on each score's error
    top = None  # (B, 2) the two largest scores so far
    for j in range(0, c16.shape[0], kc):
        score = x16 @ c16[j:j + kc].T  # (B, kc) bf16
        if half_sq is not None:  # L2: subtract ||c||^2 / 2 in float32
            score = torch.sub(score, half_sq[j:j + kc])
        val, idx = score.topk(min(2, score.shape[1]), dim=1)
        val = F.pad(val.float(), (0, 2 - val.shape[1]), value=-float("inf"))  # a block of one centroid
        if top is None:
            top, labels = val, idx[:, 0]
        else:
            closer = val[:, 0] > top[:, 0]
            labels = torch.where(closer, idx[:, 0] + j, labels)
            top = torch.cat([top, val], 1).topk(2, dim=1).values
    return labels, ~(top[:, 0] - top[:, 1] > 2 * err)


BF16 = None  # None: screen in bf16 where it is faster (_use_bf16); True / False: always / never
_BF16_FASTER = {}  # device type -> whether a bf16 matmul beats float32 there


def _use_bf16(device):
    """Whether a bf16 matmul beats float32 here: timed once per device type on one block
    (CPUs without AVX512-BF16 or AMX emulate bf16, several times slower than float32)."""
    if device.type not in _BF16_FASTER:
        a, b = torch.randn(4096, 512, device=device), torch.randn(512, 1024, device=device)

        def seconds(a, b):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)
        _BF16_FASTER[device.type] = seconds(a.bfloat16(), b.bfloat16()) < 0.6 * seconds(a, b)
    return _BF16_FASTER[device.type]


class _Nearest:
    """The assignment step against fixed centroids c (K, D): nearest(xb) -> labels (B,) and
    distances (B,) for a chunk of rows xb (B, D), as the module docstring says (bf16 screen where
    faster, float32's labels either way; the distance from each row's own centroid: ||x - c||^2,
    or 1 - x.c when spherical). Precomputes what every chunk shares."""

    def __init__(self, c, spherical, kc):
        self.c, self.spherical, self.kc = c, spherical, kc
        self.half_sq = torch.zeros_like(c[:, 0]) if spherical else (c * c).sum(1) / 2  # (K,)
        use = _use_bf16(c.device) if BF16 is None else BF16
        self.c16 = c.bfloat16() if use else None
        self.c_max = c.norm(dim=1).max().item()

    def __call__(self, xb):
        if self.c16 is None:
            labels = _argmax_fp32(xb, self.c, self.half_sq, self.kc)
        else:
            labels, doubt = _screen_bf16(xb, self.c16, None if self.spherical else self.half_sq, self.kc, self.c_max)
            if doubt.any():
                labels[doubt] = _argmax_fp32(xb[doubt], self.c, self.half_sq, self.kc)
        mine = self.c.index_select(0, labels)  # (B, D) each row's centroid
        if self.spherical:
            return labels, 1.0 - torch.linalg.vecdot(xb, mine)
        diff = xb - mine
        return labels, torch.linalg.vecdot(diff, diff)


def assign(x, centroids, *, spherical=False, chunk_mb=None, device=None):
    """Nearest centroid of every row of x.

    Returns labels (N,) int64 and distances (N,) float32: the squared L2 distance to the
    nearest centroid, or 1 - cosine similarity when spherical=True (x and centroids are then
    normalised first). Both are on `device` (default: x's device, or CPU for numpy input).
    """
    device = _device_for(x, device)
    c = centroids.to(device=device, dtype=torch.float32)
    if c.ndim != 2 or c.shape[1] != x.shape[1]:
        raise ValueError(f"kmeans: x has D={x.shape[1]} but centroids have shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("kmeans: centroids contain NaN or inf values")
    shift = None if spherical else _centre_of(c)  # (D,) centre the problem near the origin
    c = F.normalize(c, dim=1) if spherical else c - shift
    rows, kc = _blocks(c.shape[0], c.shape[1], chunk_mb, device)
    out = list(map(_Nearest(c, spherical, kc), _chunks(x, rows, device, spherical, shift)))  # [(labels, dists)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def inertia(x, centroids, *, spherical=False, chunk_mb=None, device=None):
    """Sum over points of the distance to the nearest centroid (squared L2, or 1 - cos when
    spherical), as a Python float. Under torch.distributed it is summed over all ranks."""
    _, d = assign(x, centroids, spherical=spherical, chunk_mb=chunk_mb, device=device)
    return _all_reduce(d.double().sum()).item()


def soft_assign(x, centroids, tau):
    """Soft concept labels: softmax over k of cos(x, mu_k) / tau, (N, K), rows sum to 1."""
    if x.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"kmeans: x has D={x.shape[-1]} but centroids have D={centroids.shape[-1]}")
    cos = F.normalize(x.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T  # (N, K)
    return torch.softmax(cos / tau, dim=-1)

# -----------------------------------------------------------------------------
# initialisation: k-means++ (greedy D^2 sampling) on a random sample

def sample_indices(n_total, size, g):
    """`size` distinct row indices of [0, n_total), sorted, uniformly at random (all of them if
    size >= n_total). Drawn with replacement, de-duplicated and topped up until there are enough,
    then thinned to exactly `size`: no O(N) permutation for huge N. Every subset of that size is
    equally likely (the draws are exchangeable)."""
    if size >= n_total:
        return torch.arange(n_total)
    idx = torch.unique(torch.randint(n_total, (size,), generator=g))
    while len(idx) < size:
        idx = torch.unique(torch.cat([idx, torch.randint(n_total, (2 * (size - len(idx)),), generator=g)]))
    return idx[torch.randperm(len(idx), generator=g)[:size]].sort().values


def _sample(x, n_total, size, g, device, spherical):
    """Random sample of `size` distinct rows of the (possibly sharded) data, identical on all
    ranks, (S, D), raw (not shifted): global row indices, each rank fills in the rows it holds."""
    idx = sample_indices(n_total, size, g)
    lo = _shard_sizes(x.shape[0], device)[:_world()[0]].sum().item()  # rows on the ranks before this one
    mine = ((idx >= lo) & (idx < lo + x.shape[0])).nonzero()[:, 0]  # positions we hold
    buf = torch.zeros(len(idx), x.shape[1], device=device)
    buf[mine.to(device)] = _load(x, (idx[mine] - lo).numpy(), device, spherical)
    return _all_reduce(buf)


def _kmeans_pp(p, k, g):
    """Greedy k-means++ on points p (S, D): indices (k,) of the rows chosen by D^2 sampling."""
    s, n_trials = p.shape[0], 2 + int(math.log(k))  # T = n_trials candidates per step
    p_sq = (p * p).sum(1)  # (S,)
    chosen = [torch.randint(s, (1,), generator=g).item()]
    d2 = (p_sq + p_sq[chosen[0]] - 2 * p @ p[chosen[0]]).clamp_min_(0)  # (S,) to nearest chosen
    for _ in range(1, k):
        # draw candidates with probability D^2 / sum D^2 (uniform if every D^2 is 0)
        cdf = d2.double().cumsum(0)
        if cdf[-1] <= 0:
            cdf = torch.arange(1, s + 1, dtype=torch.float64, device=p.device)
        u = torch.rand(n_trials, generator=g, dtype=torch.float64).to(p.device) * cdf[-1]
        cand = torch.searchsorted(cdf, u).clamp_(max=s - 1)  # (T,)
        # keep the candidate that lowers the potential sum(D^2) the most
        dc = torch.addmm(p_sq[:, None] + p_sq[cand], p, p[cand].T, alpha=-2).clamp_min_(0)  # (S, T)
        dc = torch.minimum(dc, d2[:, None])
        best = dc.sum(0).argmin()
        chosen.append(cand[best].item())
        d2 = dc[:, best].contiguous()
    return torch.tensor(chosen, device=p.device)


def _top2(a, b, chunk_mb=64):
    """Squared distances (n, 2) and indices (n, 2) of the two rows of b nearest to each row of a."""
    b_sq = (b * b).sum(1)  # (M,)
    rows = max(1, int(chunk_mb * 2**20) // (4 * (b.shape[0] + b.shape[1])))
    vals, idxs = [], []
    for s in range(0, a.shape[0], rows):
        ab = a[s:s + rows]
        score = torch.addmm(b_sq, ab, b.T, alpha=-2)  # (rows, M) = ||b||^2 - 2 a.b
        v, i = score.topk(2, dim=1, largest=False)
        vals.append((v + (ab * ab).sum(1, keepdim=True)).clamp_min_(0))
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)


def _prune(p, c, k):
    """Indices (k,) of the centroids c (K', D) to keep: repeatedly drop the one whose removal
    raises the inertia of the sample p (S, D) least, measured once as the sum over its points
    of (distance to 2nd nearest - distance to nearest). When a centroid is dropped, its nearest
    other centroid (which takes over its points) is kept, so a pair of near-duplicates
    (one true cluster seeded twice) loses exactly one member."""
    if c.shape[0] == k:
        return torch.arange(k, device=c.device)
    d, idx = _top2(p, c)  # (S, 2) each
    cost = torch.zeros(c.shape[0], dtype=torch.float64, device=c.device)
    cost.index_add_(0, idx[:, 0], (d[:, 1] - d[:, 0]).double())  # (K',)
    _, cidx = _top2(c, c)  # nearest is normally the centroid itself
    heir = torch.where(cidx[:, 0] == torch.arange(len(c), device=c.device), cidx[:, 1], cidx[:, 0]).tolist()
    keep, protected = [True] * c.shape[0], [False] * c.shape[0]
    n_drop = c.shape[0] - k
    for j in cost.argsort().tolist():
        if n_drop == 0:
            break
        if not protected[j]:
            keep[j], protected[heir[j]] = False, True
            n_drop -= 1
    return torch.tensor(keep, device=c.device).nonzero()[:, 0]


def _init(x, k, init, init_sample, n_total, g, device, spherical):
    """Initial centroids (K, D) and the shift (D,) (None when spherical) that centres the data: every chunk
    is read minus the shift, and the centroids live in those shifted coordinates. Identical on every rank."""
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"kmeans: init has shape {tuple(init.shape)}, expected {(k, x.shape[1])}")
        c = init.to(device=device, dtype=torch.float32).clone()
        if spherical:
            return F.normalize(c, dim=1), None
        shift = _centre_of(c)
        return c - shift, shift
    if init not in ("k-means++", "random"):
        raise ValueError(f"kmeans: init must be 'k-means++', 'random' or a tensor, got {init!r}")
    size = max(k, init_sample if init_sample is not None else 8 * k)
    p = _sample(x, n_total, size, g, device, spherical)  # (S, D), distinct rows of x
    distinct = len(torch.unique(p, dim=0))
    if distinct < k:
        raise ValueError(f"kmeans: k={k} needs {k} distinct points, but the {len(p)} sampled rows hold only "
                         f"{distinct} (duplicated data: lower k{'' if len(p) == n_total else ', or raise init_sample'})")
    shift = None if spherical else _centre_of(p)  # (D,)
    p = p if shift is None else p - shift
    if init == "random":
        c = p[torch.randperm(p.shape[0], generator=g)[:k].to(device)].clone()
    else:  # over-seed by OVERSEED, then prune the redundant centroids back to k
        chosen = _kmeans_pp(p, min(p.shape[0], k + math.ceil(OVERSEED * k)), g)
        c = p[chosen[_prune(p, p[chosen], k)]]
    if _world()[1] > 1:
        dist.broadcast(c, src=0)  # guard against floating-point differences between ranks
        if shift is not None:
            dist.broadcast(shift, src=0)
    return c, shift

# -----------------------------------------------------------------------------
# update steps

def _split_empty(c, counts, empty):
    """Re-seed the clusters flagged in `empty` (K,) bool by splitting the currently largest
    cluster in two, like faiss: both copies perturbed symmetrically, count halved. In place."""
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1  # perturbation pattern (+, -, +, -, ...)
    for j in empty.nonzero()[:, 0].tolist():
        i = counts.argmax().item()
        scale = c[i].abs().mean().clamp_min(1e-6)  # additive, so even a zero centroid splits
        delta = SPLIT_EPS * scale * sign
        c[j], c[i] = c[i] - delta, c[i] + delta
        counts[j] = counts[i] // 2
        counts[i] -= counts[j]


def _accumulate(chunks, nearest, device):
    """Assign every chunk (B, D) to `nearest`'s centroids; -> per-centroid sums (K, D) and stats
    (K + 1,) float64 (counts, then the inertia), summed over the chunks and over all ranks."""
    k, d = nearest.c.shape
    sums = torch.zeros(k, d, device=device)  # (K, D)
    stats = torch.zeros(k + 1, dtype=torch.float64, device=device)  # counts (K,), inertia
    for xb in chunks:
        labels, dists = nearest(xb)
        sums.index_add_(0, labels, xb)  # float32 accumulation, whatever the input dtype
        stats[:k] += torch.bincount(labels, minlength=k)
        stats[k] += dists.sum(dtype=torch.float64)
    return _all_reduce(sums), _all_reduce(stats)


def _lloyd_step(x, c, rows, kc, device, spherical, shift):
    """One Lloyd iteration over all of x, updating c (K, D) in place.
    Returns the inertia of the centroids it started from."""
    k = c.shape[0]
    sums, stats = _accumulate(_chunks(x, rows, device, spherical, shift), _Nearest(c, spherical, kc), device)
    counts = stats[:k]
    full = counts > 0
    c[full] = sums[full] / counts[full, None].float()
    _split_empty(c, counts, ~full)
    if spherical:
        c.copy_(F.normalize(c, dim=1))
    return stats[k].item()


def _minibatch_epoch(x, c, counts, batch_size, g, kc, device, spherical, shift):
    """One epoch of mini-batch k-means (Sculley 2010) over random batches of x, updating c
    (K, D) and the running per-centroid counts (K,) in place. Returns the summed batch
    inertia (each batch measured before its update)."""
    k, n = c.shape[0], x.shape[0]
    steps = math.ceil(_shard_sizes(n, device).max().item() / batch_size)  # same on all ranks
    perm = torch.randperm(n, generator=g)
    hits = torch.zeros(k, dtype=torch.float64, device=device)  # points per centroid this epoch
    total = 0.0
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size].sort().values.numpy()  # sorted: fast reads
        sums, stats = _accumulate([_load(x, idx, device, spherical, shift)], _Nearest(c, spherical, kc), device)
        m = stats[:k]
        counts += m
        hits += m
        seen = m > 0
        # c <- c + (sum - m c) / count: each point moves its centre with learning rate 1/count,
        # so every centroid is the running mean of all points ever assigned to it
        c[seen] += (sums[seen] - m[seen, None].float() * c[seen]) / counts[seen, None].float()
        if spherical:
            c.copy_(F.normalize(c, dim=1))
        total += stats[k].item()
    _split_empty(c, counts, hits == 0)
    if spherical:
        c.copy_(F.normalize(c, dim=1))
    return total

# -----------------------------------------------------------------------------
# fit

def settings_at_scale(n, k, d):
    """How a large store is clustered (CLIP-CID's clusters and Knowledge-CLIP's concepts, in
    teachers.store_clusters; `python docs/bench.py --store` times it). Up to 200,000 rows or 256
    per centroid: Lloyd on every row to a fixed point (the embedded sizes). Past that, Lloyd on
    a sample of 256 x K rows, as faiss does, until an iteration gains less than 0.1%; but if that
    sample would not fit in SAMPLE_BYTES (K x D large: UNICOM-style tens of thousands of
    clusters), mini-batch k-means over every row instead, 3 epochs of batches of max(4096, 4 K),
    which holds one batch at a time. -> keyword arguments of `fit`."""
    if n <= 256 * k or n <= 200_000:
        return {}
    if 256 * k * d * 4 > SAMPLE_BYTES:
        return {"batch_size": max(4096, 4 * k), "iters": 3}
    return {"max_points": 256 * k, "tol": 1e-3}


def fit(x, k, *, iters=20, batch_size=None, tol=0.0, spherical=False, init="k-means++", seed=0,
        device=None, chunk_mb=None, init_sample=None, max_points=None, verbose=None, return_history=False):
    """k-means on the rows of x (N, D): torch tensor, numpy array or np.memmap.

    batch_size=None runs full-batch Lloyd for at most `iters` iterations (it stops early once
    the centroids stop moving, or once an iteration lowers the inertia by less than tol
    relative); an integer runs mini-batch k-means (Sculley 2010) for `iters` epochs of random
    batches of that size. init: "k-means++" (greedy, over-seeded, on a sample of init_sample
    rows, default 8 * k), "random", or a (K, D) tensor of initial centroids. spherical=True
    clusters by cosine similarity and returns unit-norm centroids. chunk_mb bounds the memory of
    one distance block (MiB; None: chunk_mb_for(device)).
    max_points: train on a random sample of at most this many rows (faiss trains on at most 256
    per centroid): past that, more points move the centroids little and cost a pass each.
    verbose: tqdm progress bar (None: only when the work is long, and only on rank 0).

    Returns centroids (K, D) float32 on `device`; with return_history=True also a list with
    the inertia of each iteration's assignment step (for Lloyd: the inertia of the centroids
    entering iteration t, so history[0] is the initialisation's; for mini-batch: the sum of
    the batch distances over the epoch, before each batch's update).
    """
    device = _device_for(x, device)
    g = torch.Generator().manual_seed(seed)
    if max_points is not None and _shard_sizes(x.shape[0], device).sum().item() > max_points:
        frac = max_points / _shard_sizes(x.shape[0], device).sum().item()  # each rank samples its share
        x = x[sample_indices(x.shape[0], max(1, round(frac * x.shape[0])), g).numpy()]
        if x.shape[0] * x.shape[1] * 4 <= SAMPLE_BYTES:  # read the sample once, not once per pass
            x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to(device, torch.float32)
    n, d = x.shape
    n_total = _shard_sizes(n, device).sum().item()
    if k < 1 or k > n_total:
        raise ValueError(f"kmeans: need 1 <= k <= N, got k={k} with N={n_total} points")
    slow = 2 * n_total * k * d * iters > 1e12  # more than a few seconds
    verbose = (slow if verbose is None else verbose) and _world()[0] == 0  # None: only when slow; rank 0 only

    c, shift = _init(x, k, init, init_sample, n_total, g, device, spherical)  # (K, D) in shifted coordinates
    rows, kc = _blocks(k, d, chunk_mb, device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)  # mini-batch: points seen
    history = []
    bar = tqdm(range(iters), desc="k-means", disable=not verbose)
    for _ in bar:
        if batch_size is None:
            old = c.clone()
            history.append(_lloyd_step(x, c, rows, kc, device, spherical, shift))
        else:
            history.append(_minibatch_epoch(x, c, counts, batch_size, g, kc, device, spherical, shift))
        bar.set_postfix(inertia=f"{history[-1]:.6g}")
        if batch_size is None and torch.equal(c, old):
            break  # Lloyd reached a fixed point: further iterations would change nothing
        if batch_size is None and len(history) > 1 and history[-2] - history[-1] < tol * history[-2]:
            break  # the last iteration lowered the inertia by less than tol (relative)
    if shift is not None:
        c = c + shift  # back to the data's own coordinates
    return (c, history) if return_history else c
