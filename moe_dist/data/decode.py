"""Safe sample decoding: images through PIL only (with a pixel limit), captions as strict UTF-8.

Nothing else in a sample is decoded: members such as .pyd, .pickle, .pth or .npy are never
unpickled, nor even read (the tar readers read only ``USED_KEYS`` and pass the rest over with value
None); unknown keys are ignored. Every failure has a reason name so that loaders and
``moe-dist-data validate`` can count them.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Dict, Optional, Tuple

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
USED_KEYS = frozenset(IMAGE_KEYS + ("txt", "json"))  # the only members a tar reader needs to read
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 20000 x 20000 "bomb" is refused before decoding


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short stable name for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_key(sample: Dict[str, object]) -> Optional[str]:
    return next((k for k in IMAGE_KEYS if k in sample), None)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: Optional[int] = None) -> Image.Image:
    """RGB image from encoded bytes.

    Args:
        max_pixels: refuse images with more pixels (checked from the header, before decoding).
        draft_size: for JPEG, let the decoder downscale by a power of two while both sides stay
            >= draft_size (PIL draft mode): much faster when the training size is small.
    Raises:
        SampleError: "image_too_large" or "undecodable_image".
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            return img.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for broken files; all mean the same here
        raise SampleError("undecodable_image", f"{type(err).__name__}: {err}") from None


def decode_caption(data: Optional[bytes]) -> str:
    if data is None:
        raise SampleError("missing_caption")
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
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError("bad_json", str(err)) from None
    return value if isinstance(value, dict) else {"value": value}
