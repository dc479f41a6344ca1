"""`diffusers-analytic fit`: data -> fitted denoiser -> a saved pipeline folder.

Runs unchanged under `accelerate launch` / `torchrun`: for the methods whose statistics are sums over images
(`SHARDED_FIT_METHODS`), each process streams its shard of the data and the float64 sums are all-reduced, so the
result equals a single-process fit to float64 rounding; the data-holding methods store every image, so the main
process fits them alone (the others return at once). The main process saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..names import BUILTIN_DATASETS, METHODS
from .common import load_data_source

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)

# Methods whose `from_dataset` only streams moments (`fit_moments`), so that it accepts a `DataShard`.
SHARDED_FIT_METHODS = ("wiener",)
# Methods whose fit computes (float64 moments and an eigendecomposition) rather than only storing the images.
COMPUTING_FIT_METHODS = ("wiener", "pca_locality")


class ListConfigAction(argparse.Action):
    """`--list-config [METHOD]`: prints the `--config` keys of METHOD (the `--method` given before, or every method)
    with their defaults, and exits."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..registry import DENOISERS, config_options

        method = values or getattr(namespace, "method", None)
        if method is not None and method not in DENOISERS:
            parser.error(f"--list-config: unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        for name in [method] if method else METHODS:
            options = config_options(DENOISERS[name])
            print(f"{name} ({DENOISERS[name].__name__}):")
            for key, default in options.items():
                print(f"  {key}={json.dumps(default)}")
        parser.exit()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit a denoiser on a data set and save a pipeline folder",
        description="Fit an analytic denoiser and save an AnalyticDDIMPipeline folder (save_pretrained format).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", required=True, choices=METHODS, help="the denoiser")
    parser.add_argument(
        "--data",
        required=True,
        help=f"a built-in set ({', '.join(BUILTIN_DATASETS)}), a local image folder or a Hub data set id",
    )
    parser.add_argument("--output-dir", required=True, help="the pipeline folder to write")
    parser.add_argument("--split", default="train", help="data set split (datasets sources)")
    parser.add_argument("--image-column", default=None, help="image column (detected if omitted)")
    parser.add_argument("--label-column", default=None, help="label column (detected if omitted)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="resize + center-crop to this size (datasets sources)"
    )
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="1 = grey, 3 = RGB (datasets sources)"
    )
    parser.add_argument("--patch-size", type=int, default=32, help="crop size of the built-in `patches` set")
    parser.add_argument("--num-patches", type=int, default=2000, help="number of crops of the built-in `patches` set")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the built-in `patches` set")
    parser.add_argument("--batch-size", type=int, default=256, help="images per streamed batch while fitting")
    parser.add_argument(
        "--device",
        default=None,
        help="where the wiener / pca_locality fit computes its float64 moments and eigendecomposition: cpu (default), "
        "cuda (this process's GPU), cuda:1; the saved model is the same",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a denoiser option, e.g. --config rank=64 --config prediction_type=v_prediction (JSON values); "
        "--list-config shows each method's keys",
    )
    parser.add_argument(
        "--list-config",
        action=ListConfigAction,
        nargs="?",
        metavar="METHOD",
        help="list the --config keys and defaults of METHOD (or of the --method given before, or of every method) "
        "and exit",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def parse_overrides(pairs: list[str]) -> dict:
    """`["rank=64", "beta_schedule=linear"]` -> `{"rank": 64, "beta_schedule": "linear"}` (values parsed as JSON)."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config expects KEY=VALUE, got {pair!r}.")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def load_data(args):
    """`--data` as a data source (see `common.load_data_source`)."""
    return load_data_source(args.data, args)


def run(args) -> None:
    import torch
    from accelerate import PartialState
    from diffusers.utils import logging as diffusers_logging

    from ..data import check_data_source
    from ..distributed import shard_data
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
    from ..registry import check_config, get_denoiser_class
    from ..saving import save_atomically
    from .common import resolve_device

    denoiser_class = get_denoiser_class(args.method)
    config = parse_overrides(args.config)
    check_config(denoiser_class, config)  # before the data pass
    if args.device is not None and args.method not in COMPUTING_FIT_METHODS:
        raise ValueError(
            f"--device applies to the fits that compute ({', '.join(COMPUTING_FIT_METHODS)}); {args.method} only "
            "stores the images."
        )
    device = None if args.device is None else resolve_device(args.device)  # a ValueError naming the devices here
    state = PartialState(cpu=not torch.cuda.is_available())
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise ValueError(f"{os.path.abspath(args.output_dir)} exists; pass --overwrite to replace it.")
    check_data_source(args.data)  # a typo or a missing folder, before any Hub request
    state.wait_for_everyone()  # every process has looked at the output folder before the main one writes it
    if not state.is_main_process:
        diffusers_logging.set_verbosity_warning()
    if args.device == "cuda":
        device = state.device  # this process's GPU under `accelerate launch` (cuda:<local rank>)
    fit_options = {} if device is None else {"device": device}
    data_kwargs = {
        key: value
        for key, value in (
            ("image_column", args.image_column),
            ("label_column", args.label_column),
            ("resolution", args.resolution),
            ("channels", args.channels),
        )
        if value is not None
    }
    data = load_data(args) if state.is_main_process or args.method in SHARDED_FIT_METHODS else None
    if state.num_processes > 1:
        if args.method not in SHARDED_FIT_METHODS:
            # No collective follows, so the other processes need not wait (and cannot time out) for a long fit.
            if not state.is_main_process:
                return
            logger.info(f"{args.method} stores every image: the main process fits it alone.")
        else:
            data = shard_data(data, state)
            logger.info(f"Fitting {args.method} on {state.num_processes} processes, each on its shard of the data.")
    denoiser = denoiser_class.from_dataset(
        data, batch_size=args.batch_size, show_progress=state.is_main_process, **fit_options, **data_kwargs, **config
    )
    if state.is_main_process:
        save_atomically(AnalyticDDIMPipeline(unet=denoiser), args.output_dir, overwrite=args.overwrite)
        logger.info(f"Saved the {args.method} pipeline to {args.output_dir}")
