"""Evaluation texts by name: slices of text that ships with Python or the system, which nobody here
wrote or tuned on. `pydoc` and `tune` are the disjoint evaluation and calibration slices of
pydoc_data.topics (slimlm/quant/calibration.py); `gpl3` is the GNU GPL v3 as Debian ships it in
/usr/share/common-licenses (plain English legal prose, a different register from pydoc's)."""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError

GPL3_PATH = Path("/usr/share/common-licenses/GPL-3")
TEXT_NAMES = ("pydoc", "gpl3", "tune")


def named_text(name: str) -> str:
    from slimlm.quant.calibration import calibration_text, eval_text

    if name == "pydoc":
        return eval_text()
    if name == "tune":
        return calibration_text()
    if name == "gpl3":
        if not GPL3_PATH.is_file():
            raise SlimlmError(f"{GPL3_PATH} is missing on this system; use --corpus FILE instead")
        return GPL3_PATH.read_text(encoding="utf-8")
    raise SlimlmError(f"unknown text {name!r}; choose one of {', '.join(TEXT_NAMES)}, or give --corpus FILE")
