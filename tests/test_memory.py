"""The memory planner: hand-computed arithmetic, exact parameter counts, each stage's memory model through the
typed API, fit checks with advice, and two real CPU measurements (cast, eval forward) the predictions must match."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from compress import config, measure, planner
from compress import memory as M
from compress import evaluate
from compress.evaluate import EvalConfig
from compress.errors import CompressError
from compress.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "configs" / "models" / "tiny-llama.json"
TINY_BERT = REPO / "configs" / "models" / "tiny-bert.json"

SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_shape():
    return M.describe(TINY_LLAMA)


@pytest.fixture(scope="module")
def txt(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "x.txt"
    p.write_text("Some text to score.\n")
    return str(p)


def predict(stage: str, state, device=None, **settings):
    """One stage's plan with the stage's typed Config built from `settings`."""
    return planner.predict_stage(STAGES[stage], STAGES[stage].Config(**settings), state, device=device)


def plan(raw: dict, model_config, device=None):
    """Plans of a pipeline given as a mapping (the YAML's content)."""
    return planner.plan(config.parse({"name": "t", "model": "x", **raw}, REPO / "pipelines" / "t.yaml"), model_config,
                        device)


def test_parse_memory_and_devices():
    assert M.parse_memory("24GB") == 24 * 10**9
    assert M.parse_memory("80GiB") == 80 * 2**30
    assert M.parse_memory("512 MiB") == 512 * 2**20
    assert M.parse_memory("1.5TB") == 1_500_000_000_000
    assert M.parse_memory(1234) == 1234
    with pytest.raises(CompressError, match="24GB"):
        M.parse_memory("lots")
    h100 = M.resolve_device("h100-80gb")
    assert (h100.kind, h100.bytes) == ("cuda", 81559 * 2**20)
    assert M.resolve_device("cpu").kind == "cpu" and M.resolve_device("cpu").bytes > 2**30
    assert M.resolve_device("cpu:8GB") == M.Device("cpu:8gb", "cpu", 8 * 10**9)
    assert M.resolve_device("24GB").bytes == 24 * 10**9
    assert M.resolve_device(None) is None
    with pytest.raises(CompressError, match="unknown device"):
        M.resolve_device("tpu-v9")


def test_param_count_equals_real_models(tiny_llama, tiny_bert, tiny_shape):
    model, _ = tiny_llama
    assert tiny_shape.params == sum(p.numel() for p in model.parameters())
    assert tiny_shape.tied and tiny_shape.gated_mlp and tiny_shape.layers == 4
    assert (tiny_shape.hidden, tiny_shape.kv_heads, tiny_shape.head_dim) == (64, 2, 16)
    assert M.describe(model).params == tiny_shape.params           # from an nn.Module directly
    bert, _ = tiny_bert
    assert M.describe(TINY_BERT).params == sum(p.numel() for p in bert.parameters())
    assert not M.describe(TINY_BERT).gated_mlp
    assert M.describe(SMOLLM2).params == 134_515_008                # SmolLM2-135M


def test_weights_bytes_by_dtype_and_format(tiny_shape):
    one_b = dataclasses.replace(tiny_shape, params=10**9, float_buffers=0)
    assert M.ModelState(one_b, "float32").weights_bytes() == 4 * 10**9
    assert M.ModelState(one_b, "bfloat16").weights_bytes() == 2 * 10**9
    s = tiny_shape
    plain = (s.params + s.float_buffers) * 2
    assert s.linear_params == s.layers * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160)
    # int8: 1 byte per linear weight + fp32 row scale per output feature; the rest stays bf16
    outs = s.layers * (64 + 32 + 32 + 64 + 160 + 160 + 64)
    assert M.ModelState(s, "bfloat16", "bnb-int8").weights_bytes() == plain - 2 * s.linear_params + s.linear_params + 4 * outs
    # GPTQ 4-bit, group 128: in=64 and in=160 give 1 and 2 groups
    one = lambda i, o, g: i * o // 2 + g * o // 2 + g * o * 2 + 4 * i
    packed = s.layers * (one(64, 64, 1) * 2 + one(64, 32, 1) * 2 + one(64, 160, 1) * 2 + one(160, 64, 2))
    assert M.gptq_linear_bytes(s.linears, s.layers, 4, 128) == packed
    assert M.ModelState(s, "bfloat16", "gptq", bits=4).weights_bytes() == plain - 2 * s.linear_params + packed


