"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (committed).

Small real files in the layouts the decoders meet: JPEG baseline, progressive, greyscale,
Adobe CMYK, restart markers, EXIF orientation; PNG in every colour type and bit depth,
interlaced and palette; TIFF uncompressed, LZW, deflate, PackBits, tiled, 16-bit, CMYK,
grey; and the message examples of src/queue/schemas/*.json with a few near misses.
Run with the project's Python (Pillow, numpy): .venv/bin/python fuzz/make_seeds.py
"""

import io
import json
import pathlib
import shutil
import struct
import zlib

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SEEDS = HERE / "seeds"


def texture(w, h, channels):
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 13 + y * 7) % 256, (x * y) % 256, (x ^ y) * 9 % 256, 255 - (x * 5) % 256]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8).squeeze()


def img(arr, mode):
    """8-bit planes -> a Pillow image of `mode`; a uint16 array becomes I;16."""
    if arr.dtype == np.uint16:
        return Image.fromarray(arr)
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())


def save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def jpegs():
    rgb = img(texture(24, 16, 3), "RGB")
    yield "baseline_420", save(rgb, "JPEG", quality=75)
    yield "baseline_444", save(rgb, "JPEG", quality=90, subsampling=0)
    yield "progressive", save(rgb, "JPEG", quality=75, progressive=True)
    yield "optimized", save(rgb, "JPEG", quality=50, optimize=True)
    yield "grey", save(img(texture(17, 9, 1), "L"), "JPEG", quality=80)
    yield "cmyk_adobe", save(img(texture(16, 16, 4), "CMYK"), "JPEG", quality=80)
    yield "exif_rotate90", save(rgb, "JPEG", quality=60, exif=exif_orientation(6))
    yield "restart", save(img(texture(40, 24, 3), "RGB"), "JPEG", quality=70,
                          restart_marker_blocks=1)


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(palette):
    """10x10 8-bit palette PNG, all indices 0, with `palette` as the PLTE data."""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 10, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", palette) + chunk(b"IDAT", zlib.compress(bytes(110)))
            + chunk(b"IEND", b""))


def pngs():
    # Regression input: a PLTE that is not whole RGB entries (the png crate panicked).
    yield "regression_plte_49", palette_png(bytes(range(49)))
    yield "rgb8", save(img(texture(13, 7, 3), "RGB"), "PNG")
    yield "rgba8", save(img(texture(9, 9, 4), "RGBA"), "PNG")
    yield "grey8", save(img(texture(11, 5, 1), "L"), "PNG")
    yield "grey_alpha", save(img(texture(6, 6, 3)[..., :2].copy(), "LA"), "PNG")
    yield "grey16", save(img(texture(8, 4, 1).astype(np.uint16) * 257, "I;16"), "PNG")
    yield "palette", save(img(texture(10, 10, 3), "RGB").quantize(16), "PNG")
    yield "bilevel", save(img(((texture(16, 3, 1) > 100) * 255).astype(np.uint8), "L").convert("1"), "PNG")
    yield "interlaced", save(img(texture(12, 12, 3), "RGB"), "PNG", interlace=1)


def tiffs():
    rgb = img(texture(12, 8, 3), "RGB")
    yield "raw", save(rgb, "TIFF")
    yield "lzw", save(rgb, "TIFF", compression="tiff_lzw")
    yield "deflate", save(rgb, "TIFF", compression="tiff_adobe_deflate")
    yield "packbits", save(rgb, "TIFF", compression="packbits")
    yield "grey", save(img(texture(7, 5, 1), "L"), "TIFF")
    yield "grey16", save(img(texture(6, 4, 1).astype(np.uint16) * 257, "I;16"), "TIFF")
    yield "cmyk", save(img(texture(5, 5, 4), "CMYK"), "TIFF")
    yield "rgba", save(img(texture(5, 3, 4), "RGBA"), "TIFF")
    yield "tiled", tiled_tiff(texture(32, 32, 3), 16)


def tiled_tiff(rgb, tile):
    """Uncompressed little-endian RGB TIFF in tile x tile tiles (Pillow writes strips only)."""
    h, w, _ = rgb.shape
    tiles = [rgb[y:y + tile, x:x + tile].tobytes()
             for y in range(0, h, tile) for x in range(0, w, tile)]
    n = len(tiles)
    entries = 12
    ifd_size = 2 + entries * 12 + 4
    bps_at = 8 + ifd_size
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n
    offsets = [data_at + i * len(tiles[0]) for i in range(n)]
    tags = [  # (tag, type, count, value) sorted by tag; type 3 SHORT, 4 LONG
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 1),
        (262, 3, 1, 2), (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile),
        (323, 3, 1, tile), (324, 4, n, offsets_at), (325, 4, n, counts_at),
        (339, 3, 1, 1),  # SampleFormat: unsigned integer
    ]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        packed = struct.pack("<H", value) + b"\x00\x00" if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0)
    out += struct.pack("<HHH", 8, 8, 8)
    out += struct.pack(f"<{n}I", *offsets) + struct.pack(f"<{n}I", *[len(t) for t in tiles])
    return out + b"".join(tiles)


def messages(schema_file, extra):
    schema = json.loads((ROOT / "src/queue/schemas" / schema_file).read_text())
    for i, example in enumerate(schema.get("examples", [])):
        yield f"example{i}", json.dumps(example).encode()
        yield f"example{i}_pretty", json.dumps(example, indent=2).encode()
    for name, doc in extra:
        yield name, doc.encode()


JOB_EXTRA = [
    ("no_images", '{"schema":"cinflow.job/v1","job_id":"j","slide_id":"s","images":[]}'),
    ("bad_uri", '{"schema":"cinflow.job/v1","job_id":"j","slide_id":"s","images":["s3://b/../k"]}'),
    ("wrong_type", '{"schema":"cinflow.job/v1","job_id":7,"slide_id":"s","images":["s3://b/k"]}'),
    ("unicode", '{"schema":"cinflow.job/v1","job_id":"j\\u00e9","slide_id":"s","images":["s3://b/k\\u0000"]}'),
]
TRAIN_EXTRA = [
    ("margin", '{"schema":"cinflow.train/v1","job_id":"t","labels":"s3://b/l.csv","model":"m",'
               '"promotion_margin":1e308,"hyper_parameters":{"max_epochs":3}}'),
    ("wrong_schema", '{"schema":"cinflow.job/v1","job_id":"t","labels":"s3://b/l.csv","model":"m"}'),
]

TARGETS = {
    "decode_jpeg": jpegs,
    "decode_png": pngs,
    "decode_tiff": tiffs,
    "job": lambda: messages("job.v1.schema.json", JOB_EXTRA),
    "train": lambda: messages("train.v1.schema.json", TRAIN_EXTRA),
}

if __name__ == "__main__":
    total = 0
    for target, make in TARGETS.items():
        out = SEEDS / target
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name, data in make():
            (out / name).write_bytes(data)
            total += len(data)
        print(f"{target}: {len(list(out.iterdir()))} seeds")
    print(f"{total} bytes in all")
