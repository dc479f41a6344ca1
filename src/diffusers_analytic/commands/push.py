"""`diffusers-analytic push`: upload a folder built earlier (`build` or `fit`) to the Hub as one commit."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a built pipeline folder to the Hub",
        description="Upload a pipeline folder written by `build` (or `fit`) to a Hub model repo, as one commit.",
    )
    parser.add_argument("folder", metavar="DIR", help="the pipeline folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repo, org/name (created if missing)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="the branch to push to (created if missing)")
    parser.add_argument("--token", default=None, help="a Hub token (default: the stored login)")
    parser.add_argument("--commit-message", default=None, help="message of the commit (default: names the denoiser)")


def run(args) -> None:
    from ..hub import push_folder

    push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
    )
