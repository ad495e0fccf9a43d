"""Your own teacher, without editing kdpipe: `extract.teacher.kind: plugin`.

    extract:
      teacher:
        kind: plugin
        plugin:
          target: my_teachers.eva:EvaClipTeacher   # module:Class, importable by the extract process
          options: {checkpoint: /models/eva.pt}    # keyword arguments of the class

The class implements the Teacher interface of pipeline/teachers/base.py (subclass `Teacher`):

- attributes `name` (str), `dim` (int D) and `device` (torch.device);
- `identity() -> dict`: JSON-serializable, recorded in the feature store's `teacher` attrs: two teachers with
  equal identities must compute the same features (name, checkpoint sha256, image size, text length, dtype);
  a changed identity is what makes extract start a partial store over instead of resuming it;
- `preprocess_image(PIL RGB image) -> float32 tensor` (one image; CPU, runs in the loader workers, must not
  touch the model), `tokenize(list[str]) -> dict[str, tensor]` (CPU, loader workers);
- `encode_image_batch(stacked preprocess_image outputs on the device) -> [B, D]` and
  `encode_text_batch(tokenize output) -> [B, D]`: L2-normalized float rows.

It is built as `Class(device=torch.device, dtype=torch.dtype, **options)` (dtype: the compute dtype that
`extract.compute_dtype` resolved to; use it for autocast). kdpipe adds `plugin` = {target, module file and
its sha256} to the identity, so a store names the code that made it. For `dvc repro`, list the module's file
among the extract stage's `deps` in dvc.yaml, so that editing it reruns extract (docs/teachers.md,
"Your own teacher").
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError
from pipeline.hashing import sha256_file
from pipeline.teachers import PluginTeacherConfig
from pipeline.teachers.base import Teacher

KEY = "extract.teacher.plugin.target"


def load_plugin(
    cfg: PluginTeacherConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Teacher:
    """Import `cfg.target`, build it with `cfg.options`, check it is a Teacher; every failure is one line."""
    if not cfg.target:
        raise InputError(f"{KEY}: not set; expected 'module:ClassName' of a Teacher subclass")
    module_name, class_name = cfg.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"{KEY}: cannot import {module_name!r} ({err}); is its directory on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls) or not issubclass(cls, Teacher):
        what = "not found" if cls is None else "not a subclass of pipeline.teachers.base.Teacher"
        raise InputError(f"{KEY}: {cfg.target}: {what}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise InputError(f"{KEY}: {cfg.target} does not implement {missing}")
    try:
        teacher = cls(device=torch.device(device), dtype=dtype, **cfg.options)
    except TypeError as err:
        raise InputError(
            f"{KEY}: {cfg.target}(device=, dtype=, **extract.teacher.plugin.options) failed: {err}"
        ) from None
    for attr, kind in (("name", str), ("dim", int), ("device", torch.device)):
        if not isinstance(getattr(teacher, attr, None), kind):
            raise InputError(f"{KEY}: {cfg.target} has no {attr} of type {kind.__name__} (the Teacher interface)")
    return _Recorded(teacher, cfg.target, Path(inspect.getfile(module)))


class _Recorded(Teacher):
    """The plug-in teacher itself, its identity extended by the target and the module file's sha256."""

    def __init__(self, inner: Teacher, target: str, module_file: Path) -> None:
        self.inner = inner
        self.name, self.dim, self.device = inner.name, int(inner.dim), inner.device
        self._plugin = {"target": target, "file": module_file.name, "sha256": sha256_file(module_file)}

    def identity(self) -> dict[str, Any]:
        own = self.inner.identity()
        if not isinstance(own, dict):
            raise InputError(f"{KEY}: {self._plugin['target']}.identity() returned {type(own).__name__}, not a dict")
        return {**own, "kind": "plugin", "plugin": self._plugin}

    def __getattr__(self, name: str) -> Any:  # anything else the plug-in offers (preprocess_image_uint8, ...)
        if name == "inner":  # not set yet (an unpickled copy): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def preprocess_image(self, image):
        return self.inner.preprocess_image(image)

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def token_lengths(self, texts):
        return self.inner.token_lengths(texts)

    def encode_image_batch(self, pixels):
        return self.inner.encode_image_batch(pixels)

    def encode_text_batch(self, tokens):
        return self.inner.encode_text_batch(tokens)


__all__ = ["load_plugin"]
