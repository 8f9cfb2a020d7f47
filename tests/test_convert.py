"""transfer.convert: every accepted input format loads into detectron2's R50-C4 and R50-FPN with each backbone
tensor exactly equal to its source; ``--format torchvision``; bad inputs -> exit 2, one line, no file left.

The sources are random ResNet-50s whose every tensor (BN weights and running statistics included) was perturbed,
so "equal" cannot pass by accident on constant initial values.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from ctbench.records import RECORD_NAME, load_record, write_record
from transfer import convert as conv

REPO = Path(__file__).resolve().parent.parent
N_BACKBONE = 318  # torchvision ResNet-50 state_dict (320) without fc.weight / fc.bias


def _random_resnet50(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state_dict (with fc) where every tensor holds distinct seeded values."""
    torch.manual_seed(seed)
    sd = torchvision.models.resnet50().state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            v = v + torch.randn(v.shape, generator=g) * 0.05
            if k.endswith("running_var"):
                v = v.abs() + 0.5
        else:  # num_batches_tracked
            v = torch.tensor(int(torch.randint(1, 10_000, (), generator=g)), dtype=v.dtype)
        out[k] = v
    return out


def _backbone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """format name -> (file, the backbone tensors it holds in torchvision names)."""
    root = tmp_path_factory.mktemp("convert_src")
    out = {}

    # ours: pretrain.model.ContrastiveModel saved the way pretrain.engine.checkpoint_dict does, + its record
    from pretrain.model import ContrastiveModel

    torch.manual_seed(0)
    model = ContrastiveModel(head="mlp", queue_size=16)
    q = _random_resnet50(1)
    head = {f"fc.{k}": v for k, v in model.encoder_q.fc.state_dict().items()}
    model.encoder_q.load_state_dict({**_backbone(q), **head})
    d = root / "pretrain" / "moco_v2"
    d.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "step": 12, "arch": "resnet50", "optimizer": {},
                "config": {"method": "moco_v2"}, "ctbench": {"version": "0.1.0", "method": "moco_v2"}},
               d / "checkpoint.pth.tar")
    write_record("pretrain", "moco_v2", d, {"loss_final": 1.0})
    out["ours"] = (d / "checkpoint.pth.tar", _backbone(q))

    # the official MoCo / JCL release: module.encoder_q.* (+ the MLP head in fc.0/fc.2) and module.encoder_k.*
    m = _random_resnet50(2)
    state = {f"module.encoder_q.{k}": v for k, v in _backbone(m).items()}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
                  "module.encoder_q.fc.0.bias": torch.randn(2048),
                  "module.encoder_q.fc.2.weight": torch.randn(128, 2048),
                  "module.encoder_q.fc.2.bias": torch.randn(128),
                  "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7), "module.queue": torch.randn(128, 16),
                  "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}},
               root / "moco_v2_200ep_pretrain.pth.tar")
    out["moco"] = (root / "moco_v2_200ep_pretrain.pth.tar", _backbone(m))

    # a plain torchvision ResNet-50 state_dict (e.g. the supervised ImageNet weights), fc included
    t = _random_resnet50(3)
    torch.save(t, root / "resnet50-0676ba61.pth")
    out["torchvision"] = (root / "resnet50-0676ba61.pth", _backbone(t))
    return out


