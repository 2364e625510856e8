"""Python hooks that the generated lm-eval task YAMLs name with ``!function``."""
