"""Batch-level augmentation on the device (cl_bench/data/batch_transforms.py) against the per-image
torchvision path: the same crop-box distribution, identical images for identical parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T1
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.data.batch_transforms import (
    AugmentParams,
    BatchAugment,
    augment_batch,
    build_input_pipeline,
    random_crop_boxes,
    resample_weights,
    rrc_boxes,
)
from cl_bench.data.folders import FileImages
from cl_bench.data.transforms import batch_prepare_transform, eval_pipeline, resolve_spec
from cl_bench.errors import ConfigError

CIFAR = DataConfig(input_size=32)
VIT = DataConfig(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)
CPU = torch.device("cpu")


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _torchvision_rrc_boxes(n: int, h: int, w: int, scale, ratio) -> torch.Tensor:
    img = torch.zeros(3, h, w)
    return torch.tensor([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize(
    ("h", "w", "scale", "ratio"),
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
        (40, 64, (0.05, 1.0), (3 / 4, 4 / 3)),  # non-square: box positions and sizes differ per axis
        (20, 20, (0.6, 1.0), (1.5, 3.0)),  # boxes that often do not fit: exercises the centre-crop fallback
        (375, 500, (0.08, 1.0), (3 / 4, 4 / 3)),  # an ImageNet-sized photo: fine-grained aspect ratios
    ],
)
def test_rrc_box_distribution_matches_torchvision(h: int, w: int, scale, ratio) -> None:
    """Top, left, height, width, aspect ratio and area of 6000 boxes: two-sample Kolmogorov-Smirnov tests
    against torchvision's RandomResizedCrop.get_params do not reject (p > 0.001), and the mean areas agree."""
    torch.manual_seed(0)
    ours = rrc_boxes(6000, h, w, scale, ratio)
    torch.manual_seed(1)
    reference = _torchvision_rrc_boxes(6000, h, w, scale, ratio)
    assert ours.dtype == torch.long and ours.shape == (6000, 4)
    top, left, bh, bw = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert (bh > 0).all() and (bw > 0).all()
    for column in range(4):
        result = stats.ks_2samp(ours[:, column].numpy(), reference[:, column].numpy(), method="asymp")
        assert result.pvalue > 1e-3, (column, result)
    aspect_ours = torch.log(bw.double() / bh.double()).numpy()  # KS on h and w alone misses a linear ratio
    aspect_ref = torch.log(reference[:, 3].double() / reference[:, 2].double()).numpy()
    assert stats.ks_2samp(aspect_ours, aspect_ref, method="asymp").pvalue > 1e-3
    area_ours = (bh * bw).double().numpy()
    area_ref = (reference[:, 2] * reference[:, 3]).double().numpy()
    assert stats.ks_2samp(area_ours, area_ref, method="asymp").pvalue > 1e-3
    assert abs(area_ours.mean() - area_ref.mean()) <= 4 * area_ref.std() / np.sqrt(6000) * np.sqrt(2)


def test_random_crop_offsets_match_torchvision() -> None:
    """Pad-4 random crop of 32 px: offsets uniform over 0..8 on both axes, as torchvision's RandomCrop."""
    torch.manual_seed(0)
    ours = random_crop_boxes(9000, 40, 40, 32)
    assert (ours[:, 2:] == 32).all()
    img = torch.zeros(3, 40, 40)
    torch.manual_seed(1)
    reference = torch.tensor([T1.RandomCrop.get_params(img, (32, 32))[:2] for _ in range(9000)])
    for column in range(2):
        ours_counts = np.bincount(ours[:, column].numpy(), minlength=9)
        ref_counts = np.bincount(reference[:, column].numpy(), minlength=9)
        assert len(ours_counts) == 9 and len(ref_counts) == 9
        assert stats.chi2_contingency(np.stack([ours_counts, ref_counts])).pvalue > 1e-3


def _spec(dc: DataConfig, **keys) -> object:
    return resolve_spec(dc, TransformConfig(**keys), dataset_hflip_invariant=True)


