"""The tests, in sections mirroring the modules: nanollm, lora, hf_lora, train.

Run: python -m pytest -q
"""


import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertModel)

import hf_lora
import lora
import nanollm
import train
from lora import LoraConfig, init_lora, load_adapter, merge, save_adapter, unmerge, with_lora


# ===================================================================================================================
# nanollm.py: the functional Transformer encoder
# ===================================================================================================================

# Small, distinct sizes so a swapped axis cannot pass: vocab 13, d_model 12 (3 heads of 4), d_ff 7, seq 5, batch 3.
VOCAB, D_MODEL, N_HEADS, D_FF, SEQ, BATCH = 13, 12, 3, 7, 5, 3


def tiny_config(**overrides) -> nanollm.Config:
    fields = dict(vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=2, max_len=11, dropout=0.0)
    return nanollm.Config(**(fields | overrides))


def nanollm_tiny_params(cfg: nanollm.Config, seed: int = 0) -> dict[str, torch.Tensor]:
    params = nanollm.init_params(cfg, torch.Generator().manual_seed(seed))
    # Random LayerNorm affine and biases, so a mis-wired norm or bias cannot hide behind ones and zeros.
    gen = torch.Generator().manual_seed(seed + 100)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=gen)).double() for k, v in params.items()}


def nanollm_tiny_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[0, 3:] = False  # lengths 3, 5, 4
    mask[2, 4:] = False
    return tokens, mask


def torch_encoder(cfg: nanollm.Config, params: dict[str, torch.Tensor]) -> nn.TransformerEncoder:
    """nn.TransformerEncoder holding the same weights as `params` (separate q/k/v -> packed in_proj)."""
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation=cfg.activation,
                                       layer_norm_eps=cfg.eps, batch_first=True, norm_first=cfg.norm_first,
                                       dtype=torch.float64)
    final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps, dtype=torch.float64) if cfg.norm_first else None
    model = nn.TransformerEncoder(layer, cfg.n_layers, norm=final_norm, enable_nested_tensor=False)
    state = {}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}", f"layers.{i}"
        for suffix in ("weight", "bias"):
            state[f"{theirs}.self_attn.in_proj_{suffix}"] = torch.cat(
                [params[f"{ours}.attn.{p}.{suffix}"] for p in ("q", "k", "v")])
            for our_name, torch_name in (("attn.o", "self_attn.out_proj"), ("ffn.up", "linear1"),
                                         ("ffn.down", "linear2"), ("ln1", "norm1"), ("ln2", "norm2")):
                state[f"{theirs}.{torch_name}.{suffix}"] = params[f"{ours}.{our_name}.{suffix}"]
            if cfg.norm_first:
                state[f"norm.{suffix}"] = params[f"ln_f.{suffix}"]
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- Whole encoder against references ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_equals_torch_transformer_encoder(norm_first, padded):
    cfg = tiny_config(norm_first=norm_first)
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()
    mask = mask if padded else None
    ours = nanollm.encoder(params, tokens, cfg, mask)
    x = nanollm.embed(params, tokens, cfg)
    theirs = torch_encoder(cfg, params)(x, src_key_padding_mask=None if mask is None else ~mask)
    # torch's fast path may zero pad positions; only real positions carry meaning.
    real = torch.ones(BATCH, SEQ, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-10)


def test_embed_is_scaled_embedding_plus_sinusoids():
    cfg = tiny_config()
    params = nanollm_tiny_params(cfg)
    tokens, _ = nanollm_tiny_batch()
    expected = params["embed.weight"][tokens] * math.sqrt(D_MODEL) + nanollm.positional_encoding(
        SEQ, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(nanollm.embed(params, tokens, cfg), expected, rtol=0, atol=1e-12)


def bert_pair(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2,
                                     num_attention_heads=N_HEADS, intermediate_size=D_FF, max_position_embeddings=11,
                                     type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(hf_cfg).double().eval()
    with torch.no_grad():  # random LayerNorm affine and biases, as in nanollm_tiny_params
        for tensor in model.parameters():
            tensor.add_(0.1 * torch.randn_like(tensor))
    # A minimal rename, enough for this test; hf_lora.py owns the full table.
    rename = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
              "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ln2": "output.LayerNorm"}
    hf = model.state_dict()
    params = {"embed.weight": hf["bert.embeddings.word_embeddings.weight"],
              "pos_embed.weight": hf["bert.embeddings.position_embeddings.weight"],
              "type_embed.weight": hf["bert.embeddings.token_type_embeddings.weight"],
              "ln_embed.weight": hf["bert.embeddings.LayerNorm.weight"],
              "ln_embed.bias": hf["bert.embeddings.LayerNorm.bias"],
              "pooler.weight": hf["bert.pooler.dense.weight"], "pooler.bias": hf["bert.pooler.dense.bias"],
              "classifier.weight": hf["classifier.weight"], "classifier.bias": hf["classifier.bias"]}
    for i in range(2):
        for ours, theirs in rename.items():
            for suffix in ("weight", "bias"):
                params[f"layers.{i}.{ours}.{suffix}"] = hf[f"bert.encoder.layer.{i}.{theirs}.{suffix}"]
    cfg = nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=2, max_len=11, dropout=0.0)
    return cfg, params, model


