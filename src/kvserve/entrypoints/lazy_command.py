"""Subcommands whose module is imported only when the subcommand is used.

`kvserve --help` lists every subcommand from its name and help line alone. The module
that adds a subcommand's options and runs it (the server, each benchmark) is imported
the first time that subcommand's parser parses, so the help stays fast, and a
subcommand whose module needs an optional extra that is not installed says how to
install it instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# The optional extras of pyproject.toml that subcommands need, and the top-level modules each one installs.
EXTRAS: dict[str, tuple[str, ...]] = {"bench": ("httpx", "matplotlib")}


@dataclass(frozen=True)
class LazyCommand:
    """A subcommand that lives in `module`: `add_arguments(parser)` adds its options, `run(args)` runs it."""

    help: str
    module: str
    add_arguments: str
    run: str
    extra: str | None = None  # the key of EXTRAS that `module` needs


class LazyCommandParser(argparse.ArgumentParser):
    """An ArgumentParser that, given a `command`, loads the command's options when it first parses."""

    def __init__(self, *args: Any, command: LazyCommand | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command = command

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._command is not None:
            command, self._command = self._command, None
            module = self._import(command)
            getattr(module, command.add_arguments)(self)
            self.set_defaults(func=getattr(module, command.run))
        return super().parse_known_args(args, namespace)

    def _import(self, command: LazyCommand) -> ModuleType:
        """The command's module; exit status 2 with the pip command when an extra it needs is missing."""
        try:
            return importlib.import_module(command.module)
        except ImportError as error:
            missing = (error.name or "").partition(".")[0]
            if command.extra is None or missing not in EXTRAS[command.extra]:
                raise
            self.exit(2, f"kvserve: error: `{self.prog}` needs the optional [{command.extra}] dependencies "
                         f"({missing} is missing); install them with: pip install 'kvserve[{command.extra}]'\n")
