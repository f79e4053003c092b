"""Console entry points: owl-data, owl-train, owl-generate, owl-eval (see setup.py)."""