def test_bert_arrangement_equals_hf_bert_model():
    cfg, params, model = bert_pair()
    tokens, mask = nanollm_tiny_batch()
    types = torch.randint(0, 2, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    expected = model.bert(input_ids=tokens, attention_mask=mask.long(), token_type_ids=types).last_hidden_state
    ours = nanollm.encoder(params, tokens, cfg, mask, token_types=types)
    torch.testing.assert_close(ours[mask], expected[mask], rtol=0, atol=1e-10)
    assert set(params) - set(nanollm.init_params(cfg, torch.Generator())) == set(nanollm.init_bert_head(
        cfg, 3, torch.Generator()))


def test_bert_classify_equals_hf_sequence_classification():
    cfg, params, model = bert_pair()
    tokens, mask = nanollm_tiny_batch()
    expected = model(input_ids=tokens, attention_mask=mask.long()).logits
    ours = nanollm.bert_classify(params, nanollm.encoder(params, tokens, cfg, mask))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


# --- Leaf ops against torch -------------------------------------------------------------------------------------


def test_linear_equals_nn_linear():
    layer = nn.Linear(11, 7, dtype=torch.float64)
    x = torch.randn(3, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(nanollm.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(nanollm.linear(x, layer.weight, None), x @ layer.weight.T, rtol=0, atol=1e-14)


def test_layer_norm_equals_nn_layer_norm_and_formula():
    norm = nn.LayerNorm(D_MODEL, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, D_MODEL, dtype=torch.float64)
    ours = nanollm.layer_norm(x, norm.weight, norm.bias, 1e-3)
    torch.testing.assert_close(ours, norm(x), rtol=0, atol=1e-13)
    # biased variance, eps inside the square root
    formula = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-3).sqrt()
    torch.testing.assert_close(ours, formula * norm.weight + norm.bias, rtol=0, atol=1e-13)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_fast_equals_reference(padded):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(BATCH, N_HEADS, SEQ, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(BATCH, N_HEADS, 7, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(BATCH, 7, generator=gen) < 0.6 if padded else None
    if mask is not None:
        mask[:, 0] = True
    torch.testing.assert_close(nanollm.attention(q, k, v, mask), nanollm.attention_reference(q, k, v, mask),
                               rtol=0, atol=1e-13)


def test_attention_under_cpu_bf16_autocast_is_eq1_in_bf16_matmuls():
    # nanollm.attention writes Eq. 1 out under CPU autocast (the fused kernel's bf16 backward is slow there);
    # the result must still be attention, to bf16 accuracy, and gradients must flow to q, k and v
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(BATCH, N_HEADS, 7, 4, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.rand(BATCH, 7, generator=gen) < 0.6
    mask[:, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nanollm.attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), nanollm.attention_reference(q, k, v, mask), rtol=0, atol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_equals_nn_multihead_attention(padded):
    cfg = tiny_config()
    params = nanollm_tiny_params(cfg)
    mha = nn.MultiheadAttention(D_MODEL, N_HEADS, batch_first=True, dtype=torch.float64)
    mha.load_state_dict({
        "in_proj_weight": torch.cat([params[f"layers.0.attn.{p}.weight"] for p in "qkv"]),
        "in_proj_bias": torch.cat([params[f"layers.0.attn.{p}.bias"] for p in "qkv"]),
        "out_proj.weight": params["layers.0.attn.o.weight"], "out_proj.bias": params["layers.0.attn.o.bias"]})
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    _, mask = nanollm_tiny_batch()
    mask = mask if padded else None
    expected, _ = mha(x, x, x, key_padding_mask=None if mask is None else ~mask, need_weights=False)
    ours = nanollm.self_attention(params, "layers.0.attn", x, cfg, mask)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_feed_forward_equals_torch_layers(kind):
    cfg = tiny_config(activation=kind)
    params = nanollm_tiny_params(cfg)
    up, down = nn.Linear(D_MODEL, D_FF, dtype=torch.float64), nn.Linear(D_FF, D_MODEL, dtype=torch.float64)
    up.load_state_dict({"weight": params["layers.1.ffn.up.weight"], "bias": params["layers.1.ffn.up.bias"]})
    down.load_state_dict({"weight": params["layers.1.ffn.down.weight"], "bias": params["layers.1.ffn.down.bias"]})
    act = nn.ReLU() if kind == "relu" else nn.GELU(approximate="none")
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(nanollm.feed_forward(params, "layers.1.ffn", x, cfg), down(act(up(x))),
                               rtol=0, atol=1e-13)


def test_positional_encoding_equals_formula():
    d = 7  # odd: the last column is a sine
    pe = nanollm.positional_encoding(SEQ, d, dtype=torch.float64)
    for pos in range(SEQ):
        for i in range(d):
            angle = pos / 10000 ** ((i - i % 2) / d)
            assert pe[pos, i].item() == pytest.approx(math.sin(angle) if i % 2 == 0 else math.cos(angle), abs=1e-14)
    assert nanollm.positional_encoding(SEQ, d).dtype == torch.float32


def test_positional_encoding_shift_is_fixed_rotation():
    pe = nanollm.positional_encoding(11, D_MODEL, dtype=torch.float64)
    rotation = nanollm.pe_shift_matrix(3, D_MODEL)
    torch.testing.assert_close(pe[:-3] @ rotation.T, pe[3:], rtol=0, atol=1e-12)


def test_dropout_keeps_scaled_values_and_is_identity_in_eval():
    x = torch.randn(5, 7, 11, dtype=torch.float64)
    assert nanollm.dropout(x, 0.3, train=False, generator=None) is x
    out = nanollm.dropout(x, 0.3, train=True, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7, rtol=0, atol=1e-14)
    assert 0.5 < kept.double().mean().item() < 0.9
    with pytest.raises(ValueError, match="generator"):
        nanollm.dropout(x, 0.3, train=True, generator=None)


def test_classify_is_linear_over_mean_of_real_tokens():
    cfg = tiny_config()
    head = {k: v.double() for k, v in nanollm.init_head(cfg, 3, torch.Generator().manual_seed(0)).items()}
    hidden = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    _, mask = nanollm_tiny_batch()
    pooled = torch.stack([hidden[b, mask[b]].mean(0) for b in range(BATCH)])
    expected = pooled @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(nanollm.classify(head, hidden, mask), expected, rtol=0, atol=1e-13)
    assert nanollm.classify(head, hidden).shape == (BATCH, 3)


# --- Invariants -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bert", [False, True])
def test_encoder_real_positions_ignore_pad_tokens(bert):
    cfg = tiny_config(norm_first=not bert, bert_embeddings=bert)
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()
    other = torch.where(mask, tokens, (tokens + 5) % VOCAB)
    a, b = (nanollm.encoder(params, t, cfg, mask) for t in (tokens, other))
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-12)


def test_encoder_eval_deterministic_train_reproducible_from_generator():
    cfg = tiny_config(dropout=0.3)
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()

    def run(seed=None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return nanollm.encoder(params, tokens, cfg, mask, train=seed is not None, generator=gen)

    assert torch.equal(run(), run())
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7)[mask], run(8)[mask])
    assert not torch.allclose(run(7)[mask], run()[mask])


def test_encoder_gradcheck_float64():
    cfg = tiny_config(n_layers=1, d_model=6, n_heads=2, d_ff=5)
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()
    names = ["embed.weight", "layers.0.attn.q.weight", "layers.0.ffn.up.weight", "layers.0.ln1.weight"]

    def f(*tensors):
        return nanollm.encoder(params | dict(zip(names, tensors)), tokens[:2, :4], cfg, mask[:2, :4])

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_lora_hook_zero_b_is_base_and_random_b_equals_merged_weight():
    cfg = tiny_config()
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()
    gen = torch.Generator().manual_seed(5)
    rank, scale = 2, 1.75
    adapters = {}
    for name in ("layers.0.attn.q", "layers.1.attn.v", "layers.1.ffn.down"):
        d_out, d_in = params[f"{name}.weight"].shape
        adapters |= {f"{name}.lora_A": torch.randn(rank, d_in, generator=gen, dtype=torch.float64),
                     f"{name}.lora_B": torch.zeros(d_out, rank, dtype=torch.float64),
                     f"{name}.lora_scale": torch.tensor(scale), f"{name}.lora_dropout": torch.tensor(0.0)}
    base = nanollm.encoder(params, tokens, cfg, mask)
    assert torch.equal(nanollm.encoder(params | adapters, tokens, cfg, mask), base)

    merged = dict(params)
    for key in [k for k in adapters if k.endswith(".lora_B")]:
        name = key.removesuffix(".lora_B")
        adapters[key] = torch.randn(adapters[key].shape, generator=gen, dtype=torch.float64)
        merged[f"{name}.weight"] = params[f"{name}.weight"] + scale * adapters[key] @ adapters[f"{name}.lora_A"]
    unmerged = nanollm.encoder(params | adapters, tokens, cfg, mask)
    torch.testing.assert_close(unmerged, nanollm.encoder(merged, tokens, cfg, mask), rtol=0, atol=1e-10)
    assert not torch.allclose(unmerged, base)


def test_lora_hook_dropout_only_in_training():
    cfg = tiny_config()
    params = nanollm_tiny_params(cfg)
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.float64)
    lora = {"layers.0.attn.q.lora_A": torch.randn(2, D_MODEL, dtype=torch.float64),
            "layers.0.attn.q.lora_B": torch.randn(D_MODEL, 2, dtype=torch.float64),
            "layers.0.attn.q.lora_scale": torch.tensor(2.0), "layers.0.attn.q.lora_dropout": torch.tensor(0.5)}
    full = params | lora
    h = nanollm.project(full, "layers.0.attn.q", x)
    expected = x @ full["layers.0.attn.q.weight"].T + full["layers.0.attn.q.bias"] + 2.0 * (
        x @ lora["layers.0.attn.q.lora_A"].T @ lora["layers.0.attn.q.lora_B"].T)
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-12)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    trained = nanollm.project(full, "layers.0.attn.q", x, train=True, generator=gen())
    assert torch.equal(trained, nanollm.project(full, "layers.0.attn.q", x, train=True, generator=gen()))
    assert not torch.allclose(trained, h)


def test_init_params_keys_and_shapes():
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
    bert = nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=1, max_len=11)
    bert_shapes = {k: tuple(v.shape) for k, v in nanollm.init_params(bert, torch.Generator()).items()}
    extra = {"pos_embed.weight": (11, D_MODEL), "type_embed.weight": (2, D_MODEL),
             "ln_embed.weight": (D_MODEL,), "ln_embed.bias": (D_MODEL,)}
    assert bert_shapes == {k: v for k, v in expected.items() if not k.startswith("ln_f")} | extra
    a, b = (nanollm.init_params(cfg, torch.Generator().manual_seed(4)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- The checks are live ----------------------------------------------------------------------------------------


def test_wrong_shape_raises_naming_dimensions():
    cfg = tiny_config()
    params = nanollm_tiny_params(cfg)
    tokens, mask = nanollm_tiny_batch()
    with pytest.raises(TypeCheckError, match=r"seq=5"):
        nanollm.encoder(params, tokens, cfg, mask[:, :4])
    with pytest.raises(TypeCheckError, match=r"d_in=11"):
        nanollm.linear(torch.zeros(3, 11), torch.zeros(7, 5), None)
    with pytest.raises(TypeCheckError, match=r"d_model"):
        nanollm.encoder(params | {"layers.0.ln1.weight": torch.ones(7, dtype=torch.float64)}, tokens, cfg)


def test_sequence_longer_than_max_len_raises():
    cfg = tiny_config(max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        nanollm.encoder(nanollm_tiny_params(cfg), nanollm_tiny_batch()[0], cfg)


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=12, n_heads=5), "not divisible by n_heads"),
    (dict(n_layers=0), r"n_layers=0: must be an integer >= 1"),
    (dict(vocab_size=-3), r"vocab_size=-3"),
    (dict(d_ff=7.5), r"d_ff=7.5"),
    (dict(dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0.1"),
    (dict(activation="swish"), "must be 'relu'"),
    (dict(eps=0.0), "epsilon must be > 0"),
])
def test_config_impossible_raises_with_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_bert_preset_sets_the_bert_differences():
    cfg = nanollm.Config.bert(VOCAB)
    assert (cfg.bert_embeddings, cfg.activation, cfg.norm_first, cfg.eps) == (True, "gelu", False, 1e-12)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers) == (768, 12, 3072, 12)
    assert nanollm.Config() == nanollm.Config(10000, 512, 8, 2048, 6, 512, 0.1, True)


