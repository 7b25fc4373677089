"""Train a CLIP: `python train.py --method clip | kclip | cid`.

One loop for every method. A method only decides which loss terms a batch produces
(`loss_terms`); the loop sums them with their weights, steps AdamW, and does the rest:
warmup + cosine learning rate, gradient clipping, the logit-scale clamp of CLIP
(exp(t) <= 100), bf16 autocast on CUDA, a progress bar, DIR/log.jsonl, atomic checkpoints
that resume exactly, a clear stop before an update whose loss or gradient is NaN or inf, and
DIR/results.json from eval.py at the end.
`torchrun --nproc_per_node N train.py ...` runs the same loop data-parallel on N processes.
`python train.py --sweep` trains and evaluates every row of the README's results table over 3
seeds; `python train.py --bench` times the training step against a naive version of itself.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import eval as evaluation
import kmeans
import losses
import teachers

# Presets: what a run does when you give no flags. `cpu` finishes in minutes on 2 cores;
# `gpu` is the reduced-scale run for one GPU. Every field is also a flag.
PRESETS = {
    "cpu": dict(model="small", steps=500, batch_size=256, lr=2e-3, warmup=50, n_train=20000, vocab_size=1024),
    "gpu": dict(model="base", steps=10000, batch_size=1024, lr=1e-3, warmup=500, n_train=400000, vocab_size=4096),
}
METHODS = ["clip", "kclip", "cid", "kclip+cid"]  # kclip+cid: both teachers at once (beyond both papers)
TEACHER_STEPS = {"cpu": 600, "gpu": 20000}  # --teacher own: a teacher trained on the student's data first
# The CLIP-CID teacher of the embedded data, as the papers have it: pretrained once, on a pool broader
# than any student's data (every shape x colour combination, every wording, 2.5x the pairs) and for 4x
# the student's steps, then shared by every run (weights/, made by `python train.py --pretrain-teacher`).
PRETRAIN_POOL = ["--data", "shapes-pretrain", "--n-train", "50000", "--dup-frac", "0", "--imbalance", "0"]
PRETRAIN_RECIPE = ["--method", "clip", "--model", "teacher", *PRETRAIN_POOL, "--steps", "2000", "--warmup", "100",
                   "--batch-size", "256", "--lr", "2e-3", "--seed", "0", "--vocab-size", "259", "--log-every", "1"]
PRETRAIN_DIR = os.path.join("runs", "pretrain-teacher")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="clip")
    p.add_argument("--data", default="shapes", help="'shapes' (embedded, generated; 'shapes-pretrain': the teacher's "
                   "pretraining pool), a .csv/.tsv file or tar shards 'dir/cc3m-{00000..00331}.tar'")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    p.add_argument("--model", choices=list(clip.SIZES), default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None, help="pairs generated for --data shapes")
    p.add_argument("--vocab-size", type=int, default=None, help="ids of the byte-pair tokenizer learned from the "
                   "training captions (clip.learn_bpe; at most 20,000 of them); 259: bytes alone")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's (32; 224 for vit-b-32, vit-s-32)")
    p.add_argument("--dup-frac", type=float, default=0.3, help="shapes: near-duplicate fraction")
    p.add_argument("--imbalance", type=float, default=0.8, help="shapes: Zipf exponent of class frequency")
    p.add_argument("--val-frac", type=float, default=0.02, help="real data: held-out pairs for retrieval")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-key", default=None, help="CSV column of a stable sample key (default: the image path)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for real data")
    p.add_argument("--n-eval", type=int, default=2000, help="shapes: test pairs (probe 2x, val 0.5x)")
    p.add_argument("--eval-sets", nargs="*", default=[], help="zero-shot/probe sets under --data-root: "
                   + ", ".join([*data.EVAL_SETS, *data.ATTRIBUTE_SETS]))
    p.add_argument("--data-root", default=os.path.expanduser("~/.cache/clip-distill"), help="where eval sets live")
    p.add_argument("--clip-weight", type=float, default=1.0, help="weight of the CLIP loss (Knowledge-CLIP's gamma)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hugging Face teacher's own code")
    p.add_argument("--store", default=os.path.join("runs", "store"), help="root of the teacher store (kclip, cid)")
    p.add_argument("--store-dtype", choices=["float16", "float32"], default="float16", help="teacher rows on disk")
    g = p.add_argument_group("Knowledge-CLIP (--method kclip)")
    g.add_argument("--text-teacher", default=teachers.DEFAULT_TEXT_TEACHER,
                   help="Hugging Face model name or folder, e.g. meta-llama/Llama-2-7b-hf (with --pool last)")
    g.add_argument("--pool", choices=["mean", "last"], default="mean", help="text teacher pooling over tokens")
    g.add_argument("--text-teacher-init", choices=["pretrained", "random"], default="pretrained",
                   help="random: the same architecture freshly initialised (seeded by --seed), a control")
    g.add_argument("--concepts", type=int, default=64, help="K of the k-means on the text teacher's caption embeddings")
    g.add_argument("--concept-tau", type=float, default=0.05, help="temperature tau_c of the soft concept labels")
    g.add_argument("--emb-weight", type=float, default=1.0, help="alpha, weight of the text embedding distillation")
    g.add_argument("--concept-weight", type=float, default=0.01, help="beta, weight of the concept KL loss")
    g = p.add_argument_group("beyond Knowledge-CLIP: distil the text teacher on text-only lines too (--method kclip)")
    g.add_argument("--text-corpus", nargs="?", const="shapes", default=None, metavar="PATH",
                   help="a text file, one phrase per line; 'shapes' or no value: the corpus data.py generates "
                        "(with the never-seen words); default: none (the paper's recipe)")
    g.add_argument("--corpus-weight", type=float, default=1.0, help="weight of L_emb on the text-only batch")
    g.add_argument("--corpus-batch", type=int, default=128, help="text-only lines per step")
    g = p.add_argument_group("CLIP-CID (--method cid)")
    g.add_argument("--teacher", default=None, help="'pretrained': the teacher in weights/, pretrained on a broader pool "
                   "(--pretrain-teacher; the default for --data shapes); 'own': train one on this run's data first (the "
                   "default for other data); or a run folder of ours, or a Hugging Face CLIPModel name/path")
    g.add_argument("--teacher-steps", type=int, default=None, help="steps of --teacher own; default: per preset")
    g.add_argument("--clusters", type=int, default=64, help="K of the k-means on teacher image embeddings")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True, help="image semantic balance")
    g.add_argument("--balance-threshold", type=float, default=0.99, help="cosine at or above which two images are duplicates")
    g.add_argument("--balance-buckets", type=int, default=None, help="search duplicates within k-means buckets (large data)")
    g.add_argument("--cd-weight", type=float, default=1.0, help="weight of the cluster discrimination loss")
    g.add_argument("--id-weight", type=float, default=1.0, help="weight of the instance discrimination loss")
    g.add_argument("--margin", type=float, default=0.3, help="ArcFace additive angular margin m")
    g.add_argument("--arc-scale", type=float, default=32.0, help="ArcFace scale s")
    g.add_argument("--class-frac", type=float, default=1.0, help="partial class sampling: fraction of negative clusters kept")
    g.add_argument("--pretrain-teacher", action="store_true", help="(re)build weights/shapes-teacher.pt and its manifest: "
                   "train PRETRAIN_RECIPE into runs/pretrain-teacher (resumable), evaluate it in float16, write both; exit")
    g = p.add_argument_group("the reproduction sweep (--sweep)")
    g.add_argument("--sweep", action="store_true", help="train and evaluate every row of the results table "
                   "(SWEEP) for every --seeds into --out (default runs/sweep); rerun to resume; writes table.md/json")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--rows", nargs="+", default=None, metavar="ROW", help="only these rows (train.SWEEP's folder names)")
    g.add_argument("--em-steps", type=int, nargs=2, default=[600, 400], metavar=("AUTOENCODER", "ADAPTER"),
                   help="steps of the EM probe's two stages")
    p.add_argument("--bench", action="store_true", help="time the student's training step (ours vs a naive version) and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="run folder; default runs/METHOD-MODEL-sSEED (then -2, -3, ... if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists the flags)\n")  # no usage dump
    args = p.parse_args(argv)
    args.preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.image_size = clip.SIZES[args.model].image_size if args.image_size is None else args.image_size
    if args.image_size % clip.SIZES[args.model].patch_size:
        p.error(f"--image-size {args.image_size} is not a multiple of --model {args.model}'s patch size "
                f"{clip.SIZES[args.model].patch_size}")
    if args.vocab_size < clip.N_BASE:
        p.error(f"--vocab-size must be at least {clip.N_BASE} (the bytes and 3 special ids), got {args.vocab_size}")
    for key in ("steps", "batch_size", "n_train", "n_eval", "log_every", "ckpt_every", "image_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2: the contrastive loss needs negatives")
    if not args.lr > 0 or not 0 <= args.val_frac < 1 or not 0 <= args.dup_frac < 1:
        p.error("need --lr > 0, 0 <= --val-frac < 1 and 0 <= --dup-frac < 1")
    unknown = [s for s in args.eval_sets if s not in data.EVAL_SETS and s not in data.ATTRIBUTE_SETS]
    if unknown:
        p.error(f"--eval-sets {' '.join(unknown)}: unknown; choose from {', '.join([*data.EVAL_SETS, *data.ATTRIBUTE_SETS])}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.text_corpus and "kclip" not in parts(args.method):
        p.error("--text-corpus distils the text teacher: it needs --method kclip or kclip+cid")
    if args.corpus_batch < 1 or args.corpus_batch % int(os.environ.get("WORLD_SIZE", "1")):
        p.error("--corpus-batch must be at least 1 and a multiple of the number of processes")
    if args.concepts < 1 or not args.concept_tau > 0:
        p.error("need --concepts >= 1 and --concept-tau > 0")
    if args.clusters < 1 or not 0 < args.class_frac <= 1 or not -1 <= args.balance_threshold <= 1:
        p.error("need --clusters >= 1, 0 < --class-frac <= 1 and -1 <= --balance-threshold <= 1")
    args.teacher_steps = args.teacher_steps or TEACHER_STEPS[args.preset]
    if "cid" in parts(args.method):  # the CLIP teacher's default depends on the data
        args.teacher = args.teacher or ("pretrained" if args.data == "shapes" else "own")
    if args.teacher == "pretrained" and args.data != "shapes":
        p.error(f"--teacher pretrained knows the embedded shapes only; for --data {args.data} pass --teacher own "
                "(trained on it first), a run folder of ours or a Hugging Face CLIP")
    unknown = set(args.rows or []) - {folder for folder, *_ in SWEEP}
    if unknown:
        p.error(f"--rows {' '.join(sorted(unknown))}: unknown; choose from {', '.join(f for f, *_ in SWEEP)}")
    if args.sweep:
        args.out = args.out or os.path.join("runs", "sweep")
    if args.out is None:  # the default folder; a finished or broken run there is kept, not reused
        base = args.out = os.path.join("runs", f"{args.method}-{args.model}-s{args.seed}")
        k = 1
        while os.path.exists(os.path.join(args.out, "ckpt.pt")) and not (args.resume or args.overwrite):
            k += 1
            args.out = f"{base}-{k}"
    return args


# ----------------------------------------------------------------------------------------
# Data parallelism. torchrun starts N processes; each takes 1/N of every global batch,
# DistributedDataParallel averages the gradients, and the contrastive losses score each rank's
# rows against every rank's embeddings (gathered with their gradients, as open_clip does).
# Rank 0 alone writes logs, checkpoints, pictures and results. One process: all of this is a no-op.

world = kmeans.world  # (rank, number of processes); (0, 1) without torchrun
barrier = kmeans.barrier  # wait for every rank


def init_distributed(args):
    """Join the process group torchrun describes: nccl on CUDA (one GPU per process), gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        out = [args.out]
        dist.broadcast_object_list(out, src=0)  # every rank writes (or reads) rank 0's folder
        args.out = out[0]


