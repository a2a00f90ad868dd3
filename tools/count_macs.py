#!/usr/bin/env python
"""Total and active parameters, and forward MACs per token per component, of a config.

    python tools/count_macs.py configs/paper/moeut_244m.yaml
    python tools/count_macs.py configs/quickstart.yaml --context 1024 model.d_model=256

Counting conventions are in moe_dist/macs.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_dist.config import load_config  # noqa: E402
from moe_dist.errors import MoeDistError  # noqa: E402
from moe_dist.macs import count, format_counts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--context", type=int, default=None, help="context length T (default data.seq_len)")
    a = p.parse_intermixed_args(argv)  # overrides before or after --context
    if a.context is not None and a.context < 1:
        p.error(f"--context must be >= 1, got {a.context}")
    try:
        cfg = load_config(a.config, a.overrides)
    except MoeDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.config}: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, ffn {cfg.model.ffn}, "
          f"attention {cfg.model.attention}")
    print(format_counts(count(cfg, a.context), cfg, a.context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
