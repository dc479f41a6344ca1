"""What several subcommands share: a `--device` value checked against the devices this machine has.

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
