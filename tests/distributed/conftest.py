"""Fixtures for the multi-process tests: a tiny fitted pipeline and launchers that start 2 real processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
HERE = os.path.dirname(os.path.abspath(__file__))


def subprocess_env() -> dict:
    """The environment of a launched process: our source tree first on PYTHONPATH, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, HERE, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def accelerate_launch(args: list[str], num_processes: int = 2) -> list[str]:
    """The launch form that starts `num_processes` processes on CPU-only machines and on GPU machines alike."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *args,
    ]


def run_launched(command: list[str], cwd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="session")
def wiener_dir(tmp_path_factory) -> str:
    """A Wiener pipeline fitted on digits, saved as a folder."""
    import diffusers_analytic as da

    path = str(tmp_path_factory.mktemp("pipelines") / "wiener-digits")
    denoiser = da.WienerDenoiser.from_dataset(da.load_builtin("digits"), show_progress=False)
    da.AnalyticDDIMPipeline(unet=denoiser).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def optimal_dir(tmp_path_factory) -> str:
    """An exact optimal pipeline over 301 digits (uint8), saved as a folder."""
    import dp_cases

    import diffusers_analytic as da

    path = str(tmp_path_factory.mktemp("pipelines") / "optimal-digits")
    denoiser = da.OptimalDenoiser.from_dataset(dp_cases.digits_images(), chunk_size=64, show_progress=False)
    da.AnalyticDDIMPipeline(unet=denoiser).save_pretrained(path)
    return path
