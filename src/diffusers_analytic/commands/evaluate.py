"""`diffusers-analytic evaluate SAMPLES --reference DATA`: how do generated images relate to the training set?

SAMPLES is a folder of images (what `generate` writes: `000000.png`, ...; `grid.png`, `nearest.png` and
`manifest.json` are skipped) or a pipeline folder / Hub repo id with `--num-images N`, which generates image i
from the generator of `(seed, i)` exactly as `generate` does. DATA is any source `fit` accepts (a built-in set, a
local image folder, a Hub data set id). Samples of another size or channel count than the reference are resized
(shorter side, center crop) and converted to it, with a log line.

Writes to `--output-dir` (default: `SAMPLES/evaluation` for a folder of images), each file atomically:

- `metrics.json`: `num_samples`, `num_reference`, `memorized_fraction` (ratio test, `memorization_ratio`),
  `nearest_distance` (`samples` / `reference` summaries), `fd_pixels`; with `--feature-model` also `feature_model`,
  `fd_features` and `memorized_fraction_features` (see [`~diffusers_analytic.evaluation.metrics`]);
- `nearest.png`: each shown sample (left, its index under it; `copy` when it passes the ratio test) beside its
  nearest training images, with the L2 distance (model space) under each.

Like every command module, it imports torch and the package's heavy modules only inside its functions, so that
`diffusers-analytic --help` stays fast.
"""

from __future__ import annotations

import logging
import math
import os

from ..names import BUILTIN_DATASETS
from .common import load_data_source

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Files `generate` and `evaluate` write beside the samples that are not samples.
NOT_SAMPLES = ("grid.png", "nearest.png")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score generated images against the training data (memorization, Fréchet distances)",
        description=(
            "Score samples against a reference (training) set: the fraction of samples that copy a training image "
            "(nearest / second-nearest ratio test), nearest-image distances, the Fréchet distance in pixels and, "
            "with --feature-model, in an encoder's features (FD_DINOv2). Writes metrics.json and nearest.png."
        ),
    )
    parser.add_argument(
        "samples",
        metavar="SAMPLES",
        help="a folder of images (e.g. from `generate`), or a pipeline folder / Hub repo id with --num-images",
    )
    parser.add_argument(
        "--reference",
        required=True,
        metavar="DATA",
        help=f"the training data: a built-in set ({', '.join(BUILTIN_DATASETS)}), a local image folder or a Hub "
        "data set id",
    )
    parser.add_argument(
        "--output-dir", default=None, help="where metrics.json and nearest.png go (default: SAMPLES/evaluation)"
    )
    parser.add_argument(
        "--feature-model",
        default=None,
        metavar="MODEL",
        help="a transformers vision encoder (Hub id or folder), e.g. facebook/dinov2-base: adds fd_features "
        "and memorized_fraction_features (needs `pip install 'diffusers-analytic[eval]'`)",
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help="images to generate (pipeline SAMPLES); a folder: the first N"
    )
    parser.add_argument("--seed", type=int, default=0, help="image i is generated from (seed, i), as `generate`")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps (pipeline SAMPLES)")
    parser.add_argument("--revision", default=None, help="Hub revision of a pipeline SAMPLES")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generation / feature batch")
    parser.add_argument("--ratio", type=float, default=1 / 3, help="ratio test: memorized when d1 <= ratio * d2")
    parser.add_argument(
        "--max-reference-queries",
        type=int,
        default=5000,
        help="reference images whose nearest other image gives the distance scale (evenly spaced)",
    )
    parser.add_argument("--grid-samples", type=int, default=16, help="samples shown in nearest.png")
    parser.add_argument("--grid-neighbors", type=int, default=3, help="nearest training images shown per sample")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    # The reference data, as `fit --data` reads it.
    parser.add_argument("--split", default="train", help="data set split of DATA (datasets sources)")
    parser.add_argument("--image-column", default=None, help="image column of DATA (detected if omitted)")
    parser.add_argument("--resolution", type=int, default=None, help="resize + center-crop DATA to this size")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 = grey, 3 = RGB (DATA)")
    parser.add_argument("--patch-size", type=int, default=32, help="crop size of the built-in `patches` set")
    parser.add_argument("--num-patches", type=int, default=2000, help="number of crops of the built-in `patches` set")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the built-in `patches` set")


