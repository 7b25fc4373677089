"""Train a CLIP: `python train.py --method clip | kclip | cid | kclip+cid`.

What a run does, in order (`train`, at the end of this file):
1. its batches (`make_stream`): the embedded shapes drawn from --seed, or your CSV / webdataset
   pairs, and a byte-pair tokenizer learned from their captions;
2. the method's preparation, once: a frozen teacher embeds every pair into the teacher store;
   Knowledge-CLIP clusters its text teacher's caption embeddings into concepts (losses.prepare_kclip),
   CLIP-CID removes near-duplicate images and clusters its teacher's image embeddings (prepare_cid);
3. the loop: each batch's loss terms (losses.loss_terms: where the methods differ), one AdamW
   update (losses.train_step: clip.lr_at's warmup + cosine, clipping, the logit-scale clamp, bf16 autocast on CUDA,
   no update from a NaN or inf), DIR/log.jsonl, checkpoints that resume bit for bit;
4. the evaluation (eval.py) into DIR/results.json, and pictures.
`torchrun --nproc_per_node N train.py ...` runs the same loop on N processes (`init_distributed`).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import clip
import data
import eval as evaluation
import losses
import teachers

# Presets: what a run does when you give no flags. `cpu` finishes in minutes on 2 cores;
# `gpu` is the reduced-scale run for one GPU. Every field is also a flag.
PRESETS = {
    "cpu": dict(model="small", steps=500, batch_size=256, lr=2e-3, warmup=50, n_train=20000, vocab_size=1024,
                teacher_model="teacher", teacher_steps=600),
    "gpu": dict(model="vit-s-4", steps=10000, batch_size=2048, lr=1e-3, warmup=500, n_train=400000, vocab_size=4096,
                teacher_model="vit-b-4", teacher_steps=10000),
}  # teacher_*: --teacher own (the gpu preset's default) trains a teacher of that size on the student's data first
METHODS = ["clip", "kclip", "cid", "kclip+cid"]  # kclip+cid: both teachers at once (beyond both papers)
PRESET = "(preset)"  # a default taken from PRESETS
# Every flag, grouped as a reader meets them: (flag, default, help[, argparse keywords]); the type is the default's,
# False: a switch. `--help` prints each one's value for this run; docs/training.md says more about each.
FLAGS = {
    "run": [
        ("--method", "clip", "the losses (kclip+cid: both teachers)", dict(choices=METHODS)),
        ("--device", "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:1, ..."),
        ("--preset", None, "where the (preset) defaults come from: gpu on CUDA, else cpu", dict(choices=list(PRESETS))),
        ("--seed", 0, "draws the data, the initialisation and the batch order"),
        ("--out", None, "run folder; default runs/METHOD-MODEL-sSEED (then -2, -3, ... if taken)"),
        ("--resume", False, "continue the run in --out from its checkpoint"),
        ("--overwrite", False, "start afresh even if --out holds a run"),
        ("--log-every", 10, "steps between lines of DIR/log.jsonl"),
        ("--ckpt-every", 100, "steps between checkpoints (DIR/ckpt.pt)"),
        ("--eval-split", "test", "val: the embedded set's validation split alone, to choose settings on",
         dict(choices=["test", "val"])),
        ("--eval-sets", [], "torchvision sets under --data-root: " + ", ".join(evaluation.EVAL_SETS), dict(nargs="*")),
        ("--data-root", os.path.expanduser("~/.cache/clip-distill"), "where eval sets live"),
        ("--store", os.path.join("runs", "store"), "root of the teacher store (kclip, cid)"),
        ("--store-dtype", "float16", "teacher rows on disk", dict(choices=["float16", "float32"])),
        ("--trust-remote-code", False, "allow a Hugging Face teacher's own code"),
        ("--compile", False, "torch.compile the student's forward (for CUDA: docs/gpu_check.sh measures both)"),
        ("--vs-clip", True, "end beside plain CLIP on the same data and seed (trained once, kept beside the run)",
         dict(action=argparse.BooleanOptionalAction)),
    ],
    "model and optimiser": [
        ("--model", PRESET, "the student's size (clip.SIZES)", dict(choices=list(clip.SIZES))),
        ("--image-size", None, "the model's by default", dict(type=int)),
        ("--vocab-size", PRESET, "byte-pair tokenizer ids, learned from the training captions; 259: bytes alone"),
        ("--steps", PRESET, "optimizer steps"),
        ("--batch-size", PRESET, "pairs per step, over all processes"),
        ("--lr", PRESET, "peak learning rate (AdamW)"),
        ("--warmup", PRESET, "steps of linear warmup, then cosine to 0"),
        ("--weight-decay", 0.1, "on tensors of 2 or more dims only"),
        ("--grad-clip", 1.0, "largest gradient norm"),
        ("--clip-weight", 1.0, "weight of the CLIP loss (Knowledge-CLIP's gamma)"),
    ],
    "data: 'shapes' (embedded), 'shapes-pretrain' (the teacher's pool), a .csv/.tsv or tar shards": [
        ("--data", "shapes", "'shapes', 'shapes-pretrain', FILE.csv or 'dir/cc3m-{00000..00331}.tar'"),
        ("--n-train", PRESET, "shapes: training pairs generated"),
        ("--n-eval", 2000, "shapes: test pairs (probe 2x, val 0.5x)"),
        ("--dup-frac", 0.3, "shapes: near-duplicate fraction"),
        ("--imbalance", 0.8, "shapes: Zipf exponent of class frequency"),
        ("--val-frac", 0.02, "yours: held-out pairs (by key: the same every seed)"),
        ("--train-frac", 1.0, "yours: train on this part of the other pairs (by key)"),
        ("--csv-img-key", "filepath", "CSV column of the image paths"),
        ("--csv-caption-key", "title", "CSV column of the captions"),
        ("--csv-label-key", None, "CSV column of class names: zero-shot and a probe over them"),
        ("--csv-key", None, "CSV column of a stable sample key (default: the image path)"),
        ("--workers", min(8, os.cpu_count() or 2), "DataLoader workers (default: this machine's cores, at most 8)"),
    ],
    "Knowledge-CLIP (--method kclip)": [
        ("--text-teacher", teachers.DEFAULT_TEXT_TEACHER, "Hugging Face model name or folder, e.g. meta-llama/Llama-2-7b-hf"),
        ("--pool", "mean", "text teacher pooling over tokens", dict(choices=["mean", "last"])),
        ("--text-teacher-init", "pretrained", "random: the same architecture freshly initialised, a control",
         dict(choices=["pretrained", "random"])),
        ("--concepts", 64, "K of the k-means on the text teacher's caption embeddings"),
        ("--concept-tau", 0.05, "temperature tau_c of the soft concept labels"),
        ("--emb-weight", 1.0, "alpha, weight of the text embedding distillation"),
        ("--standardise-target", False, "beyond the paper: L_emb's target standardised per dimension, on training captions"),
        ("--concept-weight", 0.01, "beta, weight of the concept KL loss"),
        ("--text-corpus", None, "beyond the paper: also distil on text-only lines, a file or 'shapes' (the default)",
         dict(nargs="?", const="shapes", metavar="PATH")),
        ("--corpus-weight", 1.0, "weight of L_emb on the text-only batch"),
        ("--corpus-batch", 128, "text-only lines per step"),
    ],
    "CLIP-CID (--method cid)": [
        ("--teacher", None, "'pretrained' (weights/, for shapes), 'own' (trained here first: other data), a run folder "
                            "or a Hugging Face CLIPModel"),
        ("--teacher-model", PRESET, "size of --teacher own (clip.SIZES)", dict(choices=list(clip.SIZES))),
        ("--teacher-steps", PRESET, "steps of --teacher own"),
        ("--clusters", 64, "K of the k-means on teacher image embeddings"),
        ("--balance", True, "image semantic balance", dict(action=argparse.BooleanOptionalAction)),
        ("--balance-threshold", None, "cosine at or above which two images are duplicates (0.99: our former default; "
                                      "the paper gives none); default: the --balance-copies rule", dict(type=float)),
        ("--balance-copies", 0.9, "the rule: this quantile of the teacher's cos(image, its light copy)"),
        ("--balance-buckets", None, "search within k-means buckets (default: exact below 200,000 pairs)", dict(type=int)),
        ("--cd-weight", 1.0, "weight of the cluster discrimination loss"),
        ("--id-weight", 1.0, "weight of the instance discrimination loss"),
        ("--margin", 0.3, "ArcFace additive angular margin m"),
        ("--arc-scale", 32.0, "ArcFace scale s"),
        ("--class-frac", 1.0, "partial class sampling: fraction of negative clusters kept"),
    ],
}
# Which flags decide what: each list is read by every place that needs it (resume, the own
# teacher's folder and command, the reproduction's runs).
DATA_KEYS = ("data", "seed", "n_train", "dup_frac", "imbalance", "image_size", "val_frac", "train_frac",
             "csv_img_key", "csv_caption_key", "csv_key")  # the pairs a run trains on
METHOD_KEYS = ("method", "teacher", "clusters", "balance", "balance_threshold", "balance_copies", "balance_buckets",
               "class_frac", "text_teacher", "pool", "concepts", "concept_tau", "text_teacher_init", "text_corpus",
               "corpus_batch", "standardise_target")
RESUME_MUST_MATCH = ("model", "batch_size", "vocab_size", "store_dtype", *DATA_KEYS, *METHOD_KEYS)
PHASES = ("data", "teacher", "teacher_store", "balance", "kmeans", "loop", "eval")  # results.json phase_seconds
RUN_KEYS = ("preset", "n_eval", "eval_split", "csv_label_key", "vocab_size", "workers", "device", "store",
            "store_dtype")  # how, where, evaluated on what


def flags(args, keys):  # the command-line flags that give these keys their values in args
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):  # each flag's value; none for an unset one
    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == []
        return action.help if unset else super()._get_help_string(action)


def parse_args(argv=None):
    """The flags (FLAGS), their defaults those this run will use (the preset's: gpu on CUDA, else cpu;
    the model's image size; the teacher that suits the data), checked (check_args)."""
    first = argparse.ArgumentParser(add_help=False)  # what the other defaults depend on
    for flag in ("--device", "--preset", "--model", "--data"):
        first.add_argument(flag)
    known = first.parse_known_args(argv)[0]
    device = known.device or FLAGS["run"][1][1]
    preset = known.preset if known.preset in PRESETS else ("gpu" if device.startswith("cuda") else "cpu")
    model = known.model if known.model in clip.SIZES else PRESETS[preset]["model"]
    chosen = {"preset": preset, "image_size": clip.SIZES[model].image_size,
              "teacher": "pretrained" if (known.data or "shapes") == "shapes" and preset == "cpu" else "own"}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=ShowDefaults,
                                epilog="The reproduction: python docs/reproduce.py --help. The step bench: python docs/bench.py.")
    for group, rows in FLAGS.items():
        g = p.add_argument_group(group)
        for flag, default, help_text, *more in rows:
            key, kw = flag[2:].replace("-", "_"), dict(*more)
            default = PRESETS[preset][key] if default is PRESET else chosen.get(key, default)
            if default is False:
                kw["action"] = "store_true"
            elif not {"action", "nargs", "type"} & set(kw) and default is not None:
                kw["type"] = type(default)
            g.add_argument(flag, default=default, help=help_text + (f" {PRESET}" if key in PRESETS[preset] else ""), **kw)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists the flags)\n")  # no usage dump
    args = p.parse_args(argv)
    check_args(args, p.error)
    if "cid" not in parts(args.method):
        args.teacher = None  # no CLIP teacher
    if args.out is None:  # the default folder; a finished or broken run there is kept, not reused
        base = args.out = os.path.join("runs", f"{args.method}-{args.model}-s{args.seed}")
        k = 1
        while os.path.exists(os.path.join(args.out, "ckpt.pt")) and not (args.resume or args.overwrite):
            k += 1
            args.out = f"{base}-{k}"
    return args


