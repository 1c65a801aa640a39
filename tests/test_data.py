"""Tests of the data pipeline: datasets, augmentations, sampler, loaders and the data scripts."""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv1
from torchvision.transforms import v2 as tv2
from torchvision.transforms.v2 import functional as tvf

from dinov2.configs import load_config
from dinov2.data import (
    DataAugmentationDINO,
    DatasetError,
    FileListDataset,
    InfiniteSampler,
    SampleKey,
    derive_seed,
    make_data_loader,
    make_dataset,
    make_eval_transform,
    seeded_rng,
)
from dinov2.data import photometric as P
from dinov2.data import transforms as T
from dinov2.data.datasets import dataset_source, find_images
from dinov2.train.data import build_train_dataset, build_train_loader


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> Path:
    """A small random RGB image (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def image_tree(tmp_path: Path) -> Path:
    """``tree/<class>/<file>``: two classes, mixed formats."""
    root = tmp_path / "tree"
    for i in range(3):
        _write_image(root / "lymphocyte" / f"l{i}.png", i)
        _write_image(root / "neutrophil" / f"n{i}.jpg", 10 + i)
    return root


def _small_augmentation(local: int = 2, hematology: bool = True) -> DataAugmentationDINO:
    return DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), local, global_crops_size=32, local_crops_size=16,
                                hematology=hematology)


# --------------------------------------------------------------------------- construction errors


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        FileListDataset(missing)


def test_empty_list_names_the_file(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "empty_source.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"empty_source\.txt.*empty"):
        FileListDataset(lists)


def test_folder_without_images_or_lists(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match=r"no \.txt file lists directly in \S+ and no images \(.*\) under it$"):
        FileListDataset(tmp_path)
    # lists one level down: the folder that holds them is named
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cells.txt").write_text("/data/a.jpg\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'lists'} holds some: name that folder$"):
        FileListDataset(tmp_path)


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    list_file = tmp_path / "cells.txt"
    list_file.write_text("/data/a.jpg\n/data/b.jpg 3\n")
    with pytest.raises(ValueError, match=r"cells\.txt:2: '/data/b\.jpg 3' is not an image path"):
        FileListDataset(list_file)


def test_non_list_file_root(tmp_path: Path) -> None:
    image = _write_image(tmp_path / "x.png", 0)
    with pytest.raises(ValueError, match="not a .txt file list"):
        FileListDataset(image)


# --------------------------------------------------------------------------- layouts


def test_relative_and_absolute_list_entries(tmp_path: Path, image_tree: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text(
        "# relative to this file's folder\n../tree/lymphocyte/l0.png\n\n../tree/neutrophil/n1.jpg\n"
    )
    (lists / "b.txt").write_text(f"{image_tree / 'neutrophil' / 'n2.jpg'}\n")
    dataset = FileListDataset(lists)
    assert len(dataset) == 3
    assert [Path(dataset.path(i)).resolve() for i in range(3)] == [
        (image_tree / "lymphocyte" / "l0.png").resolve(),
        (image_tree / "neutrophil" / "n1.jpg").resolve(),
        (image_tree / "neutrophil" / "n2.jpg").resolve(),
    ]
    image, _ = dataset[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (40, 36)


def test_a_list_whose_paths_all_miss_fails_at_once_naming_the_folder_they_are_read_from(
    tmp_path: Path, image_tree: Path
) -> None:
    """Relative paths written for another folder (here: relative to the tree, not to the list): an error when the
    dataset is built, before any model, where each image used to be skipped with a warning during training.
    A list in which only some images are missing still loads (the loader skips and counts those)."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "cells.txt").write_text("lymphocyte/l0.png\nneutrophil/n1.jpg\n")
    with pytest.raises(DatasetError, match=re.escape(
        f"cells.txt: none of the 2 images looked up exists, e.g. {lists / 'lymphocyte' / 'l0.png'} (a relative path "
        f"is read from the list's folder, {lists})"
    )):
        FileListDataset(lists)
    (lists / "cells.txt").write_text(f"lymphocyte/l0.png\n{image_tree / 'neutrophil' / 'n1.jpg'}\n")
    assert len(FileListDataset(lists)) == 2


def test_image_folder_is_read_like_imagefolder(image_tree: Path) -> None:
    (image_tree / "lymphocyte" / "readme.txt.bak").write_text("ignored")
    dataset = FileListDataset(image_tree)
    assert len(dataset) == 6
    assert Path(dataset.path(4)) == image_tree / "neutrophil" / "n1.jpg"


def test_resize_option(image_tree: Path) -> None:
    dataset = FileListDataset(image_tree, resize=24)
    image, _ = dataset[0]
    assert image.size == (24, 24)
    with pytest.raises(ValueError, match="resize"):
        FileListDataset(image_tree, resize=0)


