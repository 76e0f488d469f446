"""LoRA from scratch: pure functions from one parameter dict to another.

A frozen linear weight W0 (d_out, d_in) is adapted by a rank-r product (Hu et al. 2021, Eq. 3):

    h = W0·x + b + s·B(A·x),   A: (rank, d_in) random,  B: (d_out, rank) zero,  s = lora_alpha / r

Only A and B are trained. `init_lora` makes them, `with_lora` hands them to an encoder that runs the sum
unmerged, `merge` folds s·B@A into W0 for inference and `unmerge` takes it out again. Adapter files use PEFT's
own layout, so `peft.PeftModel.from_pretrained` reads what `save_adapter` writes and `load_adapter` (with
`load_extra` for a head saved alongside) reads what PEFT writes. This file works on any dict of `X.weight` tensors of shape (d_out, d_in), nanollm's parameters or
a HuggingFace state_dict alike, and imports nothing from this project: copy it alone into another one.

    python lora.py     # parameter-efficiency tables (seed encoder, BERT-base-chinese) and the B(Ax) vs (BA)x costs

References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685
    Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA), arXiv:2312.03732
    HuggingFace PEFT: `peft.LoraConfig`, `LoraLayer.reset_lora_parameters`, `save_pretrained`

Keys, for every targeted module X (X.weight is its linear weight):
    X.lora_A (rank, d_in)   X.lora_B (d_out, rank)              -> the adapters, the only trainable LoRA tensors
    X.lora_scale ()         X.lora_dropout () (a probability)   -> added by `with_lora` for the encoder

Dimensions: rank d_in d_out (the project's legend is in nanollm.py).
"""

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable

import torch
from beartype import beartype
from einops import einsum
from jaxtyping import Float, jaxtyped
from safetensors.torch import load_file, save_file
from torch import Tensor

Params = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]


# --- config: PEFT's field names, so LoraConfig(**ours) maps one to one onto peft.LoraConfig -----------------

