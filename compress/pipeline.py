"""Run a pipeline: every stage's output saved, checked, evaluated and described, and a rerun resumes.

    pipe = config.load("pipelines/default.yaml")
    results = pipeline.run(pipe, out_root="artifacts")

For the base model (00-base) and then each stage, one path: produce the model (load the source; or load the
stage's input folder and run the stage, its peak memory measured) -> save into .tmp-NN-name/ -> reload it and
compare logits (round trip) -> evaluate the reloaded model -> manifest.json written last -> folder renamed to
NN-name/. A stage that writes no weights (eval) records its result about its input instead.

Resume: a rerun skips a stage whose manifest records the same input hash and config hash, and only
re-evaluates it when just `eval:` changed; a stage that crashed or was killed left no manifest in place, so it
is redone. Several processes (`accelerate launch`): see compress/distributed.py.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from compress import checkpoint, manifest, measure, memory, planner, sources
from compress.config import Pipeline, StageSpec
from compress.context import Context
from compress.distributed import Ranks, fsdp_processes
from compress.errors import CompressError
from compress.manifest import Manifest


@dataclass
class StageResult:
    folder: str
    status: str          # "done" | "skipped" | "re-evaluated"
    manifest: dict


@dataclass
class _Built:
    """A stage's output model as produced, with what producing it cost."""
    model: torch.nn.Module | None
    tokenizer: object
    stats: dict
    predicted: int | None            # the planner's growth for this step, from the loaded input
    measured: measure.PeakMemory
    seconds: float
    onload: bool = False             # the input stayed on the host, one block at a time on the device


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device {setting!r} requested but no CUDA device is available")
    return torch.device(setting)


def planned_device(pipe: Pipeline, budget: int | None = None, device=None) -> memory.Device:
    """The device the plan is checked against: the one the run computes on, or `budget` bytes of its kind."""
    dev = memory.machine(device if device is not None else pick_device(pipe.device))
    return dev if budget is None else memory.Device(f"{dev.name} limited to {memory.fmt_bytes(budget)}", dev.kind, budget)


def source_of(pipe: Pipeline, weights: bool = True) -> sources.Source:
    """The pipeline's model, resolved (and checked) once; weights=False: its config is enough (planning)."""
    return sources.resolve(pipe.model, seed=pipe.seed, allow_pickle=pipe.allow_pickle,
                           trust_remote_code=pipe.trust_remote_code, weights=weights)


def check_inputs(pipe: Pipeline) -> None:
    """Before any work: every zoo entry the pipeline names (a corpus, a teacher) is installed, every text file
    exists, every package a stage needs (its REQUIRES) imports; one line for the first that is missing."""
    import importlib.util

    from compress import data, zoo

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)

    blocks = [pipe.data, dataclasses.asdict(pipe.eval) if pipe.eval else {},
              *(dataclasses.asdict(s.config) for s in pipe.stages)]
    for value in strings(blocks):
        if value.startswith("zoo:") and value[4:] in {**zoo.MODELS, **zoo.CORPORA} and not zoo.is_installed(value[4:]):
            raise CompressError(f"{value} is not installed: run `compress zoo fetch {value[4:]}`")
        if value.endswith((".txt", ".jsonl")):
            data.check_spec(value)
    for spec in pipe.stages:
        for package in getattr(spec.module, "REQUIRES", ()):
            if importlib.util.find_spec(package) is None:
                raise CompressError(f"stage {spec.folder} ({spec.type}) needs the {package} package: "
                                    f"pip install {package}")


def stage_position(pipe: Pipeline, name: str | None) -> int:
    """Index (0 = base) of the stage named `name` (or its folder NN-name); the last index for None."""
    if name is None:
        return len(pipe.stages)
    for spec in pipe.stages:
        if name in (spec.name, spec.folder):
            return spec.index
    if name in ("base", "00-base"):
        return 0
    known = ", ".join(["base", *(s.name for s in pipe.stages)])
    raise CompressError(f"--until {name!r}: the pipeline has no stage of that name; its stages: {known}")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_hash(pipe: Pipeline, spec: StageSpec) -> str:
    """What decides whether a stage's output is still valid: its type, config, the seed and the data."""
    return _hash({"type": spec.type, "config": dataclasses.asdict(spec.config), "seed": pipe.seed, "data": pipe.data})