def test_hema_standard_dataset_spelling(tmp_path: Path, image_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pbc.txt").write_text("".join(f"{p}\n" for p in sorted(image_tree.rglob("*.*"))))
    dataset = make_dataset(f"HemaStandardDataset:root={lists}:shuffle=1")
    assert len(dataset) == 6 and dataset.resize == 224  # DinoBloom resized every cell to 224
    assert make_dataset(f"FileListDataset:root={lists}").resize is None
    assert make_dataset(str(lists), resize=112).resize == 112
    assert make_dataset(f"HemaStandardDataset:root={lists}:resize=none").resize is None
    with caplog.at_level(logging.WARNING):
        make_dataset(f"HemaStandardDataset:root={lists}:split=TRAIN")
    assert "split=TRAIN is ignored" in caplog.text
    with pytest.raises(ValueError, match="unknown dataset 'ImageNet'"):
        make_dataset(f"ImageNet:root={lists}")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        make_dataset(f"HemaStandardDataset:root={lists}:colour=1")
    with pytest.raises(ValueError, match="no root"):
        make_dataset("HemaStandardDataset:shuffle=1")
    with pytest.raises(ValueError, match="says resize=96 but resize=224"):
        make_dataset(f"HemaStandardDataset:root={lists}:resize=96", resize=224)
    # a folder whose path holds a ':' (training records the root absolute, the current folder's path included)
    colon = tmp_path / "run:2" / "lists"
    shutil.copytree(lists, colon)
    assert len(make_dataset(f"HemaStandardDataset:root={colon}:shuffle=1")) == 6
    assert dataset_source(f"HemaStandardDataset:shuffle=1:root={colon}") == (str(colon), 224)
    with pytest.raises(ValueError, match="expected key=value, got 'shuffle'"):
        make_dataset("HemaStandardDataset:shuffle")
    # a Windows path with its drive letter is a path, not a data set named C
    assert dataset_source("C:\\data\\lists") == ("C:\\data\\lists", None)
    assert dataset_source("D:/cells", 224) == ("D:/cells", 224)


# --------------------------------------------------------------------------- lists and files from other systems


def test_lists_with_a_byte_order_mark_and_an_upper_case_suffix(tmp_path: Path, image_tree: Path) -> None:
    """Excel and Notepad start UTF-8 files with a BOM; Windows tools may name a list ``B.TXT``."""
    lists = tmp_path / "lists"
    lists.mkdir()
    first, second, third = (image_tree / "lymphocyte" / "l0.png", image_tree / "neutrophil" / "n1.jpg",
                            image_tree / "neutrophil" / "n2.jpg")
    (lists / "a.txt").write_text(f"{first}\n", encoding="utf-8-sig")
    (lists / "b.TXT").write_text(f"# exported from Excel\n{second}\n", encoding="utf-8-sig")
    (lists / "c.Txt").write_text(f"{third}\n")
    dataset = FileListDataset(lists, transform=tvf.pil_to_tensor)
    assert [dataset.path(i) for i in range(len(dataset))] == [str(first), str(second), str(third)]
    assert all(dataset[i] is not None for i in range(3))
    assert len(FileListDataset(lists / "b.TXT")) == 1
    # two such files joined into one (`cat a.txt b.txt`): the second mark, mid-file, is no part of a path
    joined = tmp_path / "joined.txt"
    joined.write_bytes((lists / "a.txt").read_bytes() + (lists / "b.TXT").read_bytes())
    assert FileListDataset(joined).path(1) == str(second)


def test_an_image_listed_twice_is_said(tmp_path: Path, image_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lists of nested folders, or one list copied into another, name images twice: they are drawn twice as often,
    which is rarely meant, so the dataset says how many and where."""
    lists = tmp_path / "lists"
    lists.mkdir()
    first, second = image_tree / "lymphocyte" / "l0.png", image_tree / "neutrophil" / "n1.jpg"
    (lists / "a.txt").write_text(f"{first}\n{second}\n")
    (lists / "b.txt").write_text(f"{image_tree}/neutrophil/../neutrophil/n1.jpg\n{second}\n")
    with caplog.at_level(logging.WARNING, logger="dinov2.data"):
        assert len(FileListDataset(lists)) == 4
    repeated = f"{image_tree}/neutrophil/../neutrophil/n1.jpg"
    assert (f"1 image(s) are listed more than once, 3 listings in all of the 4 (e.g. {repeated}, in a.txt and "
            "b.txt)") in caplog.text  # fmt: skip
    caplog.clear()
    (lists / "b.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="dinov2.data"):
        FileListDataset(lists)
    assert "more than once" not in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        "Zelle_\u00fc.png\n".encode("cp1252"),  # Windows code page
        "a.png\nb.png\n".encode("utf-16"),  # Notepad's "Unicode", with its byte-order mark
        "a.png\nb.png\n".encode("utf-16-le"),  # the same without one
    ],
    ids=["cp1252", "utf-16", "utf-16-le"],
)
def test_a_list_that_is_not_utf8_is_named(tmp_path: Path, content: bytes) -> None:
    list_file = tmp_path / "cells.txt"
    list_file.write_bytes(content)
    with pytest.raises(DatasetError, match=r"cells\.txt:1: .* is not UTF-8 text.*must be UTF-8"):
        FileListDataset(list_file)


def test_hidden_lists_are_skipped(tmp_path: Path, image_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A copy from a Mac leaves ``._name.txt`` resource forks (binary) next to the lists; skipping is said."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pbc.txt").write_text(f"{image_tree / 'lymphocyte' / 'l1.png'}\n")
    (lists / "._pbc.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe")
    (lists / ".old.txt").write_text("/nowhere/old.png\n")
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        dataset = FileListDataset(lists)
    assert [dataset.path(i) for i in range(len(dataset))] == [str(image_tree / "lymphocyte" / "l1.png")]
    assert "skipping 2 hidden .txt file(s) (._pbc.txt, .old.txt)" in caplog.text


def test_image_names_that_are_not_utf8(tmp_path: Path, load_script: Callable[[str], ModuleType]) -> None:
    """A Windows zip unpacked on Linux leaves names in a code page: they are listed, read and trained on."""
    source = tmp_path / "cells"
    odd = source / "blast" / os.fsdecode(b"Zelle_\xfc.png")
    try:
        _write_image(odd, 0)
    except (OSError, UnicodeError):
        pytest.skip("this file system allows only UTF-8 names")
    plain = _write_image(source / "blast" / "plain.png", 1)
    expected = sorted([str(odd), str(plain)])
    folder = FileListDataset(source, transform=tvf.pil_to_tensor)
    assert sorted(folder.path(i) for i in range(2)) == expected
    assert all(folder[i] is not None for i in range(2))

    script = load_script("make_file_lists")
    for relative in (False, True):
        out = tmp_path / f"lists_{relative}"
        script.make_file_lists([source], out, relative=relative, verify=True)
        dataset = FileListDataset(out, transform=tvf.pil_to_tensor)
        assert sorted(os.path.normpath(dataset.path(i)) for i in range(len(dataset))) == expected
        assert all(dataset[i] is not None for i in range(2))


def test_relative_lists_read_back_as_written(tmp_path: Path, load_script: Callable[[str], ModuleType]) -> None:
    """Names that start with ``#``, ``~`` or a space, listed relative to the source folder itself."""
    source = tmp_path / "cells"
    images = [_write_image(source / "#batch2" / "a.png", 0), _write_image(source / " b.png", 1),
              _write_image(source / "~" / "c.png", 2), _write_image(source / "d.png", 3)]
    load_script("make_file_lists").make_file_lists([source], source, relative=True)
    dataset = FileListDataset(source / "cells.txt", transform=tvf.pil_to_tensor)
    assert sorted(os.path.normpath(dataset.path(i)) for i in range(len(dataset))) == sorted(map(str, images))
    assert all(dataset[i] is not None for i in range(len(dataset)))


def test_symlink_loops_list_each_image_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            load_script: Callable[[str], ModuleType]) -> None:
    root = tmp_path / "cyc"
    image = _write_image(root / "a" / "x.jpg", 0)
    (root / "a" / "loop").symlink_to("..", target_is_directory=True)
    _write_image(root / "a" / ".thumbs" / "t.jpg", 1)  # hidden folders and files are not data
    _write_image(root / "a" / ".y.jpg", 2)
    (root / "a" / "._x.jpg").write_bytes(b"macOS resource fork")
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        assert find_images(root) == [str(image)]
    assert f"skipping {root / 'a' / 'loop'}" in caplog.text
    assert len(FileListDataset(root)) == 1
    counts = load_script("make_file_lists").make_file_lists([root], tmp_path / "lists")
    assert list(counts.values()) == [1]
    # A list left from an earlier run stays in the folder, and training would read it: the script says so.
    (tmp_path / "lists" / "ig.txt").write_text("/data/ig/1.jpg\n")
    with caplog.at_level(logging.WARNING):
        load_script("make_file_lists").make_file_lists([root], tmp_path / "lists")
    assert "also holds 1 list(s) this run did not write (ig.txt); train.dataset_path=" in caplog.text


def test_links_that_lead_nowhere_are_skipped_and_folders_are_walked_before_links_to_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A link to itself (a file name or a folder name) is named and skipped, not a crash; a link to a folder of the
    tree, whose name sorts first, does not take that folder's place (the paths keep the folder's name, the label the
    evaluation reads from it)."""
    root = tmp_path / "cells"
    image = _write_image(root / "lymphocyte" / "x.jpg", 0)
    (root / "a_link").symlink_to("lymphocyte", target_is_directory=True)
    (root / "self.jpg").symlink_to("self.jpg")
    (root / "loop").symlink_to("loop")
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        assert find_images(root) == [str(image)]
    for name in ("self.jpg", "loop"):
        assert f"skipping {root / name}: Too many levels of symbolic links" in caplog.text
    assert f"skipping {root / 'a_link'}: it is {root / 'lymphocyte'}, already listed" in caplog.text


def test_file_lists_leave_out_names_with_line_breaks_and_name_every_stale_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, load_script: Callable[[str], ModuleType]
) -> None:
    """A name holding a line break would split into two lines, which training refuses: it is left out and named. A
    stale list is named whatever the case of its suffix, since training reads .TXT lists too."""
    source = tmp_path / "cells"
    kept = _write_image(source / "ok.jpg", 0)
    broken = _write_image(source / "car\rret.jpg", 1)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "OLD.TXT").write_text("/data/old/1.jpg\n")
    with caplog.at_level(logging.WARNING):
        counts = load_script("make_file_lists").make_file_lists([source], tmp_path / "lists")
    assert counts == {tmp_path / "lists" / "cells.txt": 1}
    assert (tmp_path / "lists" / "cells.txt").read_text() == f"{kept}\n"
    assert f"leaving out {str(broken)!r}: a name with a line break" in caplog.text
    assert "also holds 1 list(s) this run did not write (OLD.TXT)" in caplog.text


def _sixteen_bit_reference(values: np.ndarray) -> np.ndarray:
    """value * 255 / 65535 rounded to the nearest integer (no ties: 65535 / 255 is odd), after clipping."""
    return ((np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "dtype", "suffix"),
    [("I;16", "<u2", ".png"), ("I;16", "<u2", ".tif"), ("I;16B", ">u2", ".tif"), ("I", "<i4", ".tif")],
)
def test_sixteen_bit_grayscale_is_scaled(tmp_path: Path, mode: str, dtype: str, suffix: str) -> None:
    """Microscopy saves 16-bit grayscale; converting it to RGB directly would clip everything above 255."""
    values = np.random.default_rng(0).integers(0, 65536, (6, 7)).astype(dtype)
    values[0, :4] = [0, 128, 129, 65535]  # 128 / 257 rounds down, 129 / 257 up
    if mode == "I":
        values[1, :2] = [-5, 70000]  # clipped
    path = tmp_path / f"cell{suffix}"
    Image.frombytes(mode, (7, 6), values.tobytes()).save(path)
    assert Image.open(path).mode == mode
    loaded = np.asarray(T.load_image(path))
    assert loaded.shape == (6, 7, 3) and loaded.dtype == np.uint8
    expected = _sixteen_bit_reference(values)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], expected)


@pytest.mark.parametrize(("mode", "suffix"), [("RGB", ".png"), ("RGB", ".jpg"), ("L", ".png"), ("LA", ".png"),
                                              ("RGBA", ".png"), ("P", ".png"), ("1", ".png"), ("CMYK", ".jpg")])
def test_eight_bit_images_load_as_pil_converts_them(tmp_path: Path, mode: str, suffix: str) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    path = tmp_path / f"cell{suffix}"
    Image.fromarray(pixels).convert(mode).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
        reference = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(T.load_image(path)), reference)


def test_float_images_are_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     load_script: Callable[[str], ModuleType]) -> None:
    float_image = tmp_path / "cells" / "float.tif"
    float_image.parent.mkdir()
    Image.fromarray(np.full((5, 5), 0.5, dtype=np.float32)).save(float_image)
    good = _write_image(tmp_path / "cells" / "good.png", 0)
    with pytest.raises(ValueError, match=r"float\.tif: .*mode F"):
        T.load_image(float_image)
    dataset = FileListDataset(tmp_path / "cells")
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        assert dataset[0] is None and dataset[1] is not None
    assert f"skipping unreadable image {float_image}" in caplog.text
    load_script("make_file_lists").make_file_lists([tmp_path / "cells"], tmp_path / "lists", verify=True)
    assert (tmp_path / "lists" / "cells.txt").read_text().splitlines() == [str(good)]


# --------------------------------------------------------------------------- unreadable images


def test_unreadable_images_are_logged_once_counted_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _write_image(tmp_path / "good.jpg", 0, size=(64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    missing = tmp_path / "missing.jpg"
    list_file = tmp_path / "cells.txt"
    list_file.write_text(f"{good}\n{truncated}\n{garbage}\n{missing}\n")
    dataset = FileListDataset(list_file, transform=tvf.pil_to_tensor)
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        batch = [dataset[i] for i in range(4)] + [dataset[SampleKey(1, 5)]]
    assert batch[0] is not None and all(item is None for item in batch[1:])
    messages = [r.getMessage() for r in caplog.records]
    for bad in (truncated, garbage, missing):
        assert sum(str(bad) in m for m in messages) == 1  # logged once, even when drawn twice


def test_index_protocol_errors(image_tree: Path) -> None:
    dataset = FileListDataset(image_tree)
    with pytest.raises(IndexError, match="out of range"):
        dataset[6]
    with pytest.raises(TypeError, match=r"\(index, epoch\)"):
        dataset[(1, 2, 3)]


# --------------------------------------------------------------------------- transforms and augmentations


@pytest.mark.parametrize("seed", [0, 1])
def test_colour_primitives_match_torchvision(seed: int) -> None:
    x = torch.rand(3, 37, 41, generator=torch.Generator().manual_seed(seed))
    x[:, :4, :4] = 0.5  # grey pixels: hue undefined
    for shift in (-0.1, 0.03, 0.5):
        torch.testing.assert_close(T.adjust_hue(x.clone(), shift), tvf.adjust_hue(x, shift), atol=2e-6, rtol=0)
    torch.testing.assert_close(T.adjust_saturation(x.clone(), 1.2), tvf.adjust_saturation(x, 1.2), atol=1e-6, rtol=0)
    torch.testing.assert_close(T.adjust_contrast(x.clone(), 0.7), tvf.adjust_contrast(x, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(T.adjust_brightness(x.clone(), 1.3), tvf.adjust_brightness(x, 1.3), atol=0, rtol=0)
    for sigma in (0.1, 1.0, 2.0):
        torch.testing.assert_close(T.gaussian_blur(x, sigma, 9), tvf.gaussian_blur(x, [9, 9], [sigma, sigma]),
                                   atol=2e-6, rtol=0)
    torch.testing.assert_close(T.rgb_to_grayscale(x), tvf.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_eval_transform_is_dinobloom_recipe(image_tree: Path) -> None:
    image = Image.open(image_tree / "neutrophil" / "n0.jpg").convert("RGB")
    reference = tv1.Compose([tv1.Resize((224, 224)), tv1.ToTensor(),
                             tv1.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    torch.testing.assert_close(make_eval_transform(224)(image), reference(image), atol=1e-6, rtol=0)
    # A notebook's RGBA or grayscale PIL image gives the features of its RGB version, as the CLIs' load_image does.
    for mode in ("RGBA", "L"):
        other = image.convert(mode)
        torch.testing.assert_close(make_eval_transform(224)(other), reference(other.convert("RGB")), atol=1e-6, rtol=0)
    # DinoBloom's cross-validation probes: PIL's resize (default filter) to 224, then the same ToTensor and norm
    probe = tv1.Compose([tv1.ToTensor(), tv1.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    pil_resized = probe(image.resize((224, 224)))
    assert image.size != (224, 224)
    torch.testing.assert_close(make_eval_transform(224, "pil-bicubic")(image), pil_resized, atol=1e-6, rtol=0)
    as_tensor = tvf.pil_to_tensor(image)
    torch.testing.assert_close(make_eval_transform(224, "pil-bicubic")(as_tensor), pil_resized, atol=1e-6, rtol=0)
    assert (make_eval_transform(224)(image) - pil_resized).abs().mean() > 1e-3  # the two resizes differ
    with pytest.raises(ValueError, match="resize must be one of bilinear, pil-bicubic"):
        make_eval_transform(224, "nearest")
    # what a notebook passes by mistake is named, with the remedy, before the resize can blur the evidence
    array = np.array(image)  # (a writable copy, which torch.from_numpy wants)
    for wrong, error, message in (
        (array, TypeError, r"got a ndarray \(Image.fromarray\(array\) makes a PIL image of it\)"),
        (torch.from_numpy(array), ValueError,
         rf"got shape \({array.shape[0]}, {array.shape[1]}, 3\); channels last: image.permute\(2, 0, 1\)"),
        (as_tensor.float(), TypeError, "expected a uint8 image tensor, got torch.float32"),
    ):
        with pytest.raises(error, match=message):
            make_eval_transform(224)(wrong)
    # a batch of uint8 images is still fine: each is resized as it would be alone
    batch = torch.stack([as_tensor, as_tensor.flip(-1)])
    for resize in ("bilinear", "pil-bicubic"):
        transformed = make_eval_transform(224, resize)(batch)
        assert transformed.shape == (2, 3, 224, 224)
        torch.testing.assert_close(transformed[1], make_eval_transform(224, resize)(as_tensor.flip(-1)))


@pytest.mark.parametrize(
    ("hematology", "local", "local_size"), [(True, 0, 98), (False, 8, 96), (True, 1, 98)]
)
def test_crop_shapes(hematology: bool, local: int, local_size: int) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 254, 3), dtype=np.uint8))
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), local, 224, local_size, hematology=hematology)
    out = augmentation(image)
    assert set(out) == {"global_crops", "global_crops_params", "local_crops", "local_crops_params"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, local_size, local_size)] * local
    assert [tuple(p.shape) for p in out["global_crops_params"] + out["local_crops_params"]] == [(12,)] * (2 + local)
    for crop, params in zip(out["global_crops"] + out["local_crops"], out["global_crops_params"] + out["local_crops_params"]):
        assert crop.dtype == torch.uint8
        view = _finish(crop, params)
        assert view.dtype == torch.float32 and torch.isfinite(view).all()
        # ImageNet normalisation maps [0, 1] into [-2.12, 2.64]
        assert view.min() >= -2.2 and view.max() <= 2.7


@pytest.mark.parametrize(
    ("hematology", "blur", "expected"),
    [
        # as trained: DINOv2's GaussianBlur(p) blurred with probability 1 - p (DinoBloom kept DINOv2's p)
        (True, None, (0.0, 0.9, 0.5)),
        (False, None, (0.0, 0.9, 0.5)),
        (False, (1.0, 0.1, 0.5), (1.0, 0.1, 0.5)),
    ],
)
def test_blur_rate_of_each_view(hematology: bool, blur: tuple | None, expected: tuple) -> None:
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 16, 8, hematology=hematology,
                                        blur_probabilities=blur)  # fmt: skip
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    draws = 400
    for view, rate in zip((augmentation.global_view1, augmentation.global_view2, augmentation.local_view), expected):
        with seeded_rng(0):
            sigmas = torch.stack([view(image, augmentation.jitter)[1][P.BLUR_SIGMA] for _ in range(draws)])
        blurred = int((sigmas > 0).sum())
        assert ((sigmas == 0) | ((sigmas >= 0.1) & (sigmas <= 2.0))).all()  # torchvision's sigma range
        if rate in (0.0, 1.0):
            assert blurred == rate * draws
        else:  # 0.06 is 2.4 standard deviations at p = 0.5 (the seed is fixed, so no flakes)
            assert abs(blurred / draws - rate) <= 0.06


@pytest.mark.parametrize("hematology", [True, False])
def test_colour_strengths_are_the_recipes(hematology: bool) -> None:
    """DINOv2's colour settings, which DinoBloom's final code kept, seen in the drawn parameters: ColorJitter(0.4,
    0.4, 0.2, 0.1) applied with p 0.8, its factors spanning those ranges, blur sigma in (0.1, 2), grayscale 0.2 on
    every view, solarisation 0.2 on the second global view only."""
    augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 16, 8, hematology=hematology)
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    draws = 600
    views = (augmentation.global_view1, augmentation.global_view2, augmentation.local_view)
    for index, view in enumerate(views):
        with seeded_rng(index):
            params = torch.stack([view(image, augmentation.jitter)[1] for _ in range(draws)])
        jittered = params[params[:, P.JITTER] > 0]
        assert abs(len(jittered) / draws - 0.8) <= 0.05  # 3 standard deviations at p = 0.8
        factors = jittered[:, P.FACTORS : P.FACTORS + 4]
        for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            values = factors[:, column]
            assert values.min() >= low and values.max() <= high
            assert values.min() < low + 0.03 * (high - low) and values.max() > high - 0.03 * (high - low)
        assert sorted(jittered[0, P.ORDER : P.ORDER + 4].tolist()) == [0, 1, 2, 3]
        orders = {tuple(row.tolist()) for row in jittered[:, P.ORDER : P.ORDER + 4]}
        assert len(orders) > 20  # of the 24 possible orders
        sigmas = params[params[:, P.BLUR_SIGMA] > 0, P.BLUR_SIGMA]
        if sigmas.numel():  # (DINOv2 never blurs its first global view; the rates have their own test)
            assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and sigmas.min() < 0.2 and sigmas.max() > 1.9
        grayscale = float((params[:, P.GRAYSCALE] > 0).float().mean())
        assert abs(grayscale - 0.2) <= 0.05
        solarised = float((params[:, P.SOLARIZE] > 0).float().mean())
        assert solarised == 0.0 if view is not augmentation.global_view2 else abs(solarised - 0.2) <= 0.05


def test_augmentation_argument_errors() -> None:
    with pytest.raises(ValueError, match="global_crops_scale"):
        DataAugmentationDINO((0.0, 1.0), (0.05, 0.32), 0)
    with pytest.raises(ValueError, match="local_crops_number"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), -1)
    with pytest.raises(ValueError, match="blur_probabilities must be 3 probabilities"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 0, blur_probabilities=(0.5, 1.5, 0.5))


def _finish(crop: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One view's colour operations and normalisation (a batch of one)."""
    return P.apply_photometric(crop[None], params[None])[0]


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(T.IMAGENET_STD).view(3, 1, 1) + torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)


