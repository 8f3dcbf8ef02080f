"""Small on-disk datasets for data tests: images, CSVs, hand-built shards with broken samples."""

import io
import os
import struct
import zlib

import webdataset as wds
from PIL import Image


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    img = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid tiny PNG whose header claims width x height (a decompression bomb's header)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def make_csv(directory, n: int = 200, extra_rows=()):
    """n images with unique captions, plus ``extra_rows`` (image name, caption bytes/str, image bytes or None)."""
    os.makedirs(os.path.join(directory, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img/{i:04d}.jpg"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(jpeg_bytes(i))
        rows.append((name, f"caption number {i}", i % 3))
    path = os.path.join(directory, "data.csv")
    with open(path, "wb") as f:
        f.write(b"image,caption,group\n")
        for name, caption, group in rows:
            f.write(f"{name},{caption},{group}\n".encode())
        for name, caption, data in extra_rows:
            if data is not None:
                with open(os.path.join(directory, name), "wb") as img:
                    img.write(data)
            caption = caption if isinstance(caption, bytes) else caption.encode()
            f.write(name.encode() + b"," + caption + b",9\n")
    return path


class PickleBomb:
    """Unpickling this creates a marker file: proof that a .pickle member was never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def good_sample(i):
    return {"__key__": f"g{i:05d}", "jpg": jpeg_bytes(i), "txt": f"good {i}".encode()}


def model_batch(cfg, n=4, seed=0, dtype=None):
    """Images [n, 3, S, S] and token ids [n, C] for a model config: each caption a random length with its
    EOS there and padding after it (text after EOS is never routed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen, dtype=dtype)
    C = cfg.text.context_length
    lengths = torch.randint(3, C, (n,), generator=gen)
    text = torch.randint(4, cfg.text.vocab_size, (n, C), generator=gen)
    positions = torch.arange(C)[None, :]
    text = torch.where(positions == lengths[:, None], cfg.text.eos_id, text)
    return images, torch.where(positions > lengths[:, None], cfg.text.pad_id, text)


class ZeroTokenizer:
    """What ShardLoader needs of a tokenizer: encode(texts) -> (tokens, padding_mask), all zeros."""

    def __init__(self, length: int = 8):
        self.length = length

    def encode(self, texts):
        import torch

        tokens = torch.zeros(len(texts), self.length, dtype=torch.long)
        return tokens, tokens == 0


def blank_transform(size: int = 8):
    """An image transform for loader tests that need no pixels: every image becomes zeros [3, size, size]."""
    import torch

    return lambda image: torch.zeros(3, size, size)


class IdTokenizer:
    """A tokenizer over the ids themselves (BOS 2, EOS 3, pad 0): prompt words are ids, ``decode`` joins the
    ids that are not special, and calling it encodes texts as the towers read them (BOS, the ids cut to the
    context, EOS, padding)."""

    bos_id, eos_id, pad_id = 2, 3, 0

    def __init__(self, context_length: int = 12):
        self.context_length = context_length

    def pieces(self, texts):
        return [[int(w) for w in t.split()] for t in texts]

    def decode(self, tokens):
        return [" ".join(str(t) for t in row if t not in (0, 2, 3)) for row in tokens.tolist()]

    def __call__(self, texts):
        import torch

        rows = [[2] + self.pieces([t])[0][:self.context_length - 2] + [3] for t in texts]
        return torch.tensor([r + [0] * (self.context_length - len(r)) for r in rows])