def run(args) -> None:
    from ..evaluation import FeatureEncoder, evaluate_samples, nearest_neighbors
    from ..saving import write_json
    from .common import resolve_device

    for name in ("batch_size", "num_inference_steps", "grid_samples", "grid_neighbors", "max_reference_queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be positive, got {args.num_images}.")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in (0, 1], got {args.ratio}; 1/3 is the usual threshold.")
    kind = _samples_kind(args)
    output_dir = args.output_dir
    if output_dir is None:
        if kind != "folder":
            raise ValueError(f"SAMPLES {args.samples!r} is a pipeline; pass --output-dir for metrics.json.")
        output_dir = os.path.join(args.samples, "evaluation")
    device = resolve_device(args.device)  # a ValueError naming the devices of this machine

    # Load the encoder before any long computation, so that a wrong name fails at once.
    encoder = None
    if args.feature_model is not None:
        encoder = FeatureEncoder.from_pretrained(args.feature_model, device=device, batch_size=args.batch_size)
    reference = load_reference(args)  # [M, C, H, W]
    shape = tuple(reference.shape[1:])
    if kind == "folder":
        samples, names = read_sample_folder(args.samples, shape, args.num_images)
    else:
        samples, names = generate_samples(args, shape, device), [str(i) for i in range(args.num_images)]
    result = evaluate_samples(
        samples,
        reference,
        ratio=args.ratio,
        encoder=encoder,
        max_reference_queries=args.max_reference_queries,
        device=device,
        show_progress=True,
    )

    os.makedirs(output_dir, exist_ok=True)
    metrics = {"samples": args.samples, "reference": args.reference, **result.to_dict()}
    if kind == "pipeline":
        metrics.update(seed=args.seed, num_inference_steps=args.num_inference_steps)
    write_json(metrics, os.path.join(output_dir, "metrics.json"))
    shown = samples[: args.grid_samples]
    neighbors = nearest_neighbors(shown, reference, k=min(args.grid_neighbors, len(reference)), device=device)
    picture = nearest_picture(shown, reference, neighbors, result.memorization.memorized, names)
    _save_png(picture, os.path.join(output_dir, "nearest.png"))
    logger.info(f"Wrote {output_dir}/metrics.json and nearest.png")


# ---------------------------------------------------------------------------------------------- inputs
def _samples_kind(args) -> str:
    """`"folder"` (images) or `"pipeline"` (a pipeline folder or Hub repo id)."""
    from ..saving import is_repo_id

    source = args.samples
    if os.path.isdir(source):
        kind = "pipeline" if os.path.isfile(os.path.join(source, "model_index.json")) else "folder"
    elif os.path.exists(source) or not is_repo_id(source):
        raise ValueError(
            f"SAMPLES {source!r} is neither a folder of images nor a pipeline folder or Hub repo id; pass the folder "
            "`generate --output-dir` wrote."
        )
    else:
        kind = "pipeline"
    if kind == "pipeline" and args.num_images is None:
        raise ValueError(f"SAMPLES {source!r} is a pipeline; pass --num-images N to generate N samples to evaluate.")
    return kind


def load_reference(args):
    """The reference images, a tensor `[M, C, H, W]` (uint8 for 8-bit sources), read as `fit --data` reads them."""
    from ..kernels.stored_images import collect_images

    data = load_data_source(args.reference, args)
    data_kwargs = {
        key: value
        for key, value in (
            ("image_column", args.image_column),
            ("resolution", args.resolution),
            ("channels", args.channels),
        )
        if value is not None and args.reference not in BUILTIN_DATASETS
    }
    try:
        images, _, _ = collect_images(data, **data_kwargs)
    except ValueError as error:
        if args.resolution is None and "shape" in str(error):  # images of several sizes
            raise ValueError(
                f"The images of {args.reference} have several sizes ({str(error).rstrip('.')}); pass --resolution (and "
                "--channels) to bring them to one size."
            ) from error
        raise
    if len(images) < 2:
        raise ValueError(f"The reference {args.reference!r} has {len(images)} image; the ratio test needs at least 2.")
    logger.info(f"Reference: {len(images)} images of shape {list(images.shape[1:])} from {args.reference}.")
    return images


def sample_files(folder: str) -> list[str]:
    """The image files of a samples folder, sorted by name, without `grid.png` / `nearest.png` or hidden files."""
    names = sorted(
        name
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and name not in NOT_SAMPLES and not name.startswith(".")
    )
    return [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]


