"""Instance segmentation of cells: backends by name, and their evaluation.

Backends (``segment.method`` of the configuration):

* ``learned`` (:func:`metascreen.segment.learned.segment_learned`): a compact U-Net
  trained on a varied synthetic world of brightfield, phase-contrast and DIC fields,
  shipped with the package; scale-aware (``cell_diameter``).
* ``label_free`` (:func:`metascreen.segment.classical.segment_label_free`): local
  texture and a marker-controlled watershed, tuned on the demo plate's look.
* ``nuclei`` (:func:`metascreen.segment.classical.segment_nuclei`): fluorescent nuclei.

:func:`match_instances` scores a segmentation against ground truth with the
StarDist/Cellpose average precision ``AP = TP / (TP + FP + FN)``; :func:`error_types`
says how the cells it misses were lost (merged, split, missed, wrong shape).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from metascreen.segment.classical import segment_label_free, segment_nuclei
from metascreen.segment.metrics import error_types, match_instances, pooled_ap

__all__ = [
    "DEFAULT_METHOD",
    "SEGMENTERS",
    "Segmenter",
    "error_types",
    "match_instances",
    "pooled_ap",
    "segment",
    "segment_label_free",
    "segment_nuclei",
]


@dataclass(frozen=True)
class Segmenter:
    """A segmentation backend: ``function(image, **parameters) -> int32 labels``.

    ``function`` is a callable or the ``"module:name"`` of one, imported on first use
    (the learned backend imports torch, which per-well jobs of other backends skip).
    """

    name: str
    target: Callable[..., np.ndarray] | str
    description: str

    @property
    def function(self) -> Callable[..., np.ndarray]:
        """The backend's function."""
        if callable(self.target):
            return self.target
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword parameters of the backend with their defaults (documented in its docstring)."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.function).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }


#: Segmentation backends by name (the ``segment.method`` of the configuration).
SEGMENTERS: dict[str, Segmenter] = {
    "learned": Segmenter(
        "learned",
        "metascreen.segment.learned:segment_learned",
        "unlabelled cells in brightfield / phase contrast / DIC, U-Net trained on a varied synthetic world",
    ),
    "label_free": Segmenter(
        "label_free",
        segment_label_free,
        "unlabelled cells in brightfield / phase contrast, from local texture",
    ),
    "nuclei": Segmenter(
        "nuclei", segment_nuclei, "fluorescent nuclei: LoG seeds, watershed, per-nucleus half-maximum edges"
    ),
}

#: The backend used when the configuration names none: the learned one, the only one that
#: finds cells on every synthetic style (``label_free`` finds almost none off the demo's look).
DEFAULT_METHOD = "learned"


def segment(image: np.ndarray, method: str = DEFAULT_METHOD, **parameters: Any) -> np.ndarray:
    """Segment ``image`` with the backend ``method`` of :data:`SEGMENTERS`.

    ``parameters`` are the backend's keyword parameters (see its docstring and
    ``SEGMENTERS[method].defaults``); an unknown method or parameter is a ValueError.
    """
    if method not in SEGMENTERS:
        raise ValueError(f"unknown segmentation method {method!r}; available: {sorted(SEGMENTERS)}")
    backend = SEGMENTERS[method]
    unknown = sorted(set(parameters) - set(backend.defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for segmentation method {method!r}")
    return backend.function(image, **parameters)
