"""Input pipeline throughput: moe_dist.data.ShardLoader against open_clip_train's webdataset pipeline.

    python -m bench.data_loader [--n 2000] [--source-size 256] [--image-size 64] [--rounds 5]

Both read the same synth shards (JPEG, --source-size px), apply open_clip's training transform at
--image-size and the same sentencepiece tokenizer, and batch 64 samples; rounds interleave the
variants. open_clip_train runs its eval-path pipeline (no shuffle buffer, so it is if anything
cheaper): its training path crashes on webdataset >= 1.0's end-of-shard marker. Our lever is PIL's
JPEG draft mode (decode at a reduced scale when the target is smaller). The ``http_w*`` rows read the
same shards through moe_dist's HTTP client from a loopback server (Python's http.server in its own
process), in exact mode like ``ours_w*``: the remote path must cost no more than 10%
(``http_vs_local_w*`` >= 0.9). Results go to bench/results/data_loader.json with
``speedup_vs_open_clip`` (min over worker counts).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types

from bench._results import save

RESULTS = os.path.join(os.path.dirname(__file__), "results", "data_loader.json")


def make_data(root: str, n: int, size: int) -> str:
    from data_tools.shard import ShardOptions, shard_items
    from data_tools.synth import synth_items

    shard_items(synth_items(n, seed=0, size=size), root, ShardOptions(per_shard=max(1, n // 8)), "bench",
                progress=False)
    return os.path.join(root, "train")


def run_ours(spec, tokenizer, transform, workers, image_size, batch=64, draft=True) -> float:
    from moe_dist.data import LoaderConfig, ShardLoader

    cfg = LoaderConfig(spec=spec, batch_size=batch, workers=workers, image_size=image_size, draft=draft)
    loader = ShardLoader(cfg, tokenizer, transform=transform)
    start = time.perf_counter()
    rows = sum(b.images.shape[0] for b in loader) - loader.last_epoch_stats["padded"]
    return rows / (time.perf_counter() - start)


@contextlib.contextmanager
def http_server(root: str):
    """Python's http.server for ``root`` in its own process on 127.0.0.1; yields its base URL."""
    from moe_dist.distributed import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def run_open_clip(spec, tokenizer, transform, workers, batch=64) -> float:
    from open_clip_train.data import get_wds_dataset

    from moe_dist.data.spec import resolve_spec

    urls = "::".join(s.url for s in resolve_spec(spec))
    args = types.SimpleNamespace(val_data=urls, train_data=None, val_num_samples=None, workers=workers,
                                 batch_size=batch, dataset_resampled=False)
    info = get_wds_dataset(args, transform, is_train=False, tokenizer=tokenizer)
    start = time.perf_counter()
    rows = sum(images.shape[0] for images, _ in info.dataloader)
    return rows / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    from open_clip.transform import image_transform

    from data_tools.scan import captions
    from moe_dist.text import SentencePieceTokenizer, train_sentencepiece

    with tempfile.TemporaryDirectory() as root, http_server(root) as url:
        spec = make_data(root, args.n, args.source_size)
        remote_spec = f"{url}/{os.path.relpath(spec, root)}"
        tokenizer = SentencePieceTokenizer(train_sentencepiece(captions(spec, progress=False), vocab_size=200), 32)
        transform = image_transform(args.image_size, is_train=True)
        variants = {}
        for w in args.workers:
            variants[f"ours_w{w}"] = lambda w=w: run_ours(spec, tokenizer, transform, w, args.image_size)
            variants[f"http_w{w}"] = lambda w=w: run_ours(remote_spec, tokenizer, transform, w, args.image_size)
            variants[f"ours_nodraft_w{w}"] = lambda w=w: run_ours(spec, tokenizer, transform, w, args.image_size,
                                                                  draft=False)
            variants[f"open_clip_w{w}"] = lambda w=w: run_open_clip(spec, tokenizer, transform, w)
        rates = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                rates[name].append(fn())
    med = {name: statistics.median(r) for name, r in rates.items()}
    speedups = {w: med[f"ours_w{w}"] / med[f"open_clip_w{w}"] for w in args.workers}
    remote = {w: med[f"http_w{w}"] / med[f"ours_w{w}"] for w in args.workers}
    results = {"speedup_vs_open_clip": min(speedups.values()),
               **{f"speedup_w{w}": s for w, s in speedups.items()},
               "http_vs_local": min(remote.values()), **{f"http_vs_local_w{w}": r for w, r in remote.items()},
               "samples_per_s": med,
               "setup": {"n": args.n, "source_size": args.source_size, "image_size": args.image_size,
                         "rounds": args.rounds, "batch": 64, "cpus": os.cpu_count()}}
    print(f"{'variant':22s} {'samples/s':>10s}")
    for name in variants:
        print(f"{name:22s} {med[name]:10.0f}")
    for w, s in speedups.items():
        print(f"speedup vs open_clip_train, {w} worker(s): {s:.2f}x  (target >= 1.5)")
    for w, r in remote.items():
        print(f"loopback HTTP vs local disk, {w} worker(s): {r:.2f}x  (target >= 0.9)")
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
