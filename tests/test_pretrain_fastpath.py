"""The fast path of ``make pretrain`` (issue 18), on CPU tensors: ``data.aug_device`` (gpu = decode + uint8 crops in
the workers, the rest batched on the training device, with the PIL pipeline's parameter draws), one decode per image
for all 1 + M views on both paths, the DeviceLoader in the engine, ``train.compile`` (state-dict keys unchanged),
``train.keep_optimizer`` (a complete run's checkpoint without the optimizer state, and what a rerun then does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

import pretrain.data as data_mod
from ctbench.errors import UserError
from ctbench.imagefolder import IMAGENET_STD, ImageFolder, seeded
from ctbench.records import RECORD_NAME, load_record
from pretrain import gpu_aug as G
from pretrain.config import resolve_config
from pretrain.data import EpochBatchSampler, build_augmentation
from pretrain.engine import (
    CHECKPOINT,
    build_model,
    build_pipeline,
    compile_encoders,
    resolve_aug_device,
    train,
)

TINY = ["data.image_size=32", "data.workers=0", "train.batch_size=4", "model.bn_splits=2", "model.hidden_dim=64",
        "model.dim=16", "train.epochs=2", "train.log_every=1", "model.queue_size=8"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, noise_folder):
    return noise_folder(tmp_path_factory.mktemp("pt_fast") / "train", size=(40, 48))


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    """Photo-like (smooth) JPEGs: pixel noise would make the blur's box-vs-true Gaussian dominate the comparison."""
    root = tmp_path_factory.mktemp("pt_smooth") / "train"
    rng = np.random.default_rng(0)
    for i in range(8):
        d = root / f"n0{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
        coarse.resize((72, 60), Image.BICUBIC).save(d / f"{i}.JPEG", quality=95)
    return root


def _cfg(images, method="moco_v2", extra=()):
    return resolve_config(method, "toy", overrides=[*TINY, *extra], data_path=images)


def test_aug_device_defaults_to_gpu_on_cuda_and_cpu_elsewhere(images):
    cfg = _cfg(images)
    assert cfg.data.aug_device == "auto"
    assert resolve_aug_device(cfg, torch.device("cpu")) == "cpu"
    assert resolve_aug_device(cfg, torch.device("cuda", 0)) == "gpu"
    forced = _cfg(images, extra=["data.aug_device=gpu"])
    assert resolve_aug_device(forced, torch.device("cpu")) == "gpu"  # batched on CPU tensors (tests, benchmark)
    assert resolve_aug_device(_cfg(images, extra=["data.aug_device=cpu"]), torch.device("cuda")) == "cpu"


