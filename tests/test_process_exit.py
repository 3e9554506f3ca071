"""Processes that import the package skip the interpreter's last garbage collection at exit (ptmst_ray/__init__.py):
its exit handler freezes every tracked object before that collection, and the handlers registered before the
package (Ray's shutdown among them) still run after it."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import atexit, gc
atexit.register(lambda: print("at exit", gc.get_freeze_count(), flush=True))  # registered first: runs last
import ptmst_ray.config
print("imported", gc.get_freeze_count(), flush=True)
"""


def test_importing_the_package_freezes_the_collectors_objects_at_exit_and_later_handlers_still_run():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported, at_exit = (line.split() for line in proc.stdout.splitlines())
    assert imported == ["imported", "0"]  # nothing frozen while the process works: its garbage is collected
    assert at_exit[:2] == ["at", "exit"] and int(at_exit[2]) > 10_000  # everything alive at exit is frozen
