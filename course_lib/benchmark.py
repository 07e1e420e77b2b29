"""``python -m course_lib.benchmark``: measured speeds of the course's building blocks.

Prints a table and writes ``runs/benchmark.json``. Timings are best-of-``repeats`` wall times on
this machine; they are measurements for the README, never assertions of a test.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from course_lib.runtime import RUNS_DIR


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_data(repeats: int) -> dict[str, float]:
    from course_lib.data import load_fashion_mnist, make_shapes
    from course_lib.train import Minibatches

    load = best_time(lambda: load_fashion_mnist("train"), repeats)
    images, labels = load_fashion_mnist("train")
    batches = Minibatches(images, labels, batch_size=128)
    n_batches = 2000
    seconds = best_time(lambda: [next(batches) for _ in range(n_batches)], repeats)
    shapes = best_time(lambda: make_shapes(10_000, seed=0), repeats)
    return {"fashion_mnist_train_load_s": load,
            "minibatches_per_s_at_128": n_batches / seconds,
            "shapes_10k_generation_s": shapes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RUNS_DIR / "benchmark.json"))
    args = parser.parse_args(argv)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "data": bench_data(args.repeats)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for group, values in results.items():
        if group == "machine":
            continue
        for name, value in values.items():
            print(f"{group:<6} {name:<32} {value:>10.3f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
