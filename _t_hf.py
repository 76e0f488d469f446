# ===================================================================================================================
# hf_lora.py: PEFT on BERT, and BERT checkpoints in and out of nanollm
# ===================================================================================================================
from copy import deepcopy
import json
import os
import subprocess
import sys
import time

import huggingface_hub
import peft
import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel,
                          BertForSequenceClassification)

import hf_lora
import lora
import nanollm

# the shared sizes, all distinct: batch 2, seq 7, d_model 12 (3 heads of 4), d_ff 20, vocab 11, rank 5, 6 classes,
# 13 positions, 3 token types; 2 layers (= batch, but no tensor has both)
BATCH, SEQ, D_MODEL, N_HEADS, D_FF, VOCAB, RANK, N_CLASSES, N_LAYERS = 2, 7, 12, 3, 20, 11, 5, 6, 2
MAX_LEN, TYPE_VOCAB = 13, 3


def hf_tiny_bert(cls=BertForSequenceClassification, dtype=torch.float64, n_layers=N_LAYERS, seed=0):
    """A HuggingFace BERT at the sizes above, every weight random (LayerNorm ones and zero biases hide mistakes)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=n_layers, num_attention_heads=N_HEADS,
                        intermediate_size=D_FF, max_position_embeddings=MAX_LEN, type_vocab_size=TYPE_VOCAB,
                        num_labels=N_CLASSES)
    model = cls(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.3)
    return model


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


def hf_random_adapters(params, cfg, seed=3):
    """lora.init_lora's adapters with B made non-zero, so no comparison is of two base models."""
    generator = torch.Generator().manual_seed(seed)
    adapters = lora.init_lora(params, cfg, generator)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) if k.endswith("lora_B") else v
            for k, v in adapters.items()}


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


def test_load_bert_equals_bert_model_and_classifier_with_padding(hf_pair, tmp_path):
    model, ncfg, params = hf_pair
    assert ncfg == nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS,
                                       max_len=MAX_LEN, type_vocab_size=TYPE_VOCAB)
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
    cfg = nanollm.Config.bert(VOCAB, d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, n_layers=N_LAYERS, max_len=MAX_LEN)
    generator = torch.Generator().manual_seed(11)
    params = nanollm.init_params(cfg, generator) | nanollm.init_bert_head(cfg, N_CLASSES, generator)
    params = {k: (v + 0.3 * torch.randn(v.shape, generator=generator)).double() for k, v in params.items()}
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


# --- our LoRA equals PEFT's -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_our_lora_equals_peft_logits_and_gradients(hf_pair, dtype):
    model, ncfg, params = hf_pair
    model, params = deepcopy(model).to(dtype), {k: v.to(dtype) for k, v in params.items()}
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q", "attn.v"))
    adapters = {k: v.requires_grad_() for k, v in hf_random_adapters(params, cfg).items()}
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
    adapters = hf_random_adapters(params, cfg)
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
    adapters = hf_random_adapters(base, cfg)
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
    adapters = hf_random_adapters(params, cfg) | head
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
    adapters = hf_random_adapters(params, cfg) | trained
    batch = hf_batch()
    expected = our_logits(ncfg, params, adapters, cfg, batch)
    assert max_diff(expected, our_logits(ncfg, params, hf_random_adapters(params, cfg), cfg, batch)) > 1e-3
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
    model = hf_tiny_bert(n_layers=12)  # layer 1 and layer 11: PEFT's test is a plain endswith
    norms = {m for m, _ in model.named_modules() if m.endswith("LayerNorm")}
    assert hf_lora.modules_to_save_names(model, {"classifier", "bert.pooler.dense"}) == ["classifier", "pooler.dense"]
    assert hf_lora.modules_to_save_names(model, norms | {"classifier"}) == ["LayerNorm", "classifier"]
    for one in ("bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.11.output.LayerNorm"):
        (suffix,) = hf_lora.modules_to_save_names(model, {one})
        assert [m for m, _ in model.named_modules() if m.endswith(suffix)] == [one]


def test_save_as_peft_writes_atomically_and_refuses_foreign_directories(hf_pair, tmp_path):
    model, _, params = hf_pair
    cfg = lora.LoraConfig(r=RANK, lora_alpha=3, target_modules=("attn.q",))
    adapters = hf_random_adapters(params, cfg)
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
    adapters = hf_random_adapters(params, lcfg)
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
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            call(name)
        message = str(error.value)
        assert "\n" not in message and "directory not found" in message and "packaged offline MiniLM" in message
        assert time.perf_counter() - start < 5  # transformers' offline mode answers at once, no retries
    with pytest.raises(ValueError, match="num_labels=1: a classifier needs an integer >= 2"):
        hf_lora.load_model(num_labels=1)


def test_help_does_not_run_the_demo():
    done = subprocess.run([sys.executable, "hf_lora.py", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.abspath(hf_lora.__file__)))
    assert done.returncode == 0 and done.stdout.startswith("usage: hf_lora.py")
    assert "Concept map" not in done.stdout and "MiniLM-L6, a BERT" not in done.stdout
