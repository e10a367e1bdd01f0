"""The fixed laboratory: datasets, tokenizer, train-split loader, time budget, trusted evaluator.

Agents never edit this package. Importing it does no work (no CUDA, no downloads).
"""
