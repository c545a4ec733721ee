"""Local lm-eval task definitions (YAML) over the JSON-lines files in studies/assets/benchmarks."""
