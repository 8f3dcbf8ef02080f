"""Safe sample decoding: images through PIL only (with a pixel limit), captions as strict UTF-8.

Nothing else in a sample is decoded: members such as .pyd, .pickle, .pth or .npy are never
unpickled, nor even read (the tar readers read only ``USED_KEYS`` and pass the rest over with value
None); unknown keys are ignored. A used member larger than its ``MAX_MEMBER_BYTES`` is not read either
(it arrives as ``Oversized``, from the size in its tar header), so no sample costs more memory than the
caps. Every failure has a reason name so that loaders and ``moe-dist-data validate`` can count them.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from PIL import Image, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
USED_KEYS = frozenset(IMAGE_KEYS + ("txt", "json"))  # the only members a tar reader needs to read
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 20000 x 20000 "bomb" is refused before decoding
# The most a tar reader reads of a used member, by extension; a larger one is a counted failure of its
# sample (caption_too_large, image_too_large, metadata_too_large), never read into memory.
MAX_CAPTION_BYTES = 64 << 10  # 64 KiB: 16000 four-byte characters; moe-dist-data shard caps captions at 1000
MAX_METADATA_BYTES = 1 << 20
MAX_IMAGE_BYTES = 64 << 20  # an 8000 x 8000 JPEG (DEFAULT_MAX_PIXELS) is ~10-30 MB
MAX_MEMBER_BYTES = {"txt": MAX_CAPTION_BYTES, "json": MAX_METADATA_BYTES, **{k: MAX_IMAGE_BYTES for k in IMAGE_KEYS}}


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short stable name for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Oversized:
    """A member the tar reader passed over unread: ``size`` bytes, more than its cap."""

    size: int
    cap: int

    def fail(self, reason: str) -> SampleError:
        return SampleError(reason, f"{self.size} bytes, more than {self.cap}")


def member_value(suffix: str, size: int, read) -> Union[bytes, Oversized]:
    """What a tar reader keeps of a used member of ``size`` bytes: ``read()``, or ``Oversized`` past its cap."""
    cap = MAX_MEMBER_BYTES.get(suffix.lower())
    return Oversized(size, cap) if cap is not None and size > cap else read()


def image_key(sample: Dict[str, object]) -> Optional[str]:
    return next((k for k in IMAGE_KEYS if k in sample), None)


WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an upright 8-bit RGB image, whatever its mode: the one image-to-RGB step (training shards,
    ``moe-dist caption``, ``moe-dist-data`` recipes).

    - EXIF orientation is applied (a phone photo stored sideways comes out upright).
    - Transparency (RGBA, LA, PA, a palette or grey/RGB image with a tRNS chunk) is composited onto
      **white**, as open_clip-style pipelines expect; a plain ``convert("RGB")`` would drop the alpha and
      show whatever colour the transparent pixels happen to hold (often black).
    - 16/32-bit greyscale (I;16, I) is scaled to 8 bits (a plain convert clips everything above 255 to
      white); float (F) is clipped to 0..255.
    - CMYK, YCbCr, LAB, HSV, 1-bit and palette images convert through PIL's own conversions.

    Any size works, 1 x 1 included; the result may be ``img`` itself when it already is upright RGB.
    """
    orientation = img.getexif().get(_EXIF_ORIENTATION) if hasattr(img, "getexif") else None
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _gray16(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _gray16(img: Image.Image) -> Image.Image:
    """An I;16 / I / F greyscale image as RGB: 16-bit values (0..65535) scaled to 0..255; an "I" or "F" image
    whose values all fit 0..255 is taken as 8-bit already."""
    import numpy as np

    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values / 257.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: Optional[int] = None) -> Image.Image:
    """RGB image from encoded bytes (through ``to_rgb``: upright, transparency composited onto white).

    Args:
        max_pixels: refuse images with more pixels (checked from the header, before decoding).
        draft_size: for JPEG, let the decoder downscale by a power of two while both sides stay
            >= draft_size (PIL draft mode): much faster when the training size is small.
    Raises:
        SampleError: "image_too_large" (pixels, or encoded bytes past MAX_IMAGE_BYTES) or "undecodable_image".
    """
    if isinstance(data, Oversized):
        raise data.fail("image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            return to_rgb(img)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for broken files; all mean the same here
        raise SampleError("undecodable_image", f"{type(err).__name__}: {err}") from None


def decode_caption(data: Union[bytes, Oversized, None]) -> str:
    if data is None:
        raise SampleError("missing_caption")
    if isinstance(data, Oversized):
        raise data.fail("caption_too_large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError("caption_not_utf8", str(err)) from None
    if not text.strip():
        raise SampleError("empty_caption")
    return text.strip()


def decode_sample(sample: Dict[str, object], max_pixels: int = DEFAULT_MAX_PIXELS,
                  draft_size: Optional[int] = None) -> Tuple[Image.Image, str]:
    """(RGB image, caption) of a raw webdataset sample; raises SampleError."""
    key = image_key(sample)
    if key is None:
        raise SampleError("missing_image", f"no {'/'.join(IMAGE_KEYS)} member")
    caption = decode_caption(sample.get("txt"))
    return decode_image(sample[key], max_pixels, draft_size), caption


def decode_metadata(sample: Dict[str, object]) -> Dict[str, object]:
    """The sample's .json member as a dict ({} if absent); never evaluates anything."""
    data = sample.get("json")
    if data is None:
        return {}
    if isinstance(data, Oversized):
        raise data.fail("metadata_too_large")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError("bad_json", str(err)) from None
    return value if isinstance(value, dict) else {"value": value}
