"""Choosing the penalty strength λ: one run per λ from the same start, judged on the validation
objective (:mod:`cxr_audit.unlearn.validation`) at bounded clean accuracy.

Each candidate is as long as the final run (short runs favour small λ: a strong penalty first
disrupts the model, then recovers); only a diverging run (non-finite loss) is a result of the
sweep, any other exception is a failure of it, and a sweep in which every λ diverged fails.
"""

from __future__ import annotations

import copy

from cxr_audit.runtime import prefixed
from cxr_audit.training.engine import DivergedError, fit
from cxr_audit.unlearn import get_mitigation
from cxr_audit.unlearn.choice import choose
from cxr_audit.unlearn.validation import Validation


def sweep_lambdas(net, start_state, train_set, prep, dev, method, options, grid, epochs, validation: Validation,
                  run, patience, on_progress) -> tuple[list[dict], dict[float, dict]]:
    """One run per λ from the same start: ``(rows for the record, {λ: {state, history, ...}})``.

    Only the runs :func:`choose` could still pick are kept (the best bounded one and the best
    overall), so memory holds at most two extra copies of the weights, not one per λ."""
    rows, models = [], {}
    base_loss, base_acc = validation.clean(net)
    for lam in grid:
        net.load_state_dict(start_state)
        mitigation = get_mitigation(method, **options)
        try:
            result = fit(net, train_set, prep, dev, mitigation=mitigation, lambda_=lam, epochs=epochs,
                         val_score=validation.score, patience=patience, on_progress=prefixed(on_progress, f"λ={lam:g}"),
                         **run)
            extra = mitigation.finish(net)
            loss, acc = validation.clean(net)
            rows.append({"lambda": lam, "objective": validation.score(net), "clean_val_accuracy": acc,
                         "start_clean_val_accuracy": base_acc, "clean_val_loss": loss, "start_clean_val_loss": base_loss,
                         "best_epoch": result.best_epoch})
            models[lam] = {"state": copy.deepcopy(net.state_dict()), "history": result.history,
                           "seconds_per_step": result.seconds_per_step, "extra": extra}
        except DivergedError as exc:  # a λ that diverges is a result of the sweep, not a failure of it
            _remove_hooks(mitigation, net)
            rows.append({"lambda": lam, "objective": float("-inf"), "clean_val_accuracy": 0.0,
                         "start_clean_val_accuracy": base_acc, "clean_val_loss": float("inf"),
                         "start_clean_val_loss": base_loss, "error": str(exc).splitlines()[0]})
            models[lam] = {"state": start_state, "history": [], "seconds_per_step": 0.0, "extra": {}}
        keep = {choose(rows), choose(rows, bounded_only=False)}
        models = {lam_: m for lam_, m in models.items() if lam_ in keep}
    if all("error" in r for r in rows):
        raise DivergedError(f"every λ of the sweep ({', '.join(f'{g:g}' for g in grid)}) diverged, the first with: "
                            f"{rows[0]['error']}; nothing was written — pass smaller --lambdas or a lower --lr")
    return rows, models


def _remove_hooks(mitigation, net) -> None:
    try:
        mitigation.finish(net)
    except AttributeError:  # failed before prepare() installed anything
        pass
