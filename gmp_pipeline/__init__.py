"""gmp-pipeline: GMP features and their position derivatives, computed on Dask into Zarr."""
from .errors import GMPError, InputError, PseudopotentialError, SourceError, StoreError
from .structure import Structure

__version__ = "0.1.0"

__all__ = ["GMPError", "InputError", "PseudopotentialError", "SourceError", "StoreError",
           "Structure", "__version__"]
