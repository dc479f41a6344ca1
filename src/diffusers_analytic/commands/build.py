"""`diffusers-analytic build`: a hub config (`hub_configs/*.yaml`) -> a repo folder (pipeline, sample grid, model
card), optionally pushed to the Hub."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a Hub repo folder (pipeline + model card + sample grid) from a hub config",
        description=(
            "Fit the method of a hub config (hub_configs/*.yaml) on its data set, save the pipeline with a model card "
            "and a sample grid, and optionally push it to the Hub."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", help="a hub config YAML file")
    parser.add_argument("--output-dir", default=None, help="the folder to write (default: outputs/<repo name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", action="store_true", help="upload the folder when it is built")
    parser.add_argument("--repo-id", default=None, help="the Hub repo (default: the config's repo_id)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="the branch to push to (created if missing)")
    parser.add_argument("--token", default=None, help="a Hub token (default: the stored login)")
    parser.add_argument("--commit-message", default=None, help="message of the upload commit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> None:
    from .. import hub

    config = hub.load_hub_config(args.config)
    if args.repo_id is not None:
        config.repo_id = hub.check_repo_id(args.repo_id)
    output_dir = args.output_dir or os.path.join("outputs", config.repo_id.split("/")[-1])
    hub.build(config, output_dir, overwrite=args.overwrite, show_progress=not args.no_progress)
    logger.info(f"Wrote {output_dir}")
    if args.push_to_hub:
        commit_message = args.commit_message or f"Build {config.repo_id} from {os.path.basename(args.config)}"
        hub.push_folder(
            output_dir,
            config.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=commit_message,
        )
