"""One prepared GPU check, one table: `bash docs/gpu_check.sh` (at most 8 minutes on one H100).

On a machine with no GPU it runs the same steps at tiny sizes on the CPU and prints the same table, in under 3
minutes; `--smoke` is its smallest form (seconds: what test_all.py runs, so that it cannot rot). The rows:
- the device and the versions; the bf16 matmul peak measured here (float32 on a CPU);
- the `gpu` preset's training step (losses.train_step: its student, batch and text length), eager and under
  torch.compile: ms, samples/s and MFU, its FLOPs (counted as train.py counts them) over that peak;
- the own teacher's store rows under bf16 autocast (teachers.OwnClipTeacher on CUDA) against float32's;
- a phase breakdown of `python train.py --method cid` on the `gpu` preset, shortened (--steps, --n-train), from its
  results.json (phase_seconds), and the share of everything before the first step in a full preset run, the loop
  scaled to the preset's steps;
- k-means of N x D rows into K clusters (Lloyd, kmeans.fit) on this device and on the CPU, and the assignment
  (kmeans.assign) against a plain matmul of the same shapes, in rows/s;
- the CUDA tests of test_all.py (-k cuda).
Targets on an H100 (docs/performance.md): the step at >= 40% MFU in bf16, the assignment at >= 60% of the matmul's
rate, everything before the first step <= 10% of the run.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402
import kmeans  # noqa: E402
import losses  # noqa: E402
import teachers  # noqa: E402
import train  # noqa: E402

# What each form runs. gpu: the gpu preset itself; cpu: the same steps, tiny; smoke: the smallest form.
FORMS = {
    "gpu": dict(model=None, batch=None, matmul=8192, steps=20, run=["--steps", "200", "--n-train", "100000"],
                kmeans=(1_000_000, 512, 1000), kmeans_iters=5, rows=2000, compile=True, tests=True),
    "cpu": dict(model="small", batch=256, matmul=1024, steps=10, run=["--model", "tiny", "--steps", "40", "--n-train",
                "4000", "--n-eval", "400", "--batch-size", "64"], kmeans=(50_000, 128, 100), kmeans_iters=3, rows=500,
                compile=True, tests=False),
    "smoke": dict(model="tiny", batch=32, matmul=256, steps=2, run=["--model", "tiny", "--steps", "6", "--n-train", "600",
                  "--n-eval", "100", "--batch-size", "32", "--clusters", "8"], kmeans=(4000, 32, 16), kmeans_iters=2,
                  rows=64, compile=False, tests=False),
}


def timed(fn, device, repeat=1, warmup=True):  # seconds per call (after one warmup call); waits for the device
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    if warmup:
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def matmul_peak(device, n):
    """FLOP/s of an n x n matmul, the best of 5 timings of 5: bf16 on a GPU, float32 on a CPU (its step's dtype)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / min(timed(lambda: a @ a, device, repeat=5) for _ in range(5)), str(dtype).split(".")[-1]


def step_rows(device, form, peak):
    """The preset's training step: (name, ms, samples/s, MFU %) eager and compiled."""
    args = train.parse_args(["--device", str(device), "--method", "clip", "--n-train", str(max(4096, 4 * (form["batch"] or 0))),
                             *(["--model", form["model"], "--batch-size", str(form["batch"])] if form["model"] else [])])
    stream = train.make_stream(args)
    model = clip.build(args.model, image_size=args.image_size, merges=stream.merges).to(device)
    model.text.trim = device.type != "cuda"  # as train.train
    cfg = train.loss_config(args)
    optimizer = clip.make_optimizer([model], args.lr, args.weight_decay, fused=device.type == "cuda")
    eager = losses.Student(model, nn.ModuleDict(), {}, cfg)
    batches = [losses.on_device(stream.batch(i), i, device) for i in range(form["steps"] + 1)]
    step = lambda net, b: losses.train_step(net, b, optimizer, cfg.weights, args.grad_clip, [model.logit_scale],  # noqa: E731
                                           amp=device.type == "cuda")
    flops = clip.count_flops(lambda: step(eager, batches[0]))[1]
    rows = []
    for name, net in [("eager", eager)] + ([("torch.compile", torch.compile(eager))] if form["compile"] else []):
        try:
            t = timed(lambda: [step(net, b) for b in batches[1:]], device) / form["steps"]
            rows.append((f"step, {args.model} student, batch {args.batch_size}, {name}",
                         f"{1000 * t:.1f} ms, {args.batch_size / t:,.0f} samples/s, MFU {100 * flops / t / peak:.0f}%"
                         f" ({flops / 1e12:.3f} TFLOP)", ">= 40% MFU (H100, bf16)"))
        except Exception as e:  # a compiler that cannot run here: said, not fatal
            rows.append((f"step, {name}", f"failed: {str(e).splitlines()[0][:80]}", ""))
    return rows


@torch.no_grad()
def teacher_rows(device, n):
    """The pretrained teacher's image and text rows of n embedded pairs under bf16 autocast against float32."""
    ds, model = data.ShapesDataset("train", n, seed=0), teachers.OwnClipTeacher(teachers.PRETRAINED, device).model

    def rows(amp):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return torch.cat([model.encode_image(clip.to_input(ds.images, device)),
                              model.encode_text(model.tokenize(ds.captions).to(device))]).float()
    fp32, bf16 = rows(False), rows(True)
    cos = torch.nn.functional.cosine_similarity(fp32, bf16)
    return [(f"teacher rows, bf16 autocast vs float32 ({2 * n} rows)",
             f"max abs difference {(fp32 - bf16).abs().max().item():.4f}, min cos {cos.min().item():.5f}", "")]


def phase_rows(device, form, out):
    """`train.py --method cid` on the gpu preset, shortened: where its time went."""
    res = train.main(["--method", "cid", "--device", str(device), "--preset", "gpu", "--teacher", "pretrained",
                      "--no-vs-clip", "--overwrite", "--out", out, "--store", os.path.join(out, "store"), *form["run"]])
    p, steps = res["phase_seconds"], res["steps"]
    before = sum(p[k] for k in ("data", "teacher", "teacher_store", "balance", "kmeans"))
    full = before + p["loop"] / steps * train.PRESETS["gpu"]["steps"] + p["eval"]
    return [(f"phase seconds, cid on the gpu preset, {steps} steps", ", ".join(f"{k} {v:.1f}" for k, v in p.items()), ""),
            ("before the first step, of a full preset run (loop scaled)", f"{100 * before / full:.1f}%", "<= 10%")]


def kmeans_rows(device, form):
    n, d, k = form["kmeans"]
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
    c = x[torch.randperm(n, device=device)[:k]]
    fit = {dev: timed(lambda: kmeans.fit(x.to(dev), k, iters=form["kmeans_iters"], seed=0, init="random", device=dev),
                      dev, warmup=False) for dev in dict.fromkeys([str(device), "cpu"])}
    assign = timed(lambda: kmeans.assign(x, c, device=device), device, repeat=3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xm, cm = x.to(dtype), c.to(dtype)
    matmul = timed(lambda: (xm @ cm.t()).argmax(1), device, repeat=3)
    return [(f"k-means fit, {n:,} x {d} into {k}, {form['kmeans_iters']} Lloyd iterations",
             ", ".join(f"{dev} {t:.2f} s" for dev, t in fit.items()), "GPU well under the CPU"),
            (f"k-means assign vs a plain {str(dtype).split('.')[-1]} matmul + argmax",
             f"{n / assign:,.0f} vs {n / matmul:,.0f} rows/s: {100 * matmul / assign:.0f}%", ">= 60%")]


def test_rows():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "test_all.py", "-k", "cuda"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [("CUDA tests (test_all.py -k cuda)", done.stdout.strip().splitlines()[-1] if done.stdout else done.stderr[-200:], "all pass")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the smallest form, in seconds (on any device)")
    p.add_argument("--out", default=os.path.join("runs", "gpu-check"), help="the phase run's folder")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    form = FORMS["smoke"] if a.smoke else FORMS["gpu" if device.type == "cuda" else "cpu"]
    t0 = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    peak, dtype = matmul_peak(device, form["matmul"])
    rows = [("device", f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}", ""),
            (f"matmul peak, {form['matmul']}^2 {dtype}", f"{peak / 1e12:.2f} TFLOP/s", "")]
    rows += step_rows(device, form, peak) + teacher_rows(device, form["rows"]) + phase_rows(device, form, a.out)
    rows += kmeans_rows(device, form) + (test_rows() if form["tests"] else [])
    print(f"\n| check ({'smoke' if a.smoke else device.type} form, {time.time() - t0:.0f} s) | measured | target |\n"
          "|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
