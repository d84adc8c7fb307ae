"""Images of more than 8 bits (16-bit / 32-bit / float -> 8-bit) and the scan that skips unreadable files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from iddpm.config import ConfigError, DataConfig
from iddpm.data import load_dataset, make_loader, read_image_folder
from iddpm.data.preprocess import preprocess_pil, to_8bit
from iddpm.data.sources import check_image_files, image_problem, list_image_files

RAMP16 = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520, the ramp


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png16_big_endian_gray(arr: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG written by hand (colour type 0, bit depth 16), as other tools write them."""
    h, w = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _expected_8bit(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535), computed in float64 (half up never occurs: v * 255 / 65535 is never k + 1/2)."""
    return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def test_16bit_png_ramp_is_not_all_white(tmp_path):
    path = tmp_path / "ramp.png"
    path.write_bytes(_png_bytes(RAMP16))
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("L")) == 255).mean() > 0.99  # the bug: PIL's own conversion clips
        out = np.asarray(to_8bit(im))
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    np.testing.assert_array_equal(out, _expected_8bit(RAMP16))
    assert out.min() == 0 and out.max() == 255 and (out == 255).mean() < 0.01
    assert len(np.unique(out)) == 256  # every level used: a ramp stays a ramp


def test_16bit_rounding_is_the_inverse_of_8_to_16_expansion():
    levels = np.arange(256, dtype=np.uint16) * 257  # 8-bit values expanded to 16 bits (v * 257)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(levels[None, :]))), np.arange(256)[None, :])
    edges = np.array([[0, 128, 129, 385, 386, 65406, 65407, 65535]], np.uint16)  # round(v / 257) flips at k + 1/2
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(edges))), [[0, 0, 1, 1, 2, 254, 255, 255]])


@pytest.mark.parametrize("image", [
    pytest.param(lambda: Image.fromarray(RAMP16.astype(">u2")), id="I;16B"),
    pytest.param(lambda: Image.fromarray(RAMP16.astype(np.int32)), id="I"),
    pytest.param(lambda: Image.open(io.BytesIO(_png16_big_endian_gray(RAMP16))), id="hand-written-16bit-png"),
])
def test_big_endian_32bit_integer_and_foreign_16bit_png(image):
    im = image()
    assert im.mode in ("I;16B", "I", "I;16")
    np.testing.assert_array_equal(np.asarray(to_8bit(im)), _expected_8bit(RAMP16))


def test_32bit_integer_beyond_16_bits_uses_its_range():
    values = np.array([[-1000, 0, 1_000_000]], np.int32)
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(values))), [[0, 0, 255]])


def test_float_images():
    unit = np.linspace(0, 1, 11, dtype=np.float32)[None, :]
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(unit))),
                                  np.floor(unit.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    wide = np.array([[0.0, 127.5, 255.0, np.nan]], np.float32)  # not in [0, 1]: by its own range, NaN -> 0
    np.testing.assert_array_equal(np.asarray(to_8bit(Image.fromarray(wide))), [[0, 128, 255, 0]])


def test_8bit_images_pass_through_untouched():
    for arr in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)):
        im = Image.fromarray(arr)
        assert to_8bit(im) is im


def test_16bit_files_in_dataset_and_image_folder(tmp_path):
    (tmp_path / "ramp.png").write_bytes(_png_bytes(RAMP16))
    expect = _expected_8bit(RAMP16)
    ds = load_dataset(DataConfig(data_dir=str(tmp_path)), 64, 1)
    np.testing.assert_array_equal(ds.load_uint8(0)[..., 0], expect)
    np.testing.assert_array_equal(read_image_folder(tmp_path)[0, ..., 0], expect)
    small = preprocess_pil(Image.fromarray(RAMP16), 16, 3)
    assert small.shape == (16, 16, 3) and 0 < small.mean() < 255 and (small == 255).mean() < 0.2


# --- the scan --------------------------------------------------------------------------------------------------


def _image_folder(tmp_path, n: int = 5):
    rng = np.random.default_rng(0)
    for i in range(n):
        (tmp_path / f"good_{i}.png").write_bytes(_png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    return tmp_path


def _truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_image_problem_reasons(tmp_path):
    _image_folder(tmp_path, 1)
    assert image_problem(tmp_path / "good_0.png") is None
    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    _truncate(big)
    assert image_problem(big) == "truncated"
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, renamed")
    assert image_problem(text) == "not a recognised image file"
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpg)
    assert image_problem(jpg) is None
    _truncate(jpg)
    assert image_problem(jpg) == "truncated"
    no_iend = tmp_path / "no_iend.png"  # every pixel present, the end chunk lost: verify() fails, the decode works
    no_iend.write_bytes((tmp_path / "good_0.png").read_bytes()[:-12])
    assert image_problem(no_iend) is None


def test_scan_skips_bad_files_with_one_warning(tmp_path):
    _image_folder(tmp_path, 5)
    big = tmp_path / "cat_truncated.png"
    big.write_bytes(_png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)))
    _truncate(big)
    (tmp_path / "dog_text.png").write_text("hello")
    warnings: list[str] = []
    files = check_image_files(list_image_files(tmp_path), tmp_path, warn=warnings.append)
    assert [f.name for f in files] == [f"good_{i}.png" for i in range(5)]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"--data_dir {tmp_path}: skipped 2 of 7 image files that cannot be read")
    assert "cat_truncated.png (truncated)" in warnings[0]
    assert "dog_text.png (not a recognised image file)" in warnings[0]
    ds = load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1, warn=warnings.append)
    assert len(ds) == 5 and len(warnings) == 2
    assert sum(x.shape[0] for x, _ in make_loader(ds, 5, shuffle=False, seed=0)) == 5  # no error mid-epoch


def test_scan_warning_lists_the_first_three(tmp_path):
    _image_folder(tmp_path, 1)
    for i in range(5):
        (tmp_path / f"bad_{i}.png").write_text("x")
    warnings: list[str] = []
    check_image_files(list_image_files(tmp_path), tmp_path, warn=warnings.append)
    assert "skipped 5 of 6" in warnings[0] and "bad_2.png" in warnings[0] and "bad_3.png" not in warnings[0]
    assert "(+2 more)" in warnings[0]


def test_scan_default_warning_goes_to_stderr(tmp_path, capsys):
    _image_folder(tmp_path, 2)
    (tmp_path / "bad.png").write_text("x")
    load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iddpm: warning: --data_dir") and "bad.png" in err[0]


def test_all_files_bad_is_one_line_error(tmp_path):
    (tmp_path / "a.png").write_text("x")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    with pytest.raises(ConfigError, match=r"none of the 2 image files can be read \(a\.png \(not a recognised") as e:
        load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1)
    assert "\n" not in str(e.value)


def test_file_damaged_after_the_scan_is_one_line_error(tmp_path):
    _image_folder(tmp_path, 4)
    ds = load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1)
    (tmp_path / "good_2.png").write_text("replaced by text after the scan")
    with pytest.raises(ConfigError, match="good_2.png cannot be read") as e:
        list(make_loader(ds, 2, shuffle=False, seed=0))
    assert "\n" not in str(e.value)


def test_read_image_folder_names_a_bad_file(tmp_path):
    _image_folder(tmp_path, 2)
    (tmp_path / "junk.png").write_text("x")
    with pytest.raises(ConfigError, match=r"SAMPLES .*junk\.png: cannot be read as an image"):
        read_image_folder(tmp_path)


def test_scan_cost_is_about_opening_each_file(tmp_path):
    """The scan of 200 small PNGs stays well under a full decode budget (measured ~0.2 ms per file)."""
    _image_folder(tmp_path, 200)
    files = list_image_files(tmp_path)
    start = time.perf_counter()
    check_image_files(files, tmp_path)
    assert time.perf_counter() - start < 5.0  # generous: a shared, loaded CI machine
