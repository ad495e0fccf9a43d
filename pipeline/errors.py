"""The exceptions a user may see. The CLI prints their message as one line and exits with code 2.

Raise them for anything the user can fix (a bad file, a wrong parameter, a mismatched checkpoint);
let programming errors surface as ordinary exceptions with a traceback.
"""


class KdpipeError(Exception):
    """A problem with the user's input, described in one line that names the item and what was expected."""


class ConfigError(KdpipeError):
    """A parameter that is unknown, of the wrong type, or outside its allowed values."""


class InputError(KdpipeError):
    """A file or record that is missing, corrupt or inconsistent (an image, a caption, a checkpoint, a store)."""
