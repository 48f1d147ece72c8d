"""Trains a byte-level BPE tokenizer (GPT-2 style) on local text files with the ``tokenizers`` library, in seconds
to minutes; the result is a ``tokenizer.json`` that ``python -m moe_dist.prepare --tokenizer`` reads. Any other
local Hugging Face ``tokenizer.json`` works there too; this is for corpora without one.

    python scripts/train_tokenizer.py "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"/*.py \\
        --vocab-size 4096 --out data/tokenizer.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="UTF-8 text files to learn the merges from")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--eos-token", default="<|endoftext|>", help="the end-of-document token (id 0)")
    parser.add_argument("--out", required=True, help="tokenizer.json to write")
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"train_tokenizer: error: not a file: {missing[0]}", file=sys.stderr)
        sys.exit(2)
    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=[args.eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(args.files, trainer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    print(
        f"{args.out}: byte-level BPE, {tokenizer.get_vocab_size():,} ids ({args.eos_token} = "
        f"{tokenizer.token_to_id(args.eos_token)}), from {len(args.files)} files in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
