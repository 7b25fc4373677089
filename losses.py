"""The three methods, each from its paper: every loss as a plain function on tensors, CLIP-CID's semantic balance, the
terms a batch adds up and one update on them, and what each method computes once from its teacher's rows before training.

CLIP (Radford et al. 2021, Figure 3; Knowledge-CLIP Figure 2):
    logits = I_e @ T_e.T * exp(t)
    loss   = (CE(logits, arange(B), axis=0) + CE(logits, arange(B), axis=1)) / 2
Knowledge-CLIP (Kao 2024, Sec. 3): text embedding distillation through the linear projector
W_e (embedding_distill_loss) and concept learning from soft k-means labels (concept_loss).
CLIP-CID (Yang et al. 2024): image semantic balance (semantic_balance, Sec. 3.1), then cluster
discrimination with an additive angular margin (arcface_logits, cluster_loss, sample_classes) and
instance discrimination (instance_loss).
A batch: the student's heads (KCLIPHeads, CIDHeads) and `loss_terms`, where the methods differ: which
of these losses a batch adds up, on the teachers' rows cached before training (`lookup`); `train_step`,
one AdamW update on their weighted sum.
Before training, once (last section, on the teacher store of teachers.py): `prepare_kclip` (the
concepts), `prepare_cid` (the balance, the clusters), and the pictures of what they found.
"""
import io
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import clip
import data
import eval as evaluation
import kmeans
import teachers


def clip_loss(image_emb, text_emb, logit_scale, image_all=None, text_all=None, offset=0):
    """Symmetric InfoNCE of the CLIP pseudocode.

    image_emb, text_emb: (B, D) L2-normalised embeddings; pair i is (image_emb[i], text_emb[i]).
    logit_scale: the already exponentiated temperature exp(t), a scalar tensor.
    Row i of `logits` scores image i against every caption (axis=1, image -> text); column j
    scores caption j against every image (axis=0, text -> image).

    Data parallel (open_clip's gathered features with a local loss): image_all, text_all (W*B, D)
    hold every rank's embeddings, gathered with their gradients; this rank's B rows are scored
    against all W*B columns, pair i's answer being column offset + i. The mean of this over the
    W ranks is the loss of the whole global batch."""
    if image_all is None:
        logits = logit_scale * image_emb @ text_emb.t()  # (B, B)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    labels = torch.arange(len(image_emb), device=image_emb.device) + offset
    return (F.cross_entropy(logit_scale * image_emb @ text_all.t(), labels)  # (B, W*B)
            + F.cross_entropy(logit_scale * text_emb @ image_all.t(), labels)) / 2


# ----------------------------------------------------------------------------------------
# Knowledge-CLIP (arXiv 2412.03513). Total: alpha L_emb + beta L_concept + gamma L_clip with
# alpha = gamma = 1, beta = 0.01.

def embedding_distill_loss(projected, target):
    """L_emb = sum_i || E_T(x_i) W_e - L(x_i) ||_2^2, here the mean over the batch (sum over dims).
    projected (B, D_t): the student's text embedding before normalisation, through W_e;
    target (B, D_t): the frozen LLM's pooled embedding of the same caption."""
    return (projected - target).pow(2).sum(1).mean()


def concept_loss(image_logits, text_logits, soft_labels):
    """L_concept = KL(s_i || softmax(C(I_e))) + KL(s_i || softmax(C(T_e))), batch mean.
    image_logits, text_logits (B, K): the shared concept classifier C on each modality;
    soft_labels (B, K): s_i = softmax_k(cos(L(x_i), mu_k) / tau_c), rows summing to one.
    KL(s || q) = sum_k s_k (log s_k - log q_k); a zero s_k contributes zero."""
    def kl(logits):
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), soft_labels, reduction="batchmean")
    return kl(image_logits) + kl(text_logits)


# ----------------------------------------------------------------------------------------
# CLIP-CID (Yang et al. 2024, arXiv 2408.09441), 1: image semantic balance (its Sec. 3.1). Near-duplicate
# images are found in the teacher's image embeddings (the store's rows); each group keeps one pair.

def flatten(parent):
    """Point every node straight at its root (pointer jumping)."""
    while not ((grand := parent[parent]) == parent).all():
        parent[:] = grand
    return parent


def union(parent, pairs):
    """Vectorised union-find: hook the larger root under the smaller, pair by pair, until both
    ends of every pair share a root. parent (N,) int64, updated in place; pairs (P, 2)."""
    i, j = pairs[:, 0], pairs[:, 1]
    while len(i):
        flatten(parent)
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))


