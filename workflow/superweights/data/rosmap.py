"""ROSMAP single-nucleus data of Mathys et al. 2019 (AD Knowledge Portal on Synapse)."""

import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ..errors import UserError
from ..outputs import write_h5ad

log = logging.getLogger(__name__)

MATRIX = "filtered_count_matrix.mtx"
GENES = "filtered_gene_row_names.txt"
CELLS = "filtered_column_metadata.txt"
CLINICAL = "ROSMAP_clinical.csv"
SYNAPSE_IDS = {
    "syn18686381": MATRIX,
    "syn18686382": GENES,
    "syn18686372": CELLS,
    "syn3191087": CLINICAL,
}


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{name} is missing from {folder}; it needs {MATRIX}, {GENES}, {CELLS} and {CLINICAL} "
        "(Mathys et al. 2019 on Synapse)"
    )


def _projid(values: pd.Series) -> pd.Series:
    """ROSMAP project ids as strings, without the leading zeros some tables carry."""
    text = values.astype(str).str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    return numeric.astype("int64").astype(str) if numeric.notna().all() else text


def _read_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=sep, dtype={"projid": str}, low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path} cannot be read as a table: {err}") from None
    if "projid" not in table.columns:
        raise UserError(f"{path} has no 'projid' column")
    table["projid"] = _projid(table["projid"])
    return table


def _read_counts(path: Path, n_genes: int, n_cells: int) -> sp.csr_matrix:
    """The MatrixMarket counts as cells × genes, whichever way round the file stores them."""
    try:
        matrix = sp.csr_matrix(scipy.io.mmread(path))
    except (ValueError, OSError) as err:
        raise UserError(f"{path} is not a readable MatrixMarket file: {err}") from None
    if matrix.shape == (n_genes, n_cells):
        matrix = matrix.T.tocsr()
    elif matrix.shape != (n_cells, n_genes):
        raise UserError(
            f"{path} is {matrix.shape[0]} × {matrix.shape[1]} but there are {n_genes} genes "
            f"and {n_cells} cells in {GENES} and {CELLS}; the files do not belong together"
        )
    return matrix.astype(np.float32)


def read_mathys2019(folder: str | Path) -> ad.AnnData:
    """Counts, cell metadata and donor clinical data of Mathys et al. 2019 as one AnnData.

    X: cells × genes CSR counts (float32); obs: cell metadata (index TAG) joined with
    ROSMAP_clinical.csv on projid; var index: gene symbols (made unique).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"rosmap.path is not a folder: {folder}")
    paths = {name: _find(folder, name) for name in (MATRIX, GENES, CELLS, CLINICAL)}
    genes = pd.read_csv(paths[GENES], header=None, sep="\t", dtype=str).iloc[:, 0].str.strip()
    cells = _read_table(paths[CELLS], sep="\t")
    if "TAG" not in cells.columns:
        raise UserError(f"{paths[CELLS]} has no 'TAG' column")
    duplicated = cells["TAG"][cells["TAG"].duplicated()]
    if len(duplicated):
        raise UserError(f"{paths[CELLS]} repeats cell TAGs, e.g. {duplicated.iloc[0]}")
    clinical = _read_table(paths[CLINICAL], sep=",")
    if clinical["projid"].duplicated().any():
        raise UserError(f"{paths[CLINICAL]} has more than one row for some projid")
    obs = cells.merge(clinical, on="projid", how="left", suffixes=("", "_clinical"))
    unmatched = set(cells["projid"]) - set(clinical["projid"])
    if unmatched:
        log.warning("%d donor(s) have no row in %s", len(unmatched), CLINICAL)
    obs.index = pd.Index(obs.pop("TAG").astype(str), name=None)
    adata = ad.AnnData(
        X=_read_counts(paths[MATRIX], len(genes), len(cells)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes.to_numpy(), name=None)),
    )
    if not adata.var_names.is_unique:
        log.warning("gene names repeat in %s; making them unique", GENES)
        adata.var_names_make_unique()
    return adata


def download_from_synapse(dest: Path) -> Path:
    """Download the four Mathys 2019 files into `dest` with synapseclient."""
    try:
        import synapseclient
    except ImportError:
        raise UserError(
            "rosmap.synapse needs synapseclient: run pip install 'superweights[rosmap]'"
        ) from None
    token = os.environ.get("SYNAPSE_AUTH_TOKEN", "")
    if not token and not (Path.home() / ".synapseConfig").is_file():
        raise UserError(
            "Synapse needs credentials: set SYNAPSE_AUTH_TOKEN to a personal access token or "
            "write ~/.synapseConfig (or download the files yourself and set rosmap.path)"
        )

    def scrub(err: Exception) -> str:
        text = " ".join(str(err).split())
        return text.replace(token, "***") if token else text

    syn = synapseclient.Synapse(skip_checks=True, silent=True)
    try:
        if token:
            syn.login(authToken=token, silent=True)
        else:
            syn.login(silent=True)  # reads ~/.synapseConfig
    except Exception as err:  # synapseclient raises several unrelated types
        raise UserError(f"Synapse login failed: {scrub(err)}; check your token") from None
    dest.mkdir(parents=True, exist_ok=True)
    for syn_id, name in SYNAPSE_IDS.items():
        try:
            entity = syn.get(syn_id, downloadLocation=str(dest), ifcollision="overwrite.local")
        except Exception as err:
            raise UserError(
                f"Synapse download of {syn_id} ({name}) failed: {scrub(err)}; ROSMAP data "
                "needs an approved Data Use Certificate on the AD Knowledge Portal"
            ) from None
        got = Path(entity.path)
        if got.name not in (name, f"{name}.gz"):
            shutil.move(got, dest / name)
    return dest


def fetch_rosmap(
    out: str | Path, *, path: str | Path = "", synapse: bool = False, cache_dir: str | Path
) -> Path:
    """Write the Mathys 2019 data as an h5ad at `out`, from a local folder or from Synapse."""
    if bool(path) == bool(synapse):
        raise UserError(
            "set exactly one of rosmap.path (a folder with the Mathys 2019 files) "
            "and rosmap.synapse: true"
        )
    folder = Path(path) if path else download_from_synapse(Path(cache_dir) / "mathys2019")
    adata = read_mathys2019(folder)
    out = write_h5ad(adata, out)
    log.info("ROSMAP: %d cells × %d genes written to %s", adata.n_obs, adata.n_vars, out)
    return out
