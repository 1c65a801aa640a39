"""The colour half of the augmentation, batched: view by view equal to torchvision's operations, and the same
batch whether it runs in the collate (workers) or after the copy to the device."""

from __future__ import annotations

import random

import pytest
import torch
from torchvision.transforms.v2 import functional as tvf

from dinov2.data import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.data import photometric as P
from dinov2.data.datasets import seeded_rng
from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_TORCHVISION_JITTER = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)


def _reference_view(crop: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One view with torchvision's float operations, in the augmentation's order."""
    x = crop.float() / 255
    if params[P.JITTER]:
        for op in params[P.ORDER : P.ORDER + 4].long().tolist():
            x = _TORCHVISION_JITTER[op](x, float(params[P.FACTORS + op]))
    if params[P.GRAYSCALE]:
        x = tvf.rgb_to_grayscale(x, num_output_channels=3)
    if params[P.BLUR_SIGMA]:
        sigma = float(params[P.BLUR_SIGMA])
        x = tvf.gaussian_blur(x, [9, 9], [sigma, sigma])
    if params[P.SOLARIZE]:
        x = tvf.solarize(x, 128 / 255)
    return tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _random_params(n: int, generator: torch.Generator) -> torch.Tensor:
    """Views with every combination of operations: jitter in random orders, grayscale, blur, solarisation."""
    params = torch.stack([P.neutral_params() for _ in range(n)])
    for i in range(n):
        if i % 4 != 3:
            params[i, P.JITTER] = 1
            params[i, P.FACTORS : P.FACTORS + 3] = 0.6 + 0.8 * torch.rand(3, generator=generator)
            params[i, P.FACTORS + 3] = 0.2 * torch.rand((), generator=generator) - 0.1
            params[i, P.ORDER : P.ORDER + 4] = torch.randperm(4, generator=generator).float()
        params[i, P.GRAYSCALE] = float(i % 5 == 1)
        params[i, P.BLUR_SIGMA] = 0.1 + 1.9 * float(torch.rand((), generator=generator)) if i % 3 else 0.0
        params[i, P.SOLARIZE] = float(i % 4 == 2)
    return params


def test_batched_colour_operations_equal_torchvision_view_by_view() -> None:
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (24, 3, 20, 26), dtype=torch.uint8, generator=generator)
    crops[:, :, :3, :3] = 128  # grey pixels: hue undefined
    params = _random_params(24, generator)
    views = P.apply_photometric(crops, params)
    assert views.dtype == torch.float32 and views.shape == (24, 3, 20, 26)
    for crop, row, view in zip(crops, params, views):
        torch.testing.assert_close(view, _reference_view(crop, row), atol=2e-5, rtol=0)


def test_neutral_parameters_only_normalise() -> None:
    crops = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = P.apply_photometric(crops, torch.stack([P.neutral_params()] * 3))
    expected = tvf.normalize(crops.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(views, expected, atol=1e-6, rtol=0)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(TypeError, match=r"expected uint8 \(N, 3, H, W\) crops, got torch.float32"):
        P.apply_photometric(torch.zeros(2, 3, 4, 4), torch.zeros(2, P.N_PARAMS))
    with pytest.raises(ValueError, match=r"expected \(2, 12\) colour parameters, got \(3, 12\)"):
        P.apply_photometric(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, P.N_PARAMS))


@pytest.mark.parametrize(("hematology", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_colour_on_the_device_gives_the_batch_the_workers_give(hematology: bool, dtype: torch.dtype) -> None:
    """Deferred to ``finish_crops`` (here on the CPU), the colour operations give the very batch that the collate
    gives when it applies them itself: same crops, bit for bit, same masks."""
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 0 if hematology else 2, 28, 14,
                                        hematology=hematology)  # fmt: skip
    images = torch.randint(0, 256, (6, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    samples = []
    for index, image in enumerate(images):
        with seeded_rng(index):
            samples.append((augmentation(image), 0))
    kwargs = dict(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=dtype,
                  mask_generator=MaskingGenerator.for_global_crops(28, 14))  # fmt: skip
    in_workers = collate_data_and_cast(samples, rng=random.Random(0), **kwargs)
    deferred = collate_data_and_cast(samples, rng=random.Random(0), defer_colour=True, **kwargs)
    assert deferred["collated_global_crops"].dtype == torch.uint8
    assert deferred["collated_global_params"].shape == (12, P.N_PARAMS)
    on_device = P.finish_crops(deferred, torch.device("cpu"), dtype)
    assert set(on_device) == set(in_workers)
    for key, value in in_workers.items():
        if torch.is_tensor(value):
            assert value.dtype == on_device[key].dtype and torch.equal(value, on_device[key]), key
        else:
            assert value == on_device[key], key
    assert (in_workers["collated_local_crops"] is None) == hematology
