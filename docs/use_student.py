"""The trained student outside this codebase: your own images, and the export to Hugging Face.

`python docs/use_student.py --ckpt DIR --images FOLDER [--labels "cat,dog" | --labels FILE]`
zero-shots every image under FOLDER (eval.zero_shot): one line per image, its class and
probability; where an image lies in a subfolder named after a label, the accuracy.
`python docs/use_student.py --ckpt DIR --export-hf OUT` writes OUT for transformers'
CLIPModel, AutoTokenizer and AutoProcessor (offline), reads it back and says how close it is.
In Python: `model, preprocess, tokenize = clip.load(DIR)`, then `eval.zero_shot(model, paths, names)`.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import clip  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402


# ----------------------------------------------------------------------------------------
# Export to Hugging Face (transformers' CLIPModel, the same network under its names). Our towers
# are CLIP's (pre-norm blocks, exact GELU, LayerNorm eps 1e-5, class-token and end-of-text
# pooling, no projection bias), so the weights are renamed, not converted: the fused qkv is
# split into q, k, v and the projections W_i, W_t are transposed into nn.Linear weights. The
# tokenizer is rebuilt in the `tokenizers` library from the same parts: the pieces of WORD, the
# bytes, our merges in order, SOT ... EOT around the ids (clip.SOT, clip.EOT).

def hf_config(cfg):
    """Our CLIPConfig -> transformers.CLIPConfig: the sizes, exact GELU (transformers' default is
    quick_gelu), the text tower pooling at the first EOT (eos_token_id) and padding with PAD."""
    from transformers import CLIPConfig as HFConfig
    text = dict(vocab_size=clip.N_BASE + len(cfg.merges), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                pad_token_id=clip.PAD, bos_token_id=clip.SOT, eos_token_id=clip.EOT, projection_dim=cfg.embed_dim)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=cfg.embed_dim)
    return HFConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def hf_block(block, prefix):  # one Block -> {transformers' CLIPEncoderLayer name: tensor}
    out = {}
    for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("proj", "self_attn.out_proj"),
                         ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
        for kind in ("weight", "bias"):
            out[f"{prefix}.{theirs}.{kind}"] = block.get_submodule(ours).get_parameter(kind)
    for kind in ("weight", "bias"):  # qkv (3W, ...) rows: q, then k, then v, each head after head
        for name, part in zip("qkv", block.qkv.get_parameter(kind).chunk(3)):
            out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part
    return out


def hf_state_dict(model):
    """Our parameters under transformers' CLIPModel names."""
    v, t, out = model.visual, model.text, {}
    for prefix, ours in (("vision_model.pre_layrnorm", v.ln_pre), ("vision_model.post_layernorm", v.ln_post),
                         ("text_model.final_layer_norm", t.ln_final)):
        out.update({f"{prefix}.weight": ours.weight, f"{prefix}.bias": ours.bias})
    for i, b in enumerate(v.blocks):
        out.update(hf_block(b, f"vision_model.encoder.layers.{i}"))
    for i, b in enumerate(t.blocks):
        out.update(hf_block(b, f"text_model.encoder.layers.{i}"))
    out.update({"vision_model.embeddings.patch_embedding.weight": v.patchify.weight,
                "vision_model.embeddings.class_embedding": v.cls_token,
                "vision_model.embeddings.position_embedding.weight": v.pos_emb,
                "text_model.embeddings.token_embedding.weight": t.token_emb.weight,
                "text_model.embeddings.position_embedding.weight": t.pos_emb,
                "visual_projection.weight": model.image_proj.t(),  # (D, W): x @ W_i == Linear(x)
                "text_projection.weight": model.text_proj.t(), "logit_scale": model.logit_scale})
    return {k: x.detach().float().cpu().contiguous() for k, x in out.items()}


# WORD for the `tokenizers` library (Oniguruma regexes): Python's \w, \d and \s spelt out as the
# Unicode classes they mean in Python's re (\w: letters and every number, \d: decimal digits,
# \s: also the separators \x1c-\x1f). A letter run ([^\W\d_]) is then letters, letter-numbers
# and other numbers; '_' goes with the punctuation. Exact for every character Python's
# unicodedata knows; a character newer than it may split otherwise.
SPACE = r"\s\x{1c}-\x{1f}"
HF_WORD = (rf" ?[\p{{L}}\p{{Nl}}\p{{No}}]+| ?\p{{Nd}}+| ?[^{SPACE}\p{{L}}\p{{N}}]+|[{SPACE}]+(?![^{SPACE}])|[{SPACE}]+")


