"""Semi-supervised subsets and recipe: SimCLR's lists found beside the ImageNet root and recognised by content, the
wrong-percentage error, the 10 % weight decay, the baselines' settings, the record's protocol.

``tests/fixtures/semisup/simclr_1percent.txt.gz`` is google-research/simclr@383d414 ``imagenet_subsets/1percent.txt``
(12,811 lines), gzipped; the 10 % list (2.6 MB) is not in the repository, only its hashes (``SIMCLR_LISTS``).
"""

from __future__ import annotations

import gzip
import hashlib
import random
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from ctbench.errors import UserError
from ctbench.paths import detect_scale
from ctbench.records import TOY_MARKER, RunRecord, load_record
from transfer import semisup
from transfer.classify import data as classify_data
from transfer.classify.backbone import resolve_ckpt
from transfer.classify.config import SemisupConfig, resolve
from transfer.classify.data import SIMCLR_LISTS, SimclrList, find_simclr_list, names_sha256, simclr_pct
from transfer.classify.protocol import semisup_protocol

FIXTURES = Path(__file__).parent / "fixtures" / "semisup"
FORMAT_LIST = FIXTURES / "subset_simclr_format.txt"  # 21 names of the tiny toy ImageNet (26 % of its 80 images)


@pytest.fixture()
def real_root(toy_datasets, tmp_path) -> Path:
    """The tiny toy ImageNet copied into a real-layout root without the toy marker (full scale)."""
    root = tmp_path / "real" / "imagenet"
    shutil.copytree(toy_datasets / "imagenet", root)
    (root / TOY_MARKER).unlink(missing_ok=True)
    assert detect_scale(root) == "full"
    return root


def _cfg(root: Path, pct: int, *overrides: str, scale: str = "full", **fixed) -> SemisupConfig:
    return resolve(SemisupConfig, f"semisup_{pct}pct", scale, None,
                   ["data.workers=0", "train.device=cpu", *overrides],
                   fixed={"pct": pct, "data": {"path": str(root)}, **fixed})


def test_the_real_simclr_list_is_recognised_by_content():
    names = gzip.decompress((FIXTURES / "simclr_1percent.txt.gz").read_bytes()).decode().splitlines()
    raw = "".join(n + "\n" for n in names).encode()
    assert len(names) == 12_811 == SIMCLR_LISTS[1].images
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == SIMCLR_LISTS[1].file_sha256  # the file as committed
    assert simclr_pct(names) == 1
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert simclr_pct(shuffled) == 1  # any line order
    assert simclr_pct(names[:-1] + ["n01440764_99999.JPEG"]) is None  # one name differs: not SimCLR's
    assert simclr_pct(names[:-1]) is None
    per_class = {}
    for n in names:
        per_class[n.split("_")[0]] = per_class.get(n.split("_")[0], 0) + 1
    assert len(per_class) == 1000 and sorted(set(per_class.values())) == [12, 13]
    assert SIMCLR_LISTS[10].images == 128_116 and SIMCLR_LISTS[10].name == "10percent.txt"


def test_simclr_lists_are_looked_for_beside_the_imagenet_root(real_root):
    assert find_simclr_list(real_root, 10) is None
    (real_root / "imagenet_subsets").mkdir()
    shutil.copy(FORMAT_LIST, real_root / "imagenet_subsets" / "10percent.txt")
    assert find_simclr_list(real_root, 10) == real_root / "imagenet_subsets" / "10percent.txt"
    assert find_simclr_list(real_root, 1) is None
    shutil.copy(FORMAT_LIST, real_root / "10percent.txt")
    assert find_simclr_list(real_root, 10) == real_root / "10percent.txt"  # the root itself first


def test_a_list_found_beside_the_data_is_used_and_recognised(real_root, tmp_path, monkeypatch):
    (real_root / "imagenet_subsets").mkdir()
    shutil.copy(FORMAT_LIST, real_root / "imagenet_subsets" / "10percent.txt")
    out = tmp_path / "out"
    out.mkdir()
    files, info = semisup.prepare_subset(_cfg(real_root, 10), out)
    assert len(files) == 21 and (out / "subset.txt").read_text() == FORMAT_LIST.read_text()
    # same file name as SimCLR's, other content: used, but not called SimCLR's
    assert info["source"] == "given" and info["found_beside_data"] and info["name"] == "10percent.txt"
    assert info["train_images"] == 80 and info["share_pct"] == pytest.approx(26.25)

    # register the fixture's content as "SimCLR's 10 % list": recognised by its names, whatever its file name
    names = FORMAT_LIST.read_text().splitlines()
    monkeypatch.setitem(SIMCLR_LISTS, 10, SimclrList("10percent.txt", 21, "sha256:-", names_sha256(names)))
    files, info = semisup.prepare_subset(_cfg(real_root, 10), out)
    assert info["source"] == "simclr"
    given = tmp_path / "renamed.txt"
    given.write_text("".join(n + "\n" for n in reversed(names)))
    _, info = semisup.prepare_subset(_cfg(real_root, 10, subset={"file": str(given)}), out)
    assert info["source"] == "simclr" and not info["found_beside_data"]
    # SimCLR's 10 % list asked for as 1 %: one line naming the right --pct
    with pytest.raises(UserError, match=r"is SimCLR's 10percent.txt, not the 1 % list; pass --pct 10"):
        semisup.prepare_subset(_cfg(real_root, 1, subset={"file": str(given)}), out)