def read_sample_folder(folder: str, shape: tuple[int, int, int], num_images: int | None = None):
    """
    The images of `folder` as a uint8 tensor `[N, C, H, W]` of the reference's `shape = (C, H, W)`, and their file
    names without extension: other sizes are resized (shorter side) and center-cropped, other channel counts
    converted, with a log line. At most `num_images` (the first by name).
    """
    import numpy as np
    import torch
    from PIL import Image

    from ..data import pil_to_array

    files = sample_files(folder)[:num_images]
    if not files:
        raise ValueError(
            f"{folder} has no sample images ({', '.join(IMAGE_EXTENSIONS)}); pass the folder `generate --output-dir` "
            "wrote, or a pipeline with --num-images."
        )
    channels, height, width = shape
    arrays, converted = [], set()
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                if (image.height, image.width) != (height, width) or len(image.getbands()) != channels:
                    converted.add(f"{image.width}x{image.height} {image.mode}")
                arrays.append(pil_to_array(image, (height, width), channels))
        except OSError as error:
            raise ValueError(f"Cannot read {path} as an image ({error}); remove or regenerate it.") from error
    if converted:
        logger.warning(
            f"Samples of size {', '.join(sorted(converted))} differ from the reference's {width}x{height} with "
            f"{channels} channel(s): resized (shorter side, center crop) and converted to it."
        )
    names = [os.path.splitext(os.path.basename(path))[0] for path in files]
    return torch.from_numpy(np.stack(arrays)), names


def generate_samples(args, shape: tuple[int, int, int], device):
    """`--num-images` images of the pipeline SAMPLES, image i from `(seed, i)` as `generate` makes them: uint8
    `[N, C, H, W]` (through PNG-equal 8-bit pixels), resized to `shape` if the pipeline makes another size."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..data import pil_to_array
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
    from ..utils.seeding import generators_for_indices

    pipe = AnalyticDDIMPipeline.from_pretrained(args.samples, revision=args.revision)
    pipe.unet.to(device)
    pipe.set_progress_bar_config(disable=True)
    channels, height, width = shape
    arrays = []
    starts = range(0, args.num_images, args.batch_size)
    for start in tqdm(starts, desc="Generating", unit="batch"):
        indices = list(range(start, min(start + args.batch_size, args.num_images)))
        images = pipe(
            batch_size=len(indices),
            generator=generators_for_indices(args.seed, indices),
            num_inference_steps=args.num_inference_steps,
            output_type="pil",
        ).images
        arrays.extend(pil_to_array(image, (height, width), channels) for image in images)
    if (images[0].height, images[0].width, len(images[0].getbands())) != (height, width, channels):
        logger.warning(
            f"The pipeline makes {images[0].width}x{images[0].height} {images[0].mode} images and the reference is "
            f"{width}x{height} with {channels} channel(s): resized (shorter side, center crop) and converted."
        )
    return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------------------------------------- nearest.png
_CELL = 64  # minimum side of a shown image, in pixels
_LABEL = 14  # height of the text strip under each image
_GAP = 8  # blank columns between a sample and its neighbours


def nearest_picture(samples, reference, neighbors, memorized, names=None):
    """
    One row per sample: the sample (its name under it, `copy` when `memorized[row]`), then its nearest reference
    images (`neighbors`, a [`~evaluation.metrics.Neighbors`]) with their distances under them. Images are enlarged
    (nearest) to at least 64 pixels. Returns a PIL image.
    """
    from PIL import Image, ImageDraw

    from ..evaluation.features import to_pil_images

    height, width = samples.shape[2:]
    scale = max(1, math.ceil(_CELL / max(height, width)))
    cell_w, cell_h = width * scale, height * scale + _LABEL
    k = neighbors.indices.shape[1]
    canvas = Image.new("RGB", ((k + 1) * cell_w + _GAP, len(samples) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(image, column, row, label):
        x = column * cell_w + (_GAP if column else 0)
        y = row * cell_h
        canvas.paste(image.convert("RGB").resize((width * scale, height * scale), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + height * scale + 1), label, fill="black")

    for row, sample in enumerate(to_pil_images(samples)):
        name = str(row) if names is None else (str(int(names[row])) if names[row].isdigit() else names[row])
        paste(sample, 0, row, f"{name}{' copy' if bool(memorized[row]) else ''}")
        shown = to_pil_images(reference[neighbors.indices[row]])
        for column, (image, distance) in enumerate(zip(shown, neighbors.distances[row].tolist()), start=1):
            paste(image, column, row, f"d={distance:.3f}")
    return canvas


def _save_png(image, path: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
