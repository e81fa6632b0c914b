"""The store reader: open_store, batched access, plain-zarr readability, torch adapter."""
from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import SAMPLES, SMALL_FEATURES

from gmp_pipeline.errors import StoreError
from gmp_pipeline.pipeline import featurize_to_store
from gmp_pipeline.store import FORMAT_NAME, FORMAT_VERSION, open_store
from gmp_pipeline.store.layout import read_root_attrs


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader

    out = tmp_path_factory.mktemp("store") / "toy.zarr"
    reader = open_reader("ase", os.fspath(SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz"))
    featurize_to_store(reader, out, GMPFeaturizer(**SMALL_FEATURES), chunk_size=7,
                       progress=False, log=lambda m: None)
    return out


def test_root_metadata(toy_store):
    a = read_root_attrs(toy_store)
    assert a["format"] == FORMAT_NAME and a["format_version"] == FORMAT_VERSION
    assert a["complete"] is True
    assert a["fingerprint"].startswith("sha256:")
    assert a["feature_config"]["psp_sha256"] and a["feature_config"]["overlap_threshold"] == 1e-12
    assert len(a["feature_list"]) == 5 and a["feature_list"][0] == [-1, 0.0]
    assert a["source"]["reader"] == "ase" and a["units"]["energy"] == "eV"
    assert a["counts"]["n_structures"] == 101
    assert "consolidated_metadata" in (toy_store / "zarr.json").read_text()
    assert not (toy_store / "_staging").exists()


def test_getitem_and_batches(toy_store):
    st = open_store(toy_store)
    assert len(st) == 101 and st.n_features == 5 and st.has_derivatives
    d = st[3]
    n = len(d["numbers"])
    assert d["features"].shape == (n, 5) and d["positions"].shape == (n, 3)
    assert d["forces"].shape == (n, 3) and d["cell"].shape == (3, 3) and d["pbc"].shape == (3,)
    assert d["dfeatures"].shape == (len(d["pair_center"]), 3, 5)
    assert np.all(np.diff(d["pair_center"]) >= 0)
    assert set(d["pair_neighbor"]) <= set(range(n)) and "tags" in d and "fixed" in d
    batch = st.get_batch([50, 3, 100, 3])
    for got, i in zip(batch, [50, 3, 100, 3]):
        ref = st[i]
        assert int(got["index"]) == i
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    np.testing.assert_array_equal(st[-1]["positions"], st[100]["positions"])
    assert len(st[10:20]) == 10
    with pytest.raises(IndexError):
        st[101]
    assert sum(1 for _ in st) == 101


def test_plain_zarr_layout(toy_store):
    import zarr

    g = zarr.open_group(str(toy_store), mode="r")
    n_atoms = g["structures/n_atoms"][:]
    start = g["structures/atom_start"][:]
    s = 42
    rows = slice(start[s], start[s] + n_atoms[s])
    st = open_store(toy_store)
    np.testing.assert_array_equal(g["atoms/features"][rows], st[s]["features"])
    a0 = start[s]
    ps, pc = g["atoms/pair_start"][a0], g["atoms/pair_count"][a0]
    np.testing.assert_array_equal(g["pairs/dfeatures"][ps:ps + pc],
                                  st[s]["dfeatures"][st[s]["pair_center"] == 0])


def test_incomplete_store_is_refused_unless_asked(tmp_path, toy_store):
    import shutil

    bad = tmp_path / "inc.zarr"
    shutil.copytree(toy_store, bad)
    import json

    doc = json.loads((bad / "zarr.json").read_text())
    doc["attributes"]["complete"] = False
    doc.pop("consolidated_metadata", None)
    (bad / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="incomplete"):
        open_store(bad)
    st = open_store(bad, allow_incomplete=True)
    assert len(st) == 101 and not st.complete


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a Zarr"):
        open_store(tmp_path)
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", attributes={"format": "x"})
    with pytest.raises(StoreError, match="not a gmp-features"):
        open_store(tmp_path / "other.zarr")


def test_store_pickles_for_dataloader_workers(toy_store):
    import pickle

    st = pickle.loads(pickle.dumps(open_store(toy_store)))
    assert len(st) == 101 and st[5]["features"].shape[1] == 5


def test_torch_dataset_and_collate_give_forces(toy_store):
    torch = pytest.importorskip("torch")
    from gmp_pipeline.store import collate_energy_forces

    st = open_store(toy_store)
    ds = st.torch_dataset()
    assert len(ds) == 101
    one = ds[0]
    assert one["energy"].shape == () and one["energy"].dtype == torch.float64  # 0-d, exact
    assert one["features"].dtype == torch.float32
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_energy_forces)
    batch = next(iter(loader))
    n = batch["n_atoms"]
    assert batch["features"].shape == (int(n.sum()), 5)
    assert batch["energy"].shape == (4,) and batch["batch"].shape == (int(n.sum()),)
    assert int(batch["pair_center"].max()) < int(n.sum())
    # forces of a linear model E = sum_a w . F_a through the collated derivatives agree with the
    # per-structure dense derivative
    w = torch.arange(1.0, 6.0)
    g = w.expand(int(n.sum()), 5)
    contrib = torch.einsum("pm,pxm->px", g[batch["pair_center"]], batch["dfeatures"])
    forces = -torch.zeros(int(n.sum()), 3).index_add(0, batch["pair_neighbor"], contrib)
    d1 = st[1]
    dense = np.zeros((len(d1["numbers"]), 3))
    for c, j, df in zip(d1["pair_center"], d1["pair_neighbor"], d1["dfeatures"]):
        dense[j] -= df @ w.numpy()
    lo = int(n[0])
    np.testing.assert_allclose(forces[lo:lo + int(n[1])].numpy(), dense, rtol=1e-5, atol=1e-5)
