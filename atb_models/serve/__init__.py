"""`python -m atb_models.serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.

- `__main__`: the flags (run_pa's engine flags plus the server's) and `main`; torch-free, so --help is instant.
- `server`: one process's part: rank 0 binds the port and runs uvicorn, the other ranks follow its steps.
- `app`: the FastAPI app: /v1/chat/completions and /v1/completions (whole or streamed), /tokenize, /detokenize,
  /v1/models, /health, /metrics.
- `engine`: the thread that owns the LLM, and the step plans rank 0 broadcasts under torchrun.
- `protocol`: the chat request's checks (and /tokenize's, /detokenize's), and the sampling fields; `fields`: the
  error shape and the field checks every body shares; `answers`: the chat answer and chunk bodies (`ChatFormat`).
- `completions`: /v1/completions' request and bodies; `tools`: function calling; `media`: data: and file:// urls.
- `metrics`: the Prometheus metrics.
"""
