"""The one timing helper of the benchmark scripts that time whole calls by wall clock."""
import statistics
import time


def median_time(fn, repeat):
    """Median seconds of ``repeat`` calls of ``fn()``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
