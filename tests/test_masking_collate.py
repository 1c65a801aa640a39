"""Block masking and the training collate against the reference masks in ../shared/conformance/losses.pt."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator


@pytest.fixture(scope="module")
def masks_ref(conformance_dir: Path) -> dict[str, Any]:
    """The ``masks`` section of losses.pt."""
    return torch.load(conformance_dir / "losses.pt", weights_only=True)["masks"]


@pytest.fixture
def restore_random_state() -> Iterator[None]:
    """Leave Python's module-level random state as the test found it."""
    state = random.getstate()
    yield
    random.setstate(state)


def _samples(n_images: int, n_global: int = 2, n_local: int = 0) -> list[tuple[dict[str, list[torch.Tensor]], int]]:
    """Samples whose crop pixels encode (image, kind, crop) so the stacking order can be checked."""
    samples = []
    for image in range(n_images):
        crops = {
            "global_crops": [torch.full((3, 4, 4), 100.0 * image + c) for c in range(n_global)],
            "local_crops": [torch.full((3, 2, 2), 100.0 * image + 50 + c) for c in range(n_local)],
        }
        samples.append((crops, image))
    return samples


def _reference_setup(settings: dict[str, Any]) -> tuple[list[Any], MaskingGenerator, dict[str, Any]]:
    height, width = settings["input_size"]
    generator = MaskingGenerator(input_size=(height, width), max_num_patches=settings["max_num_patches"])
    kwargs = dict(
        mask_ratio_tuple=tuple(settings["mask_ratio_tuple"]),
        mask_probability=settings["mask_probability"],
        dtype=torch.float32,
        mask_generator=generator,
    )
    return _samples(settings["n_images"], settings["n_global_crops"]), generator, kwargs


def _assert_batches_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("collated_masks", "mask_indices_list", "masks_weight"):
        assert torch.equal(a[key], b[key]), key


def test_collate_reproduces_reference_masks(masks_ref: dict[str, Any], restore_random_state: None) -> None:
    settings = masks_ref["settings"]
    samples, _, kwargs = _reference_setup(settings)
    random.seed(settings["random.seed"])
    batch = collate_data_and_cast(samples, **kwargs)

    assert batch["collated_masks"].dtype == torch.bool
    assert torch.equal(batch["collated_masks"], masks_ref["collated_masks"])
    assert torch.equal(batch["mask_indices_list"], masks_ref["mask_indices_list"])
    assert batch["masks_weight"].dtype == masks_ref["masks_weight"].dtype
    assert torch.equal(batch["masks_weight"], masks_ref["masks_weight"])
    assert masks_ref["n_masked_patches"].tolist() == [batch["mask_indices_list"].shape[0]]


def test_collate_with_seeded_rng_matches_module_random_and_leaves_it_alone(
    masks_ref: dict[str, Any], restore_random_state: None
) -> None:
    settings = masks_ref["settings"]
    samples, _, kwargs = _reference_setup(settings)
    random.seed(12345)
    state_before = random.getstate()
    batch = collate_data_and_cast(samples, rng=random.Random(settings["random.seed"]), **kwargs)
    assert random.getstate() == state_before, "a given rng must not consume the module-level random state"
    assert torch.equal(batch["collated_masks"], masks_ref["collated_masks"])

    again = collate_data_and_cast(samples, rng=random.Random(7), **kwargs)
    _assert_batches_equal(again, collate_data_and_cast(samples, rng=random.Random(7), **kwargs))
    other = collate_data_and_cast(samples, rng=random.Random(8), **kwargs)
    assert not torch.equal(other["collated_masks"], again["collated_masks"])


def test_collate_mask_invariants(masks_ref: dict[str, Any]) -> None:
    samples, _, kwargs = _reference_setup(masks_ref["settings"])
    n_crops = len(samples) * 2
    for seed in range(20):
        batch = collate_data_and_cast(samples, rng=random.Random(seed), **kwargs)
        masks = batch["collated_masks"]
        per_crop = masks.sum(dim=1)
        n_masked = int(per_crop.sum())
        assert masks.shape == (n_crops, 256)
        assert n_masked <= masks_ref["upperbound"]  # DINOv2's bound: sum over masked crops of int(N * bin top)
        assert int((per_crop > 0).sum()) <= int(n_crops * kwargs["mask_probability"])
        assert torch.equal(batch["mask_indices_list"], torch.nonzero(masks.flatten()).flatten())
        # weights: 1 / #masked of the token's crop, so each masked crop's weights sum to 1
        crop_of_token = batch["mask_indices_list"] // 256
        torch.testing.assert_close(batch["masks_weight"], 1.0 / per_crop[crop_of_token].float())
        assert batch["masks_weight"].sum().item() == pytest.approx(float((per_crop > 0).sum()))


