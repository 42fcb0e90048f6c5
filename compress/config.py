"""Pipeline YAML -> a validated, typed `Pipeline`: the one parser of a pipeline file.

    name: tiny-smoke                   # run folder: artifacts/<name>/
    model: tiny:configs/models/tiny-llama.json   # local folder | HF id | zoo:NAME | tiny:CONFIG.json
    seed: 0
    data: {calibration: zoo:austen, train: [zoo:austen, zoo:shakespeare]}
    eval: {perplexity: [zoo:austen], seq_len: 512, max_tokens: 20480}
    stages:                            # ordered list of one-key mappings; a stage type may repeat
      - cast: {dtype: bfloat16}
      - cast: {dtype: float16, from: base, name: fp16}   # a branch from the base model

`offload: auto | never | always` keeps a model on the host and runs it one decoder block at a time on the device
(compress/onload.py), for the steps that can (loading and evaluating a model, gptq, eval); auto does it where the
memory planner says the whole model does not fit.

Reserved keys inside a stage mapping: `include` (a preset YAML from configs/, local keys override), `from`
(`base`, or an earlier stage's name or index: start from that output instead of the previous one), `name`
(the stage's name and folder suffix; defaults to the stage type, made unique with -2, -3 ...).

Each stage's settings become its module's `Config` dataclass (compress/stages/<type>.py): unknown keys and
wrong types are one-line errors naming the key and the valid ones. Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.errors import CompressError
from compress.stages import STAGES

TOP_KEYS = ("name", "description", "model", "seed", "data", "eval", "stages", "device", "offload", "allow_pickle",
            "trust_remote_code")
OFFLOAD = ("auto", "never", "always")
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
    offload: str = "auto"                # auto | never | always: keep the model on the host, one block at a time on the device
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
            "offload": self.offload,
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
    return parse(_read_yaml(path), path)


def parse(raw: Any, path: str | Path = "pipeline") -> Pipeline:
    """Validate a pipeline given as a mapping (what the YAML holds); `path` names it in errors and anchors
    `include:` lookups."""
    path = Path(path)
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
    offload = raw.get("offload", "auto")
    if offload not in OFFLOAD:
        raise CompressError(f"{path}: offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    pipe = Pipeline(
        name=name, model=model, seed=seed, description=str(raw.get("description", "")),
        data=_parse_data(raw.get("data") or {}, path), eval=_parse_eval(raw.get("eval"), path), device=device,
        allow_pickle=raw.get("allow_pickle", False), trust_remote_code=raw.get("trust_remote_code", False), path=path,
        offload=offload,
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
