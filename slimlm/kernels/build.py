"""Compile slimlm's C kernels once per machine with the system C compiler, and load them with ctypes.

Plain C (no torch headers) compiles in about a second, so the build happens on first use and is cached
under ~/.cache/slimlm/kernels (or $SLIMLM_KERNEL_CACHE), keyed by the source, the flags, the compiler
and the CPU. Without a compiler the engine keeps its PyTorch path: `load_kernel` then returns None and
`kernel_unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _flags() -> tuple[str, ...]:
    """FLAGS plus $SLIMLM_KERNEL_CFLAGS (e.g. "-mno-avx512f" builds the portable loops, for tests)."""
    return FLAGS + tuple(os.environ.get("SLIMLM_KERNEL_CFLAGS", "").split())


_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    root = os.environ.get("SLIMLM_KERNEL_CACHE") or Path.home() / ".cache" / "slimlm" / "kernels"
    return Path(root)


def _cpu_signature() -> str:
    """-march=native code only runs where the CPU has the same features: the flags go into the key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def load_kernel(name: str) -> ctypes.CDLL | None:
    """Build (if needed) and load `<name>.c` from this package; None when it cannot be built here."""
    if os.environ.get("SLIMLM_NO_C_KERNELS"):
        _reasons[name] = "disabled by SLIMLM_NO_C_KERNELS"
        return None
    if platform.system() != "Linux":
        _reasons[name] = f"C kernels are built on Linux only (this is {platform.system()})"
        return None
    cc = _compiler()
    if cc is None:
        _reasons[name] = "no C compiler found (install gcc, or set CC)"
        return None
    # The .c file and every header beside it: a change to any of them is a new library.
    source = b"".join(
        path.read_bytes() for path in [SOURCE_DIR / f"{name}.c", *sorted(SOURCE_DIR.glob("*.h"))]
    )
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join(_flags()).encode(), _compiler_version(cc).encode(), _cpu_signature().encode()]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    for attempt in range(2):  # a cached file that is not our library (garbage, another .so) is rebuilt once
        if not target.exists():
            error = _compile(cc, SOURCE_DIR / f"{name}.c", target)
            if error:
                _reasons[name] = error
                return None
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            _reasons[name] = f"could not load {target}: {exc}"
            lib = None
        if lib is not None:
            missing = [f for f in _exported_functions(SOURCE_DIR / f"{name}.c") if not hasattr(lib, f)]
            if not missing:
                return lib
            _reasons[name] = f"{target} is not slimlm's {name} library (no {missing[0]})"
            _unload(lib)  # else dlopen would hand back this library again for the rebuilt path
        if attempt == 0:
            try:
                target.unlink()
            except OSError:
                return None
    return None


def _unload(lib: ctypes.CDLL) -> None:
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)
    except (ImportError, AttributeError, OSError):
        pass


_EXPORTED = re.compile(r"^(?!static\b)[A-Za-z_][\w \t*]*?\b(\w+)\s*\(", re.MULTILINE)


def _exported_functions(source: Path) -> list[str]:
    """Names of the functions `source` defines at file scope without `static` (what the .so exports)."""
    return _EXPORTED.findall(source.read_text())


def _compile(cc: str, source: Path, target: Path) -> str | None:
    """Compile to a temporary name, then rename: a concurrent build or a crash never leaves half a file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        return f"cannot write the kernel cache {target.parent}: {exc} (set SLIMLM_KERNEL_CACHE)"
    try:
        done = subprocess.run(
            [cc, *_flags(), "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return f"{Path(cc).name} failed on {source.name}: {last}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{Path(cc).name} could not run: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def kernel_unavailable_reason(name: str) -> str | None:
    return _reasons.get(name)
