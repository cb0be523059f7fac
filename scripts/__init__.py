"""scripts/ as a package, so that the benchmark (scripts/benchlib) runs the programs it
measures with ``python -m scripts.benchlib.programs.<name>`` from the repository root."""
