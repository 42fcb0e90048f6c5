"""eval: evaluate the incoming model under a protocol of its own, at any point of a pipeline.

The pipeline's `eval:` block already scores 00-base and every stage the same way. Use this stage for a
different or heavier protocol at one point, e.g. lm-eval tasks or more tokens on the final model:

    stages:
      - gptq: {bits: 4}
      - eval: {perplexity: [zoo:austen], max_tokens: 200000, tasks: [hellaswag], limit: 200}

Its settings are those of the `eval:` block (see `compress stages`). It writes no new weights: its folder
holds only manifest.json, whose `checkpoint` names the folder it evaluated, and a later stage that says
`from: eval` starts from that same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress import evaluate, memory

NAME = "eval"
WRITES_CHECKPOINT = False  # the pipeline records the input's checkpoint instead of saving a copy
ONLOAD = True              # can run a model bigger than the device, one block at a time (compress/onload.py)


@dataclass
class Config(evaluate.EvalConfig):
    """The same keys as the pipeline's `eval:` block."""


def run(model, tokenizer, cfg: Config, ctx):
    """Evaluate; return the model unchanged and {"accuracy": ..., "speed": ...} for the manifest."""
    base = ctx.load_model("base", on_host=ctx.onload)[0] if evaluate.needs_base(model, cfg) else None
    return model, evaluate.run(model, tokenizer, cfg, device=ctx.device, base_model=base, onload=ctx.onload)


# ----------------------------------------------------------------------------------------------------------------
# Memory model (compress/planner.py runs it)


def predict_memory(cfg: Config, state: memory.ModelState, where: memory.Where) -> memory.Parts:
    """This stage's memory: an evaluation (evaluate.predict_memory); the base model it is compared with is loaded
    for it."""
    base = where.states.get("base")
    ref = base if base is not None and base is not where.input else None
    terms = evaluate.predict_memory(state, cfg, where.kind, ref, where.onload)
    return memory.Parts(terms, 0 if where.onload else state.weights_bytes(), state)  # onloaded: one block resident


def memory_advice(cfg: Config, state: memory.ModelState, kind: str, fits) -> list[memory.Tip]:
    tips = []
    if cfg.batch_size > 1:
        tips.append(memory.Tip(f"batch_size: {cfg.batch_size // 2}", {"batch_size": cfg.batch_size // 2}))
    if cfg.seq_len > 128:
        tips.append(memory.Tip(f"seq_len: {cfg.seq_len // 2}", {"seq_len": cfg.seq_len // 2}))
    return tips
