"""Write DinoBloom training file lists: one ``<name>.txt`` per source image folder, one image path per line.

    python scripts/make_file_lists.py /data/pbc /data/bone_marrow --output lists/ [--relative] [--verify]

The output folder is what ``train.dataset_path`` points at (every ``.txt`` in it is read). Paths are
absolute unless ``--relative``, which writes them relative to the output folder so the whole tree can be
moved. ``--verify`` opens every image and leaves out (and reports) the ones that cannot be decoded. Lists are
UTF-8; an image name that is not UTF-8 is written as its raw bytes, which the dataset reads back.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Lets the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data.datasets import IMAGE_EXTENSIONS, find_images  # noqa: E402
from dinov2.data.transforms import IMAGE_LOAD_ERRORS, load_image  # noqa: E402
from dinov2.files import check_folder_writable  # noqa: E402
from dinov2.logs import setup_logging  # noqa: E402

logger = logging.getLogger("make_file_lists")


def _readable(path: str) -> bool:
    """Whether the image loads as training will load it."""
    try:
        load_image(path)
    except IMAGE_LOAD_ERRORS as error:
        logger.warning("leaving out unreadable image %s: %s", path, error)
        return False
    return True


def _listable(path: str) -> bool:
    """Whether ``path`` can be a line of a list: a name holding a line break cannot."""
    if "\n" in path or "\r" in path:
        logger.warning("leaving out %r: a name with a line break cannot be a line of a list; rename the file", path)
        return False
    return True


def _list_line(path: str) -> str:
    """``path`` as a list line that reads back as itself: ``./`` before a leading ``#``, ``~`` or space."""
    return f"./{path}" if path[0] in "#~" or path[0].isspace() else path


def make_file_lists(
    sources: list[Path], output: Path, relative: bool = False, verify: bool = False
) -> dict[Path, int]:
    """Write one list per source folder into ``output``; returns the number of images in each list."""
    check_folder_writable(output, f"--output {output}")  # before the sources are searched
    names: dict[str, Path] = {}
    for source in sources:
        if not source.is_dir():
            raise FileNotFoundError(f"source folder {source} does not exist or is not a folder")
        name = source.resolve().name.lstrip(".")  # training skips hidden lists (".pbc.txt")
        if not name:
            raise ValueError(f"source folder {source} has no name to give its list; pass its path by another name")
        if name in names:
            raise ValueError(f"sources {names[name]} and {source} would both write {name}.txt; rename one folder")
        names[name] = source
    base = output.resolve()
    lists: dict[Path, list[str]] = {}  # all found before any is written: a failing source leaves no half-set
    for name, source in names.items():
        images = [path for path in find_images(source.resolve()) if _listable(path)]
        if verify:
            with logging_redirect_tqdm():  # the warnings of unreadable images print above the bar, not glued to it
                images = [p for p in tqdm(images, desc=f"verify {name}", unit="img") if _readable(p)]
        if not images:
            raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
        lists[output / f"{name}.txt"] = [_list_line(os.path.relpath(p, base)) if relative else p for p in images]
    output.mkdir(parents=True, exist_ok=True)
    counts: dict[Path, int] = {}
    for list_file, lines in lists.items():
        list_file.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", errors="surrogateescape")
        counts[list_file] = len(lines)
        logger.info("%s: %d images", list_file, len(lines))
    others = sorted(  # (as training reads them: .TXT too, hidden ones not)
        p.name for p in output.iterdir()
        if p.suffix.lower() == ".txt" and not p.name.startswith(".") and p not in counts
    )
    if others:  # training reads every list of the folder: a stale one would add images no one asked for
        logger.warning(
            "%s also holds %d list(s) this run did not write (%s); train.dataset_path=%s reads them too: remove "
            "those that should not be trained on", output, len(others), ", ".join(others[:5]), output,
        )
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="image folders, searched recursively")
    parser.add_argument("--output", required=True, type=Path, help="folder to write the .txt lists into")
    parser.add_argument("--relative", action="store_true", help="write paths relative to --output")
    parser.add_argument("--verify", action="store_true", help="decode every image and leave out broken ones")
    args = parser.parse_args(argv)
    setup_logging()
    counts = make_file_lists(args.sources, args.output, relative=args.relative, verify=args.verify)
    print(f"wrote {len(counts)} list(s) with {sum(counts.values())} images to {args.output}")
    return 0


if __name__ == "__main__":
    from dinov2.cli import run_cli

    run_cli(main)
