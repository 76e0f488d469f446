import pytest
import torch
from jaxtyping import TypeCheckError
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

import bench
import lora
import nanollm

# the shared small sizes: batch 2, seq 7, d_model 12, n_heads 3, d_ff 20, vocab 11, rank 5, n_classes 6, n_layers 2
SMALL = nanollm.Config(vocab_size=11, d_model=12, n_heads=3, d_ff=20, n_layers=2, max_len=7)
SMALL_BERT = BertConfig(vocab_size=11, hidden_size=12, num_attention_heads=3, intermediate_size=20,
                        num_hidden_layers=2, max_position_embeddings=7, num_labels=6)


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
        params, targets, head = bench.seed_params(SMALL, n_classes=6), bench.SEED_TARGETS, "head"
    else:
        params = {k: v.detach() for k, v in bench.bert_model(SMALL_BERT).named_parameters()}
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