def test_recipes_differ_in_geometry_only() -> None:
    """Hematology: all 8 square symmetries; DINOv2: horizontal flips only; both turn some views grayscale."""
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:32, :32] = 255  # a white top-left quadrant on black
    image = Image.fromarray(pixels)
    for hematology, expected_corners in ((True, {0, 1, 2, 3}), (False, {0, 1})):
        augmentation = DataAugmentationDINO((1.0, 1.0), (0.5, 0.5), 0, 32, 16, hematology=hematology)
        corners, gray = set(), 0
        red = tvf.pil_to_tensor(Image.new("RGB", (8, 8), (200, 40, 40)))
        for seed in range(60):
            with seeded_rng(seed):
                views = augmentation(image)
                crop = _denormalise(_finish(views["global_crops"][0], views["global_crops_params"][0]))
                # a colourful image stays colourful unless the view was turned to grayscale
                channels = _denormalise(_finish(*augmentation.global_view1(red, augmentation.jitter)))
            quadrants = [crop[:, :16, :16], crop[:, :16, 16:], crop[:, 16:, :16], crop[:, 16:, 16:]]
            corners.add(int(torch.stack([q.mean() for q in quadrants]).argmax()))
            gray += int(torch.allclose(channels[0], channels[1], atol=1e-5))
        assert corners == expected_corners
        assert 0 < gray < 30  # about 0.2 of 60


