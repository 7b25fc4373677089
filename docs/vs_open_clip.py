"""Our training step against open_clip's CLIP built to the same architecture, side by side.

open_clip is never a dependency of this project: install it in a private venv, with this
repository's requirements, and run this script from the repository root with that venv's python:

    python3 -m venv ~/oc && ~/oc/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy tqdm transformers open_clip_torch
    ~/oc/bin/python docs/vs_open_clip.py            # the CPU preset: small model, batch 256

Each side trains the same batches of the embedded data (CLIP loss, AdamW, the same settings):
open_clip's CLIP (its own towers, its ClipLoss, its text tower over the whole context with its
causal mask) on our byte tokens, whose end-of-text is the largest id as its `argmax` pooling
expects; ours on the same byte tokens; ours on the byte-pair tokens a run learns by default.
Prints ms per step and samples/s; the ratios are measured in this one process.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402


def open_clip_model(cfg):
    """open_clip.model.CLIP with our size's widths, depths, heads, patch, context and vocabulary."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
                           patch_size=cfg.patch_size, image_size=cfg.image_size)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=clip.N_BASE, width=cfg.text_width,
                       heads=cfg.text_heads, layers=cfg.text_layers)
    return CLIP(cfg.embed_dim, vision, text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="every side timed this many times, in turn")
    a = p.parse_args()
    from open_clip.loss import ClipLoss
    torch.manual_seed(0)
    args = train.parse_args(["--model", a.model, "--batch-size", str(a.batch_size), "--device", "cpu"])
    stream = train.make_stream(args)
    bpe_batches = [stream.batch(i) for i in range(a.steps + 3)]
    byte_batches = [{**b, "tokens": clip.tokenize([stream.ds.captions[int(i)] for i in b["index"]],
                                                  clip.SIZES[a.model].context_length)} for b in bpe_batches]
    ours_bytes = clip.build(a.model)
    ours_bpe = clip.build(a.model, merges=stream.merges)
    theirs = open_clip_model(ours_bytes.cfg)
    clip_loss = ClipLoss()

    def our_step(model, opt):
        def step(b):
            loss = losses.clip_loss(model.encode_image(clip.to_input(b["images"])), model.encode_text(b["tokens"]),
                                    model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def their_step(opt):
        def step(b):
            image, text, scale = theirs(clip.to_input(b["images"]), b["tokens"])[:3]  # (B, D), (B, D), exp(t)
            loss = clip_loss(image, text, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    sides = {"open_clip CLIP, byte tokens (full context, causal mask)": (their_step(clip.make_optimizer([theirs], args.lr, args.weight_decay)), byte_batches),
             "ours, byte tokens": (our_step(ours_bytes, clip.make_optimizer([ours_bytes], args.lr, args.weight_decay)), byte_batches),
             f"ours, byte-pair tokens (--vocab-size {args.vocab_size}, the default)":
                 (our_step(ours_bpe, clip.make_optimizer([ours_bpe], args.lr, args.weight_decay)), bpe_batches)}
    best = {}
    for _ in range(a.rounds):
        for name, (step, batches) in sides.items():
            for b in batches[:3]:
                step(b)
            t = time.time()
            for b in batches[3:]:
                step(b)
            best[name] = min(best.get(name, float("inf")), (time.time() - t) / a.steps)
    print(f"{a.model}, batch {a.batch_size}, {a.steps} steps x {a.rounds} rounds (best round), {torch.get_num_threads()} "
          f"threads; params: open_clip {clip.count_params(theirs):,}, ours {clip.count_params(ours_bytes):,} (bytes) / "
          f"{clip.count_params(ours_bpe):,} (byte-pair)")
    print("| step | ms | samples/s | vs open_clip |\n|---|---|---|---|")
    base = best[next(iter(sides))]
    for name, t in best.items():
        print(f"| {name} | {1000 * t:.1f} | {a.batch_size / t:.0f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
