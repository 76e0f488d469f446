"""Benchmark: nanollm's functional encoder against torch.nn.TransformerEncoder, and LoRA against full fine-tuning.

Run:
    python bench.py            # seed config (d_model 512, 6 layers) at batch x seq 2x50 and 16x128; a few minutes
    python bench.py --quick    # a tiny config in seconds, to check that everything runs

Encoder section (issue 2): one process, the same weights in both models, the same settings (dropout 0.1, AdamW).
  train step = forward + cross-entropy on a mean-pooled linear head + backward + AdamW step;
  inference  = forward under torch.no_grad(), eval mode.
  Ours runs with jaxtyping's shape checks on (the default) and off (jaxtyping.config "jaxtyping_disable").
  Targets: train <= 0.95x nn.TransformerEncoder, inference <= 1.0x, checks on <= 3% slower than off at 16x128.
  Where our train step gains: we drop sub-layer outputs and embedding sums only (Vaswani et al. 2017, §5.4), so
  SDPA keeps its flash kernel; nn.TransformerEncoder also drops attention probabilities (forcing SDPA's math
  kernel) and the feed-forward's hidden layer.
LoRA section (issue 3): seed encoder at 16x128, r=8 on attn.q and attn.v; the LoRA step trains adapters + head
  (base frozen, never given to AdamW), the full step trains everything; same batch. Peak memory: a fresh child
  process per mode builds the model, resets Linux's peak-RSS mark (/proc/self/clear_refs), runs two training
  steps and reports VmHWM minus the RSS before them: the memory a step adds at its peak (activations, gradients,
  optimizer state, allocator slack), measured by the kernel. Targets: LoRA step <= 0.75x full, lower peak memory,
  merged inference <= 1.02x base.
Timings are medians over round-robin repetitions (every variant runs once per round), so a noisy neighbour
slows all variants alike instead of one.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jaxtyping
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nanollm

QUICK = nanollm.Config(vocab_size=101, d_model=64, n_heads=4, d_ff=256, n_layers=2, max_len=128)


def set_checks(on: bool) -> None:
    jaxtyping.config.update("jaxtyping_disable", not on)


def median_times(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin. A name ending in ':off' runs without checks."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            set_checks(not name.endswith(":off"))
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    set_checks(True)
    return {name: statistics.median(t) for name, t in times.items()}


# --- The two models ---------------------------------------------------------------------------------------------


def torch_encoder(cfg: nanollm.Config, params: dict[str, Tensor]) -> nn.TransformerEncoder:
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


def make_models(cfg: nanollm.Config, n_classes: int = 2):
    gen = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, gen) | nanollm.init_head(cfg, n_classes, gen)
    ours = {k: v.clone().requires_grad_() for k, v in params.items()}
    model = torch_encoder(cfg, params)
    extra = {k: nn.Parameter(params[k].clone()) for k in ("embed.weight", "head.weight", "head.bias")}
    return ours, model, extra


def torch_embed(cfg: nanollm.Config, extra: dict[str, Tensor], tokens: Tensor, pe: Tensor, train: bool) -> Tensor:
    """Our embedding (§3.4, §3.5) in plain torch, so the torch rows pay no shape checks."""
    x = F.embedding(tokens, extra["embed.weight"]) * math.sqrt(cfg.d_model) + pe
    return F.dropout(x, cfg.dropout, train)


# --- Encoder section --------------------------------------------------------------------------------------------


def encoder_section(cfg: nanollm.Config, shapes: list[tuple[int, int]], rounds: int, fused: bool) -> list[str]:
    ours, model, extra = make_models(cfg)
    opt_ours = torch.optim.AdamW(list(ours.values()), lr=1e-4, fused=fused)
    opt_torch = torch.optim.AdamW(list(model.parameters()) + list(extra.values()), lr=1e-4, fused=fused)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch, seq in shapes:
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        pe = nanollm.positional_encoding(seq, cfg.d_model)
        labels = torch.randint(0, 2, (batch,), generator=gen)

        def ours_train():
            opt_ours.zero_grad(set_to_none=True)
            hidden = nanollm.encoder(ours, tokens, cfg, train=True, generator=gen)
            F.cross_entropy(nanollm.classify(ours, hidden), labels).backward()
            opt_ours.step()

        def torch_train():
            opt_torch.zero_grad(set_to_none=True)
            hidden = model(torch_embed(cfg, extra, tokens, pe, train=True))
            logits = F.linear(hidden.mean(dim=1), extra["head.weight"], extra["head.bias"])
            F.cross_entropy(logits, labels).backward()
            opt_torch.step()

        def ours_infer():
            with torch.no_grad():
                nanollm.encoder(ours, tokens, cfg)

        def torch_infer():
            with torch.no_grad():
                model(torch_embed(cfg, extra, tokens, pe, train=False))

        for what, fns in (("train", {"torch": torch_train, "ours": ours_train, "ours:off": ours_train}),
                          ("infer", {"torch": torch_infer, "ours": ours_infer, "ours:off": ours_infer})):
            model.train(what == "train")  # dropout on in training; eval mode lets torch take its fast path
            t = median_times(fns, rounds)
            rows.append(f"{batch:>3d}x{seq:<4d} {what:6s} {1e3 * t['torch']:9.1f} {1e3 * t['ours']:9.1f} "
                        f"{1e3 * t['ours:off']:9.1f}   {t['ours'] / t['torch']:5.3f}x  {t['ours:off'] / t['torch']:5.3f}x"
                        f"   {100 * (t['ours'] / t['ours:off'] - 1):+5.1f}%")
    header = ("batch x seq  step   torch ms   ours ms  ours ms   ours/torch     checks\n"
              "                                (checks on)  (off)  on      off    on vs off")
    return [header] + rows


# --- LoRA section -----------------------------------------------------------------------------------------------


def lora_setup(cfg: nanollm.Config, mode: str, batch: int, seq: int):
    """Returns (step function, trainable dict) for mode "full" (everything trains) or "lora" (adapters + head)."""
    import lora

    gen = torch.Generator().manual_seed(0)
    base = nanollm.init_params(cfg, gen)
    head = {k: v.requires_grad_() for k, v in nanollm.init_head(cfg, 2, gen).items()}
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    if mode == "full":
        trainable = {k: v.requires_grad_() for k, v in base.items()} | head
        params = lambda: trainable  # noqa: E731
    else:
        lcfg = lora.LoraConfig(r=8)
        adapters = {k: v.requires_grad_() for k, v in lora.init_lora(base, lcfg, gen).items()}
        trainable = adapters | head  # the frozen base never reaches the optimizer
        params = lambda: lora.with_lora(base, adapters, lcfg) | head  # noqa: E731
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        hidden = nanollm.encoder(params(), tokens, cfg, train=True, generator=gen)
        F.cross_entropy(nanollm.classify(params(), hidden), labels).backward()
        opt.step()

    return step, trainable


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_rss_child(cfg: nanollm.Config, mode: str, batch: int, seq: int, steps: int) -> None:
    """Child process body: build the model, reset the peak-RSS mark, run `steps` steps, print the rise in MiB."""
    torch.set_num_threads(1)  # memory does not depend on threads; keep the child off the timing cores
    step, _ = lora_setup(cfg, mode, batch, seq)
    before = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
    for _ in range(steps):
        step()
    print(json.dumps({"added_mib": _proc_status_mib("VmHWM") - before, "model_mib": before}))


def peak_rss(quick: bool, mode: str, batch: int, seq: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--_peak", mode, "--_shape", f"{batch}x{seq}"] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def lora_section(cfg: nanollm.Config, batch: int, seq: int, rounds: int, quick: bool) -> list[str]:
    import lora

    full_step, full_trainable = lora_setup(cfg, "full", batch, seq)
    lora_step, lora_trainable = lora_setup(cfg, "lora", batch, seq)
    t = median_times({"full": full_step, "lora": lora_step}, rounds)
    mem = {mode: peak_rss(quick, mode, batch, seq) for mode in ("full", "lora")}
    n_full = sum(v.numel() for v in full_trainable.values())
    n_lora = sum(v.numel() for v in lora_trainable.values())

    gen = torch.Generator().manual_seed(2)
    base = nanollm.init_params(cfg, gen)
    lcfg = lora.LoraConfig(r=8)
    adapters = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in lora.init_lora(base, lcfg, gen).items()}
    merged, unmerged = lora.merge(base, adapters, lcfg), lora.with_lora(base, adapters, lcfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)

    def infer(params):
        def run():
            with torch.no_grad():
                nanollm.encoder(params, tokens, cfg)
        return run

    ti = median_times({"base": infer(base), "merged": infer(merged), "unmerged": infer(unmerged)}, rounds)
    return [
        f"LoRA r=8 on attn.q, attn.v vs full fine-tuning, batch x seq {batch}x{seq}, AdamW fused",
        f"  trainable parameters   full {n_full:>12,d}   LoRA {n_lora:>10,d} ({100 * n_lora / n_full:.2f}%)",
        f"  train step ms          full {1e3 * t['full']:12.1f}   LoRA {1e3 * t['lora']:10.1f}"
        f"   ratio {t['lora'] / t['full']:.3f}x (target <= 0.75x)",
        f"  peak memory added, MiB full {mem['full']['added_mib']:12.1f}   LoRA {mem['lora']['added_mib']:10.1f}"
        f"   ratio {mem['lora']['added_mib'] / max(mem['full']['added_mib'], 1e-9):.3f}x"
        f" (process RSS before the steps: {mem['full']['model_mib']:.0f} MiB)",
        f"  inference ms           base {1e3 * ti['base']:12.1f}   merged {1e3 * ti['merged']:8.1f}"
        f"   ratio {ti['merged'] / ti['base']:.3f}x (target <= 1.02x);"
        f" unmerged {1e3 * ti['unmerged']:.1f} ({ti['unmerged'] / ti['base']:.3f}x)",
    ]


# --- Main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config and few rounds: checks that it runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 7, quick 3)")
    parser.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                        help="AdamW implementation, the same for both models")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA section")
    parser.add_argument("--_peak", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--_shape", default="16x128", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = QUICK if args.quick else nanollm.Config()
    if args._peak:
        batch, seq = map(int, args._shape.split("x"))
        peak_rss_child(cfg, args._peak, batch, seq, steps=2)
        return

    rounds = args.rounds or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {cfg}")
    print(f"AdamW {args.optimizer}, {rounds} timed rounds, medians\n")
    for line in encoder_section(cfg, [(2, 50), (16, 128)], rounds, fused=args.optimizer == "fused"):
        print(line)
    if not args.no_lora:
        print()
        for line in lora_section(cfg, 16, 128, rounds, args.quick):
            print(line)


if __name__ == "__main__":
    main()