def test_training_adds_exactly_the_documented_terms(tiny_shape):
    s, B, S = tiny_shape, 2, 16
    acts = (4 * (9 * 64 + 4 * 32 + 4 * 160) + 8 * 64) * B * S * s.layers       # a*(9h + 4kvd + 4I) + 8h
    logits = B * S * 264 * (4 + 12)
    p = predict("train", M.ModelState(s, "float32"), batch_size=B, seq_len=S)
    assert p.breakdown["gradients"] == 4 * s.params
    assert p.breakdown["AdamW states (m, v)"] == 8 * s.params
    assert p.breakdown["activations"] == acts
    assert p.breakdown["logits + loss"] == logits
    assert p.growth_bytes == 12 * s.params + acts + logits       # fp32 AdamW: 4 + 4 + 8 = 16 bytes/param in all
    assert p.allocated_bytes == p.weights_bytes + p.growth_bytes
    assert p.peak_bytes == p.allocated_bytes + M.CPU_PROCESS_BYTES
    # bf16 weights, as compress/train.py trains them: bf16 grads and AdamW states, no master copy
    pb = predict("train", M.ModelState(s, "bfloat16"), batch_size=B, seq_len=S)
    acts16 = (2 * (9 * 64 + 4 * 32 + 4 * 160) + 8 * 64) * B * S * s.layers
    assert pb.growth_bytes == 6 * s.params + acts16 + B * S * 264 * (2 + 12)
    # bf16 autocast over fp32 weights: fp32 grads and states, 16-bit activations, cached 16-bit linears
    pa = predict("train", M.ModelState(s, "float32"), batch_size=B, seq_len=S, mixed_precision="bf16")
    assert pa.growth_bytes == 12 * s.params + 2 * s.linear_params + acts16 + B * S * 264 * (2 + 12)
    # the usual recipe (README table): bf16 weights + grads, fp32 master + m + v = 16 bytes/param
    recipe = M.training_terms(s, 2, B, S, autocast=False, master_weights=True)
    assert recipe["gradients"] + recipe["fp32 master weights"] + recipe["AdamW states (m, v)"] == 14 * s.params
    assert M.training_activation_bytes(s, 4, B, S, checkpointing=True) == s.layers * B * S * 64 * 4 + acts // s.layers
    assert M.activation_factor(M.describe(SMOLLM2), "float32") == 92.0


def test_gptq_cast_int8_eval_terms(tiny_shape, txt):
    s = tiny_shape
    st = M.ModelState(s, "bfloat16")
    g = predict("gptq", st, nsamples=8, seq_len=32, dtype="float16")
    assert g.breakdown["block inputs + outputs (fp32)"] == 2 * 8 * 32 * 64 * 4
    assert g.breakdown["replayed sub-module inputs (fp32)"] == 8 * 32 * 4 * (64 + 160)  # o_proj's and down's inputs
    # largest group: gate+up stacked [320, 64] (6*R*C + 3*C^2) vs down [64, 160]; or one batch's forward
    solver = max(6 * 320 * 64 + 3 * 64**2, 6 * 64 * 160 + 3 * 160**2) * 4
    assert g.breakdown["GPTQ solver or batch forward (fp32), the larger"] == max(
        solver, M.inference_layer_bytes(s, 4, 8, 32))
    # on CPU the memory-mapped input's finished blocks are paged out: the first block is the peak
    assert g.breakdown["notes"][0].startswith("peak in the first block phase;")
    assert "packed output (one block)" in g.breakdown and "input blocks paged out" not in g.breakdown
    cuda = predict("gptq", st, device="8GB", nsamples=8, seq_len=32, dtype="float16")
    assert cuda.breakdown["notes"][0].startswith("peak in the last block phase;")  # a GPU frees nothing early
    assert cuda.growth_bytes > g.growth_bytes
    # the cast of the unquantized rest happens after the last block: another phase, not added to the peak
    assert "unquantized weights in float16" not in g.breakdown and "end phase" in g.breakdown["notes"][0]
    assert g.breakdown["fp32 copy of one block"] == s.layer_params * 4  # a bf16 model's block runs in fp32
    assert g.growth_bytes == sum(v for k, v in g.breakdown.items() if k not in ("input weights", "process overhead",
                                                                               "notes"))
    assert g.output_state.format == "gptq" and g.output_state.dtype == "float16"
    assert g.output_weights_bytes < st.weights_bytes()
    rtn = predict("gptq", st, method="rtn")
    assert "calibration tokens" not in rtn.breakdown and rtn.growth_bytes < g.growth_bytes
    c = predict("cast", M.ModelState(s, "float32"), dtype="bfloat16")
    assert c.growth_bytes == s.params * 2 and s.float_buffers == 0 and c.output_state.dtype == "bfloat16"
    assert predict("cast", M.ModelState(s, "float32"), dtype="float32").growth_bytes == 0
    i8 = predict("int8", st, calibration_samples=0)
    assert i8.breakdown["int8 weights + row scales"] == s.linear_params + 4 * s.linear_out_features
    assert i8.output_state.format == "bnb-int8" and "outlier pass: logits" not in i8.breakdown
    e = predict("eval", st, perplexity=[txt], seq_len=64, batch_size=2, speed=False)
    n = 2 * 64 * 264
    assert e.breakdown["logits"] + e.breakdown["fp32 logits (upcast or shifted copy)"] + e.breakdown["log-softmax"] \
        == n * (2 + 4 + 4)
    e32 = predict("eval", M.ModelState(s, "float32"), perplexity=[txt], seq_len=64, batch_size=1, speed=False)
    assert "fp32 logits (upcast or shifted copy)" not in e32.breakdown   # fp32, one window: no copy
    bare = predict("eval", st, seq_len=64, speed=False)   # nothing to score: no windows
    assert "logits" not in bare.breakdown and "layer transient" not in bare.breakdown
    with pytest.raises(CompressError, match="plain"):
        predict("train", g.output_state)


