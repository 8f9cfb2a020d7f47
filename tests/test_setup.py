"""The setup path: the pins agree across the files that install things, the Makefile's entry points exist and
set up what they need, and ``scripts/setup.sh`` is idempotent through its stamp (a second ``make setup`` is a no-op).

The Dockerfile cannot be built here (no registry for base images), so its agreement with pyproject.toml and the
constraints file is checked by parsing all three.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
DETECTRON2_REQS = REPO / "requirements" / "detectron2.txt"

# The targets issue 2 asks for; every one but `setup` and `clean` needs the venv, and these need the toy data too.
TARGETS = ("setup", "data", "demo", "test", "pretrain", "convert", "transfer", "lincls", "semisup", "tables", "bench",
           "clean")
# Targets that read the toy data when DETECTRON2_DATASETS is the default root (and generate what is missing there).
NEED_DATA = ("pretrain", "transfer", "lincls", "semisup", "sweep", "chaos")
# python3 of the Ubuntu releases NVIDIA's CUDA images are built on
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


def read_requirements(path: Path) -> list[Requirement]:
    """Requirement lines of a pip requirements/constraints file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def by_name(reqs: list[Requirement]) -> dict[str, SpecifierSet]:
    out: dict[str, SpecifierSet] = {}
    for r in reqs:
        name = canonicalize_name(r.name)
        out[name] = out.get(name, SpecifierSet()) & r.specifier
    return out


def pinned(spec: SpecifierSet) -> Version | None:
    """The version of an exact ``==`` pin, else None."""
    exact = [s for s in spec if s.operator in ("==", "===") and "*" not in s.version]
    return Version(exact[0].version) if exact else None


