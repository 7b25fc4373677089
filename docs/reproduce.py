"""The reproduction: every number of the results tables, from train.py runs.

`python docs/reproduce.py` trains, evaluates and EM-probes every row of SWEEP for seeds 0 1 2
into runs/sweep (a row's folder is `ROW-sSEED`), then writes runs/sweep/table.md and table.json
(mean ± std over the seeds, and every seed's value). Each row is a train.py run with the same
student, data, steps and evaluation; any train.py flag given here goes to every row (e.g.
--device cuda, --steps 2000). A run whose results.json exists is not run again and an interrupted
one resumes from its checkpoint: run the same command again to continue a killed sweep.

`python docs/reproduce.py --tune cid --seeds 0` chooses CLIP-CID's cluster weight and balance threshold
on the validation split (TUNE_GRIDS; runs/tune/cid.md); `--tune balance` the balance rule's quantile
(--balance-copies); `--tune gemma` the Gemma teacher's pooling and L_emb weight (runs/tune/gemma.md).

`python docs/reproduce.py --ship-reference` makes weights/clip-reference-*.json, the plain CLIP that
`python train.py --method cid` ends beside (train.clip_reference).

`python docs/reproduce.py --real DIR/pairs.csv` makes the table on real images (REAL_ROWS; runs/real/table.md).

`python docs/reproduce.py --pretrain-teacher` rebuilds the CLIP-CID teacher of the embedded data
(weights/shapes-teacher.pt and its manifest): PRETRAIN_RECIPE, about an hour on 2 CPU cores.
"""
import argparse
import glob
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # docs/: the bench and the EM probe
import bench  # noqa: E402
import clip  # noqa: E402
import convert_gguf  # noqa: E402
import data  # noqa: E402
import em_probe  # noqa: E402
import eval as evaluation  # noqa: E402
import teachers  # noqa: E402
import train  # noqa: E402

# ----------------------------------------------------------------------------------------
# The CLIP-CID teacher of the embedded data, as the papers have it: pretrained once, on a pool
# broader than any student's data (every shape x colour combination, every wording, 2.5x the
# pairs) and for 4x the student's steps, then shared by every run (weights/).

PRETRAIN_POOL = ["--data", "shapes-pretrain", "--n-train", "50000", "--dup-frac", "0", "--imbalance", "0"]
PRETRAIN_RECIPE = ["--method", "clip", "--model", "teacher", *PRETRAIN_POOL, "--steps", "2000", "--warmup", "100",
                   "--batch-size", "256", "--lr", "2e-3", "--seed", "0", "--vocab-size", "259", "--log-every", "1"]
PRETRAIN_DIR = os.path.join("runs", "pretrain-teacher")


def code_version():  # the commit of these files, and whether they were changed since; None outside git
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
        commit = git("rev-parse", "--short", "HEAD")
        return commit + (" with uncommitted changes" if git("status", "--porcelain", "--", "*.py") else "") if commit else None
    except OSError:
        return None


