"""Three benches: the student's training step, k-means, and CLIP-CID's store-side work at scale.

1. The step bench: how fast is the student's training step, and why?
`python docs/bench.py` (add --device cuda on a GPU, and any train.py flag: --model, --batch-size,
--vocab-size) times train.py's own update (`losses.train_step`: the CLIP loss, backward,
clipping, AdamW, the logit-scale clamp) on the preset's real batches: first a naive version
(byte tokens, textbook attention over every context position, fp32), then each optimisation in
turn, each row adding one. Then each tower alone. FLOP/s are against the matmul peak measured on
this device, in the same run. 3 warmup steps, then the mean of --bench-steps.

2. The k-means bench: `python docs/bench.py --kmeans [--n --d --k --iters --device]` times
kmeans.fit (k-means++ init, then Lloyd) on synthetic blobs, its inertia against the true
centres', and kmeans.assign with float32 scores and with the bf16 screen.

3. The store bench: `python docs/bench.py --store [--n N [N ...] --d --k --threshold --dir]` times
CLIP-CID's once-per-store work (losses.semantic_balance, bucketed, then spherical k-means as
kmeans.settings_at_scale sets it) on synthetic float16 teacher embeddings read from a memmap.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402
import kmeans  # noqa: E402
import losses  # noqa: E402

# -----------------------------------------------------------------------------
# 1. The step bench: python docs/bench.py [--bench-steps N] [any train.py flag]


def step_flops(model, batch, args, backward=True):
    """FLOPs of one plain-CLIP step on a batch (its loss, + backward and the update if backward),
    counted by torch's FlopCounterMode (matmuls, convolutions and attention; elementwise work is
    not counted): what train.py's loop counts for each new step shape."""
    import train  # here, not at the top: the k-means and store benches run without it (the store bench's peak RSS)
    cfg = train.loss_config(args)
    student = losses.Student(model, nn.ModuleDict(), {}, cfg)
    batch = losses.on_device(batch, 0, next(model.parameters()).device)
    if not backward:
        with torch.no_grad():
            return clip.count_flops(lambda: student(batch))[1]
    optimizer = clip.make_optimizer([model], 0.0, 0.0)  # lr 0: counting leaves the weights as they were
    return clip.count_flops(lambda: losses.train_step(student, batch, optimizer, cfg.weights, args.grad_clip,
                                                     [model.logit_scale], amp=False))[1]


def bench(args, steps):
    import train
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(args.seed)
    stream = train.make_stream(args)
    batches = [stream.batch(i) for i in range(steps + 3)]
    model = clip.build(args.model, image_size=args.image_size, merges=stream.merges).to(device)
    byte_model = clip.build(args.model, image_size=args.image_size).to(device)  # the same, on bytes alone
    byte_batches = [{**b, "tokens": byte_model.tokenize([stream.ds.captions[int(i)] for i in b["index"]])} for b in batches]
    blocks = [m for net in (model, byte_model) for m in net.modules() if isinstance(m, clip.Block)]
    flops = {True: step_flops(model, batches[0], args), False: step_flops(byte_model, byte_batches[0], args)}

    def seconds_per_step(fn, batches):  # fn(batch, i) for 3 warmup batches, then the mean over `steps` batches
        for i, b in enumerate(batches[:3]):
            fn(b, i)
        sync()
        t = time.time()
        for i, b in enumerate(batches[3:]):
            fn(b, i)
        sync()
        return (time.time() - t) / steps

    def timed_step(net, amp, fused_adam):  # train.py's update, on this net
        cfg = train.loss_config(args)
        student = losses.Student(net, nn.ModuleDict(), {}, cfg)
        optimizer = clip.make_optimizer([net], args.lr, args.weight_decay, fused=fused_adam)
        return lambda b, i: losses.train_step(student, losses.on_device(b, i, device), optimizer, cfg.weights, args.grad_clip,
                                             [net.logit_scale], amp)

    # (name, byte-pair tokens, fused attention, padding cut, bf16, fused AdamW)
    variants = [("naive: byte tokens, textbook attention, all 64 text positions, fp32", False, False, False, False, False),
                ("+ fused attention (scaled_dot_product_attention)", False, True, False, False, False),
                ("+ unused padding columns cut", False, True, True, False, False),
                (f"+ byte-pair tokens (--vocab-size {args.vocab_size}): ours" + (" on CPU" if cuda else ""),
                 True, True, True, False, False)]
    if cuda:
        variants += [("+ bf16 autocast", True, True, True, True, False),
                     ("+ fused AdamW: ours on GPU", True, True, True, True, True)]
    peak, n = {}, 8192 if cuda else 1024
    for dtype in [torch.float32] + ([torch.bfloat16] if cuda else []):
        a = torch.randn(n, n, device=device, dtype=dtype)
        peak[dtype] = 2 * n ** 3 / seconds_per_step(lambda b, i: a @ a, batches)
    print(f"bench: {args.model} student, batch {args.batch_size}, {steps} steps, {device}"
          f"{f' ({torch.get_num_threads()} threads)' if not cuda else ''}; "
          f"{flops[True] / 1e9:.1f} GFLOP per step ({flops[False] / 1e9:.1f} on byte tokens); matmul peak measured here "
          + ", ".join(f"{str(d).split('.')[-1]} {p / 1e12:.2f} TFLOP/s" for d, p in peak.items()))
    print("| step | ms | samples/s | vs naive | TFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|")
    base = None
    for name, bpe, fused, trim, amp, fused_adam in variants:
        for b in blocks:
            b.fused = fused
        net, batches_ = (model, batches) if bpe else (byte_model, byte_batches)
        net.text.trim = trim
        t = seconds_per_step(timed_step(net, amp, fused_adam), batches_)
        base = base or t
        rate = flops[bpe] / t
        print(f"| {name} | {1000 * t:.1f} | {args.batch_size / t:.0f} | {base / t:.2f}x | {rate / 1e12:.3f} | "
              f"{100 * rate / peak[torch.bfloat16 if amp else torch.float32]:.0f}% |")
    for name, tower, key, batches_ in (("image", model.encode_image, "images", batches),
                                       ("text, byte tokens", byte_model.encode_text, "tokens", byte_batches),
                                       ("text, byte-pair tokens", model.encode_text, "tokens", batches)):
        t = seconds_per_step(lambda b, i: tower(losses.on_device(b, i, device)[key]).sum().backward(), batches_)
        length = np.mean([float(b["tokens"].ne(clip.PAD).sum(1).float().mean()) for b in batches_]) if key == "tokens" else None
        print(f"{name} tower forward + backward alone: {1000 * t:.1f} ms"
              + (f" ({length:.1f} tokens per caption)" if length else ""))


