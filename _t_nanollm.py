# ===================================================================================================================
# nanollm.py: the functional Transformer encoder
# ===================================================================================================================

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import nanollm

# Small sizes, all distinct, so a swapped axis cannot pass: batch 2, seq 7, d_model 12 (3 heads of 4), d_ff 20,
# vocab 11, rank 5, n_classes 6, n_layers 2; max_len 13, type_vocab 3, seq_k 9 where keys differ from queries.
BATCH, SEQ, D_MODEL, N_HEADS, D_FF, VOCAB, RANK, N_CLASSES, N_LAYERS = 2, 7, 12, 3, 20, 11, 5, 6, 2
MAX_LEN, TYPE_VOCAB, SEQ_K = 13, 3, 9


def tiny_config(**overrides) -> nanollm.Config:
    fields = dict(vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS, max_len=MAX_LEN,
                  dropout=0.0)
    return nanollm.Config(**(fields | overrides))


def tiny_params(cfg: nanollm.Config, seed: int = 0) -> dict[str, torch.Tensor]:
    params = nanollm.init_params(cfg, torch.Generator().manual_seed(seed))
    # random LayerNorm affine and biases, so a mis-wired norm or bias cannot hide behind ones and zeros
    gen = torch.Generator().manual_seed(seed + 100)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=gen)).double() for k, v in params.items()}


def tiny_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(SEQ) < torch.tensor([[SEQ], [4]])  # lengths 7 and 4
    return tokens, mask


def torch_encoder(cfg: nanollm.Config, params: dict[str, torch.Tensor]) -> nn.TransformerEncoder:
    """nn.TransformerEncoder holding the same weights as `params` (separate q/k/v -> packed in_proj)."""
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation=cfg.activation,
                                       layer_norm_eps=cfg.eps, batch_first=True, norm_first=cfg.norm_first,
                                       dtype=torch.float64)
    final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps, dtype=torch.float64) if cfg.norm_first else None
    model = nn.TransformerEncoder(layer, cfg.n_layers, norm=final_norm, enable_nested_tensor=False)
    rename = {"attn.o": "self_attn.out_proj", "ffn.up": "linear1", "ffn.down": "linear2", "ln1": "norm1",
              "ln2": "norm2"}
    state = {f"norm.{s}": params[f"ln_f.{s}"] for s in ("weight", "bias") if cfg.norm_first}
    for i in range(cfg.n_layers):
        for s in ("weight", "bias"):
            state[f"layers.{i}.self_attn.in_proj_{s}"] = torch.cat([params[f"layers.{i}.attn.{p}.{s}"] for p in "qkv"])
            state |= {f"layers.{i}.{theirs}.{s}": params[f"layers.{i}.{ours}.{s}"] for ours, theirs in rename.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def random_adapters(params, names, seed=5):
    """name.lora_A (rank, d_in) and name.lora_B (d_out, rank), both random, in float64."""
    gen, adapters = torch.Generator().manual_seed(seed), {}
    for name in names:
        d_out, d_in = params[f"{name}.weight"].shape
        adapters |= {f"{name}.lora_A": torch.randn(RANK, d_in, generator=gen, dtype=torch.float64),
                     f"{name}.lora_B": torch.randn(d_out, RANK, generator=gen, dtype=torch.float64)}
    return adapters


def merged(params, adapters):
    """W + B @ A for every adapted linear: what project's side path must equal."""
    out = dict(params)
    for key in (k for k in adapters if k.endswith(".lora_A")):
        name = key.removesuffix(".lora_A")
        out[f"{name}.weight"] = params[f"{name}.weight"] + adapters[f"{name}.lora_B"] @ adapters[key]
    return out


# --- Whole encoder against references ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_equals_torch_transformer_encoder(norm_first, padded):
    cfg = tiny_config(norm_first=norm_first)
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    mask = mask if padded else None
    ours = nanollm.encoder(params, tokens, cfg, mask)
    x = nanollm.embed(params, tokens, cfg)
    theirs = torch_encoder(cfg, params)(x, src_key_padding_mask=None if mask is None else ~mask)
    real = torch.ones(BATCH, SEQ, dtype=torch.bool) if mask is None else mask  # torch may zero pad positions
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-10)