@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8                    # rank of the update; the seed's value and PEFT's default
    lora_alpha: float = 16        # s = lora_alpha / r: changing r need not change the learning rate (Hu §4.1)
    target_modules: tuple[str, ...] = ("attn.q", "attn.v")  # W_q and W_v: best use of a fixed budget (Hu §7.1)
    lora_dropout: float = 0.0     # dropout on the adapter's input only, as PEFT does
    use_rslora: bool = False      # s = lora_alpha / sqrt(r): keeps the update's size steady as r grows (rsLoRA)

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, Iterable):
            raise ValueError(f"target_modules must be a tuple of module names such as ('attn.q', 'attn.v'), "
                             f"got {self.target_modules!r}")
        # a list (as JSON and PEFT give it) becomes a tuple so the config stays hashable
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int (the adapter rank), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number (s = lora_alpha / r), got {self.lora_alpha!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty tuple of non-empty module names, "
                             f"got {self.target_modules!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")

    @property
    def scale(self) -> float:
        """s in h = W0·x + s·B(A·x): alpha/r (Hu §4.1) or alpha/sqrt(r) (rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# --- targeting: which X.weight get adapters, checked strictly -------------------------------------------------

def _module_summary(shapes: Shapes) -> str:
    """Names of the modules with 2-D weights, layer indices folded to "*", so a 12-layer model fits one line."""
    linear = [k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    folded = dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name) for name in linear)
    return ", ".join(folded) or "(none: no 2-D X.weight entries)"


def _matches(module: str, target: str) -> bool:
    # PEFT's rule for a list of targets: the whole name, or a suffix starting at a dot
    return module == target or module.endswith("." + target)


def target_shapes(shapes: Shapes, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """Module name X -> (d_out, d_in) of every X.weight that cfg targets; ValueError saying what to fix."""
    modules = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight")}
    unmatched = [t for t in cfg.target_modules if not any(_matches(m, t) for m in modules)]
    if unmatched:
        # PEFT skips a misspelt target silently when another target matches; we refuse, and suggest
        suffixes = {".".join(m.split(".")[i:]) for m in modules for i in range(len(m.split(".")))
                    if not m.split(".")[i].isdigit()}
        close = {t: difflib.get_close_matches(t, sorted(suffixes), n=2) for t in unmatched}
        hint = "".join(f"; for {t!r} did you mean {' or '.join(map(repr, c))}?" for t, c in close.items() if c)
        raise ValueError(f"target_modules {unmatched} match no weight (a target matches module X when X equals it "
                         f"or ends with '.' + target); modules with 2-D weights here: "
                         f"{_module_summary(shapes)}{hint}")
    out = {}
    for module, shape in modules.items():
        if not any(_matches(module, t) for t in cfg.target_modules):
            continue
        if len(shape) != 2:
            raise ValueError(f"target_modules {cfg.target_modules} match {module!r}, whose weight has shape "
                             f"{tuple(shape)}, not a linear (d_out, d_in) weight; name only linear modules, "
                             f"from: {_module_summary(shapes)}")
        d_out, d_in = shape
        if cfg.r > min(d_in, d_out):
            # rank(B@A) <= min(d_in, d_out), so a larger r adds parameters and nothing else
            raise ValueError(f"r={cfg.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of {module!r} "
                             f"(weight {tuple(shape)}); use r <= {min(d_in, d_out)} or leave {module!r} "
                             f"out of target_modules")
        out[module] = (d_out, d_in)
    return out


# --- init ------------------------------------------------------------------------------------------------------

@jaxtyped(typechecker=beartype)
def init_lora(params: Params, cfg: LoraConfig, generator: torch.Generator) -> Params:
    """X.lora_A Kaiming-uniform (a=sqrt(5)), X.lora_B zeros, as PEFT; B = 0 makes step 0 the base model (Hu §4.1)."""
    adapters = {}
    for module, (d_out, d_in) in target_shapes({k: tuple(v.shape) for k, v in params.items()}, cfg).items():
        w = params[f"{module}.weight"]
        lora_A = torch.empty(cfg.r, d_in, dtype=w.dtype, device=w.device)
        # the paper draws A from a Gaussian; PEFT uses nn.Linear's default, U(-1/sqrt(d_in), 1/sqrt(d_in))
        torch.nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        adapters[f"{module}.lora_A"] = lora_A
        adapters[f"{module}.lora_B"] = torch.zeros(d_out, cfg.r, dtype=w.dtype, device=w.device)
    return adapters


# --- the LoRA arithmetic: the one place an adapter becomes a weight -------------------------------------------

@jaxtyped(typechecker=beartype)
def lora_delta(lora_A: Float[Tensor, "rank d_in"], lora_B: Float[Tensor, "d_out rank"],
               scale: float) -> Float[Tensor, "d_out d_in"]:
    """Delta W = s·B@A (Hu et al. Eq. 3)."""
    return scale * einsum(lora_B, lora_A, "d_out rank, rank d_in -> d_out d_in")


def _adapted_modules(base: Params, adapters: Params, cfg: LoraConfig) -> list[str]:
    """Module names that adapters adapt, after checking that every adapter fits its weight in base."""
    stray = [k for k in base if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_scale", "lora_dropout")]
    if stray:
        raise ValueError(f"base already holds LoRA keys ({stray[0]!r}, ...); pass the plain parameters, "
                         f"not the output of with_lora or a dict with adapters mixed in")
    modules = []
    for key in adapters:
        module, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not module:
            raise ValueError(f"adapters hold {key!r}, which is neither X.lora_A nor X.lora_B; pass only what "
                             f"init_lora or load_adapter returned (keep a head in its own dict)")
        if kind == "lora_A":
            modules.append(module)
        if f"{module}.lora_A" not in adapters or f"{module}.lora_B" not in adapters:
            raise ValueError(f"adapters hold {key!r} without its partner; each module needs both "
                             f"{module}.lora_A and {module}.lora_B")
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    for module in modules:
        weight = shapes.get(f"{module}.weight")
        if weight is None or len(weight) != 2:
            raise ValueError(f"adapters for {module!r} have no 2-D weight {module}.weight in base, so they were "
                             f"made for another model; modules with 2-D weights here: {_module_summary(shapes)}")
        d_out, d_in = weight
        for kind, got, want, axes in (("lora_A", tuple(adapters[f"{module}.lora_A"].shape), (cfg.r, d_in),
                                       "(r, d_in)"),
                                      ("lora_B", tuple(adapters[f"{module}.lora_B"].shape), (d_out, cfg.r),
                                       "(d_out, r)")):
            if got != want:
                raise ValueError(f"{module}.{kind} has shape {got} but {module}.weight is {weight} and r={cfg.r}, "
                                 f"so it must be {axes} = {want}; use adapters made by init_lora for this model "
                                 f"and this LoraConfig")
    return modules


# --- running: unmerged for training, merged for inference ------------------------------------------------------

@jaxtyped(typechecker=beartype)
def with_lora(base: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """base plus X.lora_{A,B,scale,dropout}: the encoder adds s·B(A·dropout(x)) and never forms W0 + s·B@A."""
    # forming W0 + s·B@A in training would cost a full (d_out, d_in) weight-gradient matmul each step: most
    # of what LoRA saves. The returned dict shares base's and adapters' tensors, so gradients reach adapters.
    out = dict(base) | dict(adapters)
    for module in _adapted_modules(base, adapters, cfg):
        # 0-d float64 on the CPU: holds the Python float exactly, does not promote a float32 product, mixes
        # with CUDA tensors, and reading it back with float() never waits for a GPU
        out[f"{module}.lora_scale"] = torch.tensor(cfg.scale, dtype=torch.float64)
        out[f"{module}.lora_dropout"] = torch.tensor(cfg.lora_dropout, dtype=torch.float64)
    return out


def _shift_weights(params: Params, adapters: Params, cfg: LoraConfig, sign: float) -> Params:
    """params with every adapted X.weight moved by sign·s·B@A; other tensors shared, nothing mutated."""
    out = dict(params)
    for module in _adapted_modules(params, adapters, cfg):
        delta = lora_delta(adapters[f"{module}.lora_A"], adapters[f"{module}.lora_B"], cfg.scale)
        out[f"{module}.weight"] = torch.add(params[f"{module}.weight"], delta, alpha=sign)
    return out


@jaxtyped(typechecker=beartype)
def merge(base: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Plain weights W0 + s·B@A, no LoRA keys: inference at the base model's cost (Hu §4.1, no added latency)."""
    return _shift_weights(base, adapters, cfg, +1.0)


