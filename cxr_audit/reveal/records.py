"""What ``reveal`` finds, as typed records: a candidate concept (:class:`ConceptRecord`) and a sample
cluster (:class:`ClusterRecord`), each written to ``reveal.json`` by ``to_json()``.

Samples are *manifest ids* here, the ids every command shares; the scan-row positions the
analysis works on stay in :class:`~cxr_audit.reveal.concepts.ConceptFinding` (``member_rows``).
Every key is always present in ``reveal.json`` (``null`` where a step did not run: no lung masks,
no CAV fitted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

from cxr_audit.reveal.concepts import ConceptFinding, ConceptStatistics


@dataclass
class ConceptRecord(ConceptStatistics):
    """One candidate concept: the statistics of its :class:`ConceptFinding` (``suspicion`` times
    ``outside_lungs`` when lung masks exist; before: ``suspicion_before_location``), its members as
    manifest ids, per-sample scores and what the later steps of ``reveal`` decide about it."""

    members: list[int] = field(default_factory=list)  # manifest ids above the split
    scores: dict[str, list[float]] = field(default_factory=dict)  # "activation_max", "cav": one per scanned row
    outside_lungs: float | None = None  # share of conditional relevance outside the lung masks
    suspicion_before_location: float | None = None
    cav_layer: str | None = None  # where scores["cav"] was fitted
    label_linked: bool = False
    source_linked: bool = False
    alarm: bool = False
    rank_score: float = 0.0
    id: int = -1  # rank in reveal.json, alarmed concepts first

    @classmethod
    def from_finding(cls, finding: ConceptFinding, row_ids: np.ndarray, activation_max: list[float]) -> ConceptRecord:
        """The record of ``finding``; ``row_ids[r]`` is the manifest id of scan row ``r``."""
        shared = {f.name: getattr(finding, f.name) for f in fields(ConceptStatistics)}
        return cls(**shared, members=[int(row_ids[r]) for r in finding.member_rows],
                   scores={"activation_max": activation_max})

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ClusterRecord:
    """One SpRAy cluster of one explained class in one feature space (``heatmap``,
    ``relevance:<layer>``, ``activation:<layer>``)."""

    space: str
    class_index: int
    size: int
    share_of_class: float
    distinctness: float  # half the L1 distance of the mean normalised profiles, in [0, 1]
    suspicion: float  # distinctness x 4 p (1 - p), p = share_of_class
    members: list[int]  # manifest ids
    k_of_class: int  # clusters SpRAy found in the class
    clustering: str
    id: int = -1  # rank by suspicion over every space and class

    def to_json(self) -> dict:
        return asdict(self)
