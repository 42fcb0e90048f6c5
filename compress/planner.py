"""The memory planner: every stage's predicted peak, from the model's config alone, and what to change if it
does not fit.

    compress plan pipelines/default.yaml --device rtx4090

The planner knows no stage: it walks the typed Pipeline (compress/config.py) and asks each stage module for
its memory model, `predict_memory(cfg, state, where) -> memory.Parts`, and, when the stage does not fit, for
its `memory_advice(cfg, state, kind, fits) -> [memory.Tip]` (optional). The model's state (shape, dtype,
format) flows from stage to stage through the Parts each returns. Adding a stage needs nothing here.

The base model (index 0) is "loading the weights"; every plan also predicts evaluating the stage's output under
the pipeline's `eval:` block (evaluate.predict_memory). See compress/memory.py for the terms and what is measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from compress import evaluate, memory
from compress.errors import CompressError
from compress.memory import ModelState, fmt_bytes


@dataclass
class StagePlan:
    stage: str                    # stage type: base, cast, gptq, int8, train, prune, distill, eval
    name: str                     # the stage's name in the pipeline (folder NN-name)
    weights_bytes: int            # input model's weights (resident before the stage starts)
    peak_bytes: int               # everything on the device at the peak, incl. fixed process/context overhead: must fit
    growth_bytes: int             # extra over the resident input: comparable to the CPU "rss-growth" measurement
    breakdown: dict               # term -> bytes, the terms of growth (plus "input weights", "overhead")
    fits: bool | None = None      # peak_bytes <= device bytes (None: no device given)
    advice: list = field(default_factory=list)   # what to change when it does not fit, with the saving
    index: int = 0                # NN of the stage folder
    device_kind: str = "cpu"      # cpu | cuda
    allocated_bytes: int = 0      # on-device tensors at the peak: comparable to "cuda-max-allocated"
    output_weights_bytes: int = 0 # the stage's output model
    eval_growth_bytes: int | None = None   # evaluating the output (pipeline eval block), over its weights
    eval_peak_bytes: int | None = None
    onload: bool = False          # planned with the input on the host, one block at a time on the device
    host_peak_bytes: int | None = None  # onloaded on a GPU: host memory at the step's peak (process included)
    host_breakdown: dict = field(default_factory=dict)
    output_state: ModelState | None = field(default=None, repr=False, compare=False)  # flows into the next stage
    loads: tuple = field(default=(), repr=False, compare=False)  # libraries the stage imports (memory.Parts.loads)

    def comparable_bytes(self, method: str) -> int:
        """The prediction to compare with a manifest's measured_peak_bytes for its memory.method."""
        if method == "rss-growth":
            return self.growth_bytes
        if method == "cuda-max-allocated":
            return self.allocated_bytes
        raise CompressError(f"unknown memory measurement method {method!r}")

    def to_dict(self) -> dict:
        """JSON-able: every field but output_state and loads."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("output_state", "loads")}


def overhead(device_kind: str) -> int:
    """Fixed bytes that are not tensors: a torch + transformers CPU process, or the CUDA context."""
    return memory.CUDA_CONTEXT_BYTES if device_kind == "cuda" else memory.CPU_PROCESS_BYTES


def initial_state(model_config: Any) -> ModelState:
    """The input model as its config describes it: plain, in its config dtype (float32 when none is given)."""
    shape = memory.describe(model_config)
    return ModelState(shape, dtype=memory.dtype_name(shape.config.get("torch_dtype") or shape.config.get("dtype")
                                                     or "float32"))


def _parts(module, cfg, state: ModelState, where: memory.Where) -> memory.Parts:
    if module is None:  # the base model: loading its weights (onloaded: memory-mapped, read a block at a time)
        if where.onload:
            return memory.Parts({"one block's weights paged in": memory.block_bytes(state)}, 0, state)
        return memory.Parts({"load weights": state.weights_bytes()}, 0, state)
    return module.predict_memory(cfg, state, where)


def onloads(module) -> bool:
    """Whether a step can run with its input on the host, one block at a time on the device: the base model's
    loading and evaluation, and stages whose module says ONLOAD = True."""
    return module is None or getattr(module, "ONLOAD", False)


def predict_stage(module, cfg, state: ModelState, *, name: str | None = None, index: int = 0, device: Any = None,
                  states: dict | None = None, eval_cfg=None, data: dict | None = None,
                  loaded: set | None = None, fsdp: int = 1, onload: bool = False) -> StagePlan:
    """Predict one stage's memory: `module` is the stage module (None: loading the base model), `cfg` its Config,
    `state` its input model; `states` maps earlier stage names (and 'base') to states (a distill teacher);
    `eval_cfg` (the pipeline's EvalConfig) adds the evaluation of the output; `data` (the pipeline's data block)
    the text the stage loads; `loaded`: libraries an earlier stage already imported; `device`: see
    memory.resolve_device (None: no fit check); `fsdp`: processes a training stage is sharded over (its plan is
    then per process); `onload`: the input on the host, one block at a time on the device (see `onloads`)."""
    dev = memory.resolve_device(device)
    kind = dev.kind if dev else "cpu"
    states = dict(states or {})
    where = memory.Where(kind, dev.bytes if dev else None, states, state, dict(data or {}), set(loaded or ()), fsdp,
                         onload)
    parts = _parts(module, cfg, state, where)
    growth = int(sum(parts.terms.values()))
    stage = "base" if module is None else module.NAME
    W = state.weights_bytes() if module is not None else 0
    fixed = overhead(kind)
    allocated = parts.on_device_input + growth
    breakdown = {"input weights": parts.on_device_input,  # resident: W, or none under FSDP (its shards are terms)
                 **parts.terms, "process overhead" if kind == "cpu" else "CUDA context": fixed}
    for note in parts.notes:
        breakdown.setdefault("notes", []).append(note)
    plan = StagePlan(stage=stage, name=name or stage, weights_bytes=W, peak_bytes=allocated + fixed,
                     growth_bytes=growth, breakdown=breakdown, index=index, device_kind=kind,
                     allocated_bytes=allocated, output_weights_bytes=parts.out.weights_bytes(), output_state=parts.out,
                     loads=tuple(parts.loads), onload=onload)
    if parts.host is not None and kind == "cuda":
        plan.host_breakdown = {**parts.host, "process overhead": overhead("cpu")}
        plan.host_peak_bytes = int(sum(plan.host_breakdown.values()))
    if eval_cfg is not None and getattr(module, "WRITES_CHECKPOINT", True):  # what the pipeline then evaluates
        ref = states.get("base") if module is not None else None  # compared with the base (agreement, KL)
        plan.eval_growth_bytes = int(sum(evaluate.predict_memory(parts.out, eval_cfg, kind, ref, onload).values()))
        # onloaded, the output is evaluated a block at a time too: nothing of it resident but that block
        plan.eval_peak_bytes = plan.eval_growth_bytes + fixed + (0 if onload else plan.output_weights_bytes)
    if dev is not None:
        plan.fits = max(plan.peak_bytes, plan.eval_peak_bytes or 0) <= dev.bytes
        if not plan.fits:
            plan.advice = _advice(module, cfg, state, dev, plan, eval_cfg, states, where)
    return plan


def _advice(module, cfg, state: ModelState, dev: memory.Device, plan: StagePlan, eval_cfg, states: dict,
            where: memory.Where) -> list[str]:
    """What to change, each with its predicted saving (re-planned with the change, not guessed)."""
    worst = max(plan.peak_bytes, plan.eval_peak_bytes or 0)
    tips = [f"needs {fmt_bytes(worst)} but {dev.name} has {fmt_bytes(dev.bytes)} ({fmt_bytes(worst - dev.bytes)} short)"]

    def peak(changes: dict) -> int:
        return predict_stage(module, dataclasses.replace(cfg, **changes), state, device=dev, states=states,
                             data=where.data, loaded=where.loaded, fsdp=where.fsdp).peak_bytes

    if module is not None and plan.peak_bytes > dev.bytes:
        advise = getattr(module, "memory_advice", None)  # optional: a stage without it gets the generic advice only
        for tip in advise(cfg, state, dev.kind, lambda **ch: peak(ch) <= dev.bytes) if advise else []:
            saving = plan.peak_bytes - peak(tip.changes)
            if saving > 0:
                tips.append(f"{tip.text}: saves {fmt_bytes(saving)}")
        if state.dtype == "float32" and module.NAME != "cast":
            tips.append(f"add a `cast: {{dtype: bfloat16}}` stage before it: halves the weights "
                        f"({fmt_bytes(state.weights_bytes() // 2)} saved, more in activations)")
    if eval_cfg is not None and (plan.eval_peak_bytes or 0) > dev.bytes:
        now = sum(evaluate.predict_memory(plan.output_state, eval_cfg, dev.kind).values())
        for key, value in (("batch_size", eval_cfg.batch_size // 2), ("seq_len", eval_cfg.seq_len // 2)):
            if value >= (1 if key == "batch_size" else 64):
                less = sum(evaluate.predict_memory(plan.output_state, dataclasses.replace(eval_cfg, **{key: value}),
                                             dev.kind).values())
                tips.append(f"eval {key}: {value}: saves {fmt_bytes(now - less)} in evaluation")
    return tips


def plan(pipe, model_config: Any, device: Any = None, fsdp: int = 1, offload: str | None = None) -> list[StagePlan]:
    """One StagePlan per stage, base first (index 0: loading and evaluating the input model).

    pipe: a compress.config.Pipeline (its stages, eval and data); model_config: see memory.describe;
    device: see memory.resolve_device (a name in memory.DEVICES, 'cpu', '24GB', a byte count, a Device, or None
    for no fit check); fsdp: the training stages' processes under FSDP (configs/accelerate/fsdp.yaml), 1 = none;
    offload (default: the pipeline's): auto onloads a step that can (`onloads`) when its whole-model plan does not
    fit the device, always onloads every step that can, never none."""
    offload = offload or getattr(pipe, "offload", "auto")
    state = initial_state(model_config)
    states = {"base": state}
    data = pipe.data or {}

    def step(module, cfg, inp, **kw):
        whole = None
        if offload != "always" or not onloads(module):
            whole = predict_stage(module, cfg, inp, device=device, onload=False, **kw)
            if offload == "never" or whole.fits is not False or not onloads(module):
                return whole
        return predict_stage(module, cfg, inp, device=device, onload=True, **kw)

    plans = [step(None, None, state, name="base", index=0, eval_cfg=pipe.eval)]
    loaded: set = set()  # libraries the stages before import into the one process (`compress run`)
    for spec in pipe.stages:
        inp = states[spec.source]
        p = step(spec.module, spec.config, inp, name=spec.name, index=spec.index, states=states,
                 eval_cfg=pipe.eval, data=data, loaded=loaded, fsdp=fsdp)
        plans.append(p)
        loaded |= set(p.loads)
        states[spec.name] = states[str(spec.index)] = p.output_state
    return plans


def format_table(plans: list[StagePlan], device: Any = None) -> str:
    """A fixed-width table for `compress plan`: one row per stage, then the advice of stages that do not fit."""
    dev = memory.resolve_device(device)
    head = ["#", "stage", "name", "weights in", "growth", "peak", "eval peak", "weights out", "fits", "spare"]
    hosts = any(p.host_peak_bytes is not None for p in plans)
    if hosts:
        head.append("host peak")
    rows = []
    for p in plans:
        fits = "-" if p.fits is None else ("yes" if p.fits else "NO") + (", onloaded" if p.onload else "")
        spare = fmt_bytes(dev.bytes - max(p.peak_bytes, p.eval_peak_bytes or 0)) if dev else "-"
        rows.append([f"{p.index:02d}", p.stage, p.name, fmt_bytes(p.weights_bytes), fmt_bytes(p.growth_bytes),
                     fmt_bytes(p.peak_bytes), fmt_bytes(p.eval_peak_bytes), fmt_bytes(p.output_weights_bytes), fits,
                     spare] + ([fmt_bytes(p.host_peak_bytes) if p.host_peak_bytes is not None else "-"] if hosts else []))
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w) if c >= 3 else str(v).ljust(w) for c, (v, w) in enumerate(zip(r, widths)))
    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    kind = plans[0].device_kind if plans else "cpu"
    out.append("")
    out.append(f"peak = input weights + growth + {'CUDA context' if kind == 'cuda' else 'torch process'} "
               f"({fmt_bytes(overhead(kind))}); growth = extra over the resident input model"
               + (f"; device {dev.name}: {fmt_bytes(dev.bytes)}" if dev else "")
               + ("; onloaded: the input stays on the host, one block at a time on the device (offload: never turns "
                  "it off)" if any(p.onload for p in plans) else "")
               + ("; host peak: host memory of an onloaded step (a block in transit, its packed form, cast weights)"
                  if hosts else ""))
    for p in plans:
        if p.advice:
            out.append(f"{p.index:02d}-{p.name} does not fit:")
            out.extend(f"  - {a}" for a in p.advice)
    return "\n".join(out)


def refuse_if_too_big(pipe, model_config: Any, device: memory.Device, force: bool = False,
                      fsdp: int = 1) -> list[StagePlan]:
    """The plans on `device`, made before any work: a stage that cannot take its input (an unsupported family, a
    quantized input where it needs floats) is refused in one line by its memory model; one predicted not to fit is
    refused too, unless `force`."""
    plans = plan(pipe, model_config, device, fsdp)
    for p in plans if not force else []:
        if p.fits is False:
            raise CompressError(
                f"stage {p.index:02d}-{p.name} ({p.stage}) is predicted not to fit: " + "; ".join(p.advice)
                + f". `compress plan {pipe.path or ''}` shows the breakdown; --force runs it anyway"
            )
    return plans


# ----------------------------------------------------------------------------------------------------
# Predictions for a run, from the loaded model (stored in the manifest next to what was measured)


def predict_for_run(pipe, spec, model, fsdp: int = 1, onload: bool = False, device=None) -> int:
    """Predicted growth of one pipeline stage from its loaded input model (compress.pipeline calls this): the
    manifest's memory.predicted_peak_bytes. A distillation teacher other than the input is taken to be the size
    of the input (its config is not at hand here)."""
    import sys

    state = memory.state_from_model(model)
    states = {spec.source: state, "base": state}
    loaded = {lib for lib in ("bitsandbytes",) if lib in sys.modules}
    device = memory.machine(device if device is not None else next(model.parameters()).device)
    return predict_stage(spec.module, spec.config, state, device=device, states=states, data=pipe.data or {},
                         loaded=loaded, fsdp=fsdp, onload=onload).growth_bytes


def predict_eval_for_run(eval_cfg, model, reference=None, onload: bool = False) -> int:
    """Predicted growth of evaluating `model` under the pipeline's EvalConfig, against `reference` (the base model
    a bare encoder is compared with, loaded for it; None: itself; onload: both run a block at a time): the manifest's
    memory.eval_predicted_peak_bytes."""
    kind = next(model.parameters()).device.type
    ref = None if reference is None or reference is model else memory.state_from_model(reference)
    return int(sum(evaluate.predict_memory(memory.state_from_model(model), eval_cfg, kind, ref, onload).values()))
