"""Evaluation sets in their standard layouts (CUB, wsolevaluation metadata, ImageNet, PASCAL VOC, image + mask folders).

Each adapter returns an `EvalSet`: the images (relative paths under one image root), their sizes, ground-truth boxes
in original pixels ([x1, y1, x2, y2], inclusive), class labels where the set has them, masks where it has them, and
the named splits it knows, so that a threshold can be calibrated on one split and reported on another.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS
from ..runtime.errors import C2AMError

DATASETS = ("cub", "wsol", "imagenet", "voc", "masks")
IGNORE = 255  # label of pixels that no metric counts (VOC object boundaries)
MIN_COMPONENT_SHARE = 0.01  # mask sets: a connected component is a ground-truth object if it covers >= 1% of the image

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass
class Item:
    """One evaluation image: `id` names it in split files and reports, `image` is its path under the image root."""

    id: str
    image: str
    size: tuple[int, int] | None = None  # (width, height) of the stored image; None: read from the mask or image
    boxes: list[list[int]] | None = None  # ground truth in original pixels; None: derived from the mask
    label: int | None = None  # class index, for Top-1 / Top-5 Loc
    mask: str | None = None  # ground-truth mask path (absolute)


@dataclass
class GroundTruth:
    """What the metrics need for one image: its size, boxes in original pixels, and (mask sets) a label map."""

    size: tuple[int, int]
    boxes: list[list[int]]
    mask: np.ndarray | None = None  # masks: 0 background, 1 foreground, 255 ignore; voc: class indices, 255 ignore


@dataclass
class EvalSet:
    """A parsed evaluation set; `ground_truth(item)` reads an item's annotation (masks lazily, one file at a time)."""

    name: str
    root: Path
    image_root: Path
    items: list[Item]
    task: str  # "boxes" (boxes only), "masks" (binary foreground masks), "semantic" (VOC class masks)
    splits: dict[str, list[str]] = field(default_factory=dict)  # split name -> item ids
    default_split: str | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    box_source: str = "annotation"  # where boxes come from: annotation files, or "mask" components

    def __len__(self) -> int:
        return len(self.items)

    def ground_truth(self, item: Item) -> GroundTruth:
        if item.mask is None:
            size = item.size or image_size(self.image_root / item.image)
            return GroundTruth(size, [list(b) for b in (item.boxes or [])])
        labels = read_label_png(item.mask)
        h, w = labels.shape
        if self.task == "semantic":
            mask = labels
            fg = (labels > 0) & (labels != IGNORE)
        else:
            fg = labels > 127
            mask = fg.astype(np.uint8)
        boxes = item.boxes if item.boxes is not None else mask_boxes(fg)
        return GroundTruth((w, h), [list(b) for b in boxes], mask)

    def select(self, ids) -> "EvalSet":
        """The same set restricted to `ids` (order kept)."""
        keep = set(ids)
        return EvalSet(self.name, self.root, self.image_root, [it for it in self.items if it.id in keep], self.task,
                       self.splits, self.default_split, self.num_classes, self.class_names, self.box_source)

    def split_ids(self, split: str) -> list[str]:
        """Ids of a named split, or of the ids listed in a text file (first token per line, '#' comments)."""
        if split in self.splits:
            return list(self.splits[split])
        path = Path(split)
        if not path.is_file():
            known = ", ".join(sorted(self.splits)) or "none"
            raise C2AMError(f"split {split!r}: not a split of {self.root} (known: {known}) and not a file of ids")
        wanted = set(read_id_list(path))
        by_stem = {Path(it.id).stem: it.id for it in self.items}
        ids = [it.id for it in self.items if it.id in wanted or it.image in wanted]
        ids += [by_stem[w] for w in wanted if w in by_stem and by_stem[w] not in ids]
        if not ids:
            raise C2AMError(f"{path}: none of its ids is an image of {self.root}")
        return ids


# -- small readers ----------------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such image (its size is needed for the ground truth)") from None
    except OSError as e:
        raise C2AMError(f"{path}: cannot read the image header ({e})") from None


