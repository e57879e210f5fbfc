"""Process-level tuning: glibc malloc settings are applied in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_applies_and_is_idempotent():
    code = (
        "from mergeflow.runtime import tune_malloc\n"
        "assert tune_malloc() is True\n"
        "assert tune_malloc() is True\n"
        "import torch\n"
        "x = [torch.ones(8 << 20) for _ in range(3)]\n"  # 32 MiB each: allocations still work
        "assert float(sum(t.sum() for t in x)) == 3 * (8 << 20)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
