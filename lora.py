"""LoRA from scratch: pure functions from one parameter dict to another (Hu et al. 2021, arXiv:2106.09685, Eq. 3):
    h = W0 x + b + s B(A x),   W0: (d_out, d_in) frozen,  A: (rank, d_in) random,  B: (d_out, rank) zero,  s = alpha / r
init_lora makes A and B; with_lora hands them to nanollm (`project` adds B(A x)); merge folds s B@A into W0, unmerge
takes it out; mixed_batch runs rows with different adapters in one batch; save_adapter / load_adapter: PEFT's files.
References: rsLoRA (Kalajdzievski 2023), arXiv:2312.03732; HuggingFace PEFT (LoraConfig, save_pretrained).
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from beartype import beartype
from einops import einsum
from jaxtyping import Float, jaxtyped
from safetensors.torch import load_file, save_file
from torch import Tensor

Params = dict[str, Tensor]

# --- Config: PEFT's field names, so peft.LoraConfig(**vars(cfg)) is the same adapter -----------------------------
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8                    # rank of the update; the seed's value and PEFT's default
    lora_alpha: float = 16        # s = lora_alpha / r: changing r need not change the learning rate (Hu §4.1)
    target_modules: tuple[str, ...] = ("attn.q", "attn.v")  # W_q and W_v: best use of a fixed budget (Hu §7.1)
    lora_dropout: float = 0.0     # dropout on the adapter's input; only PEFT applies it (with_lora refuses it)
    use_rslora: bool = False      # s = lora_alpha / sqrt(r): keeps the update's size steady as r grows (rsLoRA)

    def __post_init__(self):
        t, number = self.target_modules, (int, float)  # a tuple: a set's order varies from run to run
        rules = {"target_modules": (type(t) is tuple and t and all(isinstance(n, str) and n for n in t),
                                    "a non-empty tuple of module names such as ('attn.q', 'attn.v')"),
                 "r": (type(self.r) is int and self.r >= 1, "a positive int (the adapter rank)"),
                 "lora_alpha": (type(self.lora_alpha) in number and 0 < self.lora_alpha < math.inf, "finite, > 0"),
                 "lora_dropout": (type(self.lora_dropout) in number and 0 <= self.lora_dropout < 1, "in [0, 1)"),
                 "use_rslora": (type(self.use_rslora) is bool, "True or False")}
        if bad := [f"{n} must be {want}, got {getattr(self, n)!r}" for n, (ok, want) in rules.items() if not ok]:
            raise ValueError(bad[0])

    @property
    def scale(self) -> float:  # s in h = W0 x + s B(A x): alpha / r (Hu §4.1) or alpha / sqrt(r) (rsLoRA)
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

# --- Targets and init: which X.weight get adapters, checked strictly --------------------------------------------
def _linears(params: Params) -> str:  # modules with 2-D weights, layer numbers folded to "*": one line for any depth
    names = (re.sub(r"(^|\.)\d+(?=\.)", r"\1*", k.removesuffix(".weight")) for k, v in params.items()
             if k.endswith(".weight") and v.ndim == 2)
    return ", ".join(dict.fromkeys(names)) or "(none)"

def _targeted(module: str, cfg: LoraConfig) -> bool:
    return any(module == t or module.endswith("." + t) for t in cfg.target_modules)  # PEFT's rule for a list

def targets(params: Params, cfg: LoraConfig) -> list[str]:
    """Names X of the X.weight that cfg targets; a ValueError says what to fix (PEFT skips a misspelt target)."""
    weights = {k.removesuffix(".weight"): v for k, v in params.items() if k.endswith(".weight")}
    unmatched = [t for t in cfg.target_modules if not any(m == t or m.endswith("." + t) for m in weights)]
    if unmatched:
        suffixes = sorted({".".join(m.split(".")[i:]) for m in weights for i in range(m.count(".") + 1)})
        hint = "".join(f"; for {t!r} did you mean {' or '.join(map(repr, close))}?" for t in unmatched
                       if (close := difflib.get_close_matches(t, suffixes, n=2)))
        raise ValueError(f"target_modules {unmatched} match no weight (a target matches module X when X equals it "
                         f"or ends with '.' + target); modules with 2-D weights here: {_linears(params)}{hint}")
    modules = [m for m in weights if _targeted(m, cfg)]
    for m, w in ((m, weights[m]) for m in modules):
        if w.ndim != 2 or not w.is_floating_point():
            raise ValueError(f"target_modules match {m!r}, whose weight is {w.dtype} {tuple(w.shape)}, not a float "
                             f"linear (d_out, d_in) weight; name only float linear modules: {_linears(params)}")
        if cfg.r > min(w.shape):  # rank(B@A) <= min(d_in, d_out): a larger r adds parameters and nothing else
            raise ValueError(f"r={cfg.r} exceeds min(d_in, d_out)={min(w.shape)} of {m!r} (weight "
                             f"{tuple(w.shape)}); use r <= {min(w.shape)} or leave {m!r} out of target_modules")
    return modules

def init_lora(params: Params, cfg: LoraConfig, generator: torch.Generator) -> Params:
    """X.lora_A Kaiming-uniform (a=sqrt(5)), X.lora_B zeros, as PEFT; B = 0 makes step 0 the base model (Hu §4.1)."""
    adapters = {}
    for m in targets(params, cfg):
        w = params[f"{m}.weight"]  # A: the paper's is Gaussian; PEFT's nn.Linear default, U(+-1/sqrt(d_in))
        lora_A = torch.nn.init.kaiming_uniform_(w.new_empty(cfg.r, w.shape[1]), a=math.sqrt(5), generator=generator)
        adapters |= {f"{m}.lora_A": lora_A, f"{m}.lora_B": w.new_zeros(w.shape[0], cfg.r)}
    return adapters

# --- The arithmetic: unmerged for training, merged for inference, mixed batches for serving ----------------------
def _modules(adapters: Params, cfg: LoraConfig, base: Params | None = None) -> list[str]:
    """Modules X of adapters, checked: X.lora_A (r, d_in) and X.lora_B (d_out, r) each, fitting X.weight in base."""
    modules = sorted({k.rpartition(".")[0] for k in adapters})
    if sorted(adapters) != sorted(f"{m}.lora_{ab}" for m in modules for ab in "AB"):
        raise ValueError("adapters must hold X.lora_A and X.lora_B for each module X and nothing else (no head)")
    if base is not None and any(k.endswith((".lora_A", ".lora_B")) for k in base):
        raise ValueError("base already holds LoRA keys; pass the plain parameters, not with_lora's output")
    for m in modules:
        A, B, w = adapters[f"{m}.lora_A"], adapters[f"{m}.lora_B"], None if base is None else base.get(f"{m}.weight")
        if base is not None and (w is None or w.ndim != 2):
            raise ValueError(f"adapters for {m!r} find no 2-D {m}.weight in base, so they were made for another "
                             f"model; the linear modules here: {_linears(base)}")
        d_out, d_in = (B.shape[0], A.shape[-1]) if w is None else w.shape
        if (A.shape, B.shape) != ((cfg.r, d_in), (d_out, cfg.r)):
            raise ValueError(f"{m}.lora_A is {tuple(A.shape)} and .lora_B {tuple(B.shape)}, but r={cfg.r}" + (
                "" if w is None else f" and {m}.weight {tuple(w.shape)}") + " need lora_A (r, d_in), lora_B (d_out, r)")
    return modules

def with_lora(base: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """base | {X.lora_A: A, X.lora_B: s B}: nanollm's project adds (s B)(A x) and never forms W0 + s B@A."""
    # W0 + s B@A would cost a full weight gradient each step; s B is bit for bit PEFT's s (B(A x)) when s = 2^k
    if cfg.lora_dropout:
        raise ValueError(f"with_lora runs without adapter dropout; lora_dropout={cfg.lora_dropout} is PEFT's (use 0.0)")
    _modules(adapters, cfg, base)
    return base | {k: cfg.scale * v if k.endswith(".lora_B") else v for k, v in adapters.items()}