PIPELINE = {
    "name": "t",
    "eval": {"perplexity": ["zoo:austen"], "seq_len": 512, "max_tokens": 4096},
    "stages": [
        {"cast": {"dtype": "bfloat16"}},
        {"gptq": {"bits": 4, "group_size": 128, "nsamples": 16, "seq_len": 512, "name": "gptq-w4"}},
        {"prune": {"target": {"layers": 16, "hidden": 384, "heads": 6, "intermediate": 1152}, "from": "base",
                   "batch_size": 2, "seq_len": 256}},
        {"distill": {"teacher": "base", "batch_size": 2, "seq_len": 256}},
        {"train": {"batch_size": 8, "seq_len": 1024, "tokens": 100_000}},
    ],
}


def test_plan_flows_state_and_flags_what_does_not_fit():
    plans = plan(PIPELINE, SMOLLM2, device="cpu:4GB")
    assert [p.name for p in plans] == ["base", "cast", "gptq-w4", "prune", "distill", "train"]
    base, cast, gptq, prune, distill, train = plans
    assert base.output_weights_bytes == cast.weights_bytes == 134_515_008 * 4
    assert gptq.weights_bytes == cast.output_weights_bytes                       # flows from cast
    assert prune.weights_bytes == base.output_weights_bytes                      # from: base
    assert prune.output_state.shape.layers == 16 and prune.output_state.shape.hidden == 384
    assert distill.output_state.shape.layers == 16                               # the input is the student
    assert "teacher weights" in distill.breakdown and "weights" not in distill.breakdown  # base teaches, loaded
    assert all(p.eval_peak_bytes for p in plans)
    assert cast.fits and gptq.fits
    assert train.fits is False
    assert any(a.startswith("batch_size: 2 with grad_accum x4") and "fits" in a for a in train.advice)
    again = plan({**PIPELINE, "stages": [*PIPELINE["stages"][:-1],
                                         {"train": {**PIPELINE["stages"][-1]["train"], "batch_size": 2}}]},
                 SMOLLM2, device="cpu:4GB")
    assert again[-1].peak_bytes <= M.resolve_device("cpu:4GB").bytes  # the advice is re-planned, not guessed
    assert any("mixed_precision: bf16" in a for a in train.advice)
    table = planner.format_table(plans, "cpu:4GB")
    assert "gptq-w4" in table and "NO" in table and "does not fit" in table
    assert all(p.fits is None for p in plan(PIPELINE, SMOLLM2))
    with pytest.raises(CompressError, match="from: 'nowhere' is not base"):
        plan({"stages": [{"cast": {"from": "nowhere"}}]}, SMOLLM2)