def check_args(a, error):
    """What argparse cannot see alone; the first that fails ends the run with one line (error)."""
    patch, processes = clip.SIZES[a.model].patch_size, int(os.environ.get("WORLD_SIZE", "1"))
    small = [k for k in ("steps", "batch_size", "n_train", "n_eval", "log_every", "ckpt_every", "image_size")
             if getattr(a, k) < 1]
    unknown = [s for s in a.eval_sets if s not in evaluation.EVAL_SETS]
    for bad, message in [
        (a.image_size % patch, f"--image-size {a.image_size} is not a multiple of --model {a.model}'s patch size {patch}"),
        (a.vocab_size < clip.N_BASE, f"--vocab-size must be at least {clip.N_BASE} (the bytes and 3 special ids), "
                                     f"got {a.vocab_size}"),
        (small, small and f"--{small[0].replace('_', '-')} must be at least 1, got {getattr(a, small[0])}"),
        (a.batch_size < 2, "--batch-size must be at least 2: the contrastive loss needs negatives"),
        (not (a.lr > 0 and 0 <= a.val_frac < 1 and 0 <= a.dup_frac < 1 and 0 < a.train_frac <= 1),
         "need --lr > 0, 0 <= --val-frac < 1, 0 < --train-frac <= 1 and 0 <= --dup-frac < 1"),
        (a.eval_split == "val" and (a.data not in data.EMBEDDED or a.eval_sets), "--eval-split val is the embedded "
         "set's validation split alone: not for your own data (its held-out pairs are --val-frac), nor with --eval-sets"),
        (a.train_frac < 1 and a.data in data.EMBEDDED,
         "--train-frac is for your own data; --n-train sets how many embedded pairs a run trains on"),
        (unknown, f"--eval-sets {' '.join(unknown)}: unknown; choose from {', '.join(evaluation.EVAL_SETS)} (the "
                  "attribute sets cub, awa2: python docs/attributes.py)"),
        (a.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {a.device}: CUDA is not available here"),
        (a.text_corpus and "kclip" not in parts(a.method),
         "--text-corpus distils the text teacher: it needs --method kclip or kclip+cid"),
        (a.corpus_batch < 1 or a.corpus_batch % processes,
         "--corpus-batch must be at least 1 and a multiple of the number of processes"),
        (a.concepts < 1 or not a.concept_tau > 0, "need --concepts >= 1 and --concept-tau > 0"),
        (a.clusters < 1 or not 0 < a.class_frac <= 1 or not -1 <= (a.balance_threshold or 0) <= 1
         or not 0 < a.balance_copies < 1,
         "need --clusters >= 1, 0 < --class-frac <= 1, -1 <= --balance-threshold <= 1 and 0 < --balance-copies < 1"),
        (a.teacher == "pretrained" and a.data != "shapes" and "cid" in parts(a.method),
         f"--teacher pretrained knows the embedded shapes only; for --data {a.data} pass --teacher own (trained on "
         "it first), a run folder of ours or a Hugging Face CLIP")]:
        if bad:
            error(message)


def make_stream(args):
    """The batches of this run: the embedded set drawn from its flags, or your pairs read by row."""
    context = clip.SIZES[args.model].context_length
    if args.data in data.EMBEDDED:
        return data.ShapesStream(teachers.embedded_set(vars(args), args.store), args.batch_size, args.seed,
                                 args.vocab_size, context)
    pairs = data.real_pairs(args.data, args.image_size, args.csv_img_key, args.csv_caption_key, args.csv_key,
                            os.path.join(args.store, "scans"), args.csv_label_key)
    return data.RealStream(pairs, args.batch_size, args.seed, args.vocab_size, context, args.val_frac, args.train_frac,
                           args.workers, pin_memory=args.device.startswith("cuda"))


def loss_config(args):  # the flags that losses.loss_terms reads
    return losses.LossConfig({"clip": args.clip_weight, "emb": args.emb_weight, "concept": args.concept_weight,
                              "cd": args.cd_weight, "id": args.id_weight, "corpus": args.corpus_weight},
                             args.concept_tau, args.arc_scale, args.margin, args.class_frac, args.seed)


def say(message):
    if data.world()[0] == 0:
        print(message)


def parts(method):  # "kclip+cid" -> ["kclip", "cid"]: the methods whose terms a run adds
    return method.split("+")


def default_teacher_dir(args):  # --method cid's teacher (the method's preparation: losses.prepare_kclip, prepare_cid)
    """Where --teacher own keeps the teacher of this data and recipe: runs/teacher-PRESET-DATA-<hash of the data
    keys, the tokenizer and the teacher's steps>."""
    name = args.data if args.data in data.EMBEDDED else teachers.data_name(args.data, None)
    recipe = {k: getattr(args, k) for k in (*DATA_KEYS, "vocab_size", "teacher_steps")}
    if args.teacher_model != "teacher":  # (the cpu preset's teachers keep the folders they were trained in)
        recipe["teacher_model"] = args.teacher_model
    return os.path.join("runs", f"teacher-{args.preset}-{name}-"
                                f"{hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]}")


def train_own_teacher(args, stream, tdir):
    """--teacher own, the first time: `--method clip --model TEACHER_MODEL` on this data, into tdir (teachers.clip_teacher)."""
    say(f"cid: no teacher for this data and preset in {tdir}; training it first ({args.teacher_steps} steps)")
    batch = PRESETS[args.preset]["batch_size"]  # the preset's; the student's if the data holds fewer pairs
    batch = batch if len(stream.pool) >= batch else args.batch_size
    train(parse_args(["--method", "clip", "--model", args.teacher_model, "--steps", str(args.teacher_steps), "--batch-size",
                      str(batch), *flags(args, DATA_KEYS + RUN_KEYS), "--out", tdir, "--resume"]))


# ----------------------------------------------------------------------------------------
# The loop.

def train(args):
    t_run = time.time()
    torch.manual_seed(args.seed)
    device, (rank, n_proc) = torch.device(args.device), data.world()
    main_rank = rank == 0  # writes logs, checkpoints, pictures, results
    if args.batch_size % n_proc:
        raise SystemExit(f"error: with {n_proc} processes, --batch-size must be a multiple of {n_proc} "
                         f"(it is {args.batch_size})")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {args.out} already holds a run; pass --resume to continue it, "
                         f"--overwrite to start afresh, or --out for a new folder")
    for name in args.eval_sets:  # a missing eval set is found now, not after training
        evaluation.check_eval_set(name, args.data_root)
    data.barrier()  # every rank has looked before rank 0 writes
    os.makedirs(args.out, exist_ok=True)
    stream = make_stream(args)
    model = clip.build(args.model, image_size=args.image_size, merges=stream.merges).to(device)
    model.text.trim = device.type != "cuda"  # CUDA: every step one shape (the whole context), nothing read on the host
    n_params = clip.count_params(model)
    say(f"{args.method}: model {args.model} ({n_params / 1e6:.2f}M params), {args.steps} steps x {args.batch_size} pairs "
        f"on {device}{f' x {n_proc} processes' if n_proc > 1 else ''}, data {args.data} -> {args.out}")
    phases, t_prep = Counter(data=time.time() - t_run), time.time()  # results.json: where the run's time went (sums)
    extra, info, dims, teacher_flops = {}, {}, {}, {}  # the method's preparation (losses.py), once
    rng = torch.get_rng_state()  # loading or training a teacher must not change the student's init
    store_at = dict(root=args.store, name=teachers.data_name(args.data, stream.pairs), dtype=args.store_dtype,
                    workers=args.workers)
    if "cid" in parts(args.method):  # first: kclip+cid's concepts are then those of the pairs the balance kept
        spec, record, trained_here = teachers.clip_teacher(args.teacher, default_teacher_dir(args), stream.fingerprint,
                                                           lambda tdir: train_own_teacher(args, stream, tdir))
        teacher = teachers.load_clip_teacher(spec, device, args.trust_remote_code)
        dims["cid"] = teacher.dim
        extra, info, teacher_flops = losses.prepare_cid(
            stream, teacher, store_at, args.out, device, args.seed, args.clusters, args.balance, args.balance_threshold,
            args.balance_copies, args.balance_buckets, spec=spec, record=record, trained_here=trained_here)
        phases.update(info.pop("seconds"))
    if "kclip" in parts(args.method):
        teacher = teachers.load_text_teacher(args.text_teacher, device, args.pool, args.trust_remote_code,
                                             random_init_seed=args.seed if args.text_teacher_init == "random" else None)
        dims["kclip"] = teacher.dim
        more, more_info, more_flops = losses.prepare_kclip(
            stream, teacher, store_at, args.out, device, args.seed, args.concepts, args.concept_tau, args.standardise_target,
            args.text_corpus, data.eval_captions(args.n_eval, args.seed, args.image_size)
            if args.text_corpus and args.data in data.EMBEDDED else frozenset(), clip.SIZES[args.model].context_length)
        phases.update(more_info.pop("seconds"))
        extra, info, teacher_flops = {**extra, **more}, {**info, **more_info}, {**teacher_flops, **more_flops}
    phases["teacher"] = time.time() - t_prep - sum(v for k, v in phases.items() if k != "data")  # loaded or trained
    torch.set_rng_state(rng)
    heads = nn.ModuleDict()  # the student's parameters beyond its CLIP: kclip first, as always
    if "kclip" in dims:
        heads["kclip"] = losses.KCLIPHeads(model.cfg.embed_dim, dims["kclip"], args.concepts).to(device)
    if "cid" in dims:
        heads["cid"] = losses.CIDHeads(model.cfg.embed_dim, dims["cid"]).to(device)
    scales = [model.logit_scale] + ([heads["cid"].logit_scale] if "cid" in heads else [])  # clamped after every step
    optimizer = clip.make_optimizer([model, heads], args.lr, args.weight_decay, fused=device.type == "cuda")
    cfg = loss_config(args)
    student = losses.Student(model, heads, extra, cfg)
    if n_proc > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    compiled = torch.compile(student) if args.compile else student  # FLOPs are counted on the eager one
    start, flops, saved = 0, 0, None  # flops: the student's training FLOPs so far; saved: the step ckpt.pt holds
    if args.resume and os.path.exists(ckpt_path):
        start, flops = clip.load_for_resume(ckpt_path, model, heads, optimizer, vars(args), RESUME_MUST_MATCH)
        saved = start
        if main_rank:
            clip.trim_log(log_path, start)
        say(f"resumed from {ckpt_path} at step {start}")
    else:
        if args.resume:
            say(f"--resume: no checkpoint in {args.out} yet; starting from step 0")
        if os.path.exists(log_path) and main_rank:
            os.remove(log_path)
    t_start, seen, completed = time.time(), 0, start  # completed: steps whose update is in the weights
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, disable=not main_rank,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def on_disk():  # what a user can go back to
        return (f"{ckpt_path} holds step {saved}: lower --lr and pass --resume (if it stops again at once, the weights "
                f"had diverged before that step: start afresh with --overwrite)") if saved is not None else \
            "no checkpoint was written yet: start again with a lower --lr"

    def save(step_done):  # the checkpoint after `step_done` updates, or a clear stop if the weights are not finite
        nonlocal saved
        if main_rank:
            if not clip.save_checkpoint(ckpt_path, model, heads, optimizer, step_done, vars(args), flops):
                raise SystemExit(f"error: the weights hold NaN or inf after step {step_done}; {on_disk()}")
            saved = step_done

    pending = []  # (step, its (loss, gradient norm)) not checked yet: every step on the CPU, at log steps on CUDA

    def check():  # a step whose update was not applied (NaN or inf): a clear stop, the checkpoint left as it was
        if pending and not torch.isfinite(torch.stack([c for _, c in pending])).all():
            step, c = next((s, c) for s, c in pending if not torch.isfinite(c).all())
            what, value = ("loss", c[0]) if not torch.isfinite(c[0]) else ("gradient norm", c[1])
            raise SystemExit(f"error: the {what} became {value.item()} at step {step}, which was not applied; "
                             f"the checkpoint was left as it was. {on_disk()}")
        pending.clear()

    step_flops = {}  # step_shape -> the FLOPs of one step of that shape, counted the first time it comes up
    try:
        for step in bar:
            lr = clip.lr_at(step, args.lr, args.warmup, args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = stream.batch(step)
            if "corpus_tokens" in extra:
                batch["corpus_index"] = losses.corpus_index(step, len(extra["corpus_tokens"]), args.corpus_batch, args.seed)
            shape = clip.step_shape(batch["tokens"], extra["corpus_tokens"][batch["corpus_index"]]  # on the host
                                    if "corpus_index" in batch else None, trimmed=model.text.trim)
            batch = losses.on_device(batch, step, device, extra)
            run_step = lambda net: losses.train_step(net, batch, optimizer, cfg.weights, args.grad_clip, scales,  # noqa: E731
                                              amp=device.type == "cuda")
            if shape not in step_flops:  # a new shape: count this step's FLOPs (results.json: flops)
                (values, names, checks), step_flops[shape] = clip.count_flops(lambda: run_step(student))
            else:
                values, names, checks = run_step(compiled)
            pending.append((step, checks))
            log_step = (step + 1) % args.log_every == 0 or (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps
            if not optimizer.defaults.get("fused") or log_step:
                check()
            completed = step + 1
            if flops is not None:  # under torchrun, each process's share has its own text length: rank 0's x W
                flops += step_flops[shape] * n_proc
            seen += len(batch["tokens"]) * n_proc
            rate = seen / (time.time() - t_start)
            if main_rank and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step + 1, "lr": lr, "loss": values[0].item(),
                                        **dict(zip(names, values[1:].tolist())), "logit_scale": model.logit_scale.exp().item(),
                                        "samples_per_s": rate, "skipped": batch["skipped"]}) + "\n")
                bar.set_postfix(loss=f"{values[0].item():.3f}", lr=f"{lr:.1e}", sps=f"{rate:.0f}", refresh=False)
            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
                save(step + 1)
    except KeyboardInterrupt:
        bar.close()
        check()
        save(completed)
        raise SystemExit(f"interrupted at step {completed}: saved {ckpt_path}; continue with --resume") from None
    bar.close()
    seconds = time.time() - t_start
    if not main_rank:
        data.barrier()  # wait for rank 0's evaluation and results.json
        return None
    results = {"method": args.method, "model": args.model, "params": n_params, "steps": args.steps,
               "batch_size": args.batch_size, "seed": args.seed, "data": args.data, "seconds": round(seconds, 1),
               "samples_per_second": round(seen / seconds, 1) if seen else None, "skipped_pairs": stream.skipped,
               "data_fingerprint": stream.fingerprint, "pairs_trained_on": len(stream.pool),
               "flops": clip.flop_accounting(flops, teacher_flops), **info}
    results.update(evaluation.evaluate(model, device, args.seed, args.n_eval, None if args.data in data.EMBEDDED
                                       else stream.pairs, args.val_frac, args.eval_sets, args.data_root,
                                       validation=args.eval_split == "val"))
    evaluation.plot_curves({args.method: evaluation.read_log(args.out)}, os.path.join(args.out, "curves.png"))
    if "kclip" in parts(args.method) and args.data in data.EMBEDDED:  # teacher vs student text space, by concept
        losses.plot_text_space(model, stream, extra, os.path.join(args.out, "text_pca.png"), device)
    phases.update(loop=seconds, eval=time.time() - t_start - seconds)
    results["phase_seconds"] = {k: round(phases.get(k, 0), 2) for k in PHASES}
    results["wall_seconds"] = round(time.time() - t_run, 1)  # the whole run: data, teachers, training, evaluation
    clip.write_json(os.path.join(args.out, "results.json"), results)
    data.barrier()
    return results


