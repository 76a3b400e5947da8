"""Images in: folder scanning, robust decoding, transforms, and the datasets that feed a DataLoader."""
from __future__ import annotations

import errno
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..runtime.errors import C2AMError, ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x its warning level)



def _allow_pixels(max_pixels: int | None) -> None:
    """Raise Pillow's own decompression-bomb limit (it refuses over twice MAX_IMAGE_PIXELS) when, and only when,
    the caller asks c2am for more (--max-pixels); c2am checks the size itself, with a clear message per file."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and (max_pixels is None or max_pixels > 2 * limit):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels // 2 + 1


def scan_images(root: str | Path, errors: list[tuple[str, str]] | None = None) -> list[str]:
    """Image files under `root` (recursive, any case of extension), as sorted POSIX paths relative to it.

    Symbolic links are followed, but a folder reached twice (a link loop) is visited once. A sub-folder that
    cannot be listed is appended to `errors` as (relative path, reason) when given, instead of being skipped silently.
    """
    root = Path(root)
    if not root.exists():
        raise C2AMError(f"{root}: no such folder")
    if root.is_file():
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            return [root.name]
        raise C2AMError(f"{root}: not a folder and not an image file")
    if not os.access(root, os.R_OK | os.X_OK):
        raise C2AMError(f"{root}: permission denied")

    def unlisted(e: OSError) -> None:
        if errors is not None and e.filename is not None:
            rel = Path(os.fsdecode(e.filename)).relative_to(root).as_posix()
            errors.append((rel, f"cannot list this folder ({e.strerror or e})"))

    seen, found = set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlisted):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise C2AMError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16-bit and float images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and 0.0 <= a.min() and a.max() <= 1.0:
            hi = 1.0  # a float image in [0, 1]
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _over_limit(pixels: str, max_pixels: int | None) -> str:
    return f"{pixels} pixels is over the limit of {max_pixels} (decompression bomb?); raise --max-pixels to allow it"


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one image as upright RGB (EXIF orientation applied); raise ImageError with the reason."""
    return _decode(Path(path), max_pixels, tensor=False)


class _Refused(Exception):
    """libjpeg-turbo refused a JPEG that looked plain: Pillow decodes it, or says why not."""


def _jpeg_bytes(img: Image.Image) -> tuple[bytes, int] | None:
    """(file bytes, EXIF orientation) of an open regular 8-bit RGB or greyscale JPEG; None for anything else."""
    try:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)  # as exif_transpose reads it (XMP too)
        img.fp.seek(0)
        data = img.fp.read()
    except Exception:
        return None
    return data, orientation if orientation in _TRANSPOSE else 1  # as exif_transpose: an unknown value is ignored


def _plain_jpeg(img: Image.Image) -> torch.Tensor | None:
    """An open regular 8-bit RGB or greyscale JPEG decoded by torchvision.io and turned upright; None for others."""
    jpeg = _jpeg_bytes(img)
    if jpeg is None:
        return None
    try:
        return apply_orientation(decode_jpeg_bytes(torch.frombuffer(bytearray(jpeg[0]), dtype=torch.uint8)), jpeg[1])
    except RuntimeError:
        raise _Refused from None


def _decode(path: Path, max_pixels: int | None, tensor: bool):
    """load_image (tensor False), or load_image_tensor: the file is opened once, and plain JPEGs are decoded by
    torchvision.io from the bytes read there."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "not a regular file")  # a FIFO or device named .jpg would block the run
        if st.st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        _allow_pixels(max_pixels)
        with Image.open(path) as img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise ImageError(path, _over_limit(f"{w}x{h} = {w * h}", max_pixels))
            fast = _plain_jpeg(img) if tensor else None
            if fast is not None:
                return fast
            img.load()
            img = _to_rgb(ImageOps.exif_transpose(img))
            return TF.pil_to_tensor(img) if tensor else img
    except _Refused:  # truncated or corrupt: Pillow says why (or decodes what libjpeg-turbo refused)
        return TF.pil_to_tensor(load_image(path, max_pixels))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's check runs first, at the same limit by default
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(path, _over_limit(found.group(1) if found else "its", max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except FileNotFoundError:
        reason = "broken symbolic link" if path.is_symlink() else "no such file (removed during the run?)"
        raise ImageError(path, reason) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "symbolic link loop") from None
        raise ImageError(path, f"cannot decode ({e})") from None
    except Exception as e:  # any decoder failure (SyntaxError, ValueError, struct.error, MemoryError...) is this file's
        raise ImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def read_plain_jpeg(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """(bytes as a uint8 tensor, EXIF orientation, upright (width, height)) of a regular 8-bit RGB or greyscale JPEG
    within `max_pixels`, or None for anything else: those go to load_image, which decodes them or words the reason."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        with Image.open(path) as img:  # the header only; a test may fake Image.open, so open by path
            w, h = img.size
            jpeg = None if max_pixels and w * h > max_pixels else _jpeg_bytes(img)
    except Exception:
        return None
    if jpeg is None:
        return None
    data, orientation = jpeg
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, size


