"""``moe_dist.data.decode.to_rgb``: every image mode to upright 8-bit RGB, transparency onto white
(hand-worked pixel values)."""

import io

import pytest
from PIL import Image

from moe_dist.data.decode import decode_image, to_rgb


def _png(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", **kw)
    return out.getvalue()


def _pixels(img: Image.Image):
    return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]


def test_palette_png_transparency_becomes_white_not_black():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30])  # index 0 black (transparent), index 1 green
    pal.putpixel((1, 0), 1)
    with Image.open(io.BytesIO(_png(pal, transparency=0))) as img:
        assert img.mode == "P" and img.info["transparency"] == 0
        assert _pixels(img.convert("RGB")) == [(0, 0, 0), (10, 200, 30)]  # the naive convert: black
        rgb = to_rgb(img)
    assert rgb.mode == "RGB" and _pixels(rgb) == [(255, 255, 255), (10, 200, 30)]
    assert _pixels(decode_image(_png(pal, transparency=0))) == [(255, 255, 255), (10, 200, 30)]  # training too


def test_alpha_is_composited_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (100, 0, 200, 255))  # opaque -> itself
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half black over white: 255 * (1 - 128/255) = 127
    assert _pixels(to_rgb(rgba)) == [(255, 255, 255), (100, 0, 200), (127, 127, 127)]
    la = Image.new("LA", (1, 1), (0, 0))
    assert _pixels(to_rgb(la)) == [(255, 255, 255)]


def test_cmyk_16bit_1bit_and_tiny():
    # PIL: R = (255 - K) - C * (255 - K) / 255: (51, 0, 0, 128) -> 127 - 25.4 = 102, 127, 127
    assert _pixels(to_rgb(Image.new("CMYK", (1, 1), (51, 0, 0, 128)))) == [(102, 127, 127)]
    assert _pixels(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))) == [(255, 0, 0)]
    grey16 = Image.new("I;16", (3, 1))
    grey16.putpixel((0, 0), 65535)
    grey16.putpixel((1, 0), 32896)  # 128 * 257
    with Image.open(io.BytesIO(_png(grey16))) as img:  # 16-bit PNG; a plain convert clips >255 to white
        assert _pixels(to_rgb(img)) == [(255, 255, 255), (128, 128, 128), (0, 0, 0)]
    bit = Image.new("1", (2, 1), 0)
    bit.putpixel((1, 0), 1)
    assert _pixels(to_rgb(bit)) == [(0, 0, 0), (255, 255, 255)]
    one = Image.new("RGB", (1, 1), (5, 6, 7))
    assert to_rgb(one) is one


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    out = io.BytesIO()
    img.save(out, format="PNG", exif=exif)
    with Image.open(io.BytesIO(out.getvalue())) as stored:
        upright = to_rgb(stored)
    assert upright.size == (1, 2) and upright.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (1, 100000)])
def test_eval_transform_takes_tiny_and_thin_images(size):
    from moe_dist.cli.caption import _bounded_aspect
    from moe_dist.data.evalset import default_eval_transform

    out = default_eval_transform(32)(_bounded_aspect(to_rgb(Image.new("RGB", size, (9, 9, 9)))))
    assert tuple(out.shape) == (3, 32, 32)
