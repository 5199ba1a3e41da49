"""The evidence tools: what reads a run and shows what GrowLength did (evaluate, plot, bench_lengths, compare,
export_hf). They import `launcher`, `model` and `data_pipeline`; the runtime never imports them.
"""