def _read_pkl(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("fmt", ["ours", "moco", "torchvision"])
def test_convert_writes_backbone_only_in_detectron2_names(sources, tmp_path, capsys, fmt):
    src, backbone = sources[fmt]
    dst = tmp_path / "model_d2.pkl"
    assert conv.main([str(src), str(dst)]) == 0
    obj = _read_pkl(dst)
    assert obj["__author__"] == "ctbench" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert len(model) == N_BACKBONE
    assert set(model) == {conv.detectron2_name(k) for k in backbone}
    for k, v in backbone.items():
        assert (model[conv.detectron2_name(k)] == v.numpy()).all(), k
    printed = capsys.readouterr().out
    if fmt != "torchvision":
        assert "dropped" in printed and "fc" in printed
    else:
        assert "dropped 2 tensors" in printed  # fc.weight, fc.bias
    rec = load_record(dst.with_name(dst.name + "." + RECORD_NAME))
    assert rec["kind"] == "convert" and rec["metrics"]["tensors"] == N_BACKBONE
    if fmt == "ours":  # provenance: the pretraining record beside the checkpoint
        assert rec["config"]["source"] == "ctbench" and rec["inputs"][0]["kind"] == "pretrain"
        assert {"queue", "queue_ptr"} <= set(rec["dropped"]) and any(k.startswith("encoder_k.") for k in rec["dropped"])


def test_detectron2_names():
    assert conv.detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert conv.detectron2_name("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert conv.detectron2_name("layer1.0.bn2.weight") == "res2.0.conv2.norm.weight"
    assert conv.detectron2_name("layer4.2.conv3.weight") == "res5.2.conv3.weight"
    assert conv.detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert (conv.detectron2_name("layer3.0.downsample.1.num_batches_tracked")
            == "res4.0.shortcut.norm.num_batches_tracked")


def test_cli_in_subprocess_does_not_import_detectron2(sources, tmp_path):
    """``python -m transfer.convert IN OUT.pkl`` works, and the converter never imports detectron2."""
    src, backbone = sources["moco"]
    dst = tmp_path / "out.pkl"
    code = ("import runpy, sys\n"
            f"sys.argv = ['transfer.convert', {str(src)!r}, {str(dst)!r}]\n"
            "try:\n    runpy.run_module('transfer.convert', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "assert 'detectron2' not in sys.modules, sorted(m for m in sys.modules if 'detectron2' in m)[:5]\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and len(_read_pkl(dst)["model"]) == N_BACKBONE
    # bad input through the real entry point: one line on stderr, exit 2
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    r = subprocess.run([sys.executable, "-m", "transfer.convert", str(bad), str(tmp_path / "bad.pkl")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad.pkl").exists()


def test_default_output_names(sources, tmp_path):
    assert conv.default_output(Path("a/checkpoint.pth.tar"), "detectron2") == Path("a/model_d2.pkl")
    assert conv.default_output(Path("a/checkpoint.pth.tar"), "torchvision") == Path("a/backbone_torchvision.pth")
    assert conv.default_output(Path("b/moco_v2_800ep.pth.tar"), "detectron2") == Path("b/moco_v2_800ep_d2.pkl")
    assert conv.default_output(Path("b/r50.pth"), "torchvision") == Path("b/r50_torchvision.pth")


@pytest.mark.parametrize("fmt", ["ours", "moco", "torchvision"])
def test_format_torchvision_loads_strictly_into_resnet50(sources, tmp_path, fmt):
    src, backbone = sources[fmt]
    dst = tmp_path / "backbone.pth"
    assert conv.main([str(src), str(dst), "--format", "torchvision"]) == 0
    sd = torch.load(dst, map_location="cpu", weights_only=True)
    assert list(sd) == list(backbone)  # torchvision order, nothing else
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, backbone[k]), k
    assert (tmp_path / ("backbone.pth." + RECORD_NAME)).is_file()


def _bad_inputs(root: Path, sources) -> dict[str, Path]:
    ours, _ = sources["ours"]
    full = torch.load(ours, map_location="cpu", weights_only=False)
    files = {}
    r18 = torchvision.models.resnet18().state_dict()
    torch.save(r18, root / "resnet18.pth")
    files["another architecture"] = root / "resnet18.pth"
    vit = {"state_dict": {f"module.encoder_q.{k}": v for k, v in torchvision.models.vit_b_16().state_dict().items()
                          if "encoder.layers" not in k or "layers.encoder_layer_0." in k}}
    torch.save(vit, root / "vit.pth.tar")
    files["no ResNet tensors"] = root / "vit.pth.tar"
    raw = ours.read_bytes()
    (root / "truncated.pth.tar").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = root / "truncated.pth.tar"
    (root / "empty.pth.tar").write_bytes(b"")
    files["empty"] = root / "empty.pth.tar"
    missing = dict(full)
    missing["state_dict"] = {k: v for k, v in full["state_dict"].items() if not k.startswith("encoder_q.layer4.2.")}
    torch.save(missing, root / "missing.pth.tar")
    files["missing tensors"] = root / "missing.pth.tar"
    (root / "config.json").write_text('{"lr": 0.03}\n')
    files["not a checkpoint"] = root / "config.json"
    torch.save([torch.zeros(3)], root / "list.pth")
    files["not a dict"] = root / "list.pth"
    files["not found"] = root / "nowhere.pth.tar"
    return files


EXPECT = {"another architecture": "not a ResNet-50", "no ResNet tensors": "no ResNet-50 backbone tensors",
          "truncated": "not a readable PyTorch checkpoint", "empty": "empty file",
          "missing tensors": "tensors missing", "not a checkpoint": "not a readable PyTorch checkpoint",
          "not a dict": "expected a dict", "not found": "not found"}


@pytest.mark.parametrize("fmt", ["detectron2", "torchvision"])
def test_bad_inputs_exit_2_one_line_no_output(sources, tmp_path, capsys, fmt):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    files = _bad_inputs(src_dir, sources)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for what, path in files.items():
        dst = out_dir / ("x.pkl" if fmt == "detectron2" else "x.pth")
        rc = conv.main([str(path), str(dst), "--format", fmt])
        err = capsys.readouterr().err
        assert rc == 2, what
        assert err.count("\n") == 1 and "error:" in err and EXPECT[what] in err, (what, err)
        assert list(out_dir.iterdir()) == [], (what, list(out_dir.iterdir()))  # no output, no temp file, no record


def test_bad_output_and_arguments(sources, tmp_path, capsys):
    src, _ = sources["ours"]
    assert conv.main([str(src), str(tmp_path / "model.pth")]) == 2  # detectron2 format needs .pkl
    assert ".pkl" in capsys.readouterr().err
    assert conv.main([]) == 2
    assert "give a checkpoint" in capsys.readouterr().err
    assert conv.main([str(src), str(src.with_suffix(".x.pkl")), "--newest"]) == 2
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []


# --- loading into detectron2 models built from our task configs ---------------------------------------------------


@pytest.fixture(scope="module")
def d2_models():
    """R50-C4 (voc_det: Res5ROIHeadsExtraNorm, res5 in the ROI head) and R50-FPN (coco_mask) on CPU, one process."""
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from transfer.detection import config as C

    models = {}
    for arch, task in (("C4", "voc_det"), ("FPN", "coco_mask")):
        cfg = C.load_config(C.config_file(task), toy=False, opts=["MODEL.DEVICE", "cpu"])
        C.adapt(cfg, 1, set())
        torch.manual_seed(0)
        models[arch] = build_model(cfg).eval()
    return models


def _d2_key(arch: str, tv_name: str) -> str:
    name = conv.detectron2_name(tv_name)
    if arch == "FPN":
        return "backbone.bottom_up." + name
    return ("roi_heads." if name.startswith("res5.") else "backbone.") + name


@pytest.mark.detectron2
@pytest.mark.parametrize("fmt", ["ours", "moco", "torchvision"])
@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_detectron2_loads_every_backbone_tensor_exactly(sources, d2_models, tmp_path, arch, fmt):
    from detectron2.checkpoint import DetectionCheckpointer

    src, backbone = sources[fmt]
    dst = tmp_path / "model_d2.pkl"
    assert conv.main([str(src), str(dst)]) == 0
    model = d2_models[arch]
    DetectionCheckpointer(model).load(str(dst))
    state = model.state_dict()
    compared = 0
    for k, v in backbone.items():
        key = _d2_key(arch, k)
        if k.endswith("num_batches_tracked") and key not in state:
            continue  # a norm without the counter; it carries no weights
        assert key in state, key
        assert state[key].dtype == v.dtype and torch.equal(state[key], v), key
        compared += 1
    assert compared >= N_BACKBONE - 53  # every weight and running statistic (53 BN counters at most skipped)
    if arch == "C4":  # MoCo's extra norm after res5 is not part of the backbone: it keeps its own init
        assert torch.equal(state["roi_heads.res5.norm.weight"], torch.ones(2048))


def test_only_a_known_release_is_called_supervised(tmp_path, monkeypatch):
    """A random-init torchvision state_dict is named after its file, in the classification evaluations and in
    detection; the supervised baseline is a file whose sha256 is a known ImageNet release's."""
    import hashlib

    import torchvision

    import ctbench.checkpoints as ckpts
    from transfer.classify.backbone import resolve_ckpt
    from transfer.detection.weights import run_name

    src = tmp_path / "resnet50-0676ba61.pth"  # the release's file name, random weights
    torch.save(torchvision.models.resnet50().state_dict(), src)
    assert ckpts.supervised_release(src) is None
    source = resolve_ckpt(str(src))
    assert source.name == "resnet50-0676ba61" and source.baseline is None
    conv = {"kind": "convert", "config": {"source": "torchvision", "checkpoint": str(src)}}
    assert run_name(tmp_path / "x_d2.pkl", conv) == "resnet50-0676ba61"
    monkeypatch.setitem(ckpts.SUPERVISED_RELEASES, hashlib.sha256(src.read_bytes()).hexdigest()[:8], "a release")
    assert ckpts.supervised_release(src) == "a release"
    assert resolve_ckpt(str(src)).name == "supervised" and resolve_ckpt(str(src)).baseline == "supervised"
    assert run_name(tmp_path / "x_d2.pkl", conv) == "supervised"
