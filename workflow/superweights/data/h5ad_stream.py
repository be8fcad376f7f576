"""Read an h5ad file chunk by chunk without loading its matrices into memory."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserError

COUNT_LAYER_NAMES = ("UMIs", "counts")


@contextmanager
def open_h5ad(path: str | Path) -> Iterator[h5py.File]:
    """Open an h5ad read-only, turning a missing, truncated or non-HDF5 file into a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5/h5ad file (wrong format or truncated download)")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path} cannot be read as HDF5 (truncated or corrupt?): {err}") from None
    with handle:
        for key in ("obs", "var"):
            if key not in handle:
                raise UserError(f"{path} is not an h5ad file: it has no '{key}' group")
        yield handle


def read_frame(handle: h5py.File, key: str) -> pd.DataFrame:
    """Read the obs or var table of an open h5ad."""
    try:
        return ad.io.read_elem(handle[key])
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"the '{key}' table of the h5ad cannot be read: {err}") from None


def matrix_element(handle: h5py.File, name: str):
    """The h5py element of X ("X") or of a layer (its name)."""
    if name == "X":
        if "X" not in handle:
            raise UserError("the h5ad has no X matrix")
        return handle["X"]
    layers = handle.get("layers", {})
    if name not in layers:
        raise UserError(
            f"the h5ad has no layer '{name}' (layers: {sorted(layers) or 'none'}); "
            "set preprocess.counts_layer to one of them or to X"
        )
    return layers[name]


class RowChunks:
    """Row-wise access to a dense or CSR/CSC matrix stored in an h5ad, as CSR chunks."""

    def __init__(self, element):
        if isinstance(element, h5py.Dataset):
            self._dense = element
            self._sparse = None
            self.shape = tuple(element.shape)
        else:
            self._dense = None
            self._sparse = ad.io.sparse_dataset(element)
            self.shape = tuple(self._sparse.shape)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows start..stop as a CSR matrix."""
        if self._dense is not None:
            return sp.csr_matrix(np.asarray(self._dense[start:stop]))
        return sp.csr_matrix(self._sparse[start:stop])

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (first row, CSR chunk) over the whole matrix."""
        for start in range(0, self.shape[0], chunk_size):
            yield start, self.rows(start, min(start + chunk_size, self.shape[0]))


def is_integer_valued(values: np.ndarray) -> bool:
    """True when every value is a whole number."""
    if np.issubdtype(values.dtype, np.integer):
        return True
    return bool(np.array_equal(values, np.rint(values)))


def find_counts(handle: h5py.File, counts_layer: str) -> tuple[str, RowChunks]:
    """Locate the raw counts: a named layer, X, or ("auto") UMIs/counts layer, else integer X."""
    if counts_layer != "auto":
        return counts_layer, RowChunks(matrix_element(handle, counts_layer))
    layers = handle.get("layers", {})
    for name in COUNT_LAYER_NAMES:
        if name in layers:
            return name, RowChunks(layers[name])
    matrix = RowChunks(matrix_element(handle, "X"))
    sample = matrix.rows(0, min(matrix.shape[0], 1000)).data
    if not is_integer_valued(sample):
        raise UserError(
            "no raw counts found: X holds non-integer (normalised?) values and there is no "
            "'UMIs' or 'counts' layer; set preprocess.counts_layer to the layer with counts"
        )
    return "X", matrix


def check_counts(chunk: sp.csr_matrix, source: str) -> None:
    """Fail on negative or non-integer values where raw counts are expected."""
    if chunk.data.size and chunk.data.min() < 0:
        raise UserError(f"counts in '{source}' include negative values; give raw UMI counts")
    if not is_integer_valued(chunk.data):
        raise UserError(
            f"counts in '{source}' include non-integer values; give raw UMI counts "
            "(or set preprocess.counts_layer to the layer that holds them)"
        )
