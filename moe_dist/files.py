"""Small file helpers shared by data preparation, the loader and checkpoints."""

import hashlib
import os


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def aside_name(path: str, why: str) -> str:
    """<path>.<why>, or <path>.<why>-N for the first N not taken: a name to keep something
    aside under, never overwriting an earlier one."""
    aside, n = f"{path}.{why}", 1
    while os.path.exists(aside):
        aside, n = f"{path}.{why}-{n}", n + 1
    return aside