# --------------------------------------------------------------------------- determinism


def test_seeded_rng_restores_global_state() -> None:
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    with seeded_rng(7):
        inside = (torch.rand(3), random.random(), np.random.rand())
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert not torch.equal(inside[0], expected[0])


def test_derive_seed() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, 1, 2), derive_seed(0, 2, 1), derive_seed(1, 1, 2), derive_seed(0, 1)}) == 4
    assert 0 <= derive_seed(5, 6, 7) < 2**63
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)


def test_augmentation_is_a_function_of_seed_index_epoch(image_tree: Path) -> None:
    first = FileListDataset(image_tree, transform=_small_augmentation(), seed=11)
    second = FileListDataset(image_tree, transform=_small_augmentation(), seed=11)

    def crops(dataset: FileListDataset, key: SampleKey) -> list[torch.Tensor]:
        out, _ = dataset[key]
        return out["global_crops"] + out["local_crops"]

    torch.manual_seed(0)
    a = crops(first, SampleKey(2, 3))
    torch.manual_seed(999)  # ambient state must not matter
    b = crops(second, SampleKey(2, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], crops(first, SampleKey(2, 4))[0])  # another epoch
    other_seed = FileListDataset(image_tree, transform=_small_augmentation(), seed=12)
    assert not torch.equal(a[0], crops(other_seed, SampleKey(2, 3))[0])


