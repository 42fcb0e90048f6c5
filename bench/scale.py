"""Benchmark: GPTQ at three Llama shapes (SmolLM2-135M, SmolLM2-1.7B, Llama-3-8B): time, memory and disk of a run.

Issue "Models bigger than the device": how the wall time and peak memory of `compress run` with one GPTQ stage
grow with the model, and what happens when the model is bigger than RAM (Llama-3-8B in float32 is 32 GB). Time
and memory do not depend on the weights' values, so each shape is a checkpoint of random weights of the real
shapes, float32, written by this script (`write_checkpoint`): seeded per tensor, initialised as LlamaForCausalLM
initialises itself (normal(0, 0.02), the padding row of the embedding 0, norms 1), streamed tensor by tensor
into safetensors shards of at most 2 GiB (the safetensors layout written directly: at most one tensor in RAM),
with model.safetensors.index.json when there is more than one shard (the Hugging Face layout), config.json,
generation_config.json and a tokenizer. SmolLM2-135M also runs on its real weights (`135m-zoo`:
zoo:smollm2-135m, with an eval block), where perplexity means something.

Tokenizers: the 49152-token shapes get a copy of the zoo SmolLM2 tokenizer files. The 128256-token shape gets a
byte-level BPE trained here on the train splits of zoo:austen and zoo:shakespeare (the `tokenizers` library,
vocabulary size asked: 128000; it learns what the text holds), its vocabulary padded with never-produced
`<|unused_N|>` entries to 128000, then 256 special tokens as Llama 3 lays them out: <|begin_of_text|> = 128000
(BOS), <|end_of_text|> = 128001 (EOS), <|reserved_special_token_K|> up to 128255.

Per shape: the checkpoint is written once (kept under WORK/models; regenerated when its spec or seed changes), a
pipeline YAML is written (model: the folder; data: {calibration: zoo:austen}; one stage
`gptq: {bits: 4, group_size: 128, nsamples: N, seq_len: 512}`; no eval block but for 135m-zoo), the planner is
asked (`compress plan`, and its numbers as JSON), `compress run --dry-run` says whether the run is refused,
then `compress run` runs in its own process under `/usr/bin/time -v` (with --force when the planner refused it,
unless --no-force), watched by this script: every 0.1 s it reads /proc/PID/status of the process tree (VmRSS,
VmHWM, RssAnon, RssFile, RssShmem), MemAvailable and the free disk, and kills the run (SIGKILL, its own
processes by id) when its anonymous memory passes --mem-limit-gb (default 85% of RAM), when the machine's
available memory falls under 1 GiB, when the free disk falls under 3 GiB, or after --timeout-min. Anonymous
memory is what the limit counts: with no swap it cannot be reclaimed, while the pages of memory-mapped weights
(RssFile) are page cache that the kernel drops under pressure.

Peak RSS: the maximum of the sampled VmHWM (the kernel's high-water mark, read every 0.1 s). /usr/bin/time's
"Maximum resident set size" is recorded too, but it can understate the process peak: compress.measure.PeakMemory
resets the high-water mark (/proc/self/clear_refs) when each measured step starts, and the kernel's rusage keeps
an earlier peak only if some thread of the process exited after it (a 2 GB allocation freed before a reset is not
reported: checked). Phases (base load + save, reload check, GPTQ layers,
save ...) are cut at the log lines `compress run` prints; each gets its time and its largest sampled RSS, anon and
file memory.

    nice -n 10 python bench/scale.py --shapes 135m,135m-zoo,1.7b --label before
    nice -n 10 python bench/scale.py --shapes 8b --label before --timeout-min 300
    nice -n 10 python bench/scale.py --label after                 # every shape, the code of this checkout
    python bench/scale.py --self-test                              # the generator on tiny shapes, loaded back
Results merge into bench/results/scale.json (runs[label][shape]: a later label adds to the earlier ones; a shape
rerun under the same label replaces its entry) and are rendered to bench/results/scale.md. Checkpoints, logs,
manifests and the run folders live under --work (default: ../scale-data beside the repository); a run's output
checkpoints are deleted after they are measured unless --keep-outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GiB, MiB = 2**30, 2**20
SHARD_BYTES = 2 * GiB          # largest safetensors shard (Llama-3-8B's embedding, 1.96 GiB, fits alone)
STD = 0.02                     # LlamaConfig.initializer_range: what _init_weights draws Linear and Embedding from
SAMPLE_S = 0.1                 # watchdog period
MIN_AVAILABLE = 1 * GiB        # kill the run when the machine's MemAvailable falls under this
MIN_DISK_FREE = 3 * GiB        # ... or the free disk under --work
ZOO_TOKENIZER = "smollm2-135m"
BPE_SOURCES = ("zoo:austen", "zoo:shakespeare")


@dataclass(frozen=True)
class Shape:
    name: str                  # key in --shapes and in the results
    title: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool                 # lm_head shares the embedding
    head_dim: int | None = None
    rope_theta: float = 100000.0
    tokenizer: str = "smollm2"  # smollm2: the zoo SmolLM2 files (49152 tokens); bpe: byte-level BPE built here
    zoo: str | None = None     # run this zoo model (real weights) instead of a generated checkpoint
    eval: bool = False         # add an eval block (perplexity), only where the weights are real


SHAPES = {
    "135m": Shape("135m", "SmolLM2-135M shape", 30, 576, 9, 3, 1536, 49152, True),
    "135m-zoo": Shape("135m-zoo", "SmolLM2-135M-Instruct (real weights)", 30, 576, 9, 3, 1536, 49152, True,
                      zoo="smollm2-135m", eval=True),
    "1.7b": Shape("1.7b", "SmolLM2-1.7B shape", 24, 2048, 32, 32, 8192, 49152, True, rope_theta=130000.0),
    "8b": Shape("8b", "Llama-3-8B shape", 32, 4096, 32, 8, 14336, 128256, False, head_dim=128,
                rope_theta=500000.0, tokenizer="bpe"),
}
# --self-test: both tokenizer paths, tied and untied, one file and shards with an index, in seconds
TINY = {
    "tiny-tied": Shape("tiny-tied", "tiny, tied, SmolLM2 tokenizer", 2, 64, 4, 2, 128, 49152, True),
    "tiny-untied": Shape("tiny-untied", "tiny, untied, 128256 BPE", 2, 64, 4, 2, 160, 128256, False, head_dim=32,
                         tokenizer="bpe"),
}


# ------------------------------------------------------------------------------------------------ the checkpoint


def hf_config(shape: Shape):
    """The LlamaConfig of a shape: SmolLM2's special-token ids (from the zoo config) or Llama 3's."""
    from transformers import LlamaConfig

    if shape.tokenizer == "smollm2":
        from compress import zoo

        zc = json.loads((zoo.model_path(ZOO_TOKENIZER) / "config.json").read_text())
        ids = {k: zc.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
        ids = {"bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": None}
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim or shape.hidden // shape.heads, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, tie_word_embeddings=shape.tied,
        attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=STD,
        architectures=["LlamaForCausalLM"], dtype="float32", **ids,
    )


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, in state-dict order, from a meta-device model (no
    memory): exactly what from_pretrained expects; a tied lm_head is not stored."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied]


def tensor_seed(seed: int, name: str) -> int:
    """One generator seed per tensor: the values do not depend on the order tensors are written in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int, pad_id: int | None):
    """A float32 tensor as LlamaPreTrainedModel._init_weights makes it: RMSNorm weights 1, every other weight
    normal(0, 0.02); the embedding's padding row 0."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    t = torch.empty(shape).normal_(0.0, STD, generator=g)
    if name.endswith("embed_tokens.weight") and pad_id is not None:
        t[pad_id] = 0.0
    return t


def shard_plan(specs, limit: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, a new shard whenever the next one would take the current past `limit`."""
    shards, size = [], 0
    for name, shape in specs:
        n = 4 * _numel(shape)
        if not shards or (size + n > limit and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def write_safetensors(path: Path, tensors, make) -> int:
    """One safetensors file, its tensors made one at a time by make(name, shape) and written as they come.

    The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} padded with
    spaces to a multiple of 8, then the raw little-endian data in header order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            t = make(name, shape)
            assert t.dtype.is_floating_point and t.element_size() == 4 and t.is_contiguous() and sys.byteorder == "little"
            f.write(t.numpy())  # the array's own buffer: no copy
            del t
    return offset


def write_bpe_tokenizer(folder: Path, vocab: int, n_special: int = 256) -> dict:
    """A byte-level BPE of exactly `vocab` ids laid out as Llama 3's: regular tokens, then n_special specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress import data

    texts = [t for spec in BPE_SOURCES for t in data.split_texts(spec, "train")]
    regular = vocab - n_special
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    ids = spec["model"]["vocab"]
    learned = len(ids)
    for i in range(learned, regular):  # no merge builds these strings: ids that exist and are never produced
        ids[f"<|unused_{i}|>"] = i
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{k}|>" for k in range(n_special - 2)]
    spec["added_tokens"] = [{"id": regular + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for k, s in enumerate(specials)]
    tok = Tokenizer.from_str(json.dumps(spec))
    if tok.get_vocab_size(with_added_tokens=True) != vocab:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, wanted {vocab}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.save_pretrained(folder)
    return {"kind": "byte-level BPE", "trained_on": list(BPE_SOURCES), "learned": learned,
            "unused_padding": regular - learned, "special": n_special, "size": vocab}


def write_checkpoint(shape: Shape, folder: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `shape` as a Hugging Face checkpoint folder (see the module doc); returns what was written."""
    from transformers import GenerationConfig

    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape)
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)
    if shape.tokenizer == "smollm2":
        from compress import zoo

        src = zoo.model_path(ZOO_TOKENIZER)
        files = [f for f in sorted(src.iterdir()) if f.name.startswith("tokenizer") or f.name == "chat_template.jinja"]
        for f in files:
            shutil.copy2(f, folder / f.name)
        tokenizer = {"kind": f"copied from zoo:{ZOO_TOKENIZER}", "files": [f.name for f in files], "size": shape.vocab}
    else:
        tokenizer = write_bpe_tokenizer(folder, shape.vocab)
    specs = tensor_specs(config)
    shards = shard_plan(specs, shard_bytes)
    pad = config.pad_token_id
    make = lambda name, shp: init_tensor(name, shp, seed, pad)
    if len(shards) == 1:  # as save_pretrained: one file, no index
        total = write_safetensors(folder / "model.safetensors", shards[0], make)
    else:
        total, weight_map = 0, {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(folder / fname, shard, make)
            weight_map.update({name: fname for name, _ in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    check_layout(folder, specs)
    return {"params": sum(_numel(s) for _, s in specs), "tensor_bytes": total, "shards": len(shards),
            "disk_bytes": disk_bytes(folder), "tokenizer": tokenizer, "seed": seed,
            "seconds": round(time.time() - t0, 1)}


def check_layout(folder: Path, specs) -> None:
    """Every tensor the meta-device model expects is in the files with its shape, nothing else is (headers only)."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                found[k] = tuple(st.get_slice(k).get_shape())
    want = dict(specs)
    if found != want:
        missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
        wrong = sorted(k for k in set(want) & set(found) if want[k] != found[k])
        raise RuntimeError(f"{folder}: layout mismatch: missing {missing[:3]}, extra {extra[:3]}, shapes {wrong[:3]}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        if set(wm) != set(want) or any(not (folder / v).is_file() for v in wm.values()):
            raise RuntimeError(f"{index}: weight_map does not match the shards")


def disk_bytes(path: Path) -> int:
    """Bytes of every file under `path` (apparent size)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def self_test() -> None:
    """Write the tiny shapes, load them with from_pretrained (no missing or unexpected keys), compare every tensor
    with the generator, run a forward (finite), check the tokenizer's size, load through compress.checkpoint."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import checkpoint

    for shape in TINY.values():
        with tempfile.TemporaryDirectory(prefix="scale-selftest-") as tmp:
            folder = Path(tmp) / shape.name
            info = write_checkpoint(shape, folder, seed=3, shard_bytes=SHARD_BYTES if shape.tied else 8 * MiB)
            model, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
            bad = {k: v for k, v in loading.items() if v}
            assert not bad, f"{shape.name}: from_pretrained reports {bad}"
            pad = model.config.pad_token_id
            for name, t in model.state_dict().items():
                if name == "lm_head.weight" and shape.tied:
                    assert t.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
                    continue
                assert torch.equal(t, init_tensor(name, tuple(t.shape), 3, pad)), f"{shape.name}: {name} differs"
            tok = AutoTokenizer.from_pretrained(folder)
            assert len(tok) == shape.vocab, f"{shape.name}: tokenizer has {len(tok)} ids, config {shape.vocab}"
            ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
            assert int(ids.max()) < shape.vocab and tok.bos_token_id is not None and tok.eos_token_id is not None
            logits = model(input_ids=ids).logits
            assert torch.isfinite(logits).all(), f"{shape.name}: non-finite logits"
            m2, _ = checkpoint.load(folder)
            assert torch.equal(m2(input_ids=ids).logits, logits)
            print(f"ok {shape.name}: {info['params']:,} params, {info['shards']} shard(s), tokenizer "
                  f"{info['tokenizer']['kind']} ({info['tokenizer']['size']} ids), logits std {logits.std():.3f}")
    # the real shapes: the meta-device model's tensors fall into shards of at most 2 GiB
    for shape in SHAPES.values():
        if shape.zoo:
            continue
        specs = tensor_specs(hf_config(shape))
        shards = shard_plan(specs)
        biggest = max(sum(4 * _numel(s) for _, s in sh) for sh in shards)
        assert biggest <= SHARD_BYTES
        print(f"ok {shape.name}: {sum(_numel(s) for _, s in specs) / 1e9:.3f}B params, {len(shards)} shard(s), "
              f"largest {biggest / GiB:.2f} GiB")


# ------------------------------------------------------------------------------------------------ one run, watched


def read_status(pid: int) -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of one process in bytes ({} once it is gone)."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in keys:
                    out[k] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children files of /proc), depth first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            kids = []
        out += kids
        todo += kids
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def phase_of(line: str, current: str) -> str | None:
    """The phase a `compress run` log line starts, or None: cut at the lines pipeline.py and the gptq stage print."""
    m = re.match(r"^\[(\d\d-[\w.-]+)\] (.*)$", line.strip())
    if m:
        folder, msg = m.groups()
        if msg.startswith("loading"):
            return f"{folder}: load, fault in, save"
        if msg.startswith("saved"):
            return f"{folder}: reload check, content hash"
        if msg.startswith("evaluating"):
            return f"{folder}: evaluate"
        if msg.startswith(("done", "skipped", "re-evaluated")):
            return f"after {folder}"
        if " from " in msg:
            return f"{folder}: load input, calibrate, layer 1"
        return None
    m = re.match(r"^(gptq|rtn) layer (\d+)/(\d+)", line.strip())
    if m:
        i, n = int(m.group(2)), int(m.group(3))
        stage = current.split(":")[0]
        if i == 1:
            return f"{stage}: layers 2-{n}" if n > 1 else f"{stage}: cast, save"
        if i == n:
            return f"{stage}: cast, save"
    return None


class Watched:
    """Run a command in a new session, its output lines timestamped into a log, its process tree sampled every
    SAMPLE_S from /proc, and killed (each of its processes, by id) past the limits; see the module doc."""

    def __init__(self, cmd: list[str], env: dict, log: Path, disk: Path, mem_limit: int, timeout_s: float | None,
                 first_phase: str = "start-up, plan"):
        self.cmd, self.env, self.log, self.disk = cmd, env, log, disk
        self.mem_limit, self.timeout_s = mem_limit, timeout_s
        self.phase = first_phase
        self.phases: list[dict] = []
        self.peak = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.min_available = mem_available()
        self.disk_free0 = shutil.disk_usage(disk).free
        self.min_disk_free = self.disk_free0
        self.killed: str | None = None
        self.last: dict = {}
        self.lines: list[str] = []

    def _new_phase(self, name: str, t: float) -> None:
        if self.phases:
            self.phases[-1]["seconds"] = round(t - self.phases[-1]["start_s"], 1)
        self.phases.append({"phase": name, "start_s": round(t, 1), "seconds": None, "max_rss": 0, "max_anon": 0,
                            "max_file": 0})
        self.phase = name
        print(f"    {t:8.1f}s  {name}", flush=True)

    def _read(self, stream, out) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            t = time.time() - self.t0
            out.write(f"{t:9.2f} {line}\n")
            out.flush()
            self.lines.append(line)
            nxt = phase_of(line, self.phase)
            if nxt and nxt != self.phase:
                self._new_phase(nxt, t)

    def _kill(self, reason: str) -> None:
        self.killed = reason
        print(f"    killing: {reason}", flush=True)
        for pid in reversed(descendants(self.proc.pid)):  # the run's processes, deepest first (not /usr/bin/time)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        self.t0 = time.time()
        self._new_phase(self.phase, 0.0)
        with open(self.log, "w") as out:
            out.write("$ " + " ".join(self.cmd) + "\n")
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.env["PYTHONPATH"], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            reader = threading.Thread(target=self._read, args=(self.proc.stdout, out), daemon=True)
            reader.start()
            beat = time.time()
            while self.proc.poll() is None:
                self._sample()
                if time.time() - beat > 60:
                    beat = time.time()
                    s = self.last
                    print(f"    {beat - self.t0:8.1f}s  rss {s.get('VmRSS', 0) / GiB:.2f} GiB (anon "
                          f"{s.get('RssAnon', 0) / GiB:.2f}, file {s.get('RssFile', 0) / GiB:.2f}), available "
                          f"{mem_available() / GiB:.1f} GiB, disk free {shutil.disk_usage(self.disk).free / GiB:.1f} GiB",
                          flush=True)
                time.sleep(SAMPLE_S)
            reader.join(timeout=10)
        self.seconds = time.time() - self.t0
        if self.phases:
            self.phases[-1]["seconds"] = round(self.seconds - self.phases[-1]["start_s"], 1)
        return self.proc.returncode

    def _sample(self) -> None:
        total: dict = {}
        for pid in descendants(self.proc.pid):
            for k, v in read_status(pid).items():
                total[k] = total.get(k, 0) + v
        if total:
            self.last = total
            for k in self.peak:
                self.peak[k] = max(self.peak[k], total.get(k, 0))
            ph = self.phases[-1]
            ph["max_rss"] = max(ph["max_rss"], total.get("VmRSS", 0))
            ph["max_anon"] = max(ph["max_anon"], total.get("RssAnon", 0) + total.get("RssShmem", 0))
            ph["max_file"] = max(ph["max_file"], total.get("RssFile", 0))
        avail = mem_available()
        self.min_available = min(self.min_available, avail)
        free = shutil.disk_usage(self.disk).free
        self.min_disk_free = min(self.min_disk_free, free)
        if self.killed:
            return
        anon = total.get("RssAnon", 0) + total.get("RssShmem", 0)
        if anon > self.mem_limit:
            self._kill(f"anonymous memory {anon / GiB:.2f} GiB passed the limit {self.mem_limit / GiB:.2f} GiB")
        elif avail < MIN_AVAILABLE:
            self._kill(f"the machine's available memory fell to {avail / GiB:.2f} GiB")
        elif free < MIN_DISK_FREE:
            self._kill(f"free disk fell to {free / GiB:.2f} GiB")
        elif self.timeout_s and time.time() - self.t0 > self.timeout_s:
            self._kill(f"timeout after {self.timeout_s / 60:.0f} min")

    def record(self) -> dict:
        return {
            "peak_rss_bytes": max(self.peak["VmHWM"], self.peak["VmRSS"]),
            "peak_anon_bytes": max((p["max_anon"] for p in self.phases), default=0),
            "peak_file_bytes": self.peak["RssFile"],
            "min_mem_available_bytes": self.min_available,
            "disk_written_peak_bytes": self.disk_free0 - self.min_disk_free,
            "killed_by_watchdog": self.killed,
            "phases": self.phases,
            "last_sample": self.last,
        }


def parse_time_v(path: Path) -> dict:
    """The numbers /usr/bin/time -v wrote."""
    if not path.is_file():
        return {}
    text = path.read_text()
    out = {}
    pats = {"max_rss_kbytes": r"Maximum resident set size \(kbytes\): (\d+)", "user_s": r"User time \(seconds\): ([\d.]+)",
            "system_s": r"System time \(seconds\): ([\d.]+)", "exit_status": r"Exit status: (\d+)",
            "signal": r"Command terminated by signal (\d+)", "major_faults": r"Major .*page faults: (\d+)",
            "wall": r"Elapsed \(wall clock\) time .*: ([\d:.]+)", "cpu_percent": r"Percent of CPU this job got: (\d+)%"}
    for k, p in pats.items():
        m = re.search(p, text)
        if m:
            out[k] = m.group(1) if k == "wall" else float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return out


# ------------------------------------------------------------------------------------------------ a shape


def pipeline_yaml(shape: Shape, model: str, nsamples: int, seq_len: int, offload: str | None = None) -> str:
    lines = [f"name: scale-{shape.name}", f"model: {model}", "seed: 0", "data: {calibration: zoo:austen}"]
    if offload:
        lines.append(f"offload: {offload}")
    if shape.eval:
        lines.append("eval: {perplexity: [zoo:austen], seq_len: 512, max_tokens: 20480}")
    lines += ["stages:", f"  - gptq: {{bits: 4, group_size: 128, nsamples: {nsamples}, seq_len: {seq_len}}}"]
    return "\n".join(lines) + "\n"


def child_env(src: Path) -> dict:
    """The environment of every child; children also run with cwd=src, as `python -m` puts the cwd first on sys.path."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(src))


def check_src(src: Path, env: dict) -> str:
    """Where a child imports compress from; it must be `src` (not an editable install elsewhere, not the cwd)."""
    out = subprocess.run([sys.executable, "-c", "import compress; print(compress.__file__)"], env=env, cwd=src,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(src):
        raise SystemExit(f"children import compress from {out}, not from --src {src}")
    return out


def ensure_model(shape: Shape, work: Path, seed: int, env: dict) -> tuple[Path, dict]:
    """The checkpoint folder of a shape, written (in a child process) unless one of the same spec and seed is there."""
    if shape.zoo:
        out = subprocess.run([sys.executable, "-c", f"from compress import zoo; print(zoo.model_path({shape.zoo!r}))"],
                             env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True, check=True)
        folder = Path(out.stdout.strip().splitlines()[-1])
        return folder, {"zoo": shape.zoo, "disk_bytes": disk_bytes(folder)}
    folder = work / "models" / shape.name
    marker = work / "models" / f"{shape.name}.json"
    spec = {"shape": dataclasses.asdict(shape), "seed": seed, "std": STD, "shard_bytes": SHARD_BYTES}
    if marker.is_file() and folder.is_dir():
        info = json.loads(marker.read_text())
        if info.get("spec") == spec:
            return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    marker.unlink(missing_ok=True)
    print(f"[{shape.name}] writing the checkpoint to {folder}", flush=True)
    subprocess.run([sys.executable, __file__, "--generate", shape.name, "--into", str(folder), "--seed", str(seed)],
                   env=env, cwd=env["PYTHONPATH"], check=True)
    info = json.loads((work / "models" / f"{shape.name}.written.json").read_text())
    (work / "models" / f"{shape.name}.written.json").unlink()
    info["spec"] = spec
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return folder, info


def plan_json(yaml_path: str) -> None:
    """Print the planner's StagePlans for the pipeline on this machine as JSON (run in a child with --src)."""
    from compress import config, memory, pipeline, planner

    pipe = config.load(yaml_path)
    dev = memory.machine(pipeline.pick_device(pipe.device))
    plans = planner.plan(pipe, pipeline.source_of(pipe, weights=False).config, dev)
    print(json.dumps({"device_bytes": dev.bytes, "plans": [p.to_dict() for p in plans]}, default=str))


def git_state(src: Path) -> dict:
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def read_manifests(run_dir: Path) -> list[dict]:
    out = []
    for mf in sorted(run_dir.glob("[0-9][0-9]-*/manifest.json")):
        m = json.loads(mf.read_text())
        acc = (m.get("accuracy") or {}).get("perplexity") or {}
        stats = m.get("stats") or {}
        out.append({
            "folder": m["folder"], "stage": m["stage"], "seconds": m.get("seconds"), "format": m.get("format"),
            "memory": m.get("memory"), "size": m.get("size"),
            "bits_per_weight_quantized": stats.get("bits_per_weight"), "bits_per_param_model": stats.get("bits_per_param_model"),
            "layer_seconds": [layer["seconds"] for layer in stats.get("layers", [])],
            "round_trip_rel_error": (m.get("round_trip") or {}).get("max_rel_error"),
            "perplexity": {k: v.get("value") for k, v in acc.items()},
            "disk_bytes": disk_bytes(mf.parent),
        })
    return out


def run_shape(shape: Shape, a, src: Path, env: dict) -> dict:
    work = a.work
    model, model_info = ensure_model(shape, work, a.seed, env)
    model_spec = f"zoo:{shape.zoo}" if shape.zoo else str(model)
    rdir = work / "runs" / a.label / shape.name
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    out_root = rdir / "out"
    yaml_text = pipeline_yaml(shape, model_spec, a.nsamples, a.seq_len, a.offload)
    yaml_path = rdir / "pipeline.yaml"
    yaml_path.write_text(yaml_text)
    cli = [sys.executable, "-m", "compress.cli"]

    plan_txt = subprocess.run([*cli, "plan", str(yaml_path)], env=env, cwd=src, capture_output=True, text=True)
    plan_num = subprocess.run([sys.executable, __file__, "--plan-json", str(yaml_path)], env=env, cwd=src,
                              capture_output=True, text=True, check=True)
    plans = json.loads(plan_num.stdout.strip().splitlines()[-1])
    dry = subprocess.run([*cli, "run", str(yaml_path), "--out", str(out_root), "--dry-run"], env=env, cwd=src,
                         capture_output=True, text=True)
    refused = dry.returncode != 0
    force = refused and not a.no_force
    record = {
        "shape": dataclasses.asdict(shape), "model": model_spec, "model_info": model_info,
        "input_disk_bytes": model_info.get("disk_bytes") or disk_bytes(model),
        "pipeline_yaml": yaml_text, "nsamples": a.nsamples, "seq_len": a.seq_len,
        "plan": {"text": plan_txt.stdout.strip(), "rc": plan_txt.returncode, **plans},
        "dry_run": {"rc": dry.returncode, "output": (dry.stdout + dry.stderr).strip()[-2000:]},
        "forced": force, "src": str(src), "git": git_state(src), "compress_imported_from": check_src(src, env),
        "commands": {
            "plan": f"cd {src} && PYTHONPATH={src} python -m compress.cli plan {yaml_path}",
            "run": f"cd {src} && PYTHONPATH={src} /usr/bin/time -v python -m compress.cli run {yaml_path} --out {out_root} "
                   "--quiet" + (" --force" if force else ""),
        },
        "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if refused and a.no_force:
        record["outcome"] = "refused by the planner (not run: --no-force)"
        return record
    time_file = rdir / "time-v.txt"
    cmd = ["/usr/bin/time", "-v", "-o", str(time_file), *cli, "run", str(yaml_path), "--out", str(out_root), "--quiet"]
    if force:
        cmd.append("--force")
    print(f"[{shape.name}] {' '.join(cmd)}  (log: {rdir / 'run.log'})", flush=True)
    w = Watched(cmd, env, rdir / "run.log", work, a.mem_limit, a.timeout_min * 60 if a.timeout_min else None)
    rc = w.run()
    tv = parse_time_v(time_file)
    record.update(rc=rc, wall_s=round(w.seconds, 1), time_v=tv, watch=w.record(), load_after=os.getloadavg())
    run_dir = out_root / f"scale-{shape.name}"
    record["stages"] = read_manifests(run_dir)
    record["partial_disk_bytes"] = {p.name: disk_bytes(p) for p in sorted(run_dir.glob(".*"))} if run_dir.is_dir() else {}
    tail = [l for l in w.lines if l.strip()][-15:]
    record["log_tail"] = tail
    if rc == 0:
        record["outcome"] = "ok"
    elif w.killed:
        record["outcome"] = f"killed by the watchdog in phase '{w.phase}': {w.killed}"
    elif tv.get("signal"):
        record["outcome"] = (f"killed by signal {tv['signal']} in phase '{w.phase}'" +
                             (" (SIGKILL from outside the run: the kernel's OOM killer?)" if tv["signal"] == 9 else ""))
    else:
        errors = [l for l in tail if l.startswith("error:") or "Error" in l]
        record["outcome"] = f"exit {rc} in phase '{w.phase}': " + (errors[-1] if errors else tail[-1] if tail else "")
    keep = rdir / "kept"
    keep.mkdir()
    for mf in run_dir.glob("[0-9][0-9]-*/manifest.json") if run_dir.is_dir() else []:
        shutil.copy2(mf, keep / f"{mf.parent.name}.manifest.json")
    if not a.keep_outputs:
        shutil.rmtree(out_root, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------------------------ results


def machine() -> dict:
    from importlib import metadata

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    swap = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SwapTotal:"):
                swap = int(line.split()[1]) * 1024
    versions = {}
    for pkg in ("torch", "transformers", "safetensors", "tokenizers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "swap_bytes": swap, "gpu": None,
            "python": platform.python_version(), "kernel": platform.release(), **versions}


def fmt_b(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 120 else f"{max(s, 0) + 0.0:.0f} s"


def predicted_process_peak(rec: dict) -> tuple[int | None, int | None]:
    """(the gptq stage's planned peak, the largest planned peak of any step of the run), bytes with the overhead."""
    plans = (rec.get("plan") or {}).get("plans") or []
    stage = next((p["peak_bytes"] for p in plans if p["stage"] == "gptq"), None)
    every = max((max(p["peak_bytes"], p.get("eval_peak_bytes") or 0) for p in plans), default=None)
    return stage, every


def render(results: dict) -> str:
    L = ["# GPTQ at scale: time, memory and disk of `compress run` at three Llama shapes", "",
         "Written by [`bench/scale.py`](../scale.py) (its docstring says how checkpoints are generated and how memory "
         "is watched). Each shape: random float32 weights of the real shapes (seeded, normal(0, 0.02), norms 1; "
         "time and memory do not depend on the values), one pipeline with one stage "
         "`gptq: {bits: 4, group_size: 128, nsamples: N, seq_len: 512}` calibrated on zoo:austen, run as its own "
         "process `compress run` (base 00-base, then 01-gptq) under `/usr/bin/time -v` and a watchdog that samples "
         "/proc every 0.1 s; `135m-zoo` is the same on the real SmolLM2-135M-Instruct weights, with an eval block "
         "(perplexity on the zoo:austen test split, 512-token windows, 20480 tokens).", "",
         "Columns: *wall* = the whole `compress run` process; *peak RSS* = largest sampled VmHWM of the process "
         "(resident memory including the page cache of memory-mapped weights); *anon* = largest sampled anonymous "
         "memory (what cannot be paged out: there is no swap); *time -v* = /usr/bin/time's maximum RSS, which can understate the "
         "peak (compress.measure.PeakMemory resets the high-water mark with clear_refs; the kernel's rusage keeps an "
         "earlier peak only if a thread exited after it); *planned* = `compress plan`'s peak for the gptq stage (input weights + growth + 400 MiB "
         "process) and, after the slash, the largest planned peak of any step of the run (base load, eval); "
         "*disk in* = the input checkpoint, *00-base* = the copy the base step writes, *out* = the gptq stage's "
         "folder; *bits/weight* = gptq folder bytes x 8 / parameters (every byte on disk, embeddings included), "
         "then the quantized linears' own (qweight + qzeros + scales + g_idx).", ""]
    for label, shapes in results.get("runs", {}).items():
        recs = list(shapes.values())
        if not recs:
            continue
        m = recs[0].get("machine") or {}
        codes: dict[str, list] = {}  # one run label may hold shapes run on different commits
        for name, r in shapes.items():
            git = r.get("git") or {}
            code = f"{r.get('src')} at {(git.get('commit') or '?')[:10]}" + (" (uncommitted changes)" if git.get("dirty") else "")
            codes.setdefault(code, []).append(name)
        code = next(iter(codes)) if len(codes) == 1 else "; ".join(f"{', '.join(v)}: {k}" for k, v in codes.items())
        L += [f"## {label}", "",
              f"Code: {code}. "
              f"Machine: {m.get('cpu')}, {m.get('cores')} cores (shared), {fmt_b(m.get('ram_bytes'))} RAM, swap "
              f"{fmt_b(m.get('swap_bytes'))}, no GPU; torch {m.get('torch')}, transformers {m.get('transformers')}, "
              f"Python {m.get('python')}.", "",
              "| shape | params | nsamples x seq_len | outcome | wall | gptq stage | peak RSS | anon | time -v | planned | "
              "disk in | 00-base | out | bits/weight | ppl base -> gptq |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in shapes.items():
            st = {s["stage"]: s for s in r.get("stages", [])}
            g, b = st.get("gptq") or {}, st.get("base") or {}
            params = (r.get("model_info") or {}).get("params") or (b.get("size") or {}).get("params")
            w = r.get("watch") or {}
            pstage, pall = predicted_process_peak(r)
            tv = r.get("time_v") or {}
            bpw = (g.get("size") or {}).get("bits_per_weight")
            bpw_q = g.get("bits_per_weight_quantized")
            bits = f"{bpw:.2f} / {bpw_q:.2f}" if bpw and bpw_q else "-"
            ppl = "-"
            if b.get("perplexity") and g.get("perplexity"):
                ppl = ", ".join(f"{b['perplexity'][k]:.2f} -> {g['perplexity'].get(k, float('nan')):.2f}"
                                for k in b["perplexity"])
            outcome = r.get("outcome", "?")
            L.append(
                f"| {name} | {params / 1e9:.3f}B | {r.get('nsamples')} x {r.get('seq_len')} | "
                f"{'ok' if outcome == 'ok' else 'FAILED (below)'}{' (--force)' if r.get('forced') else ''} | "
                f"{fmt_s(r.get('wall_s'))} | {fmt_s(g.get('seconds'))} | {fmt_b(w.get('peak_rss_bytes'))} | "
                f"{fmt_b(w.get('peak_anon_bytes'))} | {fmt_b(tv['max_rss_kbytes'] * 1024) if 'max_rss_kbytes' in tv else '-'} | "
                f"{fmt_b(pstage)} / {fmt_b(pall)} | {fmt_b(r.get('input_disk_bytes'))} | {fmt_b(b.get('disk_bytes'))} | "
                f"{fmt_b(g.get('disk_bytes'))} | "
                f"{bits} | {ppl} |"
                if params else f"| {name} | - | - | {outcome} | | | | | | | | | | | |")
        ok = [(n, r) for n, r in shapes.items() if r.get("outcome") == "ok" and not (r["shape"].get("zoo"))]
        if len(ok) >= 2:
            L += ["", "How they grow (generated shapes that finished; ratios to the smallest):", "",
                  "| shape | params | x params | wall | x wall | gptq stage | x gptq | s per layer | peak RSS | peak RSS / input weights | anon | anon / input weights |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            p0 = w0 = g0 = None
            for name, r in ok:
                st = {s["stage"]: s for s in r.get("stages", [])}
                params = r["model_info"]["params"]
                wbytes = r["model_info"]["tensor_bytes"]
                gs = st["gptq"]["seconds"]
                p0, w0, g0 = p0 or params, w0 or r["wall_s"], g0 or gs
                layers = r["shape"]["layers"]
                w = r["watch"]
                L.append(f"| {name} | {params / 1e9:.3f}B | {params / p0:.1f} | {fmt_s(r['wall_s'])} | {r['wall_s'] / w0:.1f} | "
                         f"{fmt_s(gs)} | {gs / g0:.1f} | {gs / layers:.1f} | {fmt_b(w['peak_rss_bytes'])} | "
                         f"{w['peak_rss_bytes'] / wbytes:.2f} | {fmt_b(w['peak_anon_bytes'])} | {w['peak_anon_bytes'] / wbytes:.2f} |")
        for name, r in shapes.items():
            w = r.get("watch") or {}
            L += ["", f"### {label} / {name}: {r.get('outcome', '?')}", ""]
            if r.get("forced"):
                L += ["The planner refused the run (`compress run --dry-run`); it was run with `--force`:", "",
                      "```", r["dry_run"]["output"], "```", ""]
            L += ["Commands:", "", "```", f"# {r['model']}", r["pipeline_yaml"].rstrip(), "",
                  r["commands"]["plan"], r["commands"]["run"], "```", ""]
            if w.get("phases"):
                L += [f"Phases (cut at the log lines of `compress run`; RSS sampled every 0.1 s; load average "
                      f"{', '.join(f'{x:.1f}' for x in r.get('load_before', []))} before, "
                      f"{', '.join(f'{x:.1f}' for x in r.get('load_after', []))} after; CPU "
                      f"{(r.get('time_v') or {}).get('cpu_percent', '?')}% of one core):", "",
                      "| phase | start | time | max RSS | max anon | max file-backed |", "|---|---|---|---|---|---|"]
                for p in w["phases"]:
                    seen = p["max_rss"] > 0  # a phase shorter than one sample has no memory reading
                    L.append(f"| {p['phase']} | {p['start_s']:.0f} s | {fmt_s(p['seconds'])} | "
                             f"{fmt_b(p['max_rss'] if seen else None)} | {fmt_b(p['max_anon'] if seen else None)} | "
                             f"{fmt_b(p['max_file'] if seen else None)} |")
                L += ["", f"Machine's lowest MemAvailable during the run: {fmt_b(w.get('min_mem_available_bytes'))}; "
                      f"disk written at most: {fmt_b(w.get('disk_written_peak_bytes'))}."]
            for s in r.get("stages", []):
                mem = s.get("memory") or {}
                L.append(f"- {s['folder']}: {fmt_s(s.get('seconds'))}, manifest memory: predicted growth "
                         f"{fmt_b(mem.get('predicted_peak_bytes'))}, measured growth {fmt_b(mem.get('measured_peak_bytes'))} "
                         f"over {fmt_b(mem.get('weights_bytes'))} of weights ({mem.get('method')}); disk "
                         f"{fmt_b(s.get('disk_bytes'))}")
            if r.get("outcome") != "ok":
                L += ["", "Last lines of the log:", "", "```", *r.get("log_tail", []), "```"]
                if r.get("partial_disk_bytes"):
                    L.append("Left in the run folder: " + ", ".join(f"{k} {fmt_b(v)}" for k, v in r["partial_disk_bytes"].items()))
        for note in (results.get("notes") or {}).get(label, []):
            L += ["", note]
        L.append("")
    gen = results.get("generator")
    if gen:
        L += ["## The generated checkpoints", "", gen, ""]
    return "\n".join(L) + "\n"


GENERATOR_NOTE = (
    "`write_checkpoint` builds the LlamaConfig, takes every tensor's name and shape from a meta-device "
    "LlamaForCausalLM (no memory), and streams seeded normal(0, 0.02) tensors (norms 1, the pad row of the "
    "embedding 0) into safetensors shards of at most 2 GiB, one tensor in RAM at a time, with "
    "model.safetensors.index.json when there are several shards (135M: one model.safetensors, as save_pretrained "
    "writes it; 1.7B: 4 shards; 8B: 16 shards, the 1.96 GiB embedding and lm_head each alone); config.json, "
    "generation_config.json. Tokenizers: the 49152 shapes copy zoo:smollm2-135m's tokenizer files; the 128256 "
    "shape gets a byte-level BPE trained on the train splits of zoo:austen and zoo:shakespeare (it learns "
    "~55k tokens), padded with never-produced `<|unused_N|>` ids to 128000, then <|begin_of_text|> (BOS, 128000), "
    "<|end_of_text|> (EOS, 128001) and 254 reserved special tokens. `python bench/scale.py --self-test` writes "
    "two tiny shapes (tied / untied, both tokenizers), loads them with from_pretrained (no missing or unexpected "
    "keys) and compares every tensor with the generator.")


def merge_and_write(label: str, shape: str, rec: dict, out: Path) -> dict:
    path = out / "scale.json"
    results = json.loads(path.read_text()) if path.is_file() else {"benchmark": "bench/scale.py", "runs": {}}
    results.setdefault("runs", {}).setdefault(label, {})[shape] = rec
    results["generator"] = GENERATOR_NOTE
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "scale.md").write_text(render(results))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--label", default=None, help="results key for this run (e.g. before, after); default: the "
                    "source's git commit")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--offload", choices=["auto", "never", "always"], default=None,
                    help="the pipeline's offload setting (default: none written, i.e. auto)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    ap.add_argument("--work", type=Path, default=REPO.parent / "scale-data",
                    help="checkpoints, run folders and logs (outside the repository)")
    ap.add_argument("--src", type=Path, default=REPO, help="the compress source tree to run (default: this checkout)")
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="kill a run whose anonymous memory passes this many GiB (default: 85%% of RAM)")
    ap.add_argument("--timeout-min", type=float, default=0, help="kill a run after this many minutes (0: never)")
    ap.add_argument("--no-force", action="store_true", help="do not run what the planner refuses")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the run folders (00-base, 01-gptq)")
    ap.add_argument("--drop-models", action="store_true", help="delete each generated checkpoint after its run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[], help="a paragraph for this label's section of scale.md")
    ap.add_argument("--self-test", action="store_true", help="check the generator on tiny shapes and exit")
    ap.add_argument("--render-only", action="store_true", help="run nothing: store --note under --label and "
                    "rewrite scale.md from scale.json")
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)   # child: write one shape's checkpoint
    ap.add_argument("--into", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-json", default=None, help=argparse.SUPPRESS)  # child: the planner's numbers
    a = ap.parse_args(argv)

    if a.self_test:
        self_test()
        return
    if a.generate:
        tmp = a.into.with_name(a.into.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        info = write_checkpoint(SHAPES[a.generate], tmp, a.seed)
        tmp.rename(a.into)
        info["disk_bytes"] = disk_bytes(a.into)
        a.into.with_name(f"{a.generate}.written.json").write_text(json.dumps(info) + "\n")
        print(f"[{a.generate}] {info['params']:,} params, {info['shards']} shard(s), {fmt_b(info['disk_bytes'])}, "
              f"{info['seconds']} s", flush=True)
        return
    if a.plan_json:
        plan_json(a.plan_json)
        return
    if a.render_only:
        path = a.out / "scale.json"
        results = json.loads(path.read_text())
        if not a.label:
            ap.error("--render-only needs --label")
        if a.note:
            results.setdefault("notes", {})[a.label] = a.note
        results["generator"] = GENERATOR_NOTE
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        (a.out / "scale.md").write_text(render(results))
        print(f"wrote {a.out / 'scale.md'}")
        return

    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    src = a.src.resolve()
    env = child_env(src)
    check_src(src, env)
    git = git_state(src)
    a.label = a.label or (git["commit"] or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024
    a.mem_limit = int(a.mem_limit_gb * GiB) if a.mem_limit_gb else int(0.85 * ram)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"label {a.label}; compress from {src} ({git}); work {a.work}; anonymous memory limit "
          f"{fmt_b(a.mem_limit)}", flush=True)
    results = {}
    for name in shapes:
        shape = SHAPES[name]
        rec = run_shape(shape, a, src, env)
        rec["machine"] = machine()
        rec["bench_command"] = " ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
        results = merge_and_write(a.label, name, rec, a.out)
        if a.note:
            results.setdefault("notes", {})[a.label] = a.note
            (a.out / "scale.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
            (a.out / "scale.md").write_text(render(results))
        w = rec.get("watch") or {}
        print(f"[{name}] {rec['outcome']}; wall {fmt_s(rec.get('wall_s'))}, peak RSS {fmt_b(w.get('peak_rss_bytes'))}, "
              f"anon {fmt_b(w.get('peak_anon_bytes'))}", flush=True)
        if a.drop_models and not shape.zoo:
            shutil.rmtree(a.work / "models" / name, ignore_errors=True)
            (a.work / "models" / f"{name}.json").unlink(missing_ok=True)
    print(f"wrote {a.out / 'scale.json'} and {a.out / 'scale.md'}")


if __name__ == "__main__":
    main()