# -----------------------------------------------------------------------------
# 2. The k-means bench: python docs/bench.py --kmeans [--n --d --k --iters --device]


def blobs(n, d, k, sigma=0.5, seed=0):
    """n points (n, d) around k true centres ~ N(0, I), Gaussian noise of std sigma."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)  # (k, d)
    x = centres[torch.randint(k, (n,), generator=g)] + sigma * torch.randn(n, d, generator=g)
    return x, centres


def _median_seconds(f, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_kmeans(n, d, k, iters, device):
    """kmeans.fit on blobs(n, d, k): time and inertia; then kmeans.assign's speed, float32 and bf16-screened."""
    x, centres = blobs(n, d, k)
    x, centres = x.to(device), centres.to(device)
    print(f"data: {n} x {d} float32 around {k} N(0, I) centres, noise std 0.5; "
          f"K={k}, {iters} iterations, device={device}, threads={torch.get_num_threads()}")
    true = kmeans.inertia(x, centres)

    t0 = time.perf_counter()
    kmeans.fit(x, k, iters=0, verbose=False)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    c, hist = kmeans.fit(x, k, iters=iters, return_history=True, verbose=False)
    total = time.perf_counter() - t0
    final = kmeans.inertia(x, c)
    print(f"k-means++ init: {t_init:.2f} s, Lloyd: {len(hist)} iterations (stops at a fixed point), "
          f"{(total - t_init) / max(len(hist), 1):.3f} s/iter, total: {total:.2f} s")
    print(f"final inertia: {final:.6g} = {final / true:.4f} x the true centres' ({true:.6g})")
    print("inertia / true, per iteration (init first):", " ".join(f"{h / true:.3f}" for h in hist))

    rows, kc = kmeans._blocks(k, d, None, x.device)  # as kmeans.assign by default
    flop = 2.0 * n * k * d
    screened = kmeans._use_bf16(x.device)
    t_assign = {}
    try:
        for use in (False, True) if screened else (False,):  # the module switch, forced each way
            kmeans.BF16 = use
            t_assign[use] = _median_seconds(lambda: kmeans.assign(x, c))
    finally:
        kmeans.BF16 = None  # back to: screen where bf16 is faster
    ct = c.T.contiguous()
    t_mm = _median_seconds(lambda: [x[s:s + rows] @ ct for s in range(0, n, rows)])
    print(f"assignment, float32 scores: {flop / t_assign[False] / 1e9:.1f} GFLOP/s; plain float32 matmul ({rows} x {d}) @ "
          f"({d} x {k}) blocks over the same {n} rows: {flop / t_mm / 1e9:.1f} GFLOP/s")
    if screened:
        shift = kmeans._centre_of(c)  # as assign centres the problem
        near = kmeans._Nearest(c - shift, False, kc)
        doubt = sum(kmeans._screen_bf16(xb, near.c16, near.half_sq, kc, near.c_max)[1].sum().item()
                    for xb in kmeans._chunks(x, rows, x.device, False, shift))
        print(f"assignment, bf16 screen: {flop / t_assign[True] / 1e9:.1f} GFLOP/s "
              f"({t_assign[False] / t_assign[True]:.2f}x float32), {doubt / n:.2%} of the rows scored again in float32")
    else:
        print("assignment: no bf16 screen (a bf16 matmul is not faster than float32 on this device)")


