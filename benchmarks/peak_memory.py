"""Peak resident memory of the calling process itself, for benchmarks that run each measurement
in a child process.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not used: on Linux a child started by
fork + exec (``subprocess``, ``multiprocessing`` spawn) inherits its parent's peak, so a child of
a 2 GB parent reports >= 2 GB whatever it does (measured). ``VmHWM`` belongs to the process's
own address space and starts afresh at exec.
"""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
