"""Service process settings (sluice/services.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from sluice import services


def test_tuned_gc_freezes_startup_objects_and_still_collects_cycles_later() -> None:
    # In a process of its own: the collector's settings are global.
    script = textwrap.dedent(
        """
        import gc, weakref
        from sluice.services import tune_gc

        tune_gc()
        print(gc.get_freeze_count() > 1000, gc.get_threshold()[0])

        class Node:
            pass

        node = Node()
        node.self = node  # a cycle: reference counting alone never frees it
        alive = weakref.ref(node)
        del node
        few = [[] for _ in range(10_000)]  # (CPython's default collects after 700)
        print(alive() is not None)
        many = [[] for _ in range(YOUNG)]  # enough new containers for a young collection
        print(alive() is None)
        """
    ).replace("YOUNG", str(services._GC_YOUNG))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["True", str(services._GC_YOUNG), "True", "True"]
