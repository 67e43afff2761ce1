"""Qwen2-VL: run_pa.py (the CLI) and run_pa.sh (its launcher)."""