def reference_run(args):
    """Plain CLIP with this run's data, seed, student and schedule: -> (its flags, its name: clip-reference-<hash>)."""
    keys = (*DATA_KEYS, "preset", "n_eval", "eval_split", "csv_label_key", "vocab_size", "device", "model", "steps",
            "batch_size", "lr", "warmup", "weight_decay", "grad_clip")
    argv = ["--method", "clip", *flags(args, keys), "--no-vs-clip"]
    return argv, "clip-reference-" + hashlib.sha1(json.dumps(argv).encode()).hexdigest()[:10]


def clip_reference(args, use_shipped=True):
    """reference_run's results -> (results, where they come from: None if trained now). Trained once beside the run
    (DIR/../NAME) and reused; for the front door's flags, the one the repository ships (weights/NAME.json, made by
    `python docs/reproduce.py --ship-reference` on the CPU it names) is read instead of training one."""
    argv, name = reference_run(args)
    out, shipped = os.path.join(os.path.dirname(os.path.abspath(args.out)), name), os.path.join(teachers.WEIGHTS, name + ".json")
    if os.path.exists(os.path.join(out, "results.json")):
        return clip.read_json(os.path.join(out, "results.json")), f"trained before, kept in {os.path.relpath(out)}"
    if use_shipped and os.path.exists(shipped):
        ref = clip.read_json(shipped)
        m = ref["machine"]
        return ref, f"shipped in {os.path.relpath(shipped)}, made with {m['cpu_capability']}, {m['threads']} threads"
    say(f"{args.method}: now plain CLIP on the same data and seed, for the closing table (once: kept in {out})")
    return train(parse_args([*argv, "--out", out, "--resume"])), None


BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}  # CUDA: NCCL for GPU tensors, gloo for the CPU's (the store's
# k-means and balance over its rows, the real-data stream's counts), as NCCL has no CPU backend


def init_distributed(device, out):
    """Join the process group torchrun describes (BACKENDS; on CUDA one GPU per process). Each rank
    then takes its share of every batch (data.world). Rank 0 alone writes logs, checkpoints,
    pictures and results, into the folder it chose. -> (this rank's device, out)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group(BACKENDS[torch.device(device).type])
        shared = [out]
        dist.broadcast_object_list(shared, src=0)  # every rank writes (or reads) rank 0's folder
        out = shared[0]
    return device, out


def main(argv=None):
    args = parse_args(argv)
    args.device, args.out = init_distributed(args.device, args.out)
    try:
        results = train(args)
        reference = clip_reference(args) if args.vs_clip and args.method != "clip" else None  # every rank: it trains
        if data.world()[0] == 0:
            rows, notes = evaluation.closing_rows(args.method, args.seed, results, reference)
            print(f"\n{evaluation.closing_table(rows)}\n" + "".join(f"  {n}\n" for n in notes)
                  + f"  every number: {os.path.join(args.out, 'results.json')}")
        return results
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