def similar_pairs(emb, threshold, block=2048, device="cpu"):
    """Exact: yields, block by block of the (N, N) similarity matrix (never all of it at once; computed
    on `device`), every pair (i < j) with cos >= threshold as a (P, 2) int64 array. emb (N, D) unit-norm."""
    emb = torch.as_tensor(np.asarray(emb), dtype=torch.float32).to(device)
    for a in range(0, len(emb), block):
        for b in range(a, len(emb), block):
            sim = emb[a:a + block] @ emb[b:b + block].t()  # (block, block)
            i, j = torch.nonzero(sim >= threshold, as_tuple=True)
            i, j = i + a, j + b
            yield torch.stack([i[i < j], j[i < j]], 1).cpu().numpy()


def similar_pairs_bucketed(emb, threshold, n_buckets, seed=0, block=2048, device="cpu"):
    """For large N: spherical k-means buckets (fit on at most 256 rows per bucket, as faiss trains), then the exact
    search inside each bucket only, one bucket's rows in memory at a time; near-duplicates rarely straddle a border."""
    centroids = kmeans.fit(data.shard(emb), n_buckets, spherical=True, seed=seed, max_points=256 * n_buckets, device=device)
    labels = kmeans.assign(emb, centroids, spherical=True, device=device)[0].cpu().numpy()  # (N,)
    order = np.argsort(labels, kind="stable")  # bucket by bucket, rows in order within each
    bounds = np.searchsorted(labels[order], np.arange(n_buckets + 1))
    for k in range(n_buckets):
        members = order[bounds[k]:bounds[k + 1]]
        for local in similar_pairs(np.asarray(emb[members], dtype=np.float32), threshold, block, device):
            yield members[local]


def semantic_balance(emb, threshold=0.95, n_buckets=None, seed=0, device="cpu"):
    """Keep one pair per group of near-duplicates. emb (N, D) unit-norm teacher image embeddings (an array, a memmap
    or a store view: read in pieces). Groups are the connected components of the graph 'cos >= threshold'; each keeps
    the member nearest its (normalised mean) centroid. n_buckets=None: exact blocked search; an int: search within that
    many k-means buckets. Returns (keep (N,) bool, stats dict, groups: a list of index arrays, kept member first, for
    groups of two or more)."""
    n = len(emb)
    parent = np.arange(n)
    block = int((kmeans.chunk_mb_for(device) * 2 ** 20 / 4) ** 0.5)  # (block, block) float32 similarities: 2048 on a CPU
    for pairs in (similar_pairs(emb, threshold, block, device) if n_buckets is None else
                  similar_pairs_bucketed(emb, threshold, n_buckets, seed, block, device)):
        union(parent, pairs)
    root = flatten(parent)
    size = np.bincount(root, minlength=n)
    keep = size[root] == 1  # a pair with no near-duplicate is kept
    grouped = np.nonzero(~keep)[0]  # (G,) the members of groups of two or more, in row order
    groups = []
    if len(grouped):
        _, gid = np.unique(root[grouped], return_inverse=True)  # (G,) group number of each member
        x = torch.from_numpy(np.asarray(emb[grouped], dtype=np.float32))  # (G, D): only the grouped rows
        centre = F.normalize(torch.zeros(gid.max() + 1, x.shape[1]).index_add_(0, torch.from_numpy(gid), x), dim=1)
        score = (x * centre[gid]).sum(1).numpy()  # cos to own centroid
        order = np.lexsort((-score, gid))  # by group, best first
        first = order[np.r_[True, gid[order][1:] != gid[order][:-1]]]  # best member of each group
        keep[grouped[first]] = True
        groups = np.split(grouped[order], np.nonzero(np.diff(gid[order]))[0] + 1)
    stats = {"pairs_before": n, "pairs_after": int(keep.sum()), "removed": int(n - keep.sum()),
             "removed_fraction": float(1 - keep.mean()), "duplicate_groups": len(groups),
             "largest_group": int(size.max()), "threshold": threshold}
    return keep, stats, groups


# The threshold that means the same in any teacher's space. The paper gives none, and a fixed cosine (our former 0.99)
# means different things to different teachers (ours puts most images of one shape x colour class above 0.99). So by
# default the threshold is read off the teacher itself: two images are near-duplicates when the teacher puts them as
# close as it puts an image and its re-saved copy (JPEG at PIL's default quality 75, as the web holds copies of images):
# the `quantile` of those cosines (0.5: as close as a typical copy; 0.9, the default chosen on validation: as close as
# the closest tenth of copies, a cautious rule). docs/choices.md.

def near_copy(images, quality=75):
    """Each image saved as JPEG and read back. (B, 3, S, S) uint8 -> (B, 3, S, S) uint8."""
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def copy_threshold(cos, quantile):
    """The rule's cosine: the `quantile` of copy_cosines' (n,) cosines, in float64 (linear between ranks)."""
    return torch.quantile(torch.from_numpy(cos).double(), quantile).item()