def test_encoder_einsum_attention_equals_sdpa():
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    einsum_cfg = dataclasses.replace(cfg, attention="einsum")
    torch.testing.assert_close(nanollm.encoder(params, tokens, einsum_cfg, mask),
                               nanollm.encoder(params, tokens, cfg, mask), rtol=0, atol=1e-12)


def test_embed_is_scaled_embedding_plus_sinusoids():
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens, _ = tiny_batch()
    expected = params["embed.weight"][tokens] * math.sqrt(D_MODEL) + nanollm.positional_encoding(
        SEQ, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(nanollm.embed(params, tokens, cfg), expected, rtol=0, atol=1e-12)


def bert_pair():
    """A random HF BertForSequenceClassification and the same weights under nanollm's names (float64)."""
    hf_cfg = BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                        num_attention_heads=N_HEADS, intermediate_size=D_FF, max_position_embeddings=MAX_LEN,
                        type_vocab_size=TYPE_VOCAB, hidden_act="gelu", layer_norm_eps=1e-12, num_labels=N_CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(hf_cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random, LayerNorm affine and biases included
        for tensor in model.parameters():
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen, dtype=torch.float64))
    # a minimal rename, enough for this test; hf_lora.py owns the full table
    rename = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
              "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ln2": "output.LayerNorm"}
    hf, e = model.state_dict(), "bert.embeddings."
    params = {"embed.weight": hf[f"{e}word_embeddings.weight"], "pos_embed.weight": hf[f"{e}position_embeddings.weight"],
              "type_embed.weight": hf[f"{e}token_type_embeddings.weight"],
              "ln_embed.weight": hf[f"{e}LayerNorm.weight"], "ln_embed.bias": hf[f"{e}LayerNorm.bias"],
              "pooler.weight": hf["bert.pooler.dense.weight"], "pooler.bias": hf["bert.pooler.dense.bias"],
              "classifier.weight": hf["classifier.weight"], "classifier.bias": hf["classifier.bias"]}
    for i in range(N_LAYERS):
        for ours, theirs in rename.items():
            for s in ("weight", "bias"):
                params[f"layers.{i}.{ours}.{s}"] = hf[f"bert.encoder.layer.{i}.{theirs}.{s}"]
    cfg = nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS, max_len=MAX_LEN,
                              dropout=0.0, type_vocab_size=TYPE_VOCAB)
    return cfg, params, model


