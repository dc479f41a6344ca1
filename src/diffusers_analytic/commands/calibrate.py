"""`diffusers-analytic calibrate MACHINE TRAINED`: fit the patch-size schedule of an LS / ELS machine to a trained model.

Kamb & Ganguli (arXiv 2412.20292) choose, at every step of a reverse process, the patch size k whose machine best
predicts the trained network. `diffusers_analytic.evaluation.calibrate_patch_sizes` does the same on the trained
pipeline's DDIM trajectory (the k with the highest median R^2 of x0 predictions wins each step); this command writes
the resulting log-SNR breakpoints into the machine's `patch_size_schedule` and saves the pipeline to `--output-dir`
atomically, with `calibration.json` (the R^2 table) beside the weights.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)

DEFAULT_CANDIDATES = "1,3,5,7,9,11,13,15,17,19,21,23,25,27"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate the patch-size schedule of an LS / ELS pipeline against a trained pipeline",
        description=(
            "Choose the patch size of an LS / ELS machine at every step of the trained pipeline's DDIM trajectory (the "
            "one maximising the median R^2 of x0 predictions) and save the machine with that schedule."
        ),
    )
    parser.add_argument("machine", metavar="MACHINE", help="an LS or ELS pipeline folder or Hub repo id")
    parser.add_argument(
        "trained",
        metavar="TRAINED",
        help="a trained diffusers pipeline folder or Hub repo id with `unet` and `scheduler` (an analytic one works too)",
    )
    parser.add_argument("--output-dir", required=True, help="the calibrated pipeline folder to write")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="odd patch sizes to try, comma separated")
    parser.add_argument("--num-samples", type=int, default=8, help="trajectories scored (the median is over these)")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="DDIM steps of the trained trajectory")
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from the noise of (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def parse_candidates(text: str) -> list[int]:
    """`"3,5,7"` -> `[3, 5, 7]`; every entry an odd positive integer, else a ValueError naming it."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) % 2 == 0 or int(item) < 1:
            raise ValueError(
                f"--candidates must be odd positive integers separated by commas, got {item!r} in {text!r}."
            )
        sizes.append(int(item))
    return sorted(set(sizes))


def run(args) -> None:
    from ..evaluation import calibrate_patch_sizes, load_trained
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
    from ..saving import save_atomically, write_json
    from .common import resolve_device

    if min(args.num_inference_steps, args.num_samples, args.batch_size) < 1:
        raise ValueError("--num-inference-steps, --num-samples and --batch-size must be positive.")
    candidates = parse_candidates(args.candidates)
    output_dir = os.path.abspath(args.output_dir)
    if os.path.exists(output_dir) and not args.overwrite:
        raise ValueError(f"{output_dir} exists; pass --overwrite to replace it.")
    device = resolve_device(args.device)
    pipeline = AnalyticDDIMPipeline.from_pretrained(args.machine)
    machine = pipeline.unet.to(device)
    unet, scheduler = load_trained(args.trained)
    unet.to(device).eval()

    calibration = calibrate_patch_sizes(
        machine,
        unet,
        scheduler,
        candidates,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
    )
    machine.set_patch_size_schedule(calibration.schedule)
    report = {
        "machine": args.machine,
        "trained": args.trained,
        "num_samples": args.num_samples,
        "seed": args.seed,
        **calibration.to_dict(),
    }
    save_atomically(
        pipeline.to("cpu"),
        output_dir,
        overwrite=args.overwrite,
        write_extra=lambda folder: write_json(report, os.path.join(folder, "calibration.json")),
    )
    table = ", ".join(f"t={t}: k={k}" for t, k in zip(calibration.timesteps, calibration.patch_sizes))
    logger.info(f"Calibrated patch sizes ({table}); saved the machine to {output_dir}")
    logger.info(json.dumps(calibration.schedule))