def _reference(image: torch.Tensor, box, flip: bool, factor: float | None, spec) -> torch.Tensor:
    """The per-image torchvision ops with the given parameters, in the per-image pipeline's order."""
    if spec.train == TrainAugment.crop_flip:
        image = TF.pad(image, [4])
    top, left, h, w = (int(v) for v in box)
    if spec.train == TrainAugment.rrc_flip:
        interp = InterpolationMode(spec.interpolation(train=True).value)
        image = TF.resized_crop(
            image, top, left, h, w, [spec.size, spec.size], interpolation=interp, antialias=True
        )
    else:
        image = TF.crop(image, top, left, h, w)
    if flip:
        image = TF.horizontal_flip(image)
    if factor is not None:
        image = TF.adjust_brightness(image, factor)
    out = TF.to_dtype(image, torch.float32, scale=True)
    return TF.normalize(out, list(spec.data.mean), list(spec.data.std)) if spec.normalize else out


@pytest.mark.parametrize(
    "keys",
    [
        {"train": "crop_flip"},
        {
            "train": "crop_flip",
            "brightness": 63 / 255,
            "mean": [0.5071, 0.4867, 0.4408],
            "std": [0.2675, 0.2565, 0.2761],
        },
        {"train": "resize_crop_flip", "train_resize": 40, "input_size": 32, "normalize": False},
    ],
)
def test_equal_parameters_give_identical_images(keys: dict) -> None:
    """Crop, flip, brightness and normalisation of a batch equal torchvision's per-image ops bit for bit."""
    spec = _spec(CIFAR, **keys)
    prepare = batch_prepare_transform(spec)
    images = torch.stack([prepare(x) for x in _images(16, 36, 44)])
    augment = BatchAugment(spec)
    torch.manual_seed(3)
    params = augment.draw(len(images), images.shape[2], images.shape[3])
    assert params.flips is not None and 0 < int(params.flips.sum()) < 16
    out = augment.apply(images, params)
    for k in range(len(images)):
        factor = None if params.brightness is None else float(params.brightness[k])
        expected = _reference(images[k], params.boxes[k], bool(params.flips[k]), factor, spec)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_rrc_matches_torchvision_resized_crop(interpolation: str) -> None:
    """RandomResizedCrop + flip, same parameters (upsampling 32 -> 64, antialiased downsampling 96 -> 64):
    torchvision's float kernel rounded back to uint8 (its path on a GPU) up to float summation order (one
    grey level in at most 0.1 % of the values, where a value lies at .5); against its native
    CPU uint8 kernels within one grey level for bilinear, and for bicubic (whose uint8 kernel clamps between
    its two passes) within one grey level on average."""
    for side in (32, 96):
        spec = _spec(DataConfig(64, interpolation=interpolation), train="rrc_flip", normalize=False)
        images = _images(8, side, side, seed=side)
        augment = BatchAugment(spec)
        torch.manual_seed(0)
        params = augment.draw(8, side, side)
        assert params.flips is not None and 0 < int(params.flips.sum()) < 8
        out = augment.apply(images, params)
        interp = InterpolationMode(interpolation)
        for k in range(8):
            top, left, h, w = (int(v) for v in params.boxes[k])
            resized = TF.resized_crop(images[k].float(), top, left, h, w, [64, 64], interp, antialias=True)
            expected = resized.clamp(0, 255).round().to(torch.uint8)
            if params.flips[k]:  # the batch path mirrors through the resampling weights
                expected = TF.horizontal_flip(expected)
            reference = TF.to_dtype(expected, torch.float32, scale=True)
            off = (out[k] - reference).abs()
            assert float(off.max()) <= 1 / 255 + 1e-6 and int((off > 0).sum()) <= off.numel() // 1000
            cpu_uint8 = _reference(images[k], params.boxes[k], bool(params.flips[k]), None, spec)
            difference = (out[k] - cpu_uint8).abs()
            if interpolation == "bilinear":
                assert float(difference.max()) <= 1 / 255 + 1e-6
            else:
                assert float(difference.mean()) <= 1 / 255


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize(("box", "out"), [((3, 5, 20, 13), 48), ((0, 0, 40, 40), 17), ((10, 2, 7, 30), 9)])
def test_resample_weights_are_interpolate_on_the_crop(interpolation: str, box: tuple, out: int) -> None:
    """rows @ image @ cols^T equals F.interpolate of the cropped image (antialiased; up, down and mixed
    scaling) to float precision."""
    image = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    top, left, h, w = box
    rows = resample_weights(torch.tensor([top]), torch.tensor([h]), 40, out, interpolation).double()
    cols = resample_weights(torch.tensor([left]), torch.tensor([w]), 40, out, interpolation).double()
    ours = rows[0] @ image @ cols[0].T
    crop = image[:, :, top : top + h, left : left + w]
    extra = {} if interpolation == "nearest" else {"align_corners": False, "antialias": True}
    reference = torch.nn.functional.interpolate(crop, size=(out, out), mode=interpolation, **extra)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3)