def machine(device):  # what a float depends on: bit-equal only on the same kind of CPU, threads and torch
    return {"device": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def ship_reference(flags):
    """weights/clip-reference-<hash>.json: plain CLIP with the front door's flags (`python train.py --method cid`
    and these), the closing table's last row, so that the first run need not train it (train.clip_reference)."""
    args = train.parse_args(["--method", "cid", *flags, "--out", os.path.join("runs", "cid")])  # the reference: runs/NAME
    res, _ = train.clip_reference(args, use_shipped=False)  # trained once into runs/NAME, or read from there
    shipped = os.path.join(teachers.WEIGHTS, train.reference_run(args)[1] + ".json")
    clip.write_json(shipped, {**res, "command": " ".join(["python docs/reproduce.py --ship-reference", *flags]),
                              "code_version": code_version(), "machine": machine(args.device)})
    return shipped


def pretrain_teacher(device):
    """Train PRETRAIN_RECIPE into runs/pretrain-teacher (a killed run resumes), then write
    weights/shapes-teacher.pt (the weights in float16) and its manifest, whose evaluation is of
    the float16 weights, as shipped."""
    run = train.parse_args(PRETRAIN_RECIPE + ["--device", device, "--out", PRETRAIN_DIR, "--resume"])
    res_path = os.path.join(PRETRAIN_DIR, "results.json")
    res = clip.read_json(res_path) if os.path.exists(res_path) else train.train(run)
    ckpt = clip.load_file(os.path.join(PRETRAIN_DIR, "ckpt.pt"))
    config = {k: v for k, v in ckpt["config"].items() if k not in ("out", "data_root", "store")}  # no local paths
    os.makedirs(os.path.dirname(teachers.PRETRAINED), exist_ok=True)
    with clip.atomic(teachers.PRETRAINED) as tmp:
        torch.save({"model": {k: v.half() for k, v in ckpt["model"].items()}, "model_config": ckpt["model_config"],
                    "config": config}, tmp)
    model = clip.load_checkpoint(teachers.PRETRAINED, run.device)[0]
    pool = {"data": run.data, "n": run.n_train, "seed": run.seed, "image_size": run.image_size, "dup_frac": run.dup_frac,
            "imbalance": run.imbalance, "fingerprint": res["data_fingerprint"], "prefix_rows": teachers.PREFIX_ROWS}
    pool["prefix_fingerprint"] = teachers.pool_prefix_fingerprint(pool)
    manifest = {"file": os.path.basename(teachers.PRETRAINED), "sha256": teachers.sha256_of(teachers.PRETRAINED),
                "bytes": os.path.getsize(teachers.PRETRAINED), "command": teachers.REBUILD, "recipe": PRETRAIN_RECIPE,
                "code_version": code_version(), "pool": pool, "model": run.model, "params": res["params"],
                "steps": run.steps, "first_losses": [r["loss"] for r in evaluation.read_log(PRETRAIN_DIR)[:5]],
                "machine": machine(run.device),
                "train_seconds": res["seconds"], "flops": res.get("flops"),
                "results": evaluation.evaluate_run(model, vars(run), torch.device(run.device))}  # of the float16 weights
    clip.write_json(teachers.MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------------------
# The sweep: its rows, and the controls without which a gain cannot be read as what a paper claims.

SWEEP = [  # (folder, row of the table, flags, EM text probe?)
    ("clip", "CLIP", ["--method", "clip"], True),
    ("kclip", "Knowledge-CLIP", ["--method", "kclip"], True),
    # balance's threshold by train.py's rule (--balance-copies, chosen on validation by `--tune balance --seeds 0`)
    ("cid", "CLIP-CID, balanced set", ["--method", "cid"], True),
    ("cid-full", "CLIP-CID, full set (no balance)", ["--method", "cid", "--no-balance"], False),
    # the paper's claim is efficiency: the balanced set for as many epochs as the full set's 500 steps make, so fewer
    # steps (--steps: epoch_steps, from the cid row's pairs kept), and balance at cos >= 0.99, our former default
    ("cid-epochs", "CLIP-CID, balanced set, equal epochs (fewer steps)", ["--method", "cid"], False),
    ("cid-paper", "CLIP-CID, balanced at cos >= 0.99 (our former default)", ["--method", "cid", "--balance-threshold", "0.99"],
     False),
    # chosen on validation by `python docs/reproduce.py --tune cid --seeds 0` (runs/tune/cid.md): the paper's --cd-weight
    # 1.0 is the cid-full row above
    ("cid-tuned", "CLIP-CID, tuned on validation (--cd-weight 0.3, no balance)",
     ["--method", "cid", "--cd-weight", "0.3", "--no-balance"], False),
    ("cid-own", "CLIP-CID, teacher trained on the student's data (--teacher own)", ["--method", "cid", "--teacher", "own"],
     False),
    ("cid-own-full", "CLIP-CID, full set, teacher trained on the student's data (--teacher own --no-balance)",
     ["--method", "cid", "--teacher", "own", "--no-balance"], False),
    ("kclip-cid", "Knowledge-CLIP + CLIP-CID, both teachers (balance at 0.99)",
     ["--method", "kclip+cid", "--balance-threshold", "0.99"], True),  # made before the --balance-copies rule
    ("kclip-random", "Knowledge-CLIP, random-init text teacher", ["--method", "kclip", "--text-teacher-init", "random"], True),
    ("kclip-alpha0", "Knowledge-CLIP, alpha = 0 (no L_emb)", ["--method", "kclip", "--emb-weight", "0"], True),
    ("kclip-beta0", "Knowledge-CLIP, beta = 0 (no concept KL)", ["--method", "kclip", "--concept-weight", "0"], True),
    # beyond the paper: distil the teacher on text-only lines that hold the never-seen words too
    ("kclip-corpus", "Knowledge-CLIP + text corpus", ["--method", "kclip", "--text-corpus"], True),
    ("kclip-random-corpus", "Knowledge-CLIP + text corpus, random-init teacher",
     ["--method", "kclip", "--text-corpus", "--text-teacher-init", "random"], True),
    # a decoder LLM as the text teacher, as the paper's Llama 2 (docs/convert_gguf.py writes it; skipped if absent)
    ("kclip-gemma-last", "Knowledge-CLIP, Gemma-3-270M teacher, last token",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "last"], True),
    ("kclip-gemma-mean", "Knowledge-CLIP, Gemma-3-270M teacher, mean",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "mean"], True),
    # chosen on validation by `python docs/reproduce.py --tune gemma --seeds 0` (runs/tune/gemma.md): every L_emb
    # weight > 0 scored below none, at either pooling; the random-init control has the same settings
    ("kclip-gemma-tuned", "Knowledge-CLIP, Gemma-3-270M, tuned on validation (last token, alpha = 0)",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "last", "--emb-weight", "0"], True),
    # beyond the paper: L_emb onto the Gemma target standardised per dimension (train.py --standardise-target), the
    # paper's alpha = 1, and alpha and pooling chosen on validation by `--tune gemma-std --seeds 0` (runs/tune/gemma-std.md)
    ("kclip-gemma-std", "Knowledge-CLIP, Gemma-3-270M, last token, standardised target, alpha = 1",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "last", "--standardise-target"], True),
    ("kclip-gemma-std-tuned", "Knowledge-CLIP, Gemma-3-270M, standardised target, tuned on validation (last, alpha = 0.01)",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "last", "--standardise-target",
      "--emb-weight", "0.01"], True),
    ("kclip-gemma-random", "Knowledge-CLIP, random-init Gemma-3-270M, last token, alpha = 0",
     ["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--pool", "last", "--emb-weight", "0",
      "--text-teacher-init", "random"], True),
    # each term alone, balanced at cos >= 0.99 (made before the --balance-copies rule: its numbers stand as they were)
    ("cid-cd", "CLIP-CID, cluster term alone (balance at 0.99)", ["--method", "cid", "--id-weight", "0",
                                                                  "--balance-threshold", "0.99"], False),
    ("cid-id", "CLIP-CID, instance term alone (balance at 0.99)", ["--method", "cid", "--cd-weight", "0",
                                                                   "--balance-threshold", "0.99"], False),
    # --steps: equal_compute_steps, the pretrained teacher counted in full / shared by every CLIP-CID student of the sweep
    ("clip-equal", "CLIP, equal total compute (teacher counted in full)", ["--method", "clip"], False),
    ("clip-equal-shared", "CLIP, equal total compute (teacher shared by the sweep's students)", ["--method", "clip"], False),
    ("clip-pool", "CLIP on the teacher's pretraining pool", ["--method", "clip", *PRETRAIN_POOL], False),
]
# the rows of the pretrained teacher when clip-equal-shared was made (6 rows x 3 seeds: 18 students); the rows added
# since (cid-epochs, cid-paper) are left out so that its steps, and its table row, stay as they were
SHARING = ["cid", "cid-full", "cid-tuned", "kclip-cid", "cid-cd", "cid-id"]
TABLE = [  # (results.json key, column)
    ("zero_shot_top1", "zero-shot seen"), ("zero_shot_unseen_top1", "zero-shot unseen"),
    ("linear_probe_top1", "linear probe"), ("retrieval_i2t_r1", "R@1 i2t"), ("retrieval_t2i_r1", "R@1 t2i"),
    ("zero_shot_by_attributes_top1", "attributes seen"), ("zero_shot_by_attributes_unseen_top1", "attributes unseen"),
    ("text_em", "EM"), ("params", "params"), ("pairs_trained_on", "pairs"), ("steps", "steps"),
    ("student_tflops", "student TFLOPs"), ("seconds", "train s"),
]
CLAIM_KEYS = [("zero_shot_top1", "zero-shot"), ("zero_shot_unseen_top1", "unseen"), ("linear_probe_top1", "probe"),
              ("zero_shot_by_attributes_top1", "attributes"), ("text_em", "EM")]
