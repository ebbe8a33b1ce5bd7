"""Write the benchmark models as Hugging Face folders under $GPTSERVE_PEERS.

    .venv/bin/python benchmarks/peers/make_models.py

gpt2-random: GPT-2 124M with random weights (seed 1234); tiny: 2 layers, 64 wide (seed 0), whose
forward pass is almost free, so a server's own overhead shows. Both carry GPT-2's tokenizer files
from this repository, so every server tokenizes the same way and nothing comes from a model hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from model.tokenizer import GPT2_ASSETS_DIR

MODELS = {
    "gpt2-random": (1234, GPT2Config()),
    "tiny": (0, GPT2Config(n_layer=2, n_head=2, n_embd=64)),
}


def write(folder: Path, seed: int, config: GPT2Config) -> None:
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    saved = json.loads((folder / "config.json").read_text())
    saved["n_ctx"] = config.n_positions  # llama.cpp's converter reads n_ctx
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    shutil.copy(GPT2_ASSETS_DIR / "encoder.json", folder / "vocab.json")
    shutil.copy(GPT2_ASSETS_DIR / "vocab.bpe", folder / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    if tokenizer.encode("Hello world") != [15496, 995]:
        raise SystemExit(f"{folder}: the tokenizer does not encode like GPT-2")
    tokenizer.save_pretrained(folder)


def main() -> None:
    peers = Path(os.environ.get("GPTSERVE_PEERS", Path.home() / ".cache" / "gptserve-peers"))
    for name, (seed, config) in MODELS.items():
        write(peers / name, seed, config)
        print("made", peers / name)


if __name__ == "__main__":
    main()