def test_autocast_does_not_touch_the_augmentation() -> None:
    """Replay (ER, DER++) augments its buffered images inside ``training_step``, under the trainer's
    autocast: the resampling stays float32 (bf16 matrix products moved a quarter of the values by up to
    9 grey levels)."""
    spec = _spec(DataConfig(64, interpolation="bicubic"), train="rrc_flip")
    augment = BatchAugment(spec)
    images = _images(4, 32, 32)
    torch.manual_seed(0)
    params = augment.draw(4, 32, 32)
    reference = augment.apply(images, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = augment.apply(images, params)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("train", ["crop_flip", "rrc_flip", "resize_crop_flip", "none"])
def test_every_recipe_runs_where_the_batch_lies(train: str) -> None:
    """No GPU here: on the ``meta`` device (which refuses, among others, elementwise ops and ``where`` that
    mix in CPU tensors) every recipe gives a float32 batch of the input size on that device."""
    spec = _spec(DataConfig(64, interpolation="bicubic"), train=train, brightness=0.2, train_resize=72)
    side = 72 if train == "resize_crop_flip" else 64
    out = BatchAugment(spec)(torch.empty(4, 3, side, side, dtype=torch.uint8, device="meta"))
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == (4, 3, 64, 64)


def test_ddp_ranks_draw_their_own_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DDP process is seeded alike: each draws the parameters of the global batch and applies its own
    share, so the i-th images of two ranks are not cropped alike, and the random streams stay in step."""
    from cl_bench.data import batch_transforms

    augment = BatchAugment(_spec(CIFAR, train="crop_flip", brightness=0.25))
    images = _images(8, 32, 32)
    torch.manual_seed(0)
    whole = augment.apply(torch.cat([images, images]), augment.draw(16, 32, 32))
    outputs, states = [], []
    for rank in (0, 1):
        monkeypatch.setattr(batch_transforms.distributed, "world_size", lambda: 2)
        monkeypatch.setattr(batch_transforms.distributed, "rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        outputs.append(augment(images))
        states.append(torch.get_rng_state())
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=0, atol=0)
    assert torch.equal(states[0], states[1])


def test_brightness_factors_and_flips_are_distributed_as_torchvision() -> None:
    """Factors uniform on [1 - b, 1 + b], flips with probability 1/2."""
    spec = _spec(CIFAR, train="crop_flip", brightness=0.25)
    torch.manual_seed(0)
    params = BatchAugment(spec).draw(20000, 32, 32)
    assert params.brightness is not None and params.flips is not None
    assert float(params.brightness.min()) >= 0.75 and float(params.brightness.max()) <= 1.25
    assert stats.kstest(params.brightness.numpy(), stats.uniform(0.75, 0.5).cdf).pvalue > 1e-3
    assert abs(float(params.flips.float().mean()) - 0.5) < 0.02


def test_no_augmentation_is_the_eval_transform_exactly() -> None:
    """train=none: the loader's eval geometry plus the batch conversion equal the eval transform."""
    spec = _spec(VIT, train="none", eval_resize=256)
    prepare, evaluate = batch_prepare_transform(spec), eval_pipeline(spec)
    raw = _images(4, 40, 52)
    batch = torch.stack([prepare(x) for x in raw])
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 224, 224)
    out = BatchAugment(spec)(batch)
    torch.testing.assert_close(out, torch.stack([evaluate(x) for x in raw]), rtol=0, atol=0)


def test_augment_batch_only_touches_uint8_images() -> None:
    """Cached features and already converted batches pass through; uint8 images become model inputs."""
    augment = BatchAugment(_spec(CIFAR, train="crop_flip"))
    features = (torch.randn(4, 8), torch.arange(4))
    assert augment_batch(augment, features) is features
    images = [_images(4, 32, 32), torch.arange(4), torch.arange(4)]
    out = augment_batch(augment, images)
    assert isinstance(out, list) and out[0].dtype == torch.float32 and out[0].shape == (4, 3, 32, 32)
    assert out[1] is images[1] and out[2] is images[2]
    assert augment_batch(None, images) is images


