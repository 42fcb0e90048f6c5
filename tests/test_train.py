"""The training engine (compress/train.py) and the `train` stage: tiny Llama, CPU, seconds."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import distributed
from compress import train as engine
from compress.context import Context
from compress.errors import CompressError
from compress.stages import train as train_stage
from conftest import REPO, TEXT, TINY_LLAMA



class Killed(Exception):
    """Stands in for the process dying mid-stage."""


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _random_batches(seed=0, shape=(4, 16)):
    """A deterministic, stateless stream of token blocks (resume must fast-forward it)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 256, shape, generator=g)


def _noisy_lm_loss(model, batch):
    """LM loss scaled by a draw from the global RNG, so a resume that lost the RNG state would differ."""
    loss, _ = engine.causal_lm_loss(model, batch)
    return loss * (1 + 0.1 * torch.rand(())), {"scale_probe": 1.0}


# -- engine


def test_loss_decreases_on_a_repeated_tiny_corpus(tiny_llama, tmp_path):
    model, tok = tiny_llama
    ids = torch.tensor(tok(TEXT * 2)["input_ids"][: 4 * 32]).view(4, 32)  # [B, T]
    cfg = engine.TrainConfig(steps=30, lr=3e-3, warmup_steps=3)
    batches = itertools.repeat({"input_ids": ids})
    res = engine.fit(model, batches, engine.causal_lm_loss, cfg, Context.for_tests(tmp_path))
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 30 and res.tokens == 30 * ids.numel()
    assert losses[-1] < losses[0] - 2.0, losses
    assert not model.training  # left in the mode it came in (tiny.build returns eval mode)


def test_lr_schedule_on_hand_numbers():
    f = lambda s: engine.lr_multiplier(s, steps=10, warmup_steps=2, min_lr_ratio=0.1)  # noqa: E731
    assert f(1) == pytest.approx(0.5) and f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(10) == pytest.approx(0.1)
    assert engine.lr_multiplier(3, steps=3, warmup_steps=0, min_lr_ratio=0.0) == pytest.approx(0.0)


def test_resume_after_a_kill_is_bit_exact(tiny_llama, tmp_path):
    """Uninterrupted 6 steps == killed after step 5 (checkpoint at 4) + rerun with the same work_dir."""
    from compress.tiny import build

    cfg = engine.TrainConfig(steps=6, lr=1e-3, warmup_steps=2, grad_accum=2, save_every=2)
    torch.manual_seed(0)
    model, _ = build(TINY_LLAMA, seed=0)
    full = engine.fit(model, _random_batches(), _noisy_lm_loss, cfg, Context.for_tests(tmp_path / "a"))
    expected = _params(model)

    ctx = Context.for_tests(tmp_path / "b")

    def kill_after_5(step, logs):
        if step == 5:
            raise Killed

    torch.manual_seed(0)
    model, _ = build(TINY_LLAMA, seed=0)
    with pytest.raises(Killed):
        engine.fit(model, _random_batches(), _noisy_lm_loss, cfg, ctx, on_step=kill_after_5)
    assert [p.name for p in (ctx.work_dir / "train").iterdir()] == ["step-00000004"]

    torch.manual_seed(123)  # the resume must restore the RNG itself
    model, _ = build(TINY_LLAMA, seed=0)
    resumed = engine.fit(model, _random_batches(), _noisy_lm_loss, cfg, ctx)
    assert resumed.resumed_from == 4
    assert _same(_params(model), expected)
    assert resumed.history == full.history and resumed.tokens == full.tokens


def test_nan_guard_names_the_step(tiny_llama, tmp_path):
    model, _ = tiny_llama
    before = _params(model)
    nan_loss = lambda m, b: (engine.causal_lm_loss(m, b)[0] * float("nan"), {})  # noqa: E731
    with pytest.raises(CompressError, match=r"loss is nan at step 1"):
        engine.fit(model, _random_batches(), nan_loss, engine.TrainConfig(steps=3), Context.for_tests(tmp_path))
    assert _same(_params(model), before)  # nothing was updated at the bad step

    cfg = engine.TrainConfig(steps=5, lr=1e30, max_grad_norm=None)
    with pytest.raises(CompressError, match=r"is (nan|inf) at step [2-5] \(lr 1e\+30\)"):
        engine.fit(model, _random_batches(), engine.causal_lm_loss, cfg, Context.for_tests(tmp_path))