# ===================================================================================================================
# lora.py: LoRA from scratch
# ===================================================================================================================

# distinct odd sizes, so a swapped axis cannot pass by accident
TINY = nanollm.Config(vocab_size=13, d_model=15, n_heads=3, d_ff=7, n_layers=2, max_len=11, dropout=0.0)
TINY_BERT = BertConfig(vocab_size=13, hidden_size=15, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=7, max_position_embeddings=11, type_vocab_size=3,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_tiny_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in nanollm.init_params(TINY, gen(0)).items()}


def random_B(adapters: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Adapters after some training: B no longer zero, so merge and unmerge have something to do."""
    g = gen(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) if k.endswith("lora_B") else v
            for k, v in adapters.items()}


def tokens_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, TINY.vocab_size, (3, 5), generator=gen(7))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    return tokens, mask


def snapshot(directory) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


# --- config and init -------------------------------------------------------------------------------------------

def test_lora_config_scale_and_validation():
    assert LoraConfig(r=4, lora_alpha=8).scale == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scale == 4.0
    assert LoraConfig(target_modules=["query", "value"]).target_modules == ("query", "value")
    for bad in ({"r": 0}, {"lora_alpha": -1}, {"target_modules": ()}, {"target_modules": "attn.q"},
                {"lora_dropout": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoraConfig(**bad)


def test_init_lora_shapes_and_zero_B():
    cfg = LoraConfig(r=3, target_modules=("attn.q", "ffn.up"))
    adapters = init_lora(lora_tiny_params(), cfg, gen(0))
    assert sorted(adapters) == sorted(f"layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.q", "ffn.up")
                                      for ab in "AB")
    assert adapters["layers.1.ffn.up.lora_A"].shape == (3, 15)   # (rank, d_in)
    assert adapters["layers.1.ffn.up.lora_B"].shape == (7, 3)    # (d_out, rank)
    assert all(v.dtype == torch.float64 for v in adapters.values())
    assert all(torch.count_nonzero(v) == 0 for k, v in adapters.items() if k.endswith("lora_B"))


def test_init_lora_equals_peft_init():
    # PEFT draws lora_A with kaiming_uniform_(a=sqrt(5)) from the global generator; same seed, same stream
    layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(11, 7)),
                                peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"])).base_model.model[0]
    torch.manual_seed(5)
    layer.reset_lora_parameters("default", True)
    ours = init_lora({"0.weight": torch.zeros(7, 11)}, LoraConfig(r=3, lora_alpha=5, target_modules=("0",)), gen(5))
    assert torch.equal(ours["0.lora_A"], layer.lora_A["default"].weight.detach())
    assert torch.equal(ours["0.lora_B"], layer.lora_B["default"].weight.detach())


def test_init_lora_matches_hf_names():
    state = BertModel(TINY_BERT, add_pooling_layer=False).state_dict()
    adapters = init_lora(state, LoraConfig(r=2, target_modules=("query", "value")), gen(0))
    assert sorted(adapters) == sorted(f"encoder.layer.{i}.attention.self.{m}.lora_{ab}" for i in range(2)
                                      for m in ("query", "value") for ab in "AB")


# --- running: zero B, merged = unmerged, unmerge -----------------------------------------------------------------

def test_with_lora_zero_B_is_base_exactly():
    params, (tokens, mask) = lora_tiny_params(torch.float32), tokens_and_mask()
    cfg = LoraConfig(r=3, lora_alpha=7, target_modules=("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"))
    run = with_lora(params, init_lora(params, cfg, gen(1)), cfg)
    assert run["layers.0.attn.q.lora_scale"].shape == () and float(run["layers.0.attn.q.lora_scale"]) == 7 / 3
    assert all(run[k] is v for k, v in params.items())  # no copies of the base
    assert torch.equal(nanollm.encoder(run, tokens, TINY, mask), nanollm.encoder(params, tokens, TINY, mask))


def test_merge_equals_unmerged_linear():
    # the hook's arithmetic written out, no nanollm: W0 x + b + s B(A x) against (W0 + s BA) x + b
    g = gen(2)
    base = {"lin.weight": torch.randn(7, 11, generator=g, dtype=torch.float64),
            "lin.bias": torch.randn(7, generator=g, dtype=torch.float64)}
    cfg = LoraConfig(r=5, lora_alpha=3, target_modules=("lin",))
    run = with_lora(base, random_B(init_lora(base, cfg, g)), cfg)
    x = torch.randn(3, 11, generator=g, dtype=torch.float64)
    unmerged = F.linear(x, run["lin.weight"], run["lin.bias"]) \
        + run["lin.lora_scale"] * F.linear(F.linear(x, run["lin.lora_A"]), run["lin.lora_B"])
    merged = merge(base, {k: run[k] for k in ("lin.lora_A", "lin.lora_B")}, cfg)
    assert set(merged) == set(base)
    torch.testing.assert_close(F.linear(x, merged["lin.weight"], merged["lin.bias"]), unmerged, rtol=0, atol=1e-10)


def test_merge_equals_unmerged_encoder():
    params, (tokens, mask) = lora_tiny_params(), tokens_and_mask()
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=("attn.q", "attn.v", "ffn.down"))
    adapters = random_B(init_lora(params, cfg, gen(3)))
    unmerged = nanollm.encoder(with_lora(params, adapters, cfg), tokens, TINY, mask)
    merged = nanollm.encoder(merge(params, adapters, cfg), tokens, TINY, mask)
    assert not torch.allclose(merged, nanollm.encoder(params, tokens, TINY, mask))  # the adapters do something
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)


def test_unmerge_inverts_merge_and_nothing_is_mutated():
    params = lora_tiny_params()
    cfg = LoraConfig(r=2, lora_alpha=9, target_modules=("attn.o",))
    adapters = random_B(init_lora(params, cfg, gen(4)))
    before = {k: v.clone() for k, v in params.items()}
    merged = merge(params, adapters, cfg)
    assert not any(k.rsplit(".", 1)[-1].startswith("lora_") for k in merged)
    assert not torch.allclose(merged["layers.1.attn.o.weight"], params["layers.1.attn.o.weight"])
    restored = unmerge(merged, adapters, cfg)
    for k, v in before.items():
        assert torch.equal(params[k], v)
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-12)
    assert restored["layers.0.attn.q.weight"] is params["layers.0.attn.q.weight"]  # untargeted: shared, not copied


def test_rslora_equals_plain_lora_with_alpha_times_sqrt_r():
    params, r = lora_tiny_params(), 5
    rs = LoraConfig(r=r, lora_alpha=3, use_rslora=True, target_modules=("attn.k",))
    plain = LoraConfig(r=r, lora_alpha=3 * math.sqrt(r), target_modules=("attn.k",))
    adapters = random_B(init_lora(params, rs, gen(5)))
    a, b = merge(params, adapters, rs), merge(params, adapters, plain)
    for k in params:
        torch.testing.assert_close(a[k] - params[k], b[k] - params[k], rtol=1e-14, atol=1e-14)


# --- training: step 0 and frozen base ---------------------------------------------------------------------------

def loss_fn(params, tokens, mask, labels):
    return F.cross_entropy(nanollm.classify(params, nanollm.encoder(params, tokens, TINY, mask), mask), labels)


def test_step0_grad_of_A_is_zero_and_of_B_is_not():
    params, (tokens, mask) = lora_tiny_params(), tokens_and_mask()
    cfg = LoraConfig(r=3, lora_alpha=6)
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(6)).items()}
    head = {k: v.double() for k, v in nanollm.init_head(TINY, 3, gen(6)).items()}
    loss_fn(with_lora(params, adapters, cfg) | head, tokens, mask, torch.tensor([0, 2, 1])).backward()
    # dL/dA = s B^T (dL/dh) x^T and B = 0; dL/dB = s (dL/dh) (A x)^T with A random
    for k, v in adapters.items():
        if k.endswith("lora_A"):
            assert torch.count_nonzero(v.grad) == 0, k
        else:
            assert torch.count_nonzero(v.grad) > 0, k


def test_training_changes_only_adapters_and_head():
    params, (tokens, mask) = lora_tiny_params(torch.float32), tokens_and_mask()
    cfg = LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1)
    frozen = {k: v.clone() for k, v in params.items()}
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(8)).items()}
    head = {k: v.requires_grad_() for k, v in nanollm.init_head(TINY, 3, gen(8)).items()}
    start = {k: v.detach().clone() for k, v in (adapters | head).items()}
    optimizer = torch.optim.AdamW(list(adapters.values()) + list(head.values()), lr=1e-2)
    labels, g = torch.tensor([0, 2, 1]), gen(9)
    for _ in range(4):
        logits = nanollm.classify(head, nanollm.encoder(with_lora(params, adapters, cfg), tokens, TINY, mask,
                                                        train=True, generator=g), mask)
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert all(v.grad is None for v in params.values())
    for k, v in frozen.items():
        assert torch.equal(params[k], v), k
    for k, v in (adapters | head).items():
        assert not torch.equal(v.detach(), start[k]), k


# --- parameter counts ------------------------------------------------------------------------------------------

def test_param_counts_equal_formula():
    cases = [(lora.seed_shapes(vocab_size=13, d_model=15, d_ff=7, n_layers=3), lora.SEED_TARGETS, 3),
             (lora.bert_shapes(vocab_size=13, d_model=15, d_ff=7, n_layers=5, max_len=11), lora.BERT_TARGETS, 5)]
    # per layer: q,v = 2 r (15+15); q,k,v,o = 4 r (15+15); all linear adds up and down: 2 r (15+7)
    per_layer = {"q,v": 2 * 30, "q,k,v,o": 4 * 30, "all linear": 4 * 30 + 2 * 22}
    for shapes, targets, n_layers in cases:
        tensors = {k: torch.zeros(s) for k, s in shapes.items()}
        for label, target_modules in targets.items():
            for r in (1, 2, 7):
                cfg = LoraConfig(r=r, target_modules=target_modules)
                expected = n_layers * r * per_layer[label]
                assert lora.lora_param_formula(shapes, cfg) == expected
                assert lora.lora_param_count(init_lora(tensors, cfg, gen(0))) == expected
    rows = lora.efficiency_rows(*cases[0][:2], head="head", ranks=(2,))
    assert [row["lora_formula"] == row["lora_counted"] for row in rows] == [True] * 3


def test_seed_shapes_match_nanollm_init_params():
    params = nanollm.init_params(TINY, gen(0)) | nanollm.init_head(TINY, 3, gen(0))
    assert lora.seed_shapes(vocab_size=13, d_model=15, d_ff=7, n_layers=2, n_classes=3) == \
        {k: tuple(v.shape) for k, v in params.items()}
    assert lora.count_params(lora.seed_shapes()) == 24_035_328 + 2 * 512 + 2  # the seed encoder + 2-class head


def test_bert_shapes_match_hf_bert_for_sequence_classification():
    model = BertForSequenceClassification(TINY_BERT)
    assert lora.bert_shapes(vocab_size=13, d_model=15, d_ff=7, n_layers=2, max_len=11, type_vocab_size=3) == \
        {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert lora.count_params(lora.bert_shapes()) == 102_267_648 + 2 * 768 + 2  # bert-base-chinese + head


def test_peft_counts_the_classifier_twice():
    model = BertForSequenceClassification(TINY_BERT)
    plain = sum(p.numel() for p in model.parameters())
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=("query", "value"))
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", **vars(cfg)))
    shapes = lora.bert_shapes(vocab_size=13, d_model=15, d_ff=7, n_layers=2, max_len=11, type_vocab_size=3)
    trainable, all_params = pm.get_nb_trainable_parameters()
    assert (trainable, all_params) == lora.peft_reported_counts(shapes, cfg, "classifier")
    head = lora.head_param_count(shapes, "classifier")
    assert all_params == plain + lora.lora_param_formula(shapes, cfg) + head  # original head + its trained copy


# --- PEFT equivalence ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_equivalence_single_linear(use_rslora):
    g = gen(10)
    model = torch.nn.Sequential(torch.nn.Linear(11, 7)).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=5, lora_alpha=3, target_modules=("0",), use_rslora=use_rslora)
    adapters = random_B(init_lora(base, cfg, g))
    pm = peft.get_peft_model(model, peft.LoraConfig(**vars(cfg)))
    with torch.no_grad():
        pm.base_model.model[0].lora_A["default"].weight.copy_(adapters["0.lora_A"])
        pm.base_model.model[0].lora_B["default"].weight.copy_(adapters["0.lora_B"])
    x = torch.randn(3, 11, generator=g, dtype=torch.float64)
    run = with_lora(base, adapters, cfg)
    ours = F.linear(x, run["0.weight"], run["0.bias"]) \
        + run["0.lora_scale"] * F.linear(F.linear(x, run["0.lora_A"]), run["0.lora_B"])
    merged = merge(base, adapters, cfg)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours, rtol=0, atol=1e-12)
        torch.testing.assert_close(pm(x), F.linear(x, merged["0.weight"], merged["0.bias"]), rtol=0, atol=1e-12)


def test_peft_loads_our_adapter_and_we_load_peft_s(tmp_path):
    torch.manual_seed(0)
    model = BertModel(TINY_BERT, add_pooling_layer=False).double().eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=("query", "value"))
    adapters = random_B(init_lora(base, cfg, gen(11)))
    save_adapter(tmp_path / "ours", adapters, cfg)
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").target_modules == {"query", "value"}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    merged_model = copy.deepcopy(model)
    merged_model.load_state_dict(merge(base, adapters, cfg))
    ids = torch.randint(0, 13, (3, 5), generator=gen(12))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).last_hidden_state,
                                   merged_model(input_ids=ids).last_hidden_state, rtol=0, atol=1e-10)
    pm.save_pretrained(tmp_path / "peft")  # and back: PEFT's own files through load_adapter
    loaded, loaded_cfg = load_adapter(tmp_path / "peft")
    assert (loaded_cfg.r, loaded_cfg.lora_alpha, set(loaded_cfg.target_modules)) == (2, 5, {"query", "value"})
    assert loaded.keys() == adapters.keys() and all(torch.equal(loaded[k], adapters[k]) for k in adapters)


# --- adapter files ---------------------------------------------------------------------------------------------

def test_save_load_round_trip_bit_identical(tmp_path):
    params = lora_tiny_params(torch.float32)
    cfg = LoraConfig(r=3, lora_alpha=7, target_modules=("attn.q", "attn.v"), lora_dropout=0.05, use_rslora=True)
    adapters = random_B(init_lora(params, cfg, gen(13)))
    head = nanollm.init_head(TINY, 3, gen(13))
    save_adapter(tmp_path, adapters, cfg, extra=head)
    save_adapter(tmp_path, adapters, cfg, extra=head)  # overwriting is fine and leaves no temporary files
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded, loaded_cfg = load_adapter(tmp_path)
    assert loaded_cfg == cfg
    assert loaded.keys() == adapters.keys()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in adapters.items())
    extra = lora.load_extra(tmp_path)
    assert extra.keys() == head.keys() and all(torch.equal(extra[k], v) for k, v in head.items())
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["bias"] == "none" and written["modules_to_save"] == ["head"]
    with pytest.raises(ValueError, match="r=4 needs lora_A"):  # a config that does not fit is refused
        save_adapter(tmp_path / "other", adapters, LoraConfig(r=4))
    assert not (tmp_path / "other").exists()


def test_save_adapter_failure_keeps_old_files(tmp_path, monkeypatch):
    params = lora_tiny_params(torch.float32)
    cfg = LoraConfig(r=2)
    save_adapter(tmp_path, init_lora(params, cfg, gen(14)), cfg)
    before = snapshot(tmp_path)

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(lora, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path, random_B(init_lora(params, cfg, gen(15))), cfg)
    assert snapshot(tmp_path) == before


# --- errors that say what to fix --------------------------------------------------------------------------------

def test_misspelt_target_raises_with_module_names():
    with pytest.raises(ValueError, match=r"\['attn.vv'\] match no weight.*layers\.\*\.attn\.v.*did you mean 'attn.v'"):
        init_lora(lora_tiny_params(), LoraConfig(target_modules=("attn.q", "attn.vv")), gen(0))


def test_too_large_r_raises():
    with pytest.raises(ValueError, match=r"r=8 exceeds min\(d_in, d_out\)=7 of 'layers.0.ffn.up'.*use r <= 7"):
        init_lora(lora_tiny_params(), LoraConfig(r=8, target_modules=("ffn.up",)), gen(0))


def test_non_linear_target_raises():
    with pytest.raises(ValueError, match="not a linear"):
        init_lora(lora_tiny_params(), LoraConfig(r=1, target_modules=("ln1",)), gen(0))


def test_adapter_shape_mismatch_raises():
    cfg = LoraConfig(r=3, target_modules=("lin",))
    adapters = init_lora({"lin.weight": torch.zeros(7, 13)}, cfg, gen(0))
    with pytest.raises(ValueError, match=r"lin.lora_A has shape \(3, 13\).*must be \(r, d_in\) = \(3, 11\)"):
        with_lora({"lin.weight": torch.zeros(7, 11)}, adapters, cfg)
    with pytest.raises(ValueError, match="made for another model"):
        merge({"other.weight": torch.zeros(7, 13)}, adapters, cfg)
    with pytest.raises(ValueError, match="base already holds LoRA keys"):
        merge(with_lora({"lin.weight": torch.zeros(7, 13)}, adapters, cfg), adapters, cfg)


def test_load_adapter_missing_or_malformed_raises_one_line(tmp_path):
    cfg = LoraConfig(r=2)
    good = tmp_path / "good"
    save_adapter(good, init_lora(lora_tiny_params(torch.float32), cfg, gen(16)), cfg)
    config, weights = (good / "adapter_config.json").read_text(), (good / "adapter_model.safetensors").read_bytes()
    cases = {"missing directory": ({}, "adapter_config.json is missing"),
             "no weights": ({"adapter_config.json": config}, "adapter_model.safetensors is missing"),
             "bad json": ({"adapter_config.json": "{r: 2", "adapter_model.safetensors": weights}, "not valid JSON"),
             "other peft type": ({"adapter_config.json": json.dumps({"peft_type": "IA3"}),
                                  "adapter_model.safetensors": weights}, "peft_type"),
             "bad r": ({"adapter_config.json": config.replace('"r": 2', '"r": 0'),
                        "adapter_model.safetensors": weights}, "r must be a positive int"),
             "truncated weights": ({"adapter_config.json": config, "adapter_model.safetensors": weights[:50]},
                                   "not a readable safetensors file"),
             "wrong rank": ({"adapter_config.json": config.replace('"r": 2', '"r": 3'),
                             "adapter_model.safetensors": weights}, "r=3 needs lora_A")}
    for name, (files, message) in cases.items():
        directory = tmp_path / name.replace(" ", "_")
        if files:
            directory.mkdir()
        for file, content in files.items():
            (directory / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        before = snapshot(directory) if files else None
        with pytest.raises(ValueError, match=message) as info:
            load_adapter(directory)
        assert "\n" not in str(info.value), name
        assert (snapshot(directory) if files else None) == before, name


# --- cost ------------------------------------------------------------------------------------------------------

def test_lora_macs_orders():
    m = lora.lora_macs(d_in=11, d_out=7, r=3, n_tokens=5)
    assert m["B(Ax)"] - m["merged"] == 5 * 3 * (11 + 7)
    assert m["(BA)x"] - m["merged"] == 7 * 3 * 11 + 5 * 7 * 11
    # forward, B(Ax) and materialising W0 + sBA tie at n = d_in d_out / (d_in + d_out) tokens: 256 at d = 512
    tie = lora.lora_macs(512, 512, 8, 256)
    assert tie["B(Ax)"] == tie["(W0+sBA)x"]
    times = lora.time_lora_orders(15, 3, 5, min_run_time=1e-4)
    assert times.keys() == lora.ORDERS.keys() and all(t > 0 for t in times.values())


# ===================================================================================================================
# hf_lora.py: PEFT on BERT, and BERT checkpoints in and out of nanollm
# ===================================================================================================================

def tiny_bert(cls=BertForSequenceClassification, dtype=torch.float64, seed=0):
    """A 2-layer BERT (d 15, 3 heads of 5, d_ff 11, vocab 29, 3 classes) with every weight random, biases included."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=29, hidden_size=15, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=11, max_position_embeddings=13, type_vocab_size=2, num_labels=3)
    model = cls(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorm ones and zero biases would hide a swapped or missing term
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.3)
    return model


def hf_tiny_batch():
    """3 sequences of 7 tokens, the last two padded, two segments."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, 29, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    input_ids = input_ids * attention_mask
    token_type_ids = torch.zeros(3, 7, dtype=torch.long)
    token_type_ids[:, 4:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def random_adapters(params, cfg, seed=3):
    """lora.init_lora's adapters with B made non-zero, so the comparison is not of two base models."""
    generator = torch.Generator().manual_seed(seed)
    adapters = lora.init_lora(params, cfg, generator)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) * 0.3 if k.endswith("lora_B") else v
            for k, v in adapters.items()}


