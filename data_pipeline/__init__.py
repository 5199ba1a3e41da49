"""Data pipeline: sentencepiece tokenizer, Megatron MMIDIDX v1 datasets, GrowLength stage samples."""
