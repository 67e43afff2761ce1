"""Entry points that use the atb_models kit, one folder per model family."""
