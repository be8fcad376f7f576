"""SEA-AD single-nucleus RNA-seq from the public Allen Institute bucket (listed at run time)."""

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.experimental import concat_on_disk

from ..errors import UserError
from ..outputs import atomic_path
from .download import cache_path, download, get_text, link_or_copy

log = logging.getLogger(__name__)

ADNC_COLUMN = "Overall AD neuropathological Change"
DONOR_COLUMN = "Donor ID"
ADNC_ORDER = ("Not AD", "Low", "Intermediate", "High", "Reference")
PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
RELEASE_STAMP = re.compile(r"\.(\d{4}-\d{2}-\d{2})\.h5ad$")


def list_bucket(
    base_url: str,
    prefix: str,
    session=None,
    *,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> list[dict]:
    """All objects under `prefix` (S3 ListObjectsV2 over HTTPS): dicts of key, size, etag."""
    url = base_url.rstrip("/") + "/"
    params = {"list-type": "2", "prefix": prefix}
    objects = []
    while True:
        text = get_text(
            url, params=params, retries=retries, backoff=backoff, timeout=timeout, session=session
        )
        try:
            root = ET.fromstring(text)
        except ET.ParseError as err:
            raise UserError(f"{url} did not answer an S3 bucket listing ({err})") from None
        for item in root.iterfind("{*}Contents"):
            objects.append(
                {
                    "key": item.findtext("{*}Key"),
                    "size": int(item.findtext("{*}Size")),
                    "etag": (item.findtext("{*}ETag") or "").strip('"'),
                }
            )
        token = root.findtext("{*}NextContinuationToken")
        if root.findtext("{*}IsTruncated") != "true" or not token:
            return objects
        params = {**params, "continuation-token": token}


def _releases(objects: list[dict]) -> list[str]:
    return sorted({m[1] for o in objects if (m := RELEASE_STAMP.search(o["key"]))})


def _shortlist(items, limit: int = 20) -> str:
    items = list(items)
    more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more or "none"


def donor_objects(objects: list[dict], region: str, release: str) -> dict[str, dict]:
    """{donor ID: object} for the per-donor objects of one region and release."""
    suffix = f"_SEAAD_{region}_RNAseq_final-nuclei.{release}.h5ad"
    found = {}
    for obj in objects:
        name = obj["key"].rsplit("/", 1)[-1]
        if name.endswith(suffix):
            found[name.removesuffix(suffix)] = obj
    return found


def read_donor_metadata(path_or_url: str, cache_dir: Path, **http) -> pd.Series:
    """ADNC level per donor from a CSV/TSV (local path or URL) with SEA-AD column names."""
    path = Path(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        path = download(path_or_url, cache_path(cache_dir, path_or_url), **http)
    if not path.is_file():
        raise UserError(f"seaad.donor_metadata file not found: {path}")
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"seaad.donor_metadata {path} is not a CSV/TSV table: {err}") from None
    missing = [c for c in (DONOR_COLUMN, ADNC_COLUMN) if c not in table.columns]
    if missing:
        raise UserError(f"seaad.donor_metadata {path} lacks the column(s) {', '.join(missing)}")
    table = table.dropna(subset=[DONOR_COLUMN]).drop_duplicates(DONOR_COLUMN)
    return table.set_index(DONOR_COLUMN)[ADNC_COLUMN].fillna("unknown")


def balanced_draw(levels: pd.Series, n: int, seed: int) -> list[str]:
    """Draw `n` donors round-robin across ADNC levels (known levels in disease order first)."""
    rng = np.random.default_rng(seed)
    order = [lv for lv in ADNC_ORDER if lv in set(levels)]
    order += sorted(set(levels) - set(order))
    pools = [list(rng.permutation(sorted(levels.index[levels == lv]))) for lv in order]
    chosen = []
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return chosen


def choose_donors(
    available: list[str],
    *,
    donors: list[str],
    n_donors: int,
    levels: pd.Series | None,
    seed: int,
) -> list[str]:
    """Explicit donors, else `n_donors` balanced across ADNC levels, else a seeded random draw."""
    if donors:
        missing = sorted(set(donors) - set(available))
        if missing:
            raise UserError(
                f"seaad.donors not in this release: {', '.join(missing)}; "
                f"available: {_shortlist(sorted(available))}"
            )
        return sorted(set(donors))
    if levels is not None:
        unknown = sorted(set(available) - set(levels.index))
        if unknown:
            log.warning("%d donor object(s) have no row in the donor metadata", len(unknown))
        available = sorted(set(available) & set(levels.index))
    if n_donors > len(available):
        raise UserError(
            f"seaad.n_donors is {n_donors} but only {len(available)} donor objects can be drawn; "
            "lower seaad.n_donors"
        )
    if levels is not None:
        return sorted(balanced_draw(levels.loc[available], n_donors, seed))
    log.warning(
        "no seaad.donor_metadata given: %d donors drawn at random, not balanced across ADNC",
        n_donors,
    )
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(sorted(available), n_donors, replace=False).tolist())


