"""modeltest: the accuracy harness of atb_models (TextVQA and VideoBench on Qwen2-VL), run by scripts/mm_run.sh."""