def gather(x):  # (B, D) on each rank -> (W*B, D), rank order; gradients flow back to each rank's rows
    return torch.cat(dist_fn.all_gather(x)) if world()[1] > 1 else x


def say(message):
    if world()[0] == 0:
        print(message)


def parts(method):  # "kclip+cid" -> ["kclip", "cid"]: the methods whose terms a run adds
    return method.split("+")


def read_json(path):
    with open(path) as f:
        return json.load(f)


write_json = data.write_json  # atomically: temp file, then rename


# ----------------------------------------------------------------------------------------
# Batches. Each one is a pure function of (seed, step), so a resumed run sees the same data.

BPE_SAMPLE = 20000  # captions the tokenizer learns its merges from (evenly spaced over the pool)


class Stream:
    def learn_tokenizer(self, captions, vocab_size):
        """The byte-pair tokenizer of this run, learned from its training captions: its merges go
        into the model's config (and so into every checkpoint)."""
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

    def __init__(self, args):
        self.ds = data.ShapesDataset(data.EMBEDDED[args.data], args.n_train, seed=args.seed, image_size=args.image_size,
                                     dup_frac=args.dup_frac, imbalance=args.imbalance)
        if args.batch_size > len(self.ds):
            raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the {len(self.ds)} training pairs")
        self.pairs = data.ShapesPairs(self.ds)  # the same pairs by row, for the teacher store
        self.learn_tokenizer(self.ds.captions[:BPE_SAMPLE], args.vocab_size)
        self.tokens = self.tokenizer(self.ds.captions, clip.SIZES[args.model].context_length)  # (N, L)
        self.batch_size, self.seed, self.perm_epoch, self.skipped = args.batch_size, args.seed, None, 0
        self.pool = torch.arange(len(self.ds))  # the pairs we train on (semantic balance may drop some)
        self.fingerprint = data.fingerprint_of(self.ds.images, self.ds.captions)  # names this data in results.json

    def images(self, idx):  # (n,) rows -> (n, 3, S, S) uint8, for pictures
        return self.ds.images[torch.as_tensor(idx)]

    def batch(self, step):
        per_epoch = len(self.pool) // self.batch_size
        epoch, k = divmod(step, per_epoch)
        if self.perm_epoch != epoch:
            self.perm, self.perm_epoch = self.order(epoch), epoch
        idx = self.perm[k * self.batch_size:(k + 1) * self.batch_size]  # (B,) the global batch
        rank, n = world()
        local = idx.view(n, -1)[rank]  # (B / W,) this rank's share
        return {"images": self.ds.images[local], "tokens": self.tokens[local], "index": local, "global_index": idx,
                "skipped": 0}


