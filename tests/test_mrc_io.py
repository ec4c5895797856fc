"""MRC reading and writing: round trips, memory mapping, permissive headers, real files."""

import warnings

import mrcfile
import numpy as np
import pytest

from cryomatch.errors import CryomatchError, CryomatchWarning
from cryomatch.io.mrc import (
    StackWriter,
    header_voxel_size,
    open_mrc,
    pixel_size_from,
    read_images,
    read_volume,
    write_mrc,
)

REAL_MRC = [
    ("maps/emd_1832.map", (64, 64, 64)),
    ("maps/EMD-3197.map", (20, 20, 20)),
    ("maps/trpv1_volume_48px_4.88A.mrc", (48, 48, 48)),
    ("particles/trpv1/trpv1_small_stack.mrcs", (10, 48, 48)),
    ("particles/relion31/relion31.mrcs", (5, 256, 256)),
    ("particles/relion31/relion31.hdrfix.mrcs", (5, 256, 256)),
    ("particles/empiar10076/empiar_10076_7.mrc", (7, 320, 320)),
    ("tomo/haadf_needle_tiltseries/HAADF.mrc", (77, 256, 256)),
    ("tomo/cryoet_sta_cryodrgn/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs", (220, 64, 64)),
    (
        "tomo/cryoet_sta_cryodrgn/ay19102021_L3_position6_ribo_it09_bin8_1.82A.hdrfix.mrcs",
        (220, 64, 64),
    ),
    (
        "tomo/cryoet_warptools_tomodrgn/warptools_test_box-32_angpix-12_reconstruct.mrc",
        (32, 32, 32),
    ),
]


def test_map_round_trip(tmp_path, rng):
    data = rng.normal(size=(16, 16, 16)).astype(np.float32)
    write_mrc(tmp_path / "m.mrc", data, 2.5, labels=["hello"])
    back, voxel = read_volume(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, data)
    assert voxel == pytest.approx(2.5)
    with mrcfile.open(tmp_path / "m.mrc") as m:  # a strictly valid file, with our label
        assert m.header.label[0].startswith(b"hello")
    assert not list(tmp_path.glob(".*tmp*"))


def test_stack_writer_round_trip_and_memory_map(tmp_path, rng):
    data = rng.normal(size=(10, 8, 8)).astype(np.float32)
    with StackWriter(tmp_path / "s.mrcs", 10, 8, 1.5) as w:
        w.write(data[:4])
        w.write(data[4:])
    np.testing.assert_array_equal(read_images(tmp_path / "s.mrcs"), data)
    with open_mrc(tmp_path / "s.mrcs") as m:
        assert isinstance(m.data, np.memmap)
        assert m.header.ispg == 0  # an image stack


def test_stack_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(ValueError):
        with StackWriter(tmp_path / "s.mrcs", 10, 8, 1.5) as w:
            w.write(np.zeros((3, 8, 8), np.float32))
            raise ValueError("killed")
    assert list(tmp_path.iterdir()) == []


def test_stack_writer_short_stack_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="3 of 10"):
        with StackWriter(tmp_path / "s.mrcs", 10, 8, 1.5) as w:
            w.write(np.zeros((3, 8, 8), np.float32))
    assert list(tmp_path.iterdir()) == []


def _break_header(path, **fields):
    with mrcfile.open(path, mode="r+", permissive=True) as m:
        for k, v in fields.items():
            setattr(m.header, k, v)


def test_broken_header_opens_permissively_with_a_warning(tmp_path, rng):
    data = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "b.mrcs", data, 1.0)
    _break_header(tmp_path / "b.mrcs", map=b"    ", machst=np.zeros(4, np.uint8))
    with pytest.warns(CryomatchWarning, match="permissively"):
        m = open_mrc(tmp_path / "b.mrcs")
    np.testing.assert_array_equal(m.data, data)
    m.close()