# ----------------------------------------------------------------------------------------
# CLIP-CID, 2: cluster and instance discrimination.
# The paper gives no equations in code; these follow the same lab's UNICOM (margin softmax
# over k-means pseudo-classes) and instance-level CLIP distillation (docs/choices.md).

def arcface_logits(emb, centroids, labels, s=32.0, m=0.3):
    """Additive angular margin (ArcFace, Deng et al. 2019) logits.

    emb (B, D) and centroids (K, D) unit-norm; labels (B,) in [0, K).
    logit_j = s * cos(theta_j) for j != y, logit_y = s * cos(theta_y + m), written as
    cos(theta_y) cos(m) - sin(theta_y) sin(m) with sin(theta_y) = sqrt(1 - cos^2): no arccos, and a
    gradient that never vanishes. sin(theta_y) is floored at 1e-3 (theta_y < 1e-3), where its slope
    in cos(theta_y) is unbounded; the cos(m) term still carries the gradient there. Past
    theta_y = pi - m, where cos(theta_y + m) would turn back up, the target is
    cos(theta_y) - m sin(m) (insightface's fallback): monotone, with slope 1 in cos(theta_y).
    Where this differs from unicom / arcface_torch: they apply the margin in place on the
    logits under no_grad, so their backward pass is that of the plain cosine; here the margin
    is part of the graph and autograd differentiates the target itself."""
    cos = emb @ centroids.t()  # (B, K)
    cos_y = cos.gather(1, labels[:, None])  # (B, 1)
    sin_y = (1 - cos_y * cos_y).clamp_min(1e-6).sqrt()  # (B, 1)
    target = torch.where(cos_y > math.cos(math.pi - m), cos_y * math.cos(m) - sin_y * math.sin(m),
                         cos_y - m * math.sin(m))  # (B, 1)
    return s * cos.scatter(1, labels[:, None], target)


def sample_classes(labels, n_classes, frac, generator=None):
    """Partial class sampling (PartialFC, An et al. 2022) for very large K: keep every class
    that is a label in this batch, plus a random `frac` of the others. Returns
    (kept class ids (K',), labels remapped into [0, K'))."""
    positive = torch.unique(labels)  # sorted
    is_pos = torch.zeros(n_classes, dtype=torch.bool, device=labels.device)
    is_pos[positive] = True
    negatives = torch.nonzero(~is_pos).squeeze(1)
    n_keep = int(round(frac * len(negatives)))
    pick = torch.randperm(len(negatives), generator=generator)[:n_keep].to(labels.device)
    kept = torch.cat([positive, negatives[pick]])  # positives first
    return kept, torch.searchsorted(positive, labels)


def cluster_loss(emb, centroids, labels, s=32.0, m=0.3, sample_frac=1.0, generator=None):
    """L_cd = -log( e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}) ),
    batch mean. emb (B, D_t) unit-norm student embeddings projected to the teacher's width;
    centroids (K, D_t) the frozen unit k-means centroids of the teacher's image embeddings."""
    if sample_frac < 1.0:
        kept, labels = sample_classes(labels, len(centroids), sample_frac, generator)
        centroids = centroids[kept]
    return F.cross_entropy(arcface_logits(emb, centroids, labels, s, m), labels)


def instance_loss(student_image, student_text, teacher_image, teacher_text, scale, offset=0):
    """Cross-model InfoNCE in the teacher's space: the student's image i must pick the
    teacher's caption i among the batch, and the student's caption i the teacher's image i.
    All (B, D_t) unit-norm; scale is the already exponentiated learned s'.
    L_id = ( CE(s' P(I_s) T_t^T, arange) + CE(s' P(T_s) I_t^T, arange) ) / 2.
    Data parallel: the teacher's rows are the whole global batch (W*B, D_t) and this rank's
    pair i is row offset + i (the teacher is frozen: nothing to gather with gradients)."""
    labels = torch.arange(len(student_image), device=student_image.device) + offset
    return (F.cross_entropy(scale * student_image @ teacher_text.t(), labels)
            + F.cross_entropy(scale * student_text @ teacher_image.t(), labels)) / 2


# ----------------------------------------------------------------------------------------
# The methods: the terms each one adds up on a batch. CLIP has one term; Knowledge-CLIP adds
# text embedding distillation and concept learning against a frozen LLM's caption embeddings;
# CLIP-CID adds cluster and instance discrimination against a frozen CLIP teacher's embeddings.
# The teachers' embeddings are never computed here: they were cached once in the teacher store.