class RealStream(Stream):
    """CSV rows or tar shards, read by row (data.Pairs) through a DataLoader: the same seeded
    permutation of the pool per epoch as the embedded set, so resuming at step s skips the
    batches already seen without loading their images, and ranks take their share of each
    global batch. Held out: the pairs whose key data.is_val picks. A batch holds --batch-size
    rows less the pairs that could not be read (under torchrun: trimmed to the smallest share,
    so every rank gathers as many rows); a batch with fewer than 2 usable pairs is skipped."""

    def __init__(self, args):
        self.pairs = data.real_pairs(args.data, args.image_size, args.csv_img_key, args.csv_caption_key, args.csv_key,
                                     os.path.join(args.store, "scans"))
        self.args, self.batch_size, self.seed, self.iterator, self.skipped = args, args.batch_size, args.seed, None, self.pairs.skipped_rows
        self.pool = torch.tensor([i for i, k in enumerate(self.pairs.keys) if not data.is_val(k, args.seed, args.val_frac)],
                                 dtype=torch.long)
        self.fingerprint = self.pairs.fingerprint()
        sample = self.pool[np.linspace(0, len(self.pool) - 1, min(BPE_SAMPLE, len(self.pool))).astype(np.int64)]
        self.learn_tokenizer([c for c in (self.pairs.caption(int(i)) for i in sample) if c], args.vocab_size)

    def images(self, idx):  # pictures: each image at 64 px (a black tile if it cannot be read)
        view = self.pairs.at_size(64)
        return torch.stack([item[0] if not isinstance(item, str) else torch.zeros(3, 64, 64, dtype=torch.uint8)
                            for item in (view[int(i)] for i in idx)])

    def epochs(self, start_step):
        """Yield (images, captions, local rows, global rows, n_skipped) from step `start_step` on.
        A whole pass that yields no batch stops the run with one line that says why."""
        a, step, epoch = self.args, 0, 0
        rank, n = world()
        carry, reason = 0, self.pairs.skip_reason  # skipped pulls not yet reported; an example
        while True:
            order = self.order(epoch)
            per_epoch = len(order) // a.batch_size
            if per_epoch == 0:
                dropped = f" ({self.skipped} dropped, e.g. {reason})" if self.skipped else ""
                raise SystemExit(f"error: --data {a.data} has {len(order)} training pairs{dropped}, fewer than "
                                 f"--batch-size {a.batch_size}")
            skip = min(max(start_step - step, 0), per_epoch)  # batches already trained on
            step, full_pass = step + skip, skip == 0
            mine = order[skip * a.batch_size:per_epoch * a.batch_size].view(-1, n, a.batch_size // n)[:, rank]
            loader = torch.utils.data.DataLoader(self.pairs, sampler=mine.flatten().tolist(), batch_size=a.batch_size // n,
                                                 num_workers=a.workers, collate_fn=data.collate)
            usable = 0
            for images, captions, rows, skipped, why in loader:
                step += 1
                reason = reason or why
                k = len(captions)
                if n > 1:  # every rank keeps as many pairs as the one with fewest
                    k = torch.tensor([k])
                    dist.all_reduce(k, op=dist.ReduceOp.MIN)
                    k = int(k)
                if k < 2:  # nothing to contrast: skipped, its pairs counted
                    carry += skipped + len(captions)
                    continue
                skipped += len(captions) - k
                images, captions, rows = images[:k], captions[:k], rows[:k]
                every = rows
                if n > 1:  # (k W,) the global batch's rows, in rank order
                    shares = [torch.empty_like(rows) for _ in range(n)]
                    dist.all_gather(shares, rows)
                    every = torch.cat(shares)
                usable += 1
                if step > start_step:
                    yield images, captions, rows, every, carry + skipped
                    carry = 0
            if full_pass and usable == 0:
                hint = " (CSV image paths are read relative to the CSV file's folder)" if isinstance(self.pairs, data.CsvPairs) else ""
                raise SystemExit(f"error: --data {a.data}: no usable pair in a whole pass ({carry} skipped), e.g. {reason}{hint}")
            epoch += 1

    def batch(self, step):
        if self.iterator is None:
            self.iterator = self.epochs(step)
        images, captions, rows, every, skipped = next(self.iterator)
        self.skipped += skipped
        return {"images": images, "tokens": self.tokenizer(captions, clip.SIZES[self.args.model].context_length),
                "captions": captions, "index": rows, "global_index": every, "skipped": self.skipped}


# ----------------------------------------------------------------------------------------
# The method: which loss terms a batch produces, and their weights. CLIP has one term;
# Knowledge-CLIP adds text embedding distillation and concept learning against a frozen LLM's
# cached caption embeddings; CLIP-CID adds cluster and instance discrimination against a
# frozen CLIP teacher's cached embeddings.

class KCLIPHeads(nn.Module):
    """The student's extra parameters in Knowledge-CLIP (its Figure 1): the linear projector W_e
    (D_s -> D_t, into the LLM's space) and the concept classifier C (D_s -> K), shared by the
    image and text embeddings."""

    def __init__(self, d_student, d_teacher, n_concepts):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        self.classifier = nn.Linear(d_student, n_concepts)


def open_store(args, stream, teacher):
    """The teacher store of this run's pairs (built, or the parts still missing built now)."""
    (store,), summary = teachers.build_store(stream.pairs, [teacher], args.store, teachers.data_name(args.data, stream.pairs),
                                             args.store_dtype, workers=args.workers)
    missing = int((~store.ok[stream.pool.numpy()]).sum())  # training pairs with no teacher row
    if missing:
        say(f"{args.method}: {missing} training pairs have no row in the teacher store (it could not read them); "
            "they are left out")
    stream.restrict(torch.from_numpy(store.ok))
    return store, {**summary, "training_pairs_missing": missing}


def pool_params(args, stream, **params):  # what a result computed on the store depends on
    return {**params, "seed": args.seed, "pool": data.fingerprint_of(stream.pool)}


def prepare_kclip(args, stream, device):
    """Everything Knowledge-CLIP computes once, before the loop: the text teacher's caption
    embeddings L(x) (the store), spherical k-means on them (centroids mu_k, kept beside the
    store); each batch's soft concept labels s_i = softmax_k(cos(L(x_i), mu_k) / tau_c) come from
    its rows. Returns D_t, what loss_terms needs, a summary for results.json."""
    teacher = teachers.load_text_teacher(args.text_teacher, device, args.pool, args.trust_remote_code,
                                         random_init_seed=args.seed if args.text_teacher_init == "random" else None)
    store, summary = open_store(args, stream, teacher)
    pool = stream.pool
    if args.concepts > len(pool):
        raise SystemExit(f"error: --concepts {args.concepts} is more than the {len(pool)} training captions")
    fit = lambda: ({"centroids": kmeans.fit(kmeans.shard(store.view("text", pool)), args.concepts, spherical=True,  # noqa: E731
                                            seed=args.seed, **kmeans.settings_at_scale(len(pool), args.concepts)).cpu().numpy()}, {})
    out, _, _ = teachers.derived(store, "concepts", pool_params(args, stream, k=args.concepts), fit)
    centroids = torch.from_numpy(out["centroids"])  # (K, D_t)
    concept, _ = kmeans.assign(store.view("text", pool), centroids, spherical=True)  # (N_pool,)
    soft_max = torch.cat([kmeans.soft_assign(store.rows("text", pool[a:a + 65536]), centroids, args.concept_tau).max(1).values
                          for a in range(0, len(pool), 65536)])
    if world()[0] == 0:
        evaluation.save_cluster_grid(stream.images, lambda i: F.normalize(store.rows("text", pool[i]), dim=-1), centroids,
                                     concept, pool, os.path.join(args.out, "concepts.png"))
    info = {"text_teacher": teacher.name, "text_teacher_params": clip.count_params(teacher.model), "text_store": summary,
            "text_teacher_flops": {"forward": teacher_flops(teacher, stream), "training": None, "trained_by_this_run": False},
            "concept_sizes": torch.bincount(concept, minlength=args.concepts).tolist(),
            "soft_label_max_mean": round(soft_max.mean().item(), 4)}
    extra = {"t_store": store, "concept_centroids": centroids.to(device)}
    if args.text_corpus:  # text-only lines: their tokens and teacher embeddings, in a store of their own
        lines, dropped = read_corpus(args)
        extra["corpus_tokens"] = stream.tokenizer(lines, clip.SIZES[args.model].context_length)  # (M, L)
        (extra["corpus_store"],), _ = teachers.build_store(data.TextLines(lines), [teacher], args.store,
                                                           f"corpus-{data.fingerprint_of(lines)}", args.store_dtype)
        info["text_corpus"] = {"path": args.text_corpus, "lines": len(lines), "distinct": len(set(lines)),
                               "evaluation_captions_dropped": dropped}
    return teacher.dim, extra, info


def read_corpus(args):
    """--text-corpus: 'shapes' -> data.text_corpus; else a UTF-8 file, one phrase per line. On the
    embedded data no line may be an evaluation caption (data.eval_captions): the generated corpus
    draws none, and a file's such lines are dropped and counted. -> (lines, lines dropped)."""
    held = data.eval_captions(args.n_eval, args.seed, args.image_size) if args.data in data.EMBEDDED else set()
    if args.text_corpus == "shapes":
        return data.text_corpus(seed=args.seed, exclude=held), 0
    if not os.path.isfile(args.text_corpus):
        raise SystemExit(f"error: --text-corpus {args.text_corpus}: no such file")
    with open(args.text_corpus, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    kept = [line for line in lines if line not in held]
    if not kept:
        raise SystemExit(f"error: --text-corpus {args.text_corpus} has no non-empty line"
                         + (" that is not an evaluation caption" if lines else ""))
    if len(kept) < len(lines):
        say(f"kclip: dropped {len(lines) - len(kept)} lines of --text-corpus that are evaluation captions")
    return kept, len(lines) - len(kept)


def count_flops(fn):
    """(fn(), the FLOPs it ran), by torch's FlopCounterMode: matmuls, convolutions and attention
    (elementwise work is not counted), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def teacher_flops(teacher, stream, n=64):
    """FLOPs of a teacher's forward passes over the data: each pair embedded once (its image and
    caption; a text teacher: the caption), as the store does, measured on n of the captions."""
    captions = [c for c in (stream.pairs.caption(int(i)) for i in stream.pool[:n]) if c]
    flops = count_flops(lambda: teacher.encode_texts(captions))[1]
    if hasattr(teacher, "encode_images"):
        blank = torch.zeros(len(captions), 3, teacher.crop, teacher.crop, dtype=torch.uint8)  # the size the store reads
        flops += count_flops(lambda: teacher.encode_images(blank))[1]
    return round(flops / len(captions) * len(stream.pairs))


def step_generator(seed, step, stream):
    """The random draws a step makes inside the loop come from here, a pure function of (seed,
    step, stream), never from the global RNG: a resumed run draws exactly what an unbroken one
    did, wherever it was stopped. stream 0: text-only lines; 1: partial class sampling."""
    return torch.Generator().manual_seed(seed * 1000003 + step + stream * 2 ** 40)


def corpus_index(step, n_lines, args):
    """(B_c / W,) this rank's text-only lines at a step; the global draw is split over ranks like the pairs."""
    idx = torch.randint(n_lines, (args.corpus_batch,), generator=step_generator(args.seed, step, 0))  # (B_c,)
    rank, n = world()
    return idx.view(n, -1)[rank]


class CIDHeads(nn.Module):
    """The student's extra parameters in CLIP-CID: the projector P (D_s -> D_t) into the
    teacher's space and the learned scale s' of the instance loss (initialised like CLIP's)."""

    def __init__(self, d_student, d_teacher):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def default_teacher_dir(args):
    if args.data in data.EMBEDDED:
        return os.path.join("runs", f"teacher-{args.preset}-n{args.n_train}-dup{args.dup_frac}-imb{args.imbalance}"
                                    f"-img{args.image_size}-s{args.seed}")
    name = teachers.data_name(args.data, None)
    return os.path.join("runs", f"teacher-{args.preset}-{name}-img{args.image_size}-s{args.seed}")


DATA_FLAGS = ("data", "n_train", "vocab_size", "dup_frac", "imbalance", "image_size", "val_frac", "csv_img_key", "csv_caption_key",
              "csv_key", "workers", "n_eval", "seed", "device", "preset", "store", "store_dtype")


def ensure_teacher(args, stream):
    """-> (the teacher to load, its record: our results.json or the manifest, None for a Hugging
    Face model; whether this run trained it). --teacher pretrained: the shipped
    one, checked against its manifest (teachers.check_pretrained); own: train `--method clip
    --model teacher` on the same data first if missing. An own teacher is reused only if it was
    trained on this very data (its results.json's fingerprint): a teacher left by other data
    would otherwise be distilled without a word."""
    if args.teacher == "pretrained":
        return teachers.PRETRAINED, teachers.check_pretrained(), False
    if args.teacher != "own":
        record = (os.path.join(args.teacher, "results.json") if os.path.isdir(args.teacher)
                  else os.path.splitext(args.teacher)[0] + ".json")  # a run folder of ours, or a .pt with its manifest
        return args.teacher, read_json(record) if os.path.isfile(record) else None, False
    tdir = default_teacher_dir(args)
    if os.path.exists(os.path.join(tdir, "results.json")):
        record = read_json(os.path.join(tdir, "results.json"))
        trained_on = record.get("data_fingerprint")
        if trained_on != stream.fingerprint:
            raise SystemExit(f"error: the teacher in {tdir} was trained on other data ({trained_on or 'an older data.py'}, "
                             f"this run's is {stream.fingerprint}); move it away to train a new one, or pass --teacher {tdir}")
        say(f"cid: using the teacher in {tdir}")
        return tdir, record, False
    say(f"cid: no teacher for this data and preset in {tdir}; training it first ({args.teacher_steps} steps)")
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in DATA_FLAGS if getattr(args, k) is not None]
    batch = PRESETS[args.preset]["batch_size"]  # the preset's; the student's if the data holds fewer pairs
    batch = batch if len(stream.pool) >= batch else args.batch_size
    train(parse_args(["--method", "clip", "--model", "teacher", "--steps", str(args.teacher_steps), "--batch-size",
                      str(batch), *flags, "--out", tdir, "--resume"]))
    return tdir, read_json(os.path.join(tdir, "results.json")), True  # every rank: train() ends after rank 0 wrote it


