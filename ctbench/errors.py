"""User-facing errors: one clear line and exit code 2, never a traceback for a user mistake."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """A mistake the user can fix (bad argument, bad file, bad value). Printed as one line, exit code 2."""


def choices_error(what: str, value: object, choices: Iterable[str]) -> UserError:
    """``unknown loss 'jlc'; choose from co2, eqco, jcl, moco``."""
    return UserError(f"unknown {what} {value!r}; choose from {', '.join(sorted(choices))}")


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line entry point: UserError -> one line on stderr + exit 2; Ctrl-C -> exit 130.

    Set ``CTBENCH_TRACEBACK=1`` to see the full traceback of a UserError.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("CTBENCH_TRACEBACK"):
                raise
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ctbench"
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
