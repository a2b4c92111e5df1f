"""A SuperLink and SuperNodes on loopback for the deployment-engine tests, every process stopped by PID.

Each process starts in its own session; the cluster remembers every descendant it has seen (Flower's
SuperLink starts `flower-superexec` in a new session, which starts `flwr-serverapp`; SuperNodes start
`flwr-clientapp` per message), so `stop()` ends them all by PID even after a parent died, and no
other process on the machine is touched.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from copra.federated.app.launch import flower_env, tool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Processes started for one test; `stop()` (a fixture finalizer) ends all of them and their children."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.home = folder / "flwr-home"
        self.env = flower_env(self.home)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, psutil.Process] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        self.track()
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def track(self) -> None:
        """Remember every live descendant, so it can be stopped even once orphaned."""
        for proc in self.procs.values():
            try:
                parent = psutil.Process(proc.pid)
                for p in [parent, *parent.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.Error:
                continue

    def tree(self, name: str) -> list[psutil.Process]:
        self.track()
        try:
            root = psutil.Process(self.procs[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def kill(self, name: str) -> None:
        """SIGKILL a process and its descendants (a machine that dies)."""
        for p in self.tree(name):
            _signal(p, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def wait(self, what: str, check, timeout: float, every: float = 0.2):
        """Poll `check()` until it returns something truthy; fail with the logs after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track()
            value = check()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{self.tails()}")

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {n}.log\n" + "\n".join(self.log(n).splitlines()[-lines:]) for n in self.procs)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([tool("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM everything started or seen, then SIGKILL what is left after 5 s."""
        self.track()
        alive = [p for p in self.seen.values() if _running(p)]
        for p in alive:
            _signal(p, signal.SIGTERM)
        _, left = psutil.wait_procs(alive, timeout=5)
        for p in left:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(left, timeout=5)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def ready(self, name: str, text: str) -> bool:
        if self.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited with {self.procs[name].returncode}\n{self.tails()}")
        return text in self.log(name)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        if p.is_running():  # psutil checks the PID still belongs to the same process (start time)
            p.send_signal(sig)
    except psutil.Error:
        pass


def read_history(out: Path) -> dict | None:
    try:
        return json.loads((out / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_run_config(path: Path, values: dict) -> Path:
    """A TOML file of run-config overrides (`flwr run APP CONNECTION -c FILE`)."""
    lines = []
    for key, value in values.items():
        text = (
            json.dumps(value)
            if isinstance(value, str)
            else str(value).lower()
            if isinstance(value, bool)
            else repr(value)
        )
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path
