"""The field's own tools, each in a venv of its own next to ours (their pins clash with ours).

``peer_python("clip_benchmark")`` builds ``.venv-peers/clip_benchmark`` from
``bench/peers/clip_benchmark.txt`` with one pip command the first time (about 3 min here, torch
comes from this machine's disk), reuses it afterwards, and returns its python. The benches and
the slow tests call it; nothing of a peer is ever imported into our venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

PEERS_DIR = Path(__file__).parent
REPO = PEERS_DIR.parents[1]
VENVS = REPO / ".venv-peers"


class PeerUnavailable(RuntimeError):
    """A peer's venv could not be built (no registry, a failed install)."""


def requirements(name: str) -> Path:
    path = PEERS_DIR / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PEERS_DIR.glob("*.txt")))
        raise ValueError(f"unknown peer {name!r} (known: {known})")
    return path


def peer_python(name: str, log=print) -> Path:
    """The python of the peer's venv, built (or rebuilt when its requirements changed)."""
    req = requirements(name)
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    want = hashlib.sha256(req.read_bytes()).hexdigest()
    if python.is_file() and stamp.is_file() and stamp.read_text() == want:
        return python
    log(f"building the {name} venv in {venv} (one pip command, a few minutes the first time)")
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # a line "#!pip --no-deps" adds pip options (requirements files cannot say --no-deps)
    opts = [o for line in req.read_text().splitlines() if line.startswith("#!pip ")
            for o in line.removeprefix("#!pip ").split()]
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", *opts, "-r", str(req)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise PeerUnavailable(f"pip could not install {req} into {venv}:\n{tail}")
    stamp.write_text(want)
    return python


def run_peer(name: str, script: str, args: list[str], timeout: float | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``bench/peers/<script>`` with the peer's python; raises with its stderr on failure."""
    python = peer_python(name)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONNOUSERSITE": "1", **(env or {})}
    full_env.pop("PYTHONPATH", None)  # nothing of our venv or repo leaks into the peer
    r = subprocess.run([str(python), str(PEERS_DIR / script), *args], capture_output=True,
                       text=True, timeout=timeout, env=full_env, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"{name} ({script} {' '.join(args)}) failed, rc {r.returncode}:\n"
                           + "\n".join(r.stderr.strip().splitlines()[-15:]))
    return r