# ImageOps.exif_transpose's transposes as ops on (..., H, W) tensors: FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM,
# TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90 (Pillow's rotations are counter-clockwise, as torch.rot90's k > 0)
_TRANSPOSE = {
    1: lambda t: t,
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-2, -1),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An EXIF orientation (1-8) applied to a (..., H, W) tensor exactly as ImageOps.exif_transpose applies it."""
    return _TRANSPOSE[orientation](image).contiguous() if orientation != 1 else image


def decode_jpeg_bytes(data, device: str | torch.device = "cpu"):
    """torchvision.io.decode_jpeg to RGB (one uint8 tensor, or a list: batched by nvjpeg on CUDA), quietly: its
    deprecation notice (decoding moves to TorchCodec) is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def load_image_tensor(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """load_image as an upright RGB uint8 (3, H, W) tensor, the same pixels, from one open of the file: plain JPEGs
    are decoded by torchvision.io (libjpeg-turbo, without Pillow's copies), everything else by Pillow, as load_image;
    a JPEG that libjpeg-turbo refuses goes to load_image, which decodes it or says why not."""
    return _decode(Path(path), max_pixels, tensor=True)


def squash(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize a (..., 3, H, W) image to image_size x image_size (bilinear, antialiased, uint8 in, uint8 out), as
    eval_transform does: nothing is cropped, so boxes map back exactly."""
    return TF.resize(image, [image_size, image_size], antialias=True)


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) images to normalised float32 with the very operations of to_tensor_normalized, so that a
    batch normalised here (on the device, 4x less to copy) equals one normalised image by image."""
    x = images.to(torch.float32).mul_(1.0 / 255)
    return x.sub_(torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)).div_(
        torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1))


def to_tensor_normalized(mean, std) -> T.Compose:
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))])


AUGMENTATIONS = ("crop", "strong")