@dataclass
class LossConfig:
    """The weight of each term (the papers' defaults: Knowledge-CLIP's gamma = alpha = 1, beta =
    0.01; CLIP-CID's 1, 1) and the terms' settings: tau_c of the soft concept labels, ArcFace's
    scale s and margin m, partial class sampling's fraction, the seed of that sampling."""
    weights: dict = field(default_factory=lambda: {"clip": 1.0, "emb": 1.0, "concept": 0.01, "cd": 1.0, "id": 1.0,
                                                   "corpus": 1.0})
    concept_tau: float = 0.05
    arc_scale: float = 32.0
    margin: float = 0.3
    class_frac: float = 1.0
    seed: int = 0


def gather(x):
    """(B, D) on each rank -> (W*B, D), in rank order, gradients flowing back to each rank's rows:
    the contrastive losses score a rank's rows against every rank's embeddings (as open_clip)."""
    return torch.cat(dist_fn.all_gather(x)) if data.world()[1] > 1 else x


class KCLIPHeads(nn.Module):
    """The student's extra parameters in Knowledge-CLIP (its Figure 1): the linear projector W_e
    (D_s -> D_t, into the LLM's space) and the concept classifier C (D_s -> K), shared by the
    image and text embeddings."""

    def __init__(self, d_student, d_teacher, n_concepts):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        self.classifier = nn.Linear(d_student, n_concepts)


class CIDHeads(nn.Module):
    """The student's extra parameters in CLIP-CID: the projector P (D_s -> D_t) into the
    teacher's space and the learned scale s' of the instance loss (initialised like CLIP's)."""

    def __init__(self, d_student, d_teacher):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        self.logit_scale = clip.logit_scale()  # s'


def lookup(batch, extra, device):
    """What a batch's row indices select from the method's preparation, on `device`: the text teacher's rows L(x)
    ('text_teacher'), the text-only lines' tokens and rows ('corpus_tokens', 'corpus_rows'), the CLIP teacher's
    cluster labels ('labels') and its image and text rows of the whole global batch ('teacher_image', 'teacher_text').
    Looked up before the student's forward: DistributedDataParallel moves every tensor of the forward's inputs to the
    GPU, the indices too, while the stores are read on the CPU by them. extra: as loss_terms'."""
    out, idx = {}, batch["index"]  # (B / W,) this rank's rows of the data (and of the store)
    go = dict(device=device, non_blocking=True)  # CUDA: the host does not wait for the GPU's queued work
    if "t_store" in extra:
        out["text_teacher"] = extra["t_store"].rows("text", idx).to(**go)  # (B, D_t) L(x)
    if "corpus_index" in batch:
        out["corpus_tokens"] = extra["corpus_tokens"][batch["corpus_index"]].to(**go)  # (B_c, L)
        out["corpus_rows"] = extra["corpus_store"].rows("text", batch["corpus_index"]).to(**go)  # (B_c, D_t)
    if "store" in extra:
        every = batch["global_index"]  # the teacher's rows: the whole global batch
        out["labels"] = extra["labels"][idx].to(**go)  # (B,)
        out["teacher_image"], out["teacher_text"] = (extra["store"].rows(f, every).to(**go) for f in ("image", "text"))
    return out


def loss_terms(model, heads, batch, extra, cfg=LossConfig()):
    """{name: scalar loss} for one batch: the terms of the run's method, each paper's equations
    above on the student's embeddings. heads: {"kclip": KCLIPHeads, "cid": CIDHeads}, those of the
    run's method (kclip+cid: both). extra: the frozen teachers' side, computed once before training
    (prepare_kclip, prepare_cid below): the teacher store's rows, centroids and cluster labels;
    batch["rows"]: what its indices select from it (lookup)."""
    rows = batch["rows"]
    image_emb = model.encode_image(batch["images"])  # (B, D_s) I_e
    text_feat = model.encode_text(batch["tokens"], normalize=False)  # (B, D_s) E_T(x), before normalising
    if "corpus_tokens" in rows:  # text-only lines (--text-corpus): the text tower alone
        corpus_feat = model.encode_text(rows["corpus_tokens"], normalize=False)  # (B_c, D_s)
    with torch.autocast(image_emb.device.type, enabled=False):  # the losses in fp32, also under bf16 autocast
        image_emb, text_feat = image_emb.float(), text_feat.float()
        text_emb = F.normalize(text_feat, dim=-1)  # (B, D_s) T_e
        rank, n = data.world()
        gathered = {} if n == 1 else dict(image_all=gather(image_emb), text_all=gather(text_emb), offset=rank * len(image_emb))
        terms = {"clip": clip_loss(image_emb, text_emb, model.logit_scale.exp(), **gathered)}
        mean, std = extra.get("target_shift", (0.0, 1.0))  # L_emb's target: L(x), or (L(x) - mean) / std (standardised)
        if "kclip" in heads:
            kh = heads["kclip"]
            soft = kmeans.soft_assign(rows["text_teacher"], extra["concept_centroids"], cfg.concept_tau)  # (B, K) s_i
            terms["emb"] = embedding_distill_loss(kh.proj(text_feat), (rows["text_teacher"] - mean) / std)
            terms["concept"] = concept_loss(kh.classifier(image_emb), kh.classifier(text_emb), soft)
        if "corpus_tokens" in rows:  # the same W_e and L_emb, on lines with no image
            terms["corpus"] = embedding_distill_loss(heads["kclip"].proj(corpus_feat.float()),
                                                     (rows["corpus_rows"] - mean) / std)
        if "cid" in heads:
            ch = heads["cid"]
            zi = F.normalize(ch.proj(image_emb), dim=-1)  # (B, D_t) P(I_s)
            zt = F.normalize(ch.proj(text_emb), dim=-1)  # (B, D_t) P(T_s)
            y, C = rows["labels"], extra["centroids"]
            kw = dict(s=cfg.arc_scale, m=cfg.margin, sample_frac=cfg.class_frac,
                      generator=data.step_generator(cfg.seed, batch["step"], 1) if cfg.class_frac < 1 else None)
            terms["cd"] = (cluster_loss(zi, C, y, **kw) + cluster_loss(zt, C, y, **kw)) / 2
            terms["id"] = instance_loss(zi, zt, rows["teacher_image"], rows["teacher_text"], ch.logit_scale.exp(),
                                        offset=rank * len(y))
        return terms


