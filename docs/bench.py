"""The step bench: how fast is the student's training step, and why?

`python docs/bench.py` (add --device cuda on a GPU, and any train.py flag: --model, --batch-size,
--vocab-size) times train.py's own update (`train.train_step`: the CLIP loss, backward,
clipping, AdamW, the logit-scale clamp) on the preset's real batches: first a naive version
(byte tokens, textbook attention over every context position, fp32), then each optimisation in
turn, each row adding one. Then each tower alone. FLOP/s are against the matmul peak measured on
this device, in the same run. 3 warmup steps, then the mean of --bench-steps.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


def step_flops(model, batch, args, backward=True):
    """FLOPs of one plain-CLIP step on a batch (its loss, + backward and the update if backward),
    counted by torch's FlopCounterMode (matmuls, convolutions and attention; elementwise work is
    not counted): what train.py's loop counts for each new step shape."""
    student = train.Student(model, nn.ModuleDict(), {}, args)
    batch = train.on_device(batch, 0, next(model.parameters()).device)
    if not backward:
        with torch.no_grad():
            return clip.count_flops(lambda: student(batch))[1]
    optimizer = train.make_optimizer([model], 0.0, 0.0)  # lr 0: counting leaves the weights as they were
    return clip.count_flops(lambda: train.train_step(student, batch, optimizer, args, [model.logit_scale], amp=False))[1]


def bench(args, steps):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(args.seed)
    stream = data.ShapesStream(args)
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
        student = train.Student(net, nn.ModuleDict(), {}, args)
        optimizer = train.make_optimizer([net], args.lr, args.weight_decay, fused=fused_adam)
        return lambda b, i: train.train_step(student, train.on_device(b, i, device), optimizer, args, [net.logit_scale], amp)

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
        t = seconds_per_step(lambda b, i: tower(train.on_device(b, i, device)[key]).sum().backward(), batches_)
        length = np.mean([float(b["tokens"].ne(clip.PAD).sum(1).float().mean()) for b in batches_]) if key == "tokens" else None
        print(f"{name} tower forward + backward alone: {1000 * t:.1f} ms"
              + (f" ({length:.1f} tokens per caption)" if length else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Every other flag is train.py's "
                                "(python train.py --help): the batches and model a run with them would train.")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps per row, after 3 warmup steps")
    own, rest = p.parse_known_args(argv)
    args = train.parse_args(rest)
    if args.data not in data.EMBEDDED:
        raise SystemExit("error: the bench times the embedded data's batches (--data shapes)")
    bench(args, own.bench_steps)


if __name__ == "__main__":
    main()
