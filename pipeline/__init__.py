"""kdpipe library: datasets, teachers, the feature store, the student, losses, training and metrics.

Never imports typer, never reads params.yaml, never calls sys.exit: the command line lives in `stages`.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import ConfigError, InputError, KdpipeError

try:  # one source of truth: the version in pyproject.toml, as installed
    __version__ = version("kdpipe")
except PackageNotFoundError:  # a checkout on sys.path that was never pip-installed
    __version__ = "0+unknown"

__all__ = ["KdpipeError", "ConfigError", "InputError", "__version__"]
