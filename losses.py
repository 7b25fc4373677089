"""Every loss of the project, each a plain function on tensors; then each method's terms on a batch.

CLIP (Radford et al. 2021, Figure 3; Knowledge-CLIP Figure 2):
    logits = I_e @ T_e.T * exp(t)
    loss   = (CE(logits, arange(B), axis=0) + CE(logits, arange(B), axis=1)) / 2
Knowledge-CLIP (Kao 2024, Sec. 3): text embedding distillation through the linear projector
W_e (embedding_distill_loss) and concept learning from soft k-means labels (concept_loss).
CLIP-CID (Yang et al. 2024): cluster discrimination with an additive angular margin
(arcface_logits, cluster_loss, sample_classes) and instance discrimination (instance_loss).
The methods (last section): the student's heads (KCLIPHeads, CIDHeads) and `loss_terms`, where the
methods differ: which of these losses a batch adds up, on the teachers' rows cached before training.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

import clip
import data
import kmeans


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
# CLIP-CID (Yang et al. 2024, arXiv 2408.09441), cluster and instance discrimination.
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


def loss_terms(model, heads, batch, extra, cfg=LossConfig()):
    """{name: scalar loss} for one batch: the terms of the run's method, each paper's equations
    above on the student's embeddings. heads: {"kclip": KCLIPHeads, "cid": CIDHeads}, those of the
    run's method (kclip+cid: both). extra: the frozen teachers' side, computed once before training
    (train.prepare_kclip, prepare_cid): the teacher store's rows, centroids and cluster labels."""
    image_emb = model.encode_image(batch["images"])  # (B, D_s) I_e
    text_feat = model.encode_text(batch["tokens"], normalize=False)  # (B, D_s) E_T(x), before normalising
    if "corpus_index" in batch:  # text-only lines (--text-corpus): the text tower alone
        corpus_feat = model.encode_text(extra["corpus_tokens"][batch["corpus_index"]].to(image_emb.device),
                                        normalize=False)  # (B_c, D_s)
    with torch.autocast(image_emb.device.type, enabled=False):  # the losses in fp32, also under bf16 autocast
        image_emb, text_feat = image_emb.float(), text_feat.float()
        text_emb = F.normalize(text_feat, dim=-1)  # (B, D_s) T_e
        rank, n = data.world()
        gathered = {} if n == 1 else dict(image_all=gather(image_emb), text_all=gather(text_emb), offset=rank * len(image_emb))
        terms = {"clip": clip_loss(image_emb, text_emb, model.logit_scale.exp(), **gathered)}
        idx, dev = batch["index"], image_emb.device  # (B / W,) this rank's rows of the data (and of the store)
        mean, std = extra.get("target_shift", (0.0, 1.0))  # L_emb's target: L(x), or (L(x) - mean) / std (standardised)
        if "kclip" in heads:
            kh = heads["kclip"]
            t_txt = extra["t_store"].rows("text", idx).to(dev)  # (B, D_t) L(x)
            soft = kmeans.soft_assign(t_txt, extra["concept_centroids"], cfg.concept_tau)  # (B, K) s_i
            terms["emb"] = embedding_distill_loss(kh.proj(text_feat), (t_txt - mean) / std)
            terms["concept"] = concept_loss(kh.classifier(image_emb), kh.classifier(text_emb), soft)
        if "corpus_index" in batch:  # the same W_e and L_emb, on lines with no image
            lines = extra["corpus_store"].rows("text", batch["corpus_index"]).to(dev)  # (B_c, D_t)
            terms["corpus"] = embedding_distill_loss(heads["kclip"].proj(corpus_feat.float()), (lines - mean) / std)
        if "cid" in heads:
            ch = heads["cid"]
            zi = F.normalize(ch.proj(image_emb), dim=-1)  # (B, D_t) P(I_s)
            zt = F.normalize(ch.proj(text_emb), dim=-1)  # (B, D_t) P(T_s)
            y, C = extra["labels"][idx].to(dev), extra["centroids"]
            kw = dict(s=cfg.arc_scale, m=cfg.margin, sample_frac=cfg.class_frac,
                      generator=data.step_generator(cfg.seed, batch["step"], 1) if cfg.class_frac < 1 else None)
            terms["cd"] = (cluster_loss(zi, C, y, **kw) + cluster_loss(zt, C, y, **kw)) / 2
            every = batch["global_index"]  # the teacher's rows: the whole global batch
            terms["id"] = instance_loss(zi, zt, extra["store"].rows("image", every).to(dev),
                                        extra["store"].rows("text", every).to(dev), ch.logit_scale.exp(),
                                        offset=rank * len(idx))
        return terms


class Student(nn.Module):
    """The CLIP and its method's heads as one module whose forward gives the loss terms: the unit
    DistributedDataParallel wraps (its gradient all-reduce hooks fire for what forward computed)."""

    def __init__(self, model, heads, extra, cfg=LossConfig()):
        super().__init__()
        self.model, self.heads, self.extra, self.cfg = model, heads, extra, cfg

    def forward(self, batch):
        return loss_terms(self.model, self.heads, batch, self.extra, self.cfg)
