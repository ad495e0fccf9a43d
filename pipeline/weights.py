"""Tensors from a file the user gave, through torch.load with weights_only=True: refusals in one line of ours.

A pickle that would build other objects than tensors and plain values (a class, a function: `os.system`) is
refused by torch's weights-only unpickler, whose message is three paragraphs that end by suggesting
`weights_only=False`, which would run the file's code. kdpipe never does that: it names the object the file
asked for and says what to do instead.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, reading_file


def refused_object(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what the file asked for (e.g. "Trying to load
    unsupported GLOBAL posix.system ..."), without the advice around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])[:200]


def unsafe_pickle(path: Path | str, what: str, err: pickle.UnpicklingError, todo: str) -> InputError:
    """The one line for a file that torch's weights-only unpickler refused."""
    return InputError(
        f"{path}: holds Python objects other than tensors ({refused_object(err)}); kdpipe reads {what} as "
        f"weights only and never runs code from a file; {todo}"
    )


def load_tensors(path: Path | str, what: str, todo: str) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; an unsafe pickle or an unreadable file (cut
    short, not a torch.save file) is one InputError naming `path`, saying it was read as `what`, and `todo`."""
    import torch

    with reading_file(path, what, todo):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # torch's text ends by suggesting weights_only=False: never shown
            if asks_for_code(err):
                raise unsafe_pickle(path, what, err, todo) from None
            raise InputError(
                f"{path}: cannot be read as {what} (no torch.save file of tensors: {refused_object(err)}); {todo}"
            ) from None


def asks_for_code(err: pickle.UnpicklingError) -> bool:
    """Whether the unpickler refused a GLOBAL (a class or function the file asks it to import, e.g. os.system),
    rather than bytes that are no pickle at all."""
    return "GLOBAL" in str(err)


__all__ = ["refused_object", "unsafe_pickle", "asks_for_code", "load_tensors"]