def train_transform(image_size: int, resize: int | None, mean, std, augment: str = "crop") -> T.Compose:
    """Training views. `crop`, the authors' augmentation: resize to resize x resize, random horizontal flip, random
    crop. `strong`: a random resized crop (35-100 % of the image), flip, colour jitter and grayscale, so that the
    head cannot tell foreground from background by a fixed colour or scale (MoCo v2's colour settings)."""
    if augment == "crop":
        resize = resize or int(round(image_size * 8 / 7))
        geometry = [T.Resize((resize, resize), antialias=True), T.RandomHorizontalFlip(), T.RandomCrop(image_size)]
    elif augment == "strong":
        geometry = [T.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    else:
        raise C2AMError(f"--augment {augment}: use {' or '.join(AUGMENTATIONS)}")
    return T.Compose([*geometry, to_tensor_normalized(mean, std)])


def eval_transform(image_size: int, mean, std) -> T.Compose:
    """Squash the whole image to image_size x image_size (nothing cropped, so boxes map back exactly); resized as a
    uint8 tensor, the same pixels as `squash`, so that `localize` (SquashedImages) and this transform agree exactly."""
    return T.Compose([T.ToImage(), T.Resize((image_size, image_size), antialias=True), to_tensor_normalized(mean, std)])


class ImageFolder(Dataset):
    """Files of a folder through a transform; a bad file yields an error record instead of raising."""

    def __init__(self, root: str | Path, files: list[str], transform, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.root, self.files, self.transform, self.max_pixels = Path(root), list(files), transform, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            img = load_image(self.root / self.files[i], self.max_pixels)
            return {"index": i, "image": self.transform(img), "size": img.size}
        except ImageError as e:
            return {"index": i, "error": e.reason}
        except Exception as e:  # a transform failing on one odd image must not end a run over thousands
            return {"index": i, "error": f"cannot transform ({type(e).__name__}: {e})"}


class SquashedImages(ImageFolder):
    """Inference input: upright RGB uint8 images squashed to image_size (normalised later, per batch, on the device).

    With `defer_jpegs`, plain JPEGs come back undecoded ({"jpeg": bytes, "orientation"}) for nvjpeg on the GPU. With
    `keep_full`, the decoded image at full size comes too ({"full": (3, H, W) uint8}), for the work after the forward
    that needs the photo (the dense CRF, the guided filter, overlays), so that no file is decoded twice.
    """

    def __init__(self, root: str | Path, files: list[str], image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 defer_jpegs: bool = False, keep_full: bool = False):
        super().__init__(root, files, None, max_pixels)
        self.image_size, self.defer_jpegs, self.keep_full = image_size, defer_jpegs, keep_full

    def __getitem__(self, i: int) -> dict:
        path = self.root / self.files[i]
        try:
            if self.defer_jpegs:
                jpeg = read_plain_jpeg(path, self.max_pixels)
                if jpeg is not None and jpeg[0][-2:].tolist() == [0xFF, 0xD9]:  # ends as a whole JPEG does (else: CPU)
                    return {"index": i, "jpeg": jpeg[0], "orientation": jpeg[1], "size": jpeg[2]}
            image = load_image_tensor(path, self.max_pixels)
            item = {"index": i, "image": squash(image, self.image_size), "size": (image.shape[-1], image.shape[-2])}
            if self.keep_full:
                item["full"] = image
            return item
        except ImageError as e:
            return {"index": i, "error": e.reason}
        except Exception as e:  # a resize failing on one odd image must not end a run over thousands
            return {"index": i, "error": f"cannot transform ({type(e).__name__}: {e})"}


@dataclass
class Batch:
    indices: list[int] = field(default_factory=list)
    images: torch.Tensor | None = None  # the decoded good images, in the order of `indices` less the `encoded` ones
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of the upright image
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    encoded: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (slot in indices, JPEG bytes, orientation)
    full: list[torch.Tensor | None] = field(default_factory=list)  # per slot in indices: the full-size image, if kept

    def __len__(self) -> int:
        return len(self.indices)


def stack_channels_last(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images stacked into channels_last memory, the layout `localize` runs the model in: a plain copy for the
    (H, W, C)-ordered images that the uint8 resize returns, and no conversion later (to float, normalised, keeps it).
    Float images (training, evaluation) are stacked as they are."""
    if images[0].dtype != torch.uint8 or images[0].ndim != 3:
        return torch.stack(images)
    return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)


def collate(items: list[dict]) -> Batch:
    """Stack the good images of a batch and keep the errors of the bad ones beside them."""
    good = [it for it in items if "error" not in it]
    decoded = [it["image"] for it in good if "jpeg" not in it]
    return Batch(
        indices=[it["index"] for it in good],
        images=stack_channels_last(decoded) if decoded else None,
        sizes=[it["size"] for it in good],
        errors=[(it["index"], it["error"]) for it in items if "error" in it],
        encoded=[(slot, it["jpeg"], it["orientation"]) for slot, it in enumerate(good) if "jpeg" in it],
        full=[it.get("full") for it in good],
    )


def pause_for_tests() -> None:
    """Test hook, off by default: sleep $C2AM_TEST_SLEEP_PER_BATCH seconds after each batch, so that the kill
    tests (tests/test_robustness.py) can SIGKILL a run part-way at a predictable point."""
    seconds = float(os.environ.get("C2AM_TEST_SLEEP_PER_BATCH", 0) or 0)
    if seconds > 0:
        time.sleep(seconds)
