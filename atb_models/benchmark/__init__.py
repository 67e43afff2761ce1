"""Measuring the kit: the benchmark CSV of run_pa (`csv_report`; `timed_runs`: run_pa's untimed warm-up, its CSV
and the --performance sweep) and `python -m atb_models.benchmark compare`, the kit against transformers and against
the hardware's floor (`compare`, `engines`, `floors`, `presets`)."""
