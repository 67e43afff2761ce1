"""The kit's command lines, shared by every family's `examples/models/<family>/run_pa.py`.

- `entry`: what every entry point shares (run_pa, modeltest, `python -m atb_models.benchmark`, `python -m
  atb_models.demo`, tools/measure_load_memory.py): the log format, and a user error, a lost rank, Ctrl-C or
  SIGTERM turned into one line and an exit status.
- `choices`: the values --device and --dtype accept.
- `run_pa`: run_pa's flags and `main`; it imports neither torch nor the engine, so `--help` is instant.
- `infer`: the run itself (inputs checked before the model loads, the warm-up, the requests, the report).
- `inputs` and `results`: the requests a run makes of its flags, and what it prints and writes of their answers.

The benchmark's part of a run (the untimed warm-up, the CSV, the --performance sweep) is
`atb_models.benchmark.timed_runs`.
"""