def byte_chars():
    """Byte -> the printable character GPT-2's byte-level BPE (and tokenizers' ByteLevel) writes it as."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = iter(range(256, 512))
    return {b: chr(b if b in keep else next(moved)) for b in range(256)}


SPECIAL = {clip.PAD: "<|pad|>", clip.SOT: "<|startoftext|>", clip.EOT: "<|endoftext|>"}


def hf_tokenizer(cfg):
    """Our Tokenizer as a transformers tokenizer (a `tokenizers` BPE): the same ids for a caption
    called with truncation=True (cut to context_length, EOT kept), padded with PAD by
    padding="max_length" or padding=True. Special-token text in a caption is read as bytes, as ours
    reads it (split_special_tokens)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    char = byte_chars()
    strings = {b + 1: char[b] for b in range(256)}  # id -> its bytes as characters
    for i, (a, b) in enumerate(cfg.merges):
        strings[clip.N_BASE + i] = strings[a] + strings[b]
    vocab = {s: i for i, s in strings.items()}
    if len(vocab) != len(strings):
        print(f"warning: {len(strings) - len(vocab)} merges give bytes another merge gives; the exported "
              "tokenizer gives one id for them")
    vocab.update({s: i for i, s in SPECIAL.items()})
    tok = HFTokenizer(models.BPE(vocab, [(strings[a], strings[b]) for a, b in cfg.merges]))
    pieces = [pre_tokenizers.Split(Regex(HF_WORD), behavior="removed", invert=True)] if cfg.merges else []  # as encode
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[clip.SOT]} $A {SPECIAL[clip.EOT]}",
        special_tokens=[(SPECIAL[clip.SOT], clip.SOT), (SPECIAL[clip.EOT], clip.EOT)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[clip.SOT], eos_token=SPECIAL[clip.EOT],
                                   pad_token=SPECIAL[clip.PAD], model_max_length=cfg.context_length, padding_side="right",
                                   split_special_tokens=True)


def write_hf(model, out):
    """Write `out`, a folder that transformers' CLIPModel.from_pretrained, AutoTokenizer and
    AutoProcessor read offline: the weights (hf_state_dict), the tokenizer (hf_tokenizer) and a
    CLIPImageProcessor with our preprocessing (shorter side to S, bicubic; centre crop; clip.MEAN, clip.STD)."""
    from transformers import CLIPImageProcessor, CLIPModel as HFModel, CLIPProcessor
    hf = HFModel(hf_config(model.cfg))
    hf.load_state_dict(hf_state_dict(model))
    hf.save_pretrained(out)
    S = model.cfg.image_size
    images = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, resample=3,  # PIL's BICUBIC
                                image_mean=[clip.MEAN] * 3, image_std=[clip.STD] * 3)
    CLIPProcessor(image_processor=images, tokenizer=hf_tokenizer(model.cfg)).save_pretrained(out)
    return hf


# ----------------------------------------------------------------------------------------
def class_key(name):  # 'Golden_Retriever' and 'golden retriever' name one class
    return " ".join(name.replace("_", " ").lower().split())


def image_folder(folder):
    """Every image under folder -> [(path relative to it, its first subfolder or None)], sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder}: no such folder")
    found = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                   for f in fs if f.lower().endswith(data.IMAGE_EXTS))
    if not found:
        raise ValueError(f"--images {folder}: no {', '.join(data.IMAGE_EXTS)} image in it")
    return [(rel, rel.split(os.sep)[0] if os.sep in rel else None) for rel in found]


def read_images(folder, files, image_size):  # relative paths -> (N, 3, S, S) uint8, or one line naming the unreadable
    images, bad = [], []
    for rel in files:
        try:
            images.append(clip.load_image(os.path.join(folder, rel), image_size))
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(rel)
    if bad:
        raise ValueError(f"--images {folder}: {len(bad)} of {len(files)} files are not readable images: "
                         f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} (remove them)")
    return torch.stack(images)


def read_labels(spec, classes):
    """--labels 'cat,dog' or a file with a class name a line; None: the folder's subfolder names."""
    if spec is None:
        names = sorted({c.replace("_", " ") for c in classes if c})
        if len(names) < 2:
            raise ValueError("give --labels 'cat,dog,...' (or a file, a name a line): the folder has no class subfolders")
    else:
        try:
            lines = open(spec, encoding="utf-8").read().splitlines() if os.path.isfile(spec) else spec.split(",")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--labels {spec}: cannot read it ({e.__class__.__name__})") from None
        names = [n.strip() for n in lines if n.strip()]
        if len(names) < 2:
            raise ValueError(f"--labels {spec!r}: {len(names) or 'no'} class name{'s' * (len(names) != 1)}; "
                             "zero-shot needs at least 2")
    twice = sorted({n for n in names if [class_key(m) for m in names].count(class_key(n)) > 1})
    if twice:
        raise ValueError(f"--labels: {', '.join(twice)} given twice")
    return names


