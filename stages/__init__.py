"""kdpipe command line: one thin typer command per pipeline stage (see stages/cli.py)."""
