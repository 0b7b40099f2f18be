"""A Spark standalone cluster on loopback for the tests: one master and N workers started with
the pip pyspark's own ``sbin/spark-daemon.sh`` (the script start-master.sh / start-worker.sh
wrap in a full Spark download; pip's pyspark ships only spark-daemon.sh)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent
MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(env: dict[str, str], *args: str) -> None:
    subprocess.run(["bash", str(SPARK_HOME / "sbin" / "spark-daemon.sh"), *args], env=env,
                   check=True, capture_output=True, timeout=120)


def _alive_workers(ui: str) -> int:
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=5) as r:
            state = json.load(r)
    except OSError:
        return 0
    return sum(w.get("state") == "ALIVE" for w in state.get("workers", []))


@contextmanager
def spark_cluster(tmp: Path, workers: int = 2, cores: int = 1,
                  memory: str = "1g") -> Iterator[str]:
    """Yields the master's URL, spark://127.0.0.1:PORT, once every worker is ALIVE."""
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_LOG_DIR": str(tmp / "logs"), "SPARK_PID_DIR": str(tmp / "pids"),
           "SPARK_WORKER_DIR": str(tmp / "work"), "SPARK_IDENT_STRING": f"wf{os.getpid()}"}
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    port, ui = free_port(), free_port()
    master = f"spark://127.0.0.1:{port}"
    started: list[tuple[str, int]] = []
    try:
        _daemon(env, "start", MASTER, "1", "--host", "127.0.0.1", "--port", str(port),
                "--webui-port", str(ui))
        started.append((MASTER, 1))
        for i in range(1, workers + 1):
            _daemon(env, "start", WORKER, str(i), "--host", "127.0.0.1", "--cores", str(cores),
                    "--memory", memory, "--webui-port", str(free_port()), master)
            started.append((WORKER, i))
        deadline = time.monotonic() + 90
        while _alive_workers(f"http://127.0.0.1:{ui}") < workers:
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text(errors="replace")[-2000:]
                                 for p in (tmp / "logs").glob("*.out"))
                raise RuntimeError(f"the Spark cluster did not come up:\n{logs}")
            time.sleep(0.5)
        yield master
    finally:
        for cls, i in reversed(started):
            try:
                _daemon(env, "stop", cls, str(i))
            except subprocess.SubprocessError:
                pass
