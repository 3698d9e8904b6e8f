"""Shared by the benchmark scripts: a process's own peak memory."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak resident memory (``VmHWM``, MiB). Not ``ru_maxrss``: on Linux that
    carries over the RSS the forked process had before ``exec``, i.e. the parent's, so a child
    spawned by a benchmark that holds a million generated rows would report at least the
    parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
