"""The serving loop: sequences, KV blocks, the scheduler, the model runner and the `LLM` front."""