class Student(nn.Module):
    """The CLIP and its method's heads as one module whose forward gives the loss terms: the unit
    DistributedDataParallel wraps (its gradient all-reduce hooks fire for what forward computed)."""

    def __init__(self, model, heads, extra, cfg=LossConfig()):
        super().__init__()
        self.model, self.heads, self.extra, self.cfg = model, heads, extra, cfg

    def forward(self, batch):
        return loss_terms(self.model, self.heads, batch, self.extra, self.cfg)


# ----------------------------------------------------------------------------------------
# One update (train.py's loop calls it once per step; the optimiser and its schedule: clip.py).

def on_device(batch, step, device, extra=None):
    """A stream's batch for `step`: its pixels (normalised) and tokens on device, and what its indices select from
    the method's preparation (lookup); on CUDA the copies do not wait (non_blocking, from pinned memory)."""
    go = dict(device=device, non_blocking=True)  # (a no-op on the CPU)
    return {**batch, "step": step, "images": clip.to_input(batch["images"].to(**go), device),
            "tokens": batch["tokens"].to(**go), "rows": lookup(batch, extra or {}, device)}


def train_step(student, batch, optimizer, weights, grad_clip, scales, amp):
    """One update: the loss terms (bf16 autocast if amp), their weighted sum, backward, gradient
    clipping, AdamW, and the clamp exp(t) <= 100 of every learned temperature in `scales`.
    -> (the loss and each term (1 + T,), averaged over ranks; the term names; (2,) the loss and the
    gradient norm, for the loop to check). A NaN or inf loss or gradient norm is never applied: the
    fused AdamW (CUDA) skips the update on the device (found_inf: weights and moments stay as they
    were) and nothing here waits for the GPU; the CPU's AdamW stops before the backward or the update."""
    with torch.autocast(batch["images"].device.type, dtype=torch.bfloat16, enabled=amp):
        terms = student(batch)
        loss = sum(weights[k] * v for k, v in terms.items())
    values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
    if data.world()[1] > 1:  # what is logged and checked: the mean over ranks = the global batch's loss
        dist.all_reduce(values)
        values /= data.world()[1]
    optimizer.zero_grad(set_to_none=True)
    fused = optimizer.defaults.get("fused")
    if not fused and not torch.isfinite(values[0]):
        return values, list(terms), values[0].expand(2)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the same on every rank
    checks = torch.stack([values[0], grad_norm.float()])  # (2,)
    if fused:
        optimizer.found_inf = (~torch.isfinite(checks).all()).float()  # 1: the device skips this update
    elif not torch.isfinite(grad_norm):
        return values, list(terms), checks
    optimizer.step()
    with torch.no_grad():
        for t in scales:
            t.clamp_(0, clip.MAX_LOGIT_SCALE)
    return values, list(terms), checks


# ----------------------------------------------------------------------------------------
# Each method's preparation, once before the loop, on the teacher store (its teacher's rows of every training pair;
# store_at: teachers.open_store's root, name, dtype, workers): Knowledge-CLIP's concepts, CLIP-CID's balance and
# clusters. Each returns what loss_terms reads (`extra`), a summary for results.json and the teacher's FLOPs.