def test_without_a_list_the_generated_one_says_where_it_looked(real_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files, info = semisup.prepare_subset(_cfg(real_root, 10), out)
    assert info["source"] == "generated" and info["seed"] == 0
    assert info["looked_for"] == [str(real_root / "." / "10percent.txt"),
                                  str(real_root / "imagenet_subsets" / "10percent.txt")]
    assert "no SimCLR list at" in info["how"] and info["images"] == len(files) == 10  # 1 per class at 10 % of 80


def test_a_list_of_the_wrong_percentage_is_a_one_line_error(real_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "outputs"))
    code = semisup.main(["--ckpt", "random", "--pct", "1", "--data", str(real_root), "--subset", str(FORMAT_LIST)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "21 images are 26.2 % of the 80 train images, not 1 %" in err and "pass --pct 10" in err
    assert not (tmp_path / "outputs").exists()  # no run directory for a run that cannot start
    # SimCLR's real 1 % list asked for as 10 %: recognised by content before the folder is looked at
    simclr_1pct = tmp_path / "1percent.txt"
    simclr_1pct.write_bytes(gzip.decompress((FIXTURES / "simclr_1percent.txt.gz").read_bytes()))
    code = semisup.main(["--ckpt", "random", "--pct", "10", "--data", str(real_root), "--subset", str(simclr_1pct)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is SimCLR's 1percent.txt, not the 10 % list; pass --pct 1, or the 10percent.txt list for 10 %" in err
    assert not (tmp_path / "outputs").exists()
    # the tolerance: a factor sqrt(10) around the percentage
    classify_data.check_share("l.txt", 12_811, 1_281_167, 1)
    classify_data.check_share("l.txt", 128_116, 1_281_167, 10)
    classify_data.check_share("l.txt", 4_052, 1_281_167, 1)  # 0.3163 % >= 1 / sqrt(10) %
    with pytest.raises(UserError, match=r"not 1 % \(a 1 % list holds 0.32-3.2 % of them\); pass a 1 % list"):
        classify_data.check_share("l.txt", 4_051, 1_281_167, 1)  # 0.3162 % < 1 / sqrt(10) %
    with pytest.raises(UserError, match=r"not 10 %.*pass --pct 1"):
        classify_data.check_share("l.txt", 12_811, 1_281_167, 10)


def test_ten_percent_uses_weight_decay_1e_4(tmp_path):
    for scale in ("full", "toy"):
        assert _cfg(tmp_path, 10, scale=scale).optim.weight_decay == pytest.approx(1e-4)
        assert _cfg(tmp_path, 1, scale=scale).optim.weight_decay == pytest.approx(5e-4)
    full = _cfg(tmp_path, 10)
    assert (full.optim.lr, full.optim.head_lr_mult, full.train.epochs, full.optim.milestones, full.optim.gamma) == \
        (0.01, 100.0, 20, [12, 16], 0.2)


def test_baselines_get_openselfsups_best_setting(tmp_path, real_root, capsys, monkeypatch):
    def lr(pct, baseline, *over, scale="full"):
        c = resolve(SemisupConfig, f"semisup_{pct}pct", scale, None, list(over), fixed={"pct": pct},
                    baseline=baseline)
        return c.optim.lr, c.optim.head_lr_mult

    assert lr(1, None) == lr(10, None) == (0.01, 100.0)
    assert lr(1, "random") == lr(10, "random") == (0.01, 1.0)
    assert lr(1, "supervised") == (0.001, 100.0) and lr(10, "supervised") == (0.001, 10.0)
    assert lr(1, "supervised", "optim.head_lr_mult=10") == (0.001, 10.0)  # overrides still win
    assert lr(1, "supervised", scale="toy") == lr(1, None, scale="toy") == (0.01, 1.0)  # toy: the toy section

    # from the command line: --ckpt random, torchvision weights (supervised), a torchvision-format conversion of a
    # pretraining run (not a baseline)
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "outputs"))
    args = ["--pct", "10", "--data", str(real_root), "--print-config"]
    assert semisup.main(["--ckpt", "random", *args]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01\n" in out and "head_lr_mult: 1.0\n" in out
    tv = tmp_path / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50().state_dict(), tv)
    # a file is the supervised release by content (sha256 prefix), not by name: register this one's hash for the test
    import hashlib

    import ctbench.checkpoints as ckpts

    monkeypatch.setitem(ckpts.SUPERVISED_RELEASES, hashlib.sha256(tv.read_bytes()).hexdigest()[:8], "test release")
    assert resolve_ckpt(str(tv)).baseline == "supervised" and resolve_ckpt(str(tv)).name == "supervised"
    assert semisup.main(["--ckpt", str(tv), *args]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001\n" in out and "head_lr_mult: 10.0\n" in out
    converted = tmp_path / "pretrain" / "moco_v2" / "backbone.pth"
    converted.parent.mkdir(parents=True)
    shutil.copy(tv, converted)
    with RunRecord("pretrain", "moco_v2", converted.parent):
        pass
    with RunRecord("convert", "backbone.pth", converted.parent, filename="backbone.pth.record.json",
                   inputs=[converted.parent]):
        pass
    src = resolve_ckpt(str(converted))
    assert src.name == "moco_v2" and src.baseline is None
    # torchvision weights that merely lie beside a pretraining record stay the supervised baseline
    beside = converted.parent / "resnet50-0676ba61.pth"
    shutil.copy(tv, beside)
    assert resolve_ckpt(str(beside)).baseline == "supervised"


def test_protocol_of_semisup_runs(tmp_path):
    simclr = {"source": "simclr"}
    full = _cfg(tmp_path, 1, "train.device=cpu")
    kw = {"complete": True, "steps": 1, "total": 1, "sync_bn": True}
    p = semisup_protocol(full, world_size=4, precision="fp32", subset=simclr, baseline=None, **kw)
    assert p["deviations"] == [] and "imagenet_1percent/r50_lr0_01_head100.py" in p["recipe"]
    p = semisup_protocol(full, world_size=1, precision="bf16", subset={"source": "generated", "seed": 0},
                         baseline=None, **kw)
    assert p["deviations"] == ["bf16 autocast", "1 process (recipe: 4 GPUs)", "subset: generated (seed 0)"]
    p = semisup_protocol(full, world_size=2, precision="fp32", subset=simclr, baseline=None,
                         **{**kw, "sync_bn": False})
    assert p["deviations"] == ["2 processes (recipe: 4 GPUs)", "per-process BN over 128 images (recipe: SyncBN)"]
    rand = resolve(SemisupConfig, "semisup_10pct", "full", fixed={"pct": 10}, baseline="random")
    p = semisup_protocol(rand, world_size=4, precision="fp32", subset=simclr, baseline="random", **kw)
    assert p["deviations"] == [] and "imagenet_10percent/r50_lr0_01_head1.py" in p["recipe"]
    p = semisup_protocol(full, world_size=4, precision="fp32", subset=simclr, baseline="random", **kw)
    assert p["deviations"] == ["head lr x1 -> x100"]  # the default setting on a random init: not its best one
    toy = _cfg(tmp_path, 10, scale="toy")
    given = {"source": "given", "name": "mine.txt", "sha256": "sha256:0123456789abcdef"}
    p = semisup_protocol(toy, world_size=1, precision="fp32", subset=given, baseline=None,
                         **{**kw, "complete": False, "steps": 3, "total": 20})
    assert p["deviations"] == ["toy scale", "1 process (recipe: 4 GPUs)", "subset: given mine.txt (sha256 01234567)",
                               "20 -> 5 epochs", "milestones [12, 16] -> [3, 4]", "stopped at step 3 of 20",
                               "batch 256 -> 32", "lr 0.01 -> 0.00125", "head lr x100 -> x1",
                               "data.image_size 224 -> 64"]


def test_a_run_on_a_real_layout_root_records_its_subset_and_protocol(real_root, tmp_path, monkeypatch):
    """A tiny fine-tuning from the command line on a marker-less root (full scale, with overrides): the generated
    list, the random baseline's setting, log.txt, a kept checkpoint, the protocol."""
    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "outputs"))
    out = tmp_path / "run"
    over = ["data.image_size=32", "data.workers=0", "train.epochs=2", "optim.milestones=[1]", "train.batch_size=8",
            "train.eval_batch_size=40", "train.device=cpu", "train.keep_every=1"]
    assert semisup.main(["--ckpt", "random", "--pct", "10", "--data", str(real_root), "--out", str(out), *over]) == 0
    rec = load_record(out)
    assert rec["config"]["scale"] == "full" and rec["config"]["optim"]["head_lr_mult"] == 1.0  # random baseline
    assert rec["subset"]["source"] == "generated" and rec["backbone"]["baseline"] == "random"
    assert rec["protocol"]["deviations"] == [
        "1 process (recipe: 4 GPUs)", "subset: generated (seed 0)", "20 -> 2 epochs", "milestones [12, 16] -> [1]",
        "batch 256 -> 8", "lr 0.01 -> 0.0003125", "data.image_size 224 -> 32"]
    assert "r50_lr0_01_head1.py" in rec["protocol"]["recipe"]
    assert sorted(p.name for p in out.glob("checkpoint_*.pth.tar")) == ["checkpoint_0000.pth.tar",
                                                                        "checkpoint_0001.pth.tar"]
    assert torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=False)["epoch"] == 1
    log = (out / "log.txt").read_text()
    assert "generated class-balanced list (seed 0): no SimCLR list at" in log and "done: 10 % top-1" in log
