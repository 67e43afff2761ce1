"""Qwen2.5-VL: run_pa.py (the CLI) and run_pa.sh (its launcher, which runs Qwen2-VL's with this run_pa.py)."""