WORD_KEYS = [("zero_shot_never_words_top1", "zero-shot never-seen words"), ("text_probe_never", "probe never-seen"),
             ("zero_shot_rare_words_top1", "zero-shot rare words"), ("zero_shot_top1", "zero-shot")]
COST_KEYS = [("student_tflops", "student TFLOPs"), *CLAIM_KEYS[:3]]
CLAIMS = [  # (row, minus row[, keys: CLAIM_KEYS]): each seed's difference, for the claims (table.md's last section)
    ("kclip", "clip"), ("cid", "clip"), ("cid-full", "clip"), ("cid-tuned", "clip"), ("cid", "cid-full"),
    ("cid-tuned", "cid-paper"), ("cid-tuned", "cid-full"), ("cid-epochs", "cid-full", COST_KEYS), ("cid-epochs", "cid"),
    ("cid-paper", "clip"), ("cid-paper", "cid-full"), ("cid-full", "kclip"), ("kclip-cid", "kclip"),
    ("kclip-random", "kclip"), ("kclip-alpha0", "kclip"), ("kclip-beta0", "kclip"), ("cid-own", "clip"),
    ("cid", "cid-own"), ("cid-own-full", "cid-full"), ("cid-own", "cid-own-full"), ("cid-cd", "cid-paper"),
    ("cid-id", "cid-paper"), ("kclip-corpus", "kclip", WORD_KEYS), ("kclip-corpus", "kclip-random-corpus", WORD_KEYS), ("kclip-gemma-last", "clip"), ("kclip-gemma-mean", "clip"),
    ("kclip-gemma-tuned", "clip"), ("kclip-gemma-tuned", "kclip"), ("kclip-gemma-tuned", "kclip-alpha0"),
    ("kclip-gemma-random", "kclip-gemma-tuned"), ("kclip-gemma-std", "clip"), ("kclip-gemma-std", "kclip-gemma-last"),
    ("kclip-gemma-std-tuned", "clip"), ("kclip-gemma-std-tuned", "kclip-gemma-tuned"),
    ("clip-equal", "cid-full"), ("clip-equal-shared", "cid-full"), ("clip-equal-shared", "cid-tuned"),
    ("clip-pool", "clip"), ("clip-pool", "cid-full"),
]
TIER_TABLE = [  # the vocabulary tiers (data.WORDS): zero-shot with prompts in each tier, text-space probe
    ("zero_shot_top1", "zero-shot, common words"), ("zero_shot_rare_words_top1", "zero-shot, rare words"),
    ("zero_shot_never_words_top1", "zero-shot, never-seen words"), ("text_probe_common", "probe, common"),
    ("text_probe_rare", "probe, rare"), ("text_probe_never", "probe, never-seen"),
]