def test_extra_groups_ascend_with_their_own_schedule_and_hooks_run(tiny_llama, tmp_path):
    """What prune needs: a Lagrange multiplier outside the model, trained by gradient ascent at constant lr."""
    model, _ = tiny_llama
    lam = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def loss_fn(m, b):
        lm, _ = engine.causal_lm_loss(m, b)
        return lm + lam * 1.0, {"lambda": lam.detach()}  # d loss / d lam = 1: descent lowers lam, ascent raises it

    cfg = engine.TrainConfig(steps=5, lr=1e-3, warmup_steps=2, min_lr_ratio=0.0)
    res = engine.fit(
        model, _random_batches(), loss_fn, cfg, Context.for_tests(tmp_path),
        extra_param_groups=[{"params": [lam], "lr": 0.1, "maximize": True, "schedule": "constant"}],
        before_step=seen.append, on_step=lambda step, logs: {"hook": step * 10},
    )
    assert seen == [1, 2, 3, 4, 5]
    assert [r["hook"] for r in res.history] == [10, 20, 30, 40, 50]
    # Adam on a constant gradient moves by ~lr per step: 5 * 0.1 if (and only if) the lr stayed constant
    assert lam.item() == pytest.approx(0.5, rel=1e-3)
    assert res.history[-1]["lambda"] == pytest.approx(0.4, rel=1e-3)  # logged before the last update
    assert res.history[-1]["lr"] == pytest.approx(0.0)  # the model's group did decay to min_lr_ratio 0


def test_train_config_checks():
    with pytest.raises(CompressError, match="steps"):
        engine.TrainConfig(steps=0)
    with pytest.raises(CompressError, match="mixed_precision"):
        engine.TrainConfig(steps=1, mixed_precision="fp16")
    with pytest.raises(CompressError, match="warmup_steps"):
        engine.TrainConfig(steps=2, warmup_steps=3)


# -- dynamic batch loading


def test_weight_update_rule_on_hand_numbers():
    e = math.e
    w = engine.update_domain_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], smoothing=0.0)
    assert w.tolist() == pytest.approx([e / (1 + e), 1 / (1 + e)])  # the lagging domain gains weight

    w0 = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # zero excess everywhere (at or below the reference: Δ is clipped at 0) keeps the weights
    w = engine.update_domain_weights(w0, [1.0, 2.0, 2.5], [1.0, 2.5, 2.5], smoothing=0.0)
    assert torch.allclose(w, w0, atol=1e-15)
    w = engine.update_domain_weights(w0, [1.0, 2.0, 2.5], [1.0, 2.5, 2.5])  # with LLM-Shearing's c = 1e-4
    assert torch.allclose(w, 0.9999 * w0 + 1e-4 / 3, atol=1e-15)

    # only domain 0 lags: it gains, and domains 1 and 2 keep their ratio 0.3 : 0.5
    w = engine.update_domain_weights(w0, [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], eta=2.0, smoothing=0.0)
    a = 0.2 * e**2
    assert w.tolist() == pytest.approx([a / (a + 0.8), 0.3 / (a + 0.8), 0.5 / (a + 0.8)])


def _mixture_blocks(sizes=(50, 30, 20), T=8):
    """Domain i's blocks are filled with i*100 + block index, so every row tells where it came from."""
    return {f"d{i}": (i * 100 + torch.arange(n)).unsqueeze(1).repeat(1, T) for i, n in enumerate(sizes)}


