"""`generate` in one process: files independent of the batch size, `--skip-existing` resumes without rewriting."""

from __future__ import annotations

import json
import os

import pytest

from diffusers_analytic.commands.cli import main


def generate(source: str, output_dir: str, *extra: str) -> None:
    args = ["generate", source, "--num-images", "5", "--num-inference-steps", "3", "--output-dir", output_dir, *extra]
    assert main(args) == 0


def png_bytes(output_dir: str, count: int) -> list[bytes]:
    return [open(os.path.join(output_dir, f"{i:06d}.png"), "rb").read() for i in range(count)]


def test_files_do_not_depend_on_the_batch_size(wiener_dir, tmp_path):
    generate(wiener_dir, str(tmp_path / "b1"), "--batch-size", "1", "--scheduler", "ddpm")
    generate(wiener_dir, str(tmp_path / "b4"), "--batch-size", "4", "--scheduler", "ddpm")
    assert png_bytes(str(tmp_path / "b1"), 5) == png_bytes(str(tmp_path / "b4"), 5)
    manifest = json.load(open(tmp_path / "b4" / "manifest.json"))
    assert manifest["num_images"] == 5 and manifest["scheduler"] == "DDPMScheduler" and manifest["seed"] == 0
    assert (tmp_path / "b4" / "grid.png").is_file()


def test_skip_existing_resumes_without_rewriting(wiener_dir, tmp_path):
    out = str(tmp_path / "run")
    out_source = wiener_dir
    generate(out_source, out, "--batch-size", "2")
    complete = png_bytes(out, 5)
    paths = [os.path.join(out, f"{i:06d}.png") for i in range(5)]
    # An interrupted run: images 1 and 4 are missing.
    os.remove(paths[1])
    os.remove(paths[4])
    before = {i: (os.stat(paths[i]).st_ino, os.stat(paths[i]).st_mtime_ns) for i in (0, 2, 3)}
    generate(out_source, out, "--batch-size", "2", "--skip-existing")
    after = {i: (os.stat(paths[i]).st_ino, os.stat(paths[i]).st_mtime_ns) for i in (0, 2, 3)}
    assert after == before  # the images on disk were not written again
    assert png_bytes(out, 5) == complete  # the missing ones came back identical
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    # Without --skip-existing everything is rewritten (the check above can fail).
    generate(out_source, out, "--batch-size", "2")
    assert os.stat(paths[0]).st_ino != before[0][0] or os.stat(paths[0]).st_mtime_ns != before[0][1]


def test_skip_existing_refuses_a_different_run(wiener_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    generate(wiener_dir, out)
    code = main(
        [
            "generate",
            wiener_dir,
            "--num-images",
            "5",
            "--num-inference-steps",
            "3",
            "--output-dir",
            out,
            "--seed",
            "1",
            "--skip-existing",
        ]
    )
    assert code == 2
    assert "--skip-existing would mix images of two different runs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--num-images", "0"], ["--batch-size", "0"]])
def test_bad_counts_are_errors(wiener_dir, tmp_path, flag, capsys):
    args = ["generate", wiener_dir, "--output-dir", str(tmp_path / "x"), "--num-inference-steps", "2", *flag]
    assert main(args) == 2
    assert "must be positive" in capsys.readouterr().err


def test_device_and_dtype_flags(wiener_dir, tmp_path):
    import torch

    out = str(tmp_path / "bf16")
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    generate(wiener_dir, out, "--device", "cpu", "--dtype", "bfloat16", "--tf32")
    assert torch.backends.cuda.matmul.allow_tf32 == allow_tf32  # the switch does not leak out of the command
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["dtype"] == "bfloat16" and manifest["tf32"] is True
    assert len(png_bytes(out, 5)) == 5
