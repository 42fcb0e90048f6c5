"""Pipeline: load a YAML file into a validated `Pipeline`, then run its stages with save/check/measure/manifest.

    name: tiny-smoke                   # run folder: artifacts/<name>/
    model: tiny:configs/models/tiny-llama.json   # local folder | HF id | zoo:NAME | tiny:CONFIG.json
    seed: 0
    data: {calibration: zoo:austen, train: [zoo:austen, zoo:shakespeare]}
    eval: {perplexity: [zoo:austen], seq_len: 512, max_tokens: 20480}
    stages:                            # ordered list of one-key mappings; a stage type may repeat
      - cast: {dtype: bfloat16}
      - cast: {dtype: float16, from: base, name: fp16}   # a branch from the base model

Reserved keys inside a stage mapping: `include` (a preset YAML from configs/, local keys override), `from`
(`base`, or an earlier stage's name or index: start from that output instead of the previous one), `name`
(the stage's name and folder suffix; defaults to the stage type, made unique with -2, -3 ...).

Everything is validated before any model is loaded. Running a stage (see `run`):
load input -> stage.run (peak memory measured) -> save into .tmp-NN-name/ -> reload and compare logits
(round trip) -> evaluate -> manifest.json written last -> folder renamed to NN-name/. A rerun skips a stage
whose manifest records the same input hash and config hash (and only re-evaluates when just `eval:`
changed); a stage that crashed or was killed left no manifest in place, so it is redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import os
import shutil
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from compress import checkpoint, manifest, memory
from compress.errors import CompressError
from compress.stages import STAGES

TOP_KEYS = ("name", "description", "model", "seed", "data", "eval", "stages", "device", "allow_pickle",
            "trust_remote_code")
DATA_KEYS = ("calibration", "train")
RESERVED = ("include", "from", "name")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class StageSpec:
    index: int          # 1-based position in `stages`; 0 is the base model
    type: str           # registry key, e.g. "cast"
    name: str           # unique within the pipeline; the folder is NN-name
    source: str         # name of the stage whose output is the input ("base" for the model itself)
    config: Any         # the stage module's Config instance
    raw: dict           # the stage mapping after include/merge, as written into the resolved pipeline.yaml

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-{self.name}"

    @property
    def module(self):
        return STAGES[self.type]


@dataclass
class Pipeline:
    name: str
    model: str
    seed: int = 0
    description: str = ""
    data: dict = field(default_factory=dict)
    eval: Any = None                     # evaluate.EvalConfig or None
    stages: list[StageSpec] = field(default_factory=list)
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    path: Path | None = None

    def resolved(self) -> dict:
        """The pipeline as run: includes expanded, defaults filled (written to <run>/pipeline.yaml)."""
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "seed": self.seed,
            "device": self.device,
            "allow_pickle": self.allow_pickle,
            "trust_remote_code": self.trust_remote_code,
            "data": self.data,
            "eval": dataclasses.asdict(self.eval) if self.eval is not None else None,
            "stages": [
                {s.type: {"name": s.name, "from": s.source, **dataclasses.asdict(s.config)}} for s in self.stages
            ],
        }

    def stage(self, ref: str) -> StageSpec | None:
        for s in self.stages:
            if ref in (s.name, str(s.index), s.folder):
                return s
        return None


# --------------------------------------------------------------------------------------------- loading


def load(path: str | Path) -> Pipeline:
    """Parse and validate a pipeline YAML; raises CompressError with one line for any problem."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a pipeline is a YAML mapping with keys {', '.join(TOP_KEYS)}")
    _check_keys(raw, TOP_KEYS, f"{path}")
    if "model" not in raw:
        raise CompressError(f"{path}: missing required key 'model' (a local folder, HF id, zoo:NAME or tiny:CONFIG)")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CompressError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the run folder)")
    model = raw["model"]
    if not isinstance(model, str) or not model:
        raise CompressError(f"{path}: model must be a string, got {model!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CompressError(f"{path}: seed must be an integer, got {seed!r}")
    for flag in ("allow_pickle", "trust_remote_code"):
        if not isinstance(raw.get(flag, False), bool):
            raise CompressError(f"{path}: {flag} must be true or false, got {raw[flag]!r}")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise CompressError(f"{path}: device must be auto, cpu or cuda[:N], got {device!r}")
    pipe = Pipeline(
        name=name, model=model, seed=seed, description=str(raw.get("description", "")),
        data=_parse_data(raw.get("data") or {}, path), eval=_parse_eval(raw.get("eval"), path), device=device,
        allow_pickle=raw.get("allow_pickle", False), trust_remote_code=raw.get("trust_remote_code", False), path=path,
    )
    pipe.stages = _parse_stages(raw.get("stages"), path)
    return pipe


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise CompressError(f"pipeline file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise CompressError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise CompressError(f"{path}: YAML error: {str(e).splitlines()[0]}") from None


def _check_keys(d: dict, valid: typing.Iterable[str], where: str) -> None:
    for key in d:
        if key not in valid:
            raise CompressError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _parse_data(data: Any, path: Path) -> dict:
    if not isinstance(data, dict):
        raise CompressError(f"{path}: data must be a mapping with keys {', '.join(DATA_KEYS)}")
    _check_keys(data, DATA_KEYS, f"{path}: data")
    out = dict(data)
    if "train" in out and isinstance(out["train"], str):
        out["train"] = [out["train"]]
    specs = ([out["calibration"]] if "calibration" in out else []) + list(out.get("train", []))
    for spec in specs:
        if not isinstance(spec, str):
            raise CompressError(f"{path}: data sources must be strings, got {spec!r}")
        _check_text_spec(spec, path)
    return out


def _check_text_spec(spec: str, path: Path) -> None:
    from compress import data

    try:
        data.check_spec(spec)
    except CompressError as e:
        raise CompressError(f"{path}: {e}") from None


def _parse_eval(block: Any, path: Path):
    if block is None:
        return None
    if not isinstance(block, dict):
        raise CompressError(f"{path}: eval must be a mapping, e.g. {{perplexity: [zoo:austen], seq_len: 512}}")
    from compress import evaluate

    cfg = build_config(evaluate.EvalConfig, block, f"{path}: eval")
    for spec in list(cfg.perplexity) + list(getattr(cfg, "agreement", []) or []):
        _check_text_spec(spec, path)
    return cfg


def _parse_stages(stages: Any, path: Path) -> list[StageSpec]:
    if stages is None:
        return []
    if not isinstance(stages, list):
        raise CompressError(f"{path}: stages must be a list of one-key mappings, e.g. '- cast: {{dtype: bfloat16}}'")
    out: list[StageSpec] = []
    names: set[str] = {"base"}
    for i, entry in enumerate(stages, start=1):
        where = f"{path}: stage {i}"
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise CompressError(f"{where}: each stage is a one-key mapping like '- cast: {{dtype: bfloat16}}'")
        (stype, body), = entry.items()
        if stype not in STAGES:
            raise CompressError(f"{where}: unknown stage {stype!r}; valid stages: {', '.join(sorted(STAGES))}")
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise CompressError(f"{where} ({stype}): settings must be a mapping, got {body!r}")
        body = _expand_include(body, path, where)
        name = body.pop("name", None)
        if name is None:
            name = stype
            k = 2
            while name in names:
                name, k = f"{stype}-{k}", k + 1
        if not isinstance(name, str) or not NAME_RE.match(name) or name.isdigit():
            raise CompressError(f"{where} ({stype}): name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in names:
            raise CompressError(f"{where} ({stype}): name {name!r} is already used by an earlier stage")
        source = _resolve_from(body.pop("from", None), out, where, stype)
        config = build_config(STAGES[stype].Config, body, f"{where} ({stype})")
        out.append(StageSpec(index=i, type=stype, name=name, source=source, config=config, raw=body))
        names.add(name)
    return out


def _resolve_from(ref: Any, earlier: list[StageSpec], where: str, stype: str) -> str:
    if ref is None:
        return earlier[-1].name if earlier else "base"
    if ref in ("base", 0, "0"):
        return "base"
    for s in earlier:
        if str(ref) in (s.name, str(s.index), s.folder):
            return s.name
    known = ", ".join(["base"] + [s.name for s in earlier])
    raise CompressError(f"{where} ({stype}): from: {ref!r} is not base or an earlier stage ({known})")


def _expand_include(body: dict, path: Path, where: str, depth: int = 0) -> dict:
    if "include" not in body:
        return dict(body)
    if depth > 8:
        raise CompressError(f"{where}: include nested more than 8 deep (a cycle?)")
    ref = body["include"]
    candidates = [path.parent / ref, REPO / "configs" / ref, Path(ref)]
    for cand in candidates:
        if cand.is_file():
            preset = _read_yaml(cand)
            if preset is None:
                preset = {}
            if not isinstance(preset, dict):
                raise CompressError(f"{cand}: a preset is a YAML mapping of stage settings")
            merged = _expand_include(preset, cand, where, depth + 1)
            merged.update({k: v for k, v in body.items() if k != "include"})
            return merged
    raise CompressError(f"{where}: include {ref!r} not found (looked in {path.parent} and {REPO / 'configs'})")


def build_config(cls, values: dict, where: str):
    """Instantiate a stage's Config dataclass from YAML values: unknown keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            valid = ", ".join(k for k in fields) or "(none)"
            raise CompressError(f"{where}: unknown key {key!r}; valid keys: {valid}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _type_ok(value, hints.get(key, Any)):
            raise CompressError(f"{where}: {key} must be {_type_name(hints.get(key, Any))}, got {value!r}")
    try:
        return cls(**values)
    except CompressError as e:
        raise CompressError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CompressError(f"{where}: {e}") from None


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------------------------- checks before work


def check_model_spec(spec: str, allow_pickle: bool = False) -> None:
    """Cheap check that the model can be had, before any work starts."""
    if spec.startswith("tiny:"):
        p = Path(spec[5:])
        if not p.is_file() and not (REPO / p).is_file():
            raise CompressError(f"model {spec!r}: tiny config {p} not found")
        return
    if spec.startswith("zoo:"):
        from compress import zoo

        name = spec[4:]
        if name not in zoo.MODELS:
            raise CompressError(f"model {spec!r}: not a zoo model; zoo models: {', '.join(zoo.MODELS)}")
        if not zoo.is_installed(name):
            raise CompressError(f"model {spec!r} is not installed: run `compress zoo fetch {name}`")
        return
    p = Path(spec).expanduser()
    if p.exists():
        checkpoint.check_folder(p, allow_pickle) if p.is_dir() else checkpoint.resolve(spec)
        return
    checkpoint.resolve(spec)  # hub: fails at once when offline and not cached


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CompressError(f"output folder {folder} cannot be written: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------- hashing


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_hash(pipe: Pipeline, spec: StageSpec) -> str:
    """What decides whether a stage's output is still valid: its type, config, the seed and the data."""
    return _hash({"type": spec.type, "config": dataclasses.asdict(spec.config), "seed": pipe.seed, "data": pipe.data})


def eval_hash(pipe: Pipeline) -> str:
    return _hash(dataclasses.asdict(pipe.eval) if pipe.eval is not None else None)


def source_hash(pipe: Pipeline) -> str:
    """Content hash of the input model (tiny: its config + seed; otherwise its files)."""
    if pipe.model.startswith("tiny:"):
        p = _tiny_path(pipe.model)
        return _hash({"tiny": p.read_text(), "seed": pipe.seed})
    return checkpoint.content_hash(checkpoint.resolve(pipe.model))


def _tiny_path(spec: str) -> Path:
    p = Path(spec[5:])
    return p if p.is_file() else REPO / p


# --------------------------------------------------------------------------------------------- running


@dataclass
class StageResult:
    folder: str
    status: str          # "done" | "skipped" | "re-evaluated"
    manifest: dict


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device {setting!r} requested but no CUDA device is available")
    return torch.device(setting)


def run(
    pipe: Pipeline,
    out_root: str | Path = "artifacts",
    force: bool = False,
    log: Callable[[str], None] = print,
    quiet: bool = False,
    on_result: Callable[[StageResult], None] | None = None,
    until: str | None = None,
) -> list[StageResult]:
    """Run every stage of `pipe` into <out_root>/<name>/, skipping what is already done; see module doc.

    `until` (a stage name, its folder NN-name, or "base") stops after that stage: the later ones are not
    touched, and a later run picks them up. Running a pipeline once per stage this way gives every stage a
    fresh process (on a CPU: none of the heap earlier stages left behind).
    Under `accelerate launch` (several processes) every process calls this; see _Ranks for who does what.
    """
    stop = stage_position(pipe, until)
    if until is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CompressError("--until runs on one process only; run it without `accelerate launch`")
    check_model_spec(pipe.model, pipe.allow_pickle)
    out = Path(out_root) / pipe.name
    device = pick_device(pipe.device)
    ranks = _Ranks(out, device)
    if ranks.device.type == "cpu":
        memory.fixed_mmap_threshold()  # RSS then follows live tensors: peaks mean what the planner means
    if ranks.main:
        if not force:
            check_memory(pipe, ranks.device)  # before anything is written: a refused run leaves nothing behind
        check_writable(out)
    if ranks.main:
        _clean_partials(out)
        _write_text_atomic(out / "pipeline.yaml", yaml.safe_dump(pipe.resolved(), sort_keys=False))
    ranks.begin()
    runner = _Runner(pipe, out, ranks.device, force, log if ranks.main else (lambda m: None), quiet or not ranks.main,
                     ranks)
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


def is_main_process() -> bool:
    """False in the processes other than rank 0 that `accelerate launch` / torchrun started."""
    return int(os.environ.get("RANK", "0")) == 0


class _Ranks:
    """Who does what when `accelerate launch` (torchrun) started several processes; one process does it all.

    Only the main process (rank 0) writes: checkpoints, manifests, pipeline.yaml, the report. Stages that train
    (their module says DISTRIBUTED = True: prune, train, distill) run on every process, each process on its own
    shard of the batches (DDP through accelerate; FSDP from accelerate's config); every other stage, the saves,
    round-trip checks and evaluations run on the main process alone. The other processes follow through marker
    files the main one writes into <run>/.sync-<token>/: NN.start (whether stage NN runs) and NN.done (its
    folder, output hash, status); they poll them rather than wait in a collective, so a GPTQ or an evaluation
    that keeps the main process busy for hours hits no process-group timeout. When a process fails, torchrun
    ends the others; the main process also leaves a `failed` marker that stops the followers.
    """

    POLL_SECONDS = 0.5

    def __init__(self, out: Path, device: torch.device):
        self.n = int(os.environ.get("WORLD_SIZE", "1"))
        self.out, self.device, self.main, self.sync = out, device, True, None
        if self.n > 1:
            from accelerate import PartialState

            state = PartialState(cpu=device.type == "cpu")  # on CPU: a gloo group (see compress/train.py)
            self.main, self.device, self.state = state.is_main_process, state.device, state

    def begin(self) -> None:
        """Agree on this invocation's marker folder (one broadcast)."""
        if self.n == 1:
            return
        from accelerate.utils import broadcast_object_list

        token = [uuid.uuid4().hex[:12] if self.main else None]
        broadcast_object_list(token)
        self.sync = self.out / f".sync-{token[0]}"
        if self.main:
            self.sync.mkdir(parents=True, exist_ok=True)

    def started(self, index: int, runs: bool) -> None:
        self._write(f"{index:02d}.start", {"runs": runs})

    def done(self, index: int, folder: Path, output_hash: str, status: str) -> None:
        self._write(f"{index:02d}.done", {"folder": str(folder), "hash": output_hash, "status": status})

    def failed(self, error: BaseException) -> None:
        self._write("failed", {"error": f"{type(error).__name__}: {error}"})

    def wait(self, name: str) -> dict:
        path = self.sync / name
        while not path.is_file():
            if (self.sync / "failed").is_file():
                err = json.loads((self.sync / "failed").read_text())["error"]
                raise CompressError(f"the main process stopped ({err}); this process stops too")
            time.sleep(self.POLL_SECONDS)
        return json.loads(path.read_text())

    def end(self) -> None:
        if self.n == 1:
            return
        self.state.wait_for_everyone()  # every follower has read the last marker
        if self.main:
            shutil.rmtree(self.sync, ignore_errors=True)

    def _write(self, name: str, obj: dict) -> None:
        if self.n > 1 and self.main:
            _write_text_atomic(self.sync / name, json.dumps(obj))


def model_config(pipe: Pipeline) -> dict:
    """The input model's config.json as a dict, read without loading a weight (what the memory planner needs)."""
    if pipe.model.startswith("tiny:"):
        return json.loads(_tiny_path(pipe.model).read_text())
    return checkpoint.check_folder(checkpoint.resolve(pipe.model), pipe.allow_pickle)


def plan_memory(pipe: Pipeline, device=None) -> list:
    """The memory planner's StagePlan of every stage (base first) for `device` (see memory.resolve_device)."""
    return memory.plan(pipe, model_config(pipe), device)


def check_memory(pipe: Pipeline, device: torch.device) -> None:
    """Refuse, before any work, a pipeline with a stage predicted not to fit in this machine's memory."""
    plans = plan_memory(pipe, memory.machine(device))
    for p in plans:
        if p.fits is False:
            raise CompressError(
                f"stage {p.index:02d}-{p.name} ({p.stage}) is predicted not to fit: " + "; ".join(p.advice)
                + f". `compress plan {pipe.path or ''}` shows the breakdown; --force runs it anyway"
            )


class _Runner:
    def __init__(self, pipe, out, device, force, log, quiet, ranks: _Ranks):
        self.pipe, self.out, self.device, self.force, self.log, self.quiet = pipe, out, device, force, log, quiet
        self.ranks = ranks
        self.folders: dict[str, Path] = {}   # stage name -> finished folder
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
                self._run_stage(spec, self.folders[spec.source], self.hashes[spec.source])
            info = self.ranks.wait(f"{spec.index:02d}.done")
            self.folders[spec.name], self.hashes[spec.name] = Path(info["folder"]), info["hash"]
            yield StageResult(spec.folder, info["status"], manifest.read(Path(info["folder"])) or {})

    # -- base

    def base(self) -> StageResult:
        folder = self.out / "00-base"
        src_hash = source_hash(self.pipe)
        old = manifest.read(folder)
        self.folders["base"] = folder
        if old and not self.force and old["input"]["hash"] == src_hash:
            self.hashes["base"] = old["output_hash"]
            return self._maybe_reeval(folder, old)
        self.log(f"[00-base] loading {self.pipe.model}")
        tmp = self._tmp(folder)
        t0 = manifest.now()
        predicted = memory.predict_stage("base", {}, model_config(self.pipe)).growth_bytes
        with memory.PeakMemory(self.device) as pm:  # loading the model: its weights are the growth
            if self.pipe.model.startswith("tiny:"):
                from compress import tiny

                model, tok = tiny.build(_tiny_path(self.pipe.model), seed=self.pipe.seed)
            else:
                model, tok = checkpoint.load(
                    checkpoint.resolve(self.pipe.model), device="cpu", allow_pickle=self.pipe.allow_pickle,
                    trust_remote_code=self.pipe.trust_remote_code,
                )
            model.to(self.device)
            memory.fault_in(model)  # memory-mapped weights count once they are read
        checkpoint.save(model, tok, tmp)
        m = self._finish(
            tmp, folder, model, index=0, stage="base", name="base", config={}, config_hash=None,
            input_={"from": self.pipe.model, "path": str(self.pipe.model), "hash": src_hash},
            stats={}, seconds=manifest.now() - t0,
            memory={"predicted_peak_bytes": predicted, "measured_peak_bytes": pm.measured_bytes, "method": pm.method},
        )
        self.hashes["base"] = m["output_hash"]
        return StageResult("00-base", "done", m)

    # -- stages

    def stage(self, spec: StageSpec) -> StageResult:
        folder = self.out / spec.folder
        in_folder, in_hash = self.folders[spec.source], self.hashes[spec.source]
        cfg_hash = stage_hash(self.pipe, spec)
        writes = getattr(spec.module, "WRITES_CHECKPOINT", True)
        old = manifest.read(folder)
        self.folders[spec.name] = folder if writes else in_folder
        if old and not self.force and old["input"]["hash"] == in_hash and old["config_hash"] == cfg_hash:
            self.ranks.started(spec.index, runs=False)
            self.hashes[spec.name] = old["output_hash"]
            return self._maybe_reeval(folder, old) if writes else StageResult(spec.folder, "skipped", old)
        self.ranks.started(spec.index, runs=True)
        self.log(f"[{spec.folder}] {spec.type} from {spec.source}")
        model, tok, stats, predicted, pm, seconds = self._run_stage(spec, in_folder, in_hash)
        work = self._work_dir(spec, in_hash)
        common = dict(
            index=spec.index, stage=spec.type, name=spec.name, config=dataclasses.asdict(spec.config),
            config_hash=cfg_hash, input_={"from": spec.source, "path": str(in_folder), "hash": in_hash},
            seconds=seconds,
            memory={"predicted_peak_bytes": predicted, "measured_peak_bytes": pm.measured_bytes, "method": pm.method},
        )
        tmp = self._tmp(folder)
        if writes:
            checkpoint.save(model, tok, tmp)
            m = self._finish(tmp, folder, model, stats=stats, **common)
        else:
            m = self._record_only(tmp, folder, in_folder, in_hash, stats, **common)
        shutil.rmtree(work, ignore_errors=True)
        self.hashes[spec.name] = m["output_hash"]
        return StageResult(spec.folder, "done", m)

    def _work_dir(self, spec: StageSpec, in_hash: str) -> Path:
        """Scratch folder of a stage (mid-stage checkpoints), named by its config and input: a resume finds it."""
        return self.out / f".work-{spec.folder}-{stage_hash(self.pipe, spec)[:8]}-{in_hash[:8]}"

    def _run_stage(self, spec: StageSpec, in_folder: Path, in_hash: str):
        """Load the input, run the stage, measure it: (model, tokenizer, stats, predicted, PeakMemory, seconds)."""
        torch.manual_seed(self.pipe.seed)
        model, tok = checkpoint.load(in_folder, device=self.device, trust_remote_code=self.pipe.trust_remote_code)
        work = self._work_dir(spec, in_hash)
        if self.ranks.main:
            for stale in self.out.glob(f".work-{spec.folder}-*"):  # mid-stage state of another config/input
                if stale != work:
                    shutil.rmtree(stale, ignore_errors=True)
            work.mkdir(exist_ok=True)
        from compress.context import Context

        ctx = Context(
            device=self.device, seed=self.pipe.seed, data=self.pipe.data, work_dir=work,
            base_path=self.folders["base"], stage_paths={k: v for k, v in self.folders.items() if k != spec.name},
            trust_remote_code=self.pipe.trust_remote_code, log=self.log, quiet=self.quiet,
        )
        predicted = memory.predict_for_run(self.pipe, spec, model)
        t0 = manifest.now()
        with memory.PeakMemory(self.device, model) as pm:
            model, stats = spec.module.run(model, tok, spec.config, ctx)
        return model, tok, stats, predicted, pm, manifest.now() - t0

    def _record_only(self, tmp, folder, in_folder, in_hash, result, *, index, stage, name, config, config_hash,
                     input_, seconds, memory):
        """Manifest of a stage that writes no weights (eval): it describes the input checkpoint."""
        src = manifest.read(in_folder) or {}
        m = {
            "stage": stage, "name": name, "index": index, "folder": folder.name, "complete": True,
            "config": config, "config_hash": config_hash, "eval_hash": None, "input": input_,
            "checkpoint": str(in_folder), "output_hash": in_hash, "format": src.get("format"),
            "size": src.get("size"),
            "memory": {"weights_bytes": (src.get("memory") or {}).get("weights_bytes"), **memory,
                       "eval_measured_peak_bytes": memory["measured_peak_bytes"], "device": str(self.device)},
            "round_trip": None, "stats": {}, "seconds": round(seconds, 3), "env": manifest.env(self.device),
            "accuracy": result.get("accuracy", {}), "speed": result.get("speed", {}),
        }
        manifest.write(tmp, m)
        _replace_dir(tmp, folder)
        return m

    # -- shared tail: check, evaluate, manifest, rename

    def _finish(self, tmp, folder, model, *, index, stage, name, config, config_hash, input_, stats, seconds, memory):
        """Round-trip check, size, evaluation, then manifest.json last and the folder renamed into place."""
        self.log(f"[{folder.name}] saved; checking the reload")
        rt = checkpoint.round_trip(model, tmp, self.device, self.pipe.trust_remote_code)
        fmt = rt.pop("format")
        size = manifest.size_of(model, tmp)
        weights = manifest.weights_bytes(model)
        del model
        m = {
            "stage": stage, "name": name, "index": index, "folder": folder.name, "complete": True,
            "config": config, "config_hash": config_hash, "eval_hash": self.eval_hash,
            "input": input_, "output_hash": checkpoint.content_hash(tmp), "format": fmt, "size": size,
            "memory": {"weights_bytes": weights, "predicted_peak_bytes": None, **memory, "device": str(self.device)},
            "round_trip": rt, "stats": stats, "seconds": round(seconds, 3), "env": manifest.env(self.device),
        }
        m.update(self._evaluate(tmp, m, is_base=index == 0))
        manifest.write(tmp, m)
        _replace_dir(tmp, folder)
        return m

    def _evaluate(self, folder: Path, m: dict, is_base: bool) -> dict:
        """Evaluate the checkpoint as saved (reloaded from disk) under the pipeline's eval protocol.

        Bare encoders (no LM head) are scored by agreement with the base model, so that one is loaded too.
        """
        if self.pipe.eval is None:
            return {"accuracy": {}, "speed": {}}
        from compress import evaluate

        self.log(f"[{folder.name.removeprefix('.tmp-')}] evaluating")
        model, tok = checkpoint.load(folder, device=self.device, trust_remote_code=self.pipe.trust_remote_code)
        base = None
        if _is_bare_encoder(model):
            base = model if is_base else checkpoint.load(self.folders["base"], device=self.device)[0]
        predicted = memory.predict_eval_for_run(self.pipe.eval, model, base)
        with memory.PeakMemory(self.device, model) as pm:
            result = evaluate.run(model, tok, self.pipe.eval, device=self.device, base_model=base)
        m["memory"]["eval_predicted_peak_bytes"] = predicted
        m["memory"]["eval_measured_peak_bytes"] = pm.measured_bytes
        return {"accuracy": result.get("accuracy", {}), "speed": result.get("speed", {})}

    def _maybe_reeval(self, folder: Path, old: dict) -> StageResult:
        if old.get("eval_hash") == self.eval_hash:
            return StageResult(folder.name, "skipped", old)
        old.update(self._evaluate(folder, old, is_base=old["index"] == 0))
        old["eval_hash"] = self.eval_hash
        manifest.write(folder, old)
        return StageResult(folder.name, "re-evaluated", old)

    def _tmp(self, folder: Path) -> Path:
        tmp = folder.parent / f".tmp-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp


def _is_bare_encoder(model) -> bool:
    return not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None


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
    for p in out.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".old-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".sync-*"):  # markers of an earlier multi-process run
        shutil.rmtree(p, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
