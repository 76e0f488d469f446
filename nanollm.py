"""nanollm: the Transformer encoder as pure functions over a flat parameter dict, for two arrangements:
- the seed's encoder (Vaswani et al. 2017, "Attention Is All You Need"): token embedding scaled by sqrt(d_model)
  plus sinusoidal positions (§3.4, §3.5), multi-head attention (§3.2.2), a ReLU feed-forward (§3.3), residuals
  with LayerNorm (§3.1), dropout on sub-layer outputs and embedding sums (§5.4); Pre-LN by default (Xiong et al.
  2020, "On Layer Normalization in the Transformer Architecture"), the paper's Post-LN with norm_first=False.
- BERT (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers"): `Config.bert(...)`.

Run: `python nanollm.py [--png pe.png]`: the seed config on a (2, 50) batch, parameter counts, a PE heatmap.
Shape checks (jaxtyping + beartype) run on every call; JAXTYPING_DISABLE=1 (or jaxtyping.config) turns them off.

Dimension names, used identically in jaxtyping strings, einops patterns and config fields:
    batch    sequences in a batch             seq      tokens per sequence (seq_q / seq_k: queries / keys)
    d_model  width of the residual stream     n_heads  attention heads       d_head  d_model // n_heads
    d_ff     hidden width of the feed-forward vocab    token vocabulary      rank    LoRA rank
    d_in     input width of a linear          d_out    output width of a linear
    n_classes  classifier outputs             *batch   (leaf ops only) any number of leading dimensions
"""

import argparse
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int, TypeCheckError, jaxtyped
from torch import Tensor

Params = dict[str, Tensor]