def pretrain_teacher(args):
    """--pretrain-teacher: train PRETRAIN_RECIPE into runs/pretrain-teacher (a killed run resumes),
    then write weights/shapes-teacher.pt (the weights in float16) and its manifest, whose
    evaluation is of the float16 weights, as shipped."""
    run = parse_args(PRETRAIN_RECIPE + ["--device", args.device, "--out", PRETRAIN_DIR, "--resume"])
    res_path = os.path.join(PRETRAIN_DIR, "results.json")
    res = read_json(res_path) if os.path.exists(res_path) else train(run)
    ckpt = clip.load_file(os.path.join(PRETRAIN_DIR, "ckpt.pt"))
    config = {k: v for k, v in ckpt["config"].items() if k not in ("out", "data_root", "store")}  # no local paths
    os.makedirs(os.path.dirname(teachers.PRETRAINED), exist_ok=True)
    with data.atomic(teachers.PRETRAINED) as tmp:
        torch.save({"model": {k: v.half() for k, v in ckpt["model"].items()}, "model_config": ckpt["model_config"],
                    "config": config}, tmp)
    model = clip.load_checkpoint(teachers.PRETRAINED, run.device)[0]
    pool = {"data": run.data, "n": run.n_train, "seed": run.seed, "image_size": run.image_size, "dup_frac": run.dup_frac,
            "imbalance": run.imbalance, "fingerprint": res["data_fingerprint"], "prefix_rows": teachers.PREFIX_ROWS}
    pool["prefix_fingerprint"] = teachers.pool_prefix_fingerprint(pool)
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "*.py"], cwd=here, capture_output=True, text=True).stdout
        code = commit + (" with uncommitted changes" if dirty.strip() else "") if commit else None
    except OSError:
        code = None
    manifest = {"file": os.path.basename(teachers.PRETRAINED), "sha256": teachers.sha256_of(teachers.PRETRAINED),
                "bytes": os.path.getsize(teachers.PRETRAINED), "command": teachers.REBUILD, "recipe": PRETRAIN_RECIPE,
                "code_version": code, "pool": pool, "model": run.model, "params": res["params"], "steps": run.steps,
                "first_losses": [r["loss"] for r in evaluation.read_log(PRETRAIN_DIR)[:5]],
                "machine": {"device": run.device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "threads": torch.get_num_threads(), "torch": torch.__version__},
                "train_seconds": res["seconds"], "flops": res.get("flops"),
                "results": evaluation.evaluate(model, run, torch.device(run.device))}  # of the float16 weights
    write_json(teachers.MANIFEST, manifest)
    print(json.dumps(manifest, indent=2))
    return manifest


