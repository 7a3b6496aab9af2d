"""Which error detectors run, and :func:`classify`: the built-in rules, then the detectors.

Apart from :mod:`.classification` so that the rules do not import the plugins that refine
them (the built-in detector in :mod:`.plugins.builtin` imports the rules' types).
Detectors registered in the entry-point group ``orchestrator.error_detectors`` are loaded
once per process, after the built-in one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points

from core.engine.resilience.classification import (
    Classification,
    DetectorLike,
    FailureEvidence,
    NamedDetector,
    classify_evidence,
    refine,
)
from core.engine.resilience.plugins.builtin import BUILTIN_DETECTOR

logger = logging.getLogger(__name__)

#: Entry-point group through which packages register error detectors.
ENTRY_POINT_GROUP = "orchestrator.error_detectors"


def classify(
    evidence: FailureEvidence, detectors: Sequence[DetectorLike] | None = None
) -> Classification:
    """Classify an attempt: built-in rules, then the detectors.

    ``detectors=None`` uses :func:`default_detectors` (the built-in detector plus every
    installed entry point, loaded once); pass an explicit sequence (even empty) in tests.
    """
    if detectors is None:
        detectors = default_detectors()
    return refine(evidence, classify_evidence(evidence), detectors)


EntryPointSource = Callable[[str], Iterable[EntryPoint]]


def _installed(group: str) -> Iterable[EntryPoint]:
    return entry_points(group=group)


def load_detectors(
    group: str = ENTRY_POINT_GROUP, *, source: EntryPointSource = _installed
) -> tuple[NamedDetector, ...]:
    """Load the detectors registered in ``group``, sorted by name for a stable order.

    An entry point may name a callable or a class (instantiated without arguments). Ones
    that fail to load or are not callable are logged and skipped.
    """
    loaded: list[NamedDetector] = []
    for ep in sorted(source(group), key=lambda e: e.name):
        try:
            obj = ep.load()
            if isinstance(obj, type):
                obj = obj()
        except Exception:
            logger.warning(
                "error detector %s (%s) failed to load",
                ep.name,
                ep.value,
                exc_info=True,
            )
            continue
        if not callable(obj):
            logger.warning("error detector %s (%s) is not callable; skipped", ep.name, ep.value)
            continue
        loaded.append(NamedDetector(ep.name, obj))
    return tuple(loaded)


@functools.cache
def default_detectors() -> tuple[NamedDetector, ...]:
    """The built-in detector first, then the installed ones (loaded once per process).

    The built-in one is not loaded twice if the distribution also registers it.
    """
    installed = (d for d in load_detectors() if d.detect is not BUILTIN_DETECTOR.detect)
    return (BUILTIN_DETECTOR, *installed)