def peft_with(model, adapters, cfg):
    """PEFT on a copy of model, holding our adapters (keys in the model's names)."""
    peft_model = get_peft_model(copy.deepcopy(model), hf_lora.peft_config(cfg))
    state = {f"base_model.model.{k}.weight": v for k, v in adapters.items()}
    # set_peft_model_state_dict raises KeyError unless the modules_to_save (the classifier) are in the dict too
    state |= {f"base_model.model.classifier.{p}": getattr(model.classifier, p) for p in ("weight", "bias")}
    result = set_peft_model_state_dict(peft_model, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    return peft_model.eval()


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lora_logits_equal_peft_logits_and_gradients(dtype):
    model = tiny_bert(dtype=dtype).requires_grad_(False)  # frozen base, as in training
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("query", "value"))
    adapters = random_adapters(dict(model.named_parameters()), cfg)
    adapters = {k: v.requires_grad_() for k, v in adapters.items()}
    peft_model = peft_with(model, adapters, cfg)
    batch, labels = hf_tiny_batch(), torch.tensor([0, 2, 1])

    ours = hf_lora.lora_logits(model, adapters, cfg, **batch)
    theirs = peft_model(**batch).logits
    assert (ours - theirs).abs().max() <= tolerance(dtype)

    torch.nn.functional.cross_entropy(ours, labels).backward()
    torch.nn.functional.cross_entropy(theirs, labels).backward()
    peft_params = dict(peft_model.named_parameters())
    for key, value in adapters.items():
        peft_grad = peft_params[f"base_model.model.{key}.default.weight"].grad
        assert value.grad.abs().max() > 0
        assert (value.grad - peft_grad).abs().max() <= tolerance(dtype), key


