"""Random-init models of a given shape, for throughput benchmarks where the weights are not at hand.

    python benchmarks/random_models.py SRC OUT smollm2-135m,smollm2-1.7b

SRC is a model dir with config.json and tokenizer files (weights are not read), e.g. the
converted built-in SmolLM2. Each shape keeps SRC's config and tokenizer and overrides the sizes
below. Speed and memory do not depend on the weights' values, so tokens/s and memory are those
of the real model of that shape; the losses are not.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "smollm2-135m": {},  # SRC's own shape
    "smollm2-1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=64,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="dir with config.json and the tokenizer files")
    parser.add_argument("out", type=Path, help="each model goes to OUT/<shape>")
    parser.add_argument("shapes", help=f"comma-separated, from: {', '.join(SHAPES)}")
    args = parser.parse_args()
    base = AutoConfig.from_pretrained(args.src)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 1.7B on a CPU is slow
    for name in args.shapes.split(","):
        config = copy.deepcopy(base)
        for key, value in SHAPES[name].items():
            setattr(config, key, value)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        target = args.out / name
        model.save_pretrained(target)
        for file in args.src.iterdir():
            if (
                file.is_file()
                and file.name != "config.json"
                and not file.name.endswith(".safetensors")
            ):
                shutil.copy(file, target / file.name)
        print(
            f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
            f"-> {target}"
        )
        del model


if __name__ == "__main__":
    main()