class _Recorder:
    """Records what the PIL pipeline draws: crop boxes, jitter parameters, grayscale / blur / flip decisions."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        crop_params, jitter_params = T.RandomResizedCrop.get_params, T.ColorJitter.get_params
        gray, flip, blur = TF.rgb_to_grayscale, TF.hflip, data_mod.ImageFilter.GaussianBlur

        def crop(img, scale, ratio):
            box = crop_params(img, scale, ratio)
            self.calls.append(("crop", tuple(box)))
            return box

        def jitter(*bounds):
            out = jitter_params(*bounds)
            self.calls.append(("jitter", tuple(out[0].tolist()), tuple(float(f) for f in out[1:])))
            return out

        def gray_(img, num_output_channels=1):
            self.calls.append(("gray",))
            return gray(img, num_output_channels)

        def flip_(img):
            self.calls.append(("flip",))
            return flip(img)

        def blur_(radius):
            self.calls.append(("blur", float(radius)))
            return blur(radius=radius)

        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(crop))
        monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(jitter))
        monkeypatch.setattr(TF, "rgb_to_grayscale", gray_)
        monkeypatch.setattr(TF, "hflip", flip_)
        monkeypatch.setattr(data_mod.ImageFilter, "GaussianBlur", blur_)


def _as_calls(box, p: torch.Tensor, gray_first: bool) -> list[tuple]:
    calls = [("crop", tuple(box))]
    jitter = [("jitter", tuple(int(v) for v in p[G.ORDER].tolist()),
               tuple(float(f) for f in p[G.FACTORS].tolist()))] if p[G.JITTER_ON] > 0 else []
    gray = [("gray",)] if p[G.GRAY] > 0 else []
    calls += gray + jitter if gray_first else jitter + gray
    calls += [("blur", float(p[G.SIGMA]))] if p[G.SIGMA] > 0 else []
    return calls + ([("flip",)] if p[G.FLIP] > 0 else [])


@pytest.mark.parametrize("aug", ["moco_v2", "moco_v1"])
def test_device_augmentation_draws_exactly_the_pil_pipelines_parameters(aug, monkeypatch):
    """Same seed: the PIL Compose and pretrain.gpu_aug.sample_view draw the same crop box, jitter order and factors,
    grayscale, blur σ and flip, and leave the generators in the same state (no extra or missing draw)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    pil = build_augmentation(aug, 32, blur_sigma=(0.1, 2.0))
    spec = G.AugSpec.preset(aug, 32, blur_sigma=(0.1, 2.0))
    rec = _Recorder(monkeypatch)
    seen = set()
    for seed in range(40):
        rec.calls.clear()
        with seeded(seed):
            pil(img)
            after_pil = (torch.rand(1).item(), data_mod.random.random())
        drawn = list(rec.calls)
        with seeded(seed):
            box, p = G.sample_view(spec, img.height, img.width)
            after_dev = (torch.rand(1).item(), data_mod.random.random())
        want = _as_calls(box, p, spec.gray_first)
        def kind(c):
            return c[:2] if c[0] in ("crop", "jitter") else c[:1]  # crop box / jitter order exactly

        assert [kind(c) for c in drawn] == [kind(c) for c in want], seed
        for got, exp in zip(drawn, want):
            if got[0] == "jitter":
                assert got[2] == pytest.approx(exp[2], abs=1e-6)
            if got[0] == "blur":
                assert got[1] == pytest.approx(exp[1], abs=1e-6)  # float32 params column
        assert after_pil == after_dev, seed
        seen |= {c[0] for c in drawn}
    assert seen == ({"crop", "jitter", "gray", "blur", "flip"} if aug == "moco_v2" else {"crop", "jitter", "gray",
                                                                                         "flip"})


def test_gpu_and_cpu_pipelines_of_the_engine_give_the_same_views(smooth):
    """The engine's two pipelines on one batch (same seeds): same shapes, crops and parameters, pixels within
    about a grey level on average (float vs uint8 rounding, true vs PIL's box Gaussian)."""
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    batches = {}
    for aug in ("cpu", "gpu"):
        cfg = _cfg(smooth, "jcl", ["data.num_keys=3", f"data.aug_device={aug}"])
        pipe = build_pipeline(cfg, ImageFolder(smooth), torch.device("cpu"))
        assert pipe.aug_device == aug and (pipe.spec is None) == (aug == "cpu")
        loader = pipe.loader(EpochBatchSampler(len(pipe.dataset), 4, seed=0), cfg, torch.device("cpu"),
                             torch.float32)
        assert loader.prefetch is False  # CPU: no side stream
        batches[aug], targets, n_bad = next(iter(loader))
        assert batches[aug].shape == (4, 4, 3, 32, 32) and n_bad == 0 and targets.shape == (4,)
    diff = ((batches["cpu"] - batches["gpu"]) * std).abs() * 255  # grey levels
    assert float(diff.mean()) < 2.0, float(diff.mean())


def test_every_view_comes_from_one_decode_on_both_paths(images, monkeypatch):
    """JCL's 1 + 5 views: one decode per image, with the PIL pipeline and with the device pipeline."""
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for aug in ("cpu", "gpu"):
        cfg = _cfg(images, "jcl", ["data.num_keys=5", f"data.aug_device={aug}"])
        ds = build_pipeline(cfg, ImageFolder(images), torch.device("cpu")).dataset
        opened.clear()
        views = ds[(3, 11)][0]
        assert views.shape[0] == 6 and len(opened) == 1, aug