# --- Config -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Encoder hyper-parameters; the defaults are the seed course's Transformer encoder.
    BERT (Devlin et al. 2018, §3; HF BertModel) differs from the seed in exactly these fields:
    bert_embeddings=True: learned positions instead of sinusoids, token-type embeddings added to the sum, a
    LayerNorm on that sum, no sqrt(d_model) scaling; activation="gelu": the exact erf form (Hendrycks & Gimpel
    2016); norm_first=False: Post-LN, x = LN(x + sublayer(x)); eps=1e-12 (torch's default is 1e-5).
    attention: "sdpa", torch's fused kernel, or "einsum", Eq. 1 written out: its two matmuls run on the bf16
    units under CPU autocast (a d_model-128 training step fell from 526 to 284 ms, profiled).
    """
    vocab_size: int = 10000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    max_len: int = 512
    dropout: float = 0.1
    norm_first: bool = True
    bert_embeddings: bool = False
    type_vocab_size: int = 2  # read only when bert_embeddings
    activation: str = "relu"
    eps: float = 1e-5
    attention: str = "sdpa"

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len", "type_vocab_size")
        rules = {n: (type(getattr(self, n)) is int and getattr(self, n) >= 1, "an integer >= 1") for n in sizes}
        # floats, not ints: the leaf ops are annotated float, and beartype does not take 0 for 0.0
        rules |= {"dropout": (isinstance(self.dropout, float) and 0.0 <= self.dropout < 1.0, "a float in [0, 1)"),
                  "eps": (isinstance(self.eps, float) and self.eps > 0.0, "a float > 0, e.g. 1e-5 or 1e-12"),
                  "activation": (self.activation in ("relu", "gelu"), "'relu' (seed) or 'gelu' (BERT)"),
                  "attention": (self.attention in ("sdpa", "einsum"), "'sdpa' (fused) or 'einsum' (written out)")}
        for name, (ok, expected) in rules.items():
            if not ok:
                raise ValueError(f"Config.{name}={getattr(self, name)!r}: must be {expected}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"Config.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: each head "
                             f"gets d_model // n_heads features, so pick n_heads dividing d_model.")

    @classmethod
    def bert(cls, vocab_size: int, d_model: int = 768, n_heads: int = 12, d_ff: int = 3072, n_layers: int = 12,
             max_len: int = 512, dropout: float = 0.1, type_vocab_size: int = 2, eps: float = 1e-12) -> "Config":
        """BERT's arrangement; the defaults are BERT-base (Devlin et al. 2018, §3)."""
        return cls(vocab_size, d_model, n_heads, d_ff, n_layers, max_len, dropout, norm_first=False,
                   bert_embeddings=True, type_vocab_size=type_vocab_size, activation="gelu", eps=eps)

# --- Parameters -------------------------------------------------------------------------------------------------
def init_params(cfg: Config, generator: torch.Generator) -> Params:
    """Every key, shape and init rule of the encoder; linear weights are (d_out, d_in) as in nn.Linear."""
    def linear(name: str, d_out: int, d_in: int) -> Params:
        # Glorot/Xavier uniform, what nn.Transformer applies to every matrix; biases start at zero.
        weight = torch.nn.init.xavier_uniform_(torch.empty(d_out, d_in), generator=generator)
        return {f"{name}.weight": weight, f"{name}.bias": torch.zeros(d_out)}
    def norm(name: str) -> Params:
        return {f"{name}.weight": torch.ones(cfg.d_model), f"{name}.bias": torch.zeros(cfg.d_model)}
    def embedding(rows: int, std: float) -> Tensor:
        return torch.empty(rows, cfg.d_model).normal_(0.0, std, generator=generator)
    d, bert_std = cfg.d_model, 0.02  # 0.02 is BERT's initializer_range; its embedding LayerNorm sets the scale
    # std d_model**-0.5: unit variance after the seed's sqrt(d_model) scaling (§3.4), the sinusoids' scale
    params = {"embed.weight": embedding(cfg.vocab_size, bert_std if cfg.bert_embeddings else d**-0.5)}
    if cfg.bert_embeddings:
        params |= {"pos_embed.weight": embedding(cfg.max_len, bert_std),
                   "type_embed.weight": embedding(cfg.type_vocab_size, bert_std)} | norm("ln_embed")
    for i in range(cfg.n_layers):
        layer = f"layers.{i}"
        for proj in ("q", "k", "v", "o"):
            params |= linear(f"{layer}.attn.{proj}", d, d)
        params |= norm(f"{layer}.ln1") | linear(f"{layer}.ffn.up", cfg.d_ff, d)
        params |= linear(f"{layer}.ffn.down", d, cfg.d_ff) | norm(f"{layer}.ln2")
    if cfg.norm_first:
        params |= norm("ln_f")  # Pre-LN leaves the residual stream un-normalised; Xiong et al. 2020, §3
    return params

# --- Leaf ops: tensors in, tensors out, every input shape checked -----------------------------------------------
# An op that is one torch call leaves its output's shape to torch (its docstring states it): a return annotation
# makes jaxtyping check every argument again, doubling the checks' cost (bench.py allows them 3% at 16x128).
@jaxtyped(typechecker=beartype)
def linear(x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"], bias: Float[Tensor, " d_out"] | None):
    """x W^T + b -> (*batch, d_out), the nn.Linear convention."""
    return F.linear(x, weight, bias)

@jaxtyped(typechecker=beartype)
def layer_norm(x: Float[Tensor, "*batch d_model"], weight: Float[Tensor, " d_model"],
               bias: Float[Tensor, " d_model"], eps: float):
    """LayerNorm (Ba et al. 2016) -> x's shape: biased variance, eps inside the square root, as in torch and HF."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

@jaxtyped(typechecker=beartype)
def dropout(x: Float[Tensor, "*batch"], p: float, *, train: bool, generator: torch.Generator | None):
    """Inverted dropout -> x's shape, drawn from an explicit generator, so a training run replays from its seed."""
    if not train or p == 0.0:
        return x
    if generator is None:
        raise ValueError("dropout with train=True needs generator=torch.Generator(); seed it to replay the run.")
    keep = torch.bernoulli(x.detach(), 1.0 - p, generator=generator)  # x's shape and dtype, not its values
    return x * (keep / (1.0 - p))

@jaxtyped(typechecker=beartype)
def positional_encoding(seq: int, d_model: int, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> Float[Tensor, "seq d_model"]:
    """Sinusoidal positions (§3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same)."""
    position = rearrange(torch.arange(seq, dtype=torch.float64), "seq -> seq 1")  # float64: float32 rounds once
    angle = position * 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = rearrange(torch.stack([angle.sin(), angle.cos()]), "two seq half -> seq (half two)")  # interleave
    return pe[:, :d_model].to(device=device, dtype=dtype)  # an odd d_model drops the last cosine

@jaxtyped(typechecker=beartype)
def pe_shift_matrix(k: int, d_model: int) -> Float[Tensor, "d_model d_model"]:
    """M_k with PE(pos + k) = M_k PE(pos) for every pos: why sinusoids let attention find relative offsets (§3.5)."""
    frequency = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    c, s = (k * frequency).cos(), (k * frequency).sin()
    # a 2x2 rotation by k * frequency on each (sin, cos) pair: sin(a + b) = sin a cos b + cos a sin b, and so on
    blocks = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
    return torch.block_diag(*blocks)[:d_model, :d_model]

@jaxtyped(typechecker=beartype)
def attention_reference(
    q: Float[Tensor, "batch n_heads seq_q d_head"], k: Float[Tensor, "batch n_heads seq_k d_head"],
    v: Float[Tensor, "batch n_heads seq_k d_head"], mask: Bool[Tensor, "batch seq_k"] | None = None,
) -> Float[Tensor, "batch n_heads seq_q d_head"]:
    """softmax(Q K^T / sqrt(d_head)) V, Eq. 1, written out (Config.attention="einsum")."""
    # 1) similarity of every query with every key, scaled so its variance does not grow with d_head (§3.2.1)
    scores = einsum(q, k, "batch n_heads seq_q d_head, batch n_heads seq_k d_head -> batch n_heads seq_q seq_k")
    scores = scores / math.sqrt(q.shape[-1])
    # 2) padded keys get -inf, hence weight exactly 0 after the softmax
    if mask is not None:
        scores = scores.masked_fill(~rearrange(mask, "batch seq_k -> batch 1 1 seq_k"), float("-inf"))
    # 3) each query's weights over the keys sum to 1; mix the values with them
    weights = scores.softmax(dim=-1)
    return einsum(weights, v, "batch n_heads seq_q seq_k, batch n_heads seq_k d_head -> batch n_heads seq_q d_head")

@jaxtyped(typechecker=beartype)
def attention(q: Float[Tensor, "batch n_heads seq_q d_head"], k: Float[Tensor, "batch n_heads seq_k d_head"],
              v: Float[Tensor, "batch n_heads seq_k d_head"], mask: Bool[Tensor, "batch seq_k"] | None = None):
    """Eq. 1 in torch's fused kernel (Config.attention="sdpa") -> (batch, n_heads, seq_q, d_head) = q's shape."""
    # no dropout on the probabilities: §5.4 drops sub-layer outputs only, and it would force SDPA's slow kernel
    attn_mask = None if mask is None else rearrange(mask, "batch seq_k -> batch 1 1 seq_k")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

# --- Composites: pick weights out of the dict by name -----------------------------------------------------------
# Checked where entered (encoder, heads): each tensor inside reaches a checked leaf op, so checking them adds cost.
def short_errors(fn):
    """Cut jaxtyping's report to the lines that name the problem; in full it also lists the whole parameter dict."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TypeCheckError as e:
            problem, _, rest = str(e).partition("\n----------------------\n")
            dims = rest.partition("are as follows.\n")[2].replace("\n", ", ")
            raise TypeCheckError(f"{problem}\nBound dimensions: {dims}").with_traceback(e.__traceback__) from None
    return wrapped

def project(params: Params, name: str, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
    """The linear module `name`, x W^T + b, plus B(A x) when the dict holds `name.lora_{A,B}` (Hu et al. Eq. 3).
    lora.with_lora stores s*B as `name.lora_B`, so no scale lives here. A then B, never B@A: rank (d_in + d_out)
    multiply-adds per token instead of d_in d_out, and no full-size weight gradient in the backward pass."""
    out = linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))
    if f"{name}.lora_A" not in params:
        return out
    return out + linear(linear(x, params[f"{name}.lora_A"], None), params[f"{name}.lora_B"], None)

def embed(params: Params, tokens: Int[Tensor, "batch seq"], cfg: Config,
          token_types: Int[Tensor, "batch seq"] | None = None, *, train: bool = False,
          generator: torch.Generator | None = None) -> Float[Tensor, "batch seq d_model"]:
    """Token ids to the input of the first block (§3.4, §3.5; BERT: Devlin et al. 2018, Figure 2)."""
    seq = tokens.shape[1]
    if seq > cfg.max_len:
        raise ValueError(f"sequence length {seq} exceeds Config.max_len={cfg.max_len}: truncate or raise max_len.")
    x = F.embedding(tokens, params["embed.weight"])
    if cfg.bert_embeddings:
        types = torch.zeros_like(tokens) if token_types is None else token_types
        # (word + type) + position, HF BertEmbeddings' order: float addition does not associate, and the same
        # rounding is what lets train.py's lora and peft runs stay bit-identical step after step
        x = x + F.embedding(types, params["type_embed.weight"]) + params["pos_embed.weight"][:seq]
        x = layer_norm(x, params["ln_embed.weight"], params["ln_embed.bias"], cfg.eps)
    else:
        x = x * math.sqrt(cfg.d_model) + positional_encoding(seq, cfg.d_model, device=x.device, dtype=x.dtype)
    return dropout(x, cfg.dropout, train=train, generator=generator)  # §5.4: dropout on the embedding sums

def self_attention(params: Params, name: str, x: Float[Tensor, "batch seq d_model"], cfg: Config,
                   mask: Bool[Tensor, "batch seq"] | None = None) -> Float[Tensor, "batch seq d_model"]:
    """Multi-head self-attention (§3.2.2): project, split heads, attend, merge heads, project."""
    # 1) separate q, k, v projections, so LoRA can target each one by name
    q, k, v = (rearrange(project(params, f"{name}.{p}", x), "batch seq (n_heads d_head) -> batch n_heads seq d_head",
                         n_heads=cfg.n_heads) for p in ("q", "k", "v"))
    # 2) every head attends on its own d_head-wide slice
    heads = (attention if cfg.attention == "sdpa" else attention_reference)(q, k, v, mask)
    # 3) concatenate the heads and mix them with W^O
    return project(params, f"{name}.o", rearrange(heads, "batch n_heads seq d_head -> batch seq (n_heads d_head)"))

def feed_forward(params: Params, name: str, x: Float[Tensor, "batch seq d_model"],
                 cfg: Config) -> Float[Tensor, "batch seq d_model"]:
    """Position-wise FFN(x) = act(x W1 + b1) W2 + b2 (§3.3, Eq. 2); act is ReLU, or exact-erf GELU for BERT."""
    hidden = project(params, f"{name}.up", x)
    return project(params, f"{name}.down", F.relu(hidden) if cfg.activation == "relu" else F.gelu(hidden))

def encoder_layer(params: Params, name: str, x: Float[Tensor, "batch seq d_model"], cfg: Config,
                  mask: Bool[Tensor, "batch seq"] | None = None, *, train: bool = False,
                  generator: torch.Generator | None = None) -> Float[Tensor, "batch seq d_model"]:
    """One block: attention then feed-forward, each in a residual with LayerNorm (§3.1) and dropout (§5.4)."""
    drop = functools.partial(dropout, p=cfg.dropout, train=train, generator=generator)

    def norm(which: str, h: Tensor) -> Tensor:
        return layer_norm(h, params[f"{name}.{which}.weight"], params[f"{name}.{which}.bias"], cfg.eps)

    if cfg.norm_first:  # Pre-LN, Xiong et al. 2020: the residual path is an identity from input to output
        x = x + drop(self_attention(params, f"{name}.attn", norm("ln1", x), cfg, mask))
        return x + drop(feed_forward(params, f"{name}.ffn", norm("ln2", x), cfg))
    # Post-LN, §3.1: LayerNorm(x + Sublayer(x)), as torch's norm_first=False and BERT
    x = norm("ln1", x + drop(self_attention(params, f"{name}.attn", x, cfg, mask)))
    return norm("ln2", x + drop(feed_forward(params, f"{name}.ffn", x, cfg)))

@short_errors
@jaxtyped(typechecker=beartype)
def encoder(params: Params, tokens: Int[Tensor, "batch seq"], cfg: Config,
            mask: Bool[Tensor, "batch seq"] | None = None, *, token_types: Int[Tensor, "batch seq"] | None = None,
            train: bool = False, generator: torch.Generator | None = None) -> Float[Tensor, "batch seq d_model"]:
    """Token ids to contextual vectors. mask: True for a real token; padded keys receive no attention.
    train=True turns dropout on, drawn from `generator`. A sequence whose mask is all False has nothing to
    attend to and comes out as NaN or garbage; give every sequence at least one real token."""
    x = embed(params, tokens, cfg, token_types, train=train, generator=generator)
    for i in range(cfg.n_layers):
        x = encoder_layer(params, f"layers.{i}", x, cfg, mask, train=train, generator=generator)
    return layer_norm(x, params["ln_f.weight"], params["ln_f.bias"], cfg.eps) if cfg.norm_first else x

# --- Heads: their linears go through `project` too, so an adapter on any of them works unmerged ----------------
def init_head(cfg: Config, n_classes: int, generator: torch.Generator) -> Params:
    """The seed's classifier: one linear layer over the mean of the real tokens' outputs."""
    weight = torch.nn.init.xavier_uniform_(torch.empty(n_classes, cfg.d_model), generator=generator)
    return {"head.weight": weight, "head.bias": torch.zeros(n_classes)}

@short_errors
@jaxtyped(typechecker=beartype)
def classify(params: Params, hidden: Float[Tensor, "batch seq d_model"],
             mask: Bool[Tensor, "batch seq"] | None = None) -> Float[Tensor, "batch n_classes"]:
    """Logits from the mean over real tokens (pads would otherwise dilute short sequences)."""
    if mask is None:
        return project(params, "head", hidden.mean(dim=1))
    weights = mask.to(hidden.dtype)
    pooled = einsum(hidden, weights, "batch seq d_model, batch seq -> batch d_model")
    return project(params, "head", pooled / weights.sum(dim=1, keepdim=True))

def init_bert_head(cfg: Config, n_classes: int, generator: torch.Generator) -> Params:
    """HF BertForSequenceClassification's head: a tanh pooler over [CLS], then a linear classifier."""
    def normal(*shape: int) -> Tensor:
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)  # BERT's initializer_range
    return {"pooler.weight": normal(cfg.d_model, cfg.d_model), "pooler.bias": torch.zeros(cfg.d_model),
            "classifier.weight": normal(n_classes, cfg.d_model), "classifier.bias": torch.zeros(n_classes)}

@short_errors
@jaxtyped(typechecker=beartype)
def bert_classify(params: Params, hidden: Float[Tensor, "batch seq d_model"], *, train: bool = False,
                  generator: torch.Generator | None = None, p: float = 0.0) -> Float[Tensor, "batch n_classes"]:
    """classifier(dropout(tanh(pooler(hidden[:, 0])))): BERT reads the class from the first ([CLS]) token, §3."""
    pooled = dropout(torch.tanh(project(params, "pooler", hidden[:, 0])), p, train=train, generator=generator)
    return project(params, "classifier", pooled)

@short_errors
@jaxtyped(typechecker=beartype)
def bert_tag(params: Params, hidden: Float[Tensor, "batch seq d_model"], *, train: bool = False,
             generator: torch.Generator | None = None, p: float = 0.0) -> Float[Tensor, "batch seq n_classes"]:
    """HF BertForTokenClassification's head, a label per token: classifier(dropout(hidden)); init_bert_head's."""
    return project(params, "classifier", dropout(hidden, p, train=train, generator=generator))

# --- Demo: python nanollm.py ------------------------------------------------------------------------------------
def _demo(png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # write a file, never open a window
    import matplotlib.pyplot as plt
    cfg = Config()
    params = init_params(cfg, torch.Generator().manual_seed(0))
    tokens = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(50) < torch.tensor([[50], [40]])  # the second sequence ends in 10 pads
    out = encoder(params, tokens, cfg, mask)
    print(f"config: {cfg}\ntokens {tuple(tokens.shape)} -> encoder output {tuple(out.shape)}\n"
          "parameters per component (all layers together):")
    parts = [(key.split(".")[2 if key.startswith("layers.") else 0], value.numel()) for key, value in params.items()]
    groups = {part: sum(n for p, n in parts if p == part) for part, _ in parts}  # attn, ffn, ... over all layers
    total = sum(groups.values())
    for part, n in (groups | {"total": total}).items():
        print(f"  {part:8s} {n:>12,d}  {100 * n / total:5.1f}%")
    pe = positional_encoding(cfg.max_len, cfg.d_model, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(10, 5))
    fig.colorbar(ax.imshow(pe.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1))
    ax.set(xlabel="dimension", ylabel="position", title=f"sinusoidal positional encoding (d_model={cfg.d_model})")
    fig.savefig(png, dpi=100)
    error = (pe[:-7] @ pe_shift_matrix(7, cfg.d_model).T - pe[7:]).abs().max().item()
    print(f"positional-encoding heatmap written to {png}\nPE(pos + 7) = M_7 PE(pos) for all {cfg.max_len - 7} "
          f"positions, M_7 a block rotation: max error {error:.1e} (float64) {'OK' if error < 1e-5 else 'FAILED'}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nanollm quick start: seed encoder, parameter counts, PE demo")
    parser.add_argument("--png", default="pe_heatmap.png", help="where to write the positional-encoding heatmap")
    _demo(parser.parse_args().png)