def eval_hash(pipe: Pipeline) -> str:
    return _hash(dataclasses.asdict(pipe.eval) if pipe.eval is not None else None)


def run(
    pipe: Pipeline,
    out_root: str | Path = "artifacts",
    force: bool = False,
    log: Callable[[str], None] = print,
    quiet: bool = False,
    on_result: Callable[[StageResult], None] | None = None,
    until: str | None = None,
    memory_budget: int | None = None,
) -> list[StageResult]:
    """Run every stage of `pipe` into <out_root>/<name>/, skipping what is already done; see module doc.

    `until` (a stage name, its folder NN-name, or "base") stops after that stage: the later ones are not
    touched, and a later run picks them up. Running a pipeline once per stage this way gives every stage a
    fresh process (on a CPU: none of the heap earlier stages left behind).
    Under `accelerate launch` (several processes) every process calls this (compress/distributed.py).
    `memory_budget` (bytes): plan as if the device had this much memory (auto offload then onloads what does not
    fit in it).
    """
    stop = stage_position(pipe, until)
    if until is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CompressError("--until runs on one process only; run it without `accelerate launch`")
    source = source_of(pipe)
    check_inputs(pipe)
    out = Path(out_root) / pipe.name
    ranks = Ranks(out, pick_device(pipe.device))
    if ranks.device.type == "cpu":
        measure.fixed_mmap_threshold()  # RSS then follows live tensors: peaks mean what the planner means
    onload: dict[int, bool] = {}
    if ranks.main:  # before anything is written: a refused run leaves nothing behind
        plans = planner.refuse_if_too_big(pipe, source.config, planned_device(pipe, memory_budget, ranks.device),
                                          force=force, fsdp=fsdp_processes())
        onload = {p.index: p.onload for p in plans}
        _check_writable(out)
        _clean_partials(out)
        manifest.write_text_atomic(out / "pipeline.yaml", yaml.safe_dump(pipe.resolved(), sort_keys=False))
    ranks.begin()
    runner = _Runner(pipe, source, out, force, log if ranks.main else (lambda m: None), quiet or not ranks.main, ranks,
                     onload)
    results = []
    for res in runner.all(stop):
        results.append(res)
        if on_result and ranks.main:
            on_result(res)
    if ranks.main:
        from compress import report

        report.write(out)
    ranks.end()
    return results