def test_lora_logits_rslora_and_our_target_names_match_peft():
    # ffn.down without attn.o: PEFT's suffix rule would also catch attention.output.dense ("...output.dense"),
    # so peft_config pins it with a pattern; adapters here are in nanollm's names, translated by the table
    model = tiny_bert()
    cfg = lora.LoraConfig(r=2, lora_alpha=7, target_modules=("attn.k", "ffn.down"), use_rslora=True)
    ours_names = {hf_lora.our_name(k): v for k, v in model.state_dict().items()}
    adapters = random_adapters(ours_names, cfg)
    assert {k.split(".", 2)[2] for k in adapters} == {"attn.k.lora_A", "attn.k.lora_B", "ffn.down.lora_A",
                                                      "ffn.down.lora_B"}
    peft_model = peft_with(model, {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}, cfg)
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(adapted) == 4 and not any("attention.output" in n for n in adapted)
    batch = hf_tiny_batch()
    assert (hf_lora.lora_logits(model, adapters, cfg, **batch) - peft_model(**batch).logits).abs().max() <= 1e-10


def test_peft_merge_and_unload_equals_lora_merge():
    model = tiny_bert()
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("query", "key", "value", "attention.output.dense"))
    base = dict(model.state_dict())
    adapters = random_adapters(base, cfg)
    merged_peft = peft_with(model, adapters, cfg).merge_and_unload().state_dict()
    merged_ours = lora.merge(base, adapters, cfg)
    assert merged_ours.keys() == merged_peft.keys()
    assert max((merged_ours[k] - merged_peft[k]).abs().max().item() for k in merged_ours) <= 1e-12