def equal_compute_steps(args, students=1):
    """Student steps whose FLOPs equal CLIP-CID's whole pipeline: training the teacher (--teacher
    pretrained: its manifest's FLOPs; own: --teacher-steps), split over the `students` that share
    it, embedding the training set with it once, and the student's own --steps (its projector
    and losses are < 0.1% of a step and not counted)."""
    stream = train.make_stream(args)
    batch = stream.batch(0)
    student = clip.build(args.model, image_size=args.image_size, merges=stream.merges)
    pretrained = (args.teacher or "pretrained") == "pretrained"  # a clip row of the sweep names no teacher: the default's
    teacher = clip.build("teacher", image_size=args.image_size, merges=() if pretrained else stream.merges)
    f_student = bench.step_flops(student, batch, args)
    batch = {**batch, "tokens": teacher.tokenize([stream.ds.captions[int(i)] for i in batch["index"]])}  # the teacher's
    training = (teachers.check_pretrained()["flops"]["student_training"] if pretrained
                else args.teacher_steps * bench.step_flops(teacher, batch, args))
    teacher_total = training / students + args.n_train / args.batch_size * bench.step_flops(teacher, batch, args, False)
    return math.ceil(args.steps + teacher_total / f_student)


def epoch_steps(argv, balanced):
    """Steps that give the pairs the balanced run kept as many epochs as --steps give the full set."""
    if not os.path.exists(balanced):
        raise SystemExit(f"error: the cid-epochs row needs the cid row of its seed first ({balanced}): "
                         "python docs/reproduce.py --rows cid cid-epochs")
    stats = clip.read_json(balanced)["balance"]
    return max(1, round(train.parse_args(argv).steps * stats["pairs_after"] / stats["pairs_before"]))


def sweep_em(run_dir, root, cfg, steps):
    """EM % of a run's text tower, through the seed's autoencoder (trained once, kept in root)."""
    model = clip.load_checkpoint(run_dir, cfg.device)[0]
    train_caps, test = em_probe.distinct_splits(*em_probe.em_captions(vars(cfg)))
    ae = em_probe.cached_autoencoder(os.path.join(root, f"em-autoencoder-s{cfg.seed}.pt"), train_caps, cfg.seed,
                                     steps[0], cfg.device)
    em = lambda encode: em_probe.em_of(ae, encode, train_caps, test, steps[1], seed=cfg.seed, device=cfg.device)  # noqa: E731
    path = os.path.join(root, f"em-reference-s{cfg.seed}.json")  # the autoencoder and the text teacher, once per seed
    if not os.path.exists(path):
        teacher = teachers.load_text_teacher(cfg.text_teacher, cfg.device, cfg.pool, cfg.trust_remote_code)
        clip.write_json(path, {"proof of concept": em_probe.em_poc(ae, test), f"text teacher {teacher.name}": em(
            lambda caps: em_probe.in_batches(teacher.encode_texts, caps))})
    return em(lambda caps: evaluation.embed_texts(model, caps, cfg.device))


def missing_text_teacher(flags):
    """The folder these flags name with --text-teacher, if it does not exist (the Gemma rows
    before docs/convert_gguf.py has run); None otherwise."""
    named = flags[flags.index("--text-teacher") + 1] if "--text-teacher" in flags else None
    return named if named and not os.path.isdir(named) else None


def seed_diffs(values, minus):
    """'+1.2 [+0.2, +0.6, +2.8]': the mean of the per-seed differences, then each one."""
    d = [x - y for x, y in zip(values, minus)]
    return f"{np.mean(d):+.1f} [{', '.join(f'{x:+.1f}' for x in d)}]"


