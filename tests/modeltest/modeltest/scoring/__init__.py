"""Scorers: TextVQA's soft accuracy (`vqa`) and VideoBench's option-letter extraction (`choice`)."""
