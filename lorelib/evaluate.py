"""The one evaluation path: every method (a Run: a Method with its settings) is fit on the seen users' training
pairs, personalizes the unseen users from their few-shot pairs, and is scored with every registered metric
(metrics.py; choice quality, choice.py, where the data have candidates) on the four pair sets, per user.
A method family with several runs (LoRe's K and alpha, a swept baseline setting) is chosen on held-out pairs of
the seen users' training data (choose), never on test pairs.

    runs = [Run("vpl", "vpl", "VPL", lambda: VPL(F, seed=0))]
    results = evaluate(runs, data.features, seed=0)
    results[0].users["unseen_test"]["accuracy"]     # [C] per-user accuracy

Imports: config, data, metrics.
"""
import dataclasses
import time

import numpy as np
import torch

from .config import InputError, note_finished, set_seed
from .data import RESULT_NAMES, as_pairs
from .metrics import HEADLINE, pair_metrics


@dataclasses.dataclass
class Run:
    """One row of a results table: a method with its settings. entry: its key in the results JSON (e.g. "vpl",
    "pal_K5", "pal_tuned", "lore_alpha0_K5"); name: its registry name; label: its table name; make(): a fresh,
    unfitted Method (built after set_seed); family: the rows one summary line chooses among (default: label);
    sweep: the setting values that tell the rows of a family apart ({"K": 5}); row: "released" (the method's
    released settings), "tuned" (settings chosen on held-out training pairs) or "ours" (LoRe); settings: every
    setting as run (for the JSON); info: more JSON fields (e.g. how a tuned row was chosen)."""
    entry: str
    name: str
    label: str
    make: object
    family: str = None
    sweep: dict = dataclasses.field(default_factory=dict)
    row: str = "released"
    settings: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.family = self.family or self.label

    def fields(self):
        """What the results JSON says of this run: label, method (its family), settings, sweep, info."""
        return {"label": self.label, "method": self.family, "settings": self.settings,
                **({"sweep": self.sweep} if self.sweep else {}), **self.info}


@dataclasses.dataclass
class MethodResult:
    """What evaluate measured of one run: users {pair set: {metric: [C] per-user values}}, choice {"seen",
    "unseen": {metric: {"mean", "std", "users"}}} (choice quality, or None), seconds (fit, personalize, scoring),
    model (LoRe: {"V", "W", "W_unseen"}, for the model files), validation and chosen (set by choose)."""
    run: Run
    users: dict
    seconds: float
    choice: dict | None = None
    model: dict | None = None
    validation: float | None = None
    chosen: bool | None = None
    choice_users: dict | None = None  # choice quality per user: {"seen", "unseen": {metric: [C]}}

    def mean(self, pair_set, metric=HEADLINE):
        return float(np.mean(self.users[pair_set][metric]))

    def std(self, pair_set, metric=HEADLINE):
        return float(np.std(self.users[pair_set][metric]))


def evaluate(runs, features, device=None, *, seed=0, record=None, choice=None, log=print):
    """Fit, personalize and score every run -> [MethodResult] in the order of `runs`.

    features: the four pair sets (seen train, seen test, unseen few-shot, unseen test; data.RESULT_NAMES) as Pairs
    or lists of per-user tensors. Each run starts from set_seed(seed). choice: a choice.ChoiceRun (choice quality
    of every run, seen users with their fit, unseen users with their few-shot state), or None."""
    sets = [as_pairs(x) for x in features]
    train, train_u = sets[0], sets[2]
    out = []
    for run in runs:
        set_seed(seed)
        t0 = time.time()
        model = run.make()
        model.fit(train, device)
        state = model.personalize(train_u, device)
        users = {name: pair_metrics(model.margins(p, s, device), p)
                 for name, p, s in zip(RESULT_NAMES, sets, (None, None, state, state))}
        result = MethodResult(run, users, time.time() - t0)
        result.model = model.saved(state)
        note_finished(record, run.label)
        log(f"{run.label}: " + ", ".join(f"{n} {result.mean(n):.4f}" for n in RESULT_NAMES)
            + f"  [{result.seconds:.1f}s]")
        if choice is not None:
            result.choice = choice.measure(run.entry, model, state)
        out.append(result)
    if choice is not None:
        choice.finish(out)
    return out


def holdout_pairs(pairs, fraction, seed=0, groups=None):
    """(fit, held_out): Pairs of the same users splitting `pairs`. A user with m >= 2 pairs holds out
    min(m - 1, max(1, round(fraction * m))) of them (drawn with np.random.RandomState(seed)); one with a single
    pair keeps it for the fit (its held-out accuracy is NaN: use np.nanmean). groups [M] (e.g. PRISM's dialog of
    each pair): the same count of each user's groups is held out, whole, so that no held-out pair shares a group
    (a dialog's chosen reply) with a fitted one."""
    pairs = as_pairs(pairs)
    rng = np.random.RandomState(seed)
    held = [torch.zeros(0, dtype=torch.long)]
    for rows in pairs.rows_by_user():
        units = list(rows.split(1)) if groups is None else [
            rows[g == u] for g in [torch.as_tensor(groups)[rows]] for u in torch.unique(g)]
        k = min(len(units) - 1, max(1, round(fraction * len(units)))) if len(units) >= 2 else 0
        picked = [units[i] for i in rng.choice(len(units), k, replace=False)]
        held.append(torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long))
    out = torch.zeros(len(pairs.user), dtype=torch.bool)
    out[torch.cat(held)] = True
    return pairs.select(torch.nonzero(~out).flatten()), pairs.select(torch.nonzero(out).flatten())


def held_out_score(make, fit, held, seed=0, device=None):
    """Mean over users of the held-out accuracy (users without a held-out pair left out) of make() fit on `fit`,
    from set_seed(seed)."""
    set_seed(seed)
    return float(np.nanmean(make().fit(fit, device).accuracies(held, None, device)))


def choose(results, train, validation_fraction=0.1, *, seed=0, device=None, groups=None, log=print):
    """In every family of several swept runs (those with a `sweep`), mark the run of best mean accuracy on
    held-out pairs of the seen users' training data (validation_fraction of each user's, holdout_pairs, whole
    groups with `groups`; the first on a tie) `chosen`, and record each run's held-out score as `validation`.
    Nothing when validation_fraction = 0.
    -> {family: the chosen MethodResult}."""
    if not 0 <= validation_fraction < 1:
        raise InputError(f"validation_fraction={validation_fraction}: must be in [0, 1)")
    families = {}
    for r in results:
        if r.run.sweep:
            families.setdefault(r.run.family, []).append(r)
    families = {f: group for f, group in families.items() if len(group) > 1}
    if not families or validation_fraction == 0:
        return {}
    fit, held = holdout_pairs(train, validation_fraction, seed, groups)
    chosen = {}
    for family, group in families.items():
        for r in group:
            r.validation = held_out_score(r.run.make, fit, held, seed, device)
            log(f"model choice: {r.run.label}: held-out seen-user training pairs {r.validation:.4f}")
        best = max(group, key=lambda r: r.validation)  # the first on a tie
        for r in group:
            r.chosen = r is best
        chosen[family] = best
    return chosen
