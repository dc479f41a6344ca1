"""Timing helpers shared by the benchmark scripts (run from the repository root: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time

import torch


def synchronize(device) -> None:
    """Waits for the device's queued work (CUDA); a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int = 3, device="cpu") -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call, with the device synchronised."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def alternating_best(functions: dict, rounds: int, calls: int = 1) -> dict:
    """
    Per name, the best mean time of one call over `rounds` rounds of `calls` calls in a row, the functions alternating
    within each round (so that a shared machine's drift hits them alike), after one warm-up call each.
    """
    best = dict.fromkeys(functions, float("inf"))
    for fn in functions.values():
        fn()
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best
