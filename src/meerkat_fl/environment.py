"""What a run ran on: package versions, Python, device, dtype and threads (written into every run folder)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

import torch

# Distribution names whose versions decide a run's numbers (None in the record when not installed).
PACKAGES = ("meerkat-fl", "torch", "transformers", "peft", "flwr", "datasets")


def package_version(name: str) -> str | None:
    """Installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    """A readable name for a torch device string ("cpu", "cuda:0", ...): the accelerator's model when known."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    if kind == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    return kind


def environment(device: str, dtype: str) -> dict[str, Any]:
    """The environment record: versions of PACKAGES and Python, the platform, device, dtype, threads."""
    return {
        "versions": {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES}},
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