def test_adapters_from_peft_reads_a_peft_trained_adapter_with_its_head(tmp_path):
    model = tiny_bert()
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("attn.q", "attn.v"))
    peft_model = get_peft_model(copy.deepcopy(model), hf_lora.peft_config(cfg))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    batch, labels = hf_tiny_batch(), torch.tensor([0, 2, 1])
    for _ in range(3):  # from B = 0: step 1 moves B, later steps move A too
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(peft_model(**batch).logits, labels).backward()
        optimizer.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")

    adapters, loaded = hf_lora.adapters_from_peft(tmp_path / "peft")
    assert loaded == cfg
    pairs, head = hf_lora.split_head(adapters)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(head["classifier.weight"], model.classifier.weight)  # the trained head, not the base's
    expected = peft_model(**batch).logits
    assert (hf_lora.lora_logits(model, adapters, cfg, **batch) - expected).abs().max() <= 1e-10

    # the same adapters run on nanollm over the converted checkpoint
    model.save_pretrained(tmp_path / "base")
    ncfg, params = hf_lora.load_bert(tmp_path / "base")
    mask = batch["attention_mask"].bool()
    hidden = nanollm.encoder(lora.with_lora(params, pairs, cfg), batch["input_ids"], ncfg, mask,
                             token_types=batch["token_type_ids"])
    logits = nanollm.bert_classify(params | head, hidden)
    assert (logits - expected).abs().max() <= 1e-10


def test_save_as_peft_reloads_in_peft_with_identical_logits_head_included(tmp_path):
    model = tiny_bert()
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("attn.q", "attn.v", "ffn.up"))
    ours = {hf_lora.our_name(k): v for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    head = {"pooler.weight": (15, 15), "pooler.bias": (15,), "classifier.weight": (3, 15), "classifier.bias": (3,)}
    adapters = random_adapters(ours, cfg) | {  # a head (nanollm's BERT head: pooler + classifier) trained on our side
        k: torch.randn(shape, generator=generator, dtype=torch.float64) for k, shape in head.items()}
    batch = hf_tiny_batch()
    expected = hf_lora.lora_logits(model, adapters, cfg, **batch)
    hf_lora.save_as_peft(tmp_path / "ours", adapters, cfg, model)

    fresh = copy.deepcopy(model)
    with torch.no_grad():  # a reloaded base draws a new random head: PEFT must restore ours over it
        fresh.classifier.weight.normal_()
        fresh.bert.pooler.dense.weight.normal_()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    assert (reloaded(**batch).logits - expected).abs().max() <= 1e-10
    # and back: the directory reads into the same adapters and config
    back, back_cfg = hf_lora.adapters_from_peft(tmp_path / "ours")
    assert back_cfg == cfg and back.keys() == adapters.keys()
    assert all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_modules_to_save_names_select_exactly_the_wanted_modules():
    model = tiny_bert()
    norms = {m for m, _ in model.named_modules() if m.endswith("LayerNorm")}
    assert hf_lora.modules_to_save_names(model, {"classifier", "bert.pooler.dense"}) == ["classifier", "pooler.dense"]
    assert hf_lora.modules_to_save_names(model, norms | {"classifier"}) == ["LayerNorm", "classifier"]
    # one LayerNorm of several: PEFT matches plain string endings, so the name must be long enough to be unique
    one = "bert.encoder.layer.1.attention.output.LayerNorm"
    (suffix,) = hf_lora.modules_to_save_names(model, {one})
    assert [m for m, _ in model.named_modules() if m.endswith(suffix)] == [one]


def test_save_as_peft_with_layer_norms_reloads_in_peft_and_back(tmp_path):
    # the train.py lora run trains adapters + LayerNorms + pooler + classifier; PEFT must restore all of them
    model = tiny_bert()
    cfg = lora.LoraConfig(r=2, lora_alpha=3, target_modules=("attn.q", "ffn.down"))
    ours = {hf_lora.our_name(k): v for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(6)
    trained = {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in ours.items()
               if k.split(".")[-2].startswith("ln") or k.startswith(("pooler.", "classifier."))}
    assert len(trained) == 2 * (1 + 2 * 2) + 4  # ln_embed and ln1, ln2 of both layers; pooler and classifier
    adapters = random_adapters(ours, cfg) | trained
    batch = hf_tiny_batch()
    expected = hf_lora.lora_logits(model, adapters, cfg, **batch)
    assert (expected - hf_lora.lora_logits(model, random_adapters(ours, cfg), cfg, **batch)).abs().max() > 1e-3
    hf_lora.save_as_peft(tmp_path / "ours", adapters, cfg, model)
    written = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert sorted(written["modules_to_save"]) == ["LayerNorm", "classifier", "pooler.dense"]
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert (reloaded(**batch).logits - expected).abs().max() <= 1e-10
    back, back_cfg = hf_lora.adapters_from_peft(tmp_path / "ours")
    assert back_cfg == cfg and back.keys() == adapters.keys()
    assert all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_save_as_peft_writes_atomically_and_refuses_foreign_directories(tmp_path):
    model = tiny_bert()
    cfg = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("query",))
    adapters = random_adapters(dict(model.named_parameters()), cfg)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not make"):
        hf_lora.save_as_peft(tmp_path / "project", adapters, cfg, model)
    wrong = lora.LoraConfig(r=3, lora_alpha=5, target_modules=("query", "value"))  # value has no adapters
    with pytest.raises(ValueError, match="select 4 modules"):
        hf_lora.save_as_peft(tmp_path / "out", adapters, wrong, model)
    assert sorted(os.listdir(tmp_path)) == ["project"]  # nothing half-written beside it
    hf_lora.save_as_peft(tmp_path / "out", adapters, cfg, model)
    hf_lora.save_as_peft(tmp_path / "out", adapters, cfg, model)  # overwriting its own output is fine
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_load_bert_equals_bert_model_with_padding(tmp_path):
    model = tiny_bert(BertModel)
    model.save_pretrained(tmp_path / "bert")
    cfg, params = hf_lora.load_bert(tmp_path / "bert")
    assert cfg == nanollm.Config.bert(29, d_model=15, n_heads=3, d_ff=11, n_layers=2, max_len=13)
    assert all(v.dtype == torch.float64 for v in params.values()) and "pooler.weight" in params
    batch = hf_tiny_batch()
    mask = batch["attention_mask"].bool()
    ours = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])
    theirs = model(**batch).last_hidden_state
    assert (ours - theirs)[mask].abs().max() <= 1e-10


def nanollm_bert(dtype=torch.float64):
    cfg = nanollm.Config.bert(11, d_model=15, n_heads=3, d_ff=7, n_layers=2, max_len=13)
    generator = torch.Generator().manual_seed(11)
    params = nanollm.init_params(cfg, generator) | nanollm.init_bert_head(cfg, 5, generator)
    params = {k: (v + 0.3 * torch.randn(v.shape, generator=generator)).to(dtype) for k, v in params.items()}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "好", "书", "很", "A", "a"]
    return cfg, params, vocab