# -----------------------------------------------------------------------------
# 3. The store bench: python docs/bench.py --store [--n N [N ...] --d --k --threshold --dir]:
# CLIP-CID's once-per-store work at scale, on synthetic embeddings.


def synthetic_store(path, n, d, k, dup_frac=0.1, seed=0, chunk=65536):
    """(n, d) float16 memmap of unit vectors around k centres (cos ~0.7 to their centre), a
    dup_frac of them near-copies (cos > 0.999) of an earlier row: teacher embeddings' shape."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        x = F.normalize(centres[torch.randint(k, (m,), generator=g)] + 0.06 * torch.randn(m, d, generator=g), dim=1)
        dup = torch.rand(m, generator=g) < dup_frac
        src = torch.randint(max(1, m), (int(dup.sum()),), generator=g)
        x[dup] = F.normalize(x[src] + 1e-3 * torch.randn(len(src), d, generator=g), dim=1)
        out[a:a + m] = x.numpy().astype(np.float16)
    out.flush()
    return np.load(path, mmap_mode="r")


def bench_store(sizes, d, k, threshold, folder):
    """Per N in sizes: losses.semantic_balance (bucketed), then kmeans.fit + assign of the kept rows, as train.py."""
    import resource
    print(f"semantic balance (bucketed, N / 2000 buckets) + spherical k-means K={k} (kmeans.settings_at_scale, then "
          f"every row assigned), float16 memmap input, D={d}, {torch.get_num_threads()} threads")
    print("| N | balance s | k-means s | total s | removed | peak RSS GB |\n|---|---|---|---|---|---|")
    for n in sizes:
        emb = synthetic_store(os.path.join(folder, f"bench-{n}x{d}.npy"), n, d, k)
        t0 = time.time()
        keep, stats, _ = losses.semantic_balance(emb, threshold, n_buckets=max(1, n // 2000))
        t1 = time.time()
        kept = np.nonzero(keep)[0]
        c = kmeans.fit(emb[kept], k, spherical=True, **kmeans.settings_at_scale(len(kept), k, emb.shape[1]))
        labels, _ = kmeans.assign(emb[kept], c, spherical=True)
        t2 = time.time()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB (Linux)
        print(f"| {n:,} | {t1 - t0:.1f} | {t2 - t1:.1f} | {t2 - t0:.1f} | {stats['removed_fraction']:.1%} | {rss:.2f} |",
              flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--kmeans" in argv:
        p = argparse.ArgumentParser(description="The k-means bench: time kmeans.fit and assign on synthetic blobs.")
        p.add_argument("--kmeans", action="store_true", required=True, help="run this bench")
        p.add_argument("--n", type=int, default=100_000)
        p.add_argument("--d", type=int, default=256)
        p.add_argument("--k", type=int, default=1000)
        p.add_argument("--iters", type=int, default=20)
        p.add_argument("--device", default="cpu")
        a = p.parse_args(argv)
        return bench_kmeans(a.n, a.d, a.k, a.iters, a.device)
    if "--store" in argv:
        p = argparse.ArgumentParser(description="The store bench: time CLIP-CID's store-side work (semantic balance + "
                                    "k-means) at scale.")
        p.add_argument("--store", action="store_true", required=True, help="run this bench")
        p.add_argument("--n", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
        p.add_argument("--d", type=int, default=512)
        p.add_argument("--k", type=int, default=1000)
        p.add_argument("--threshold", type=float, default=0.99)
        p.add_argument("--dir", default="/tmp", help="where the synthetic float16 arrays are written")
        a = p.parse_args(argv)
        return bench_store(a.n, a.d, a.k, a.threshold, a.dir)
    p = argparse.ArgumentParser(description="The step bench: how fast is the student's training step, and why?",
                                epilog="Every other flag is train.py's "
                                "(python train.py --help): the batches and model a run with them would train. "
                                "--kmeans or --store (each with --help) runs the other benches instead.")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per row, after 3 warmup steps")
    own, rest = p.parse_known_args(argv)
    import train
    args = train.parse_args(rest)
    if args.data not in data.EMBEDDED:
        raise SystemExit("error: the bench times the embedded data's batches (--data shapes)")
    bench(args, own.bench_steps)


if __name__ == "__main__":
    main()
