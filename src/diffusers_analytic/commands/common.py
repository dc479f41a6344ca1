"""What several subcommands share: a `--device` value checked against the devices this machine has, and a data
source read the way `fit --data` reads it.

Like every command module, it imports torch only inside its functions, so that `--help` stays fast.
"""

from __future__ import annotations


def available_devices() -> list[str]:
    """The devices torch can use here: `cpu`, then `cuda:0` .. `cuda:<n-1>` and `mps` where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | None, default=None):
    """
    `--device NAME` as a `torch.device` (`default` when not given), or a ValueError naming the value and the
    devices this machine has: no silent fallback to the CPU.
    """
    import torch

    if name is None:
        return torch.device(default or ("cuda" if torch.cuda.is_available() else "cpu"))
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    usable = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and "mps" in available and not device.index)
    )
    if not usable:
        raise ValueError(f"--device {name!r} is not a device of this machine; use one of {', '.join(available)}.")
    return device


def load_data_source(source: str, args):
    """
    A data source named on the command line (a built-in set, a local image folder or a Hub data set id) as `fit
    --data` reads it; `args` carries `--split`, `--channels` and the built-in `patches` options (`--patch-size`,
    `--num-patches`, `--data-seed`).
    """
    from ..data import load_image_dataset
    from ..names import BUILTIN_DATASETS

    if source == "patches":
        return load_image_dataset(
            "patches",
            size=args.patch_size,
            num_images=args.num_patches,
            seed=args.data_seed,
            channels=args.channels or 3,
        )
    if source in BUILTIN_DATASETS:
        return load_image_dataset(source)
    return load_image_dataset(source, split=args.split)
