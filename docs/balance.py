"""Semantic balance against the truth: which pairs does it remove, at which threshold?

The embedded set knows its near-duplicates: a pair with `dup_of` >= 0 (data.ShapesDataset) is the
same scene as pair `dup_of` drawn again, with new pixel noise and a new caption. A scene drawn n
times holds n - 1 redundant pairs. `python docs/balance.py` embeds each seed's training pairs with
the CLIP teacher (the teacher store, shared with train.py --method cid), runs losses.semantic_balance
at each threshold and scores what it removed against that truth:

- removed: the share of the pairs it drops;
- precision: the share of the removed pairs whose scene is still kept (a redundant pair: nothing lost);
- recall: the share of the redundant pairs it removed;
- scenes lost: the share of the distinct scenes with no pair left (what balance takes from the data);
- classes hit: shape x colour classes that lose a scene, and of those the rarest quarter's.

The same for train.py's default rule (--balance-copies Q: the threshold is the Q-quantile of the
teacher's cosine between an image and its JPEG re-save, losses.copy_cosines), whose threshold
each seed reads off its own teacher and data. Then the cosines behind it: the teacher's cosine
between each duplicate and its original, between an image and its JPEG re-save, and between each
original scene and its nearest other scene.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import losses  # noqa: E402
import teachers  # noqa: E402
import train  # noqa: E402


def truth_scores(keep, dup_of, labels):
    """keep (N,) bool from balance; dup_of (N,) int64 (-1: an original scene); labels (N,) class ->
    {removed, precision, recall, scenes_lost, classes_hit, rare_classes_hit} (shares in %, counts)."""
    scene = np.where(dup_of >= 0, dup_of, np.arange(len(dup_of)))  # (N,) each pair's original
    kept_scene = np.zeros(len(dup_of), bool)
    kept_scene[scene[keep]] = True  # scenes with a pair left
    removed = ~keep
    redundant = len(dup_of) - len(np.unique(scene))  # n - 1 per scene drawn n times
    true_removed = int((removed & kept_scene[scene]).sum())  # removed, its scene still there
    lost = np.unique(scene[~kept_scene[scene]])  # scenes with no pair left
    counts = np.bincount(labels, minlength=64)
    rare = set(np.argsort(counts)[np.count_nonzero(counts == 0):][:max(1, np.count_nonzero(counts) // 4)].tolist())
    hit = set(labels[lost].tolist())
    return {"removed": 100.0 * removed.mean(), "precision": 100.0 * true_removed / max(1, removed.sum()),
            "recall": 100.0 * true_removed / max(1, redundant),
            "scenes_lost": 100.0 * len(lost) / len(np.unique(scene)), "classes_hit": len(hit),
            "rare_classes_hit": len(hit & rare), "rare_classes": len(rare)}


def cosines(emb, dup_of):
    """The teacher's cosine between each duplicate and its original, and between each original and
    its nearest other original: (dup (D,), nearest (O,)) as numpy, emb (N, D) unit rows."""
    emb = torch.as_tensor(np.asarray(emb, dtype=np.float32))
    dups = np.nonzero(dup_of >= 0)[0]
    dup = (emb[dups] * emb[dup_of[dups]]).sum(1).numpy()
    originals = torch.as_tensor(np.nonzero(dup_of < 0)[0])
    nearest = []
    for a in range(0, len(originals), 2048):  # (block, O) at a time
        sim = emb[originals[a:a + 2048]] @ emb[originals].t()
        sim[torch.arange(len(sim)), torch.arange(a, a + len(sim))] = -2  # not itself
        nearest.append(sim.max(1).values)
    return dup, torch.cat(nearest).numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995])
    p.add_argument("--copies", type=float, nargs="+", default=[0.9, 0.75, 0.5], help="quantiles of the rule (--balance-copies)")
    p.add_argument("--teacher", default="pretrained", help="as train.py's --teacher: pretrained, own, a run folder or "
                   "a Hugging Face CLIP")
    p.add_argument("--n-train", type=int, default=None, help="default: the preset's")
    p.add_argument("--store", default=os.path.join("runs", "store"))
    a = p.parse_args(argv)
    rows, dup_cos, near_cos, copy_cos = {f"{t}": [] for t in a.thresholds}, [], [], []
    chosen = {q: [] for q in a.copies}  # each seed's threshold under the rule
    for seed in a.seeds:
        args = train.parse_args(["--method", "cid", "--seed", str(seed), "--store", a.store, "--teacher", a.teacher]
                                + (["--n-train", str(a.n_train)] if a.n_train else []))
        stream = train.make_stream(args)
        spec = teachers.clip_teacher(args.teacher, train.default_teacher_dir(args), stream.fingerprint,
                                     lambda tdir: train.train_own_teacher(args, stream, tdir))[0]  # as --method cid does
        teacher = teachers.load_clip_teacher(spec, "cpu")
        store, _ = teachers.open_store(stream, teacher, args.store, teachers.data_name(args.data, stream.pairs),
                                       args.store_dtype, args.workers)
        if not torch.equal(stream.pool, torch.arange(len(stream.ds))):  # dup_of indexes the whole set
            raise SystemExit("error: the teacher could not embed every training pair; dup_of would not line up")
        emb = store.rows("image", stream.pool)  # (N, D) every training pair's teacher image embedding
        dup_of, labels = stream.ds.attributes["dup_of"].numpy(), stream.ds.attributes["label"].numpy()
        d, n = cosines(emb, dup_of)
        dup_cos.append(d)
        near_cos.append(n)
        copy_cos.append(losses.copy_cosines(store, teacher, stream.pairs, stream.pool, seed=seed))
        for q in a.copies:
            chosen[q].append(losses.copy_threshold(copy_cos[-1], q))  # as train.py reads it
        for t, label in [(t, f"{t}") for t in a.thresholds] + [(chosen[q][-1], f"copies {q}") for q in a.copies]:
            keep, _, _ = losses.semantic_balance(emb.numpy(), t)
            rows.setdefault(label, []).append(truth_scores(keep, dup_of, labels))
    print(f"\nteacher {teacher.name}, seeds {' '.join(map(str, a.seeds))}, {len(emb)} pairs each: mean (min-max) over seeds")
    keys = ["removed", "precision", "recall", "scenes_lost", "classes_hit", "rare_classes_hit"]
    print("| cos >= | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for label, scores in rows.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in scores], float)
            cells.append(f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})" if k not in ("classes_hit", "rare_classes_hit")
                         else f"{v.mean():.1f} ({int(v.min())}-{int(v.max())})")
        rule = label.startswith("copies")
        shown = f"{label}: {' '.join(f'{t:.4f}' for t in chosen[float(label.split()[1])])}" if rule else label
        print(f"| {shown} | " + " | ".join(cells) + " |")
    dup_cos, near_cos, copy_cos = np.concatenate(dup_cos), np.concatenate(near_cos), np.concatenate(copy_cos)
    pct = [1, 5, 10, 25, 50, 90]
    print(f"\ncos(duplicate, its original), {len(dup_cos)} pairs: percentiles "
          + ", ".join(f"{q}%: {np.percentile(dup_cos, q):.4f}" for q in pct))
    print(f"cos(image, its JPEG re-save), {len(copy_cos)} images: percentiles "
          + ", ".join(f"{q}%: {np.percentile(copy_cos, q):.4f}" for q in pct))
    print(f"cos(original, its nearest other original), {len(near_cos)} scenes: percentiles "
          + ", ".join(f"{q}%: {np.percentile(near_cos, q):.4f}" for q in (50, 75, 95, 99)))
    return rows


if __name__ == "__main__":
    main()
