"""The fetch stage: put one dataset's raw h5ad at `out`, whatever its source."""

from pathlib import Path

from ..errors import UserError
from ..outputs import named_paths
from .download import link_or_copy
from .h5ad_stream import open_h5ad
from .rosmap import fetch_rosmap
from .seaad import fetch_seaad

SOURCES = ("demo", "seaad", "rosmap", "local")


def _section(cfg: dict, name: str, keys: tuple[str, ...]) -> dict:
    """The settings `keys` of config section `name`, or a UserError naming the first missing."""
    section = cfg.get(name) or {}
    for key in keys:
        if key not in section:
            raise UserError(f"config lacks {name}.{key}; add it (see config/config.yaml)")
    return {key: section[key] for key in keys}


def check_h5ad(path: Path) -> None:
    """Raise UserError unless `path` is a readable h5ad with obs, var and X."""
    with open_h5ad(path) as handle:
        if "X" not in handle:
            raise UserError(f"{path} is not an h5ad file: it has no X matrix")


def fetch_local(path: str | Path, out: Path) -> Path:
    """Check a local h5ad and place it at `out` (hard link when possible)."""
    if not path:
        raise UserError("source 'local' needs local.path: the h5ad file to use")
    check_h5ad(Path(path))
    return link_or_copy(path, out)


def fetch(source: str, cfg: dict, out: Path, cache_dir: str | Path | None = None) -> Path:
    """Write the raw data of `source` (demo, seaad, rosmap or local) as an h5ad at `out`.

    Downloads are kept in `cache_dir` (default: the config's `download.cache_dir`), outside
    the results, so deleting results does not delete them.
    """
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source == "demo":
        from .demo import write_demo_seaad

        return write_demo_seaad(
            out, **_section(cfg, "demo", ("n_cells", "n_genes", "n_donors", "seed"))
        )
    if source == "local":
        return fetch_local(_section(cfg, "local", ("path",))["path"], out)
    if cache_dir is None:
        cache_dir = _section(cfg, "download", ("cache_dir",))["cache_dir"]
    cache_dir = Path(cache_dir)
    if source == "rosmap":
        return fetch_rosmap(
            out, **_section(cfg, "rosmap", ("path", "synapse")), cache_dir=cache_dir
        )
    keys = (
        "base_url",
        "release",
        "region",
        "donors",
        "n_donors",
        "donor_metadata",
        "full_file",
        "seed",
    )
    http = _section(cfg, "download", ("retries", "backoff_seconds", "timeout_seconds"))
    return fetch_seaad(
        out,
        **_section(cfg, "seaad", keys),
        cache_dir=cache_dir,
        retries=http["retries"],
        backoff=http["backoff_seconds"],
        timeout=http["timeout_seconds"],
    )


def run(inputs, outputs, settings: dict, *, source: str, cache_dir=None) -> Path:
    """The fetch stage: `fetch` the raw data of `source` with the dataset's config
    `settings` to `outputs` (a folder, or named outputs with `h5ad`); it reads no `inputs`
    (a source's files come from its config section)."""
    out = named_paths(outputs, {"h5ad": "data.h5ad"})["h5ad"]
    return fetch(source, settings, out, cache_dir)
