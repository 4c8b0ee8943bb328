"""A coordinate reference system as WKT, the way rioxarray and GDAL state it.

A GeoTIFF names its CRS by an EPSG code (its GeoKeys); readers of xarray data
(rioxarray's ``spatial_ref`` coordinate, CF's ``crs_wkt``) expect the CRS as WKT, which
takes the EPSG database: pyproj's.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=32)
def crs_wkt(crs: str | None) -> str | None:
    """WKT2 of ``crs`` (``EPSG:n`` or any form pyproj reads), None when unknown or unreadable."""
    if not crs:
        return None
    try:
        from pyproj import CRS
        from pyproj.exceptions import CRSError
    except ImportError:
        return None
    try:
        return str(CRS.from_user_input(crs).to_wkt())
    except CRSError:
        return None
