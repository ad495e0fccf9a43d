"""Loading a transformers model for a teacher, offline: where its files are, what identifies them, how to load.

Shared by every teacher kind built from a Hugging Face model (the `hf` dual encoders: CLIP, SigLIP,
SigLIP2, BLIP's ITC; the cross-encoder teachers such as BLIP's ITM), so that they resolve, identify and
load a model the same way:

- `resolve_model_dir(spec, key)`: `spec` is a local model directory (config.json + weights, what
  `save_pretrained` writes) or a hub id (`openai/clip-vit-base-patch32`) looked up in the local Hugging Face
  cache only (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub): kdpipe never downloads. A spec that is
  neither is one InputError naming the parameter and how to get the files.
- `model_identity(directory)`: what the feature store records to say which model made its rows: the sha256
  of config.json, of every weights file, and of the tokenizer and preprocessor files (they change the
  features too). Two directories with equal identities compute the same features.
- `load_model(cls, directory, key)`: `cls.from_pretrained(directory)` local-only, frozen, in eval mode;
  missing, unexpected or shape-mismatched weights are refused by name (transformers only warns).
- `load_auto(kind, directory, key)`: an AutoTokenizer / AutoProcessor / AutoImageProcessor, local-only,
  a failure named in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.hashing import sha256_file

# weights as save_pretrained writes them: one file or shards (+ the shard index, which names the shards)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")
# files that shape the inputs: a changed vocabulary or normalization changes the features as much as the weights
PROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
)


def offline() -> None:
    """Make every transformers / huggingface_hub call of this process local-only (set before they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_dir(spec: str | Path, key: str, *, cache_dir: str | Path | None = None) -> Path:
    """The local directory of model `spec`: itself if it is a directory, else the snapshot of the hub id
    `spec` in the local Hugging Face cache (`cache_dir`, default HF_HUB_CACHE). One InputError otherwise."""
    text = str(spec).strip()
    if not text:
        raise InputError(
            f"{key}: no model given (a local model directory or a hub id such as openai/clip-vit-base-patch32)"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        return _checked(path, key)
    if path.exists():
        raise InputError(f"{key}: {path} is a file; expected a model directory (config.json + weights) or a hub id")
    offline()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    where = f" in {cache_dir}" if cache_dir else " in the local Hugging Face cache (HF_HUB_CACHE)"
    try:
        found = snapshot_download(text, cache_dir=cache_dir, local_files_only=True)
    except HFValidationError:
        raise InputError(f"{key}: {text!r} is neither a directory nor a valid hub id (org/name)") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise InputError(
            f"{key}: {text} is not a local directory and not{where}; kdpipe never downloads: fetch it once "
            f"where there is a network (`hf download {text}`, or save_pretrained to a directory) and give that"
        ) from None
    return _checked(Path(found), key)


def _checked(path: Path, key: str) -> Path:
    if not (path / "config.json").is_file():
        raise InputError(f"{key}: {path} has no config.json; expected a Hugging Face model directory")
    if not weight_files(path):
        raise InputError(f"{key}: {path} has no weights (model.safetensors or pytorch_model.bin)")
    return path


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a model directory, sorted by name."""
    found = {p for pattern in WEIGHT_PATTERNS for p in Path(directory).glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def model_identity(directory: Path) -> dict[str, Any]:
    """{"config_sha256", "weights": {file: sha256}, "files": {tokenizer/processor file: sha256}} of a model
    directory (file names, not paths: the same files elsewhere are the same model)."""
    directory = Path(directory)
    return {
        "config_sha256": sha256_file(directory / "config.json"),
        "weights": {p.name: sha256_file(p) for p in weight_files(directory)},
        "files": {name: sha256_file(directory / name) for name in PROCESSING_FILES if (directory / name).is_file()},
    }


def load_model(cls: Any, directory: Path, key: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(directory)`, local-only, frozen and in eval mode; weights that do not fit the
    class (missing, unexpected, shape-mismatched) are one InputError naming them."""
    offline()
    from pipeline.towers import load_pretrained_strict

    try:
        model = load_pretrained_strict(cls, Path(directory), key, **kwargs)
    except (OSError, ValueError) as err:  # unreadable or foreign files
        raise InputError(f"{key}: {directory}: cannot load {cls.__name__} ({_first_line(err)})") from None
    return model.eval().requires_grad_(False)


def load_auto(kind: str, directory: Path, key: str, **kwargs: Any) -> Any:
    """`transformers.<kind>.from_pretrained(directory)` (AutoTokenizer, AutoProcessor, AutoImageProcessor),
    local-only; a failure is one InputError."""
    offline()
    import transformers

    try:
        return getattr(transformers, kind).from_pretrained(Path(directory), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{key}: {directory}: cannot load its {kind} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


__all__ = ["resolve_model_dir", "model_identity", "weight_files", "load_model", "load_auto", "offline"]
