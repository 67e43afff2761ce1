"""`python -m atb_models.serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.

- `__main__`: the flags (run_pa's engine flags plus the server's) and `main`; torch-free, so --help is instant.
- `server`: one process's part: rank 0 binds the port and runs uvicorn, the other ranks follow its steps.
- `app`: the FastAPI app: /v1/chat/completions (whole or streamed), /v1/models, /health, /metrics.
- `engine`: the thread that owns the LLM, and the step plans rank 0 broadcasts under torchrun.
- `protocol`: OpenAI's wire format (request checks, answer, chunk and error bodies); `media`: data: and file:// urls.
- `metrics`: the Prometheus metrics.
"""
