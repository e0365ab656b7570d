"""The rule that picks a strength (λ, or DFR's C) from a sweep's rows, shared by every method."""

from __future__ import annotations

#: how much balanced accuracy on the artifact-free validation samples a chosen strength may lose
CLEAN_BOUND = 0.03


def choose(sweep: list[dict], bounded_only: bool = True) -> float:
    """The λ of :func:`choose_run`."""
    return choose_run(sweep, bounded_only)["lambda"]


def choose_run(sweep: list[dict], bounded_only: bool = True) -> dict:
    """Best objective among the runs whose balanced accuracy on the artifact-free validation
    samples stays within :data:`CLEAN_BOUND` (3 points) of the start (bounded clean loss); all
    runs if none does; ties go to the smaller λ, then to the earlier restart. Accuracy, not
    cross-entropy: a penalty that makes the model less confident raises the loss of samples it
    still classifies right."""
    def within(row: dict) -> bool:
        return row["clean_val_accuracy"] >= row["start_clean_val_accuracy"] - CLEAN_BOUND

    bounded = [r for r in sweep if within(r)] if bounded_only else []
    bounded = bounded or sweep
    return max(bounded, key=lambda r: (round(r["objective"], 6), -r["lambda"], -r.get("seed", 0)))
