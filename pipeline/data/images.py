"""Reading image files: the one place pixels are loaded and converted (``load_rgb``, ``load_mask``).

``load_rgb`` turns any image Pillow reads into 8-bit RGB by fixed rules, never by the
image's own value range (no per-image contrast stretching):

- EXIF orientation is applied first (``ImageOps.exif_transpose``), so a phone photo comes
  out the way it is displayed, with width and height swapped where it is rotated.
- 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled by its bit depth:
  ``round(v / 257)``, so 0 -> 0 and 65535 -> 255. Data that uses only 12 of the 16 bits
  (some TIFFs) therefore comes out dark, as the file declares it. (16-bit PNGs that use
  fewer bits are scaled up to 16 by the format, so they come out right.) A transparency
  key of a 16-bit image is ignored.
- 32-bit integer greyscale (``I``; Pillow's mode for PGM files with a maxval above 255,
  which it scales to 16 bits, and for 32-bit TIFFs) is read as 16-bit data, scaled the
  same way; values outside 0..65535 are refused.
- 32-bit float greyscale (``F``) must hold values in [0, 1] (NaN refused); it is scaled by
  255 and rounded. Other ranges (Hounsfield units, HDR) are refused: window them first.
- Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, and palette, greyscale or RGB images with a
  transparency key) is composited onto white, as Hugging Face image processors do:
  transparent pixels, whatever RGB they hold, come out white, half-transparent ones blend.
- Everything else Pillow converts to RGB (``1``, ``L``, ``P``, ``RGBX``, ``CMYK``,
  ``YCbCr``, ``LAB``, ``HSV``) goes through ``Image.convert("RGB")``. CMYK uses Pillow's
  profile-free formula; embedded ICC profiles are ignored for every mode, as the
  encoders' own training pipelines ignore them.
- Multi-frame files (GIF, TIFF) give their first frame. 16-bit RGB(A) PNGs are reduced to 8
  bits by Pillow itself (the high byte) before these rules apply.

Other modes raise ValueError naming the file, the entry and the mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
MASK_MODES = ("L", "P", "1", *SIXTEEN_BIT_MODES, "I")
BACKGROUND = (255, 255, 255, 255)  # what alpha is composited onto


def load_rgb(path: str | os.PathLike[str], what: str = "image") -> Image.Image:
    """The image file at ``path`` as an 8-bit RGB image (rules in the module docstring).

    ``what`` names the entry in errors, e.g. ``"dataset 'pets', image 'pets/test/a.png'"``.
    Raises FileNotFoundError, OSError (unreadable) or ValueError (unsupported pixels),
    each naming ``what`` and the file.
    """
    with _opened(path, what) as image:
        try:
            return to_rgb(ImageOps.exif_transpose(image))
        except ValueError as err:
            raise ValueError(f"{what}: {path}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """An in-memory image as 8-bit RGB by the module's rules (EXIF orientation not applied).

    An RGB image without a transparency key is returned as it is, not copied.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"32-bit integer pixels in {values.min()}..{values.max()} do not fit the 16 bits "
                "this pipeline scales by; rescale the image to 0..65535 first"
            )
        return _grey((values + 128) // 257)  # round(v / 257), exactly, in integers
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values).all()
        if values.size and not (finite and values.min() >= 0 and values.max() <= 1):
            found = "NaN or infinite values" if not finite else f"{values.min()}..{values.max()}"
            raise ValueError(f"float pixels must lie in [0, 1] (scaled by 255), found {found}")
        return _grey(np.rint(values * 255))
    if mode in ALPHA_MODES or "transparency" in image.info:
        try:
            rgba = image.convert("RGBA")
        except ValueError:
            raise ValueError(f"image mode {mode!r} with alpha is not supported") from None
        background = Image.new("RGBA", image.size, BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ValueError(f"image mode {mode!r} is not supported; convert it to RGB") from None


def load_mask(path: str | os.PathLike[str], what: str = "mask") -> np.ndarray:
    """A segmentation mask's stored values as uint8 (palette images give their indices).

    Masks are labels, not intensities: nothing is scaled, and modes with colour or values
    above 255 are refused (ValueError naming ``what`` and the file).
    """
    with _opened(path, what) as image:
        if image.mode not in MASK_MODES:
            raise ValueError(f"{what}: {path}: mask mode {image.mode!r} is not in {MASK_MODES}")
        values = np.asarray(image)
    if values.size and int(values.max()) > 255:
        raise ValueError(f"{what}: {path}: mask value {int(values.max())} is above 255")
    return values.astype(np.uint8)


@contextmanager
def _opened(path: str | os.PathLike[str], what: str) -> Iterator[Image.Image]:
    """``Image.open``, pixels loaded, whose errors name the entry and the file."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no file {path}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise OSError(f"{what}: cannot read {path}: {err}") from None
    with image:
        try:
            image.load()
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise OSError(f"{what}: cannot read {path}: {err}") from None
        yield image


def _grey(values: np.ndarray) -> Image.Image:
    """An RGB image with each channel equal to ``values`` (already in 0..255)."""
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")
