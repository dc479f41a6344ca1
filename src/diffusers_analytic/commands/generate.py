"""`diffusers-analytic generate`: a pipeline folder or Hub repo id -> one PNG per image, a grid and a manifest.

Image i of a run is seeded from `(seed, i)` with its own generator (initial noise, scheduler noise and the
denoiser's noise), and the run is cut into fixed batches of global indices `[0, B), [B, 2B), ...` that processes
share out. So the files do not depend on the number of processes or the batch size, and each index is written by
exactly one process. Runs unchanged under `accelerate launch` or `torchrun` (see the README). `--skip-existing`
resumes an interrupted run (PNGs are written to a temporary name and renamed, so a file on disk is complete); the
manifest, written first, guards against resuming with settings that would change the pixels.

With `--data-parallel`, a data-holding denoiser's stored images are split across the processes instead
([`~diffusers_analytic.distributed.shard_for_data_parallel`]) and every process denoises every image; the main
process writes the files. The pixels are the same as with one process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
from diffusers.utils import logging, make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..distributed import shard_for_data_parallel
from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline, scheduler_from_denoiser
from ..saving import write_json
from ..schedulers import make_scheduler
from ..utils.seeding import generators_for_indices

logger = logging.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a pipeline folder or Hub repo id",
        description="Generate images; one PNG per image named by its zero-padded global index, plus grid.png.",
    )
    parser.add_argument("source", metavar="SRC", help="a local pipeline folder or a Hub repo id")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--scheduler",
        default=None,
        help="a diffusers scheduler class name (UniPCMultistepScheduler, ...) or an alias: ddim, ddpm, pndm, lms, euler, "
        "euler_a, heun, dpm++2m, dpm++3m, sde-dpm++2m, dpm-single, dpm-sde, kdpm2, kdpm2_a, deis, unipc, sa-solver, "
        "ddim-parallel, ddpm-parallel, flow-euler, flow-heun, edm-euler, edm-dpm++2m",
    )
    parser.add_argument(
        "--karras", action="store_true", help="use Karras sigmas (use_karras_sigmas; EDM: sigma_schedule=karras)"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument(
        "--class-label", type=int, default=None, help="generate this class (denoisers fitted with labels)"
    )
    parser.add_argument("--skip-existing", action="store_true", help="do not regenerate images already on disk")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: the process's accelerator or cpu)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the denoiser's statistics"
    )
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
    # --tf32 is a process-wide switch; put it back afterwards (the CLI may be called in-process, e.g. by tests).
    previous_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        _generate(args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32


def _generate(args) -> None:
    from accelerate import PartialState  # heavy, and only `generate` needs it

    if args.num_images < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        raise ValueError("--num-images, --batch-size and --num-inference-steps must be positive.")
    use_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    # `--device cuda` means this process's GPU (cuda:<local rank>), which the launcher assigned to `state.device`.
    device = state.device if args.device in (None, "cuda") else torch.device(args.device)
    if not state.is_main_process:
        logging.set_verbosity_warning()
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
        pipe.unet.to(_DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    manifest = _manifest(args, pipe)
    if args.skip_existing:
        _check_resumable(args.output_dir, manifest)
    state.wait_for_everyone()  # every process has read the old manifest before the main process replaces it
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(manifest, os.path.join(args.output_dir, "manifest.json"), default=str)
    state.wait_for_everyone()

    batches = [
        list(range(start, min(start + args.batch_size, args.num_images)))
        for start in range(0, args.num_images, args.batch_size)
    ]
    # Generation-parallel: processes share out the batches. Data-parallel: all run all batches, the main one writes.
    writes = state.is_main_process if args.data_parallel else True
    sharing = contextlib.nullcontext(batches) if args.data_parallel else state.split_between_processes(batches)
    with sharing as my_batches:
        for indices in tqdm(my_batches, desc="Generating", unit="batch", disable=not state.is_main_process):
            if args.skip_existing and all(os.path.exists(image_path(args.output_dir, i)) for i in indices):
                continue
            labels = None if args.class_label is None else [args.class_label] * len(indices)
            images = pipe(
                batch_size=len(indices),
                generator=generators_for_indices(args.seed, indices),
                num_inference_steps=args.num_inference_steps,
                eta=args.eta,
                class_labels=labels,
                output_type="pil",
            ).images
            for index, image in zip(indices, images):
                path = image_path(args.output_dir, index)
                if writes and not (args.skip_existing and os.path.exists(path)):
                    _save_png(image, path)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_grid(args)
        logger.info(f"Wrote {args.num_images} images to {args.output_dir}")


# What decides the pixels of image i (besides i): a resumed run must agree on all of it.
_RESUME_KEYS = (
    "seed",
    "num_inference_steps",
    "scheduler",
    "scheduler_config",
    "eta",
    "class_label",
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
        "source": args.source,
        "revision": args.revision,
        "denoiser": type(pipe.unet).__name__,
        "dtype": args.dtype,
        "tf32": args.tf32,
        "diffusers_analytic_version": __version__,
    }


def _check_resumable(output_dir: str, manifest: dict) -> None:
    """With --skip-existing, the images on disk must come from the same settings, else a ValueError naming them."""
    path = os.path.join(output_dir, "manifest.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [key for key in _RESUME_KEYS if key in previous and previous[key] != manifest[key]]
    if changed:
        details = ", ".join(f"{key}: {previous[key]!r} -> {manifest[key]!r}" for key in changed)
        raise ValueError(
            f"--skip-existing would mix images of two different runs in {output_dir} ({details}); use another "
            "--output-dir or the same settings."
        )


def _write_grid(args) -> None:
    shown = min(args.num_images, 64)
    images = [Image.open(image_path(args.output_dir, i)).copy() for i in range(shown)]
    cols = math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / cols)
    images += [Image.new(images[0].mode, images[0].size)] * (rows * cols - shown)
    _save_png(make_image_grid(images, rows=rows, cols=cols), os.path.join(args.output_dir, "grid.png"))
