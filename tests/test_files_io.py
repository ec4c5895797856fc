"""Array, table and figure writers: round trips, provenance, atomic renames."""

import json

import numpy as np
import pandas as pd

from cryomatch import provenance
from cryomatch.io.atomic import Outputs
from cryomatch.io.figures import image_montage, orthogonal_slices, save_png
from cryomatch.io.files import read_csv, write_csv, write_json, write_npy, write_npz


def test_npy_npz_round_trip(tmp_path, rng):
    a = rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))
    write_npy(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    write_npz(tmp_path / "b.npz", x=a.real, y=np.arange(5))
    with np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(b["y"], np.arange(5))


def test_csv_round_trip_with_provenance(tmp_path):
    table = pd.DataFrame({"frequency": [0.01, 0.02], "frc": [0.9, 0.5]})
    prov = provenance.record("test", {"k": 1})
    write_csv(tmp_path / "t.csv", table, prov)
    assert (tmp_path / "t.csv").read_text().startswith("frequency,frc\n")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), table)  # a plain reader
    pd.testing.assert_frame_equal(read_csv(tmp_path / "t.csv"), table)
    sidecar = json.loads((tmp_path / "t.csv.provenance.json").read_text())
    assert sidecar["stage"] == "test" and sidecar["params"] == {"k": 1}


def test_json(tmp_path):
    write_json(tmp_path / "p.json", {"a": np.float32(1.5), "b": [np.int64(2)]})
    assert json.loads((tmp_path / "p.json").read_text()) == {"a": 1.5, "b": [2]}


def test_figures_are_pngs(tmp_path, rng):
    save_png(image_montage(rng.normal(size=(5, 8, 8)), titles=list("abcde")), tmp_path / "m.png")
    save_png(orthogonal_slices(rng.normal(size=(8, 8, 8)), "v"), tmp_path / "o.png")
    for name in ("m.png", "o.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_transaction_removes_everything_on_error(tmp_path):
    try:
        with Outputs() as out:
            write_npy(tmp_path / "x.npy", np.zeros(3), out)
            write_json(tmp_path / "y.json", {}, out)
            raise RuntimeError("later failure")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
