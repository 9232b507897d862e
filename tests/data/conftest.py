"""Run the converters in scripts/data/ (in this process, through their `main(argv)`) and read their parquet back."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

DATA_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "data"


_MODULES: dict[str, object] = {}


def _load(script: str):
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"opd_data_{Path(script).stem}", DATA_SCRIPTS / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


def _run(script: str, args: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _load(script).main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def run_converter():
    """run_converter(script, args) -> namespace(returncode, stdout, stderr), running the script's main(argv)."""
    return _run


@pytest.fixture
def run_converter_cli():
    """run_converter_cli(script, args) -> CompletedProcess: the script as a separate `python script.py` process."""

    def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(DATA_SCRIPTS / script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture
def read_rows():
    """read_rows(path) -> list of row dicts (nested columns as dicts/lists)."""
    return lambda path: pq.read_table(path).to_pylist()


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, records, raw_lines=()) writes records as JSON lines plus raw (possibly broken) lines."""

    def write(path: Path, records: list, raw_lines: tuple[str, ...] = ()) -> Path:
        lines = [json.dumps(r) for r in records] + list(raw_lines)
        path.write_text("\n".join(lines) + "\n")
        return path

    return write