def prepare_cid(args, stream, device):
    """Everything CLIP-CID computes once, before the loop, on the teacher store: semantic
    balance (the keep mask) and the k-means pseudo-classes (centroids, each pair's cluster),
    both kept beside the store. Returns the teacher's width D_t, what loss_terms needs and a
    summary for results.json."""
    tdir, record, trained_here = ensure_teacher(args, stream)
    teacher = teachers.load_clip_teacher(tdir, device, args.trust_remote_code)
    store, summary = open_store(args, stream, teacher)
    info = {"teacher": tdir, "teacher_params": clip.count_params(teacher.model), "store": summary}
    if record is not None:  # our run's results.json, or the pretrained teacher's manifest
        info["teacher_results"] = record
    trained = (record or {}).get("flops", {}).get("student_training")  # None: trained elsewhere
    info["teacher_flops"] = {"forward": teacher_flops(teacher, stream), "training": trained, "trained_by_this_run": trained_here}
    n = len(stream.pairs)
    if args.balance:
        pool = stream.pool
        buckets = args.balance_buckets or (len(pool) // 2000 if len(pool) > 200_000 else None)  # exact below 200k pairs

        def balance():
            keep, stats, groups = teachers.semantic_balance(store.view("image", pool), args.balance_threshold, buckets, args.seed)
            full = np.zeros(n, dtype=bool)
            full[pool.numpy()[keep]] = True
            flat = pool.numpy()[np.concatenate(groups)] if groups else np.zeros(0, np.int64)  # rows, group by group
            return {"keep": full, "group_rows": flat, "group_sizes": np.array([len(g) for g in groups], np.int64)}, stats
        out, stats, reused = teachers.derived(store, "balance", pool_params(
            args, stream, threshold=args.balance_threshold, buckets=buckets), balance)
        say(f"cid: semantic balance {'(reused) ' if reused else ''}removed {stats['removed']} of {stats['pairs_before']} "
            f"pairs ({100 * stats['removed_fraction']:.1f}%) in {stats['duplicate_groups']} groups of near-duplicates "
            f"(largest {stats['largest_group']}, cos >= {args.balance_threshold})")
        info["balance"] = stats
        if world()[0] == 0:
            groups = np.split(out["group_rows"], np.cumsum(out["group_sizes"])[:-1]) if len(out["group_sizes"]) else []
            evaluation.save_duplicate_groups(stream.images, groups, os.path.join(args.out, "balance_groups.png"))
        stream.restrict(torch.from_numpy(out["keep"]))
    pool = stream.pool
    info["pairs_trained_on"] = len(pool)
    if args.clusters > len(pool):
        raise SystemExit(f"error: --clusters {args.clusters} is more than the {len(pool)} training pairs")

    def clusters():
        c = kmeans.fit(kmeans.shard(store.view("image", pool)), args.clusters, spherical=True, seed=args.seed,
                       **kmeans.settings_at_scale(len(pool), args.clusters))  # (K, D_t)
        labels = np.full(n, -1, dtype=np.int64)
        labels[pool.numpy()] = kmeans.assign(store.view("image", pool), c, spherical=True)[0].numpy()
        return {"centroids": c.cpu().numpy(), "labels": labels}, {}
    out, _, _ = teachers.derived(store, "clusters", pool_params(args, stream, k=args.clusters), clusters)
    centroids, labels = torch.from_numpy(out["centroids"]), torch.from_numpy(out["labels"])  # (K, D_t), (N,)
    if world()[0] == 0:
        evaluation.save_cluster_grid(stream.images, lambda i: store.rows("image", pool[i]), centroids, labels[pool], pool,
                                     os.path.join(args.out, "clusters.png"))
    return teacher.dim, {"store": store, "centroids": centroids.to(device), "labels": labels}, info


def loss_terms(model, heads, batch, extra, args):
    """{name: scalar loss} for one batch. heads: {"kclip": KCLIPHeads, "cid": CIDHeads}, those of
    the run's method (kclip+cid: both)."""
    image_emb = model.encode_image(batch["images"])  # (B, D_s) I_e
    text_feat = model.encode_text(batch["tokens"], normalize=False)  # (B, D_s) E_T(x), before normalising
    if "corpus_index" in batch:  # text-only lines (--text-corpus): the text tower alone
        corpus_feat = model.encode_text(extra["corpus_tokens"][batch["corpus_index"]].to(image_emb.device),
                                        normalize=False)  # (B_c, D_s)
    with torch.autocast(image_emb.device.type, enabled=False):  # the losses in fp32, also under bf16 autocast
        image_emb, text_feat = image_emb.float(), text_feat.float()
        text_emb = F.normalize(text_feat, dim=-1)  # (B, D_s) T_e
        rank, n = world()
        gathered = {} if n == 1 else dict(image_all=gather(image_emb), text_all=gather(text_emb), offset=rank * len(image_emb))
        terms = {"clip": losses.clip_loss(image_emb, text_emb, model.logit_scale.exp(), **gathered)}
        idx, dev = batch["index"], image_emb.device  # (B / W,) this rank's rows of the data (and of the store)
        if "kclip" in heads:
            kh = heads["kclip"]
            t_txt = extra["t_store"].rows("text", idx).to(dev)  # (B, D_t) L(x)
            soft = kmeans.soft_assign(t_txt, extra["concept_centroids"], args.concept_tau)  # (B, K) s_i
            terms["emb"] = losses.embedding_distill_loss(kh.proj(text_feat), t_txt)
            terms["concept"] = losses.concept_loss(kh.classifier(image_emb), kh.classifier(text_emb), soft)
        if "corpus_index" in batch:  # the same W_e and L_emb, on lines with no image
            terms["corpus"] = losses.embedding_distill_loss(heads["kclip"].proj(corpus_feat.float()),
                                                            extra["corpus_store"].rows("text", batch["corpus_index"]).to(dev))
        if "cid" in heads:
            ch = heads["cid"]
            zi = F.normalize(ch.proj(image_emb), dim=-1)  # (B, D_t) P(I_s)
            zt = F.normalize(ch.proj(text_emb), dim=-1)  # (B, D_t) P(T_s)
            y, C = extra["labels"][idx].to(dev), extra["centroids"]
            kw = dict(s=args.arc_scale, m=args.margin, sample_frac=args.class_frac,
                      generator=step_generator(args.seed, batch["step"], 1) if args.class_frac < 1 else None)
            terms["cd"] = (losses.cluster_loss(zi, C, y, **kw) + losses.cluster_loss(zt, C, y, **kw)) / 2
            every = batch["global_index"]  # the teacher's rows: the whole global batch
            terms["id"] = losses.instance_loss(zi, zt, extra["store"].rows("image", every).to(dev),
                                               extra["store"].rows("text", every).to(dev),
                                               ch.logit_scale.exp(), offset=rank * len(idx))
        return terms


def loss_weights(args):
    return {"clip": args.clip_weight, "emb": args.emb_weight, "concept": args.concept_weight,
            "cd": args.cd_weight, "id": args.id_weight, "corpus": args.corpus_weight}


class Student(nn.Module):
    """The CLIP and its method's heads as one module whose forward gives the loss terms: the unit
    DistributedDataParallel wraps (its gradient all-reduce hooks fire for what forward computed)."""

    def __init__(self, model, heads, extra, args):
        super().__init__()
        self.model, self.heads, self.extra, self.args = model, heads, extra, args

    def forward(self, batch):
        return loss_terms(self.model, self.heads, batch, self.extra, self.args)


# ----------------------------------------------------------------------------------------
# Optimiser, schedule, checkpoints.

def make_optimizer(modules, args, fused=None):
    """AdamW; no weight decay on gains, biases and logit scales (every tensor with < 2 dims).
    On CUDA the fused kernel updates every parameter at once (the default loop launches a
    handful of kernels per tensor, which dominates a small model's step: train.py --bench)."""
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = torch.device(args.device).type == "cuda" if fused is None else fused
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused)


def lr_at(step, args):
    """Linear warmup to --lr, then cosine to zero. A pure function of the step: the
    schedule's whole state is the step counter stored in the checkpoint."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * min(progress, 1.0)))


def finite_weights(*modules):
    return all(torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point())


def save_checkpoint(path, model, heads, optimizer, step, args):
    """Write to a temp file, then rename: a killed run never leaves a half-written ckpt.pt.
    Weights with a NaN or inf are never written (the good checkpoint on disk stays): False then."""
    if not finite_weights(model, heads):
        return False
    state = {"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "model_config": asdict(model.cfg), "config": vars(args),
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with data.atomic(path) as tmp:
        torch.save(state, tmp)
    return True


RESUME_MUST_MATCH = ("method", "model", "data", "seed", "batch_size", "n_train", "vocab_size", "image_size", "dup_frac", "imbalance",
                     "val_frac", "csv_img_key", "csv_caption_key", "csv_key", "store_dtype", "teacher", "clusters", "balance", "balance_threshold",
                     "balance_buckets", "class_frac", "text_teacher", "pool", "concepts", "concept_tau",
                     "text_teacher_init", "text_corpus", "corpus_batch")


def load_for_resume(path, model, heads, optimizer, args):
    ckpt = clip.load_file(path, args.device)
    diff = [k for k in RESUME_MUST_MATCH if ckpt["config"].get(k, getattr(args, k)) != getattr(args, k)]  # absent: older flag
    if diff:
        raise SystemExit("error: cannot resume " + path + ": " + ", ".join(
            f"--{k.replace('_', '-')} was {ckpt['config'].get(k)!r}, now {getattr(args, k)!r}" for k in diff))
    if clip.CLIPConfig(**ckpt["model_config"]).merges != model.cfg.merges:
        raise SystemExit(f"error: cannot resume {path}: the tokenizer learned from the data now differs from the "
                         "checkpoint's (the training captions changed)")
    model.load_state_dict(ckpt["model"])
    heads.load_state_dict(ckpt["heads"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())  # RNG states are CPU tensors, also when loaded onto CUDA
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in ckpt["rng"]["cuda"]])
    return ckpt["step"]


def trim_log(path, step):
    """Drop log lines past the checkpoint's step (a killed run may have logged beyond it)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)


def flop_accounting(student, info):
    """results.json's "flops": the student's training (its first step's FLOPs x steps, every
    rank; None when this call trained no step) and each teacher's: its forward passes over the
    data and its training (None when it was trained elsewhere, e.g. a Hugging Face model).
    "total" counts every teacher in full; a teacher shared by N students costs each
    student + forward + training / N (docs: compute accounting)."""
    out = {"student_training": student}
    for key in ("teacher_flops", "text_teacher_flops"):  # CLIP-CID's CLIP teacher, Knowledge-CLIP's text teacher
        if key in info:
            name = key.replace("_flops", "")
            out[f"{name}_forward"], out[f"{name}_training"] = info[key]["forward"], info[key]["training"]
            out[f"{name}_trained_by_this_run"] = info[key]["trained_by_this_run"]
    known = [v for k, v in out.items() if not k.endswith("by_this_run") and v is not None]
    out["total"] = sum(known) if student is not None else None
    return out


# ----------------------------------------------------------------------------------------
# The loop.