def read_label_png(path) -> np.ndarray:
    """A mask PNG as a 2-D uint8 array of its stored values (palette indices stay indices)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                arr = np.asarray(img)
            elif img.mode in ("1",):
                arr = np.asarray(img, dtype=np.uint8) * 255
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.int64)
                arr = np.clip(arr * 255 // max(int(arr.max()), 1) if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
            else:
                arr = np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise C2AMError(f"{path}: no such mask file") from None
    except OSError as e:
        raise C2AMError(f"{path}: cannot read the mask ({e})") from None
    except Exception as e:  # a decompression bomb, or any decoder failure on a hostile file, is this mask's
        raise C2AMError(f"{path}: cannot read the mask ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_id_list(path: Path) -> list[str]:
    ids = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line.replace(",", " ").split()[0])
    return ids


def mask_boxes(fg: np.ndarray, min_share: float = MIN_COMPONENT_SHARE) -> list[list[int]]:
    """Ground-truth boxes of a foreground mask: each 8-connected component covering >= `min_share` of the image,
    plus the box of the whole foreground; none for an empty mask."""
    fg = np.ascontiguousarray(fg, dtype=np.uint8)
    if not fg.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    min_area = min_share * fg.shape[0] * fg.shape[1]
    boxes = [[int(x), int(y), int(x + w - 1), int(y + h - 1)]
             for x, y, w, h, area in stats[1:] if area >= min_area]
    ys, xs = np.nonzero(fg)
    boxes.append([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    return boxes


def _check_box(box, size, where: str) -> list[int]:
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = size
    if not (0 <= x1 <= x2 and 0 <= y1 <= y2):
        raise C2AMError(f"{where}: box {box} is not x1 <= x2, y1 <= y2 with non-negative corners")
    if x2 > w or y2 > h:  # x2 == w happens in CUB (x + w of a box touching the border); wsolevaluation keeps it
        raise C2AMError(f"{where}: box {box} lies outside the {w}x{h} image")
    return [x1, y1, x2, y2]


def _csv_rows(path: Path, columns: int) -> list[list[str]]:
    if not path.is_file():
        raise C2AMError(f"{path}: missing (a wsolevaluation metadata folder has image_ids.txt, class_labels.txt, "
                        f"image_sizes.txt, localization.txt)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != columns:
            raise C2AMError(f"{path}:{n}: expected {columns} comma-separated fields, found {len(parts)}")
        rows.append(parts)
    return rows


def _find_image_root(root: Path, candidates=("images", "JPEGImages", "val")) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return root


# -- adapters ---------------------------------------------------------------------------------------------------


def load_wsol(root, images=None, check_images: bool = False) -> EvalSet:
    """A clovaai/wsolevaluation metadata folder (image_ids, class_labels, image_sizes, localization .txt files).

    `root` is one split's folder, or a folder of split subfolders (train/val/test; test is the default).
    `images` is the image root the ids are relative to (default: `root`). Boxes are checked against image_sizes.txt;
    with `check_images` every image header is compared with it too.
    """
    root = Path(root)
    if not root.is_dir():
        raise C2AMError(f"{root}: no such folder")
    if (root / "image_ids.txt").is_file():
        folders, default = {root.name: root}, root.name
    else:
        folders = {p.name: p for p in sorted(root.iterdir()) if (p / "image_ids.txt").is_file()}
        if not folders:
            raise C2AMError(f"{root}: no image_ids.txt here or in a split subfolder (train/val/test)")
        default = "test" if "test" in folders else sorted(folders)[0]
    image_root = Path(images) if images is not None else root
    items, splits = [], {}
    for split, folder in folders.items():
        ids = [r[0] for r in _csv_rows(folder / "image_ids.txt", 1)]
        if len(set(ids)) != len(ids):
            raise C2AMError(f"{folder / 'image_ids.txt'}: an image id is listed twice")
        labels = {p: int(c) for p, c in _csv_rows(folder / "class_labels.txt", 2)}
        sizes = {p: (int(w), int(h)) for p, w, h in _csv_rows(folder / "image_sizes.txt", 3)}
        boxes: dict[str, list[list[int]]] = {}
        for p, *b in _csv_rows(folder / "localization.txt", 5):
            boxes.setdefault(p, []).append([int(float(v)) for v in b])
        for name, table in (("class_labels.txt", labels), ("image_sizes.txt", sizes), ("localization.txt", boxes)):
            missing = [i for i in ids if i not in table]
            if missing:
                raise C2AMError(f"{folder / name}: no entry for {len(missing)} image(s), e.g. {missing[0]}")
        for i in ids:
            w, h = sizes[i]
            if w <= 0 or h <= 0:
                raise C2AMError(f"{folder / 'image_sizes.txt'}: {i}: size {w}x{h} is not positive")
            checked = [_check_box(b, (w, h), f"{folder / 'localization.txt'}: {i}") for b in boxes[i]]
            if check_images:
                actual = image_size(image_root / i)
                if actual != (w, h):
                    raise C2AMError(f"{image_root / i}: image is {actual[0]}x{actual[1]} but image_sizes.txt says {w}x{h}")
            items.append(Item(i, i, (w, h), checked, labels[i]))
        splits[split] = ids
    if len({it.id for it in items}) != len(items):
        raise C2AMError(f"{root}: an image id appears in two splits")
    return EvalSet("wsol", root, image_root, items, "boxes", splits, default, num_classes=max(it.label for it in items) + 1)


def load_cub(root, check_images: bool = False) -> EvalSet:
    """The official CUB_200_2011 folder: images.txt, bounding_boxes.txt (x y w h), train_test_split.txt,
    image_class_labels.txt (1-based), images/. Boxes become [x, y, x + w, y + h] as in wsolevaluation's metadata."""
    root = Path(root)
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    def table(name):
        path = root / name
        if not path.is_file():
            raise C2AMError(f"{path}: missing (the CUB_200_2011 folder has images.txt, bounding_boxes.txt, "
                            f"train_test_split.txt, image_class_labels.txt)")
        rows = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if parts:
                rows[parts[0]] = parts[1:]
        return rows
    files, bboxes, split, labels = (table(n) for n in ("images.txt", "bounding_boxes.txt", "train_test_split.txt",
                                                        "image_class_labels.txt"))
    image_root = root / "images"
    items, splits = [], {"train": [], "test": []}
    for key, (rel,) in files.items():
        if key not in bboxes or key not in split or key not in labels:
            raise C2AMError(f"{root}: image {key} ({rel}) lacks a box, a split or a label")
        x, y, w, h = (float(v) for v in bboxes[key])
        size = image_size(image_root / rel) if check_images else None
        box = [int(x), int(y), int(x + w), int(y + h)]
        items.append(Item(rel, rel, size, [box], int(labels[key][0]) - 1))
        splits["train" if split[key][0] == "1" else "test"].append(rel)
    return EvalSet("cub", root, image_root, items, "boxes", splits, "test", num_classes=200)