@jaxtyped(typechecker=beartype)
def unmerge(merged: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Inverse of merge: W - s·B@A, so one base can switch between adapters."""
    return _shift_weights(merged, adapters, cfg, -1.0)


# --- adapter files: PEFT's layout ------------------------------------------------------------------------------

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (.base_model) -> the wrapped model (.model)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then os.replace: a reader sees the old file or the new one, never half of one."""
    # same directory as the target, so os.replace is a rename within one file system
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _adapter_file_problem(adapters: Params, cfg: LoraConfig) -> str | None:
    """What keeps adapters from being a valid adapter file for cfg, or None: the checks save and load share."""
    for key, value in adapters.items():
        module, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not module:
            return f"{key!r} is neither X.lora_A nor X.lora_B (a head goes in extra)"
        partner = f"{module}.lora_B" if kind == "lora_A" else f"{module}.lora_A"
        if partner not in adapters:
            return f"{key} has no partner {partner}"
        if value.ndim != 2 or value.shape[0 if kind == "lora_A" else 1] != cfg.r:
            return (f"{key} has shape {tuple(value.shape)} but r={cfg.r} needs lora_A (r, d_in) and "
                    f"lora_B (d_out, r)")
        if not any(_matches(module, t) for t in cfg.target_modules):
            return f"{key} matches none of target_modules {list(cfg.target_modules)}"
    return None if adapters else "there are no X.lora_A / X.lora_B tensors"


@jaxtyped(typechecker=beartype)
def save_adapter(directory: str | os.PathLike, adapters: Params, cfg: LoraConfig,
                 extra: Params | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json as PEFT's save_pretrained does; extra = e.g. a head."""
    extra = extra or {}
    for key in extra:
        if key.rsplit(".", 1)[-1].startswith("lora_"):
            raise ValueError(f"extra key {key!r} looks like an adapter; pass adapters as adapters and only "
                             f"full tensors (a head) as extra")
    problem = _adapter_file_problem(adapters, cfg)
    if problem:
        raise ValueError(f"cannot save these adapters: {problem}; save what init_lora made, with its LoraConfig")
    # PEFT stores X.lora_A as "...X.lora_A.weight" (its lora_A is an nn.Linear) and a module kept in full under
    # its own name, listed in modules_to_save
    tensors = {f"{PEFT_PREFIX}{k}.weight": v.detach().contiguous() for k, v in adapters.items()}
    tensors |= {f"{PEFT_PREFIX}{k}": v.detach().contiguous() for k, v in extra.items()}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules),
        "lora_dropout": cfg.lora_dropout, "use_rslora": cfg.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in extra}) or None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic_write(os.path.join(directory, CONFIG_NAME), write_config)