def test_zero_voxel_size_warns(tmp_path):
    write_mrc(tmp_path / "z.mrc", np.zeros((4, 4, 4), np.float32), 0.0)
    with open_mrc(tmp_path / "z.mrc") as m, pytest.warns(CryomatchWarning, match="voxel size is 0"):
        assert header_voxel_size(m, tmp_path / "z.mrc") is None


@pytest.mark.parametrize("name, shape", REAL_MRC)
def test_every_real_mrc_opens(real_data, name, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryomatchWarning)
        with open_mrc(real_data / name) as m:
            assert m.data.shape == shape
            assert np.isfinite(np.asarray(m.data[0], dtype=np.float64)).all()


def test_real_files_with_broken_headers_warn(real_data):
    for name in ("particles/relion31/relion31.mrcs", "tomo/haadf_needle_tiltseries/HAADF.mrc"):
        with pytest.warns(CryomatchWarning, match="permissively"):
            open_mrc(real_data / name).close()


def test_every_warptools_particle_opens(real_data):
    files = sorted((real_data / "tomo/cryoet_warptools_tomodrgn").rglob("*.mrcs"))
    assert len(files) == 40
    for f in files:
        with open_mrc(f) as m:
            assert m.data.shape == (37, 32, 32) and m.data.dtype == np.float16


def test_not_mrc_and_truncated(tmp_path, rng):
    (tmp_path / "t.mrc").write_text("hello " * 400)
    with pytest.raises(CryomatchError, match="not an MRC file"):
        open_mrc(tmp_path / "t.mrc")
    write_mrc(tmp_path / "c.mrcs", rng.normal(size=(5, 16, 16)).astype(np.float32), 1.0)
    raw = (tmp_path / "c.mrcs").read_bytes()
    (tmp_path / "c.mrcs").write_bytes(raw[:-100])
    with pytest.raises(CryomatchError, match="truncated"):
        open_mrc(tmp_path / "c.mrcs")


def test_a_100000_image_stack_is_never_loaded_whole(tmp_path):
    """Memory-mapped: reading a batch from a 1.6 GB (sparse) stack allocates only that batch."""
    import tracemalloc

    import pandas as pd

    from cryomatch.io.particles import ImageReader, Particles

    n, box = 100_000, 64
    with mrcfile.new_mmap(tmp_path / "big.mrcs", shape=(n, box, box), mrc_mode=2) as m:
        m.data[n - 1] = 1.0  # only the last image is non-zero
    table = pd.DataFrame(
        {
            "image_file": str(tmp_path / "big.mrcs"),
            "image_index": np.arange(n),
            "rlnImagePixelSize": 1.0,
        }
    )
    tracemalloc.start()
    with ImageReader(Particles(table, pd.DataFrame())) as reader:
        assert reader.check() == box
        batch = reader.read(n - 10, n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert batch.shape == (10, box, box) and batch[-1].min() == 1.0
    assert peak < 40 * 2**20  # the stack is 1.6 GB; this holds 10 images plus the table


def test_pixel_size_comes_from_the_metadata_before_the_header():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pixel_size_from(1.5, 2.0, 3.0, "x.mrc") == 1.5  # given: nothing else looked at
        assert pixel_size_from(None, 2.0, 2.01, "x.mrc") == 2.0  # within 1%: no warning
        assert pixel_size_from(None, 2.0, 0.0, "x.mrc") == 2.0  # no header value
    with pytest.warns(CryomatchWarning, match="x.mrc: the MRC header's voxel size 3 A differs"):
        assert pixel_size_from(None, 2.0, 3.0, "x.mrc") == 2.0
    with pytest.warns(CryomatchWarning, match="no pixel size in the metadata; using the MRC"):
        assert pixel_size_from(None, None, 3.0, "x.mrc") == 3.0
    with pytest.warns(CryomatchWarning, match="no pixel size anywhere; using 1 A"):
        assert pixel_size_from(None, None, 0.0, "x.mrc", default=1.0) == 1.0
    with pytest.raises(CryomatchError, match="no pixel size"):
        pixel_size_from(None, None, None, "x.mrc")