def test_export_bert_loads_in_transformers_with_equal_outputs_and_round_trips(tmp_path):
    cfg, params, vocab = nanollm_bert()
    hf_lora.export_bert(tmp_path / "ours", cfg, params, vocab)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    batch = tokenizer(["我很好", "书 A a", "好书"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [2, 5, 8, 6, 3] and batch["input_ids"][1, 2:4].tolist() == [9, 10]
    mask = batch["attention_mask"].bool()
    hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])

    encoder = AutoModel.from_pretrained(tmp_path / "ours").eval()
    assert encoder.dtype == torch.float64
    assert (encoder(**batch).last_hidden_state - hidden)[mask].abs().max() <= 1e-10
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert (classifier(**batch).logits - nanollm.bert_classify(params, hidden)).abs().max() <= 1e-10

    loaded_cfg, loaded = hf_lora.load_bert(tmp_path / "ours")
    assert loaded_cfg == cfg and loaded.keys() == params.keys()
    assert all(torch.equal(loaded[k], params[k]) and loaded[k].dtype == params[k].dtype for k in params)

    headless = {k: v for k, v in params.items() if not k.startswith(("pooler.", "classifier."))}
    hf_lora.export_bert(tmp_path / "ours", cfg, headless, vocab)  # replaces its own earlier export
    assert hf_lora.load_bert(tmp_path / "ours")[1].keys() == headless.keys()  # no random pooler sneaks in


def test_export_bert_bad_input_says_what_to_fix_and_writes_nothing(tmp_path):
    cfg, params, vocab = nanollm_bert()
    with pytest.raises(ValueError, match=r"special tokens \['\[MASK\]'\]"):
        hf_lora.export_bert(tmp_path / "x", cfg, params, vocab[:4] + ["[mask]"] + vocab[5:])
    with pytest.raises(ValueError, match="vocab has 10 tokens but cfg.vocab_size is 11"):
        hf_lora.export_bert(tmp_path / "x", cfg, params, vocab[:10])
    with pytest.raises(ValueError, match="lora.merge"):
        hf_lora.export_bert(tmp_path / "x", cfg, params | {"layers.0.attn.q.lora_A": torch.zeros(2, 15)}, vocab)
    with pytest.raises(ValueError, match="BERT's arrangement"):
        hf_lora.export_bert(tmp_path / "x", nanollm.Config(vocab_size=11, d_model=15, n_heads=3), params, vocab)
    assert os.listdir(tmp_path) == []


def test_minilm_loads_offline_and_matches_nanollm_and_peft(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, tokenizer = hf_lora.load_model()
    cfg, params = hf_lora.load_bert()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (6, 384, 12, 1536, 30522)
    batch = dict(tokenizer(["LoRA adapts a frozen model.", "A short one."], padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])
        assert (hidden - model.bert(**batch).last_hidden_state)[mask].abs().max() <= 1e-5

        # PEFT's trainable count is the formula: sum of r(d_in + d_out) over targets, plus the classifier
        lcfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("attn.q", "attn.v"))
        adapters = random_adapters(params, lcfg)
        head = {"classifier.weight": model.classifier.weight, "classifier.bias": model.classifier.bias}
        peft_model = peft_with(model, {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}, lcfg)
        trainable, _ = peft_model.get_nb_trainable_parameters()
        formula = lora.lora_param_formula({k: tuple(v.shape) for k, v in params.items()}, lcfg)
        assert formula == 6 * 2 * 4 * (384 + 384) and trainable == formula + 2 * 384 + 2

        # our LoRA on the converted encoder equals PEFT's on the HF model
        lora_hidden = nanollm.encoder(lora.with_lora(params, adapters, lcfg), batch["input_ids"], cfg, mask,
                                      token_types=batch["token_type_ids"])
        ours = nanollm.bert_classify(params | head, lora_hidden)
        theirs = peft_model(**batch).logits
    assert ours.shape == (2, 2) and torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() <= 1e-5


def test_load_model_missing_path_or_unreachable_hub_gives_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as missing:
        hf_lora.load_model(tmp_path / "no" / "such" / "model")
    message = str(missing.value)
    assert "\n" not in message and "not found" in message and "packaged offline MiniLM" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the HuggingFace cache, and HF_HUB_OFFLINE is set") as hub:
        hf_lora.load_bert("nanollm-tests/no-such-model")
    assert "\n" not in str(hub.value) and "packaged offline MiniLM" in str(hub.value)


# ===================================================================================================================
# train.py: data, the five runs, reports, checkpoints, resume, torchrun
# ===================================================================================================================

QUICK = ["--quick", "--threads", "1"]


def run(argv: list[str]) -> int:
    return train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """One complete --quick run (all five rows) that several tests read."""
    out = tmp_path_factory.mktemp("quick")
    assert run([*QUICK, "--out", out]) == 0
    return out


# --- pretraining objective -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bag", [0.0, 0.5])
def test_pretraining_loss_trains_the_pooler_only_through_the_bag_task(bag):
    # masked-LM never reads [CLS]: without the bag-of-characters task the pooler gets no gradient at all
    cfg = nanollm.Config.bert(23, max_len=9, d_model=12, n_heads=3, d_ff=7, n_layers=2, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, g) | train.init_pretraining_heads(cfg, g)
    ids = torch.randint(len(train.SPECIALS), 23, (5, 9), generator=g)
    ids[:, 0], ids[3, 6:] = train.CLS, train.PAD
    recipe = train.PRETRAIN | {"seq": 9, "bag": bag}
    ctx = train.Ctx(out=Path("unused"), seed=0, device=torch.device("cpu"))
    loss_fn, parts = train.pretraining_loss(cfg, ids, torch.arange(5), recipe, ctx)
    params = {k: v.requires_grad_() for k, v in params.items()}
    loss = loss_fn(params, torch.arange(5), torch.Generator().manual_seed(1))
    (mlm, bag_loss), = parts
    assert loss.item() == pytest.approx(mlm + bag * bag_loss, rel=1e-6)
    # the bag target is the row's character histogram: its cross-entropy is at least that histogram's entropy
    share = torch.stack([torch.bincount(row[row > train.MASK], minlength=23).double() for row in ids])
    share = share / share.sum(1, keepdim=True)
    entropy = -(share * share.clamp(min=1e-30).log()).sum(1).mean()
    assert bag_loss >= entropy.item() - 1e-6
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    pooler_moves = grads["pooler.weight"] is not None and grads["pooler.weight"].abs().sum() > 0
    assert pooler_moves == (bag > 0)
    assert grads["layers.0.attn.q.weight"].abs().sum() > 0 and grads["mlm.dense.weight"].abs().sum() > 0


# --- end to end -----------------------------------------------------------------------------------------------------