def upper_bounds(spec: SpecifierSet) -> set[tuple[str, Version]]:
    return {(s.operator, Version(s.version)) for s in spec if s.operator in ("<", "<=")}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_elsewhere() -> dict[str, dict[str, SpecifierSet]]:
    """{source: {package: specifier}} for every place other than constraints.txt that names a requirement."""
    proj = pyproject()
    sources = {
        "pyproject [build-system]": [Requirement(r) for r in proj["build-system"]["requires"]],
        "pyproject [project] dependencies": [Requirement(r) for r in proj["project"]["dependencies"]],
        **{f"pyproject extra '{k}'": [Requirement(r) for r in v]
           for k, v in proj["project"].get("optional-dependencies", {}).items()},
        "requirements/detectron2.txt": read_requirements(DETECTRON2_REQS),
        "Dockerfile pip install": dockerfile_pip_requirements(),
    }
    return {src: by_name(reqs) for src, reqs in sources.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_pip_requirements() -> list[Requirement]:
    """Requirement specifiers given directly to `pip install` in a RUN line (none when it defers to setup.sh)."""
    reqs = []
    for op, args in dockerfile_instructions():
        if op != "RUN":
            continue
        for cmd in re.split(r"&&|;|\|\|", args):
            words = shlex.split(cmd)
            if "pip" in " ".join(words[:4]) and "install" in words:
                for w in words[words.index("install") + 1:]:
                    if not w.startswith("-") and re.match(r"^[A-Za-z0-9_.\-\[\]]+\s*(==|>=|<=|<|>|~=|!=)", w):
                        reqs.append(Requirement(w))
    return reqs


# ---------------------------------------------------------------------------------------------------------- pins


def test_constraints_pin_the_torch_pair_and_detectron2_as_documented():
    cons = by_name(read_requirements(CONSTRAINTS))
    torch_v, tv_v = pinned(cons["torch"]), pinned(cons["torchvision"])
    assert torch_v is not None and tv_v is not None, "torch and torchvision must be pinned with == in constraints"
    # torchvision 0.(X+15).Y is the release made for torch 2.X.Y: a mismatched pair fails to import
    assert (torch_v.major, tv_v.major, tv_v.minor - 15, tv_v.micro) == (2, 0, torch_v.minor, torch_v.micro), \
        f"torch {torch_v} and torchvision {tv_v} are not a released pair"
    d2 = pinned(by_name(read_requirements(DETECTRON2_REQS))["sal-detectron2"])
    assert d2 is not None, "sal-detectron2 must be pinned with == (setup.sh downloads exactly that wheel)"
    # the README states the same pins the files hold
    readme = (REPO / "README.md").read_text()
    assert f"torch {torch_v} / torchvision {tv_v}" in readme
    assert f"sal-detectron2=={d2}" in readme


def test_every_declared_requirement_admits_the_constrained_versions():
    """A `==` pin in constraints.txt must satisfy every specifier for that package elsewhere (pyproject build,
    runtime and extras, detectron2.txt, Dockerfile); a range in constraints.txt must share its upper bounds with every
    other file that states one (e.g. setuptools < 81 for detectron2's pkg_resources) and not be empty together."""
    cons = by_name(read_requirements(CONSTRAINTS))
    elsewhere = declared_elsewhere()
    compared = 0
    for name, cspec in cons.items():
        pin = pinned(cspec)
        for src, specs in elsewhere.items():
            if name not in specs:
                continue
            spec = specs[name]
            compared += 1
            if pin is not None:
                assert spec.contains(pin, prereleases=True), f"{src}: {name}{spec} excludes the pinned {pin}"
                continue
            theirs, ours = upper_bounds(spec), upper_bounds(cspec)
            assert not theirs or theirs == ours, f"{src}: {name}{spec} vs constraints {name}{cspec}"
            probes = {Version(s.version) for s in [*spec, *cspec]} | {Version("0")}
            probes |= {Version(f"{v.major}.{max(v.minor - 1, 0)}") for v in list(probes) if v.major}
            probes |= {Version(str(v.major - 1)) for v in list(probes) if v.major}
            assert any(spec.contains(v) and cspec.contains(v) for v in probes), \
                f"{src}: {name}{spec} and constraints {name}{cspec} admit no common version"
    # the comparisons above are not vacuous: torch/torchvision (pyproject), setuptools (build, detectron2.txt),
    # omegaconf (detectron2.txt) all appear in constraints and elsewhere
    assert compared >= 5


def test_dockerfile_uses_the_same_setup_path_and_a_python_pyproject_allows():
    instr = dockerfile_instructions()
    args_default = dict(re.match(r"^(\w+)=(\S*)$", a).groups() for op, a in instr if op == "ARG" and "=" in a)

    def expand(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args_default.get(m.group(1), m.group(0)), text)

    base = [expand(next(w for w in args.split() if not w.startswith("--"))) for op, args in instr if op == "FROM"]
    assert base, "Dockerfile has no FROM"
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    cons = by_name(read_requirements(CONSTRAINTS))
    recognised = False
    for image in base:
        if m := re.match(r"^(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)", image):
            recognised = True
            assert requires.contains(Version(m.group(1))), f"{image} vs requires-python {requires}"
        elif m := re.match(r"^(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)", image):
            recognised = True
            assert Version(m.group(1)) == pinned(cons["torch"]), f"{image} vs constraints torch{cons['torch']}"
        elif m := re.match(r"^(?:docker\.io/)?nvidia/cuda:(\d+\.\d+)\.\d+-.*ubuntu(\d+\.\d+)$", image):
            recognised = True
            # the distribution's python3, which setup.sh uses to make the venv
            python = UBUNTU_PYTHON.get(m.group(2))
            assert python and requires.contains(Version(python)), f"{image}: Python {python} vs {requires}"
            # the image's CUDA runtime is the one the pinned torch wheel was built for (when that wheel is here)
            import torch

            if Version(torch.__version__.split("+")[0]) == pinned(cons["torch"]) and torch.version.cuda:
                assert m.group(1) == torch.version.cuda, f"{image} vs torch {torch.__version__} ({torch.version.cuda})"
    assert recognised, f"unrecognised base image(s) {base}: teach this test how to read their Python/torch version"

    # the image installs through scripts/setup.sh, after copying every file the setup stamp is keyed on
    copied: set[str] = set()
    runs_setup = 0
    for op, args in instr:
        if op in ("COPY", "ADD"):
            srcs = [a for a in args.split() if not a.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in srcs}
        elif op == "RUN" and "scripts/setup.sh" in args:
            runs_setup += 1
            assert {"pyproject.toml", "requirements", "scripts"} <= copied or "." in copied, \
                f"setup.sh runs before its inputs are copied (copied so far: {sorted(copied)})"
    assert runs_setup >= 1, "the Dockerfile must build its venv with scripts/setup.sh, like `make setup`"


def test_setup_script_installs_through_the_constraints_file():
    """Every `pip install` in setup.sh that resolves dependencies passes -c requirements/constraints.txt (the one
    exceptions: pip upgrading itself, and the detectron2 wheel itself, installed with --no-deps)."""
    lines = [ln.strip() for ln in (REPO / "scripts" / "setup.sh").read_text().splitlines()
             if re.search(r'pip\[@\]}"? install', ln)]
    assert lines, "no pip install found in setup.sh"
    for ln in lines:
        if re.search(r'--upgrade "?pip[<>=]', ln):
            continue
        assert "-c requirements/constraints.txt" in ln or "--no-deps" in ln, ln


# ---------------------------------------------------------------------------------------------------------- make


def make_database(*variables: str) -> dict[str, list[str]]:
    """{target: prerequisites} as make resolves them (``make -pRrq``: print the database, run nothing)."""
    out = subprocess.run(["make", "-pRrq", "-f", "Makefile", *variables, ":"], cwd=REPO, capture_output=True,
                         text=True).stdout
    rules = {}
    for line in out.splitlines():
        if m := re.match(r"^([a-z][a-z0-9_-]*):(?!=)\s*(.*)$", line):
            rules.setdefault(m.group(1), m.group(2).split())
    return rules


def closure(rules: dict[str, list[str]], target: str) -> set[str]:
    seen, todo = set(), [target]
    while todo:
        for dep in rules.get(todo.pop(), []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_makefile_has_the_targets_and_each_sets_up_what_it_needs():
    rules = make_database()
    assert set(TARGETS) <= set(rules), f"missing targets: {sorted(set(TARGETS) - set(rules))}"
    text = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())
    assert set(TARGETS) <= phony
    for t in TARGETS:
        assert re.search(rf"^{t}:.*## \S", text, re.M), f"`{t}` has no `## help` text for `make help`"
        deps = closure(rules, t)
        if t not in ("setup", "clean"):
            assert "setup" in deps, f"`make {t}` does not depend on setup"
        # toy data is generated by the stage's own recipe (only what it reads, only at the default root)
        assert "data" not in deps, f"`make {t}` depends on `data`, which would write into a user's real root"

    helped = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = {m.group(1) for m in re.finditer(r"^\s+make (\S+)", helped, re.M)}
    assert set(TARGETS) <= listed
    # every target expands to a runnable recipe (dry run: prints the commands, runs nothing)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS",
                                                             "DETECTRON2_DATASETS")}
    for t in TARGETS:
        dry = subprocess.run(["make", "-n", t], cwd=REPO, capture_output=True, text=True, env=env)
        assert dry.returncode == 0, f"make -n {t}: {dry.stderr}"
        if t in NEED_DATA:
            assert "ctbench.toydata" in dry.stdout and "--if-missing" in dry.stdout, \
                f"`make {t}` does not generate the missing toy data at the default root"
    # a real root: no stage generates anything (chaos and demo run on the default toy root whatever it is)
    for t in NEED_DATA:
        dry = subprocess.run(["make", "-n", t], cwd=REPO, capture_output=True, text=True,
                             env={**env, "DETECTRON2_DATASETS": "/data"})
        if t == "chaos":
            assert f'--root "{REPO}/datasets"' in dry.stdout
        else:
            assert "ctbench.toydata" not in dry.stdout, f"`make {t}` would generate toy data under /data"
    # with DATA=... pretraining reads the user's data: no toy data needed
    dry = subprocess.run(["make", "-n", "pretrain", "DATA=/data/imagenet/train"], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert "ctbench.toydata" not in dry.stdout


def test_ci_entry_point_runs_make_test():
    ci = REPO / ".ci" / "run"
    assert ci.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    lines = ci.read_text().splitlines()
    body = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("#!") and "set -euo pipefail" in body and "make test" in body


# ---------------------------------------------------------------------------------------------------------- stamp

FAKE_PYTHON = """#!/bin/sh
# Stand-in for a venv's python: logs each call; `import detectron2` fails unless $FAKE_D2 is set; `pip download`
# leaves a wheel named like sal-detectron2's (cp310-none-any) in its -d folder.
echo "$*" >> "$FAKE_LOG"
[ "$*" = "-c import detectron2" ] && [ -z "$FAKE_D2" ] && exit 1
[ "$*" = "-c import ctbench" ] && [ -n "$FAKE_BROKEN" ] && exit 1
case "$*" in *" download "*)
    dest=""; prev=""
    for a in "$@"; do [ "$prev" = "-d" ] && dest="$a"; prev="$a"; done
    : > "$dest/sal_detectron2-0.7.2-cp310-none-any.whl" ;;
esac
exit 0
"""


@pytest.fixture
def setup_copy(tmp_path):
    """The files setup.sh reads, in a scratch tree, and a fake venv whose python logs what it is asked to do."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "setup.sh", tree / "scripts" / "setup.sh")
    shutil.copy2(REPO / "pyproject.toml", tree / "pyproject.toml")
    shutil.copytree(REPO / "requirements", tree / "requirements")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "VENV": str(venv), "FAKE_LOG": str(log)}
    env.pop("FAKE_D2", None)
    env.pop("FAKE_BROKEN", None)

    def run(**extra: str) -> tuple[str, list[str]]:
        before = log.read_text().splitlines() if log.exists() else []
        p = subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], env={**env, **extra}, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        after = log.read_text().splitlines() if log.exists() else []
        return p.stdout, after[len(before):]

    return tree, venv, run


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if " pip " in f" {c} " and (" install " in f" {c} " or " download " in f" {c} ")]


def test_setup_stamp_is_keyed_on_the_requirement_files(setup_copy):
    tree, venv, run = setup_copy
    out, calls = run()  # no stamp: full install, detectron2 from the repackaged wheel
    pip = installs(calls)
    assert any("-c requirements/constraints.txt -e .[dev]" in c for c in pip), pip
    spec = next(str(r) for r in read_requirements(DETECTRON2_REQS) if r.name == "sal-detectron2")
    assert any(" download " in c and "--python-version 3.10" in c and spec in c for c in pip), pip
    assert any("--no-deps" in c and c.endswith("-py3-none-any.whl") for c in pip), pip  # retagged for any Python 3
    assert (venv / ".ctbench-setup").is_file() and "[setup] done" in out

    out, calls = run()  # nothing changed: only the stamp check
    assert out == "" and installs(calls) == [] and calls == ["-c import ctbench"]

    for edit in (tree / "requirements" / "constraints.txt", tree / "pyproject.toml", tree / "requirements" /
                 "detectron2.txt", tree / "scripts" / "setup.sh"):
        edit.write_text(edit.read_text() + "\n# touched\n")
        out, calls = run(FAKE_D2="1")  # an importable detectron2 is kept
        assert any("-e .[dev]" in c for c in installs(calls)), f"editing {edit.name} did not refresh the venv"
        assert not any(" download " in c for c in installs(calls)) and "keeping it" in out
        assert run()[1] == ["-c import ctbench"]  # and the new stamp holds

    out, calls = run(FAKE_BROKEN="1", FAKE_D2="1")  # the stamp matches but the venv cannot import ctbench
    assert any("-e .[dev]" in c for c in installs(calls))


def test_second_make_setup_is_a_no_op_in_seconds():
    """On the project's own venv: `make setup` twice; the second call must change nothing and take < 10 s."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"tests run from {sys.prefix}, not the .venv that `make setup` manages")
    # as a user types it, also when the suite itself runs under `make test` (no "make[1]: Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    first = subprocess.run(["make", "setup"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    stamp = REPO / ".venv" / ".ctbench-setup"
    mtime = stamp.stat().st_mtime_ns
    t0 = time.perf_counter()
    second = subprocess.run(["make", "setup"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "" and "[setup]" not in second.stderr, second.stdout + second.stderr
    assert stamp.stat().st_mtime_ns == mtime
    assert elapsed < 10, f"second `make setup` took {elapsed:.1f} s"
