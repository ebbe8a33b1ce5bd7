"""GPT-2 in plain PyTorch: configuration, architecture, KV cache, weights, tokenizer, sampling.

Nothing here imports FastAPI or asyncio; the package can be used from a notebook or a script.
"""