def _data(train) -> ClassificationData:
    return ClassificationData("toy", train, train, ["a", "b"])


def test_on_device_resolution() -> None:
    """auto: on the device on a GPU only; true: always, except RandomResizedCrop over images of varying
    sizes (a clear error naming dataset.cache_size)."""
    arrays = ArrayImages(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    assert build_input_pipeline(CIFAR, TransformConfig(), _data(arrays), CPU).batch is None
    assert build_input_pipeline(CIFAR, TransformConfig(on_device=True), _data(arrays), CPU).batch is not None
    assert build_input_pipeline(VIT, TransformConfig(on_device=False), _data(arrays), CPU).batch is None
    files = FileImages(["a.jpg", "b.jpg"], np.array([0, 1]), "files")
    pipeline = build_input_pipeline(
        VIT, TransformConfig(train="crop_flip", on_device=True), _data(files), CPU
    )
    assert pipeline.batch is not None
    with pytest.raises(ConfigError, match="dataset.cache_size"):
        build_input_pipeline(VIT, TransformConfig(train="rrc_flip", on_device=True), _data(files), CPU)


def test_debug_subset_of_arrays_augments_on_device() -> None:
    """A smoke run's images (``debug.samples_per_class``: a subset of the arrays) still have one size, so
    RandomResizedCrop runs on the batch as in the full run: auto on a GPU, and ``on_device=true`` is no
    error."""
    from cl_bench.debug import subset_per_class

    arrays = ArrayImages(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]))
    subset = subset_per_class(_data(arrays), 1)
    rrc = TransformConfig(train="rrc_flip")
    assert build_input_pipeline(VIT, rrc, subset, torch.device("cuda")).batch is not None
    assert build_input_pipeline(VIT, TransformConfig(train="rrc_flip", on_device=True), subset, CPU).batch
    files = subset_per_class(_data(FileImages(["a.jpg", "b.jpg"], np.array([0, 1]), "files")), 1)
    assert build_input_pipeline(VIT, rrc, files, torch.device("cuda")).batch is None


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"train": "resize_crop_flip"}, "train_resize"),
        ({"rrc_scale": [0.5, 0.1]}, "rrc_scale"),
        ({"brightness": -0.1}, "brightness"),
        ({"eval_interpolation": "lanczos"}, "eval_interpolation"),
        ({"eval_resize": 100}, "eval_resize"),
    ],
)
def test_bad_transform_keys_fail_clearly(keys: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_spec(VIT, TransformConfig(**keys), dataset_hflip_invariant=True)


def test_params_type_is_plain() -> None:
    """Parameters of a batch are CPU tensors (drawn from the global generator whatever the device)."""
    params = BatchAugment(_spec(VIT, train="rrc_flip")).draw(3, 50, 60)
    assert isinstance(params, AugmentParams) and params.boxes.device.type == "cpu"


def test_tiny_run_with_batch_augmentation(run_tiny) -> None:
    """A run with transform.on_device=true trains (uint8 batches would fail in the backbone without the
    hook), evaluates and checkpoints; replay draws go through the batch augmentation too."""
    doc, _ = run_tiny("method=er", "method.epochs=1", "method.batch_size=32", "transform.on_device=true")
    assert doc["status"] == "complete" and doc["last_acc"] > 0


@pytest.mark.parametrize(
    ("keys", "side"),
    [({"train": "crop_flip"}, 32), ({"train": "resize_crop_flip", "train_resize": 40, "input_size": 32}, 40)],
)
def test_loader_share_skips_images_already_at_size(keys: dict, side: int) -> None:
    """An image already at the size the deterministic geometry produces passes as it is (what the
    torchvision steps return for it too); others go through the steps."""
    spec = _spec(CIFAR, **keys)
    prepare = batch_prepare_transform(spec)
    at_size, other = _images(1, side, side)[0], _images(1, 50, 60)[0]
    assert prepare(at_size) is at_size
    torch.testing.assert_close(prepare(at_size), prepare.transform(at_size), rtol=0, atol=0)
    assert prepare(other).shape[-2:] == prepare.transform(other).shape[-2:] != other.shape[-2:]