def sweep(a, flags):
    """Train, evaluate and EM-probe every SWEEP row for every seed, then write the table."""
    root, t0 = a.out or os.path.join("runs", "sweep"), time.time()
    os.makedirs(root, exist_ok=True)
    base = train.parse_args(flags)
    spec_path = os.path.join(root, "sweep.json")
    spec = {"flags": flags, "preset": base.preset, "device": base.device, "em_steps": a.em_steps}
    if os.path.exists(spec_path) and clip.read_json(spec_path) != spec:
        raise SystemExit(f"error: the sweep in {root} was made with {clip.read_json(spec_path)}, not {spec}; "
                         "pass another --out")
    clip.write_json(spec_path, spec)
    rows = []
    for folder, row, row_flags, em in SWEEP:
        if a.rows and folder not in a.rows:
            continue
        if missing := missing_text_teacher(row_flags):
            print(f"sweep: row {folder} skipped: no text teacher at {missing} "
                  "(python docs/convert_gguf.py writes it)")
            continue
        rows.append((folder, row, row_flags, em))
    runs = [train.parse_args(flags + row_flags) for _, _, row_flags, _ in rows]
    text_teachers = {(base.text_teacher, base.pool)} | {(r.text_teacher, r.pool) for r in runs if "kclip" in r.method}
    for named, pool in sorted(text_teachers):
        tiers_path = os.path.join(root, f"text-teacher-tiers-{data.fingerprint_of(named, pool)}.json")
        if not os.path.exists(tiers_path):
            teacher = teachers.load_text_teacher(named, base.device, pool, base.trust_remote_code)
            clip.write_json(tiers_path, {"name": teacher.name, **{f"text_probe_{k}": v for k, v in evaluation.tier_probe(
                lambda t: em_probe.in_batches(teacher.encode_texts, t)).items()}})
    for folder, row, row_flags, em in rows:
        for seed in a.seeds:
            out = os.path.join(root, f"{folder}-s{seed}")
            res_path = os.path.join(out, "results.json")
            if os.path.exists(res_path) and not (em and "text_em" not in clip.read_json(res_path)):
                continue  # finished: nothing to redo
            argv = flags + row_flags + ["--seed", str(seed)]
            if folder == "cid-epochs":
                argv += ["--steps", str(epoch_steps(argv, os.path.join(root, f"cid-s{seed}", "results.json")))]
            if folder.startswith("clip-equal"):
                students = 1 if folder == "clip-equal" else len(SHARING) * len(a.seeds)
                argv += ["--steps", str(equal_compute_steps(train.parse_args(argv), students))]
            run = train.parse_args(argv + ["--out", out, "--resume"])
            if not os.path.exists(res_path):
                print(f"\nsweep: {row}, seed {seed} -> {out}")
                train.train(run)
            res = clip.read_json(res_path)
            if em and "text_em" not in res:
                clip.write_json(res_path, {**res, "text_em": sweep_em(out, root, run, a.em_steps)})
            write_table(root, a.seeds, flags)
    write_table(root, a.seeds, flags)
    first = {row: os.path.join(root, f"{folder}-s{a.seeds[0]}") for folder, row, _, _ in SWEEP[:3]}
    evaluation.plot_curves({row: evaluation.read_log(d) for row, d in first.items() if os.path.isdir(d)},
                           os.path.join(root, "curves.png"))
    print(f"sweep: done in {(time.time() - t0) / 60:.1f} min (this call); table in {root}/table.md")


# ----------------------------------------------------------------------------------------
# Tuning on validation. CLIP-CID's cluster weight is 1.0 in the paper and its balance threshold
# is ours (the paper gives none); Knowledge-CLIP's alpha = 1 is the paper's for Llama 2, whose
# vectors are not Gemma's. Each is chosen here by zero-shot on the validation split
# (eval.validate_shapes, all 64 combinations, averaged over --seeds), never on a test number.

TUNE_GRIDS = {  # grid: (the flags of every cell, [(the flag of an axis, its values)])
    "cid": (["--method", "cid"], [("--cd-weight", ["0.1", "0.3", "1.0"]), ("--balance-threshold", ["0.99", "0.999", "off"])]),
    "balance": (["--method", "cid"], [("--balance-copies", ["0.9", "0.75", "0.5"])]),  # the rule's quantile
    "gemma": (["--method", "kclip", "--text-teacher", convert_gguf.GEMMA],
              [("--pool", ["last", "mean"]), ("--emb-weight", ["0", "0.0001", "0.001", "0.01", "0.1", "1.0"])]),
    "gemma-std": (["--method", "kclip", "--text-teacher", convert_gguf.GEMMA, "--standardise-target"],
                  [("--pool", ["last", "mean"]), ("--emb-weight", ["0.001", "0.01", "0.1", "1.0"])]),
}
TUNE_KEY = "val_zero_shot_all_top1"


def cell_flags(flag, value):  # balance threshold "off" is --no-balance
    return ["--no-balance"] if (flag, value) == ("--balance-threshold", "off") else [flag, value]