@jaxtyped(typechecker=beartype)
def delta(A: Float[Tensor, "rank d_in"], B: Float[Tensor, "d_out rank"], scale: float) -> Float[Tensor, "d_out d_in"]:
    """Delta W = s B@A (Hu et al. Eq. 3), the update that merge adds to W0."""
    return scale * einsum(B, A, "d_out rank, rank d_in -> d_out d_in")

def _shift(params: Params, adapters: Params, cfg: LoraConfig, sign: float) -> Params:
    """params with every adapted X.weight moved by sign s B@A, in its own dtype; the rest shared, nothing mutated."""
    out = dict(params)
    for m in _modules(adapters, cfg, params):
        w, update = params[f"{m}.weight"], delta(adapters[f"{m}.lora_A"], adapters[f"{m}.lora_B"], cfg.scale)
        out[f"{m}.weight"] = torch.add(w, update, alpha=sign).to(w.dtype)  # a bf16 base stays bf16, as in PEFT
    return out

def merge(base: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Plain weights W0 + s B@A, no LoRA keys: inference at the base model's cost (Hu §4.1, no added latency)."""
    return _shift(base, adapters, cfg, +1.0)

def unmerge(merged: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Inverse of merge: W - s B@A, so one base can switch between adapters."""
    return _shift(merged, adapters, cfg, -1.0)

def mixed_batch(forward, base: Params, tasks: list[Params], rows: Tensor, *inputs: Tensor) -> Tensor:
    """forward(base | tasks[rows[b]], row b of inputs) for each row b in one vmapped call: PEFT's adapter_names= as a
    pure function; a task holds with_lora's keys and a head (nanollm: attention="einsum", SDPA has no vmap rule)."""
    if not tasks or any(sorted(t) != sorted(tasks[0]) for t in tasks):
        raise ValueError("mixed_batch needs tasks that all hold the same keys (an adapter and head per task)")
    per_row = {k: torch.stack([t[k] for t in tasks])[rows] for k in tasks[0]}
    return torch.func.vmap(lambda p, *row: forward(base | p, *(x[None] for x in row))[0])(per_row, *inputs)

# --- Adapter files in PEFT's layout -----------------------------------------------------------------------------
WEIGHTS, CONFIG, PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."
UNSUPPORTED = ("fan_in_fan_out", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
               "target_parameters", "trainable_token_indices", "layer_replication")

def write_atomically(path: str | os.PathLike, make) -> None:
    """make(tmp) writes a file or a folder at path.tmp, which then takes path's place: no reader sees half of one."""
    tmp = Path(f"{path}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        make(tmp)
        shutil.rmtree(path, ignore_errors=True)  # an old folder first: os.replace moves one only onto an empty one
        os.replace(tmp, path)
    finally:  # what a failed make left; nothing is there once replaced
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.unlink(missing_ok=True)

def save_adapter(directory: str | os.PathLike, adapters: Params, cfg: LoraConfig, extra: Params | None = None):
    """PEFT's adapter_model.safetensors + adapter_config.json; extra (e.g. a head) goes in full, in modules_to_save."""
    extra = extra or {}
    untargeted = [m for m in _modules(adapters, cfg) if not _targeted(m, cfg)]
    if not adapters or untargeted or any(".lora_" in k for k in extra):
        raise ValueError(f"cannot save: adapters must be X.lora_A / X.lora_B of modules in target_modules (not "
                         f"{untargeted or 'none'}), and extra only full tensors such as a head")
    tensors = {f"{PREFIX}{k}.weight": v for k, v in adapters.items()} | {f"{PREFIX}{k}": v for k, v in extra.items()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "bias": "none", "modules_to_save": sorted({k.rpartition(".")[0] for k in extra}) or None,
              **dataclasses.asdict(cfg), "target_modules": list(cfg.target_modules)}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomically(Path(directory, WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(Path(directory, CONFIG), lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

def _read(directory: str | os.PathLike) -> tuple[Params, LoraConfig, Params]:
    try:
        raw = json.loads(Path(directory, CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(Path(directory, WEIGHTS))
        if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
            raise ValueError(f'{CONFIG} must be a JSON object with "peft_type": "LORA"')
        unsupported = {k: raw[k] for k in UNSUPPORTED if raw.get(k)} | {  # a string target is a regex to PEFT
            k: raw[k] for k, plain in (("bias", "none"), ("target_modules", None), ("init_lora_weights", "gaussian"))
            if isinstance(raw.get(k), str) and raw[k] != plain}  # pissa, olora, loftq move W0 too; the rest unchecked
        unsupported |= {k: "LoRA on an nn.Embedding" for k in tensors if ".lora_embedding_" in k}
        if unsupported:  # refused, never ignored (exclude_modules only narrows PEFT's matching: allowed)
            raise ValueError(f"PEFT options this LoRA does not model: {unsupported}")
        cfg = LoraConfig(**{f.name: tuple(raw[f.name]) if f.name == "target_modules" else raw[f.name]
                            for f in dataclasses.fields(LoraConfig) if f.name in raw})  # JSON has no tuples
        names = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
        adapters = {k.removesuffix(".weight"): v for k, v in names.items() if re.search(r"\.lora_[AB]\.weight$", k)}
        if not adapters or not all(k.startswith(PREFIX) for k in tensors) or not all(
                _targeted(m, cfg) for m in _modules(adapters, cfg)):
            raise ValueError(f"{WEIGHTS} must hold {PREFIX}X.lora_A.weight / .lora_B.weight for target_modules")
    except Exception as e:  # also a missing file, bad JSON, and safetensors' own errors for a truncated file
        raise ValueError(f"{directory}: not a LoRA adapter this code reads ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    return adapters, cfg, {k: v for k, v in names.items() if k.removesuffix(".weight") not in adapters}

def load_adapter(directory: str | os.PathLike) -> tuple[Params, LoraConfig]:
    """(adapters, cfg) from save_adapter's or PEFT's files, validated; any problem is a one-line ValueError."""
    return _read(directory)[:2]

def load_extra(directory: str | os.PathLike) -> Params:
    """The full tensors stored beside the adapters (save_adapter's extra, PEFT's modules_to_save); {} if none."""
    return _read(directory)[2]

# --- python lora.py: LoRA on one nn.Linear, through torch.func.functional_call ------------------------------------
if __name__ == "__main__":
    argparse.ArgumentParser(description="LoRA (r=8, alpha=16) on one 512x512 nn.Linear, worked through").parse_args()
    model, cfg = torch.nn.Sequential(torch.nn.Linear(512, 512)), LoraConfig(target_modules=("0",))
    base, generator = {k: v.detach() for k, v in model.state_dict().items()}, torch.Generator().manual_seed(0)
    adapters = {k: v.requires_grad_() for k, v in init_lora(base, cfg, generator).items()}
    x = torch.randn(4, 512, generator=generator)
    out = torch.func.functional_call(model, merge(base, adapters, cfg), (x,), strict=True)
    out.square().mean().backward()
    n, (A, B) = sum(v.numel() for v in adapters.values()), adapters.values()
    print(f"{cfg}: s = {cfg.scale}; A and B hold r (d_in + d_out) = {n:,} numbers, {100 * n / 512**2:.2f}% of W0's\n"
          f"step 0 (B = 0) is the base model: max |LoRA - base| = {(out - model(x)).abs().max().item():.1e}\n"
          f"gradients: |dL/dA| = {A.grad.norm():.1e} (0 while B = 0), |dL/dB| = {B.grad.norm():.1e}")
