# --- lora_variants: QLoRA, DoRA, PiSSA, AdaLoRA against PEFT and bitsandbytes --------------------------------------
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import lora
import lora_variants as lv

# small sizes, all distinct: batch, seq, hidden, heads, intermediate, vocab, rank, labels, layers
BATCH, SEQ, HIDDEN, HEADS, FFN, VOCAB, RANK, LABELS, LAYERS = 2, 7, 12, 3, 20, 11, 5, 6, 2
CFG = lora.LoraConfig(r=RANK, lora_alpha=7, target_modules=("query", "value"))
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install nanollm[qlora])")


def tiny_bert(dtype=torch.float64):
    """A random HF BertForSequenceClassification at the shared sizes, no dropout, eval mode."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
                     num_hidden_layers=LAYERS, max_position_embeddings=16, num_labels=LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, LABELS, (BATCH,), generator=g)


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
    model = tiny_bert(torch.float32)
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
    import peft
    from transformers import BertForSequenceClassification, BitsAndBytesConfig
    model = tiny_bert(torch.float32)
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
    base = tiny_bert().state_dict()
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
    import peft
    model = tiny_bert()
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
    (lora.save_adapter refuses use_dora until lora.py takes the hook in /work/notes/from_variants.md)."""
    import peft
    from safetensors.torch import load_file, save_file
    model = tiny_bert()
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
    import peft
    model = tiny_bert(torch.float32)  # PEFT's pissa_init refuses float64 weights
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
    model = tiny_bert()
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
    import peft
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
    allocator = peft_adalora(tiny_bert()).base_model.rankallocator  # PEFT's schedule, step by step
    assert [lv.budget_schedule(t, ADA, n) for t in range(ADA.total_step + 3)] == \
           [allocator.budget_schedule(t) for t in range(ADA.total_step + 3)]
    with pytest.raises(ValueError, match="budgeting phase"):
        lv.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)


def test_adalora_unchanged_at_init_and_unmerged_equals_merged():
    base = tiny_bert().state_dict()
    adapters = lv.init_adalora(base, ADA, torch.Generator().manual_seed(0))
    assert all(torch.equal(lv.merge_adalora(base, adapters, ADA)[k], base[k]) for k in base)
    trained = adapters | random_like({k: v for k, v in adapters.items() if ".lora_E" in k}, seed=5)
    low = lv.with_adalora({}, trained, ADA)
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    q = "bert.encoder.layer.1.attention.self.value"
    torch.testing.assert_close(x @ lv.merge_adalora(base, trained, ADA)[f"{q}.weight"].T,
                               x @ base[f"{q}.weight"].T + (x @ low[f"{q}.lora_A"].T) @ low[f"{q}.lora_B"].T)


def test_adalora_equals_peft_update_and_allocate(tmp_path):
    model = tiny_bert()
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
    import dataclasses
    import nanollm
    cfg = nanollm.Config(vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, d_ff=FFN, n_layers=LAYERS, max_len=16,
                         dropout=0.0)
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
    import nanollm
    cfg = nanollm.Config(vocab_size=VOCAB, d_model=HIDDEN, n_heads=HEADS, d_ff=FFN, n_layers=LAYERS, max_len=16,
                         dropout=0.0)
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
    base = tiny_bert().state_dict()
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