def tune(a, flags):
    """Train every cell of TUNE_GRIDS[a.tune] and seed with --eval-split val into
    runs/tune/GRID-CELL-sSEED (resumable), then write runs/tune/GRID.md and GRID.json and print the
    chosen cell: the best TUNE_KEY averaged over the seeds."""
    root, t0 = a.out or os.path.join("runs", "tune"), time.time()
    base, axes = TUNE_GRIDS[a.tune]
    if missing := missing_text_teacher(base):
        raise SystemExit(f"error: no text teacher at {missing}; "
                         f"{convert_gguf.NEEDS} && python docs/convert_gguf.py writes it")
    cells = []
    for values in itertools.product(*[v for _, v in axes]):
        cell = {"flags": {flag: v for (flag, _), v in zip(axes, values)}, "runs": []}
        name = "-".join([a.tune] + [f"{flag[2:]}{v}" for flag, v in cell["flags"].items()])
        for seed in a.seeds:
            out = os.path.join(root, f"{name}-s{seed}")
            if not os.path.exists(os.path.join(out, "results.json")):
                print(f"\ntune: {' '.join(f'{k} {v}' for k, v in cell['flags'].items())}, seed {seed} -> {out}")
                train.train(train.parse_args(flags + base + sum((cell_flags(*kv) for kv in cell["flags"].items()), [])
                                             + ["--seed", str(seed), "--eval-split", "val", "--out", out, "--resume"]))
            res = clip.read_json(os.path.join(out, "results.json"))
            if TUNE_KEY not in res:
                raise SystemExit(f"error: {out} holds no validation numbers (made without --eval-split val?)")
            cell["runs"].append({k: res.get(k) for k in ("seed", TUNE_KEY, "val_zero_shot_top1",
                                                         "val_zero_shot_unseen_top1", "pairs_trained_on")})
        cell["mean"] = float(np.mean([r[TUNE_KEY] for r in cell["runs"]]))
        cells.append(cell)
    best = max(cells, key=lambda c: c["mean"])
    clip.write_json(os.path.join(root, f"{a.tune}.json"), {"base": base, "axes": axes, "key": TUNE_KEY, "seeds": a.seeds,
                                                          "flags": flags, "cells": cells, "chosen": best})
    lines = [f"{' '.join(base)} on validation (eval.validate_shapes; mean over seeds {' '.join(map(str, a.seeds))}): "
             f"zero-shot all 64 / seen / unseen combinations, pairs trained on", "",
             "| " + " | ".join(flag for flag, _ in axes) + " | all | seen | unseen | pairs | chosen |", "|---" * (len(axes) + 5) + "|"]
    for c in cells:
        mean = lambda k: float(np.mean([r[k] for r in c["runs"]]))  # noqa: E731
        lines.append("| " + " | ".join(c["flags"].values()) + f" | {c['mean']:.1f} | {mean('val_zero_shot_top1'):.1f} | "
                     f"{mean('val_zero_shot_unseen_top1'):.1f} | {mean('pairs_trained_on'):,.0f} | {'yes' if c is best else ''} |")
    with clip.atomic(os.path.join(root, f"{a.tune}.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"tune: chosen {' '.join(f'{k} {v}' for k, v in best['flags'].items())} "
          f"({(time.time() - t0) / 60:.1f} min, this call)")
    return best


# ----------------------------------------------------------------------------------------
# Real images: your own CSV with a class column (python docs/convert_folder.py writes one). A teacher
# trained on the whole set (every pair but the held-out ones) knows more than the students, who
# train on a quarter of it (--train-frac, the same part for every seed); every run is scored on
# the same held-out pairs: zero-shot over the class names, retrieval, linear probe, and
# Fashion-MNIST zero-shot through --eval-sets.

REAL_COMMON = ["--val-frac", "0.1", "--csv-label-key", "category", "--eval-sets", "fashion-mnist"]
REAL_TEACHER = ["--method", "clip", "--model", "teacher", "--steps", "500", "--train-frac", "1", "--seed", "0"]
REAL_STUDENT = ["--steps", "200", "--train-frac", "0.25"]
REAL_ROWS = [("clip", "CLIP", ["--method", "clip"]), ("kclip", "Knowledge-CLIP (MiniLM)", ["--method", "kclip"]),
             ("cid", "CLIP-CID (teacher on the whole set)", ["--method", "cid", "--balance-threshold", "0.99"]),
             ("kclip-cid", "Knowledge-CLIP + CLIP-CID", ["--method", "kclip+cid", "--balance-threshold", "0.99"])]
# (balance at cos >= 0.99, the default when docs/openclipart.md's table was made)
REAL_TABLE = [("zero_shot_top1", "zero-shot"), ("zero_shot_per_class_top1", "zero-shot per class"),
              ("linear_probe_top1", "linear probe"), ("retrieval_i2t_r1", "R@1 i2t"), ("retrieval_i2t_r5", "R@5 i2t"),
              ("retrieval_t2i_r1", "R@1 t2i"), ("retrieval_t2i_r5", "R@5 t2i"), ("fashion-mnist_zero_shot_top1",
              "Fashion-MNIST zero-shot"), ("fashion-mnist_linear_probe_top1", "Fashion-MNIST probe"),
              ("pairs_trained_on", "pairs"), ("seconds", "train s")]


def real(a, flags):
    """The teacher once, then every REAL_ROWS row for every seed into runs/real (resumable), then
    runs/real/table.md: mean ± std, and each row's per-seed difference from CLIP."""
    root, t0 = a.out or os.path.join("runs", "real"), time.time()
    teacher = os.path.join(root, "teacher")
    runs = {"teacher (--model teacher, the whole set)": [(teacher, REAL_TEACHER)]}  # row: [(folder, flags)]
    for folder, row, row_flags in REAL_ROWS:
        runs[row] = [(os.path.join(root, f"{folder}-s{s}"), [*row_flags, *REAL_STUDENT, "--seed", str(s), "--teacher", teacher])
                     for s in a.seeds]
    for row, outs in runs.items():
        for out, row_flags in outs:
            if not os.path.exists(os.path.join(out, "results.json")):
                print(f"\nreal: {row} -> {out}")
                train.train(train.parse_args(["--data", a.real, *REAL_COMMON, *flags, *row_flags, "--out", out, "--resume"]))
    found = {row: [clip.read_json(os.path.join(out, "results.json")) for out, _ in outs] for row, outs in runs.items()}
    lines = [f"{a.real}: mean ± std over seeds {' '.join(map(str, a.seeds))}; the teacher is one run", "",
             "| | " + " | ".join(c for _, c in REAL_TABLE) + " |", "|---" * (len(REAL_TABLE) + 1) + "|"]
    for row, results in found.items():
        lines.append(f"| {row} | " + " | ".join(show(key, [r[key] for r in results if r.get(key) is not None])
                                                for key, _ in REAL_TABLE) + " |")
    lines += ["", "Each row minus CLIP, per seed (zero-shot; R@1 i2t; linear probe):", ""]
    clip_runs = found["CLIP"]
    for row, results in list(found.items())[2:]:
        lines.append(f"- {row}: " + "; ".join(seed_diffs([r[k] for r in results], [c[k] for c in clip_runs])
                                                for k in ("zero_shot_top1", "retrieval_i2t_r1", "linear_probe_top1")))
    with clip.atomic(os.path.join(root, "table.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nreal: done in {(time.time() - t0) / 60:.1f} min (this call)")


# ----------------------------------------------------------------------------------------
# The tables.

def mean_std(values):
    """(mean, sample standard deviation) of a list; std 0 for a single value."""
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def show(key, values, n_seeds=None):
    """A table cell: mean ± std of the seeds' values ('-' if none; counts and times as a mean
    alone; "(n=k)" when fewer than n_seeds values have finished)."""
    if not values:
        return "-"
    m, s = mean_std(values)
    if key in ("params", "steps"):  # the same for every seed
        return f"{m / 1e6:.2f}M" if key == "params" else f"{m:.0f}"
    alone = key in ("seconds", "pairs_trained_on", "student_tflops")  # counts and costs: the mean alone
    text = f"{m:.1f}" if key == "student_tflops" else f"{m:.0f}" if alone else f"{m:.1f}" + (f" ± {s:.1f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)})" if n_seeds and len(values) < n_seeds else "")


def write_table(root, seeds, flags):
    """root/table.json (every value per seed, mean, std) and root/table.md (mean ± std; '(n=k)'
    when fewer seeds than asked have finished; train s = the training loop alone). A run's
    results.json is read with its eval.json, if any, on top."""
    rows, wall = {}, 0.0
    teacher_dirs = [train.default_teacher_dir(train.parse_args(flags + ["--seed", str(s)])) for s in seeds]
    sources = [("CLIP-CID own-data teacher (--teacher own)", teacher_dirs)]
    sources += [(row, [os.path.join(root, f"{folder}-s{s}") for s in seeds]) for folder, row, _, _ in SWEEP]
    if os.path.exists(teachers.MANIFEST):  # one teacher for every seed: no std
        manifest = clip.read_json(teachers.MANIFEST)
        rows["CLIP-CID pretrained teacher (weights/)"] = {k: {"values": [manifest["results"][k]], "seedless": True}
                                                          for k, _ in TABLE + TIER_TABLE if k in manifest["results"]}
    for row, dirs in sources:
        found = []
        for d in dirs:
            if os.path.exists(os.path.join(d, "results.json")):
                found.append(clip.read_json(os.path.join(d, "results.json")))
                if "flops" in found[-1]:  # the student's training: what balance saves (its teacher's share is the same)
                    found[-1]["student_tflops"] = found[-1]["flops"]["student_training"] / 1e12
                if os.path.exists(os.path.join(d, "eval.json")):  # re-evaluated later by `python eval.py --ckpt DIR`
                    found[-1].update(clip.read_json(os.path.join(d, "eval.json")))
                wall += found[-1].get("wall_seconds", 0.0)  # the whole run: teacher, training, evaluation, EM
        if found:
            rows[row] = {key: {"values": [r[key] for r in found if key in r]} for key, _ in TABLE + TIER_TABLE}
    for s in seeds:  # the EM probe's references, per seed
        path = os.path.join(root, f"em-reference-s{s}.json")
        for name, value in (clip.read_json(path) if os.path.exists(path) else {}).items():
            rows.setdefault(f"EM reference: {name}", {"text_em": {"values": []}})["text_em"]["values"].append(value)
    for tiers_path in sorted(glob.glob(os.path.join(root, "text-teacher-tiers-*.json"))):  # each text teacher, its own space
        ref = clip.read_json(tiers_path)
        name = ref.pop("name")
        rows[f"text teacher {name}, its own space"] = {k: {"values": [v], "seedless": True} for k, v in ref.items()}
    for cells in rows.values():
        for cell in cells.values():
            if cell["values"]:
                cell["mean"], cell["std"] = mean_std(cell["values"])
    clip.write_json(os.path.join(root, "table.json"), {"seeds": seeds, "rows": rows})

    def shown(key, found):
        return show(key, found.get("values", []), None if "seedless" in found else len(seeds))

    def markdown(columns):  # the rows with a value in these columns
        lines = ["| | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        return "\n".join(lines + [f"| {row} | " + " | ".join(shown(k, cells.get(k, {})) for k, _ in columns) + " |"
                                  for row, cells in rows.items() if any(cells.get(k, {}).get("values") for k, _ in columns)])
    with clip.atomic(os.path.join(root, "table.md")) as tmp, open(tmp, "w") as f:
        f.write(f"mean ± std over seeds {' '.join(map(str, seeds))} (sample std); the sweep's runs took "
                f"{wall / 60:.0f} min of wall time\n\n{markdown(TABLE)}\n\nVocabulary tiers (zero-shot on seen "
                f"combinations, prompts in each tier's words; probe: nearest common word right, %)\n\n"
                f"{markdown(TIER_TABLE)}\n\nPer-seed differences (mean [seed by seed]), where both rows have every "
                f"seed:\n\n" + "\n".join(claims(rows, seeds)) + "\n")
    return rows


def claims(rows, seeds):
    """One line per CLAIMS pair whose rows both have every seed: the difference in each of its keys
    (CLAIM_KEYS unless the pair names others)."""
    label = {folder: row for folder, row, _, _ in SWEEP}
    lines = []
    for a, b, *keys in CLAIMS:
        ra, rb = rows.get(label.get(a), {}), rows.get(label.get(b), {})
        parts = []
        for key, name in (keys[0] if keys else CLAIM_KEYS):
            va, vb = ra.get(key, {}).get("values", []), rb.get(key, {}).get("values", [])
            if len(va) == len(vb) == len(seeds):
                parts.append(f"{name} {seed_diffs(va, vb)}")
        if parts:
            lines.append(f"- {a} − {b}: " + "; ".join(parts))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Every other flag is train.py's "
                                "(python train.py --help) and goes to every row.")
    p.add_argument("--pretrain-teacher", action="store_true", help="(re)build weights/shapes-teacher.pt and its manifest "
                   "(PRETRAIN_RECIPE into runs/pretrain-teacher, resumable; evaluated in float16) and exit")
    p.add_argument("--tune", nargs="?", const="cid", choices=list(TUNE_GRIDS), help="choose a grid's flags on "
                   "validation (TUNE_GRIDS into runs/tune, resumable) and exit: cid (default) CLIP-CID's --cd-weight "
                   "and balance threshold, balance the rule's --balance-copies, gemma the Gemma teacher's --pool and --emb-weight, gemma-std the same with "
                   "--standardise-target")
    p.add_argument("--ship-reference", action="store_true", help="(re)make the front door's plain CLIP reference "
                   "(weights/clip-reference-*.json) and exit")
    p.add_argument("--real", metavar="CSV", help="the real-image table on this CSV (with a 'category' column: python "
                   "docs/convert_folder.py FOLDER --out DIR writes DIR/pairs.csv) into runs/real, resumable, and exit")
    p.add_argument("--out", default=None, help="the sweep's folder (default runs/sweep; --tune: runs/tune; --real: runs/real)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="only these rows: " + ", ".join(f for f, _, _, _ in SWEEP))
    p.add_argument("--em-steps", type=int, nargs=2, default=[600, 400], metavar=("AUTOENCODER", "ADAPTER"),
                   help="steps of the EM probe's two stages")
    a, flags = p.parse_known_args(argv)
    unknown = [r for r in a.rows or [] if r not in {f for f, _, _, _ in SWEEP}]
    if unknown:
        p.error(f"--rows {' '.join(unknown)}: no such row")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("error: run docs/reproduce.py in one process (it runs its rows one after another)")
    try:
        if a.pretrain_teacher:
            print(json.dumps(pretrain_teacher(train.parse_args(flags).device), indent=2))
        elif a.ship_reference:
            print(f"wrote {ship_reference(flags)}")
        elif a.tune:
            tune(a, flags)
        elif a.real:
            real(a, flags)
        else:
            sweep(a, flags)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
