"""Shared fixtures: a tiny corpus and a sentencepiece model trained on it (once per session)."""