def train(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    rank, n_proc = world()
    main_rank = rank == 0  # writes logs, checkpoints, pictures, results
    if args.batch_size % n_proc:
        raise SystemExit(f"error: with {n_proc} processes, --batch-size must be a multiple of {n_proc} "
                         f"(it is {args.batch_size})")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {args.out} already holds a run; pass --resume to continue it, "
                         f"--overwrite to start afresh, or --out for a new folder")
    for name in args.eval_sets:  # a missing eval set is found now, not after training
        data.check_eval_set(name, args.data_root)
    barrier()  # every rank has looked before rank 0 writes
    os.makedirs(args.out, exist_ok=True)
    stream = ShapesStream(args) if args.data in data.EMBEDDED else RealStream(args)
    model = clip.build(args.model, image_size=args.image_size, merges=stream.merges).to(device)
    n_params = clip.count_params(model)
    say(f"{args.method}: model {args.model} ({n_params / 1e6:.2f}M params), {args.steps} steps x "
          f"{args.batch_size} pairs on {device}{f' x {n_proc} processes' if n_proc > 1 else ''}, data {args.data} -> {args.out}")
    heads, extra, info, dims = nn.ModuleDict(), {}, {}, {}
    rng = torch.get_rng_state()  # loading or training a teacher must not change the student's init
    for method in ("cid", "kclip"):  # kclip+cid: balance first, so that the concepts are those of the pairs trained on
        if method in parts(args.method):
            dims[method], more, more_info = (prepare_cid if method == "cid" else prepare_kclip)(args, stream, device)
            extra.update(more)
            info.update(more_info)
    torch.set_rng_state(rng)
    teacher_flops_info = {k: info.pop(k) for k in ("teacher_flops", "text_teacher_flops") if k in info}
    if "kclip" in dims:
        heads["kclip"] = KCLIPHeads(model.cfg.embed_dim, dims["kclip"], args.concepts).to(device)
    if "cid" in dims:
        heads["cid"] = CIDHeads(model.cfg.embed_dim, dims["cid"]).to(device)
    optimizer = make_optimizer([model, heads], args)
    student = Student(model, heads, extra, args)
    if n_proc > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        start = load_for_resume(ckpt_path, model, heads, optimizer, args)
        if main_rank:
            trim_log(log_path, start)
        say(f"resumed from {ckpt_path} at step {start}")
    else:
        if args.resume:
            say(f"--resume: no checkpoint in {args.out} yet; starting from step 0")
        if os.path.exists(log_path) and main_rank:
            os.remove(log_path)
    weights = loss_weights(args)
    use_amp = device.type == "cuda"
    t_start, seen = time.time(), 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, disable=not main_rank,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    completed = start  # steps whose update is in the weights
    saved = start if args.resume and os.path.exists(ckpt_path) else None  # the step ckpt.pt holds

    def on_disk():  # what a user can go back to
        return (f"{ckpt_path} holds step {saved}: lower --lr and pass --resume (if it stops again at once, the weights "
                f"had diverged before that step: start afresh with --overwrite)") if saved is not None else \
            "no checkpoint was written yet: start again with a lower --lr"

    def save(step_done):  # the checkpoint after `step_done` updates, or a clear stop if the weights are not finite
        nonlocal saved
        if main_rank:
            if not save_checkpoint(ckpt_path, model, heads, optimizer, step_done, args):
                raise SystemExit(f"error: the weights hold NaN or inf after step {step_done}; {on_disk()}")
            saved = step_done

    params = [p for g in optimizer.param_groups for p in g["params"]]
    step_flops_here = None
    try:
        for step in bar:
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {**stream.batch(step), "step": step}
            if "corpus_tokens" in extra:
                batch["corpus_index"] = corpus_index(step, len(extra["corpus_tokens"]), args)
            images, tokens = data.to_input(batch["images"], device), batch["tokens"].to(device)

            def forward_backward():  # -> (loss, terms, the logged values, what went wrong or None)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    terms = student({**batch, "images": images, "tokens": tokens})
                    loss = sum(weights[k] * v for k, v in terms.items())
                values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
                if n_proc > 1:  # what is logged and checked: the mean over ranks = the global batch's loss
                    dist.all_reduce(values)
                    values /= n_proc
                optimizer.zero_grad(set_to_none=True)
                bad = ("loss", values[0]) if not torch.isfinite(values[0]) else None
                if bad is None:
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # the same on every rank
                    bad = ("gradient norm", grad_norm) if not torch.isfinite(grad_norm) else None
                return loss, terms, values, bad
            if step == start:  # the first step counts its FLOPs (results.json: flops)
                (loss, terms, values, bad), step_flops_here = count_flops(forward_backward)
            else:
                loss, terms, values, bad = forward_backward()
            if bad is not None:  # stop before the bad update
                raise SystemExit(f"error: the {bad[0]} became {bad[1].item()} at step {step}, which was not applied; "
                                 f"the checkpoint was left as it was. {on_disk()}")
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # exp(t) stays in [1, 100]
                if "cid" in heads:
                    heads["cid"].logit_scale.clamp_(0, math.log(100))
            completed = step + 1
            seen += len(tokens) * n_proc
            rate = seen / (time.time() - t_start)
            if main_rank and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                record = {"step": step + 1, "lr": lr, "loss": values[0].item(), **dict(zip(terms, values[1:].tolist())),
                          "logit_scale": model.logit_scale.exp().item(), "samples_per_s": rate,
                          "skipped": batch["skipped"]}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{values[0].item():.3f}", lr=f"{lr:.1e}", sps=f"{rate:.0f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
                save(step + 1)
    except KeyboardInterrupt:
        bar.close()
        save(completed)
        raise SystemExit(f"interrupted at step {completed}: saved {ckpt_path}; continue with --resume") from None
    bar.close()
    seconds = time.time() - t_start
    if not main_rank:
        barrier()  # wait for rank 0's evaluation and results.json
        return None
    results = {"method": args.method, "model": args.model, "params": n_params, "steps": args.steps,
               "batch_size": args.batch_size, "seed": args.seed, "data": args.data,
               "seconds": round(seconds, 1), "samples_per_second": round(seen / seconds, 1) if seen else None,
               "skipped_pairs": stream.skipped, "data_fingerprint": stream.fingerprint,
               "flops": flop_accounting(step_flops_here * n_proc * args.steps if start < args.steps else None,
                                            teacher_flops_info), **info}
    results.update(evaluation.evaluate(model, args, device, stream.pairs))
    evaluation.plot_curves({args.method: evaluation.read_log(args.out)}, os.path.join(args.out, "curves.png"))
    if "kclip" in parts(args.method) and args.data in data.EMBEDDED:  # teacher vs student text space, by concept
        sample = stream.pool[:2000]
        student_text = evaluation.embed_texts(model, [stream.ds.captions[i] for i in sample], device)
        teacher_text = extra["t_store"].rows("text", sample)
        evaluation.plot_text_pca({"teacher L(x)": teacher_text, "student T_e": student_text},
                                 kmeans.assign(teacher_text, extra["concept_centroids"].cpu(), spherical=True)[0],
                                 os.path.join(args.out, "text_pca.png"))
    write_json(os.path.join(args.out, "results.json"), results)
    print(json.dumps(results, indent=2))
    barrier()
    return results


# ----------------------------------------------------------------------------------------
# The reproduction sweep: every row of the README's results table, for 3 seeds, with the same
# student, data, steps and evaluation. A run whose results.json exists is not run again, so a
# killed sweep continues where it stopped (the interrupted run resumes from its checkpoint).

SWEEP = [  # (folder, row of the table, flags, EM text probe?)
    ("clip", "CLIP", ["--method", "clip"], True),
    ("kclip", "Knowledge-CLIP", ["--method", "kclip"], True),
    ("cid", "CLIP-CID (balanced set)", ["--method", "cid"], True),
    ("cid-full", "CLIP-CID, full set (no balance)", ["--method", "cid", "--no-balance"], False),
    ("cid-own", "CLIP-CID, teacher trained on the student's data (--teacher own)", ["--method", "cid", "--teacher", "own"],
     False),
    ("kclip-cid", "Knowledge-CLIP + CLIP-CID, both teachers", ["--method", "kclip+cid"], True),
    # controls (papers.md section 3): without them a gain cannot be read as what the paper claims
    ("kclip-random", "Knowledge-CLIP, random-init text teacher", ["--method", "kclip", "--text-teacher-init", "random"], True),
    ("kclip-alpha0", "Knowledge-CLIP, alpha = 0 (no L_emb)", ["--method", "kclip", "--emb-weight", "0"], True),
    ("kclip-beta0", "Knowledge-CLIP, beta = 0 (no concept KL)", ["--method", "kclip", "--concept-weight", "0"], True),
    # beyond the paper: distil the teacher on text-only lines that hold the never-seen words too
    ("kclip-corpus", "Knowledge-CLIP + text corpus", ["--method", "kclip", "--text-corpus"], True),
    ("kclip-random-corpus", "Knowledge-CLIP + text corpus, random-init teacher",
     ["--method", "kclip", "--text-corpus", "--text-teacher-init", "random"], True),
    ("cid-cd", "CLIP-CID, cluster term alone", ["--method", "cid", "--id-weight", "0"], False),
    ("cid-id", "CLIP-CID, instance term alone", ["--method", "cid", "--cd-weight", "0"], False),
    # --steps: equal_compute_steps, the pretrained teacher counted in full / shared by every CLIP-CID student of the sweep
    ("clip-equal", "CLIP, equal total compute (teacher counted in full)", ["--method", "clip"], False),
    ("clip-equal-shared", "CLIP, equal total compute (teacher shared by the sweep's students)", ["--method", "clip"], False),
    ("clip-pool", "CLIP on the teacher's pretraining pool", ["--method", "clip", *PRETRAIN_POOL], False),
]
SHARING = [f for f, _, flags, _ in SWEEP if "cid" in " ".join(flags) and "own" not in flags]  # rows of the pretrained teacher
SWEEP_FLAGS = ("preset", "model", "steps", "batch_size", "lr", "warmup", "n_train", "n_eval", "image_size",
               "teacher_steps", "device")
TABLE = [  # (results.json key, column)
    ("zero_shot_top1", "zero-shot seen"), ("zero_shot_unseen_top1", "zero-shot unseen"),
    ("linear_probe_top1", "linear probe"), ("retrieval_i2t_r1", "R@1 i2t"), ("retrieval_t2i_r1", "R@1 t2i"),
    ("zero_shot_by_attributes_top1", "attributes seen"), ("zero_shot_by_attributes_unseen_top1", "attributes unseen"),
    ("text_em", "EM"), ("params", "params"), ("steps", "steps"), ("seconds", "train s"),
]
TIER_TABLE = [  # the vocabulary tiers (data.WORDS): zero-shot with prompts in each tier, text-space probe
    ("zero_shot_top1", "zero-shot, common words"), ("zero_shot_rare_words_top1", "zero-shot, rare words"),
    ("zero_shot_never_words_top1", "zero-shot, never-seen words"), ("text_probe_common", "probe, common"),
    ("text_probe_rare", "probe, rare"), ("text_probe_never", "probe, never-seen"),
]


def clip_step_loss(model, batch, device):
    """The CLIP loss of a batch, the student's step without a method's extras (bench, FLOPs)."""
    image = model.encode_image(data.to_input(batch["images"], device))  # (B, D)
    text = model.encode_text(batch["tokens"].to(device))  # (B, D)
    return losses.clip_loss(image, text, model.logit_scale.exp())


def step_flops(model, batch, train_step=True):
    """FLOPs of one forward (+ backward if train_step) of the CLIP loss on a batch, counted by
    torch's FlopCounterMode (matmuls, convolutions and attention; elementwise work is not counted)."""
    def run():
        with torch.set_grad_enabled(train_step):
            loss = clip_step_loss(model, batch, next(model.parameters()).device)
            if train_step:
                loss.backward()
    return count_flops(run)[1]


def bench(args, steps=20):
    """Time the student's training step (CLIP loss, AdamW) on real batches of the preset: a naive
    version (textbook attention over every context position, fp32), then each optimisation in
    turn; the towers apart; FLOP/s against this device's own measured matmul peak."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    stream = ShapesStream(args)
    batches = [stream.batch(i) for i in range(steps + 3)]
    model = clip.build(args.model, image_size=args.image_size, merges=stream.merges).to(device)
    byte_model = clip.build(args.model, image_size=args.image_size).to(device)  # the same, on bytes alone
    byte_batches = [{**b, "tokens": byte_model.tokenize([stream.ds.captions[int(i)] for i in b["index"]])} for b in batches]
    cuda = device.type == "cuda"
    optimizers = {(m, fused): make_optimizer([m], args, fused=fused) for m in (model, byte_model)
                  for fused in ([False, True] if cuda else [False])}
    blocks = [m for net in (model, byte_model) for m in net.modules() if isinstance(m, clip.Block)]

    def seconds_per_step(fn, batches=batches):  # fn(batch) for 3 warmup batches, then the mean over `steps` batches
        for b in batches[:3]:
            fn(b)
        sync()
        t = time.time()
        for b in batches[3:]:
            fn(b)
        sync()
        return (time.time() - t) / steps

    def train_step(net, batch, amp, optimizer):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = clip_step_loss(net, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # each model's FLOPs (padding columns cut): what MFU counts
    flops = {True: step_flops(model, batches[0]), False: step_flops(byte_model, byte_batches[0])}
    # (name, byte-pair tokens, fused attention, padding cut, bf16, fused AdamW)
    variants = [("naive: byte tokens, textbook attention, all 64 text positions, fp32", False, False, False, False, False),
                ("+ fused attention (scaled_dot_product_attention)", False, True, False, False, False),
                ("+ unused padding columns cut", False, True, True, False, False),
                (f"+ byte-pair tokens (--vocab-size {args.vocab_size}): ours" + (" on CPU" if cuda else ""),
                 True, True, True, False, False)]
    if cuda:
        variants += [("+ bf16 autocast", True, True, True, True, False),
                     ("+ fused AdamW: ours on GPU", True, True, True, True, True)]
    peak = {}
    n = 8192 if cuda else 1024
    for dtype in ([torch.float32] + ([torch.bfloat16] if cuda else [])):
        a = torch.randn(n, n, device=device, dtype=dtype)
        peak[dtype] = 2 * n ** 3 / seconds_per_step(lambda _: a @ a)
    print(f"bench: {args.model} student, batch {args.batch_size}, {steps} steps, {device}"
          f"{f' ({torch.get_num_threads()} threads)' if not cuda else ''}; "
          f"{flops[True] / 1e9:.1f} GFLOP per step ({flops[False] / 1e9:.1f} on byte tokens); matmul peak measured here "
          + ", ".join(f"{str(d).split('.')[-1]} {p / 1e12:.2f} TFLOP/s" for d, p in peak.items()))
    print("| step | ms | samples/s | vs naive | TFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|")
    base = None
    for name, bpe, fused, trim, amp, fused_adam in variants:
        for b in blocks:
            b.fused = fused
        net, data_ = (model, batches) if bpe else (byte_model, byte_batches)
        net.text.trim = trim
        t = seconds_per_step(lambda b: train_step(net, b, amp, optimizers[net, fused_adam]), data_)
        base = base or t
        rate = flops[bpe] / t
        print(f"| {name} | {1000 * t:.1f} | {args.batch_size / t:.0f} | {base / t:.2f}x | {rate / 1e12:.3f} | "
              f"{100 * rate / peak[torch.bfloat16 if amp else torch.float32]:.0f}% |")
    for name, tower, key, data_ in (("image", model.encode_image, "images", batches),
                                    ("text, byte tokens", byte_model.encode_text, "tokens", byte_batches),
                                    ("text, byte-pair tokens", model.encode_text, "tokens", batches)):
        prep = (lambda b: data.to_input(b, device)) if key == "images" else (lambda b: b.to(device))
        t = seconds_per_step(lambda b: tower(prep(b[key])).sum().backward(), data_)
        length = np.mean([float(b["tokens"].ne(clip.PAD).sum(1).float().mean()) for b in data_]) if key == "tokens" else None
        print(f"{name} tower forward + backward alone: {1000 * t:.1f} ms"
              + (f" ({length:.1f} tokens per caption)" if length else ""))


def equal_compute_steps(args, students=1):
    """Student steps whose FLOPs equal CLIP-CID's whole pipeline: training the teacher (--teacher
    pretrained: its manifest's FLOPs; own: --teacher-steps), split over the `students` that share
    it, embedding the training set with it once, and the student's own --steps (its projector
    and losses are < 0.1% of a step and not counted)."""
    stream = ShapesStream(args)
    batch = stream.batch(0)
    student = clip.build(args.model, image_size=args.image_size, merges=stream.merges)
    pretrained = (args.teacher or "pretrained") == "pretrained"  # a clip row of the sweep names no teacher: the default's
    teacher = clip.build("teacher", image_size=args.image_size, merges=() if pretrained else stream.merges)
    f_student = step_flops(student, batch)
    batch = {**batch, "tokens": teacher.tokenize([stream.ds.captions[int(i)] for i in batch["index"]])}  # the teacher's
    training = (teachers.check_pretrained()["flops"]["student_training"] if pretrained
                else args.teacher_steps * step_flops(teacher, batch))
    teacher_total = training / students + args.n_train / args.batch_size * step_flops(teacher, batch, False)
    return math.ceil(args.steps + teacher_total / f_student)


def sweep_em(run_dir, root, cfg, steps):
    """EM % of a run's text tower, through the seed's autoencoder (trained once, kept in root)."""
    model = clip.load_checkpoint(run_dir, cfg.device)[0]
    train_caps, test = evaluation.distinct_splits(*evaluation.em_captions(vars(cfg)))
    ae = evaluation.cached_autoencoder(os.path.join(root, f"em-autoencoder-s{cfg.seed}.pt"), train_caps, cfg.seed,
                                       steps[0], cfg.device)
    em = lambda encode: evaluation.em_of(ae, encode, train_caps, test, steps[1], seed=cfg.seed, device=cfg.device)
    path = os.path.join(root, f"em-reference-s{cfg.seed}.json")  # the autoencoder and the text teacher, once per seed
    if not os.path.exists(path):
        teacher = teachers.load_text_teacher(cfg.text_teacher, cfg.device, cfg.pool, cfg.trust_remote_code)
        ref = {"proof of concept": evaluation.em_poc(ae, test), f"text teacher {teacher.name}": em(
            lambda caps: evaluation.in_batches(teacher.encode_texts, caps))}
        write_json(path, ref)
    return em(lambda caps: evaluation.embed_texts(model, caps, cfg.device))


def sweep_flags(args):
    """The flags every run of the sweep shares, as given to (or defaulted by) this call."""
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SWEEP_FLAGS]


def sweep(args):
    """Train, evaluate and EM-probe every SWEEP row for every seed, then write the table."""
    root, t0, base = args.out, time.time(), sweep_flags(args)
    os.makedirs(root, exist_ok=True)
    spec_path, spec = os.path.join(root, "sweep.json"), {"flags": base, "em_steps": args.em_steps}
    if os.path.exists(spec_path) and read_json(spec_path) != spec:
        raise SystemExit(f"error: the sweep in {root} was made with {read_json(spec_path)}, not {spec}; pass another --out")
    write_json(spec_path, spec)
    tiers_path = os.path.join(root, "text-teacher-tiers.json")  # the text teacher's own synonym matching
    if not os.path.exists(tiers_path):
        teacher = teachers.load_text_teacher(args.text_teacher, args.device, args.pool, args.trust_remote_code)
        write_json(tiers_path, {"name": teacher.name, **{f"text_probe_{k}": v for k, v in evaluation.tier_probe(
            lambda t: evaluation.in_batches(teacher.encode_texts, t)).items()}})
    for folder, row, flags, em in SWEEP:
        if args.rows and folder not in args.rows:
            continue
        for seed in args.seeds:
            out = os.path.join(root, f"{folder}-s{seed}")
            res_path = os.path.join(out, "results.json")
            if os.path.exists(res_path) and not (em and "text_em" not in read_json(res_path)):
                continue  # finished: nothing to redo
            argv = base + flags + ["--seed", str(seed)]
            if folder.startswith("clip-equal"):
                students = 1 if folder == "clip-equal" else len(SHARING) * len(args.seeds)
                argv += ["--steps", str(equal_compute_steps(parse_args(argv), students))]
            run = parse_args(argv + ["--out", out, "--resume"])
            if not os.path.exists(res_path):
                print(f"\nsweep: {row}, seed {seed} -> {out}")
                start = time.time()
                res = train(run)
                write_json(res_path, {**res, "wall_seconds": round(time.time() - start, 1)})
            res = read_json(res_path)
            if em and "text_em" not in res:
                write_json(res_path, {**res, "text_em": sweep_em(out, root, run, args.em_steps)})
            write_table(root, args)
    write_table(root, args)
    first = {row: os.path.join(root, f"{folder}-s{args.seeds[0]}") for folder, row, _, _ in SWEEP[:3]}
    evaluation.plot_curves({row: evaluation.read_log(d) for row, d in first.items() if os.path.isdir(d)},
                           os.path.join(root, "curves.png"))
    print(f"sweep: done in {(time.time() - t0) / 60:.1f} min (this call); table in {root}/table.md")


def mean_std(values):
    """(mean, sample standard deviation) of a list; std 0 for a single value."""
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def write_table(root, args):
    """root/table.json (every value per seed, mean, std) and root/table.md (mean ± std; '(n=k)'
    when fewer seeds than asked have finished; train s = the training loop alone). A run's
    results.json is read with its eval.json, if any, on top."""
    rows, wall = {}, 0.0
    teacher_dirs = [default_teacher_dir(parse_args(sweep_flags(args) + ["--seed", str(s)])) for s in args.seeds]
    sources = [("CLIP-CID own-data teacher (--teacher own)", teacher_dirs)]
    sources += [(row, [os.path.join(root, f"{folder}-s{s}") for s in args.seeds]) for folder, row, _, _ in SWEEP]
    if os.path.exists(teachers.MANIFEST):  # one teacher for every seed: no std
        manifest = read_json(teachers.MANIFEST)
        rows["CLIP-CID pretrained teacher (weights/)"] = {k: {"values": [manifest["results"][k]], "seedless": True}
                                                          for k, _ in TABLE + TIER_TABLE if k in manifest["results"]}
    for row, dirs in sources:
        found = []
        for d in dirs:
            if os.path.exists(os.path.join(d, "results.json")):
                found.append(read_json(os.path.join(d, "results.json")))
                if os.path.exists(os.path.join(d, "eval.json")):  # re-evaluated later by `python eval.py --ckpt DIR`
                    found[-1].update(read_json(os.path.join(d, "eval.json")))
                wall += found[-1].get("wall_seconds", 0.0)  # the whole run: teacher, training, evaluation, EM
        if found:
            rows[row] = {key: {"values": [r[key] for r in found if key in r]} for key, _ in TABLE + TIER_TABLE}
    for s in args.seeds:  # the EM probe's references, per seed
        path = os.path.join(root, f"em-reference-s{s}.json")
        for name, value in (read_json(path) if os.path.exists(path) else {}).items():
            rows.setdefault(f"EM reference: {name}", {"text_em": {"values": []}})["text_em"]["values"].append(value)
    tiers_path = os.path.join(root, "text-teacher-tiers.json")
    if os.path.exists(tiers_path):  # the text teacher in its own space: one value, no seed
        ref = read_json(tiers_path)
        name = ref.pop("name")
        rows[f"text teacher {name}, its own space"] = {k: {"values": [v], "seedless": True} for k, v in ref.items()}
    for cells in rows.values():
        for cell in cells.values():
            if cell["values"]:
                cell["mean"], cell["std"] = mean_std(cell["values"])
    write_json(os.path.join(root, "table.json"), {"seeds": args.seeds, "rows": rows})

    def show(key, cell):
        if not cell or not cell["values"]:
            return "-"
        if key in ("params", "steps"):
            return f"{cell['mean'] / 1e6:.2f}M" if key == "params" else f"{cell['mean']:.0f}"
        many = len(cell["values"]) > 1 and key != "seconds"
        text = f"{cell['mean']:.1f} ± {cell['std']:.1f}" if many else f"{cell['mean']:.{0 if key == 'seconds' else 1}f}"
        return text + (f" (n={len(cell['values'])})" if len(cell["values"]) < len(args.seeds) and "seedless" not in cell else "")
    def markdown(columns):  # the rows with a value in these columns
        lines = ["| | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        return "\n".join(lines + [f"| {row} | " + " | ".join(show(k, cells.get(k)) for k, _ in columns) + " |"
                                  for row, cells in rows.items() if any(cells.get(k, {}).get("values") for k, _ in columns)])
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(f"mean ± std over seeds {' '.join(map(str, args.seeds))} (sample std); the sweep's runs took "
                f"{wall / 60:.0f} min of wall time\n\n{markdown(TABLE)}\n\nVocabulary tiers (zero-shot on seen "
                f"combinations, prompts in each tier's words; probe: nearest common word right, %)\n\n"
                f"{markdown(TIER_TABLE)}\n")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda"):  # cuDNN's attention plans a kernel per shape: the text length changes per batch
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.sweep:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("error: run --sweep in one process (it runs its rows one after another)")
    else:
        init_distributed(args)
    try:
        if args.bench:
            return bench(args)
        if args.pretrain_teacher:
            return pretrain_teacher(args)
        return sweep(args) if args.sweep else train(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
