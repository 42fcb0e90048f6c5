"""Where a model comes from: a spec (local folder, HF hub id, `zoo:NAME`, `tiny:CONFIG.json`) resolved once.

    src = sources.resolve("zoo:smollm2-135m")      # checks it can be had, before any work: one-line errors
    src.config                                     # config.json as a dict (no weight read): the planner's input
    src.hash                                       # content hash (files; tiny: config text + seed), computed once
    model, tok = src.load(device)                  # the model and its tokenizer

`tiny:` builds the architecture of a config.json with seeded random weights and a byte-level tokenizer
(compress/tiny.py); `zoo:` is a packaged model converted once into a cache folder (compress/zoo.py); a hub id is
fetched into the HF cache (safetensors, config and tokenizer files only), or found there when offline.
Everything else in the package takes a Source or a checkpoint folder, never a spec string.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from compress import checkpoint
from compress.errors import CompressError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Source:
    spec: str                      # as the user wrote it
    path: Path                     # the checkpoint folder, or the tiny config file
    tiny: bool                     # random weights built from a config (path is the config.json)
    config: dict                   # config.json as a dict, read without loading a weight
    seed: int = 0                  # tiny: the weights' seed (part of the model's identity)
    allow_pickle: bool = False     # let a folder with only pickled .bin weights load (unpickling can run code)
    trust_remote_code: bool = False
    _hash: str | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """sha256 of what defines the model: its files (checkpoint.content_hash), or a tiny config's text + seed."""
        if self._hash is None:
            if self.tiny:
                blob = json.dumps({"tiny": self.path.read_text(), "seed": self.seed}, sort_keys=True)
                self._hash = hashlib.sha256(blob.encode()).hexdigest()
            else:
                self._hash = checkpoint.content_hash(self.path)
        return self._hash

    def load(self, device="cpu"):
        """(model, tokenizer) in eval mode on `device`."""
        if self.tiny:
            from compress import tiny

            model, tok = tiny.build(self.path, seed=self.seed)
            return model.to(device), tok
        return checkpoint.load(self.path, device=device, allow_pickle=self.allow_pickle,
                               trust_remote_code=self.trust_remote_code)


def resolve(spec: str, *, seed: int = 0, allow_pickle: bool = False, trust_remote_code: bool = False,
            weights: bool = True) -> Source:
    """A Source for `spec`, or one line saying why it cannot be had (before any work starts). weights=False: a
    folder holding only config.json is accepted (what planning needs), but such a Source cannot load."""
    if spec.startswith("tiny:"):
        from compress import tiny

        path = Path(spec[5:])
        path = path if path.is_file() else REPO / path
        if not path.is_file():
            raise CompressError(f"model {spec!r}: tiny config {spec[5:]} not found")
        return Source(spec, path, True, tiny.read_config(path), seed=seed)
    folder = folder_of(spec)
    config = checkpoint.check_folder(folder, allow_pickle, weights=weights)
    return Source(spec, folder, False, config, seed=seed, allow_pickle=allow_pickle,
                  trust_remote_code=trust_remote_code)


def folder_of(spec: str) -> Path:
    """The local folder of a local path, `zoo:NAME` or HF hub id (downloaded when online), or a one-line error."""
    if spec.startswith("zoo:"):
        from compress import zoo

        name = spec[4:]
        if name not in zoo.MODELS:
            raise CompressError(f"model {spec!r}: not a zoo model; zoo models: {', '.join(zoo.MODELS)}")
        if not zoo.is_installed(name):
            raise CompressError(f"model {spec!r} is not installed: run `compress zoo fetch {name}`")
        return zoo.model_path(name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CompressError(f"model {spec!r} is a file; give the folder that holds config.json")
        return path
    if not looks_like_hub_id(spec):
        raise CompressError(f"model {spec!r} is neither a local folder nor a Hugging Face hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
    try:
        if hub_offline():
            return Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=True))
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        where = "the hub is offline and it is not in the local HF cache" if hub_offline() else str(e).splitlines()[0]
        raise CompressError(f"model {spec!r} is not a local folder, and {where}") from None


def hub_offline() -> bool:
    """True when the hub must not be contacted: offline env vars set, or huggingface.co unreachable in 2 s."""
    if any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return False
    except OSError:
        return True


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
