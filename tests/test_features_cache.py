"""The kernels' numba cache: one directory per machine, shared by clones (issue 13)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase

import gmp_pipeline
from gmp_pipeline import GMPFeaturizer, _numba_cache

CHILD = """
import json
import ase
import gmp_pipeline
from gmp_pipeline import GMPFeaturizer, _kernels, _numba_cache
fz = GMPFeaturizer()
fz.featurize(ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], cell=[6, 6, 6], pbc=True),
             derivatives=True)
st = _kernels._featurize.stats
print(json.dumps({"file": gmp_pipeline.__file__, "dir": _numba_cache.cache_dir(),
                  "cache_path": st.cache_path, "hits": sum(st.cache_hits.values()),
                  "misses": sum(st.cache_misses.values())}))
"""


def test_cache_directory_is_keyed_and_outside_the_package():
    d = Path(_numba_cache.cache_dir())
    assert d.name == _numba_cache.source_tag()
    assert Path(gmp_pipeline.__file__).parent not in d.parents


def test_second_clone_loads_the_same_cache(tmp_path):
    # fill the cache for the default feature set in this process (compile or load)
    GMPFeaturizer().featurize(ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], cell=[6, 6, 6],
                                        pbc=True), derivatives=True)
    clone = tmp_path / "clone"
    shutil.copytree(Path(gmp_pipeline.__file__).parent, clone / "gmp_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(clone), NUMBA_CACHE_DIR=str(tmp_path / "slot-0"))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["file"].startswith(str(clone))
    # same directory whatever the clone path and NUMBA_CACHE_DIR, and a load, not a compile
    assert r["dir"] == r["cache_path"] == _numba_cache.cache_dir()
    assert r["hits"] >= 1 and r["misses"] == 0, r