def _read_adapter_dir(directory: str | os.PathLike) -> tuple[Params, Params, LoraConfig]:
    """(adapters, extra, cfg) from a PEFT-layout directory; any problem -> one-line ValueError. Reads only."""
    directory = os.fspath(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{directory!r} is not a LoRA adapter directory: {name} is missing; write one with "
                             f"save_adapter (or PEFT's save_pretrained)")
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} must be a JSON object with \"peft_type\": \"LORA\", got {got!r}")
    unsupported = {k: raw[k] for k in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                                       "layers_to_transform") if raw.get(k)}
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]  # PEFT would also train and save the base layers' biases
    if isinstance(raw.get("target_modules"), str):
        unsupported["target_modules"] = raw["target_modules"]  # PEFT reads a string as a regex
    if unsupported:
        raise ValueError(f"{path} uses PEFT options LoraConfig does not model: {unsupported}; re-save it with a "
                         f"list of target_modules and one rank and alpha for all modules")
    try:
        fields = {f.name: raw[f.name] for f in dataclasses.fields(LoraConfig) if f.name in raw}
        cfg = LoraConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    path = os.path.join(directory, WEIGHTS_NAME)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {first}); "
                         f"re-save the adapter") from None
    adapters, extra = {}, {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{path} holds {key!r}, which lacks PEFT's prefix {PEFT_PREFIX!r}; "
                             f"re-save the adapter with save_adapter")
        key = key[len(PEFT_PREFIX):]
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            adapters[key[: -len(".weight")]] = value
        else:
            extra[key] = value
    problem = _adapter_file_problem(adapters, cfg)
    if problem:
        raise ValueError(f"{path} does not fit {CONFIG_NAME}: {problem}; re-save the adapter")
    return adapters, extra, cfg


def load_adapter(directory: str | os.PathLike) -> tuple[Params, LoraConfig]:
    """(adapters, cfg) from save_adapter's or PEFT's files, validated; any problem -> one-line ValueError."""
    adapters, _, cfg = _read_adapter_dir(directory)
    return adapters, cfg


def load_extra(directory: str | os.PathLike) -> Params:
    """The full tensors stored beside the adapters (save_adapter's extra, PEFT's modules_to_save); {} if none."""
    return _read_adapter_dir(directory)[1]


# --- efficiency: how few parameters LoRA trains ----------------------------------------------------------------