def _voc_xml_boxes(path: Path, one_based: bool) -> tuple[tuple[int, int] | None, list[list[int]], list[str]]:
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise C2AMError(f"{path}: cannot parse the XML ({e})") from None
    size = None
    s = tree.find("size")
    if s is not None and s.findtext("width") and s.findtext("height"):
        size = (int(float(s.findtext("width"))), int(float(s.findtext("height"))))
    boxes, names = [], []
    for obj in tree.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        b = [int(float(bb.findtext(k))) - (1 if one_based else 0) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append([max(b[0], 0), max(b[1], 0), b[2], b[3]])
        names.append(obj.findtext("name") or "")
    return size, boxes, names


def load_imagenet(root) -> EvalSet:
    """ILSVRC val images with boxes from boxes.json (file -> [[x1, y1, x2, y2], ...]) or VOC-style XML files.

    Images in root/images (or root/val, or root); XML in root/annotations, root/Annotations or root/val_annotations,
    matched by file stem, coordinates used as they are (the ILSVRC convention). Labels from class_labels.json
    (file -> class index) or class_labels.txt (file,index) where present.
    """
    root = Path(root)
    if not root.is_dir():
        raise C2AMError(f"{root}: no such folder")
    image_root = _find_image_root(root, ("images", "val"))
    labels: dict[str, int] = {}
    if (root / "class_labels.json").is_file():
        labels = {k: int(v) for k, v in json.loads((root / "class_labels.json").read_text()).items()}
    elif (root / "class_labels.txt").is_file():
        labels = {p: int(c) for p, c in _csv_rows(root / "class_labels.txt", 2)}
    items = []
    if (root / "boxes.json").is_file():
        try:
            table = json.loads((root / "boxes.json").read_text())
        except json.JSONDecodeError as e:
            raise C2AMError(f"{root / 'boxes.json'}: not valid JSON ({e})") from None
        for rel, boxes in sorted(table.items()):
            if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
                raise C2AMError(f"{root / 'boxes.json'}: {rel}: expected a list of [x1, y1, x2, y2]")
            size = image_size(image_root / rel)
            items.append(Item(rel, rel, size, [_check_box(b, size, f"{root / 'boxes.json'}: {rel}") for b in boxes],
                              labels.get(rel, labels.get(Path(rel).stem))))
    else:
        xml_dir = next((root / d for d in ("annotations", "Annotations", "val_annotations", "bbox") if (root / d).is_dir()), None)
        if xml_dir is None:
            raise C2AMError(f"{root}: no boxes.json and no XML folder (annotations/, Annotations/, val_annotations/)")
        images = {p.stem: p.relative_to(image_root).as_posix() for p in sorted(image_root.rglob("*"))
                  if p.suffix.lower() in IMAGE_EXTENSIONS}
        for xml in sorted(xml_dir.rglob("*.xml")):
            if xml.stem not in images:
                continue
            rel = images[xml.stem]
            size, boxes, _ = _voc_xml_boxes(xml, one_based=False)
            size = size or image_size(image_root / rel)
            items.append(Item(rel, rel, size, [_check_box(b, size, str(xml)) for b in boxes],
                              labels.get(rel, labels.get(xml.stem))))
    if not items:
        raise C2AMError(f"{root}: no image with boxes found")
    splits = {p.stem: read_id_list(p) for p in sorted(root.glob("*.txt")) if p.name not in ("class_labels.txt",)}
    return EvalSet("imagenet", root, image_root, items, "boxes", splits, None, num_classes=1000 if labels else None)


def load_voc(root, box_source: str = "mask") -> EvalSet:
    """A PASCAL VOC 2012 devkit folder: JPEGImages/, SegmentationClass/ (palette PNGs, 255 = ignore),
    ImageSets/Segmentation/*.txt, optional Annotations/. Boxes come from the masks' foreground components
    (`box_source="mask"`, as for the mask sets) or from the XML files ("xml", 1-based, made 0-based)."""
    root = Path(root)
    if not (root / "SegmentationClass").is_dir() and (root / "VOC2012" / "SegmentationClass").is_dir():
        root = root / "VOC2012"
    seg, jpg = root / "SegmentationClass", root / "JPEGImages"
    if not seg.is_dir() or not jpg.is_dir():
        raise C2AMError(f"{root}: not a VOC devkit folder (needs JPEGImages/ and SegmentationClass/)")
    if box_source not in ("mask", "xml"):
        raise C2AMError(f"box source {box_source!r}: use mask or xml")
    split_dir = root / "ImageSets" / "Segmentation"
    splits = {p.stem: read_id_list(p) for p in sorted(split_dir.glob("*.txt"))} if split_dir.is_dir() else {}
    ids = sorted({i for s in splits.values() for i in s}) if splits else sorted(p.stem for p in seg.glob("*.png"))
    items = []
    for i in ids:
        mask = seg / f"{i}.png"
        image = next((f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png", ".JPG") if (jpg / f"{i}{ext}").is_file()), f"{i}.jpg")
        boxes = None
        if box_source == "xml":
            xml = root / "Annotations" / f"{i}.xml"
            if not xml.is_file():
                raise C2AMError(f"{xml}: missing (box source xml needs Annotations/)")
            boxes = _voc_xml_boxes(xml, one_based=True)[1]
        items.append(Item(i, image, None, boxes, None, str(mask)))
    if not items:
        raise C2AMError(f"{root}: no images listed in ImageSets/Segmentation and no masks in SegmentationClass")
    default = next((s for s in ("all", "trainval", "val", "train") if s in splits), None)
    return EvalSet("voc", root, jpg, items, "semantic", splits, default, 21, VOC_CLASSES, box_source)


def load_masks(root) -> EvalSet:
    """images/ + masks/ (same stem, 0 = background, 255 = foreground; ECSSD, SOD, Weizmann Horse and the like).

    Boxes are the foreground's components covering >= 1% of the image plus the whole foreground's box.
    Named splits: root/splits/NAME.txt (ids, one per line).
    """
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise C2AMError(f"{root}: expected images/ and masks/ folders")
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    items = []
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem not in masks:
            raise C2AMError(f"{p}: no mask {mask_dir / p.stem}.png")
        items.append(Item(p.stem, p.name, None, None, None, str(masks[p.stem])))
    if not items:
        raise C2AMError(f"{image_dir}: no images")
    split_dir = root / "splits"
    splits = {p.stem: read_id_list(p) for p in sorted(split_dir.glob("*.txt"))} if split_dir.is_dir() else {}
    return EvalSet("masks", root, image_dir, items, "masks", splits, None, box_source="mask")


def load_dataset(name: str, root, *, images=None, box_source: str = "mask", check_images: bool = False) -> EvalSet:
    """Parse an evaluation set by adapter name (one of DATASETS)."""
    if name == "cub":
        return load_cub(root, check_images)
    if name == "wsol":
        return load_wsol(root, images, check_images)
    if name == "imagenet":
        return load_imagenet(root)
    if name == "voc":
        return load_voc(root, box_source)
    if name == "masks":
        return load_masks(root)
    raise C2AMError(f"--dataset {name}: use one of {', '.join(DATASETS)}")
