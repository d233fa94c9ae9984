"""brats_gan: BraTS MRI -> Zarr slice store (Dask) -> WGAN (DeepSpeed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brats_gan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from brats_gan.schema import open_store  # noqa: E402  (the store as a labelled xarray.Dataset, either format)

__all__ = ["__version__", "open_store"]
