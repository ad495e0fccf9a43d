"""The evaluate stage: exact retrieval metrics, the stage itself, its plots and tables."""
