"""Workers of `runs.run_all(jobs=N)` end with the process that started them (a killed suite leaves none)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import sys, time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from copra.experiments.runner.runs import _worker_init

    def main():
        pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(1,))
        print(pool.submit(__import__("os").getpid).result(), flush=True)
        pool.submit(time.sleep, 600)  # the worker is busy when its parent dies
        time.sleep(600)

    if __name__ == "__main__":
        main()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to tell a zombie from a live process")
def test_a_worker_ends_soon_after_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), "the worker outlived its killed parent"


def _known_warnings_shown() -> int:
    import warnings

    from copra.utils.compat import KNOWN_WARNINGS

    with warnings.catch_warnings(record=True) as shown:
        for message, category in KNOWN_WARNINGS:
            warnings.warn(f"{message} and will be removed", category)
    return len(shown)


@pytest.mark.slow
def test_workers_hide_the_known_warnings_as_the_cli_does():
    """A spawned worker starts without the CLI's warning filters; its initializer installs them."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from copra.experiments.runner.runs import _worker_init

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as bare:
        assert bare.submit(_known_warnings_shown).result() >= 1  # the check sees a warning when nothing hides it
    with ProcessPoolExecutor(
        max_workers=1, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(1,)
    ) as pool:
        assert pool.submit(_known_warnings_shown).result() == 0
