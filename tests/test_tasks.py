"""transfer/tasks.py is the one home of the transfer tasks: every config file is a task, every task a config (or its
own program), ``make tasks`` prints them all, and no other entry point writes the list out again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transfer import tasks  # noqa: E402


def test_configs_are_the_detectron2_tasks():
    configs = {p.stem for p in (REPO / "transfer" / "configs").glob("*.yaml") if not p.stem.startswith(("Base", "toy"))}
    assert configs == set(tasks.TASKS)
    assert set(tasks.ALL_TASKS) == set(tasks.TASKS) | {tasks.VOC07_SVM}
    assert set(tasks.PROGRAMS) == set(tasks.ALL_TASKS)
    for prog in set(tasks.PROGRAMS.values()):
        assert (REPO / Path(*prog.split("."))).with_suffix(".py").exists() or (REPO / Path(*prog.split("."))).is_dir()


def test_listing_names_every_task_with_program_and_recipe():
    out = subprocess.run([sys.executable, "-m", "transfer.tasks"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split()[:3] == ["task", "program", "schedule"]
    rows = {line.split()[0]: line.split(None, 3) for line in out[1:]}
    assert list(rows) == list(tasks.ALL_TASKS)
    assert rows["voc07_svm"][1] == "transfer.voc07_svm" and "svm_voc07" in rows["voc07_svm"][3]
    assert rows["coco_mask"][1:3] == ["transfer.detection", "1x"]
    assert rows["voc_det"][3] == tasks.TASK_INFO["voc_det"].recipe


def test_no_other_copy_of_the_task_list():
    """The Makefile's help and the top README point at `make tasks` instead of writing the names out (they drifted:
    the README listed six of twelve)."""
    for path in ("Makefile", "README.md"):
        text = (REPO / path).read_text()
        for line in text.splitlines():
            named = {t for t in tasks.ALL_TASKS if re.search(rf"\b{t}\b", line)}
            assert len(named) <= 2, f"{path} lists tasks {sorted(named)} in one line; point at `make tasks` instead"
    assert re.search(r"^tasks:.*## ", (REPO / "Makefile").read_text(), re.M)