def test_quick_run_report_has_every_row(quick):
    report = json.loads((quick / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == list(train.RUNS)
    keys = {"run", "trainable_params", "trainable_share", "train_seconds", "peak_memory_mb", "test_accuracy",
            "test_macro_f1"}
    for row in report["rows"]:
        assert keys <= row.keys()
        assert 0 < row["trainable_share"] <= 1 and 0 <= row["test_accuracy"] <= 1
    shares = {r["run"]: r["trainable_share"] for r in report["rows"]}
    assert shares["head"] < shares["lora"] < shares["full"] == 1.0
    for name in ("report.md", "curves.png", "lora_vs_peft.png", "runs/lora/adapter/adapter_model.safetensors",
                 "runs/peft/adapter/adapter_config.json", "base/model.safetensors"):
        assert (quick / name).exists(), name
    assert not list(quick.rglob("checkpoint.safetensors")), "finished runs leave no checkpoint behind"
    assert not list(quick.rglob("*.pt")) and not list(quick.rglob("*.bin")), "no pickle files"


def test_quick_run_lora_matches_peft_step_by_step(quick):
    lora = json.loads((quick / "runs/lora/result.json").read_text())
    peft = json.loads((quick / "runs/peft/result.json").read_text())
    assert len(lora["losses"]) == len(peft["losses"]) > 0
    assert max(abs(a - b) for a, b in zip(lora["losses"], peft["losses"])) < 1e-5
    assert lora["row"]["test_accuracy"] == peft["row"]["test_accuracy"]
    assert lora["row"]["test_macro_f1"] == pytest.approx(peft["row"]["test_macro_f1"], abs=1e-9)
    assert torch.allclose(torch.tensor(lora["predictions"]["probs"]), torch.tensor(peft["predictions"]["probs"]),
                          atol=1e-5)


def test_predict_reloads_models_and_reproduces_in_run_predictions(quick, capsys):
    report = json.loads((quick / "report.json").read_text())
    texts = report["predictions"]["lora"]["texts"]
    capsys.readouterr()
    assert run(["predict", *texts, "--out", quick, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["probs"]) == set(train.RUNS)
    for name, probs in printed["probs"].items():
        assert torch.allclose(torch.tensor(probs), torch.tensor(report["predictions"][name]["probs"]), atol=1e-5), name


def test_resume_after_interrupt_ends_like_uninterrupted_run(quick, tmp_path, monkeypatch):
    # scratch has dropout, so this also checks that the RNG state comes back; 2 epochs cross an epoch boundary
    args = [*QUICK, "--runs", "scratch,lora", "--epochs", "2", "--checkpoint-every", "4"]
    for name in ("straight", "resumed"):
        shutil.copytree(quick / "base", tmp_path / name / "base")  # the cached base is reused, not re-pretrained
    assert run([*args, "--out", tmp_path / "straight"]) == 0
    monkeypatch.setenv("NANOLLM_INTERRUPT", "scratch:14")  # after the checkpoint at step 12 (epoch 2)
    with pytest.raises(SystemExit) as stopped:
        run([*args, "--out", tmp_path / "resumed"])
    assert stopped.value.code == train.INTERRUPTED
    assert (tmp_path / "resumed/runs/scratch/checkpoint.safetensors").exists()
    monkeypatch.setenv("NANOLLM_INTERRUPT", "lora:3")  # lora starts over: no checkpoint of it exists yet
    with pytest.raises(SystemExit):
        run([*args, "--out", tmp_path / "resumed", "--resume"])
    monkeypatch.delenv("NANOLLM_INTERRUPT")
    assert run([*args, "--out", tmp_path / "resumed", "--resume"]) == 0
    for name, weights in (("scratch", "model.safetensors"), ("lora", "adapter/adapter_model.safetensors")):
        a = json.loads((tmp_path / "straight/runs" / name / "result.json").read_text())
        b = json.loads((tmp_path / "resumed/runs" / name / "result.json").read_text())
        # bit-identical weights, hence identical metrics; a logged loss may differ in its last bit, because a
        # CPU reduction's rounding can depend on where a buffer happens to sit in memory
        wa, wb = (load_file(tmp_path / run / "runs" / name / weights) for run in ("straight", "resumed"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        for key in ("test_accuracy", "test_macro_f1", "steps"):
            assert a["row"][key] == b["row"][key], (name, key)
        assert [v["accuracy"] for v in a["val"]] == [v["accuracy"] for v in b["val"]], name
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6), name


def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(quick, tmp_path):
    # lora and head have no dropout, so the two layouts draw no random numbers that could differ
    args = [*QUICK, "--runs", "lora,head"]
    for name in ("one", "two"):
        shutil.copytree(quick / "base", tmp_path / name / "base")
    assert run([*args, "--out", tmp_path / "one"]) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *map(str, args), "--out", str(tmp_path / "two")],
                          cwd=Path(train.__file__).parent, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| run | trainable params") == 1, "only rank 0 prints the report"
    assert len(list((tmp_path / "two").rglob("report.json"))) == 1
    for weights in ("lora/adapter/adapter_model.safetensors", "head/head.safetensors"):
        one, two = (load_file(tmp_path / d / "runs" / weights) for d in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    for name in ("lora", "head"):
        one, two = (json.loads((tmp_path / d / "runs" / name / "result.json").read_text()) for d in ("one", "two"))
        assert one["row"]["test_accuracy"] == two["row"]["test_accuracy"]  # metrics gathered over both shards
        assert one["val"][0]["n"] == two["val"][0]["n"] == train.QUICK["eval"]
        assert one["losses"] == pytest.approx(two["losses"], abs=1e-5)


# --- data ---------------------------------------------------------------------------------------------------------


def test_reviews_no_text_in_two_splits():
    data = train.load_reviews(seed=0)
    splits = [{t for t, _ in part} for part in (data.train, data.val, data.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert sum(map(len, splits)) == 17410 - 47  # distinct texts minus those carrying both labels
    assert data.label_names == ["neg", "pos"]


def test_user_data_formats_labels_and_line_endings(tmp_path):
    texts = [f"review number {i} {'good' if i % 3 else 'bad'}" for i in range(30)]
    labels = ["10" if i % 3 else "2" for i in range(30)]
    csv_path = tmp_path / "d.csv"
    rows = "\r\n".join(["label,review"] + [f'{y},"{t}, quoted"' for t, y in zip(texts, labels)])
    csv_path.write_bytes(b"\xef\xbb\xbf" + rows.encode())  # BOM + CRLF
    data = train.load_user_data(csv_path, "review", "label", seed=0)
    assert data.label_names == ["2", "10"]  # integer labels keep numeric order
    assert len(data.train) + len(data.val) + len(data.test) == 30
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\r".join(json.dumps({"text": t, "y": "pos" if i % 3 else "neg"}) for i, t in enumerate(texts)))
    data = train.load_user_data(jsonl, "text", "y", seed=0)
    assert data.label_names == ["neg", "pos"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\n" + "\n".join(f'{t} "q\t{y}' for t, y in zip(texts, labels)) + "\n\n")
    splits = train.load_user_data(tsv, "text", "label", seed=0)
    assert {t for t, _ in splits.train}.isdisjoint({t for t, _ in splits.test})


MALFORMED = {
    "extra field": ("d.csv", "text,label\ngood,1\nbad,0,extra\n", ":3: 3 fields"),
    "missing column": ("d.csv", "review,label\ngood,1\n", ":1: no column 'text'"),
    "empty file": ("d.csv", "", "empty file"),
    "single class": ("d.csv", "text,label\n" + "".join(f"t{i},1\n" for i in range(20)), "only one class"),
    "bad encoding": ("d.csv", "text,label\ngood,1\n".encode() + "caf\xe9,0\n".encode("latin-1"), ":3: not UTF-8"),
    "bad json": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', ":2: not valid JSON"),
    "missing key": ("d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n', ":2: no key 'text'"),
    "empty label": ("d.tsv", "text\tlabel\ngood\t1\nbad\t\n", ":3: empty label"),
    "directory": ("folder", None, "is a directory"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_one_line_error_and_nothing_written(case, tmp_path, capsys):
    name, content, expected = MALFORMED[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    assert run([*QUICK, "--data", path, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and expected in err[0], err
    assert not out.exists()


def test_missing_model_one_line_error_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert run([*QUICK, "--model", tmp_path / "no_such_model", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_model" in err[0], err
    assert not out.exists()


# --- optimiser and safety -------------------------------------------------------------------------------------------


def test_adamw_step_equals_torch_adamw():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(7, generator=g, dtype=torch.float64)}
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": train.WEIGHT_DECAY},
                             {"params": [ref["b"]], "weight_decay": 0.0}], lr=1e-2, betas=train.BETAS,
                            eps=train.ADAM_EPS)
    state = train.adamw_init(params)
    for step in range(1, 4):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        for k in ref:
            ref[k].grad = grads[k].clone()
        opt.step()
        params, state = train.adamw_step(params, grads, state, step, lr=1e-2)
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=1e-14)


def test_nan_loss_stops_naming_step_and_learning_rate(tmp_path):
    ctx = train.Ctx(tmp_path, 0, torch.device("cpu"))
    hp = train.Hyper(epochs=1, lr=0.5, batch_size=2, flag="--lr-full")

    def loss_fn(params, idx, generator):  # finite at step 1, NaN from step 2 on
        return params["w"].sum() * (1.0 if params["w"].sum() == 3 else math.nan)

    with pytest.raises(train.Diverged, match=r"step 2; lower the learning rate \(--lr-full, now 0.5\)"):
        train.fit(ctx, "nan", {"w": torch.ones(3)}, loss_fn, torch.ones(8, dtype=torch.long), hp, "x")
