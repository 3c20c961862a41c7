"""Bounded work: what one call costs (time, peak memory), measured in a fresh, memory-capped process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ---- Bounded work: what one call costs, measured in a fresh process ----

_PEAK_PROBE = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
import support  # the pack as package x2i
{setup}
def _hwm_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
def _rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # peak RSS := current RSS, so imports and setup do not count
before = _rss_kib()
started = time.perf_counter()
error = None
try:
{call}
except Exception as exc:
    error = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"peak_mib": (_hwm_kib() - before) / 1024, "seconds": time.perf_counter() - started, "error": error}}))
"""


PROBE_ADDRESS_SPACE = 8 << 30  # a bomb in the probe fails with MemoryError instead of filling the machine


def cost_of(call: str, setup: str = "", timeout: float = 120.0) -> dict:
    """Run ``call`` (Python statements) in a fresh interpreter after ``setup``; returns the growth of its
    peak resident memory during the call in MiB (``peak_mib``), its ``seconds`` and the ``error`` it raised
    (``"Type: message"``, ``"timeout"`` or None). The interpreter's address space is capped at
    :data:`PROBE_ADDRESS_SPACE`, so a call that would exhaust memory shows as a ``MemoryError`` (or a large
    ``peak_mib``) instead of taking the machine down."""
    import resource
    import subprocess
    import textwrap

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (PROBE_ADDRESS_SPACE, PROBE_ADDRESS_SPACE))

    code = _PEAK_PROBE.format(tests=str(Path(__file__).resolve().parents[1]), setup=setup, call=textwrap.indent(call, "    "))
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                                check=False, preexec_fn=cap_memory)
    except subprocess.TimeoutExpired:
        return {"peak_mib": None, "seconds": timeout, "error": "timeout"}
    if result.returncode != 0 or not result.stdout.strip():
        raise AssertionError(f"the probe process failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