def _fetch_object(base_url: str, obj: dict, cache_dir: Path, **http) -> Path:
    md5 = obj["etag"] if PLAIN_MD5.fullmatch(obj["etag"]) else None  # multipart ETags: "-N"
    url = f"{base_url.rstrip('/')}/{quote(obj['key'])}"
    return download(url, cache_path(cache_dir, obj["key"]), size=obj["size"], md5=md5, **http)


def _same(a, b) -> bool:
    """Deep equality for uns values (dicts, arrays, scalars)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray | pd.DataFrame) or isinstance(b, np.ndarray | pd.DataFrame):
        return type(a) is type(b) and np.array_equal(np.asarray(a), np.asarray(b))
    return type(a) is type(b) and bool(a == b)


def concat_h5ad(paths: list[Path], out: Path) -> Path:
    """Stack h5ad files along cells on disk; keeps obs, var, layers and the uns they share."""
    with atomic_path(out) as tmp:
        concat_on_disk(list(paths), tmp, join="inner", merge="same")
        unses = []
        for path in paths:
            with h5py.File(path, "r") as handle:
                unses.append(ad.io.read_elem(handle["uns"]) if "uns" in handle else {})
        shared = {k: v for k, v in unses[0].items() if all(_same(v, u.get(k)) for u in unses)}
        with h5py.File(tmp, "a") as handle:
            if "uns" in handle:
                del handle["uns"]
            ad.io.write_elem(handle, "uns", shared)
    return out


def fetch_seaad(
    out: str | Path,
    *,
    base_url: str,
    release: str,
    region: str,
    donors: list[str],
    n_donors: int,
    donor_metadata: str,
    full_file: bool,
    cache_dir: str | Path,
    seed: int,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download SEA-AD nuclei of one region and release into one h5ad at `out`.

    With `full_file` the whole-region object is placed at `out`; otherwise the chosen
    donors' objects (see `choose_donors`) are downloaded and concatenated.
    """
    out, cache_dir = Path(out), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    http = {"retries": retries, "backoff": backoff, "timeout": timeout}
    get = {**http, "progress": progress}
    if full_file:
        prefix = f"{region}/RNAseq/SEAAD_{region}_RNAseq_final-nuclei."
        objects = list_bucket(base_url, prefix, **http)
        wanted = [o for o in objects if o["key"] == f"{prefix}{release}.h5ad"]
        if not wanted:
            raise UserError(
                f"no SEA-AD {region} file for release {release} at {base_url}; "
                f"releases found: {_shortlist(_releases(objects))}; fix seaad.release"
            )
        return link_or_copy(_fetch_object(base_url, wanted[0], cache_dir, **get), out)
    prefix = f"{region}/RNAseq/donors_objects/"
    objects = list_bucket(base_url, prefix, **http)
    by_donor = donor_objects(objects, region, release)
    if not by_donor:
        raise UserError(
            f"no SEA-AD per-donor {region} objects for release {release} under "
            f"{base_url}/{prefix}; releases found: {_shortlist(_releases(objects))}; "
            "fix seaad.release or seaad.region, or set seaad.full_file: true"
        )
    levels = read_donor_metadata(donor_metadata, cache_dir, **get) if donor_metadata else None
    chosen = choose_donors(
        sorted(by_donor), donors=donors, n_donors=n_donors, levels=levels, seed=seed
    )
    log.info("SEA-AD donors: %s", ", ".join(chosen))
    paths = [_fetch_object(base_url, by_donor[d], cache_dir, **get) for d in chosen]
    return concat_h5ad(paths, out)
