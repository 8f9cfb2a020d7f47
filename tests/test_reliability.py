"""Reliability (issue 8): failed writes keep the previous file, bad data is skipped and counted, bad configs and
checkpoints are one-line errors with nothing half-written, JCL stays finite under bf16, bad detection annotations
are named before any worker starts, and a DDP rank that dies or hangs stops the others within a bounded time.

Kill -9 / resume bit-exactness is in tests/test_chaos.py (subprocesses)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ctbench.errors import UserError
from orchestrate.chaos import (
    CHECKPOINT,
    REPO,
    add_bad_files,
    captured,
    disk_fault,
    error_lines,
    victim_command,
    victim_env,
)
from pretrain.__main__ import main as pretrain_main
from pretrain.config import resolve_config
from pretrain.engine import train
from pretrain.losses import build_loss

TINY = ["data.image_size=32", "data.workers=0", "train.batch_size=4", "model.queue_size=8", "model.bn_splits=2",
        "model.hidden_dim=64", "model.dim=16", "train.epochs=2", "train.log_every=1", "train.device=cpu",
        "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel") / "train"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"n0{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"n0{c}" / f"{i}.JPEG")
    return root


@pytest.fixture(scope="module")
def one_step_run(images, tmp_path_factory):
    """A pretraining run stopped after its first step (copied by the tests that damage or extend it)."""
    run = tmp_path_factory.mktemp("one_step") / "run"
    with captured():
        assert pretrain_main(_args(images, run, "train.max_steps=1")) == 0
    return run


def _args(images, out, *extra):
    return ["--loss", "moco_v2", "--scale", "toy", "--data", str(images), "--out", str(out), *TINY, *extra]


# ---- atomic outputs ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_failed_checkpoint_and_record_writes_keep_the_previous_files(images, one_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    ckpt, record = (run / CHECKPOINT).read_bytes(), (run / "record.json").read_bytes()
    for name, kind, want in [(CHECKPOINT, "enospc", "no space left on device"),
                             (CHECKPOINT, "eacces", "permission denied"),
                             ("record.json", "enospc", "no space left on device")]:
        with disk_fault(name, kind, budget=1000), captured() as out:
            rc = pretrain_main(_args(images, run, "train.max_steps=2"))
        errs = error_lines(out.getvalue())
        assert rc == 2 and len(errs) == 1 and f"could not write {run / name}: {want}" in errs[0], out.getvalue()
        assert "previous file (if any) was left intact" in errs[0] and "Traceback" not in out.getvalue()
        assert (run / "record.json").read_bytes() == record and not list(run.glob(".tmp-*"))
        if name == CHECKPOINT:
            assert (run / CHECKPOINT).read_bytes() == ckpt
    assert torch.load(run / CHECKPOINT, weights_only=False)["step"] == 2  # the record failed after the checkpoint


def test_failed_pkl_and_table_writes_keep_the_previous_files(tmp_path):
    from ctbench.records import write_record
    from results.tables import main as tables_main
    from transfer.convert import main as convert_main

    src, pkl, tables = tmp_path / "sup.pth", tmp_path / "sup_d2.pkl", tmp_path / "tables"
    torch.save(torchvision.models.resnet50().state_dict(), src)
    write_record("pretrain", "moco_v2", tmp_path / "rec", {"loss_final": 1.0})
    with captured():
        assert convert_main([str(src), str(pkl)]) == 0
        assert tables_main(["--records", str(tmp_path / "rec"), "--out", str(tables), "--no-plots"]) == 0
    cases = [(pkl, "enospc", lambda: convert_main([str(src), str(pkl)])),
             (tmp_path / "sup_d2.pkl.record.json", "eacces", lambda: convert_main([str(src), str(pkl)])),
             (tables / "tables.md", "enospc",
              lambda: tables_main(["--records", str(tmp_path / "rec"), "--out", str(tables), "--no-plots"]))]
    for path, kind, call in cases:
        before = path.read_bytes()
        with disk_fault(path.name, kind), captured() as out:
            rc = call()
        errs = error_lines(out.getvalue())
        assert rc == 2 and len(errs) == 1 and f"could not write {path}" in errs[0], out.getvalue()
        assert path.read_bytes() == before and not list(path.parent.glob(".tmp-*"))


# ---- bad data ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_per_epoch_and_in_the_record(images, tmp_path, capsys):
    data = tmp_path / "train"
    shutil.copytree(images, data)
    n_bad = add_bad_files(data)  # + gray, CMYK, 16-bit, palette (readable) and an empty class folder
    result = train(resolve_config("moco_v2", "toy", overrides=TINY, data_path=data), tmp_path / "run", "bad")
    assert n_bad == 4 and result.metrics["skipped_images"] == 4 * 2  # 20 files, batch 4: every file every epoch
    assert result.metrics["complete"] and np.isfinite(result.metrics["loss_final"])
    ends = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "epoch_end" in x]
    assert [r["skipped_images"] for r in ends] == [4, 4]
    assert capsys.readouterr().out.count("4 unreadable image(s) skipped") == 2
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["metrics"]["skipped_images"] == 8


def test_no_usable_image_is_one_error_and_no_checkpoint_or_record(tmp_path):
    data = tmp_path / "train"
    for c in ("n01", "n02"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            (data / c / f"{i}.JPEG").write_bytes(b"" if i % 2 else b"\xff\xd8 not a jpeg")
    # a queue filled with real keys reads images before the run directory exists: nothing is written
    with captured() as out:
        rc = pretrain_main(_args(data, tmp_path / "run", "model.queue_init=keys"))
    errs = error_lines(out.getvalue())
    assert rc == 2 and len(errs) == 1 and "unreadable" in errs[0] and str(data) in errs[0]
    assert not (tmp_path / "run").exists()
    # otherwise (the toy preset's in-batch negatives) epoch 0 ends with the same kind of line, and neither a
    # checkpoint nor a record is written
    with captured() as out:
        rc = pretrain_main(_args(data, tmp_path / "run2", "model.queue_size=0"))
    errs = error_lines(out.getvalue())
    assert rc == 2 and len(errs) == 1 and "no readable image" in errs[0] and str(data) in errs[0]
    assert not (tmp_path / "run2" / CHECKPOINT).exists() and not (tmp_path / "run2" / "record.json").exists()
    (tmp_path / "void" / "n01").mkdir(parents=True)
    with captured() as out:
        assert pretrain_main(_args(tmp_path / "void", tmp_path / "run")) == 2
    assert "no images found under" in out.getvalue() and not (tmp_path / "run").exists()


# ---- bad configs and checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("loss.tau=0", "loss.tau must be > 0, got 0.0"),
    ("loss.tau=-1", "loss.tau must be > 0"),
    ("loss.name=co2 loss.tau_con=0", "loss.tau_con must be > 0"),
    ("data.num_keys=0", "data.num_keys (M) must be >= 1, got 0"),
    ("model.queue_size=10", "model.queue_size (10) must be a multiple of the global batch train.batch_size (4)"),
    ("optim.lr=-0.1", "optim.lr must be > 0"),
    ("optim.lr=nan", "optim.lr must be > 0"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("loss.name=jcl loss.lam=-1", "loss.lam must be >= 0"),
    ("model.momentum=2", "model.momentum must be in [0, 1]"),
    ("train.batch_size=1", "train.batch_size must be >= 2"),
    ("train.batch_size=four", "train.batch_size must be an integer, got 'four'"),
    ("train.epochs=1.5", "train.epochs must be an integer"),
    ("train.nonfinite=ignore", "train.nonfinite = 'ignore' is not allowed; choose from stop, skip"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s must be > 0"),
    ("data.crop_scale=[0.5]", "data.crop_scale must have 2 items"),
    ("optim.schedule=linear", "choose from cosine, step"),
    ("loss.temperature=0.2", "unknown config key 'loss.temperature'; choose from name, tau"),  # moco's keys
    ("trian.epochs=1", "unknown config key 'trian'"),
])
def test_bad_config_values_are_one_line_errors_and_write_nothing(images, tmp_path, override, message):
    with captured() as out:
        rc = pretrain_main(_args(images, tmp_path / "run", *override.split()))
    errs = error_lines(out.getvalue())
    assert rc == 2 and len(errs) == 1 and message in errs[0], out.getvalue()
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    good = torchvision.models.resnet50().state_dict()
    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pth")
    torch.save({k: v for k, v in good.items() if not k.startswith("layer4")}, d / "missing.pth")
    torch.save({"state_dict": {"module.encoder_q.fc.weight": torch.zeros(2, 2)}}, d / "headonly.pth")
    torch.save(good, d / "full.pth")
    data = (d / "full.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "empty.pth").write_bytes(b"")
    (d / "text.pth").write_text("hello\n")
    (d / "full.pth").unlink()
    return d


@pytest.mark.parametrize("name, message", [
    ("resnet18.pth", "not a ResNet-50: layer1.0.conv1.weight has shape (64, 64, 3, 3), ResNet-50 has (64, 64, 1, 1)"),
    ("missing.pth", "not a complete ResNet-50 backbone: 50 tensors missing (e.g. layer4.0.conv1.weight"),
    ("headonly.pth", "no ResNet-50 backbone tensors found"),
    ("truncated.pth", "not a readable PyTorch checkpoint (truncated or corrupt?)"),
    ("empty.pth", "empty file"),
    ("text.pth", "not a readable PyTorch checkpoint"),
])
def test_bad_checkpoints_are_one_line_errors_for_convert_and_linear(bad_checkpoints, tmp_path, name, message,
                                                                    monkeypatch):
    from transfer.convert import main as convert_main
    from transfer.linear import main as linear_main

    monkeypatch.setenv("CTBENCH_OUTPUT", str(tmp_path / "outputs"))
    src = bad_checkpoints / name
    for call in (lambda: convert_main([str(src), str(tmp_path / "out.pkl")]),
                 lambda: linear_main(["--ckpt", str(src), "--out", str(tmp_path / "lin")])):
        with captured() as out:
            rc = call()
        errs = error_lines(out.getvalue())
        assert rc == 2 and len(errs) == 1 and message in errs[0] and str(src) in errs[0], out.getvalue()
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no .pkl, no run directory, no temp file


def test_a_damaged_checkpoint_in_the_run_directory_is_one_line(images, one_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)
    del ckpt["state_dict"]["queue"]
    torch.save(ckpt, run / CHECKPOINT)
    with captured() as out:
        assert pretrain_main(_args(images, run, "train.max_steps=2")) == 2
    errs = error_lines(out.getvalue())
    assert len(errs) == 1 and "cannot resume from this checkpoint" in errs[0] and "--fresh" in errs[0]
    (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:1000])
    with captured() as out:
        assert pretrain_main(_args(images, run, "train.max_steps=2")) == 2
    assert "not a readable PyTorch checkpoint" in out.getvalue()
    with captured() as out:  # --fresh starts over
        assert pretrain_main(["--fresh", *_args(images, run, "train.max_steps=1")]) == 0


def test_a_torn_metrics_line_does_not_block_a_resume(images, one_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 1.2')  # killed in the middle of a line
    with captured():
        assert pretrain_main(_args(images, run, "train.max_steps=2")) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


# ---- numerics ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau, lam", [(0.2, 4.0), (0.05, 4.0), (0.02, 10.0)])
def test_jcl_variance_term_stays_finite_under_bf16(tau, lam):
    """λ/(2τ²)·qᵀΣq reaches ~1e2-1e3 here (its exp overflows float32 and bf16 beyond ~89); the loss and gradient
    stay finite and equal the float64 value."""
    torch.manual_seed(0)
    n, m, k, d = 8, 5, 64, 16
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(n, m, d), dim=2)
    negs = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    loss_fn = build_loss("jcl", tau=tau, lam=lam)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(q.bfloat16().float(), keys.bfloat16(), negs.bfloat16())
    out.loss.backward()
    coef = lam / (2 * tau**2)  # 50, 800, 12500
    assert torch.isfinite(out.loss) and torch.isfinite(q.grad).all()
    assert 0 < float(out.terms["var_term"]) < coef and float(out.terms["var_term"]) > coef / 100
    ref = loss_fn(q.detach().bfloat16().double(), keys.bfloat16().double(), negs.bfloat16().double()).loss
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-4)


def test_nonfinite_loss_from_the_cli_names_the_step_and_exits_2(images, tmp_path):
    run = tmp_path / "run"
    with captured() as out:
        rc = pretrain_main(_args(images, run, "optim.lr=1e30", "train.ckpt_every=1"))
    errs = error_lines(out.getvalue())
    assert rc == 2 and len(errs) == 1 and "non-finite at step 1 (epoch 0)" in errs[0]
    assert "last good checkpoint is kept" in errs[0] and "train.nonfinite=skip" in errs[0]
    ckpt = torch.load(run / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                     if v.is_floating_point())
    assert not (run / "record.json").exists()


# ---- detection annotations --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _registered(tmp_path):
    """A dataset name of this test only, removed from detectron2's catalogs afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"rel_{tmp_path.name}"
    try:
        yield name, lambda: DatasetCatalog.get(name)
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def _coco_copy(toy, tmp_path, edit):
    root = tmp_path / "coco"
    shutil.copytree(toy / "coco" / "val2017", root / "val2017")
    ann = json.loads((toy / "coco" / "annotations" / "instances_val2017.json").read_text())
    edit(ann, root)
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(ann) if isinstance(ann, dict) else ann)
    return path, root / "val2017"


