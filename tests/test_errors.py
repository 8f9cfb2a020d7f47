"""One program name per command (issue 19.9): every one-line error reads ``python -m <module>: error: ...``, the
module the user ran, whatever ``sys.argv[0]`` is (``__main__.py``, ``linear.py``, a chaos victim's wrapper)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctbench.errors import UserError, cli_main, program_name

REPO = Path(__file__).resolve().parent.parent


def test_program_name_from_the_module(monkeypatch):
    assert program_name("transfer.linear") == "python -m transfer.linear"
    assert program_name("pretrain.__main__") == "python -m pretrain"

    class Spec:
        name = "transfer.semisup"

    main_module = type(sys)("__main__")
    main_module.__spec__ = Spec()
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    assert program_name("__main__") == "python -m transfer.semisup"
    Spec.name = "pretrain.__main__"
    assert program_name("__main__") == "python -m pretrain"
    main_module.__spec__ = None  # a file run as a script
    monkeypatch.setattr(sys, "argv", ["/somewhere/tool.py"])
    assert program_name("__main__") == "python tool.py"


def test_cli_main_ignores_argv0(monkeypatch, capsys):
    @cli_main
    def main() -> int:
        raise UserError("bad value (set x=1)")

    monkeypatch.setattr(sys, "argv", ["/repo/transfer/linear.py"])
    assert main() == 2
    assert capsys.readouterr().err == f"python -m {__name__}: error: bad value (set x=1)\n"


def test_the_error_line_is_one_write(monkeypatch):
    """torchrun's ranks share one stderr: under PYTHONUNBUFFERED a line written in two parts (print's text, then its
    newline) interleaves with another rank's into one line (a CI failure of the DDP unreadable-batch test)."""
    writes = []

    class Stderr:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    @cli_main
    def main() -> int:
        raise UserError("every step of epoch 0 had a batch with no readable image")

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert main() == 2
    assert writes == [f"python -m {__name__}: error: every step of epoch 0 had a batch with no readable image\n"]


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTBENCH_OUTPUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("CTBENCH_TRACEBACK", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize("argv, prog", [
    (["-m", "transfer.linear", "--ckpt", "/nonexistent/x.pth.tar"], "python -m transfer.linear"),
    (["-m", "pretrain", "--method", "moco_v2", "loss.tua=1"], "python -m pretrain"),
    (["-m", "orchestrate.chaos", "victim", "semisup", "--", "--pct", "1", "--ckpt", "/nonexistent/x.pth.tar"],
     "python -m transfer.semisup"),
])
def test_commands_name_themselves(argv, prog, tmp_path):
    p = _run(*argv, tmp_path=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
