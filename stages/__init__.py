"""kdpipe command line: one thin typer command per pipeline stage (see stages/cli.py)."""

import os

# Before anything loads torch (and its OpenMP runtime, which reads this once): OpenMP threads that wait
# sleep instead of spinning. On a shared or busy machine a spinning thread steals the core its teammate
# needs, and every parallel op stalls (pipeline/runtime.py; bench/threads_bench.py measures it). A value
# the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