def _loader_batches(dataset: FileListDataset, workers: int, start: int, steps: int) -> list[torch.Tensor]:
    sampler = InfiniteSampler(len(dataset), seed=4, start=start, batch_size=2)

    def collate(samples: list) -> torch.Tensor:
        return torch.stack([torch.cat([c.flatten() for c in s["global_crops"] + s["local_crops"]]) for s, _ in samples])

    loader = make_data_loader(dataset, 2, workers, sampler, collate_fn=collate, seed=0)
    return list(itertools.islice(iter(loader), steps))


def test_loader_is_bitwise_identical_across_worker_counts_and_resume(image_tree: Path) -> None:
    dataset = FileListDataset(image_tree, transform=_small_augmentation(), seed=3)
    in_process = _loader_batches(dataset, workers=0, start=0, steps=5)  # 10 draws: crosses an epoch boundary
    with_workers = _loader_batches(dataset, workers=2, start=0, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    resumed = _loader_batches(dataset, workers=2, start=3 * 2, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(in_process[3:], resumed, strict=True))


# --------------------------------------------------------------------------- sampler


def _take(sampler: InfiniteSampler, count: int) -> list[SampleKey]:
    return list(itertools.islice(iter(sampler), count))


def test_sampler_epochs_are_permutations() -> None:
    keys = _take(InfiniteSampler(7, seed=1), 21)
    for epoch in range(3):
        block = keys[7 * epoch : 7 * (epoch + 1)]
        assert sorted(k.index for k in block) == list(range(7))
        assert {k.epoch for k in block} == {epoch}
    orders = [[k.index for k in keys[7 * e : 7 * (e + 1)]] for e in range(3)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch
    assert [k.index for k in _take(InfiniteSampler(7, shuffle=False), 9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert _take(InfiniteSampler(7, seed=1), 7) != _take(InfiniteSampler(7, seed=2), 7)


def test_two_ranks_equal_one_rank_with_double_batch() -> None:
    batch, steps = 3, 6
    single = _take(InfiniteSampler(10, seed=5, batch_size=2 * batch), 2 * batch * steps)
    ranks = [_take(InfiniteSampler(10, seed=5, rank=r, world_size=2, batch_size=batch), batch * steps) for r in (0, 1)]
    for step in range(steps):
        one_rank_batch = single[2 * batch * step : 2 * batch * (step + 1)]
        per_rank = [ranks[r][batch * step : batch * (step + 1)] for r in (0, 1)]
        assert one_rank_batch == per_rank[0] + per_rank[1]


def test_batch_size_one_is_strided_sharding() -> None:
    everything = _take(InfiniteSampler(9, seed=2), 12)
    for rank in range(3):
        assert _take(InfiniteSampler(9, seed=2, rank=rank, world_size=3), 4) == everything[rank::3]


def test_sampler_resumes_from_a_global_draw() -> None:
    full = _take(InfiniteSampler(10, seed=8, rank=1, world_size=2, batch_size=2), 20)
    # after 4 steps of 2 ranks x 2 images, global draw 16: rank 1 continues its own stream
    resumed = InfiniteSampler(10, seed=8, start=16, rank=1, world_size=2, batch_size=2)
    assert _take(resumed, 12) == full[8:]
    # same global batch on one rank: continues the same global stream
    one_rank = InfiniteSampler(10, seed=8, start=16, batch_size=4)
    assert _take(one_rank, 4)[2:] == full[8:10]
    # a start inside a global step (a run resumed with another batch size): the stream from that draw on
    rank_0 = _take(InfiniteSampler(10, seed=8, start=6, world_size=2, batch_size=2), 4)
    rank_1 = _take(InfiniteSampler(10, seed=8, start=6, rank=1, world_size=2, batch_size=2), 4)
    stream = _take(InfiniteSampler(10, seed=8), 14)
    assert rank_0 + rank_1 == stream[6:8] + stream[10:12] + stream[8:10] + stream[12:14]
    with pytest.raises(ValueError, match="start must be non-negative"):
        InfiniteSampler(10, start=-4, world_size=2, batch_size=2)
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, rank=2, world_size=2)


# --------------------------------------------------------------------------- loaders


def test_make_data_loader_defaults(image_tree: Path) -> None:
    dataset = FileListDataset(image_tree, transform=lambda image: tvf.pil_to_tensor(image.resize((8, 8))))
    loader = make_data_loader(dataset, batch_size=4, num_workers=0, drop_last=False)
    assert not loader.persistent_workers
    assert not loader.pin_memory  # (the trainer pins for a CUDA run only)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    with pytest.raises(ValueError, match="batch_size"):
        make_data_loader(dataset, batch_size=0, num_workers=0)


# --------------------------------------------------------------------------- scripts


def test_make_file_lists_script(
    tmp_path: Path, image_tree: Path, capsys: pytest.CaptureFixture, load_script: Callable[[str], ModuleType]
) -> None:
    script = load_script("make_file_lists")
    other = tmp_path / "other_source"
    _write_image(other / "x" / "a.png", 1)
    (other / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "lists"
    assert script.main([str(image_tree), str(other), "--output", str(out), "--relative", "--verify"]) == 0
    assert "wrote 2 list(s) with 7 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["other_source.txt", "tree.txt"]
    lines = (out / "tree.txt").read_text().splitlines()
    assert len(lines) == 6 and all(line.startswith("../tree/") for line in lines)
    dataset = FileListDataset(out)
    assert len(dataset) == 7 and dataset[6] is not None
    with pytest.raises(ValueError, match="would both write tree.txt"):
        script.main([str(image_tree), str(image_tree), "--output", str(out)])
    (tmp_path / "a_file").touch()  # an --output that cannot be a folder: said before any source is searched
    with pytest.raises(ValueError, match=f"--output {tmp_path / 'a_file'}: it is a file, not a folder$"):
        script.main([str(image_tree), "--output", str(tmp_path / "a_file")])
    # a source without images is an error that writes no list, not half a set of lists
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images .* found under .*empty"):
        script.main([str(image_tree), str(tmp_path / "empty"), "--output", str(tmp_path / "half")])
    assert not (tmp_path / "half").exists()
    # a hidden source folder gets a list that training reads (it skips hidden lists)
    hidden = tmp_path / ".pbc"
    _write_image(hidden / "a.png", 2)
    script.main([str(hidden), "--output", str(tmp_path / "hidden_lists")])
    assert len(FileListDataset(tmp_path / "hidden_lists" / "pbc.txt")) == 1


@pytest.mark.parametrize("colour", ["device", "workers", None])
def test_benchmark_script_smoke(
    image_tree: Path,
    capsys: pytest.CaptureFixture,
    load_script: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    colour: str | None,
) -> None:
    """The benchmark times the trainer's own loader, built from DinoBloom's training config; by default (here on a
    CPU, device auto) as a CPU training run has it: colour in the workers, crops collated as float32."""
    script = load_script("benchmark_data")
    built = []

    def recording_loader(cfg, dataset, **kwargs):
        built.append((cfg.train.augmentation, cfg.train.image_resize, kwargs["defer_colour"], kwargs["pin_memory"]))
        return build_train_loader(cfg, dataset, **kwargs)

    monkeypatch.setattr(script, "build_train_loader", recording_loader)
    args = ["--data", str(image_tree), "--resize", "64", "--recipes", "dinobloom", "--workers", "0",
            "--batch-size", "2", "--batches", "1", "--per-worker-images", "2", "--repeats", "2"]  # fmt: skip
    if colour is not None:
        args += ["--colour", colour, "--device", "cpu"]
    elif torch.cuda.is_available():
        pytest.skip("the defaults follow the device, and auto picks CUDA here")
    assert script.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    if colour is None:
        assert "crops as fp32, colour in the workers" in lines[0]
    assert any("dinobloom" in line and "loader" in line for line in lines)
    assert any("dinobloom" in line and "colour on cpu" in line for line in lines) == (colour == "device")
    # the colour operations run in the collate when they run in the workers, and its row says so
    assert any("collate+colour" in line for line in lines) == (colour != "device")
    assert lines[-1].startswith("images_per_s=") and float(lines[-1].split("=")[1]) > 0
    assert built == [("hematology", 64, colour == "device", False)]  # (pinned for a CUDA device only)


@pytest.mark.parametrize("bad", [["--per-worker-images", "0"], ["--repeats", "0"], ["--batches", "0"],
                                 ["--workers", "-1"]])  # fmt: skip
def test_benchmark_script_refuses_bad_counts_before_any_work(
    image_tree: Path, capsys: pytest.CaptureFixture, load_script: Callable[[str], ModuleType], bad: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_script("benchmark_data").main(["--data", str(image_tree), *bad])
    assert exited.value.code == 2 and bad[0] in capsys.readouterr().err


# --------------------------------------------------------------------------- real images


def test_real_blood_cells_smoke(shared_data_dir: Path) -> None:
    dev = shared_data_dir / "dev"
    dataset = FileListDataset(dev, transform=DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1, 224, 98), resize=224)
    assert len(dataset) == sum(1 for p in dev.rglob("*.jpg"))
    for key in (SampleKey(0, 0), SampleKey(len(dataset) - 1, 2)):
        crops, _ = dataset[key]
        assert [tuple(c.shape) for c in crops["global_crops"]] == [(3, 224, 224)] * 2
        assert tuple(crops["local_crops"][0].shape) == (3, 98, 98)
    evaluation = FileListDataset(dev, transform=make_eval_transform(224))
    tensor, _ = evaluation[5]
    assert tensor.shape == (3, 224, 224)


def test_image_folder_surprises_are_explained(image_tree: Path) -> None:
    """A loose image next to the sub-folders is read with them; a stray .txt file in an image folder is an error."""
    _write_image(image_tree / "loose.png", 99)
    assert len(FileListDataset(image_tree)) == 7
    (image_tree / "notes.txt").write_text("stained on Monday\n")
    with pytest.raises(ValueError, match=r"(?s)is not an image path.*read as a folder of file lists"):
        FileListDataset(image_tree)


def test_a_list_beside_more_images_than_it_names_is_said(image_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder of images with one valid .txt list trains on that list only (it is a folder of lists): the log says
    that more images lie there. Lists that name every image beside them, or live apart from them, say nothing."""
    (image_tree / "val.txt").write_text("lymphocyte/l0.png\n")
    (image_tree / "train.txt").write_text("lymphocyte/l0.png\n" * 6)  # as many entries as images, all one image
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert len(FileListDataset(image_tree)) == 7
    assert caplog.messages[-1] == (
        f"{image_tree} holds .txt file lists, so it is read as a folder of lists, which name 1 image(s); more images "
        "lie under it, and only listed ones are used (for a folder of images, move its .txt files elsewhere)"
    )
    caplog.clear()
    (image_tree / "train.txt").unlink()
    every = sorted(p.relative_to(image_tree).as_posix() for p in image_tree.rglob("*") if p.suffix in (".png", ".jpg"))
    (image_tree / "val.txt").write_text("\n".join(every) + "\n")
    lists = image_tree.parent / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(f"{image_tree / 'lymphocyte' / 'l0.png'}\n")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert len(FileListDataset(image_tree)) == 6 and len(FileListDataset(lists)) == 1
    assert caplog.records == []


# --------------------------------------------------------------------------- augmentation geometry


def _torchvision_view(size: int, scale: tuple[float, float], hematology: bool) -> tv2.Compose:
    """A view's geometry written with torchvision: ``RandomResizedCrop`` (bicubic, antialiased, ratio 3/4..4/3),
    horizontal flip p=0.5 and, for the hematology recipe, vertical flip p=0.5 and a 90 degree turn p=0.5."""
    steps: list[Callable] = [
        tv2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=tv2.InterpolationMode.BICUBIC,
                              antialias=True),
        tv2.RandomHorizontalFlip(0.5),
    ]
    if hematology:  # (a counter-clockwise quarter turn: tvf.rotate's positive angle, exact on a square)
        steps += [tv2.RandomVerticalFlip(0.5), tv2.RandomApply([tv2.Lambda(lambda x: tvf.rotate(x, 90.0))], p=0.5)]
    return tv2.Compose(steps)


def _assert_views_crop_as_torchvision(augmentation: DataAugmentationDINO, scales: dict[str, tuple[float, float]],
                                      sizes: dict[str, int], seeds: int = 24) -> None:
    """Each view's crop, seed for seed, equals torchvision's transforms drawing from the same generator state, for an
    image laid out (3, H, W) and one laid out (H, W, 3) in memory, as ``pil_to_tensor`` hands a decoded image over."""
    pixels = np.random.default_rng(5).integers(0, 256, (50, 62, 3), dtype=np.uint8)
    images = {"(3, H, W)": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
              "pil_to_tensor": tvf.pil_to_tensor(Image.fromarray(pixels))}  # fmt: skip
    assert torch.equal(*images.values()) and images["pil_to_tensor"].stride() == (1, 62 * 3, 3)
    for layout, image in images.items():
        for name in ("global_view1", "global_view2", "local_view"):
            kind = "local" if name == "local_view" else "global"
            reference = _torchvision_view(sizes[kind], scales[kind], augmentation.hematology)
            view = getattr(augmentation, name)
            for seed in range(seeds):
                with seeded_rng(seed):
                    crop, _ = view(image, augmentation.jitter)
                with seeded_rng(seed):
                    expected = reference(image)
                same = torch.equal(crop, expected)
                assert same, f"{name}, {layout}, seed {seed}: crop differs from torchvision's"


@pytest.mark.parametrize("hematology", [True, False])
def test_crop_views_are_torchvisions_random_resized_crop_and_flips(hematology: bool) -> None:
    """Each view crops as torchvision's RandomResizedCrop with the configured scale (bicubic, antialiased), then
    flips: DINOv2's horizontal flip, or DinoBloom's 8 square symmetries (flips and a quarter turn)."""
    scales = {"global": (0.32, 1.0), "local": (0.05, 0.32)}
    sizes = {"global": 32, "local": 16}
    augmentation = DataAugmentationDINO(scales["global"], scales["local"], 2, sizes["global"], sizes["local"],
                                        hematology=hematology)
    _assert_views_crop_as_torchvision(augmentation, scales, sizes)


def test_build_train_dataset_wires_the_configured_crop_scales(image_tree: Path) -> None:
    """``crops.global_crops_scale`` sets the global views' crop areas and ``crops.local_crops_scale`` the local ones'
    (distinct values here, so that a swap shows), in the recorded scales and in the crops drawn."""
    cfg = load_config(None, [f"train.dataset_path={image_tree}", "train.augmentation=hematology",
                             "crops.global_crops_scale=[0.6,0.9]", "crops.local_crops_scale=[0.1,0.2]",
                             "crops.local_crops_number=2", "crops.global_crops_size=32", "crops.local_crops_size=16"])
    dataset = build_train_dataset(cfg)
    augmentation = dataset.transform
    assert isinstance(augmentation, DataAugmentationDINO) and augmentation.hematology
    global_scale, local_scale = tuple(cfg.crops.global_crops_scale), tuple(cfg.crops.local_crops_scale)
    assert augmentation.global_view1.scale == augmentation.global_view2.scale == global_scale == (0.6, 0.9)
    assert augmentation.local_view.scale == local_scale == (0.1, 0.2)
    out, _ = dataset[SampleKey(0, 0)]
    assert [tuple(c.shape) for c in out["global_crops"] + out["local_crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    _assert_views_crop_as_torchvision(augmentation, {"global": global_scale, "local": local_scale},
                                      {"global": 32, "local": 16})