def test_bare_encoder_plans_no_logits():
    """A bare encoder (BertModel: no LM head) distils and is evaluated on hidden states: no vocab-sized terms."""
    bare = {**json.loads(TINY_BERT.read_text()), "architectures": ["BertModel"]}
    shape = M.describe(bare)
    assert not shape.logits and M.describe(TINY_BERT).logits
    stages = {"eval": {"agreement": ["zoo:austen"], "seq_len": 128},
              "stages": [{"distill": {"layers": 2, "batch_size": 4, "seq_len": 128}}]}
    base, distill = plan(stages, bare)
    assert not any("logits" in k or "KL" in k for k in distill.breakdown)
    B, S, h = 4, 128, 64
    assert distill.breakdown["teacher hidden states"] == (4 + 1) * B * S * h * 4   # every teacher layer + embeddings
    ev = evaluate.predict_memory(base.output_state, EvalConfig(perplexity=["zoo:austen"], seq_len=128))  # agreement by default
    from compress.evaluate import AGREEMENT_BATCH as B

    assert ev["hidden states of every layer"] == (4 + 1) * B * S * h * 4 and "logits" not in ev
    assert "reference (base) model weights" not in ev
    with_ref = evaluate.predict_memory(distill.output_state, EvalConfig(**stages["eval"]), "cpu", base.output_state)
    assert with_ref["reference (base) model weights"] == base.output_weights_bytes      # the student vs its teacher
    assert distill.eval_growth_bytes == sum(with_ref.values())
    with_head = plan(stages, json.loads(TINY_BERT.read_text()))[1]
    assert with_head.breakdown["soft targets + KL"] == 6 * 4 * S * 264 * 4   # distill batch 4


def test_eval_batches_no_more_windows_than_max_tokens_gives(tiny_shape, txt):
    state = M.ModelState(tiny_shape, "float32")
    few = evaluate.predict_memory(state, EvalConfig(perplexity=[txt], seq_len=512, batch_size=4, max_tokens=1024))
    many = evaluate.predict_memory(state, EvalConfig(perplexity=[txt], seq_len=512, batch_size=4, max_tokens=20480))
    assert few["logits"] == 2 * 512 * 264 * 4 and many["logits"] == 4 * 512 * 264 * 4   # 2 windows, then batch 4


def test_gptq_advice_on_a_small_gpu():
    seven = REPO / "configs" / "models" / "llama-2-7b"   # a config-only folder: Llama-2-7B's shape
    stages = {"stages": [{"cast": {"dtype": "bfloat16"}}, {"gptq": {"nsamples": 256, "seq_len": 2048}}]}
    on_big = plan(stages, seven, "h100-80gb")[2]
    on_small = plan({**stages, "offload": "never"}, seven, "rtx4090")[2]
    assert on_big.fits and not on_big.onload and on_big.allocated_bytes == on_big.weights_bytes + on_big.growth_bytes
    assert on_small.fits is False
    onloaded = plan(stages, seven, "rtx4090")[2]  # offload: auto, one block at a time: no input weights on the GPU
    assert onloaded.onload and onloaded.fits and onloaded.breakdown["input weights"] == 0
    assert any(a.startswith("nsamples: 128") for a in on_small.advice)
    assert any(a.startswith("method: rtn") for a in on_small.advice)


def test_predict_for_run_reads_the_loaded_model(tiny_llama, txt):
    from types import SimpleNamespace

    from compress.stages import cast

    model, _ = tiny_llama
    state = M.state_from_model(model)
    assert (state.dtype, state.format, state.shape.params) == ("float32", "plain", sum(p.numel() for p in model.parameters()))
    spec = SimpleNamespace(module=cast, source="base", config=cast.Config(dtype="bfloat16"))
    assert planner.predict_for_run(SimpleNamespace(data={}), spec, model) == state.shape.params * 2
    cfg = EvalConfig(perplexity=[txt], seq_len=32, batch_size=1, speed=False)
    assert planner.predict_eval_for_run(cfg, model) > 32 * 264 * 8


def test_arithmetic_table_is_computed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_arithmetic", REPO / "bench" / "memory_arithmetic.py")
    arithmetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arithmetic)
    rows = {r["model"]: r for r in arithmetic.rows()}
    seven = rows["7B"]
    assert seven["params"] == 6_738_415_616                          # Llama-2-7B
    assert seven["fp32"] == pytest.approx(28e9 * 6.738 / 7, rel=1e-3)  # "a 7B model needs 28 GB in fp32"
    assert seven["bf16"] * 2 == seven["fp32"]
    assert seven["4-bit"] < seven["int8"] < seven["bf16"] < seven["LoRA (frozen base)"] < seven["full fine-tuning"]
    assert seven["full fine-tuning"] > 16 * seven["params"]
    assert "| 70B |" in arithmetic.table()