class _Runner:
    def __init__(self, pipe: Pipeline, source: sources.Source, out: Path, force: bool, log, quiet: bool, ranks: Ranks,
                 onload: dict[int, bool] | None = None):
        self.pipe, self.source, self.out, self.force, self.log, self.quiet = pipe, source, out, force, log, quiet
        self.ranks, self.device = ranks, ranks.device
        self.onload = onload or {}           # step index -> run with the model on the host, a block at a time
        self.folders: dict[str, Path] = {}   # stage name -> finished folder (the input's, for a stage with no weights)
        self.hashes: dict[str, str] = {}     # stage name -> output hash
        self.eval_hash = eval_hash(pipe)

    def all(self, stop: int | None = None):
        """Base, then every stage up to index `stop` (all when None), each result as it is finished."""
        if not self.ranks.main:
            yield from self._follow()
            return
        steps = [self.base, *(lambda s=s: self.stage(s) for s in self.pipe.stages)]
        try:
            for index, step in enumerate(steps[: None if stop is None else stop + 1]):
                res = step()
                name = "base" if index == 0 else self.pipe.stages[index - 1].name
                self.ranks.done(index, self.folders[name], self.hashes[name], res.status)
                yield res
        except BaseException as e:
            self.ranks.failed(e)
            raise

    def _follow(self):
        """A process other than the main one: join the training stages, take every stage's result from the main."""
        info = self.ranks.wait("00.done")
        self.folders["base"], self.hashes["base"] = Path(info["folder"]), info["hash"]
        yield StageResult("00-base", info["status"], manifest.read(Path(info["folder"])) or {})
        for spec in self.pipe.stages:
            if self.ranks.wait(f"{spec.index:02d}.start")["runs"] and getattr(spec.module, "DISTRIBUTED", False):
                self._build(spec)
            info = self.ranks.wait(f"{spec.index:02d}.done")
            self.folders[spec.name], self.hashes[spec.name] = Path(info["folder"]), info["hash"]
            yield StageResult(spec.folder, info["status"], manifest.read(Path(info["folder"])) or {})

    # -- the two kinds of step

    def base(self) -> StageResult:
        folder = self.out / "00-base"
        self.folders["base"] = folder
        identity = dict(index=0, stage="base", name="base", config={}, config_hash=None,
                        input={"from": self.pipe.model, "path": str(self.pipe.model), "hash": self.source.hash})
        old = manifest.read(folder)
        if old and not self.force and old["input"]["hash"] == self.source.hash:
            self.hashes["base"] = old["output_hash"]
            self.folders["base"] = Path(old.get("checkpoint") or folder)
            return self._maybe_reeval(folder, old)
        if self.onload.get(0) and not self.source.tiny and any(self.source.path.glob("*.safetensors")):
            return self._base_in_place(folder, identity)
        self.log(f"[00-base] loading {self.pipe.model}")
        predicted = planner.predict_stage(None, None, planner.initial_state(self.source.config)).growth_bytes
        t0 = manifest.now()
        with measure.PeakMemory(self.device) as pm:  # loading the model: its weights are the growth
            model, tok = self.source.load(self.device)
            measure.fault_in(model)  # memory-mapped weights count once they are read
        built = _Built(model, tok, {}, predicted, pm, manifest.now() - t0)
        del model
        return self._finish(folder, built, identity)

    def _base_in_place(self, folder: Path, identity: dict) -> StageResult:
        """A base model bigger than the device is measured where it is (memory-mapped, evaluated a block at a time)
        and not copied: its manifest names the source folder, whose files are the checkpoint."""
        self.log(f"[00-base] {self.pipe.model}: evaluated in place, one block at a time (offload)")
        state = planner.initial_state(self.source.config)
        predicted = planner.predict_stage(None, None, state, onload=True).growth_bytes
        t0 = manifest.now()
        with measure.PeakMemory(self.device, resident=False) as pm:
            model, tok = self.source.load("cpu")
        built = _Built(model, tok, {"copied": False}, predicted, pm, manifest.now() - t0, onload=True)
        disk = manifest.disk_bytes(self.source.path)
        m = Manifest(
            **identity, folder=folder.name, checkpoint=str(self.source.path), output_hash=self.source.hash,
            format=checkpoint.format_of(self.source.config), eval_hash=self.eval_hash,
            size={"disk_bytes": disk, "params": state.shape.params,
                  "bits_per_weight": round(8 * disk / state.shape.params, 3)},
            memory=self._memory(built, state.weights_bytes()), stats=built.stats, seconds=round(built.seconds, 3),
            env=manifest.env(self.device),
        )
        m.accuracy, m.speed = self._evaluate(folder, model, tok, m.memory, is_base=True, onload=True)
        self.folders["base"] = self.source.path
        return self._write(self._tmp(folder), folder, m)

    def stage(self, spec: StageSpec) -> StageResult:
        folder = self.out / spec.folder
        in_folder, in_hash = self.folders[spec.source], self.hashes[spec.source]
        cfg_hash = stage_hash(self.pipe, spec)
        writes = getattr(spec.module, "WRITES_CHECKPOINT", True)
        self.folders[spec.name] = folder if writes else in_folder
        old = manifest.read(folder)
        if old and not self.force and old["input"]["hash"] == in_hash and old["config_hash"] == cfg_hash:
            self.ranks.started(spec.index, runs=False)
            self.hashes[spec.name] = old["output_hash"]
            return self._maybe_reeval(folder, old) if writes else StageResult(spec.folder, "skipped", old)
        self.ranks.started(spec.index, runs=True)
        self.log(f"[{spec.folder}] {spec.type} from {spec.source}")
        tmp = None if writes else self._tmp(folder)  # a stage with no checkpoint may write files of its own there
        built = self._build(spec, tmp)
        identity = dict(index=spec.index, stage=spec.type, name=spec.name, config=dataclasses.asdict(spec.config),
                        config_hash=cfg_hash, input={"from": spec.source, "path": str(in_folder), "hash": in_hash})
        res = self._finish(folder, built, identity) if writes else self._record_only(folder, tmp, built, identity)
        shutil.rmtree(self._work_dir(spec), ignore_errors=True)
        return res

    def _work_dir(self, spec: StageSpec) -> Path:
        """Scratch folder of a stage (mid-stage checkpoints), named by its config and input: a resume finds it."""
        return self.out / f".work-{spec.folder}-{stage_hash(self.pipe, spec)[:8]}-{self.hashes[spec.source][:8]}"

    def _build(self, spec: StageSpec, out_dir: Path | None = None) -> _Built:
        """Load the stage's input, run the stage and measure it."""
        torch.manual_seed(self.pipe.seed)
        onload = self.onload.get(spec.index, False)
        model, tok = checkpoint.load(self.folders[spec.source], device="cpu" if onload else self.device,
                                     trust_remote_code=self.pipe.trust_remote_code)
        work = self._work_dir(spec)
        if self.ranks.main:
            for stale in self.out.glob(f".work-{spec.folder}-*"):  # mid-stage state of another config/input
                if stale != work:
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(exist_ok=True)
        ctx = Context(
            device=self.device, seed=self.pipe.seed, data=self.pipe.data, work_dir=work,
            base_path=self.folders["base"], stage_paths={k: v for k, v in self.folders.items() if k != spec.name},
            trust_remote_code=self.pipe.trust_remote_code, log=self.log, quiet=self.quiet, out_dir=out_dir,
            eval=self.pipe.eval, onload=onload,
        )
        predicted = planner.predict_for_run(self.pipe, spec, model, fsdp_processes(), onload, self.device)
        t0 = manifest.now()
        with measure.PeakMemory(self.device, model, resident=not onload) as pm:
            model, stats = spec.module.run(model, tok, spec.config, ctx)
        return _Built(model, tok, stats, predicted, pm, manifest.now() - t0, onload)

    # -- what every step ends with

    def _memory(self, built: _Built, weights: int | None) -> dict:
        return {"weights_bytes": weights, "predicted_peak_bytes": built.predicted,
                "measured_peak_bytes": built.measured.measured_bytes, "method": built.measured.method,
                "device": str(self.device)}

    def _finish(self, folder: Path, built: _Built, identity: dict) -> StageResult:
        """Save, round-trip check, size, evaluation of the reloaded model, then manifest.json last and the folder
        renamed into place."""
        tmp = self._tmp(folder)
        checkpoint.save(built.model, built.tokenizer, tmp)
        self.log(f"[{folder.name}] saved; checking the reload")
        reference = checkpoint.reference_outputs(built.model, self.device, built.onload)
        size = manifest.size_of(built.model, tmp)
        mem = self._memory(built, manifest.weights_bytes(built.model))
        built.model = None  # let go before the reload: the reloaded copy is what gets evaluated (and what a user loads)
        gc.collect()
        measure.release_free_heap()
        rt, reloaded = checkpoint.check_reload(tmp, reference, self.device, self.pipe.trust_remote_code, built.onload)
        m = Manifest(
            **identity, folder=folder.name, eval_hash=self.eval_hash, output_hash=checkpoint.content_hash(tmp),
            format=rt.pop("format"), size=size, memory=mem, round_trip=rt, stats=built.stats,
            seconds=round(built.seconds, 3), env=manifest.env(self.device),
        )
        m.accuracy, m.speed = self._evaluate(tmp, reloaded, built.tokenizer, m.memory, is_base=m.index == 0,
                                             onload=built.onload)
        del reloaded
        return self._write(tmp, folder, m)

    def _record_only(self, folder: Path, tmp: Path, built: _Built, identity: dict) -> StageResult:
        """Manifest of a stage that writes no checkpoint: it describes the input checkpoint (eval), or the files the
        stage wrote into its folder (export: their format and size, what the runtime measured)."""
        src = manifest.read(Path(identity["input"]["path"])) or {}
        mem = self._memory(built, (src.get("memory") or {}).get("weights_bytes"))
        mem["eval_measured_peak_bytes"] = mem["measured_peak_bytes"]
        stats = dict(built.stats)
        accuracy, speed = stats.pop("accuracy", {}), stats.pop("speed", {})
        size = src.get("size")
        if "size" in stats:  # files of its own: their bytes over the input's parameters
            size = {**(size or {}), **stats.pop("size")}
            params = size.get("params")
            size["bits_per_weight"] = round(8 * size["disk_bytes"] / params, 3) if params else None
        written = any(tmp.iterdir())
        m = Manifest(
            **identity, folder=folder.name, checkpoint=identity["input"]["path"],
            output_hash=checkpoint.content_hash(tmp) if written else identity["input"]["hash"],
            format=stats.pop("format", src.get("format")), size=size, memory=mem, stats=stats,
            seconds=round(built.seconds, 3), env=manifest.env(self.device), accuracy=accuracy, speed=speed,
        )
        return self._write(tmp, folder, m)

    def _write(self, tmp: Path, folder: Path, m: Manifest) -> StageResult:
        manifest.write(tmp, m)
        _replace_dir(tmp, folder)
        self.hashes[m.name] = m.output_hash
        return StageResult(folder.name, "done", m.to_dict())

    def _evaluate(self, folder: Path, model, tok, mem: dict, is_base: bool, onload: bool = False) -> tuple[dict, dict]:
        """(accuracy, speed) of the checkpoint as saved (`model` was reloaded from `folder`) under the pipeline's
        eval protocol; its predicted and measured peaks go into `mem`. Bare encoders are scored by agreement with
        the base model, causal LMs by KL and top-1 against it, so that one is loaded too. onload: both stay on the
        host and run one block at a time."""
        if self.pipe.eval is None:
            return {}, {}
        from compress import evaluate

        self.log(f"[{folder.name.removeprefix('.tmp-')}] evaluating")
        base = None
        if evaluate.needs_base(model, self.pipe.eval):  # agreement of encoders; KL and top-1 of LMs
            base = model if is_base else checkpoint.load(self.folders["base"],
                                                         device="cpu" if onload else self.device)[0]
        mem["eval_predicted_peak_bytes"] = planner.predict_eval_for_run(self.pipe.eval, model, base, onload)
        with measure.PeakMemory(self.device, model, resident=not onload) as pm:
            result = evaluate.run(model, tok, self.pipe.eval, device=self.device, base_model=base, onload=onload)
        mem["eval_measured_peak_bytes"] = pm.measured_bytes
        return result.get("accuracy", {}), result.get("speed", {})

    def _maybe_reeval(self, folder: Path, old: dict) -> StageResult:
        if old.get("eval_hash") == self.eval_hash:
            return StageResult(folder.name, "skipped", old)
        onload = self.onload.get(old["index"], False)
        model, tok = checkpoint.load(Path(old.get("checkpoint") or folder), device="cpu" if onload else self.device,
                                     trust_remote_code=self.pipe.trust_remote_code)
        old["accuracy"], old["speed"] = self._evaluate(folder, model, tok, old["memory"], is_base=old["index"] == 0,
                                                       onload=onload)
        old["eval_hash"] = self.eval_hash
        manifest.write(folder, old)
        return StageResult(folder.name, "re-evaluated", old)

    def _tmp(self, folder: Path) -> Path:
        tmp = folder.parent / f".tmp-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CompressError(f"output folder {folder} cannot be written: {e.strerror or e}") from None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place; an older version is moved aside first, then deleted."""
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _clean_partials(out: Path) -> None:
    """Remove what killed runs left: temp and moved-aside stage folders (never a finished one)."""
    for pattern in (".tmp-*", ".old-*", ".sync-*"):  # .sync-*: markers of an earlier multi-process run
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
