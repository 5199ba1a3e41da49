"""The torch and DeepSpeed releases the launcher needs, checked before DeepSpeed is imported (standard library and
``packaging`` only): one line naming what is installed and what to install, instead of a TypeError mid-run.

torch >= 2.5: SDPA's ``enable_gqa`` and ``F.rms_norm``. DeepSpeed >= 0.19.8: 0.19.0-0.19.2 corrupt gradients under
torch.compile with ``overlap_comm`` (fixed in 0.19.3), and before 0.19.8 a single-GPU run can fail NCCL's
process-group init. < 0.20: the engine hooks the launcher uses are those of the 0.19 series. setup.py declares the
same ranges.
"""
from __future__ import annotations

import importlib.metadata
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

REQUIRED = {"torch": ">=2.5", "deepspeed": ">=0.19.8,<0.20"}


def installed_versions() -> dict[str, str | None]:
    found = {}
    for name in REQUIRED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def problems(installed: dict[str, str | None]) -> list[str]:
    """``"name version"`` for each package of REQUIRED that is absent or outside its range (``installed``: name ->
    version string, or None when absent). A version that packaging cannot read (a local build) passes."""
    bad = []
    for name, spec in REQUIRED.items():
        text = installed.get(name)
        try:
            ok = text is not None and SpecifierSet(spec).contains(Version(text), prereleases=True)
        except InvalidVersion:
            ok = True
        if not ok:
            bad.append(f"{name} {text or 'not installed'}")
    return bad


def message(bad: list[str]) -> str:
    fix = " ".join(f"'{n}{s}'" for n, s in REQUIRED.items() if any(b.split()[0] == n for b in bad))
    need = " and ".join(f"{n}{s}" for n, s in REQUIRED.items())
    return f"growlength needs {need}; found {', '.join(bad)}: pip install {fix} (torch: the build for your CUDA)"


def require() -> None:
    """Exit with one line on stderr (code 2: a bad environment) when torch or DeepSpeed is outside its range."""
    bad = problems(installed_versions())
    if bad:
        print(message(bad), file=sys.stderr)
        raise SystemExit(2)