def test_sampling_follows_the_weights_and_shards_by_rank():
    mix = engine.DomainMixture(_mixture_blocks(), batch_size=50, weights=[0.6, 0.3, 0.1], seed=1)
    rows = torch.cat([next(mix)["input_ids"][:, 0] for _ in range(200)])  # 10,000 rows
    freq = torch.bincount(rows // 100, minlength=3).double() / len(rows)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.02), freq
    assert sum(mix.tokens_seen().values()) == 10_000 * 8

    # each domain is walked through a shuffled permutation: no block repeats before all were seen
    one = engine.DomainMixture({"x": _mixture_blocks()["d1"]}, batch_size=30, seed=3)
    assert sorted(next(one)["input_ids"][:, 0].tolist()) == list(range(100, 130))

    # two processes see disjoint halves of the global batch a single process with twice the batch sees
    single = engine.DomainMixture(_mixture_blocks(), batch_size=8, weights=[0.5, 0.3, 0.2], seed=2)
    ranks = [
        engine.DomainMixture(_mixture_blocks(), batch_size=4, weights=[0.5, 0.3, 0.2], seed=2, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(5):
        assert torch.equal(next(single)["input_ids"], torch.cat([next(m)["input_ids"] for m in ranks]))
    assert ranks[0].state_dict() == ranks[1].state_dict()


# -- the train stage


@pytest.fixture
def domains(tmp_path, text_file) -> list[str]:
    """Two text domains: the fixture's prose and a digit-heavy ledger (different losses under any model)."""
    ledger = tmp_path / "ledger.txt"
    ledger.write_text("".join(
        f"Entry {i}: paid {i * 37 % 1000} pounds and {i * 11 % 20} shillings on day {i % 28 + 1}.\n\n"
        for i in range(900)
    ))
    return [str(text_file), str(ledger)]


def _stage_cfg(domains, **kw):
    base = dict(tokens=8 * 4 * 32, batch_size=4, seq_len=32, lr=2e-3, warmup=0.1, save_every=2, update_every=2,
                eval_tokens=8 * 32, domains=domains)
    return train_stage.Config(**{**base, **kw})


def test_train_stage_reweights_towards_the_lagging_domain(tiny_llama, tmp_path, domains):
    model, tok = tiny_llama
    prose, ledger = domains
    cfg = _stage_cfg(domains, reference_loss={prose: 0.0, ledger: 100.0})  # only prose lags its reference
    model, stats = train_stage.run(model, tok, cfg, Context.for_tests(tmp_path))
    assert stats["steps"] == 8 and stats["tokens"] == 8 * 4 * 32 and stats["reference_source"] == "config"
    assert sum(stats["tokens_per_domain"].values()) == stats["tokens"]
    history = stats["domain_weights"]
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8]
    prose_w = [h["weights"][prose] for h in history]
    assert prose_w[0] == pytest.approx(0.5) and all(b > a for a, b in zip(prose_w, prose_w[1:])), prose_w
    assert stats["tokens_per_domain"][prose] > stats["tokens_per_domain"][ledger]
    for d in domains:
        assert stats["final_val_loss"][d] < stats["initial_val_loss"][d]  # it learned both domains
    assert len(stats["loss_curve"]) == 8


def test_train_stage_default_reference_is_the_input_model(tiny_llama, tmp_path, domains):
    model, tok = tiny_llama
    cfg = _stage_cfg(domains, tokens=2 * 4 * 32, save_every=0)
    model, stats = train_stage.run(model, tok, cfg, Context.for_tests(tmp_path))
    assert stats["reference_source"] == "input" and stats["reference_loss"] == stats["initial_val_loss"]
    # the loss went down on both domains: no excess over the input model, the weights stay (up to smoothing) put
    assert stats["domain_weights"][-1]["weights"] == pytest.approx({d: 0.5 for d in domains})


def test_train_stage_reference_from_an_earlier_model(tiny_llama, tmp_path, domains):
    from compress import checkpoint

    model, tok = tiny_llama
    checkpoint.save(model, tok, tmp_path / "base")
    with torch.no_grad():  # the stage's input: the base model, damaged (as a pruned one would be)
        model.lm_head.weight.mul_(10)  # tied to the embeddings: 10x sharper random logits, a much higher loss
    cfg = _stage_cfg(domains, tokens=4 * 32, save_every=0, reference_model="base")
    model, stats = train_stage.run(model, tok, cfg, Context.for_tests(tmp_path, base_path=tmp_path / "base"))
    assert stats["reference_source"] == "base"
    for d in domains:  # the untouched base model is the better one: its losses are the (lower) reference
        assert stats["reference_loss"][d] < stats["initial_val_loss"][d]


def test_killed_train_stage_resumes_from_its_last_checkpoint(tmp_path, domains, monkeypatch):
    from compress.tiny import build

    prose, ledger = domains
    cfg = _stage_cfg(domains, reference_loss={prose: 0.0, ledger: 0.0})  # both lag: weights move every update

    model, tok = build(TINY_LLAMA, seed=0)
    model, full = train_stage.run(model, tok, cfg, Context.for_tests(tmp_path / "a"))
    expected = _params(model)

    real_fit = engine.fit

    def fit_killed_after_step_5(*args, on_step=None, **kw):
        def hook(step, logs):
            out = on_step(step, logs) if on_step else None
            if step == 5:
                raise Killed
            return out
        return real_fit(*args, on_step=hook, **kw)

    ctx = Context.for_tests(tmp_path / "b")
    monkeypatch.setattr(engine, "fit", fit_killed_after_step_5)
    model, tok = build(TINY_LLAMA, seed=0)
    with pytest.raises(Killed):
        train_stage.run(model, tok, cfg, ctx)
    monkeypatch.setattr(engine, "fit", real_fit)

    model, tok = build(TINY_LLAMA, seed=0)  # the pipeline reloads the stage's input
    model, resumed = train_stage.run(model, tok, cfg, ctx)
    assert resumed["resumed_from_step"] == 4
    assert _same(_params(model), expected)
    for key in ("domain_weights", "tokens_per_domain", "final_val_loss", "loss_curve"):
        assert resumed[key] == full[key], key
    assert full["domain_weights"][-1]["weights"] != full["domain_weights"][0]["weights"]


def test_train_stage_config_checks(tiny_llama, tmp_path, domains):
    with pytest.raises(CompressError, match="tokens"):
        train_stage.Config(tokens=0)
    with pytest.raises(CompressError, match="warmup"):
        train_stage.Config(warmup=3)
    with pytest.raises(CompressError, match="domains"):
        train_stage.Config(domains=[])
    model, tok = tiny_llama
    with pytest.raises(CompressError, match="reference_loss"):
        train_stage.run(model, tok, _stage_cfg(domains, reference_loss={domains[0]: 1.0}), Context.for_tests(tmp_path))
    with pytest.raises(CompressError, match="no data"):
        train_stage.run(model, tok, train_stage.Config(), Context.for_tests(tmp_path))


# -- two processes (DDP on gloo)

DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from compress import train
from compress.context import Context
from compress.tiny import build

out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
ctx = Context.for_tests(out)
state = train.process_state(ctx)
torch.manual_seed(0)
model, _ = build(sys.argv[3], seed=0)
g = torch.Generator().manual_seed(0)
blocks = {"a": torch.randint(0, 128, (40, 16), generator=g), "b": torch.randint(128, 256, (40, 16), generator=g)}
mix = train.DomainMixture(blocks, batch_size, weights=[0.7, 0.3], seed=0, rank=state.process_index,
                          world_size=state.num_processes)
cfg = train.TrainConfig(steps=4, lr=1e-3, grad_accum=2, save_every=2)
res = train.fit(model, mix, train.causal_lm_loss, cfg, ctx)
save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
          str(out / f"rank{state.process_index}-of-{state.num_processes}.safetensors"))
"""


@pytest.mark.slow
def test_two_process_ddp_run_agrees_across_ranks_and_with_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # `--cpu --num_processes 2` starts ONE process unless given an MPI hostfile (accelerate 1.x); --multi_gpu
    # starts two through torchrun, and without CUDA they form a gloo group because compress asks for cpu=True.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = [
        launch + [str(script), str(tmp_path / "ddp"), "2"],
        [sys.executable, str(script), str(tmp_path / "one"), "4"],
    ]
    for args in runs:
        proc = subprocess.run(args + [str(TINY_LLAMA)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}-of-2.safetensors")) for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP kept the replicas identical

    # a rerun with the same work dir loads the final checkpoint on both ranks and trains nothing more
    proc = subprocess.run(runs[0] + [str(TINY_LLAMA)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        again = load_file(str(tmp_path / "ddp" / f"rank{r}-of-2.safetensors"))
        assert all(torch.equal(r0[k], again[k]) for k in r0)
    one = load_file(str(tmp_path / "one" / "rank0-of-1.safetensors"))
    # 2 ranks x batch 2 == 1 process x batch 4 (same rows, gradients averaged): equal up to reduction order
    assert all(torch.allclose(r0[k], one[k], atol=1e-5) for k in r0)
    assert (tmp_path / "ddp" / "work" / "train" / "step-00000004" / "state.json").is_file()


@pytest.mark.slow
def test_two_process_accelerate_launch_runs_a_pipeline_with_a_train_stage(tmp_path, text_file):
    """`accelerate launch -m compress.cli run`: the train stage runs on both processes, the rest on the main one."""
    pipe = tmp_path / "ddp.yaml"
    pipe.write_text(f"""
name: ddp
model: tiny:{TINY_LLAMA}
data: {{train: [{text_file}]}}
eval: {{perplexity: [{text_file}], seq_len: 32, max_tokens: 256, speed: false}}
stages:
  - train: {{tokens: 2048, batch_size: 2, seq_len: 32, update_every: 2, eval_tokens: 128, save_every: 4}}
  - cast: {{dtype: bfloat16}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "compress.cli", "run", str(pipe), "--out", str(tmp_path / "runs"), "-q"]
    proc = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("01-train") == 1  # one summary table, from the main process
    run = tmp_path / "runs" / "ddp"
    train_m = json.loads((run / "01-train" / "manifest.json").read_text())
    assert train_m["stats"]["processes"] == 2 and train_m["stats"]["tokens"] == 2048
    assert json.loads((run / "02-cast" / "manifest.json").read_text())["complete"]
    assert not list(run.glob(".sync-*")) and not list(run.glob(".work-*"))
    again = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skipped" in again.stderr, again.stderr[-3000:]


# -- FSDP2 (two processes on gloo)


def test_snapshot_gives_back_the_same_modules_hooks_and_parameters():
    """What fit does around FSDP, in one process: the model's modules are rewritten in place (class, hooks,
    parameters), then restored with trained values into the caller's Parameter objects, in their dtypes."""
    from compress.tiny import build

    model, _ = build(TINY_LLAMA, seed=0)
    model.model.norm.to(torch.bfloat16)
    calls = []
    model.model.norm.register_forward_hook(lambda m, a, out: calls.append(1))  # a caller's hook (prune's masks)
    params = dict(model.named_parameters())
    layer_cls = type(model.model.layers[0])
    snap = distributed.Snapshot(model)

    model.model.layers[0].__class__ = type("Sharded", (layer_cls,), {})  # what fully_shard does, roughly
    model.model.layers[0].register_forward_pre_hook(lambda m, a: None)
    shards = {}
    for mod in model.modules():  # "shards": new Parameter objects, one per original (tied ones stay shared)
        for leaf, p in mod._parameters.items():
            if p is not None:
                mod._parameters[leaf] = shards.setdefault(id(p), torch.nn.Parameter(p.detach().float() + 1))
    snap.release_weights()
    assert all(p.numel() == 0 for p in params.values())

    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    snap.restore(trained)
    assert type(model.model.layers[0]) is layer_cls and not model.model.layers[0]._forward_pre_hooks
    assert dict(model.named_parameters()).keys() == params.keys()
    for n, p in model.named_parameters():
        assert p is params[n] and torch.equal(p.float(), trained[n])
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == [1]
    with pytest.raises(CompressError, match="parameter names"):
        distributed.Snapshot(model).restore({})


KILLED_RUN = """
import sys
from compress import cli, train

real_fit = train.fit


def fit_killed_after_step_5(*args, on_step=None, **kw):
    def hook(step, logs):
        out = on_step(step, logs) if on_step else None
        if step == 5:
            raise SystemExit("killed after step 5")
        return out
    return real_fit(*args, on_step=hook, **kw)


train.fit = fit_killed_after_step_5
cli.main(sys.argv[1:])
"""


def _fsdp_cpu_config(tmp_path: Path) -> Path:
    """configs/accelerate/fsdp.yaml as this machine runs it: 2 processes, float32 (for exact comparisons)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    path = tmp_path / "fsdp-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_process_fsdp_pipeline_matches_one_process_and_resumes(tmp_path, text_file):
    """`accelerate launch --config_file fsdp.yaml -m compress.cli run`: the train stage under FSDP2 on gloo (two
    domains, so dynamic batch loading runs forwards on the sharded model inside fit) gives the weights of one
    process with the same global batch; killed after step 5 and rerun, it resumes from its sharded step-4
    checkpoint and ends bit-identical to an uninterrupted FSDP run."""
    from safetensors.torch import load_file

    other = tmp_path / "ledger.txt"
    other.write_text("".join(f"Item {i}: {i * 7 % 13} pounds, {i * 3 % 20} shillings.\n\n" for i in range(600)))

    def pipeline(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"""
name: {name}
model: tiny:{TINY_LLAMA}
data: {{train: [{text_file}, {other}]}}
eval: {{perplexity: [{text_file}], seq_len: 32, max_tokens: 256, speed: false}}
stages:
  - train: {{tokens: 1536, batch_size: {batch_size}, seq_len: 32, lr: 1.0e-3, update_every: 2, eval_tokens: 160,
             save_every: 4}}
""")  # 12 steps of 2 processes x 2 rows (or 1 x 4) x 32 tokens; 5 validation blocks per domain: 3 + 2 per rank
        return path

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_fsdp_cpu_config(tmp_path))]
    fsdp = pipeline("fsdp", 2)
    killer = tmp_path / "killed_run.py"
    killer.write_text(KILLED_RUN)

    def run(args: list, pipe: Path, out: str):
        return subprocess.run(args + ["run", str(pipe), "--out", str(tmp_path / out), "-q"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    killed = run(launch + [str(killer)], fsdp, "runs")
    assert killed.returncode != 0 and "killed after step 5" in killed.stderr, killed.stderr[-3000:]
    (work,) = (tmp_path / "runs" / "fsdp").glob(".work-01-train-*")
    step4 = work / "train" / "step-00000004"
    assert {p.name for p in step4.glob("model-*.safetensors")} == {"model-00000.safetensors", "model-00001.safetensors"}

    resumed = run(launch + ["-m", "compress.cli"], fsdp, "runs")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("01-train") == 1  # one summary table, from the main process
    stats = json.loads((tmp_path / "runs" / "fsdp" / "01-train" / "manifest.json").read_text())["stats"]
    assert stats["processes"] == 2 and stats["tokens"] == 1536 and stats["resumed_from_step"] == 4
    assert stats["dynamic_batch_loading"] and len(stats["domain_weights"]) == 1 + 12 // 2
    assert not list((tmp_path / "runs" / "fsdp").glob(".work-*"))

    whole = run(launch + ["-m", "compress.cli"], fsdp, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    one = run([sys.executable, "-m", "compress.cli"], pipeline("one", 4), "one")
    assert one.returncode == 0, one.stderr[-3000:]

    def weights(out: str, name: str) -> dict:
        return load_file(str(tmp_path / out / name / "01-train" / "model.safetensors"))

    w_resumed, w_whole, w_one = weights("runs", "fsdp"), weights("whole", "fsdp"), weights("one", "one")
    base = load_file(str(tmp_path / "one" / "one" / "00-base" / "model.safetensors"))
    assert all(torch.equal(w_resumed[k], w_whole[k]) for k in w_whole)  # sharded resume is exact
    assert max((w_one[k] - base[k]).abs().max() for k in base) > 1e-3   # it trained
    # Same rows, same averaged gradients; only float32 summation order differs (a reduce-scatter of two half-batch
    # gradients vs one full-batch gradient, ~1e-7 relative), which AdamW's normalised steps (at most ~lr = 1e-3
    # each) carry over 12 steps. Measured: 1.6e-6 apart while training moved weights by up to 6e-3; 1e-5 leaves
    # 6x headroom and still fails on any real difference (one wrong row or step moves weights by ~1e-3).
    assert all(torch.allclose(w_whole[k], w_one[k], rtol=0, atol=1e-5) for k in w_one)
