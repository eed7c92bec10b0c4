"""`slimlm generate --choice / --json-schema / --regex` end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("llguidance", reason="structured output needs: pip install 'slimlm[structured]'")
jsonschema = pytest.importorskip("jsonschema")


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "slimlm.cli",
            "generate",
            "--chat",
            "-q",
            "--json",
            "--max-tokens",
            "30",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_generate_with_a_schema_file_and_a_choice(tmp_path):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    run = _generate("Is water wet?", "Is fire cold?", "--json-schema", str(path))
    assert run.returncode == 0, run.stderr
    for line in run.stdout.splitlines():
        jsonschema.validate(json.loads(json.loads(line)["text"]), schema)
    run = _generate("Pick one.", "--choice", "alpha", "beta", "--max-tokens", "5")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"] in ("alpha", "beta")


def test_generate_with_an_unsupported_regex_is_a_one_line_error():
    run = _generate("hi", "--regex", "(?=x)y")
    assert run.returncode == 2
    assert run.stderr.startswith("error: the regex cannot be used") and "Traceback" not in run.stderr
