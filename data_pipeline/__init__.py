"""Data pipeline: tokenizers (sentencepiece, Hugging Face), Megatron MMIDIDX v1 datasets, GrowLength stage samples."""
