"""A model stage's output as a llama.cpp GGUF file, for llama.cpp, Ollama and LM Studio.

    python -m tools.export_gguf runs/smol/learn allo.gguf                 # f16
    python -m tools.export_gguf runs/default/learn allo-q8.gguf --type q8_0

The folder's model (Llama, Qwen2 or Qwen3) with its tokenizer (a byte-level BPE tokenizer.json or a
SentencePiece tokenizer.model with the identity normalizer, as Llama 2's), special ids and chat
template; bookkeeping/gguf_io.py says what is written how. Needs the `gguf`
package (pip install gguf), llama.cpp's own writer. Bad input: one line, exit status 2.
"""

import argparse
import sys

from bookkeeping.gguf_io import TYPES, folder_to_gguf
from data import DataError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a model folder train.py wrote (e.g. runs/default/learn)")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=TYPES, help="2-D weights' type (default f16; norms and "
                   "biases are f32)")
    a = p.parse_args(argv)
    try:
        folder_to_gguf(a.folder, a.out, a.type)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {a.out} ({a.type})")


if __name__ == "__main__":
    main()
