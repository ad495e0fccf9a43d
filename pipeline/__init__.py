"""kdpipe library: datasets, teachers, the feature store, the student, losses, training and metrics.

Never imports typer, never reads params.yaml, never calls sys.exit: the command line lives in `stages`.
"""

from pipeline.errors import ConfigError, InputError, KdpipeError

__all__ = ["KdpipeError", "ConfigError", "InputError"]