def test_collate_stacks_crops_crop_major_and_casts() -> None:
    generator = MaskingGenerator(4, max_num_patches=8)
    samples = _samples(3, n_global=2, n_local=4)
    batch = collate_data_and_cast(
        samples, (0.1, 0.5), 0.5, torch.float16, mask_generator=generator, rng=random.Random(0)
    )
    globals_, locals_ = batch["collated_global_crops"], batch["collated_local_crops"]
    assert globals_.dtype == torch.float16 and locals_.dtype == torch.float16
    assert globals_.shape == (6, 3, 4, 4) and locals_.shape == (12, 3, 2, 2)
    # crop-major: all images' crop 0, then all images' crop 1, ...
    assert globals_[:, 0, 0, 0].tolist() == [0, 100, 200, 1, 101, 201]
    assert locals_[:, 0, 0, 0].tolist() == [50, 150, 250, 51, 151, 251, 52, 152, 252, 53, 153, 253]
    assert batch["collated_masks"].shape == (6, 16)


def test_collate_without_local_crops_gives_none() -> None:
    batch = collate_data_and_cast(
        _samples(2), (0.1, 0.5), 0.5, torch.float32, mask_generator=MaskingGenerator(4, max_num_patches=8)
    )
    assert batch["collated_local_crops"] is None
    assert batch["collated_global_crops"].shape == (4, 3, 4, 4)


def test_collate_errors_are_clear() -> None:
    generator = MaskingGenerator(4, max_num_patches=8)
    with pytest.raises(KeyError, match="sample 1 has no 'local_crops'"):
        bad = _samples(2)
        del bad[1][0]["local_crops"]
        collate_data_and_cast(bad, (0.1, 0.5), 0.5, torch.float32, mask_generator=generator)
    with pytest.raises(ValueError, match="different numbers of 'global_crops'"):
        bad = _samples(2)
        bad[0][0]["global_crops"].pop()
        collate_data_and_cast(bad, (0.1, 0.5), 0.5, torch.float32, mask_generator=generator)
    with pytest.raises(ValueError, match="empty samples_list"):
        collate_data_and_cast([], (0.1, 0.5), 0.5, torch.float32, mask_generator=generator)


def test_masking_generator_shapes_counts_and_blocks() -> None:
    generator = MaskingGenerator(input_size=(8, 12), max_num_patches=30)
    assert generator.get_shape() == (8, 12)
    rng = random.Random(3)
    empty = generator(0, rng=rng)
    assert empty.dtype == np.bool_ and empty.shape == (8, 12) and not empty.any()
    for target in (4, 10, 25, 48):
        mask = generator(target, rng=rng)
        assert mask.shape == (8, 12)
        # each block adds at most the remaining count, so the target is never exceeded
        assert 0 < mask.sum() <= target
    # asking for the whole grid stops once no block fits any more
    full = generator(96, rng=rng)
    assert 0 < full.sum() <= 96


def test_masking_generator_is_deterministic_per_rng() -> None:
    generator = MaskingGenerator(16, max_num_patches=128)
    assert np.array_equal(generator(60, rng=random.Random(1)), generator(60, rng=random.Random(1)))
    assert not np.array_equal(generator(60, rng=random.Random(1)), generator(60, rng=random.Random(2)))


def test_masking_generator_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_num_patches"):
        MaskingGenerator(16)
    with pytest.raises(ValueError, match="min_aspect"):
        MaskingGenerator(16, max_num_patches=10, min_aspect=0.0)
    with pytest.raises(ValueError, match="positive"):
        MaskingGenerator((0, 16), max_num_patches=10)


@pytest.mark.parametrize(("crop", "grid", "bound"), [(224, 16, 128), (210, 15, 105), (518, 37, 666), (98, 7, 21)])
def test_global_crop_generator_bounds_blocks_as_dinov2(crop: int, grid: int, bound: int) -> None:
    # DINOv2's train.py: max_num_patches=0.5 * img_size // patch_size * img_size // patch_size (floors from the left)
    generator = MaskingGenerator.for_global_crops(crop, 14)
    assert generator.get_shape() == (grid, grid) and generator.max_num_patches == bound
