"""How label images store classes, and decoding them to class ids (pure NumPy).

* ``indices``: the pixel value is the class id.
* ``binary``: a mask stored as 0 / 255 (or 0 / 1): 0 -> class 0, 255 or 1 -> class 1.
* ``palette``: RGB colours, one per class (e.g. the Dubai aerial masks); colours declared
  as ignore are not counted; any other colour is an error that lists the colours found.

Decoding returns class ids and a mask of pixels to ignore, so that ignoring never needs a
sentinel class id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

EncodingKind = Literal["indices", "binary", "palette"]
Colour = tuple[int, int, int]


class EncodingError(ValueError):
    """Label values the declared encoding does not know."""


@dataclass(frozen=True)
class LabelEncoding:
    kind: EncodingKind = "indices"
    palette: tuple[Colour, ...] = ()  # colour of class k at position k
    ignore_colours: tuple[Colour, ...] = ()

    @property
    def channels(self) -> int:
        """Channels a label image of this encoding has."""
        return 3 if self.kind == "palette" else 1

    @property
    def num_classes(self) -> int | None:
        if self.kind == "palette":
            return len(self.palette)
        return 2 if self.kind == "binary" else None


def parse_colour(text: str | list | tuple) -> Colour:
    """``"#8429F6"`` or ``[132, 41, 246]`` -> ``(132, 41, 246)``."""
    if isinstance(text, str):
        value = text.strip().lstrip("#")
        if len(value) != 6 or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise ValueError(f"expected a colour like '#8429F6' or [132, 41, 246], got {text!r}")
        return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))
    if len(text) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in text):
        return (int(text[0]), int(text[1]), int(text[2]))
    raise ValueError(f"expected a colour like '#8429F6' or [132, 41, 246], got {text!r}")


def colour_hex(colour: Colour) -> str:
    return "#{:02X}{:02X}{:02X}".format(*colour)


def decode(labels: np.ndarray, encoding: LabelEncoding) -> tuple[np.ndarray, np.ndarray | None]:
    """Class ids (int64) and an ignore mask (or None) of a label block.

    ``labels`` is channel-first ``(C, *spatial)`` for palette encoding and spatial-only
    otherwise.
    """
    if encoding.kind == "indices":
        return labels.astype(np.int64, copy=False), None
    if encoding.kind == "binary":
        values = np.unique(labels)
        bad = values[~np.isin(values, (0, 1, 255))]
        if bad.size:
            raise EncodingError(
                f"binary mask holds values {', '.join(map(str, bad[:10]))}; expected 0 and 255 (or 1)"
            )
        return (labels != 0).astype(np.int64), None
    return _decode_palette(labels, encoding)


def _decode_palette(rgb: np.ndarray, encoding: LabelEncoding) -> tuple[np.ndarray, np.ndarray | None]:
    if rgb.shape[0] not in (3, 4):
        raise EncodingError(f"palette-encoded labels need 3 colour channels, got {rgb.shape[0]}")
    keys = _pack(rgb[:3])
    palette = np.array([_pack_one(c) for c in encoding.palette], dtype=np.int64)
    ignore = np.array([_pack_one(c) for c in encoding.ignore_colours], dtype=np.int64)
    order = np.argsort(palette)
    sorted_palette = palette[order]
    pos = np.clip(np.searchsorted(sorted_palette, keys), 0, len(palette) - 1)
    known = sorted_palette[pos] == keys
    ignored = np.isin(keys, ignore) if ignore.size else np.zeros(keys.shape, bool)
    unknown = ~known & ~ignored
    if unknown.any():
        values, counts = np.unique(keys[unknown], return_counts=True)
        listed = ", ".join(
            f"{colour_hex(_unpack(v))} ({n} px)" for v, n in zip(values[:10], counts[:10])
        )
        more = f" and {len(values) - 10} more" if len(values) > 10 else ""
        raise EncodingError(
            f"labels hold colours not in the palette: {listed}{more}; add them to the classes "
            f"or to ignore_colours"
        )
    ids = np.where(known, order[pos], 0).astype(np.int64)
    return ids, (ignored if ignored.any() else None)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def _pack_one(c: Colour) -> int:
    return (c[0] << 16) | (c[1] << 8) | c[2]


def _unpack(v: int) -> Colour:
    return ((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255)
