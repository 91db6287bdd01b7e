"""The [bench] extra is optional: the core imports and runs without it, and `kvserve bench` says how to get it.

The running checks use a fresh interpreter whose `sys.meta_path` starts with a finder
that refuses every module of the extra, as if it were not installed; a static one reads
every import of src/kvserve, the lazy ones too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvserve.entrypoints.cli import BENCH_COMMANDS
from kvserve.entrypoints.lazy_command import EXTRAS
from test_import_graph import SRC, imported_names, module_files

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = EXTRAS["bench"]

BLOCKER = f"""
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""

CORE = """
import contextlib
import io

import kvserve
import kvserve.entrypoints.cli
from kvserve.entrypoints.cli import build_parser, main

help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    build_parser().parse_args(["bench", "--help"])
lazy = sorted(m for m in sys.modules if m.startswith(("kvserve.bench", "kvserve.entrypoints.openai", "kvserve.estimate")))
assert not lazy, f"building the parser and `kvserve bench --help` imported {lazy}"
assert all(name in help_text.getvalue() for name in ("serve", "throughput", "latency", "ablation")), help_text.getvalue()

import kvserve.entrypoints.openai.server
import kvserve.entrypoints.chat
import kvserve.estimate.cli
import kvserve.estimate.dummy_model

parser = build_parser()
assert parser.parse_args(["serve", "--port", "8001"]).port == 8001
assert parser.parse_args(["generate", "hi"]).prompt == "hi"
assert main(["estimate", "--preset", "gpt2", "--hardware", "a100-40gb", "--json"]) == 0
assert not {m.partition(".")[0] for m in sys.modules} & set(BLOCKED)
"""


def _run_without_extra(code: str, *argv: str) -> subprocess.CompletedProcess:
    """`python -c code argv...` on this tree's kvserve, with the extra's modules refused."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})


def test_the_blocked_modules_are_the_bench_extra_of_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert tuple(sorted(re.split(r"[\s;<>=!~\[]", req)[0] for req in extras["bench"])) == tuple(sorted(BLOCKED))
    assert "kvserve[bench]" in extras["dev"]


def test_only_the_benchmarks_import_the_bench_extra() -> None:
    outside_bench = {m: path for m, path in module_files(SRC, "kvserve").items() if not m.startswith("kvserve.bench")}
    importers = sorted(m for m, path in outside_bench.items()
                       if {name.partition(".")[0] for name in imported_names(m, path)} & set(BLOCKED))
    assert importers == []


def test_the_core_imports_and_runs_without_the_bench_extra() -> None:
    result = _run_without_extra(CORE)
    assert result.returncode == 0, result.stderr


def test_estimate_plot_without_the_extra_names_the_pip_command(tmp_path) -> None:
    code = ("import sys\nfrom kvserve.estimate.cli import main\n"
            "sys.exit(main(['--preset', 'gpt2', '--hardware', 'l4', '--plot', sys.argv[1]]))\n")
    result = _run_without_extra(code, str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "plot: drawing needs the optional [bench] dependencies (matplotlib is missing)" in result.stderr
    assert "pip install 'kvserve[bench]'" in result.stderr


@pytest.mark.parametrize("command", list(BENCH_COMMANDS))
def test_a_bench_command_without_the_extra_names_the_pip_command(command: str) -> None:
    kvserve = "import runpy\nrunpy.run_module('kvserve.entrypoints.cli', run_name='__main__')\n"
    result = _run_without_extra(kvserve, "bench", command, "--help")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert re.fullmatch(rf"kvserve: error: `kvserve bench {command}` needs the optional \[bench\] dependencies "
                        r"\((httpx|matplotlib) is missing\); install them with: pip install 'kvserve\[bench\]'\n",
                        result.stderr)
