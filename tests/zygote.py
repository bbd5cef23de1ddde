"""A helper process that imports torch, avalanche and our training CLI once, then forks one real training process
per request: `streaming_ssl.cli.train.main(argv)`, i.e. run_stream.py without its allocator re-exec.

A cold `python run_stream.py` spends 10-15 s of a tiny test run importing (torch, torchvision, avalanche and its
requirements) on a loaded 2-core machine; a fork costs ~0 s. The child is still a process of its own: signals,
the kernel's release of its flock, its exit code and the files it leaves are a real process's. The CLI exactly as a
user starts it (`python run_stream.py`, re-executed with the allocator setting) stays covered where that start is
the point: the killed run and its resume in test_resume.py, the runs of test_runlock_cli.py, the GPU check's dry
run (SIGTERM) in test_gpu_check.py, the allocator refusals in test_bad_inputs.py. The other tests that need a
training process of their own take the session's `zygote` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Requests on stdin (one JSON per line): {"op": "run", "argv", "env", "log", "prelude"} -> {"pid"} (prelude: Python
# source the child runs before main, e.g. to raise an error a test needs at a given point);
# {"op": "wait", "pid"} -> {"pid", "status"} (exit code, or -signal).
SOURCE = r"""
import json, os, signal, sys, traceback
import scenarios.datasets, scenarios.streams
import streaming_ssl.build, streaming_ssl.cli.train, streaming_ssl.plugins, streaming_ssl.runner
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 99
            try:
                os.environ.update(req["env"])
                # Ctrl-C as from a prompt, also when pytest runs in a script's background (its SIGINT ignored)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                exec(req.get("prelude") or "", {"__name__": "prelude"})
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                rc = streaming_ssl.cli.train.main(req["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"pid": req["pid"], "status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """The forking helper process; every reply is awaited with a timeout."""

    def __init__(self, env: dict, startup_s: float = 240) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SOURCE], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.children: set[int] = set()  # forked and not yet reaped
        self._reply(startup_s)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _reply(self, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the helper process did not answer within {timeout} s") from None
        assert reply is not None, "the helper process died"
        return reply

    def _send(self, req: dict) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def start(self, argv: list[str], log: Path, env: dict | None = None, prelude: str = "") -> int:
        """Fork a training process on `argv` (run_stream.py's arguments), its stdout and stderr appended to
        `log`, `env` added to its environment, `prelude` (Python source) run in it first; returns its PID."""
        self._send({"op": "run", "argv": [str(a) for a in argv], "env": env or {}, "log": str(log),
                    "prelude": prelude})
        pid = self._reply(60)["pid"]
        self.children.add(pid)
        return pid

    def wait(self, pid: int, timeout: float) -> int:
        """Exit code of a child (-9: SIGKILL); kills it if it has not ended within timeout."""
        self._send({"op": "wait", "pid": pid})
        try:
            reply = self._reply(timeout)
        except AssertionError:
            self.kill(pid)
            raise
        self.children.discard(pid)
        return reply["status"]

    def run(self, argv: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
        """start, then wait: the exit code."""
        return self.wait(self.start(argv, log, env), timeout)

    def running(self, pid: int) -> bool:
        """The child has not exited (an exited child stays a zombie until wait reaps it)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def kill(self, pid: int) -> None:
        if pid in self.children:  # not reaped yet, so the PID cannot have been reused
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for pid in list(self.children):
            self.kill(pid)
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=60)
