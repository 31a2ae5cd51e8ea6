"""The machine a benchmark ran on, recorded in its JSON (one definition for every benchmark)."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_GiB": round(mem / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "loadavg_1m_at_start": os.getloadavg()[0]}
