"""Benchmarks, run by ``make bench``; each writes JSON under ``results/bench/``.

    python -m fire_core.bench            # every benchmark
    python -m fire_core.bench world      # one

``world``: time to render the default-scale world (stage 00) on this machine, samples per
second, and per-family render cost. Later stages add their own benchmarks here.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from fire_core import config, provenance, world

log = logging.getLogger(__name__)
OUT = config.REPO_ROOT / "results" / "bench"


def bench_world() -> dict:
    per_family = {}
    for fam in world.FAMILIES:
        t = time.perf_counter()
        for i in range(200):
            world.make_sample(fam, "train", i, 0, 96)
        per_family[fam] = round((time.perf_counter() - t) / 200 * 1000, 3)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load("00_build_world", ["scale=default", f"paths.results={tmp}"])
        t = time.perf_counter()
        res = world.build(cfg)
        seconds = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in Path(res.dataset_dir).rglob("*") if p.is_file()) / 2**20
    n = sum(res.counts.values())
    return {"benchmark": "world", "scale": "default", "samples": n, "build_seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 1), "dataset_mb": round(size_mb, 1),
            "render_ms_per_sample": per_family, "workers": cfg.world.num_workers,
            "cpus": os.cpu_count(), "machine": platform.machine(), "peak_rss_mb": round(provenance.peak_rss_mb(), 1)}


BENCHMARKS = {"world": bench_world}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names or list(BENCHMARKS):
        result = BENCHMARKS[name]()
        path = OUT / f"{name}.json"
        provenance.write_json_atomic(path, {**result, "git": provenance.git_state()})
        log.info("%s -> %s", name, path)


if __name__ == "__main__":
    main()