def seed_shapes(vocab_size: int = 10000, d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
                n_classes: int = 2) -> Shapes:
    """Every parameter of the seed encoder (Pre-LN, final LayerNorm, sinusoidal positions) plus its head,
    under nanollm.init_params's names; n_heads splits d_model and adds no parameters."""
    shapes: Shapes = {"embed.weight": (vocab_size, d_model)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for proj in "qkvo":
            shapes |= {f"{p}attn.{proj}.weight": (d_model, d_model), f"{p}attn.{proj}.bias": (d_model,)}
        shapes |= {f"{p}ln1.weight": (d_model,), f"{p}ln1.bias": (d_model,),
                   f"{p}ffn.up.weight": (d_ff, d_model), f"{p}ffn.up.bias": (d_ff,),
                   f"{p}ffn.down.weight": (d_model, d_ff), f"{p}ffn.down.bias": (d_model,),
                   f"{p}ln2.weight": (d_model,), f"{p}ln2.bias": (d_model,)}
    return shapes | {"ln_f.weight": (d_model,), "ln_f.bias": (d_model,),
                     "head.weight": (n_classes, d_model), "head.bias": (n_classes,)}


def bert_shapes(vocab_size: int = 21128, d_model: int = 768, d_ff: int = 3072, n_layers: int = 12,
                max_len: int = 512, type_vocab_size: int = 2, n_classes: int = 2) -> Shapes:
    """Every parameter of HF BertForSequenceClassification under its own names; the defaults are
    bert-base-chinese (vocab 21128, 12 heads of 64)."""
    e = "bert.embeddings."
    shapes: Shapes = {f"{e}word_embeddings.weight": (vocab_size, d_model),
                      f"{e}position_embeddings.weight": (max_len, d_model),
                      f"{e}token_type_embeddings.weight": (type_vocab_size, d_model),
                      f"{e}LayerNorm.weight": (d_model,), f"{e}LayerNorm.bias": (d_model,)}
    linears = {"attention.self.query": (d_model, d_model), "attention.self.key": (d_model, d_model),
               "attention.self.value": (d_model, d_model), "attention.output.dense": (d_model, d_model),
               "intermediate.dense": (d_ff, d_model), "output.dense": (d_model, d_ff)}
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."
        for name, (d_out, d_in) in linears.items():
            shapes |= {f"{p}{name}.weight": (d_out, d_in), f"{p}{name}.bias": (d_out,)}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {f"{p}{ln}.weight": (d_model,), f"{p}{ln}.bias": (d_model,)}
    return shapes | {"bert.pooler.dense.weight": (d_model, d_model), "bert.pooler.dense.bias": (d_model,),
                     "classifier.weight": (n_classes, d_model), "classifier.bias": (n_classes,)}


# target sets of the analysis, in each model's own names; "all linear" = the six projections of every layer
SEED_TARGETS = {"q,v": ("attn.q", "attn.v"),
                "q,k,v,o": ("attn.q", "attn.k", "attn.v", "attn.o"),
                "all linear": ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")}
BERT_TARGETS = {"q,v": ("query", "value"),
                "q,k,v,o": ("query", "key", "value", "attention.output.dense"),
                "all linear": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                               "output.dense")}
RANKS = (1, 2, 4, 8, 16, 64)


def count_params(shapes: Shapes) -> int:
    """Number of scalars in a shape table."""
    return sum(math.prod(s) for s in shapes.values())


def lora_param_formula(shapes: Shapes, cfg: LoraConfig) -> int:
    """Adapter parameters by formula: sum over targeted weights of r·(d_in + d_out)."""
    return sum(cfg.r * (d_in + d_out) for d_out, d_in in target_shapes(shapes, cfg).values())


def lora_param_count(adapters: Params) -> int:
    """Adapter parameters counted from the tensors themselves."""
    return sum(t.numel() for t in adapters.values())


def head_param_count(shapes: Shapes, head: str) -> int:
    """Parameters of the task head, the module named head (e.g. 'head' or 'classifier')."""
    return count_params({k: s for k, s in shapes.items() if k.startswith(head + ".")})


def efficiency_rows(shapes: Shapes, targets: dict[str, tuple[str, ...]], head: str,
                    ranks: Iterable[int] = RANKS) -> list[dict]:
    """For each target set and rank: adapter count by formula and from tensors, trainable (adapters + head),
    the whole model (base + head + adapters) and the trainable share of it in percent."""
    # meta tensors carry shapes without memory, so init_lora runs on BERT-base for free
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    base = count_params(shapes)
    rows = []
    for label, target_modules in targets.items():
        for r in ranks:
            cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)
            formula = lora_param_formula(shapes, cfg)
            counted = lora_param_count(init_lora(meta, cfg, torch.Generator().manual_seed(0)))
            trainable = counted + head_param_count(shapes, head)
            rows.append({"targets": label, "r": r, "lora_formula": formula, "lora_counted": counted,
                         "trainable": trainable, "total": base + counted,
                         "percent": 100 * trainable / (base + counted)})
    return rows


def peft_reported_counts(shapes: Shapes, cfg: LoraConfig, head: str) -> tuple[int, int]:
    """(trainable, all params) as PEFT's print_trainable_parameters reports them for a sequence-classification
    model: modules_to_save keeps the original head and a trainable copy, and 'all params' counts both."""
    lora, head_n = lora_param_formula(shapes, cfg), head_param_count(shapes, head)
    return lora + head_n, count_params(shapes) + lora + head_n


# --- cost: B(Ax) against (BA)x ---------------------------------------------------------------------------------

# the ways to compute h = W0·x + s·B·A·x for one layer, as code for the timer (x: (n_tokens, d_in), s folded in)
ORDERS = {"merged": "x @ W.T",                          # W = W0 + s·BA formed once, ahead of inference
          "B(Ax)": "x @ W.T + (x @ A.T) @ B.T",          # unmerged: what with_lora runs
          "(BA)x": "x @ W.T + x @ (B @ A).T",            # the adapter term with BA formed first
          "(W0+sBA)x": "x @ (W + B @ A).T"}              # W0 + s·BA materialised on every call