def cluster(stream, store, field, k, name, seed, out, device="cpu"):
    """Spherical k-means of the store's `field` rows over the pool (kept beside the store), and its picture
    OUT/NAME.png. -> centroids (K, D_t), labels (N,)."""
    pool = stream.pool
    if k > len(pool):
        raise SystemExit(f"error: --{name} {k} is more than the {len(pool)} training "
                         f"{'captions' if field == 'text' else 'pairs'}")
    centroids, labels = teachers.store_clusters(store, field, name, pool, k, seed, device)  # (K, D_t), (N,)
    if data.world()[0] == 0:
        unit = F.normalize if field == "text" else (lambda x, dim: x)  # a text teacher's rows are not unit vectors
        save_cluster_grid(stream.images, lambda i: unit(store.rows(field, pool[i]), dim=-1), centroids,
                          labels[pool], pool, os.path.join(out, f"{name}.png"))
    return centroids, labels


def moments(store, field, pool, chunk=65536):
    """Per-dimension mean and standard deviation (D,) of the store's `field` rows over the pool, read a chunk at a
    time (float64 sums); a constant dimension gets std 1e-6, not 0."""
    s1 = s2 = 0
    for a in range(0, len(pool), chunk):
        x = store.rows(field, pool[a:a + chunk]).double()  # (n, D)
        s1, s2 = s1 + x.sum(0), s2 + (x * x).sum(0)
    mean = s1 / len(pool)
    return mean.float(), (s2 / len(pool) - mean ** 2).clamp(min=0).sqrt().clamp(min=1e-6).float()


def prepare_kclip(stream, teacher, store_at, out, device, seed=0, concepts=64, tau=0.05, standardise=False,
                  corpus=None, corpus_exclude=frozenset(), context_length=32):
    """Knowledge-CLIP: the text teacher's caption embeddings L(x) (the store) and the concepts, k-means on them
    (centroids mu_k); a batch's soft labels s_i = softmax_k(cos(L(x_i), mu_k) / tau_c) come from its rows.
    standardise: L_emb's target (L(x) - mean) / std, fitted on the training captions. corpus: --text-corpus."""
    t0 = time.time()
    store, summary = teachers.open_store(stream, teacher, **store_at)
    t1 = time.time()
    centroids, labels = cluster(stream, store, "text", concepts, "concepts", seed, out, device)
    seconds = {"teacher_store": t1 - t0, "kmeans": time.time() - t1}  # info["seconds"]: train.py's phases
    pool = stream.pool
    soft_max = torch.cat([kmeans.soft_assign(store.rows("text", pool[a:a + 65536]), centroids, tau).max(1).values
                          for a in range(0, len(pool), 65536)])
    info = {"text_teacher": teacher.name, "text_teacher_params": clip.count_params(teacher.model), "text_store": summary,
            "concept_sizes": torch.bincount(labels[pool], minlength=concepts).tolist(),
            "soft_label_max_mean": round(soft_max.mean().item(), 4), "seconds": seconds}
    flops = {"text_teacher_forward": teachers.forward_flops(teacher, stream.pairs, pool), "text_teacher_training": None,
             "text_teacher_trained_by_this_run": False}
    extra = {"t_store": store, "concept_centroids": centroids.to(device)}
    if standardise:
        mean, std = moments(store, "text", pool)
        extra["target_shift"] = (mean.to(device), std.to(device))
        info["target_standardised"] = {"mean_norm": round(mean.norm().item(), 4), "std_mean": round(std.mean().item(), 4)}
    if corpus:  # text-only lines: their tokens and teacher embeddings, in a store of their own
        lines, dropped = read_corpus(corpus, corpus_exclude, seed)
        if dropped and data.world()[0] == 0:
            print(f"kclip: dropped {dropped} lines of --text-corpus that are evaluation captions")
        extra["corpus_tokens"] = stream.tokenizer(lines, context_length)  # (M, L)
        t0 = time.time()
        (extra["corpus_store"],), _ = teachers.build_store(data.TextLines(lines), [teacher], store_at["root"],
                                                           f"corpus-{data.fingerprint_of(lines)}", store_at["dtype"])
        seconds["teacher_store"] += time.time() - t0
        info["text_corpus"] = {"path": corpus, "lines": len(lines), "distinct": len(set(lines)),
                               "evaluation_captions_dropped": dropped}
    return extra, info, flops


