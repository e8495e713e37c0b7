"""The one image loader (``pipeline.data.images``) on fabricated files of every awkward kind."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data import load_split, prepare_dataset
from pipeline.data.images import load_mask, load_rgb, to_rgb


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def grey_as_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=int)[..., None], 3, axis=-1)


SIXTEEN_BIT = np.array(
    [[0, 1, 128, 129, 257, 385, 386], [1000, 32767, 32896, 40000, 65407, 65408, 65535]],
    dtype=np.uint16,
)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_greyscale_is_scaled_by_its_bit_depth(tmp_path, suffix):
    path = tmp_path / f"gradient.{suffix}"
    Image.fromarray(SIXTEEN_BIT).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(SIXTEEN_BIT / 257).astype(int)
    assert expected[0].tolist() == [0, 0, 0, 1, 1, 1, 2] and expected[1, -1] == 255
    assert (pixels(load_rgb(path)) == grey_as_rgb(expected)).all()

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    out = pixels(load_rgb(path))[..., 0]
    assert (out == np.rint(ramp / 257)).all()
    assert (out == 255).mean() < 0.01  # Image.convert("RGB") made 99.6% of them white


def test_32_bit_integer_images_are_read_as_16_bit_or_refused(tmp_path):
    pgm = tmp_path / "deep.pgm"  # maxval 4095: Pillow scales it to 16 bits, mode "I"
    values = np.array([[0, 1000, 2048, 4095]], dtype=">u2")
    pgm.write_bytes(b"P5\n4 1\n4095\n" + values.tobytes())
    assert Image.open(pgm).mode == "I"
    expected = np.rint(np.rint(values / 4095 * 65535) / 257)
    assert (pixels(load_rgb(pgm)) == grey_as_rgb(expected)).all()

    tif = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tif)
    with pytest.raises(
        ValueError, match=r"entry x: .*wide\.tif: 32-bit integer pixels in 0\.\.70000"
    ):
        load_rgb(tif, "entry x")
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tif)
    assert pixels(load_rgb(tif))[0, :, 0].tolist() == [0, 255]


def test_float_images_in_0_1_are_scaled_by_255_and_others_refused(tmp_path):
    path = tmp_path / "float.tif"
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    assert pixels(load_rgb(path))[0, :, 0].tolist() == [0, 64, 128, 255]
    Image.fromarray(values * 1000 - 500).save(path)  # e.g. Hounsfield units
    with pytest.raises(ValueError, match=r"float\.tif: float pixels must lie in \[0, 1\].*-500"):
        load_rgb(path)
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(path)
    with pytest.raises(ValueError, match="NaN"):
        load_rgb(path)


def test_palette_with_transparency_and_alpha_composite_onto_white(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 200, 30, 40, 10, 20, 250])
    palette.putdata([0, 1, 2])
    palette.save(tmp_path / "p.png")
    palette.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    assert pixels(load_rgb(tmp_path / "p.png"))[0].tolist() == [
        [0, 0, 0],
        [200, 30, 40],
        [10, 20, 250],
    ]
    assert pixels(load_rgb(tmp_path / "pt.png"))[0].tolist() == [
        [255, 255, 255],
        [200, 30, 40],
        [10, 20, 250],
    ]

    rgba = np.array([[[255, 0, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert pixels(load_rgb(tmp_path / "rgba.png"))[0].tolist() == [
        [255, 127, 127],  # half-transparent red on white
        [255, 255, 255],  # fully transparent: white whatever it stores
        [10, 20, 30],
    ]
    la = np.array([[[0, 0], [0, 255], [100, 51]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert pixels(load_rgb(tmp_path / "la.png"))[0, :, 0].tolist() == [255, 0, 224]

    grey = Image.fromarray(np.array([[5, 6]], dtype=np.uint8))
    grey.save(tmp_path / "key.png", transparency=5)  # a greyscale transparency key
    assert pixels(load_rgb(tmp_path / "key.png"))[0, :, 0].tolist() == [255, 6]


def test_cmyk_bilevel_and_greyscale(tmp_path):
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)])
    cmyk.save(tmp_path / "cmyk.tif")
    assert pixels(load_rgb(tmp_path / "cmyk.tif"))[0].tolist() == [
        [255, 255, 255],
        [0, 255, 255],
        [0, 0, 0],
        [255, 0, 0],
    ]
    bilevel = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("1")
    bilevel.save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert pixels(load_rgb(tmp_path / "one.png"))[0, :, 0].tolist() == [0, 255, 0]
    Image.fromarray(np.array([[7, 90]], dtype=np.uint8)).save(tmp_path / "l.png")
    assert pixels(load_rgb(tmp_path / "l.png"))[0].tolist() == [[7, 7, 7], [90, 90, 90]]


def test_exif_rotated_jpeg_comes_out_as_displayed(tmp_path):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high
    stored[:, :16] = (255, 0, 0)  # left half red
    stored[:, 16:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "phone.jpg").size == (32, 16)

    shown = load_rgb(tmp_path / "phone.jpg")
    assert shown.size == (16, 32)  # width and height swapped
    top, bottom = pixels(shown)[4, 8], pixels(shown)[28, 8]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_errors_name_the_entry_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image 'a': no file .*missing\.png"):
        load_rgb(tmp_path / "missing.png", "image 'a'")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"image 'b': cannot read .*broken\.jpg"):
        load_rgb(tmp_path / "broken.jpg", "image 'b'")
    with pytest.raises(ValueError, match="image mode 'La' is not supported"):
        to_rgb(Image.new("La", (2, 2)))


def test_masks_keep_their_stored_values(tmp_path):
    labels = np.array([[0, 1, 6, 200]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")
    palette = Image.fromarray(labels).convert("P")  # indices, not colours
    palette.putdata(labels.ravel().tolist())
    palette.putpalette([value for i in range(256) for value in (i, 255 - i, 0)])
    palette.save(tmp_path / "p.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "i16.png")
    for name in ("l.png", "p.png", "i16.png"):
        assert load_mask(tmp_path / name).tolist() == labels.tolist(), name
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"mask 'm': .*big\.png: mask value 300 is above 255"):
        load_mask(tmp_path / "big.png", "mask 'm'")
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mask mode 'RGB'"):
        load_mask(tmp_path / "rgb.png")


def test_prepared_images_open_through_the_loader(tmp_path):
    root = tmp_path / "scans"
    for label, level in (("normal", 1000), ("lesion", 60000)):
        folder = root / "test" / label
        folder.mkdir(parents=True)
        Image.fromarray(np.full((4, 4), level, dtype=np.uint16)).save(folder / "scan.png")
    prepare_dataset("scans", {"source": "image_folder", "root": str(root)}, tmp_path / "out")
    split = load_split(tmp_path / "out", "test")
    assert split.images["image_id"].to_list() == [
        "scans/test/lesion/scan.png",
        "scans/test/normal/scan.png",
    ]
    assert split.open_image(0).getpixel((0, 0)) == (233, 233, 233)  # 60000 / 257
    assert split.open_image(1).getpixel((0, 0)) == (4, 4, 4)  # 1000 / 257
    (root / "test" / "normal" / "scan.png").write_bytes(b"truncated")
    with pytest.raises(OSError, match=r"image 'scans/test/normal/scan\.png': cannot read"):
        split.open_image(1)
