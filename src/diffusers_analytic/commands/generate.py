"""`diffusers-analytic generate`: a pipeline folder or Hub repo id -> one PNG per image, a grid and a manifest.

Image i of a run is seeded from `(seed, i)` with its own generator (initial noise, scheduler noise and the
denoiser's noise), and the run is cut into fixed batches of global indices `[0, B), [B, 2B), ...` that processes
share out. So the files do not depend on the number of processes or the batch size, and each index is written by
exactly one process. Runs unchanged under `accelerate launch` or `torchrun` (see the README). `--skip-existing`
resumes an interrupted run (PNGs are written to a temporary name and renamed, so a file on disk is complete); the
manifest, written first, guards against resuming with settings that would change the pixels. A folder that holds
another run's images is refused unless `--overwrite` (which clears them) or `--skip-existing` is given.

With `--data-parallel`, a data-holding denoiser's stored images are split across the processes instead
([`~diffusers_analytic.distributed.shard_for_data_parallel`]) and every process denoises every image; the main
process writes the files. The pixels are the same as with one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re

from .. import __version__

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)

DTYPES = ("bfloat16", "float16", "float32")
GRID_NAME, MANIFEST_NAME = "grid.png", "manifest.json"
_IMAGE_NAME = re.compile(r"^(\d{6,})\.png$")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a pipeline folder or Hub repo id",
        description="Generate images; one PNG per image named by its zero-padded global index, plus grid.png and "
        "manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="a local pipeline folder or a Hub repo id")
    parser.add_argument("--num-images", type=int, default=16, help="how many images (indices 0 .. N-1)")
    parser.add_argument("--seed", type=int, default=0, help="image i draws all its noise from (seed, i)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per pipeline call (the files do not depend on it)"
    )
    parser.add_argument("--output-dir", required=True, help="the folder of the PNGs, grid.png and manifest.json")
    parser.add_argument(
        "--scheduler",
        default=None,
        help="a diffusers scheduler class name (UniPCMultistepScheduler, ...) or an alias: ddim, ddpm, pndm, lms, euler, "
        "euler_a, heun, dpm++2m, dpm++3m, sde-dpm++2m, dpm-single, dpm-sde, kdpm2, kdpm2_a, deis, unipc, sa-solver, "
        "ddim-parallel, ddpm-parallel, flow-euler, flow-heun, edm-euler, edm-dpm++2m (default: the folder's)",
    )
    parser.add_argument(
        "--karras", action="store_true", help="use Karras sigmas (use_karras_sigmas; EDM: sigma_schedule=karras)"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument(
        "--class-label", type=int, default=None, help="generate this class (denoisers fitted with labels)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance w with --class-label: eps_all + w (eps_class - eps_all) (default: none, i.e. 1)",
    )
    parser.add_argument(
        "--skip-existing", action="store_true", help="resume a run: keep the images already in --output-dir"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="clear the images of another run in --output-dir first"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: the process's accelerator, else cpu)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the denoiser's statistics")
    parser.add_argument(
        "--tf32", action="store_true", help="allow TF32 matmuls on NVIDIA GPUs (faster, ~1e-3 relative error)"
    )
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument(
        "--data-parallel",
        action="store_true",
        help="data-holding denoisers: each process keeps 1/n of the stored images and all processes denoise every "
        "image together (exact; for data sets larger than one device). Without it, processes share out the images.",
    )


def image_path(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"{index:06d}.png")


def _save_png(image, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def run(args) -> None:
    import torch

    # --tf32 is a process-wide switch; put it back afterwards (the CLI may be called in-process, e.g. by tests).
    previous_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        _generate(args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32


def _generate(args) -> None:
    import torch
    from accelerate import PartialState
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    from ..distributed import shard_for_data_parallel
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline, scheduler_from_denoiser
    from ..saving import write_json
    from ..schedulers import make_scheduler
    from ..utils.seeding import generators_for_indices
    from .common import resolve_device

    if args.num_images < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        raise ValueError("--num-images, --batch-size and --num-inference-steps must be positive.")
    if args.overwrite and args.skip_existing:
        raise ValueError("--overwrite clears the old images and --skip-existing keeps them; pass one of the two.")
    device = None if args.device is None else resolve_device(args.device)  # a ValueError naming the devices here
    use_cpu = (device is not None and device.type == "cpu") or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    # `--device cuda` means this process's GPU (cuda:<local rank>), which the launcher assigned to `state.device`.
    if args.device in (None, "cuda"):
        device = state.device
    if not state.is_main_process:
        diffusers_logging.set_verbosity_warning()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    pipe = AnalyticDDIMPipeline.from_pretrained(args.source, revision=args.revision)
    if args.scheduler is not None or args.karras:
        # The denoiser's training schedule under the current scheduler's settings, so a DDPM-type target matches it.
        base_config = {**scheduler_from_denoiser(pipe.unet).config, **pipe.scheduler.config}
        pipe.scheduler = make_scheduler(args.scheduler or type(pipe.scheduler).__name__, base_config, args.karras)
    if args.data_parallel:
        # Every process holds 1/n of the stored images and denoises every batch with the others.
        shard_for_data_parallel(pipe, state)
    pipe.unet.to(device)
    if args.dtype != "float32":
        pipe.unet.to(getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)  # ours below counts images x steps over the whole run
    manifest = _manifest(args, pipe)
    if args.skip_existing:
        _check_resumable(args.output_dir, manifest)
    elif not args.overwrite:
        _check_fresh(args.output_dir, manifest)
    state.wait_for_everyone()  # every process has read the old manifest before the main process replaces it
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.overwrite:
            _clear_run(args.output_dir)
        write_json(manifest, os.path.join(args.output_dir, MANIFEST_NAME), default=str)
    state.wait_for_everyone()

    batches = [
        list(range(start, min(start + args.batch_size, args.num_images)))
        for start in range(0, args.num_images, args.batch_size)
    ]
    # Generation-parallel: processes share out the batches. Data-parallel: all run all batches, the main one writes.
    writes = state.is_main_process if args.data_parallel else True
    sharing = contextlib.nullcontext(batches) if args.data_parallel else state.split_between_processes(batches)
    with sharing as my_batches:
        if args.skip_existing:
            my_batches = [b for b in my_batches if not all(os.path.exists(image_path(args.output_dir, i)) for i in b)]
        pipe.scheduler.set_timesteps(args.num_inference_steps)
        steps = len(pipe.scheduler.timesteps)  # (Heun-type schedulers take more model calls than steps)
        progress = tqdm(
            total=steps * sum(len(indices) for indices in my_batches),
            desc=f"Denoising {sum(map(len, my_batches))} images x {steps} steps",
            unit="image-step",
            disable=not state.is_main_process,
        )
        for indices in my_batches:
            labels = None if args.class_label is None else [args.class_label] * len(indices)
            images = pipe(
                batch_size=len(indices),
                generator=generators_for_indices(args.seed, indices),
                num_inference_steps=args.num_inference_steps,
                eta=args.eta,
                class_labels=labels,
                guidance_scale=args.guidance_scale,
                output_type="pil",
                callback_on_step_end=_advance(progress, len(indices)),
            ).images
            for index, image in zip(indices, images):
                path = image_path(args.output_dir, index)
                if writes and not (args.skip_existing and os.path.exists(path)):
                    _save_png(image, path)
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _write_grid(args)
        logger.info(f"Wrote {args.num_images} images to {args.output_dir}")


def _advance(progress, count: int):
    """A `callback_on_step_end` that moves the bar by `count` image-steps after every denoising step."""

    def callback(pipe, step, timestep, tensors) -> dict:
        progress.update(count)
        return {}

    return callback


# What decides the pixels of image i (besides i): a resumed run must agree on all of it.
_RESUME_KEYS = (
    "seed",
    "num_inference_steps",
    "scheduler",
    "scheduler_config",
    "eta",
    "class_label",
    "guidance_scale",
    "source",
    "revision",
    "denoiser",
    "dtype",
    "tf32",
)


def _manifest(args, pipe) -> dict:
    return {
        "num_images": args.num_images,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
        "eta": args.eta,
        "class_label": args.class_label,
        "guidance_scale": args.guidance_scale,
        "source": args.source,
        "revision": args.revision,
        "denoiser": type(pipe.unet).__name__,
        "dtype": args.dtype,
        "tf32": args.tf32,
        "diffusers_analytic_version": __version__,
    }


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pixel_differences(previous: dict, current: dict) -> list[str]:
    """
    `"key: old -> new"` for each setting that decides the pixels and differs between two manifests. Scheduler
    configs are compared key by key, leaving out diffusers' private entries (`_use_default_values`, `_class_name`,
    ...), which record how a config was written, not what it computes.
    """
    differences = []
    for key in _RESUME_KEYS:
        if key not in previous:
            continue
        if key == "scheduler_config" and isinstance(previous[key], dict):
            old, new = ({k: v for k, v in c.items() if not k.startswith("_")} for c in (previous[key], current[key]))
            differences += [
                f"scheduler_config.{k}: {_short(old.get(k))} -> {_short(new.get(k))}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif previous[key] != current[key]:
            differences.append(f"{key}: {_short(previous[key])} -> {_short(current[key])}")
    if len(differences) > 6:
        differences = [*differences[:5], f"and {len(differences) - 5} more"]
    return differences


def _read_run(output_dir: str) -> tuple[dict | None, list[int]]:
    """The manifest of the run in `output_dir` (None if there is none) and the indices of its images."""
    if not os.path.isdir(output_dir):
        return None, []
    indices = sorted(int(m.group(1)) for m in map(_IMAGE_NAME.match, os.listdir(output_dir)) if m)
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None, indices
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError):
        previous = {}
    return (previous if isinstance(previous, dict) else {}), indices


def _check_resumable(output_dir: str, manifest: dict) -> None:
    """With --skip-existing, the images on disk must come from the same settings, else a ValueError naming them."""
    previous, _ = _read_run(output_dir)
    differences = [] if previous is None else pixel_differences(previous, manifest)
    if differences:
        raise ValueError(
            f"--skip-existing would mix images of two different runs in {output_dir} ({'; '.join(differences)}); "
            "use the same settings, --overwrite to replace the old images, or another --output-dir."
        )


def _check_fresh(output_dir: str, manifest: dict) -> None:
    """
    Without --skip-existing or --overwrite, `output_dir` may hold only the same run (its files are then rewritten
    identically): images of other settings, beyond --num-images or without a manifest are a ValueError.
    """
    previous, indices = _read_run(output_dir)
    if previous is None and not indices:
        return
    if previous is None:
        problem = f"{len(indices)} images without a {MANIFEST_NAME}"
    else:
        differences = pixel_differences(previous, manifest) or (
            [f"num_images: {previous.get('num_images')} -> {manifest['num_images']}"]
            if any(i >= manifest["num_images"] for i in indices)
            else []
        )
        if not differences:
            return
        problem = f"the images of another run ({'; '.join(differences)})"
    raise ValueError(
        f"{output_dir} holds {problem}; pass --overwrite to replace them, --skip-existing to resume that run, or "
        "choose another --output-dir."
    )


def _clear_run(output_dir: str) -> None:
    """--overwrite: removes the images, grid and manifest of the previous run (other files stay)."""
    for name in os.listdir(output_dir):
        if _IMAGE_NAME.match(name) or name in (GRID_NAME, MANIFEST_NAME) or ".png.tmp-" in name:
            os.remove(os.path.join(output_dir, name))


def _write_grid(args) -> None:
    from PIL import Image

    from ..utils.images import image_grid

    shown = min(args.num_images, 64)
    images = []
    for i in range(shown):
        with Image.open(image_path(args.output_dir, i)) as image:
            images.append(image.copy())
    _save_png(image_grid(images), os.path.join(args.output_dir, GRID_NAME))
