"""Shared test helpers (import with ``from helpers import ...``; append new helpers below).
Fixtures are in ``conftest.py``; fixture *data writers* (OCP LMDBs, ...) in ``fixtures/``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent
SAMPLES = TESTS / "data" / "samples"

# -- gmp-features stores (pipeline / store / cli tests) ------------------------------------------

#: a small feature set that keeps tests fast (5 features)
SMALL_FEATURES = {"orders": [-1, 0, 1], "sigmas": [0.3, 0.6], "psp": "QE-kjpaw",
                  "overlap_threshold": 1e-12, "square": False}

#: root attributes that legitimately differ between two runs of the same configuration
VOLATILE_ATTRS = ("created_at", "finished_at", "counts.n_tasks")


def write_features_yaml(path, **overrides) -> Path:
    """Write a feature-set YAML (SMALL_FEATURES with ``overrides``) and return its path."""
    import yaml

    doc = {**SMALL_FEATURES, **overrides}
    path = Path(path)
    path.write_text(yaml.safe_dump(doc))
    return path


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def store_differences(a, b, ignore_attrs=VOLATILE_ATTRS) -> list[str]:
    """Every difference between two gmp-features stores: root attributes (except the volatile
    ones), the set of arrays, and every array's shape, dtype, chunks and values (NaN == NaN)."""
    import zarr

    diffs = []
    ja = json.loads((Path(a) / "zarr.json").read_text())
    jb = json.loads((Path(b) / "zarr.json").read_text())
    fa, fb = _flat(ja.get("attributes", {})), _flat(jb.get("attributes", {}))
    for key in sorted(set(fa) | set(fb)):
        if key in ignore_attrs or key.startswith("source.path"):
            continue
        if fa.get(key) != fb.get(key):
            diffs.append(f"attr {key}: {fa.get(key)!r} != {fb.get(key)!r}")
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names_a = {f"{lv}/{n}" for lv in ("structures", "atoms", "pairs") if lv in ga
               for n, _ in ga[lv].arrays()}
    names_b = {f"{lv}/{n}" for lv in ("structures", "atoms", "pairs") if lv in gb
               for n, _ in gb[lv].arrays()}
    if names_a != names_b:
        diffs.append(f"arrays differ: {sorted(names_a ^ names_b)}")
    for name in sorted(names_a & names_b):
        xa, xb = ga[name], gb[name]
        if xa.shape != xb.shape or str(xa.dtype) != str(xb.dtype) or xa.chunks != xb.chunks:
            diffs.append(f"{name}: shape/dtype/chunks {xa.shape} {xa.dtype} {xa.chunks} != "
                         f"{xb.shape} {xb.dtype} {xb.chunks}")
            continue
        va, vb = np.asarray(xa[...]), np.asarray(xb[...])
        if va.dtype.kind == "f":
            same = np.array_equal(va, vb, equal_nan=True)
        else:
            if va.dtype.kind in "OUT" or vb.dtype.kind in "OUT":
                same = [str(x) for x in va.ravel()] == [str(x) for x in vb.ravel()]
            else:
                same = np.array_equal(va, vb)
        if not same:
            diffs.append(f"{name}: values differ")
    return diffs


def assert_stores_equal(a, b, **kw):
    diffs = store_differences(a, b, **kw)
    assert not diffs, "stores differ:\n" + "\n".join(diffs)


def check_store_against_source(store_path, reader, featurizer, indices=None, derivatives=True):
    """Compare structures of a store with the source records and in-process featurization
    (features/dfeatures to float32 precision when stored as float32).  Returns the number of
    structures compared."""
    from gmp_pipeline.store import open_store

    st = open_store(store_path)
    structures = list(reader)
    assert len(st) == len(structures)
    idx = range(len(st)) if indices is None else indices
    tol = 1e-5 if st.attrs["options"]["dtype"] == "float32" else 1e-12
    for i in idx:
        d, s = st.get_batch([i], fields="all")[0], structures[i]
        r = featurizer.featurize(s, derivatives=derivatives)
        assert int(d["source_index"]) == s.source_index
        np.testing.assert_array_equal(d["numbers"], s.numbers)
        np.testing.assert_array_equal(d["positions"], s.positions)
        np.testing.assert_array_equal(d["cell"], s.cell)
        np.testing.assert_array_equal(d["pbc"], s.pbc)
        if s.energy is None:
            assert np.isnan(d["energy"])
        else:
            assert float(d["energy"]) == s.energy
        if s.forces is not None:
            np.testing.assert_array_equal(d["forces"], s.forces)
        for name, value in s.info.items():
            if name in d:
                got = d[name]
                if isinstance(value, str):
                    assert str(got) == value, name
                elif isinstance(value, float) and np.isnan(value):
                    assert np.isnan(got), name
                else:
                    assert got == value, name
        for name, value in s.atom_info.items():
            if name in d:
                np.testing.assert_array_equal(d[name], value, err_msg=name)
        scale = max(1.0, float(np.abs(r.features).max()))
        np.testing.assert_allclose(d["features"], r.features, rtol=tol, atol=tol * scale)
        if derivatives:
            np.testing.assert_array_equal(d["pair_center"], r.pair_center)
            np.testing.assert_array_equal(d["pair_neighbor"], r.pair_neighbor)
            dscale = max(1.0, float(np.abs(r.dfeatures).max())) if r.dfeatures.size else 1.0
            np.testing.assert_allclose(d["dfeatures"], r.dfeatures, rtol=tol, atol=tol * dscale)
        else:
            assert "dfeatures" not in d
    return len(idx)


def kernel_cache_dir() -> str:
    """A numba cache base for test clusters, keyed by a hash of the kernel sources.

    numba's own cache check looks only at the file defining a jitted function, so a cache
    compiled before an edit of a module it calls (or of constant tables it captured) is reused
    and gives wrong numbers; keying the directory by every kernel source avoids that in tests.
    """
    import hashlib
    import tempfile

    import gmp_pipeline

    pkg = Path(gmp_pipeline.__file__).parent
    h = hashlib.sha256()
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return str(Path(tempfile.gettempdir()) / f"gmp-test-numba-{h.hexdigest()[:16]}")


def kernel_cache_env() -> dict:
    """Environment for subprocesses running the CLI with that cache."""
    import os

    return {**os.environ, "DASK_GMP_PIPELINE__CLUSTER__NUMBA_CACHE_DIR": kernel_cache_dir()}
