"""Starting 2 real processes (gloo on CPU) from a test, with the launch form that works on CPU and GPU machines."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SRC = os.path.join(ROOT, "src")


def subprocess_env() -> dict:
    """The environment of a launched process: our source tree and the repository root (for `tests.distributed`) first
    on PYTHONPATH, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def accelerate_launch(args: list[str], num_processes: int = 2) -> list[str]:
    """The launch form that starts `num_processes` processes on CPU-only machines and on GPU machines alike."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        *args,
    ]


def run_launched(command: list[str], cwd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result
