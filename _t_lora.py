# ===================================================================================================================
# lora.py: LoRA from scratch
# ===================================================================================================================

import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import lora
import nanollm
from lora import LoraConfig, init_lora, load_adapter, merge, save_adapter, unmerge, with_lora

# Small sizes, all distinct, so a swapped axis cannot pass: batch 2, seq 7, d_model 12 (3 heads of 4), d_ff 20,
# vocab 11, rank 5, n_classes 6, n_layers 2; max_len 13, type_vocab 3.
BATCH, SEQ, D_MODEL, N_HEADS, D_FF, VOCAB, RANK, N_CLASSES, N_LAYERS = 2, 7, 12, 3, 20, 11, 5, 6, 2
TINY = nanollm.Config(vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS, max_len=13,
                      dropout=0.0)
TINY_BERT = BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                       intermediate_size=D_FF, max_position_embeddings=13, type_vocab_size=3,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ALL_LINEAR = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in nanollm.init_params(TINY, gen(0)).items()}


def random_B(adapters: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Adapters after some training: B no longer zero, so merge and unmerge have something to do."""
    g = gen(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) if k.endswith("lora_B") else v
            for k, v in adapters.items()}


def tokens_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen(7))
    return tokens, torch.arange(SEQ) < torch.tensor([[SEQ], [4]])


def tiny_bert() -> BertModel:
    model = BertModel(TINY_BERT, add_pooling_layer=False).double().eval()
    g = gen(3)
    with torch.no_grad():  # every weight random, so no comparison can pass on ones and zeros
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


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
    adapters = init_lora(tiny_params(), cfg, gen(0))
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
    adapters = init_lora(tiny_bert().state_dict(), LoraConfig(r=RANK, target_modules=("query", "value")), gen(0))
    assert sorted(adapters) == sorted(f"encoder.layer.{i}.attention.self.{m}.lora_{ab}" for i in range(N_LAYERS)
                                      for m in ("query", "value") for ab in "AB")


# --- Running: with_lora, merge, unmerge --------------------------------------------------------------------------


def test_with_lora_holds_A_and_scaled_B_only_and_zero_B_is_base():
    params, (tokens, mask) = tiny_params(torch.float32), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=7, target_modules=ALL_LINEAR)
    adapters = random_B(init_lora(params, cfg, gen(1)))
    run = with_lora(params, adapters, cfg)
    assert run.keys() == params.keys() | adapters.keys()  # tensors only: no scale or dropout entries
    assert all(run[k] is v for k, v in params.items())  # the base is shared, not copied
    assert all(run[k] is v for k, v in adapters.items() if k.endswith("lora_A"))
    assert all(torch.equal(run[k], 7 / RANK * v) for k, v in adapters.items() if k.endswith("lora_B"))
    zero = with_lora(params, init_lora(params, cfg, gen(1)), cfg)
    assert torch.equal(nanollm.encoder(zero, tokens, TINY, mask), nanollm.encoder(params, tokens, TINY, mask))


def test_with_lora_refuses_dropout_in_one_line():
    params = tiny_params()
    cfg = LoraConfig(r=RANK, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"^with_lora runs without adapter dropout; lora_dropout=0.1 [^\n]*$"):
        with_lora(params, init_lora(params, cfg, gen(0)), cfg)


def test_merge_equals_unmerged_encoder():
    params, (tokens, mask) = tiny_params(), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v", "ffn.down"))
    adapters = random_B(init_lora(params, cfg, gen(3)))
    unmerged = nanollm.encoder(with_lora(params, adapters, cfg), tokens, TINY, mask)
    merged = nanollm.encoder(merge(params, adapters, cfg), tokens, TINY, mask)
    assert not torch.allclose(merged, nanollm.encoder(params, tokens, TINY, mask))  # the adapters do something
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bert", [False, True])
def test_adapter_on_a_head_works_unmerged(bert):
    # issue 12, defect 1: before, with_lora accepted an adapter on the pooler or the seed head and the unmerged
    # forward ignored it; now every linear goes through nanollm.project
    cfg_model = dataclasses.replace(TINY, norm_first=not bert, bert_embeddings=bert)
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
    params = tiny_params()
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
    # issue 12, defect 3: float32 adapters merged into a bf16 base gave float32 weights beside bf16 biases
    params, (tokens, mask) = tiny_params(torch.bfloat16), tokens_and_mask()
    cfg = LoraConfig(r=RANK, target_modules=("attn.q", "ffn.up"))
    adapters = random_B(init_lora(tiny_params(torch.float32), cfg, gen(6)))
    merged = merge(params, adapters, cfg)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    exact = merge(tiny_params(torch.float32), adapters, cfg)
    torch.testing.assert_close(merged["layers.0.ffn.up.weight"].float(), exact["layers.0.ffn.up.weight"],
                               rtol=1e-2, atol=1e-2)
    assert nanollm.encoder(merged, tokens, TINY, mask).dtype == torch.bfloat16


def test_rslora_equals_plain_lora_with_alpha_times_sqrt_r():
    params = tiny_params()
    rs = LoraConfig(r=RANK, lora_alpha=3, use_rslora=True, target_modules=("attn.k",))
    plain = LoraConfig(r=RANK, lora_alpha=3 * math.sqrt(RANK), target_modules=("attn.k",))
    adapters = random_B(init_lora(params, rs, gen(5)))
    a, b = merge(params, adapters, rs), merge(params, adapters, plain)
    assert not torch.equal(a["layers.0.attn.k.weight"], params["layers.0.attn.k.weight"])
    for k in params:
        torch.testing.assert_close(a[k] - params[k], b[k] - params[k], rtol=1e-14, atol=1e-14)


# --- Training: step 0 and a frozen base --------------------------------------------------------------------------


def loss_fn(params, tokens, mask, labels):
    return F.cross_entropy(nanollm.classify(params, nanollm.encoder(params, tokens, TINY, mask), mask), labels)


def test_step0_grad_of_A_is_zero_and_of_B_is_not():
    params, (tokens, mask) = tiny_params(), tokens_and_mask()
    cfg = LoraConfig(r=RANK, lora_alpha=6)
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(6)).items()}
    head = {k: v.double() for k, v in nanollm.init_head(TINY, N_CLASSES, gen(6)).items()}
    loss_fn(with_lora(params, adapters, cfg) | head, tokens, mask, torch.tensor([0, 5])).backward()
    # dL/dA = s B^T (dL/dh) x^T and B = 0; dL/dB = s (dL/dh) (A x)^T with A random
    for k, v in adapters.items():
        assert (torch.count_nonzero(v.grad) == 0) == k.endswith("lora_A"), k


def test_training_changes_only_adapters_and_head():
    params, (tokens, mask) = tiny_params(torch.float32), tokens_and_mask()
    model_cfg = dataclasses.replace(TINY, dropout=0.1)
    cfg = LoraConfig(r=RANK, lora_alpha=10)
    frozen = {k: v.clone() for k, v in params.items()}
    adapters = {k: v.requires_grad_() for k, v in init_lora(params, cfg, gen(8)).items()}
    head = {k: v.requires_grad_() for k, v in nanollm.init_head(TINY, N_CLASSES, gen(8)).items()}
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
    model = tiny_bert()
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
    params = tiny_params(torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=7, target_modules=("attn.q", "attn.v"), lora_dropout=0.05, use_rslora=True)
    adapters = random_B(init_lora(params, cfg, gen(13)))
    head = nanollm.init_head(TINY, N_CLASSES, gen(13))
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
    params = tiny_params(torch.float32)
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
    save_adapter(good, init_lora(tiny_params(torch.float32), cfg, gen(16)), cfg)
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
             # issue 12, defect 2: options that change the arithmetic are refused, not silently ignored
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


# --- Errors that say what to fix ---------------------------------------------------------------------------------


def test_misspelt_target_raises_with_module_names():
    with pytest.raises(ValueError, match=r"\['attn.vv'\] match no weight.*layers\.\*\.attn\.v.*did you mean 'attn.v'"):
        init_lora(tiny_params(), LoraConfig(target_modules=("attn.q", "attn.vv")), gen(0))


def test_too_large_r_raises():
    with pytest.raises(ValueError, match=r"r=13 exceeds min\(d_in, d_out\)=12 of 'layers.0.ffn.up'.*use r <= 12"):
        init_lora(tiny_params(), LoraConfig(r=13, target_modules=("ffn.up",)), gen(0))


def test_non_linear_or_integer_target_raises_value_error():
    with pytest.raises(ValueError, match=r"'layers.0.ln1', whose weight is torch.float64 \(12,\), not a float linear"):
        init_lora(tiny_params(), LoraConfig(r=1, target_modules=("ln1",)), gen(0))
    # issue 12, defect 4: an integer (e.g. quantized) weight gave torch's NotImplementedError
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


def test_help_exits_without_running_the_demo(tmp_path):
    # issue 12, defect 6: --help printed the usage only after the whole demo had run
    out = subprocess.run([sys.executable, str(Path(lora.__file__)), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "usage:" in out and "LoraConfig(" not in out
