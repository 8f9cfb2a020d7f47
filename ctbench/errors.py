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


def program_name(module: str) -> str:
    """``python -m transfer.linear`` for the entry point defined in module ``module`` (how the user runs it).

    ``__main__`` (the module run by ``python -m X``, or ``torchrun -m X``) is named after the module it was run as;
    a package's ``X.__main__`` is ``python -m X``. A file run as a script is ``python <file>``.
    """
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name:
            return f"python {os.path.basename(sys.argv[0])}" if sys.argv and sys.argv[0] else "python"
        module = spec.name
    if module.endswith(".__main__"):
        module = module[: -len(".__main__")]
    return f"python -m {module}"


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line entry point: UserError -> one line on stderr + exit 2; Ctrl-C -> exit 130.

    The line reads ``python -m <module>: error: <message>``, the module being the one that defines ``fn`` (whatever
    ``sys.argv[0]`` is: ``__main__.py``, ``linear.py``, a wrapper's name). Set ``CTBENCH_TRACEBACK=1`` to see the
    full traceback of a UserError.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("CTBENCH_TRACEBACK"):
                raise
            # one write of the whole line: with PYTHONUNBUFFERED, print() issues the text and its newline as two
            # writes, and the lines of processes sharing one stderr (torchrun's ranks) interleave into one
            sys.stderr.write(f"{program_name(fn.__module__)}: error: {e}\n")
            sys.stderr.flush()
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