def _mid_model(tmp_path, vocab=8192, hidden=512, layers=4):
    from compress.tiny import build

    cfg = json.loads(TINY_LLAMA.read_text()) | {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                                               "intermediate_size": 4 * hidden, "num_attention_heads": 8, "head_dim": 64}
    path = tmp_path / "mid.json"
    path.write_text(json.dumps(cfg))
    model, _ = build(path, seed=0)
    return model, cfg


def test_cast_prediction_matches_measurement(tmp_path):
    model, cfg = _mid_model(tmp_path)   # ~17M params, 67 MB fp32
    plan = predict("cast", planner.initial_state(cfg), dtype="bfloat16")
    with measure.PeakMemory("cpu", model) as m:   # pinned input: measured on top of the resident fp32 weights
        model.to(torch.bfloat16)
    err, ok = measure.compare(plan.growth_bytes, m.measured_bytes, floor=0)
    assert err <= 0.25, (plan.growth_bytes, m.measured_bytes)


def test_eval_prediction_matches_measurement(tmp_path, txt):
    model, cfg = _mid_model(tmp_path, vocab=16384, hidden=256, layers=2)
    x = torch.randint(0, 16384, (1, 512))
    with torch.no_grad():
        model(x[:, :16])  # warm-up (the pipeline has already evaluated 00-base)
    plan = predict("eval", planner.initial_state(cfg), perplexity=[txt], seq_len=512, batch_size=1, kl=False)
    with measure.PeakMemory("cpu", model) as m, torch.no_grad():
        model(x, labels=x)
    err, ok = measure.compare(plan.growth_bytes, m.measured_bytes, floor=0)
    assert err <= 0.25, (plan.growth_bytes, m.measured_bytes)


def test_fsdp_training_terms_per_process_on_hand_numbers(tiny_shape):
    """`compress plan --fsdp N`: FSDP2 full shard as configs/accelerate/fsdp.yaml runs it, per process."""
    s = tiny_shape  # tiny Llama: h 64, I 160, 4 layers, kv 2 x 16, vocab 264, tied
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64           # q, o; k, v; gate, up, down; 2 norms
    P = 264 * 64 + 4 * layer + 64                                        # embedding (= LM head) + layers + final norm
    assert (layer, P) == (s.layer_params, s.params) == (43136, 189504)
    assert M.fsdp_unit_params(s) == max(layer, 264 * 64 + 64) == layer

    B, S = 2, 32
    p = planner.predict_stage(STAGES["train"], STAGES["train"].Config(batch_size=B, seq_len=S), M.ModelState(s),
                              fsdp=2)
    acts = (2 * (9 * 64 + 4 * 32 + 4 * 160) + 8 * 64) * B * S * 4        # bf16 compute: a = 2, per process as before
    assert p.breakdown["input weights"] == 0                             # replaced by its fp32 shards
    assert p.breakdown["fp32 weight shards"] == p.breakdown["fp32 gradient shards"] == 4 * P // 2 == 379008
    assert p.breakdown["AdamW states (m, v; fp32 shards)"] == 8 * P // 2 == 758016
    assert p.breakdown["gathered units (bf16: largest + its gradient, next layer)"] == 2 * (2 * layer + layer) == 258816
    assert p.breakdown["activations"] == acts == 819200
    assert p.breakdown["logits + loss"] == B * S * 264 * (2 + 12) == 236544
    assert p.growth_bytes == 2830592 and p.peak_bytes == 2830592 + M.CPU_PROCESS_BYTES
    assert "peak in the sharded training phase" in p.breakdown["notes"][0]

    # 8 processes, a short batch: holding the whole model in fp32 while sharding it is the peak
    p8 = planner.predict_stage(STAGES["train"], STAGES["train"].Config(batch_size=1, seq_len=8), M.ModelState(s),
                               fsdp=8)
    training = 2 * (4 * P // 8) + 8 * P // 8 + 6 * layer + 3200 * 8 * 4 + 8 * 264 * 14
    assert training == 769792 < 4 * P + 4 * P // 8 == 852768
    assert p8.growth_bytes == 852768 and "peak in the sharding phase" in p8.breakdown["notes"][0]

    # distill with no teacher: the input teaches, whole and resident; the new student is sharded
    d = planner.predict_stage(STAGES["distill"], STAGES["distill"].Config(batch_size=B, seq_len=S), M.ModelState(s),
                              fsdp=2)
    assert d.breakdown["input weights"] == M.ModelState(s).weights_bytes()
    # one process: the terms of compress/train.py without FSDP, unchanged
    assert M.training_terms(s, 4, B, S, False, fsdp=1) == M.training_terms(s, 4, B, S, False)