def read_corpus(spec, exclude=frozenset(), seed=0):
    """--text-corpus: 'shapes' -> text_corpus; else a UTF-8 file, one phrase per line, its lines in `exclude` (on
    the embedded data, eval_captions) dropped and counted. -> (lines, lines dropped)."""
    if spec == "shapes":
        return data.text_corpus(seed=seed, exclude=exclude), 0
    if not os.path.isfile(spec):
        raise SystemExit(f"error: --text-corpus {spec}: no such file")
    with open(spec, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    kept = [line for line in lines if line not in exclude]
    if not kept:
        raise SystemExit(f"error: --text-corpus {spec} has no non-empty line"
                         + (" that is not an evaluation caption" if lines else ""))
    return kept, len(lines) - len(kept)


def corpus_index(step, n_lines, batch_size, seed):
    """(B_c / W,) --text-corpus: this rank's text-only lines at a step; the global draw is split over ranks like the pairs."""
    idx = torch.randint(n_lines, (batch_size,), generator=data.step_generator(seed, step, 0))  # (B_c,)
    rank, n = data.world()
    return idx.view(n, -1)[rank]


def copy_cosines(store, teacher, pairs, pool, n=512, seed=0):
    """cos(teacher(x), teacher(near_copy(x))) for n images of the pool, rounded to the store's dtype as the balance
    reads its rows; computed once beside the store. -> (n,) float32 (fewer if some images cannot be read)."""
    def compute():
        rows = np.random.default_rng(seed).choice(pool.numpy(), size=min(n, len(pool)), replace=False)
        view = pairs.at_size(teacher.resize, teacher.crop)
        read = [item[0] for item in (view[int(i)] for i in rows) if not isinstance(item, str)]
        if not read:
            raise SystemExit(f"error: semantic balance: none of {len(rows)} sampled images could be read; "
                             "pass --balance-threshold COS, or --no-balance")
        dtype = store.arrays["image"][0].dtype
        as_stored = lambda e: torch.from_numpy(e.cpu().numpy().astype(dtype).astype(np.float32))  # noqa: E731
        cos = [(as_stored(teacher.encode_images(x)) * as_stored(teacher.encode_images(near_copy(x)))).sum(1)
               for x in torch.stack(read).split(128)]  # (n, 3, S, S) uint8, 128 at a time
        return {"cos": torch.cat(cos).numpy()}, {}
    out, _, _ = teachers.derived(store, "copies", {"n": n, "seed": seed, "pool": data.fingerprint_of(pool)}, compute)
    return out["cos"]


def store_balance(store, pool, threshold, buckets=None, seed=0, device="cpu"):
    """semantic_balance of the pool's image rows, computed once beside the store. -> keep (N,) bool
    (False outside the pool), stats, groups (data rows, kept member first), reused."""
    def compute():
        keep, stats, groups = semantic_balance(store.view("image", pool), threshold, buckets, seed, device)
        full = np.zeros(len(store.ok), dtype=bool)
        full[pool.numpy()[keep]] = True
        flat = pool.numpy()[np.concatenate(groups)] if groups else np.zeros(0, np.int64)  # rows, group by group
        return {"keep": full, "group_rows": flat, "group_sizes": np.array([len(g) for g in groups], np.int64)}, stats
    params = {"threshold": threshold, "buckets": buckets, "seed": seed, "pool": data.fingerprint_of(pool)}
    out, stats, reused = teachers.derived(store, "balance", params, compute)
    groups = np.split(out["group_rows"], np.cumsum(out["group_sizes"])[:-1]) if len(out["group_sizes"]) else []
    return out["keep"], stats, groups, reused


def prepare_cid(stream, teacher, store_at, out, device, seed=0, clusters=64, balance=True, threshold=None, copies=0.9,
                buckets=None, spec=None, record=None, trained_here=False):
    """CLIP-CID: the CLIP teacher's image and text embeddings (the store), semantic balance (the pairs kept: cos >=
    threshold, or by default the copies rule) and the k-means pseudo-classes of the kept pairs (centroids, each pair's
    cluster), all kept beside the store. spec, record, trained_here: what --teacher named, its own results (our
    results.json or the manifest; None: a Hugging Face model), whether this run trained it."""
    t0 = time.time()
    store, summary = teachers.open_store(stream, teacher, **store_at)
    seconds = {"teacher_store": time.time() - t0, "balance": 0.0}  # info["seconds"]: train.py's phases
    info = {"teacher": spec, "teacher_params": clip.count_params(teacher.model), "store": summary,
            **({"teacher_results": record} if record is not None else {})}
    flops = {"teacher_forward": teachers.forward_flops(teacher, stream.pairs, stream.pool),
             "teacher_training": (record or {}).get("flops", {}).get("student_training"),  # None: trained elsewhere
             "teacher_trained_by_this_run": trained_here}
    if balance:
        t0 = time.time()
        buckets = buckets or (len(stream.pool) // 2000 if len(stream.pool) > 200_000 else None)  # exact below
        rule = "--balance-threshold"
        if threshold is None:  # the rule: as close as the teacher puts an image and its light copy
            threshold = copy_threshold(copy_cosines(store, teacher, stream.pairs, stream.pool, seed=seed), copies)
            rule = f"--balance-copies {copies}"
        keep, stats, groups, reused = store_balance(store, stream.pool, threshold, buckets, seed, device)
        info["balance"] = {**stats, "rule": rule}
        if data.world()[0] == 0:
            print(f"cid: semantic balance {'(reused) ' if reused else ''}removed {stats['removed']} of "
                  f"{stats['pairs_before']} pairs ({100 * stats['removed_fraction']:.1f}%) in {stats['duplicate_groups']} "
                  f"groups of near-duplicates (largest {stats['largest_group']}, cos >= {threshold:.4f}: {rule})")
            save_duplicate_groups(stream.images, groups, os.path.join(out, "balance_groups.png"),
                                  dup_of=stream.ds.attributes["dup_of"] if hasattr(stream, "ds") else None)
        stream.restrict(torch.from_numpy(keep))
        seconds["balance"] = time.time() - t0
    info["pairs_trained_on"] = len(stream.pool)
    t0 = time.time()
    centroids, labels = cluster(stream, store, "image", clusters, "clusters", seed, out, device)
    info["seconds"] = {**seconds, "kmeans": time.time() - t0}
    return {"store": store, "centroids": centroids.to(device), "labels": labels}, info, flops


# The pictures of what the preparation found (each cluster's pairs nearest its centroid, the groups of near-
# duplicates) and, after training, of the text space it was distilled into.

def picture_row(images_uint8, per_row, scale=2):
    """(n <= per_row, 3, S, S) uint8 -> (per_row, 3, scale*S, scale*S) floats in [0, 1]: upscaled so
    32-pixel images are visible, padded with black tiles to a full row."""
    scale = scale if images_uint8.shape[-1] <= 32 else 1
    row = F.interpolate(images_uint8.float() / 255, scale_factor=scale, mode="nearest")
    return torch.cat([row, torch.zeros(per_row - len(row), *row.shape[1:])])


def save_cluster_grid(images, emb, centroids, labels, rows, path, n_clusters=12, per_row=10):
    """One row per cluster (the most populous first): its members nearest the centroid.
    labels (M,) the clusters of the data rows `rows` (M,); emb(positions) -> their (n, D)
    embeddings, images(data rows) -> (n, 3, S, S) uint8."""
    counts = torch.bincount(labels, minlength=len(centroids))
    pictures = []
    for k in counts.argsort(descending=True)[:n_clusters].tolist():
        members = torch.nonzero(labels == k).squeeze(1)  # positions in rows
        best = members[(emb(members) @ centroids[k].cpu()).argsort(descending=True)[:per_row]]
        pictures.append(picture_row(images(torch.as_tensor(rows)[best]), per_row))
    torchvision.utils.save_image(torch.cat(pictures), path, nrow=per_row, padding=2, pad_value=1.0)
    print(f"wrote {path} (one row per cluster: the pairs nearest its centroid)")


def save_duplicate_groups(images, groups, path, n_groups=8, per_row=8, dup_of=None):
    """CLIP-CID semantic balance: one row per group of near-duplicates, largest groups first; the kept image first,
    framed in green, then the removed ones. images(rows) -> uint8. dup_of (N,): the embedded set's truth (a copy's
    original, -1 for an original), if known: a removed image of the kept one's scene framed in blue (a true copy,
    nothing lost), of another scene in red."""
    scene = None if dup_of is None else torch.where(dup_of >= 0, dup_of, torch.arange(len(dup_of)))  # (N,)
    colour = {"kept": [0.0, 1.0, 0.0], "copy": [0.0, 0.4, 1.0], "other": [1.0, 0.0, 0.0]}
    rows = []
    for members in sorted(groups, key=len, reverse=True)[:n_groups]:
        shown = torch.as_tensor(members[:per_row])
        row = picture_row(images(shown), per_row)
        frame = torch.ones_like(row[0], dtype=torch.bool)
        frame[:, 2:-2, 2:-2] = False
        for k in range(len(shown)):
            kind = "kept" if k == 0 else None if scene is None else \
                "copy" if scene[shown[k]] == scene[shown[0]] else "other"
            if kind:
                row[k][frame] = torch.tensor(colour[kind])[:, None, None].expand_as(row[k])[frame]
        rows.append(row)
    if rows:
        torchvision.utils.save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
        print(f"wrote {path} (kept image framed in green, removed ones beside it"
              + ("; blue: a copy of the kept scene, red: another scene)" if scene is not None else ")"))


def plot_text_space(model, stream, extra, path, device):
    """Knowledge-CLIP's Figures 4-5 at our scale (eval.plot_text_pca): 2,000 training captions as the text teacher
    embeds them (the store) and as the trained student does, coloured by their concept."""
    sample = stream.pool[:2000]
    teacher_text = extra["t_store"].rows("text", sample)  # (n, D_t)
    evaluation.plot_text_pca({"teacher L(x)": teacher_text, "student T_e": evaluation.embed_texts(
        model, [stream.pairs.caption(int(i)) for i in sample], device)}, kmeans.assign(
        teacher_text, extra["concept_centroids"].cpu(), spherical=True)[0], path)
