"""The exceptions a user may see. The CLI prints their message as one line and exits with code 2.

Raise them for anything the user can fix (a bad file, a wrong parameter, a mismatched checkpoint);
let programming errors surface as ordinary exceptions with a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KdpipeError(Exception):
    """A problem with the user's input, described in one line that names the item and what was expected."""


class ConfigError(KdpipeError):
    """A parameter that is unknown, of the wrong type, or outside its allowed values."""


class InputError(KdpipeError):
    """A file or record that is missing, corrupt or inconsistent (an image, a caption, a checkpoint, a store)."""


@contextmanager
def reading_file(path: object, what: str, todo: str) -> Iterator[None]:
    """Around a library's read of a file or directory the user handed kdpipe (a model's weights or config, a
    Zarr array's metadata): whatever the library raises about the bytes it found there (safetensors'
    SafetensorError on a truncated file, transformers' OSError or ValueError on a config.json that is not
    JSON, zarr's JSONDecodeError or TypeError) becomes one InputError, "<path>: cannot be read as <what>
    (<the library's words>); <todo>". A KdpipeError raised inside, and a failure of the machine (permission,
    disk, memory: pipeline/system_errors.py maps those), pass through as they are."""
    from pipeline.system_errors import environment_error  # that module builds on this one

    try:
        yield
    except KdpipeError:
        raise
    except Exception as err:  # noqa: BLE001 -- any library failure on the user's bytes is a bad file
        if environment_error(err) is not None:
            raise
        words = " ".join(str(err).split())  # a library's message may run over several lines
        raise InputError(f"{path}: cannot be read as {what} ({type(err).__name__}: {words}); {todo}") from None