def _bad_box(ann, root):
    ann["annotations"][0]["bbox"] = [10, 10, -5, 4]


def _nan_box(ann, root):
    ann["annotations"][1]["bbox"] = [10, 10, float("nan"), 4]


def _outside(ann, root):
    ann["annotations"][0]["bbox"] = [1e5, 1e5, 4, 4]


def _missing_image(ann, root):
    (root / "val2017" / ann["images"][0]["file_name"]).unlink()


@pytest.mark.detectron2
@pytest.mark.parametrize("edit, message", [
    (_bad_box, "has a negative width or height"), (_nan_box, "is not 4 finite numbers"),
    (_outside, "lies outside the"), (_missing_image, "not found"),
])
def test_bad_coco_annotations_are_named_before_any_worker(toy_datasets, tmp_path, edit, message):
    from transfer.detection.data import register_coco_checked

    path, images = _coco_copy(toy_datasets, tmp_path, edit)
    with _registered(tmp_path) as (name, get):
        register_coco_checked(name, {}, path, images)
        with pytest.raises(UserError, match=message) as e:
            get()
    assert str(path) in str(e.value) and "1 image(s) with bad annotations" in str(e.value)


@pytest.mark.detectron2
def test_empty_or_unparseable_coco_file(toy_datasets, tmp_path):
    from transfer.detection.data import register_coco_checked

    path, images = _coco_copy(toy_datasets, tmp_path, lambda a, r: None)
    with _registered(tmp_path) as (name, get):
        path.write_text("")
        with pytest.raises(UserError, match=f"{path}: empty annotation file"):
            register_coco_checked(name, {}, path, images)
        path.write_text('{"images": [')
        register_coco_checked(name, {}, path, images)
        with pytest.raises(UserError, match=f"{path}: not valid JSON"):
            get()
        path.write_text('{"annotations": []}')
        with pytest.raises(UserError, match=f"{path}: not a COCO annotation file \\(missing field '"):
            get()