def test_gpu_aug_run_on_cpu_trains_resumes_bit_exactly_and_is_recorded(images, tmp_path):
    extra = ["data.aug_device=gpu"]
    straight = train(_cfg(images, extra=[*extra, "train.max_steps=4"]), tmp_path / "a", "a")
    assert np.isfinite(straight.metrics["loss_final"])
    train(_cfg(images, extra=[*extra, "train.max_steps=2"]), tmp_path / "b", "b")
    resumed = train(_cfg(images, extra=[*extra, "train.max_steps=4"]), tmp_path / "b", "b")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    rec = load_record(tmp_path / "a")
    assert rec["pipeline"]["aug_device"] == "gpu" and rec["pipeline"]["prefetch"] is False
    assert rec["pipeline"]["decodes_per_image"] == 1
    assert "data.aug_device" not in " ".join(rec["protocol"]["deviations"])  # how, not what: not protocol
    assert "augmentation after the crop on the device (data.aug_device=gpu)" in (tmp_path / "a" / "log.txt").read_text()
    cpu = train(_cfg(images, extra=["train.max_steps=1"]), tmp_path / "c", "c")
    assert load_record(tmp_path / "c")["pipeline"]["aug_device"] == "cpu" and np.isfinite(cpu.metrics["loss_final"])


def test_compile_keeps_the_state_dict_keys(images):
    """nn.Module.compile compiles in place: the checkpoint's keys are those of an eager model (torch.compile(m)
    would prefix them with _orig_mod.)."""
    cfg = _cfg(images, extra=["train.compile=true"])
    eager, compiled = build_model(cfg, 1), build_model(cfg, 1)
    compile_encoders(compiled)
    assert compiled.encoder_q._compiled_call_impl is not None and compiled.encoder_k._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert list(torch.compile(torch.nn.Linear(2, 2)).state_dict()) == ["_orig_mod.weight", "_orig_mod.bias"]


def test_keep_optimizer_false_drops_it_from_the_complete_checkpoint_and_a_rerun_still_works(images, tmp_path,
                                                                                          capsys):
    base = ["train.epochs=1", "train.keep_every=1"]
    train(_cfg(images, extra=base), tmp_path / "keep", "keep")
    small = _cfg(images, extra=[*base, "train.keep_optimizer=false"])
    train(small, tmp_path / "drop", "drop")
    keep = torch.load(tmp_path / "keep" / CHECKPOINT, weights_only=False)
    drop = torch.load(tmp_path / "drop" / CHECKPOINT, weights_only=False)
    assert "optimizer" in keep and "optimizer" not in drop
    assert "train.keep_optimizer=false" in drop["optimizer_dropped"] and drop["step"] == keep["step"]
    for k, v in keep["state_dict"].items():
        assert torch.equal(v, drop["state_dict"][k]), k  # the same run, only the optimizer state is gone
    size = {d: (tmp_path / d / CHECKPOINT).stat().st_size for d in ("keep", "drop")}
    assert size["drop"] < 0.85 * size["keep"], size
    kept = tmp_path / "drop" / "checkpoint_0000.pth.tar"  # the last epoch's kept copy is the same file
    assert kept.stat().st_size == size["drop"]
    capsys.readouterr()
    train(small, tmp_path / "drop", "drop")  # rerun of the complete run: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    (tmp_path / "drop" / RECORD_NAME).unlink()
    again = train(small, tmp_path / "drop", "drop")  # no record: it is written again, nothing trained
    assert again.metrics["complete"] and json.loads((tmp_path / "drop" / RECORD_NAME).read_text())["metrics"]
    ckpt = torch.load(tmp_path / "drop" / CHECKPOINT, weights_only=False)
    ckpt["step"], ckpt["epoch"], ckpt["progress"]["step_in_epoch"] = 1, 0, 1  # as if it stopped before the end
    torch.save(ckpt, tmp_path / "drop" / CHECKPOINT)
    with pytest.raises(UserError, match="has no optimizer state .train.keep_optimizer=false.*--fresh"):
        train(small, tmp_path / "drop", "drop")
