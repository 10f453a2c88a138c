"""The reference paper's datasets: Boston Housing and Pima Indians Diabetes.

Each loader returns a :class:`Split` of float32 tensors with a seeded train/test split.
Files are looked up, in order, in the ``data_dir`` argument, the ``VEIL_DATA_DIR``
environment variable, veil's cache directory (``$XDG_CACHE_HOME/veil`` or ``~/.cache/veil``),
and otherwise downloaded from their public source and checked against a pinned sha256.
"""

from veil.datasets._files import DATASETS, DatasetFile, find_file
from veil.datasets._loaders import Split, boston, pima

__all__ = ["DATASETS", "DatasetFile", "Split", "boston", "find_file", "pima"]