@pytest.mark.detectron2
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("<width>", "<wide>").replace("</width>", "</wide>"), "missing <size><width>"),
    (lambda t: t.replace("<xmin>", "<xmn>", 1).replace("</xmin>", "</xmn>", 1), "missing <bndbox><xmin>"),
    (lambda t: t.replace("<name>", "<name>unicorn", 1), "unknown class"),
    (lambda t: t[: len(t) // 2], "not valid XML"),
    (lambda t: t.replace("<xmax>", "<xmax>-", 1), "has a negative width or height"),
])
def test_bad_voc_annotations_are_named_before_any_worker(toy_datasets, tmp_path, edit, message):
    from transfer.detection.data import register_voc_checked

    voc = tmp_path / "VOC2007"
    shutil.copytree(toy_datasets / "VOC2007", voc)
    first = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{first}.xml"
    xml.write_text(edit(xml.read_text()))
    with _registered(tmp_path) as (name, get):
        register_voc_checked(name, voc, "test", 2007)
        with pytest.raises(UserError, match=message) as e:
            get()
    assert str(xml) in str(e.value)


# ---- distributed faults -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(images, out, **hooks):
    """Two gloo processes started by hand (no torchrun agent to kill the survivor); rank 1 fails at step 2.
    Returns ((output, rc) of rank 0, (output, rc) of rank 1, seconds until rank 0 exited)."""
    port = _free_port()
    args = _args(images, out, "train.dist_timeout_s=10", "model.queue_init=random", "train.ckpt_every=1")
    procs = []
    for rank in range(2):
        env = {**victim_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(victim_command("pretrain", args, fault_rank=1, die_at_step=2, **hooks),
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.time()
    try:
        out0 = procs[0].communicate(timeout=120)[0]
        seconds = time.time() - t0
        try:
            out1 = procs[1].communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:  # the hung rank: what torchrun would do once rank 0 failed
            procs[1].kill()
            out1 = procs[1].communicate()[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return (out0, procs[0].returncode), (out1, procs[1].returncode), seconds


@pytest.mark.ddp
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_dead_or_hung_rank_stops_the_other_with_a_clear_error(images, tmp_path, fault):
    hooks = {"exit_code": 17} if fault == "exit" else {"hang": True}
    (out0, rc0), (out1, rc1), seconds = _two_ranks(images, tmp_path / "run", **hooks)
    assert rc0 == 2, out0[-3000:]
    errs = error_lines(out0)
    assert len(errs) == 1 and "rank 0/2: lost another process of the run (process-group timeout 10 s)" in errs[0]
    assert "restart the same command to resume" in errs[0] and "Traceback" not in out0
    assert seconds < 60, seconds
    if fault == "exit":
        assert rc1 == 17 and "chaos: rank 1 exits with 17" in out1
    else:
        assert "chaos: rank 1 hangs" in out1 and seconds >= 10  # rank 0 waited for the timeout, not forever
    assert (tmp_path / "run" / CHECKPOINT).is_file() and not (tmp_path / "run" / "record.json").exists()


@pytest.mark.ddp
def test_a_process_group_that_cannot_form_is_one_line(images, tmp_path):
    """Rank 0 of 2 whose peer never starts: one line naming the address, within the timeout, no traceback (torch's
    store error used to surface as a traceback of init_process_group)."""
    env = {**victim_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    t0 = time.time()
    p = subprocess.run(victim_command("pretrain", _args(images, tmp_path / "run", "train.dist_timeout_s=3")), cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    errs = error_lines(p.stdout + p.stderr)
    assert p.returncode == 2 and len(errs) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"rank 0/2: could not form the process group at 127.0.0.1:{env['MASTER_PORT']}" in errs[0]
    assert "Traceback" not in p.stderr and time.time() - t0 < 60
