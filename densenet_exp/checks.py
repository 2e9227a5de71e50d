"""One message for a value that cannot work: one line naming the key, the value and what is allowed.

The config checks (validate.py), the model constructors used as a library and the command-line
tools all raise it through `require`, so a bad knob reads the same wherever it comes from.
Torch-free, so the light tools import it cheaply.
"""

from __future__ import annotations

import argparse
import functools
import re
import reprlib
import sys
from collections.abc import Callable
from numbers import Real
from typing import Any

# The exit codes of every entry point: 2 bad input, 3 refused (another process holds the run or
# plan), 74 no room to write a file (EX_IOERR; the run resumes once there is room), 75 the
# tracking server stayed unreachable (EX_TEMPFAIL: try again later).
EXIT_BAD_INPUT, EXIT_BUSY, EXIT_NO_ROOM, EXIT_STORE_DOWN = 2, 3, 74, 75

# A name that becomes a folder (an experiment's artifacts, a report's folder): one safe path
# component, never `..`, `/` or a leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,199}")


class OneLineError(Exception):
    """An error a command-line tool reports as one line, `error: <message>`, exiting with
    `exit_code` (entry_point below): bad input, a refusal, a store that is down."""

    exit_code = EXIT_BAD_INPUT


class InvalidValue(OneLineError, ValueError):
    """A value that cannot work; the message names the key, the value and what is allowed."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' one-line errors: a bad or missing flag prints `error: <prog>:
    <message> (--help lists the flags)` and exits EXIT_BAD_INPUT, without the usage block.
    Subcommand parsers are of the same class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (--help lists the flags)\n")


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """The one error boundary of every command-line tool (`report`, `export`, `replay`, `search`,
    `study`): a OneLineError raised anywhere below `main` becomes its line on stderr and its exit
    code, never a traceback. Tools add a hint of their own only where they know one (a store's key)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OneLineError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code

    return run


# A value as a message quotes it: a few hundred characters at most, however large it is (a
# plan's YAML can expand to gigabytes), computed without writing the whole value out.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 2, 200, 200, 60
_QUOTE.maxdict = _QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = 6
QUOTE_CHARS = 300


def quoted(value: Any) -> str:
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise InvalidValue naming `key`, `value` (quoted) and what is `allowed` unless `ok`."""
    if not ok:
        raise InvalidValue(f"{key}={quoted(value)} is invalid: expected {allowed}")


def require_flag(flag: str, text: str, ok: bool, allowed: str) -> None:
    """`require` for an argparse type function: argparse prints an ArgumentTypeError's own message
    (after the usage line), naming the flag."""
    try:
        require(flag, text, ok, allowed)
    except InvalidValue as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def is_int(value: Any) -> bool:
    """An integer, not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def require_int(key: str, value: Any, low: int) -> None:
    """An integer >= `low`."""
    require(key, value, is_int(value) and value >= low, f"an integer >= {low}")


def require_name(key: str, value: Any) -> str:
    """`value` if it is a safe name (SAFE_NAME): every name that reaches the file system passes here."""
    require(key, value, isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None,
            "a name of letters, digits, '_', '-', '.' and spaces that starts with a letter or digit "
            "(it names a folder)")
    return value
