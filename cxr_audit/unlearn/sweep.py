"""Choosing the penalty strength λ and the restart: one run per (λ, seed) from the same start,
judged on the validation objective (:mod:`cxr_audit.unlearn.validation`) at bounded clean accuracy.

Each candidate is as long as the final run (short runs favour small λ: a strong penalty first
disrupts the model, then recovers); only a diverging run (non-finite loss) is a result of the
sweep, any other exception is a failure of it, and a sweep in which every run diverged fails.
Restarts (the same λ, other seeds: data order, and what the method draws, e.g. `augment`'s
pastes) are there because one short fine-tune is a noisy draw: measured, three `augment` runs of
one model differed by 7.5 points of clean test accuracy, and the validation objective ranked
them as the test did (docs/unlearn.md).
"""

from __future__ import annotations

import copy

from cxr_audit.runtime import prefixed
from cxr_audit.training.engine import DivergedError, fit
from cxr_audit.unlearn import get_mitigation
from cxr_audit.unlearn.choice import choose_run
from cxr_audit.unlearn.validation import Validation


def sweep_runs(net, start_state, train_set, prep, dev, method, options, candidates: list[tuple[float, int]], epochs,
               validation: Validation, run, patience, on_progress,
               per_epoch: bool = True) -> tuple[list[dict], dict[tuple[float, int], dict]]:
    """One run per ``(λ, seed)`` of ``candidates`` from the same start: ``(rows for the record,
    {(λ, seed): {state, history, ...}})``. ``per_epoch``: each run keeps its best epoch on the
    validation objective (a λ sweep: a strong penalty may first disrupt the model); otherwise each
    run is judged by its final weights (restarts of one procedure: measured, picking among 3 epochs
    × 3 restarts on 6 artifact-free images of one class kept an epoch-1 model at clean test 0.66
    where the final ones reached 0.85, and it is one try per run that the chance test counts).

    Only the runs :func:`choose_run` could still pick are kept (the best bounded one and the best
    overall), so memory holds at most two extra copies of the weights, not one per run."""
    rows, models = [], {}
    base_loss, base_acc = validation.clean(net)
    several_lambdas, restarts = len({lam for lam, _ in candidates}) > 1, len({seed for _, seed in candidates}) > 1
    for lam, seed in candidates:
        net.load_state_dict(start_state)
        mitigation = get_mitigation(method, **{**options, "seed": seed})
        row = {"lambda": lam, "seed": seed, "start_clean_val_accuracy": base_acc, "start_clean_val_loss": base_loss}
        label = " ".join([f"λ={lam:g}"] * several_lambdas + [f"seed {seed}"] * restarts) or f"λ={lam:g}"
        try:
            result = fit(net, train_set, prep, dev, mitigation=mitigation, lambda_=lam, epochs=epochs,
                         val_score=validation.score if per_epoch else None, patience=patience,
                         on_progress=prefixed(on_progress, label),
                         **{**run, "seed": seed})
            extra = mitigation.finish(net)
            logits, inserted = validation.logits(net)
            loss, acc = validation.clean_logits(logits)
            rows.append({**row, "objective": validation.score_logits(logits, inserted), "clean_val_accuracy": acc,
                         "clean_val_loss": loss, "best_epoch": result.best_epoch})
            models[lam, seed] = {"state": copy.deepcopy(net.state_dict()), "history": result.history,
                                 "seconds_per_step": result.seconds_per_step, "extra": extra,
                                 "summary": mitigation.summary()}
        except DivergedError as exc:  # a λ that diverges is a result of the sweep, not a failure of it
            _remove_hooks(mitigation, net)
            rows.append({**row, "objective": float("-inf"), "clean_val_accuracy": 0.0, "clean_val_loss": float("inf"),
                         "error": str(exc).splitlines()[0]})
            models[lam, seed] = {"state": start_state, "history": [], "seconds_per_step": 0.0, "extra": {},
                                 "summary": {}}
        keep = {_key(choose_run(rows)), _key(choose_run(rows, bounded_only=False))}
        models = {key: m for key, m in models.items() if key in keep}
    if all("error" in r for r in rows):
        grid = sorted({lam for lam, _ in candidates})
        raise DivergedError(f"every run of the sweep (λ {', '.join(f'{g:g}' for g in grid)}) diverged, the first "
                            f"with: {rows[0]['error']}; nothing was written — pass smaller --lambdas or a lower --lr")
    return rows, models


def _key(row: dict) -> tuple[float, int]:
    return row["lambda"], row["seed"]


def _remove_hooks(mitigation, net) -> None:
    try:
        mitigation.finish(net)
    except AttributeError:  # failed before prepare() installed anything
        pass