def lora_macs(d_in: int, d_out: int, r: int, n_tokens: int) -> dict[str, int]:
    """Multiply-adds of one adapted layer over n_tokens tokens: forward in each order of ORDERS, and the
    backward work that gets dA and dB (dx through W0 is common to all and left out)."""
    base, form = n_tokens * d_in * d_out, r * d_in * d_out  # W0·x; forming B@A
    return {"merged": base,
            "B(Ax)": base + n_tokens * r * (d_in + d_out),  # two thin products: r·(d_in + d_out) a token
            "(BA)x": 2 * base + form,
            "(W0+sBA)x": base + form,
            # dB, dA and the adapter's share of dx: four thin products
            "B(Ax) backward": 2 * n_tokens * r * (d_in + d_out),
            # the full weight gradient dW = grad^T·x first, then dA = s·B^T·dW and dB = s·dW·A^T
            "(W0+sBA)x backward": base + 2 * form}


def _timing_inputs(d_model: int, r: int, n_tokens: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n_tokens, d_model, generator=g), "W": torch.randn(d_model, d_model, generator=g),
            "A": torch.randn(r, d_model, generator=g), "B": torch.randn(d_model, r, generator=g)}


def _best_time(stmt: str, env: dict[str, Tensor], min_run_time: float) -> float:
    from torch.utils.benchmark import Timer
    # the fastest block, not the median: other processes only ever add time, so the minimum is the least noisy
    return min(Timer(stmt, globals=env, num_threads=1).blocked_autorange(min_run_time=min_run_time).times)


def time_lora_orders(d_model: int, r: int, n_tokens: int, min_run_time: float = 0.01) -> dict[str, float]:
    """Seconds per forward call, one thread, float32, of each of ORDERS on (n_tokens, d_model) input."""
    env = _timing_inputs(d_model, r, n_tokens)
    return {k: _best_time(stmt, env, min_run_time) for k, stmt in ORDERS.items()}


def time_lora_training(d_model: int, r: int, n_tokens: int, min_run_time: float = 0.01) -> dict[str, float]:
    """Seconds of forward + backward to dA and dB, unmerged B(Ax) against materialised (W0+sBA)x."""
    env = _timing_inputs(d_model, r, n_tokens)
    env["A"].requires_grad_()
    env["B"].requires_grad_()
    # a dense upstream gradient, as a loss gives; x needs none, so dx (common to both orders) is not timed
    env["grad"] = torch.randn(n_tokens, d_model, generator=torch.Generator().manual_seed(1))
    return {k: _best_time(f"({ORDERS[k]}).backward(grad)", env, min_run_time) for k in ("B(Ax)", "(W0+sBA)x")}


# --- python lora.py -------------------------------------------------------------------------------------------

def _print_efficiency(title: str, shapes: Shapes, targets: dict[str, tuple[str, ...]], head: str) -> None:
    print(f"\n{title}: {count_params(shapes):,} parameters, of which head '{head}' "
          f"{head_param_count(shapes, head):,}; trainable = adapters + head")
    print(f"{'targets':<11} {'r':>3} {'sum r(d_in+d_out)':>18} {'from tensors':>13} {'trainable':>11} "
          f"{'whole model':>13} {'%':>7}")
    for row in efficiency_rows(shapes, targets, head):
        print(f"{row['targets']:<11} {row['r']:>3} {row['lora_formula']:>18,} {row['lora_counted']:>13,} "
              f"{row['trainable']:>11,} {row['total']:>13,} {row['percent']:>7.3f}")


