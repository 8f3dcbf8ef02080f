"""What every benchmark does last: write its results JSON (atomically) and say where."""

import os

from moe_dist.files import atomic_json


def save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_json(path, results, durable=False)
    print(f"wrote {path}")
