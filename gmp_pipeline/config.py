"""Configuration: the feature set (its defaults defined once) and the tuning knobs.

* **Feature set.**  ``data/features-default.yaml`` is the one place the default features are
  written; :func:`feature_defaults` reads it, :class:`~gmp_pipeline.features.GMPFeaturizer`
  takes its defaults from there and ``featurize`` uses it when ``--features`` is not given.
  :func:`load_feature_config` reads a user's feature YAML (relative ``.gpsp`` paths are
  relative to that file).
* **Tuning knobs** (task sizing, chunk bytes, assembly threshold) live in dask.config under
  ``gmp-pipeline.pipeline`` and ``gmp-pipeline.store``, with the defaults of
  ``data/pipeline.yaml`` loaded at the lowest priority; read one with :func:`knob`.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .errors import InputError

#: keys of a feature set (the arguments of ``GMPFeaturizer``)
FEATURE_KEYS = ("orders", "sigmas", "psp", "overlap_threshold", "square")
DEFAULT_FEATURES = Path(__file__).parent / "data" / "features-default.yaml"
KNOBS_FILE = Path(__file__).parent / "data" / "pipeline.yaml"


def load_feature_config(path=None) -> dict:
    """The feature set of a YAML file (keys: orders, sigmas, psp, overlap_threshold, square);
    the shipped default set when ``path`` is None."""
    import yaml

    path = Path(path) if path else DEFAULT_FEATURES
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read the feature file {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"feature file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError(f"feature file {str(path)!r} must be a mapping with keys orders, sigmas, "
                         "psp, overlap_threshold, square")
    known = set(FEATURE_KEYS)
    unknown = set(doc) - known
    if unknown:
        raise InputError(f"feature file {str(path)!r} has unknown keys {sorted(unknown)}; "
                         f"known keys: {sorted(known)}")
    psp = doc.get("psp")
    if isinstance(psp, str) and ("/" in psp or psp.endswith(".gpsp")):
        candidate = (path.parent / psp).resolve()
        if candidate.exists():
            doc["psp"] = str(candidate)
    return doc


@functools.lru_cache(maxsize=1)
def _defaults() -> tuple:
    doc = load_feature_config(DEFAULT_FEATURES)
    return tuple((k, doc[k]) for k in FEATURE_KEYS)


def feature_defaults() -> dict:
    """The default feature set (a fresh dict): orders, sigmas, psp, overlap_threshold, square."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in _defaults()}


def describe_defaults() -> str:
    """One line describing the default feature set, for help texts."""
    d = feature_defaults()
    orders, sigmas = sorted(d["orders"]), sorted(d["sigmas"])
    n = sum(1 if o == -1 else len(sigmas) for o in orders)
    return (f"orders {orders[0]}..{orders[-1]}, sigmas {sigmas[0]:g}..{sigmas[-1]:g} A, "
            f"{d['psp']}; {n} features")


@functools.lru_cache(maxsize=1)
def _load_knob_defaults() -> dict:
    import dask
    import yaml

    with open(KNOBS_FILE) as f:
        doc = yaml.safe_load(f)
    dask.config.update_defaults(doc)
    return doc


def knob(name: str):
    """The tuning knob ``gmp-pipeline.<name>`` from dask.config, e.g. ``knob("store.min-chunk-bytes")``.

    The shipped YAML value is the fallback, so a ``dask.config.set`` block that was entered
    before the defaults were first loaded (and that restores the config without them when it
    exits) cannot lose a knob.
    """
    import dask

    fallback = _load_knob_defaults()["gmp-pipeline"]
    for part in name.split("."):
        fallback = fallback[part]
    return dask.config.get(f"gmp-pipeline.{name}", default=fallback)


__all__ = ["FEATURE_KEYS", "DEFAULT_FEATURES", "load_feature_config", "feature_defaults",
           "describe_defaults", "knob"]