def test_bert_arrangement_equals_hf_bert_model():
    cfg, params, model = bert_pair()
    tokens, mask = tiny_batch()
    types = torch.randint(0, TYPE_VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    expected = model.bert(input_ids=tokens, attention_mask=mask.long(), token_type_ids=types).last_hidden_state
    ours = nanollm.encoder(params, tokens, cfg, mask, token_types=types)
    torch.testing.assert_close(ours[mask], expected[mask], rtol=0, atol=1e-10)
    # our names cover exactly HF's tensors: init_params plus init_bert_head
    keys = nanollm.init_params(cfg, torch.Generator()) | nanollm.init_bert_head(cfg, N_CLASSES, torch.Generator())
    assert {k: tuple(v.shape) for k, v in keys.items()} == {k: tuple(v.shape) for k, v in params.items()}


def test_bert_classify_equals_hf_sequence_classification():
    cfg, params, model = bert_pair()
    tokens, mask = tiny_batch()
    expected = model(input_ids=tokens, attention_mask=mask.long()).logits
    ours = nanollm.bert_classify(params, nanollm.encoder(params, tokens, cfg, mask))
    assert ours.shape == (BATCH, N_CLASSES)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


# --- Leaf ops against torch -------------------------------------------------------------------------------------


def test_linear_equals_nn_linear():
    layer = nn.Linear(D_MODEL, D_FF, dtype=torch.float64)
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(nanollm.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(nanollm.linear(x, layer.weight, None), x @ layer.weight.T, rtol=0, atol=1e-14)


def test_layer_norm_equals_nn_layer_norm_and_formula():
    norm = nn.LayerNorm(D_MODEL, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    ours = nanollm.layer_norm(x, norm.weight, norm.bias, 1e-3)
    torch.testing.assert_close(ours, norm(x), rtol=0, atol=1e-13)
    # biased variance, eps inside the square root
    formula = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-3).sqrt()
    torch.testing.assert_close(ours, formula * norm.weight + norm.bias, rtol=0, atol=1e-13)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_fast_equals_reference(padded):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(BATCH, N_HEADS, SEQ, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(BATCH, N_HEADS, SEQ_K, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = (torch.arange(SEQ_K) < torch.tensor([[SEQ_K], [3]])) if padded else None
    fast, reference = nanollm.attention(q, k, v, mask), nanollm.attention_reference(q, k, v, mask)
    assert fast.shape == (BATCH, N_HEADS, SEQ, 4)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-13)
    if padded:  # a padded key gets no weight: changing its value changes nothing
        v2 = v.clone()
        v2[1, :, 3:] = 100.0
        torch.testing.assert_close(nanollm.attention_reference(q, k, v2, mask), reference, rtol=0, atol=1e-13)


def test_einsum_attention_under_cpu_bf16_autocast():
    # train.py's bf16 CPU pretraining picks Config.attention="einsum"; it must still be attention, to bf16 accuracy,
    # and gradients must reach the weights
    cfg = tiny_config(attention="einsum")
    params = {k: v.float().requires_grad_() for k, v in tiny_params(cfg).items()}
    tokens, mask = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nanollm.encoder(params, tokens, cfg, mask)
    assert out.dtype == torch.float32  # the final LayerNorm runs in float32 under autocast
    expected = nanollm.encoder({k: v.detach() for k, v in params.items()}, tokens, cfg, mask)
    torch.testing.assert_close(out[mask], expected[mask], rtol=0, atol=0.1)
    out[mask].sum().backward()
    assert params["layers.0.attn.q.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_equals_nn_multihead_attention(padded):
    cfg = tiny_config()
    params = tiny_params(cfg)
    mha = nn.MultiheadAttention(D_MODEL, N_HEADS, batch_first=True, dtype=torch.float64)
    mha.load_state_dict({
        "in_proj_weight": torch.cat([params[f"layers.0.attn.{p}.weight"] for p in "qkv"]),
        "in_proj_bias": torch.cat([params[f"layers.0.attn.{p}.bias"] for p in "qkv"]),
        "out_proj.weight": params["layers.0.attn.o.weight"], "out_proj.bias": params["layers.0.attn.o.bias"]})
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    mask = tiny_batch()[1] if padded else None
    expected, _ = mha(x, x, x, key_padding_mask=None if mask is None else ~mask, need_weights=False)
    torch.testing.assert_close(nanollm.self_attention(params, "layers.0.attn", x, cfg, mask), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_feed_forward_equals_torch_layers(kind):
    cfg = tiny_config(activation=kind)
    params = tiny_params(cfg)
    up, down = nn.Linear(D_MODEL, D_FF, dtype=torch.float64), nn.Linear(D_FF, D_MODEL, dtype=torch.float64)
    up.load_state_dict({"weight": params["layers.1.ffn.up.weight"], "bias": params["layers.1.ffn.up.bias"]})
    down.load_state_dict({"weight": params["layers.1.ffn.down.weight"], "bias": params["layers.1.ffn.down.bias"]})
    act = nn.ReLU() if kind == "relu" else nn.GELU(approximate="none")
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(nanollm.feed_forward(params, "layers.1.ffn", x, cfg), down(act(up(x))),
                               rtol=0, atol=1e-13)


def test_positional_encoding_equals_formula():
    d = 7  # odd: the last column is a sine
    pe = nanollm.positional_encoding(SEQ_K, d, dtype=torch.float64)
    for pos in range(SEQ_K):
        for i in range(d):
            angle = pos / 10000 ** ((i - i % 2) / d)
            assert pe[pos, i].item() == pytest.approx(math.sin(angle) if i % 2 == 0 else math.cos(angle), abs=1e-14)
    assert nanollm.positional_encoding(SEQ, d).dtype == torch.float32


def test_positional_encoding_shift_is_fixed_rotation():
    pe = nanollm.positional_encoding(MAX_LEN, D_MODEL, dtype=torch.float64)
    rotation = nanollm.pe_shift_matrix(3, D_MODEL)
    torch.testing.assert_close(pe[:-3] @ rotation.T, pe[3:], rtol=0, atol=1e-12)


def test_dropout_keeps_scaled_values_and_is_identity_in_eval():
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    assert nanollm.dropout(x, 0.3, train=False, generator=None) is x
    out = nanollm.dropout(x, 0.3, train=True, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7, rtol=0, atol=1e-14)
    assert 0.5 < kept.double().mean().item() < 0.9
    assert torch.equal(out, nanollm.dropout(x, 0.3, train=True, generator=torch.Generator().manual_seed(0)))
    x = x.requires_grad_()  # the backward pass: the kept units' gradient, scaled as their values
    nanollm.dropout(x, 0.3, train=True, generator=torch.Generator().manual_seed(0)).sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / 0.7, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="needs generator=torch.Generator"):
        nanollm.dropout(x, 0.3, train=True, generator=None)


def test_classify_is_linear_over_mean_of_real_tokens():
    cfg = tiny_config()
    head = {k: v.double() for k, v in nanollm.init_head(cfg, N_CLASSES, torch.Generator().manual_seed(0)).items()}
    hidden = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    _, mask = tiny_batch()
    pooled = torch.stack([hidden[b, mask[b]].mean(0) for b in range(BATCH)])
    expected = pooled @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(nanollm.classify(head, hidden, mask), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(nanollm.classify(head, hidden), nanollm.linear(hidden.mean(1), *head.values()),
                               rtol=0, atol=1e-13)


# --- Invariants -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bert", [False, True])
def test_encoder_real_positions_ignore_pad_tokens(bert):
    cfg = tiny_config(norm_first=not bert, bert_embeddings=bert)
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    other = torch.where(mask, tokens, (tokens + 5) % VOCAB)
    a, b = (nanollm.encoder(params, t, cfg, mask) for t in (tokens, other))
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-12)


def test_encoder_eval_deterministic_train_reproducible_and_nothing_mutated():
    cfg = tiny_config(dropout=0.3)
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    before = {k: v.clone() for k, v in params.items()}, tokens.clone(), mask.clone()

    def run(seed=None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return nanollm.encoder(params, tokens, cfg, mask, train=seed is not None, generator=gen)

    assert torch.equal(run(), run())
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7)[mask], run(8)[mask])
    assert not torch.allclose(run(7)[mask], run()[mask])
    assert all(torch.equal(params[k], v) for k, v in before[0].items()) and params.keys() == before[0].keys()
    assert torch.equal(tokens, before[1]) and torch.equal(mask, before[2])


def test_encoder_gradcheck_float64():
    cfg = nanollm.Config(vocab_size=VOCAB, d_model=6, n_heads=2, d_ff=5, n_layers=1, max_len=MAX_LEN, dropout=0.0)
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    names = ["embed.weight", "layers.0.attn.q.weight", "layers.0.ffn.up.weight", "layers.0.ln1.weight"]

    def f(*tensors):
        return nanollm.encoder(params | dict(zip(names, tensors)), tokens[:, :4], cfg, mask[:, :4])

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_init_params_keys_shapes_and_determinism():
    cfg = tiny_config(n_layers=1)
    shapes = {k: tuple(v.shape) for k, v in nanollm.init_params(cfg, torch.Generator()).items()}
    expected = {"embed.weight": (VOCAB, D_MODEL), "ln_f.weight": (D_MODEL,), "ln_f.bias": (D_MODEL,)}
    for p in "qkvo":
        expected |= {f"layers.0.attn.{p}.weight": (D_MODEL, D_MODEL), f"layers.0.attn.{p}.bias": (D_MODEL,)}
    expected |= {"layers.0.ffn.up.weight": (D_FF, D_MODEL), "layers.0.ffn.up.bias": (D_FF,),
                 "layers.0.ffn.down.weight": (D_MODEL, D_FF), "layers.0.ffn.down.bias": (D_MODEL,)}
    for ln in ("ln1", "ln2"):
        expected |= {f"layers.0.{ln}.weight": (D_MODEL,), f"layers.0.{ln}.bias": (D_MODEL,)}
    assert shapes == expected
    bert = nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=1, max_len=MAX_LEN,
                               type_vocab_size=TYPE_VOCAB)
    bert_shapes = {k: tuple(v.shape) for k, v in nanollm.init_params(bert, torch.Generator()).items()}
    extra = {"pos_embed.weight": (MAX_LEN, D_MODEL), "type_embed.weight": (TYPE_VOCAB, D_MODEL),
             "ln_embed.weight": (D_MODEL,), "ln_embed.bias": (D_MODEL,)}
    assert bert_shapes == {k: v for k, v in expected.items() if not k.startswith("ln_f")} | extra
    a, b = (nanollm.init_params(cfg, torch.Generator().manual_seed(4)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- The low-rank side path of project (what lora.with_lora feeds) ---------------------------------------------


def test_project_side_path_zero_B_is_base_and_random_B_equals_merged_weight():
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    adapters = random_adapters(params, ("layers.0.attn.q", "layers.1.attn.v", "layers.1.ffn.down"))
    zero_B = {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in adapters.items()}
    base = nanollm.encoder(params, tokens, cfg, mask)
    assert torch.equal(nanollm.encoder(params | zero_B, tokens, cfg, mask), base)
    unmerged = nanollm.encoder(params | adapters, tokens, cfg, mask)
    torch.testing.assert_close(unmerged, nanollm.encoder(merged(params, adapters), tokens, cfg, mask),
                               rtol=0, atol=1e-10)
    assert not torch.allclose(unmerged, base)


def test_project_is_x_W_plus_b_plus_B_A_x():
    gen = torch.Generator().manual_seed(6)
    params = {"lin.weight": torch.randn(D_FF, D_MODEL, generator=gen, dtype=torch.float64),
              "lin.bias": torch.randn(D_FF, generator=gen, dtype=torch.float64)}
    adapters = random_adapters(params, ("lin",))
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen, dtype=torch.float64)
    expected = x @ params["lin.weight"].T + params["lin.bias"] + x @ adapters["lin.lora_A"].T @ adapters["lin.lora_B"].T
    torch.testing.assert_close(nanollm.project(params | adapters, "lin", x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bert", [False, True])
def test_adapter_on_a_head_works_unmerged(bert):
    # issue 12, defect 1: the heads' linears go through project, so an adapter there is never silently dropped
    cfg = tiny_config(norm_first=not bert, bert_embeddings=bert)
    init_head = nanollm.init_bert_head if bert else nanollm.init_head
    params = tiny_params(cfg) | {k: v.double() for k, v in init_head(cfg, N_CLASSES, torch.Generator()).items()}
    adapters = random_adapters(params, ("pooler", "classifier") if bert else ("head",))
    tokens, mask = tiny_batch()

    def logits(p):
        hidden = nanollm.encoder(p, tokens, cfg, mask)
        if bert:
            return nanollm.bert_classify(p, hidden)
        return torch.cat([nanollm.classify(p, hidden, mask), nanollm.classify(p, hidden)])  # both pooling paths

    unmerged = logits(params | adapters)
    assert not torch.allclose(unmerged, logits(params))
    torch.testing.assert_close(unmerged, logits(merged(params, adapters)), rtol=0, atol=1e-10)


# --- The checks are live, and their errors are short ------------------------------------------------------------


def test_wrong_shape_inside_the_encoder_gives_a_short_message():
    # issue 12, defect 5: a few lines naming the function, the argument, expected and actual shape, bound dims
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens, mask = tiny_batch()
    with pytest.raises(TypeCheckError) as info:
        nanollm.encoder(params, tokens, cfg, mask[:, :4])
    message = str(info.value)
    assert len(message.splitlines()) <= 6, message
    for part in ("nanollm.encoder", "parameter 'mask'", "bool[2,4]", "Bool[Tensor, 'batch seq']",
                 "batch=2, seq=7"):
        assert part in message, (part, message)
    with pytest.raises(TypeCheckError) as info:  # a weight of the wrong size, deep inside the second layer
        nanollm.encoder(params | {"layers.1.ln2.weight": torch.ones(5, dtype=torch.float64)}, tokens, cfg, mask)
    message = str(info.value)
    assert len(message.splitlines()) <= 6, message
    for part in ("nanollm.layer_norm", "parameter 'weight'", "f64[5]", "d_model=12"):
        assert part in message, (part, message)


def test_wrong_shape_in_a_leaf_op_names_dimensions():
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'weight'.*d_in=12"):
        nanollm.linear(torch.zeros(BATCH, D_MODEL), torch.zeros(D_FF, 5), None)
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'mask'.*seq_k=9"):
        q, k = torch.zeros(BATCH, N_HEADS, SEQ, 4), torch.zeros(BATCH, N_HEADS, SEQ_K, 4)
        nanollm.attention(q, k, k, torch.ones(BATCH, SEQ, dtype=torch.bool))


def test_sequence_longer_than_max_len_raises():
    cfg = tiny_config(max_len=5)
    with pytest.raises(ValueError, match="sequence length 7 exceeds Config.max_len=5"):
        nanollm.encoder(tiny_params(cfg), tiny_batch()[0], cfg)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=5), "d_model=12 is not divisible by n_heads=5"),
    (dict(n_layers=0), r"n_layers=0: must be an integer >= 1"),
    (dict(vocab_size=-3), r"vocab_size=-3"),
    (dict(d_ff=7.5), r"d_ff=7.5"),
    (dict(max_len=True), r"max_len=True"),
    (dict(dropout=1.0), r"dropout=1.0: must be a float in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0.1"),
    (dict(dropout=0), r"dropout=0: must be a float"),
    (dict(eps=0.0), r"eps=0.0: must be a float > 0"),
    (dict(eps=1), r"eps=1: must be a float > 0"),
    (dict(activation="swish"), "must be 'relu'"),
    (dict(attention="flash"), "attention='flash': must be 'sdpa'"),
])
def test_config_impossible_raises_with_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_bert_preset_sets_the_bert_differences():
    cfg = nanollm.Config.bert(VOCAB)
    assert (cfg.bert_embeddings, cfg.activation, cfg.norm_first, cfg.eps) == (True, "gelu", False, 1e-12)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.attention) == (768, 12, 3072, 12, "sdpa")
    assert nanollm.Config() == nanollm.Config(10000, 512, 8, 2048, 6, 512, 0.1, True)


def test_help_exits_without_running_the_demo(tmp_path):
    # issue 12, defect 6: --help prints usage and stops (the demo would print "config:" and write a PNG)
    script = Path(nanollm.__file__)
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--png" in out and "config:" not in out
    assert list(tmp_path.iterdir()) == []
