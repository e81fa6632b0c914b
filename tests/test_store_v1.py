"""Format v1 stores (plain chunks, written before sharding) still open, read and verify; a
v1 store at the output path of a run (which writes v2) is refused with a clear message."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import SMALL_FEATURES, TESTS

from gmp_pipeline.errors import StoreError
from gmp_pipeline.features import GMPFeaturizer
from gmp_pipeline.pipeline import featurize_to_store
from gmp_pipeline.readers import open_reader
from gmp_pipeline.store import FORMAT_VERSION, open_store

V1 = TESTS / "data" / "v1_store"
V1_STORE = V1 / "ethanol3.zarr"


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2") / "ethanol3.zarr"
    featurize_to_store(open_reader("md17", str(V1 / "ethanol3.npz")), out,
                       GMPFeaturizer(**SMALL_FEATURES), derivatives=True, chunk_size=2,
                       progress=False, log=lambda m: None)
    return out


def test_the_fixture_is_a_small_v1_store():
    attrs = json.loads((V1_STORE / "zarr.json").read_text())["attributes"]
    assert attrs["format_version"] == 1 and attrs["complete"]
    meta = json.loads((V1_STORE / "pairs" / "dfeatures" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]   # no shards
    size = sum(p.stat().st_size for p in V1_STORE.rglob("*") if p.is_file())
    assert size < 300_000, size


def test_a_v1_store_reads_the_same_values_as_a_fresh_v2_store(v2_store):
    assert FORMAT_VERSION == 2
    old, new = open_store(V1_STORE), open_store(v2_store)
    assert new.attrs["format_version"] == 2
    meta = json.loads((v2_store / "pairs" / "dfeatures" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert len(old) == len(new) == 3
    assert old.fields == new.fields
    assert old.feature_list == new.feature_list
    a, b = old.get_batch(range(3), fields="all"), new.get_batch(range(3), fields="all")
    for da, db in zip(a, b):
        assert set(da) == set(db)
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)
        assert da["dfeatures"].shape[0] == 81       # 9 atoms, every pair
    for k in ("n_structures", "n_atoms", "n_pairs"):
        assert old.attrs["counts"][k] == new.attrs["counts"][k]


def test_verify_passes_on_both(v2_store, tmp_path):
    from gmp_pipeline.store.verify import verify_store

    v1 = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, v1)
    (json_path := v1 / "zarr.json").write_text(
        json_path.read_text().replace('"tests/data/v1_store/ethanol3.npz"',
                                      json.dumps(str(V1 / "ethanol3.npz"))))
    for path in (v1, v2_store):
        res = verify_store(path, sample=3)
        assert list(res) == [] and res.checked == 3, (path, list(res))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_onto_a_v1_store_says_what_to_do(tmp_path, overwrite):
    """The same input and options as the v1 store, but this code writes v2: refused naming the
    format versions and --overwrite (not a fingerprint mismatch, not a crash); with overwrite
    the store is rewritten as v2."""
    from gmp_pipeline.store.writer import existing_store_state

    out = tmp_path / "ethanol3.zarr"
    shutil.copytree(V1_STORE, out)
    reader = open_reader("md17", str(V1 / "ethanol3.npz"))
    fz = GMPFeaturizer(**SMALL_FEATURES)
    if not overwrite:
        with pytest.raises(StoreError) as exc:
            existing_store_state(out, None)
        msg = str(exc.value)
        assert "format version 1" in msg and "format version 2" in msg, msg
        assert "--overwrite" in msg and "open_store" in msg and str(out) in msg, msg
        with pytest.raises(StoreError, match="format version 1"):
            featurize_to_store(reader, out, fz, chunk_size=2, progress=False,
                               log=lambda m: None)
        assert open_store(out).attrs["format_version"] == 1        # left as it was
    else:
        featurize_to_store(reader, out, fz, chunk_size=2, overwrite=True, progress=False,
                           log=lambda m: None)
        assert open_store(out).attrs["format_version"] == 2


def test_the_cli_refuses_a_v1_store_in_one_line(tmp_path):
    from click.testing import CliRunner

    from gmp_pipeline.cli import main

    def run_cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    out = tmp_path / "ethanol3.zarr"
    shutil.copytree(V1_STORE, out)
    res = run_cli("featurize", "md17", V1 / "ethanol3.npz", "-o", out, "--no-progress",
                  "--features", _features_yaml(tmp_path))
    assert res.exit_code != 0
    assert "format version 1" in res.output and "--overwrite" in res.output, res.output
    assert "Traceback" not in res.output, res.output


def _features_yaml(tmp_path):
    from helpers import write_features_yaml

    return write_features_yaml(tmp_path / "features.yaml")


def test_the_fingerprint_covers_the_schema():
    from gmp_pipeline.schema import Schema
    from gmp_pipeline.store.layout import root_attrs

    def attrs(schema):
        return root_attrs(feature_config={"x": 1}, feature_list=[(0, 0.5)], source={"p": 1},
                          options={"derivatives": True}, schema=schema, version="0")

    a = attrs(Schema.build(atom_info={"tags": "int64"}))
    b = attrs(Schema.build(atom_info={"tags": "float64"}))
    c = attrs(Schema.build(atom_info={"tags": "int64"}))
    assert a["fingerprint"] != b["fingerprint"]
    assert a["fingerprint"] == c["fingerprint"]
    assert a["fingerprint_parts"]["schema"]["atom_info"] == {"tags": "int64"}
