"""Training recipes. Each reads top to bottom in one file and runs from Python or the CLI."""
