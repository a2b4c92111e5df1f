"""The 11 few-shot image data sets of CoOp (Zhou et al., 2022), read from the user's own disk.

Why: CopRA's vision results reuse CLIP-LoRA's benchmark (Zanella & Ben Ayed, "Low-Rank Few-Shot
Adaptation of Vision-Language Models", CVPR 2024 workshops), which takes its data sets, folder layout
and fixed train/val/test splits from CoOp ("Learning to prompt for vision-language models", IJCV
2022; see CoOp's DATASETS.md). Using the very same `split_zhou_*.json` files keeps the test sets
identical to the published ones. Nothing is downloaded: `data_root` is CoOp's `$DATA` folder.

Prompts. CLIP-LoRA's released code classifies every data set with "a photo of a {}." (its data set
files keep CoOp's data-set-specific templates, e.g. "{} texture." for DTD, only inside comments), so
that is the default; `template_style="coop"` picks the data-set-specific templates instead. Class
names come from the split file, with underscores turned into spaces (as CLIP-LoRA does).

Layouts. Nine data sets have a split json. FGVC-Aircraft uses the data set's own
`images_variant_{train,val,test}.txt` + `variants.txt`; ImageNet uses `classnames.txt` plus class
folders `images/train/<wnid>/` and `images/val/<wnid>/` (the val set is the test set). Folder names
from CoOp's DATASETS.md are looked up first, then the names CLIP-LoRA's code uses (e.g. `DTD`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from copra.data.task import PromptTask
from copra.utils.errors import UserError

CLIP_LORA_TEMPLATE = "a photo of a {}."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGES_CHECKED_PER_SPLIT = 64  # evenly spaced existence checks per split (plus the first and last)


@dataclass(frozen=True)
class DatasetLayout:
    """Where one CoOp data set lives under `data_root`, and how it is prompted."""

    folders: tuple[str, ...]  #: folder names under data_root, CoOp's first (then CLIP-LoRA code's)
    image_dir: str  #: image folder inside it that split paths are relative to ("" = the folder itself)
    split_file: str | None  #: CoOp's split json (None: fgvc_aircraft / imagenet layouts)
    coop_template: str  #: CoOp's data-set-specific prompt (CLIP-LoRA keeps it commented out)
    template: str = CLIP_LORA_TEMPLATE  #: the prompt CLIP-LoRA actually uses
    kind: str = "split"  #: "split", "fgvc" or "imagenet"


COOP_DATASETS: dict[str, DatasetLayout] = {
    "imagenet": DatasetLayout(("imagenet",), "images", None, "a photo of a {}.", kind="imagenet"),
    "caltech101": DatasetLayout(
        ("caltech-101", "Caltech101"), "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."
    ),
    "oxford_pets": DatasetLayout(
        ("oxford_pets", "OxfordPets"), "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."
    ),
    "stanford_cars": DatasetLayout(
        ("stanford_cars", "StanfordCars"), "", "split_zhou_StanfordCars.json", "a photo of a {}."
    ),
    "oxford_flowers": DatasetLayout(
        ("oxford_flowers", "Flower102"), "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."
    ),
    "food101": DatasetLayout(
        ("food-101", "Food101"), "images", "split_zhou_Food101.json", "a photo of {}, a type of food."
    ),
    "fgvc_aircraft": DatasetLayout(
        ("fgvc_aircraft",), "images", None, "a photo of a {}, a type of aircraft.", kind="fgvc"
    ),
    "sun397": DatasetLayout(("sun397", "SUN397"), "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "dtd": DatasetLayout(("dtd", "DTD"), "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": DatasetLayout(("eurosat",), "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "ucf101": DatasetLayout(
        ("ucf101", "UCF101"), "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."
    ),
}
TEMPLATE_STYLES = ("clip-lora", "coop")


@dataclass(frozen=True)
class ImageTask(PromptTask):
    """One image classification task: class prompts and a fixed train/test split of image paths."""

    name: str
    class_names: tuple[str, ...]
    template: str
    train_images: tuple[str, ...] = field(repr=False)  #: absolute paths
    train_labels: tuple[int, ...] = field(repr=False)
    test_images: tuple[str, ...] = field(repr=False)
    test_labels: tuple[int, ...] = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        self.check(
            "images", {"train": (self.train_images, self.train_labels), "test": (self.test_images, self.test_labels)}
        )


def load_coop_task(data_root: str | os.PathLike | None, name: str, template_style: str = "clip-lora") -> ImageTask:
    """The CoOp data set `name` under `data_root` (CoOp's `$DATA`), checked for missing files."""
    if name not in COOP_DATASETS:
        raise UserError(f"unknown image data set {name!r}; choose one of {sorted(COOP_DATASETS)}")
    if template_style not in TEMPLATE_STYLES:
        raise UserError(f"template_style must be one of {list(TEMPLATE_STYLES)}, got {template_style!r}")
    if data_root is None:
        raise UserError(
            f"data set {name!r} needs data_root: the folder holding CoOp's data sets (see CoOp's DATASETS.md)"
        )
    root = Path(os.path.abspath(os.path.expanduser(str(data_root))))
    if not root.is_dir():
        raise UserError(f"data_root {str(data_root)!r} is not a folder")
    layout = COOP_DATASETS[name]
    folder = next((root / f for f in layout.folders if (root / f).is_dir()), None)
    if folder is None:
        raise UserError(f"data set {name!r} not found: expected the folder {root / layout.folders[0]}")
    image_dir = folder / layout.image_dir if layout.image_dir else folder
    if layout.kind == "fgvc":
        names, train, test, source = _read_fgvc(folder, image_dir)
    elif layout.kind == "imagenet":
        names, train, test, source = _read_imagenet(folder)
    else:
        names, train, test, source = _read_split(folder / layout.split_file, image_dir)
    for split, items in (("train", train), ("test", test)):
        _check_images([path for path, _ in items], split, source)
    template = layout.template if template_style == "clip-lora" else layout.coop_template
    return ImageTask(
        name=name,
        class_names=tuple(n.replace("_", " ") for n in names),
        template=template,
        train_images=tuple(p for p, _ in train),
        train_labels=tuple(y for _, y in train),
        test_images=tuple(p for p, _ in test),
        test_labels=tuple(y for _, y in test),
        source=source,
    )


Items = list[tuple[str, int]]


def _read_split(path: Path, image_dir: Path) -> tuple[list[str], Items, Items, str]:
    """CoOp's split json: {"train"|"val"|"test": [[relative_path, label, classname], ...]}."""
    if not path.is_file():
        raise UserError(f"split file not found: {path} (download it as CoOp's DATASETS.md describes)")
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UserError(f"split file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise UserError(f"split file {path} must be a JSON object with 'train' and 'test' lists")
    names: dict[int, str] = {}
    splits = []
    for split in ("train", "val", "test"):
        items: Items = []
        for i, entry in enumerate(data.get(split) or []):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or entry[1] < 0
                or not isinstance(entry[2], str)
            ):
                raise UserError(f"split file {path}: {split}[{i}] = {entry!r} is not [image_path, label, classname]")
            if names.setdefault(entry[1], entry[2]) != entry[2]:
                raise UserError(
                    f"split file {path}: label {entry[1]} is named both {names[entry[1]]!r} and {entry[2]!r}"
                )
            items.append((os.path.join(image_dir, entry[0]), entry[1]))
        splits.append(items)
    missing = [y for y in range(max(names, default=-1) + 1) if y not in names]
    if missing:
        raise UserError(f"split file {path}: no entry has label {missing[0]} (labels must be 0..C-1)")
    return [names[y] for y in range(len(names))], splits[0], splits[2], f"CoOp split {path}"


def _read_text(path: Path) -> str:
    """A user's data file as UTF-8 text; UserError naming the file and the first bad byte otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})") from None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"file not found: {path} (see CoOp's DATASETS.md for the expected layout)")
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_fgvc(folder: Path, image_dir: Path) -> tuple[list[str], Items, Items, str]:
    """FGVC-Aircraft as CoOp reads it: `variants.txt` (class names) + `images_variant_<split>.txt`."""
    names = _read_lines(folder / "variants.txt")
    label_of = {n: i for i, n in enumerate(names)}
    splits = []
    for split in ("train", "test"):
        path = folder / f"images_variant_{split}.txt"
        items: Items = []
        for number, line in enumerate(_read_lines(path), 1):
            image, _, variant = line.partition(" ")
            if variant not in label_of:
                raise UserError(f"{path}, line {number}: variant {variant!r} is not in {folder / 'variants.txt'}")
            items.append((os.path.join(image_dir, image + ".jpg"), label_of[variant]))
        splits.append(items)
    return names, splits[0], splits[1], f"FGVC-Aircraft variant lists in {folder}"


def _read_imagenet(folder: Path) -> tuple[list[str], Items, Items, str]:
    """ImageNet as CoOp reads it: `classnames.txt` ("<wnid> <name>") and class folders per split."""
    classnames = folder / "classnames.txt"
    wnids, names = [], []
    for number, line in enumerate(_read_lines(classnames), 1):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise UserError(f"{classnames}, line {number}: expected '<wnid> <class name>', got {line!r}")
        wnids.append(wnid)
        names.append(name.strip())
    base = folder / "images" if (folder / "images" / "train").is_dir() else folder
    splits = []
    for split in ("train", "val"):
        split_dir = base / split
        if not split_dir.is_dir():
            raise UserError(
                f"ImageNet folder not found: {folder / 'images' / split} "
                f"(expected images/train/<wnid>/*.JPEG and images/val/<wnid>/*.JPEG)"
            )
        items: Items = []
        for label, wnid in enumerate(wnids):
            class_dir = split_dir / wnid
            if not class_dir.is_dir():
                raise UserError(
                    f"ImageNet class folder not found: {class_dir} (the val set, too, must be "
                    f"sorted into one folder per wnid, as CoOp's DATASETS.md expects)"
                )
            files = sorted(
                e.name
                for e in os.scandir(class_dir)
                if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".")
            )
            items += [(os.path.join(class_dir, f), label) for f in files]
        splits.append(items)
    return names, splits[0], splits[1], f"ImageNet class folders in {base}"


def _check_images(paths: list[str], split: str, source: str) -> None:
    """Name the first missing image among the first, the last and evenly spaced ones (cheap on 100k)."""
    if not paths:
        return
    step = max(1, len(paths) // IMAGES_CHECKED_PER_SPLIT)
    for i in sorted({0, len(paths) - 1, *range(0, len(paths), step)}):
        if not os.path.isfile(paths[i]):
            raise UserError(f"image listed in the {split} split is missing: {paths[i]} ({source})")


def coop_names() -> list[str]:
    """The supported data set names."""
    return sorted(COOP_DATASETS)
