"""The alarm ``reveal`` raises: which concepts are tied to a label or a source beyond chance, and
the one plain sentence that says so (report and CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxr_audit.reveal.records import ConceptRecord

SOURCE_LINK_MIN_V = 0.3  # a moderate association (Cohen, 1988) on top of significance


def flag_alarms(concepts: list[ConceptRecord], z_level: float, alpha: float = 0.05) -> int:
    """Set ``alarm``, ``label_linked`` and ``source_linked`` on each concept record; returns the
    number of source tests.

    A concept alarms when its relevance lies mostly outside the lungs (or no lung masks exist)
    and either its split of the class is bimodal beyond ``z_level`` *and* tied to the label (it is
    on less often in the other classes: chi-square p below the Bonferroni level; untestable with
    one class), or its members are tied to a source within the class (chi-square p below the
    Bonferroni level over the concepts that could be tested, and Cramér's V >= 0.3): a hospital's
    tag or marker shows as the second. The label condition keeps anatomy's own bimodal variation,
    present in every class alike, from alarming (a clean phantom control did, z 3.7)."""
    n_tests = sum(c.source_p_value is not None for c in concepts)
    n_label_tests = max(1, sum(c.label_p_value is not None for c in concepts))
    for c in concepts:
        p = c.source_p_value
        c.source_linked = bool(p is not None and p < alpha / n_tests and c.source_cramers_v >= SOURCE_LINK_MIN_V)
        c.label_linked = bool(c.label_p_value is None or c.label_p_value < alpha / n_label_tests)
        bimodal = c.bimodality_z > z_level and c.label_linked
        outside = 1.0 if c.outside_lungs is None else c.outside_lungs
        c.alarm = bool((bimodal or c.source_linked) and outside > 0.5)
    return n_tests


def alarm_sentence(result: dict) -> str:
    """One plain sentence on whether and why ``reveal`` raised an alarm (report and CLI)."""
    alarm, concepts = result["alarm"], result["concepts"]
    if not alarm["raised"]:
        return (f"No alarm: no concept with its relevance mostly outside the lungs splits a class beyond the "
                f"Bonferroni 5 % level (bimodality z > {alarm['z_level']:.2f} over {alarm['tests']} tests) or is "
                f"tied to a source within a class ({alarm.get('source_tests', 0)} source tests).")
    split = [str(c["id"]) for c in concepts if c["alarm"] and c["bimodality_z"] > alarm["z_level"]]
    linked = [str(c["id"]) for c in concepts if c["alarm"] and c.get("source_linked")]
    reasons = []
    if split:
        reasons.append(f"concept(s) {', '.join(split)} split a class into two groups far beyond what one skewed "
                       f"group gives (bimodality z > {alarm['z_level']:.2f}, Bonferroni 5 % over {alarm['tests']} tests)")
    if linked:
        reasons.append(f"concept(s) {', '.join(linked)} are on for one source's images and off for another's within "
                       f"the same class (chi-square, Bonferroni 5 % over {alarm['source_tests']} tests, Cramér's V >= "
                       f"{SOURCE_LINK_MIN_V}): a site marker")
    return "Alarm: " + "; ".join(reasons) + "."
