"""`slimlm serve --replicas` refuses bad input with one line, quickly, before any Ray process starts."""

from __future__ import annotations

import sys
import time

import pytest

from slimlm.cli import main


def serve(capsys, *extra: str) -> tuple[int, str]:
    code = main(["serve", "--port", "0", *extra])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--replicas", "-2"], "--replicas must be at least 1"),
        (["--replicas", "3", "--min-replicas", "1", "--max-replicas", "2"], "--min-replicas <= --replicas"),
        (["--replicas", "1", "--threads", "0"], "--threads must be positive"),
        (["--replicas", "1", "--ray-address", "nonsense"], "--ray-address must be 'auto' or HOST:PORT"),
    ],
)
def test_bad_replica_settings_are_one_line_errors(capsys, flags, message):
    pytest.importorskip("ray", reason="install slimlm[cluster]")
    code, err = serve(capsys, *flags)
    assert code != 0 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unreachable_ray_address_fails_fast(capsys):
    pytest.importorskip("ray", reason="install slimlm[cluster]")
    start = time.monotonic()
    code, err = serve(capsys, "--replicas", "1", "--ray-address", "127.0.0.1:1")  # nothing listens there
    assert code != 0 and "cannot reach Ray at 127.0.0.1:1" in err and len(err.splitlines()) == 1
    assert time.monotonic() - start < 20
    import ray

    assert not ray.is_initialized()


def test_missing_ray_gives_the_install_hint(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    code, err = serve(capsys, "--replicas", "2")
    assert code != 0 and "pip install 'slimlm[cluster]'" in err and len(err.splitlines()) == 1
