"""The processes the benchmark starts and measures, each run as
``python -m scripts.benchlib.programs.<name> ARGS`` from the repository root (so the
project is importable). Each prints one JSON object as its last line of output."""