def classify_folder(model, folder, labels, device):
    """--images: print each image's zero-shot class and probability; where the image lies in a
    subfolder named after a label, the accuracy over those images. -> the summary dict."""
    items = image_folder(folder)
    names = read_labels(labels, [c for _, c in items])
    images = read_images(folder, [rel for rel, _ in items], model.cfg.image_size)  # (N, 3, S, S) uint8
    p, pred = evaluation.zero_shot(model, images, names, device=device).max(1)  # (N,) probability and index of the top class
    width, name_width = max(len(rel) for rel, _ in items), max(map(len, names))
    for (rel, _), k, q in zip(items, pred.tolist(), p.tolist()):
        print(f"{rel:{width}s}  {names[k]:{name_width}s}  {q:.3f}")
    index = {class_key(n): k for k, n in enumerate(names)}
    truth = [(i, index[class_key(c)]) for i, (_, c) in enumerate(items) if c is not None and class_key(c) in index]
    res = {"images": len(items), "classes": len(names)}
    if truth:
        right = sum(int(pred[i]) == k for i, k in truth)
        res.update(accuracy=100.0 * right / len(truth), scored=len(truth))
        print(f"zero-shot accuracy {res['accuracy']:.1f}% ({right} of {len(truth)} images in a subfolder named after a "
              f"label; {len(items) - len(truth)} not scored)")
    return res


@torch.no_grad()
def compare_hf(model, folder, n=64):
    """Our model against its export read back by transformers (offline, the folder's own
    AutoProcessor): max |difference| of the unit image and text embeddings on n embedded test
    images and their captions (and a few odd ones), and whether the token ids are equal."""
    from transformers import AutoProcessor, CLIPModel as HFModel
    device = model.logit_scale.device
    hf = HFModel.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    test = data.ShapesDataset("test", n, image_size=model.cfg.image_size)
    captions = test.captions + ["", "y" * 500, "naïve café, 3 × 4!", "日本語のキャプション", "<|endoftext|> a_b\t  x²"]
    ids = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    pixels = processor(images=[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in test.images],
                       return_tensors="pt")["pixel_values"]
    image = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text = F.normalize(hf.get_text_features(**ids).pooler_output, dim=-1)
    return {"image_max_abs_diff": (image - evaluation.embed_images(model, test.images, device)).abs().max().item(),
            "text_max_abs_diff": (text - evaluation.embed_texts(model, captions, device)).abs().max().item(),
            "token_ids_equal": torch.equal(ids["input_ids"], model.tokenize(captions)), "n_images": n,
            "n_captions": len(captions)}


def export_hf(model, out):
    """--export-hf: write the folder (write_hf), read it back, say how close it is."""
    if os.path.isfile(out):
        raise ValueError(f"--export-hf {out}: a file is there; give a folder")
    write_hf(model, out)
    res = compare_hf(model, out)
    print(f"wrote {out}; read back by transformers (CLIPModel, AutoProcessor) against ours on {res['n_images']} test "
          f"images and {res['n_captions']} captions: "
          f"image embeddings max |diff| {res['image_max_abs_diff']:.1e}, text {res['text_max_abs_diff']:.1e}, "
          f"token ids {'equal' if res['token_ids_equal'] else 'DIFFERENT'}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run folder (DIR/ckpt.pt) or checkpoint file")
    p.add_argument("--images", metavar="FOLDER", help="zero-shot every image under FOLDER: its class and probability; "
                                                         "with class subfolders, the accuracy")
    p.add_argument("--labels", help="with --images: class names, 'cat,dog,...' or a file with one a line (default: "
                                    "the subfolder names)")
    p.add_argument("--export-hf", metavar="OUT", help="write --ckpt as a Hugging Face folder (CLIPModel, AutoTokenizer, "
                                                      "AutoProcessor) and check it against ours")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists the flags)\n")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available here")
    if a.labels is not None and not a.images:
        p.error("--labels goes with --images FOLDER")
    if not (a.images or a.export_hf):
        p.error("give --images FOLDER or --export-hf OUT")
    try:
        model, _ = clip.load_checkpoint(a.ckpt, a.device)
        return {**(export_hf(model, a.export_hf) if a.export_hf else {}),
                **(classify_folder(model, a.images, a.labels, a.device) if a.images else {})}
    except (OSError, ValueError) as e:  # a missing file or folder, unreadable input
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