if __name__ == "__main__":
    print("LoRA parameter efficiency (lora_alpha = 2r; the scale does not change counts)")
    _print_efficiency("Seed encoder (vocab 10000, d 512, 8 heads, d_ff 2048, 6 layers, Pre-LN + final LN, "
                      "2-class head)", seed_shapes(), SEED_TARGETS, "head")
    bert = bert_shapes()
    _print_efficiency("BERT-base-chinese + 2-class head (vocab 21128, d 768, 12 layers, d_ff 3072, max_pos 512, "
                      "type vocab 2, pooler)", bert, BERT_TARGETS, "classifier")

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=("query", "value"))
    n_lora, n_head, n_base = lora_param_formula(bert, cfg), head_param_count(bert, "classifier"), count_params(bert)
    peft_trainable, peft_all = peft_reported_counts(bert, cfg, "classifier")
    print("\nThe seed's claim: BERT-base-chinese, r=16 on query and value, 2-class head")
    print(f"  adapters 12 layers x 2 x 16 x (768 + 768) = {n_lora:,}; head {n_head:,}; "
          f"trainable {n_lora + n_head:,}")
    print(f"  of the whole model {n_base + n_lora:,}: {100 * (n_lora + n_head) / (n_base + n_lora):.4f}% "
          f"(the seed's 'about 0.6%')")
    print(f"  PEFT print_trainable_parameters: trainable params: {peft_trainable:,} || all params: {peft_all:,} || "
          f"trainable%: {100 * peft_trainable / peft_all:.4f}")
    print(f"  PEFT's 'all params' is {peft_all - n_base - n_lora:,} more than the model has: modules_to_save keeps the "
          f"original classifier (frozen) beside a trainable copy and counts both")

    print("\nMultiply-adds per token, one d x d layer with an adapter, n tokens per call (forming BA costs r*d*d "
          "once per call).\nForward: merged d^2; B(Ax) d^2 + 2rd; (BA)x 2d^2 + rd^2/n; (W0+sBA)x d^2 + rd^2/n. "
          "Backward for dA, dB: B(Ax) 4rd; (W0+sBA)x d^2 + 2rd^2/n")
    print(f"{'d':>4} {'r':>4} {'n':>5} {'merged':>9} {'B(Ax)':>9} {'(BA)x':>11} {'(W0+sBA)x':>11} "
          f"{'bwd B(Ax)':>10} {'bwd (W0+sBA)x':>14}")
    for d in (512, 768):
        for r in (8, 64):
            for n in (1, 64, 1024):
                m = {k: v / n for k, v in lora_macs(d, d, r, n).items()}
                print(f"{d:>4} {r:>4} {n:>5} {m['merged']:>9,.0f} {m['B(Ax)']:>9,.0f} {m['(BA)x']:>11,.0f} "
                      f"{m['(W0+sBA)x']:>11,.0f} {m['B(Ax) backward']:>10,.0f} {m['(W0+sBA)x backward']:>14,.0f}")
    print("  Forward, B(Ax) beats (W0+sBA)x while n < d_in*d_out/(d_in+d_out) tokens per call (256 at d 512, 384 at "
          "d 768), whatever r;\n  counting the backward too, B(Ax) wins while n < 3rd/(6r - d) "
          "(for every n when r < d/6).")

    print("\nMeasured: one thread, float32, microseconds per call (best block; other processes on the machine add "
          "noise);\nfastest of the three adapter orders marked *")
    print(f"{'d':>4} {'r':>4} {'tokens':>6} {'merged':>9} {'B(Ax)':>10} {'(BA)x':>10} {'(W0+sBA)x':>10}")
    for d in (512, 768):
        for r in (1, 8, 64, 256):
            for n in (1, 64, 1024):
                t = {k: 1e6 * v for k, v in time_lora_orders(d, r, n).items()}
                best = min(("B(Ax)", "(BA)x", "(W0+sBA)x"), key=t.get)
                cells = [f"{t[k]:>9.1f}{'*' if k == best else ' '}" for k in ("B(Ax)", "(BA)x", "(W0+sBA)x")]
                print(f"{d:>4} {r:>4} {n:>6} {t['merged']:>9.1f} {' '.join(cells)}")

    print("\nMeasured training step of one layer (forward + backward to dA and dB), same units")
    print(f"{'d':>4} {'r':>4} {'tokens':>6} {'B(Ax)':>10} {'(W0+sBA)x':>10}")
    for d in (512, 768):
        for r in (8, 64):
            for n in (64, 1024):
                t = {k: 1e6 * v for k, v in time_lora_training(d, r, n).items()}
                best = min(t, key=t.get)
                print(f"{d:>4} {r:>4} {n:>6} " + " ".join(f"{t[k]:>9.1f}{'*' if k == best else ' '}" for k in t))
    print("  Each thin product re-reads the (tokens, d) activations, so on a CPU it runs far below peak; where the\n"
          "  measured winner differs from the multiply-add count, memory traffic, not arithmetic, decided it.")
