"""The ``gmp-features`` Zarr v3 store: layout (:mod:`.layout`), writer (:mod:`.writer`) and
reader (:mod:`.reader`).  The format is described in ``docs/format.md``."""
from .layout import FORMAT_NAME, FORMAT_VERSION
from .reader import FeatureStore, collate_energy_forces, make_torch_dataset, open_store

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "FeatureStore", "collate_energy_forces",
           "make_torch_dataset", "open_store"]
