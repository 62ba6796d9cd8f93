#!/usr/bin/env python
"""Convert between HF Llama directories (or GGUF files) and jaxft model directories.

    tools/convert_hf.py --from-hf DIR --out CKPT [--force]
    tools/convert_hf.py --to-hf CKPT --out DIR [--force] [--max-shard-size 5GB]
    tools/convert_hf.py --from-gguf FILE --out CKPT [--force]
    tools/convert_hf.py --to-gguf CKPT --out FILE.gguf [--type f32|f16|bf16|q8_0] [--force]

The same as `jaxft convert ...` (the CLI entry point, with its error handling); the logic
lives in jaxft/convert.py.
"""
import sys

from jaxft.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
