"""The other methods of the paper's tables, on the same frozen embeddings as LoRe: per-user Bradley-Terry
rewards (bt.PerUserBT, the published `learn_multiple`), VPL (vpl.py) and PAL (pal.py).

    from lorelib import baselines
    model = baselines.make_baseline("vpl", num_features=F).fit(data.seen_train)
    state = model.personalize(data.unseen_fewshot)
    model.accuracies(data.unseen_test, state)       # [C] per-user accuracy, as for LoRe

Every baseline class takes (num_features, seed=..., **settings), carries its table `label` and the range
`rules` of its settings (their defaults, the published values, live in its signature), fits on the seen
users' pairs (`fit`), personalises new users from their few-shot pairs (`personalize`: returns their state,
leaves the fitted model unchanged) and scores pairs (`margins`: reward(chosen) - reward(rejected));
`accuracies` is, per user, the fraction of pairs with a positive margin (a tie is wrong). BASELINES maps a
script's name of each to its class: adding a baseline is one class (a module of its own) and one entry there.
run_baselines / run_baselines_vary_shots run them beside pipelines.fit_ranks / vary_shots on the same users,
pairs, few-shot examples and seed. Optional: no module below imports this one (nor utils.py).

Each baseline can also run a second, "tuned" row (entry "<name>_tuned"): its settings with the training budget of
`tuned_settings[name]` (the scripts store each dataset's choice) or, with `tune_grid[name]`, the point of a grid
chosen on held-out pairs of the seen users' training data (tuning.tune; never the test pairs).

Imports: config, data, bt, pipelines, vpl, pal, tuning.
"""
import inspect
import time

import numpy as np
import torch

from .bt import PerUserBT
from .config import InputError, check_values, note_finished, set_seed
from .data import RESULT_NAMES, accuracy_stats, as_pairs
from .pal import PAL
from .pipelines import check_users, holdout_pairs, shot_units, stack_trials
from .tuning import grid_points, tune
from .vpl import VPL

BASELINES = {"per_user_bt": PerUserBT, "vpl": VPL, "pal": PAL}  # a script's name -> class
# the settings that set each baseline's training budget, swept jointly for its tuned row (a script's tune=True)
TUNE_GRID = {"pal": {"num_epochs": [1, 2], "user_learning_rate,fewshot_learning_rate": [5e-3, 5e-2, 0.5],
                     "K": [2, 5], "bias_decay": [True, False]},
             "vpl": {"num_duplicates": [1, 2], "context_length": ["fixed", "2..C"]}}


def _check_names(names):
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)} (baselines=[] skips them)")


def full_settings(name, overrides=None):
    """{setting: value} that baseline `name` runs with: the defaults of its class (the published values) with
    `overrides` ({setting: value}) applied. One setting may be a list of values, a sweep (e.g. PAL's K = [2, 5,
    10]): each value is a run of its own. InputError for an unknown name or setting, or a value out of range."""
    _check_names([name])
    cls = BASELINES[name]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cls.rules))
    if unknown:
        raise InputError(f"baseline_settings[{name!r}]: {unknown} are no {cls.__name__} setting; it has "
                         f"{sorted(cls.rules)}")
    swept = [k for k, v in overrides.items() if isinstance(v, (list, tuple))]
    if len(swept) > 1 or any(len(overrides[k]) == 0 for k in swept):
        raise InputError(f"baseline_settings[{name!r}]: {swept} are lists; one setting at most can take a "
                         "non-empty list of values (a sweep)")
    defaults = inspect.signature(cls).parameters
    settings = {k: defaults[k].default for k in cls.rules} | overrides
    try:
        check_values(settings, {k: ("each " if k in swept else "") + r for k, r in cls.rules.items()})
    except InputError as e:
        raise InputError(f"baseline_settings[{name!r}]: {e}") from None
    return settings


def _runs(names, overrides, tuned=None):
    """[(entry, name, settings, sweep)]: one run per baseline, or one per value of its swept setting (entry
    "pal_K5", sweep {"K": 5}), then a "<name>_tuned" run for each baseline in `tuned` ({name: settings})."""
    out = []
    for name in names:
        settings = full_settings(name, (overrides or {}).get(name))
        swept = [k for k, v in settings.items() if isinstance(v, (list, tuple))]
        if not swept:
            out.append((name, name, settings, {}))
        for k in swept:
            out += [(f"{name}_{k}{v}", name, {**settings, k: v}, {k: v}) for v in settings[k]]
    return out + [(f"{name}_tuned", name, settings, {}) for name, settings in (tuned or {}).items()]


def _tuned(names, overrides, tuned_settings, tune_grid, train, seed, validation_fraction, device):
    """({name: settings of its tuned run}, {name: how they were chosen}) for the baselines of `names` with an entry
    in tune_grid (tuned here, on held-out pairs of `train`, the seen users' training pairs) or else in
    tuned_settings (stored). The released settings with their non-sweep overrides, then the tuned values."""
    settings, tuning = {}, {}
    for name in names:
        base = {k: v for k, v in ((overrides or {}).get(name) or {}).items() if not isinstance(v, (list, tuple))}
        if name in (tune_grid or {}):
            print(f"tuning {BASELINES[name].label} on held-out pairs of the seen users' training data "
                  f"({len(grid_points(tune_grid[name]))} points)")
            tuning[name] = {"provenance": "chosen here: tune_grid on held-out seen-user training pairs", **tune(
                lambda s: _start(name, train.num_features, seed, {**base, **s})[0], tune_grid[name], train,
                validation_fraction=validation_fraction, seed=seed, device=device)}
            chosen = tuning[name]["chosen"]
        elif name in (tuned_settings or {}):
            chosen = dict(tuned_settings[name])
            tuning[name] = {"provenance": "stored: the script's tuned_settings (chosen by tune=True, README)",
                            "chosen": chosen}
        else:
            continue
        settings[name] = full_settings(name, {**base, **chosen})
    return settings, tuning


def check_baselines(config):
    """A script's check before any work (utils.configure(..., checks=[check_baselines])): its `baselines`
    names known baselines and its `baseline_settings` ({name: {setting: value}}) overrides their settings
    within their ranges."""
    _check_names(list(config.get("baselines") or []))
    overrides = config.get("baseline_settings") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError(f"baseline_settings={overrides!r}: must be a dict {{baseline: {{setting: value}}}}, "
                         'e.g. baseline_settings={"vpl": {"beta": 0.0}}')
    _check_names(list(overrides))
    for name, kw in overrides.items():
        full_settings(name, kw)
    if config.get("tune") and config.get("tune_grid") and config.get("validation_fraction", 0.1) == 0:
        raise InputError("tune=True chooses on held-out seen-user training pairs: validation_fraction must be > 0")
    for key in ("tuned_settings", "tune_grid"):
        given = config.get(key) or {}
        if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
            raise InputError(f"{key}={given!r}: must be a dict {{baseline: {{setting: ...}}}}")
        _check_names(list(given))
        for name, kw in given.items():
            for point in (grid_points(kw) if key == "tune_grid" else [kw]):
                try:
                    full_settings(name, point)
                except InputError as e:
                    raise InputError(f"{key}: {e}") from None


def make_baseline(name, num_features, seed=0, **settings):
    """A baseline by its script name ("per_user_bt", "vpl", "pal") with its settings (keyword arguments)."""
    _check_names([name])
    return BASELINES[name](num_features, seed=seed, **settings)


def _start(name, num_features, seed, settings):
    """(model, start time) of one baseline run, seeded like LoRe's fits."""
    set_seed(seed)
    return make_baseline(name, num_features, seed=seed, **settings), time.time()


def _entry(entry, model, settings, sweep, tuning=None):
    """The table label and the JSON fields naming one run (a tuned run: "<label> (tuned)", with how it was chosen)."""
    if entry.endswith("_tuned"):
        label = f"{model.label} (tuned)"
        return {"label": label, "method": label, "settings": settings, "tuning": tuning[entry[:-len("_tuned")]]}
    label = model.label + "".join(f" ({k} = {v})" for k, v in sweep.items())
    return {"label": label, "method": model.label, "settings": settings, **({"sweep": sweep} if sweep else {})}


def run_baselines(baselines, train_features, test_features_sparse, train_features_unseen,
                  test_features_sparse_unseen, device=None, *, seed=0, settings=None, validation_fraction=0.1,
                  tuned_settings=None, tune_grid=None, record=None, on_fit=None):
    """Fit each baseline on the seen users, personalise the unseen users from their few-shot pairs, evaluate.

    baselines: names of BASELINES ("per_user_bt", "vpl", "pal"); settings: {name: {setting: value}}, overrides
    of their published settings, one of which may be a list (a sweep: one run per value). The same four pair
    sets as pipelines.fit_ranks, the same accuracy definition. For a sweep, the value of best mean accuracy on held-out
    pairs of the seen users' training data (validation_fraction of each user's, pipelines.holdout_pairs; never the
    test pairs) is marked "chosen". tuned_settings / tune_grid ({name: {setting: value}} / {name: {setting:
    [values]}}): a second run "<name>_tuned" per baseline listed, with those settings or the grid's point chosen
    on the same held-out pairs (tuning.tune), its "tuning" recording how (the grid, every point's held-out score).
    Returns {entry: {"label", "method", "settings" (all of them, as run), ["sweep", "validation", "chosen",
    "tuning"], "seen_train", "seen_test", "unseen_fewshot", "unseen_test": {"mean", "std" over users of the
    accuracy (a tie wrong, as published), "ties_half" (mean accuracy with near-ties counted half), "ties" (mean
    share of near-ties, data.TIE_TOLERANCE)}, "seconds"}}, entry the name or, in a sweep,
    "<name>_<setting><value>" (e.g. "pal_K5").
    on_fit(entry, label, model, state): called after each run is evaluated, with the fitted model and the unseen
    users' state, to measure more of the same fit (e.g. choice.ChoiceRun.add_baseline); it changes nothing here.
    """
    _check_names(baselines)
    train, test, train_u, test_u = (as_pairs(x) for x in (train_features, test_features_sparse,
                                                          train_features_unseen, test_features_sparse_unseen))
    check_users([("test_features_sparse", test, len(train)),
                       ("test_features_sparse_unseen", test_u, len(train_u))])
    tuned, tuning = _tuned(baselines, settings, tuned_settings, tune_grid, train, seed, validation_fraction, device)
    runs = _runs(baselines, settings, tuned)
    out = {}
    for entry, name, full, sweep in runs:
        model, t0 = _start(name, train.num_features, seed, full)
        model.fit(train, device)
        state = model.personalize(train_u, device)
        stats = [accuracy_stats(model.margins(p, s, device), p.user, p.num_users)
                 for p, s in [(train, None), (test, None), (train_u, state), (test_u, state)]]
        out[entry] = {**_entry(entry, model, full, sweep, tuning), **{
            n: {"mean": float(np.mean(a["accuracy"])), "std": float(np.std(a["accuracy"])),
                "ties_half": float(np.mean(a["ties_half"])), "ties": float(np.mean(a["ties"]))}
            for n, a in zip(RESULT_NAMES, stats)}}
        out[entry]["seconds"] = time.time() - t0
        note_finished(record, out[entry]["label"])
        print(f"{out[entry]['label']}: " + ", ".join(f"{n} {out[entry][n]['mean']:.4f}" for n in RESULT_NAMES)
              + f"  [{out[entry]['seconds']:.1f}s]")
        if on_fit is not None:
            on_fit(entry, out[entry]["label"], model, state)
    swept = [name for name in baselines if sum(r[1] == name and bool(r[3]) for r in runs) > 1]
    if swept and validation_fraction > 0:
        fit, held = holdout_pairs(train, validation_fraction, seed)
        for name in swept:
            for entry, _, full, sweep in (r for r in runs if r[1] == name and r[3]):
                model, _ = _start(name, train.num_features, seed, full)
                out[entry]["validation"] = float(np.nanmean(model.fit(fit, device).accuracies(held, None, device)))
                print(f"model choice: {out[entry]['label']}: held-out seen-user training pairs "
                      f"{out[entry]['validation']:.4f}")
            group = [e for e, n, _, sweep in runs if n == name and sweep]
            best = max(group, key=lambda e: out[e]["validation"])
            for e in group:
                out[e]["chosen"] = e == best
    return out


def run_baselines_vary_shots(baselines, trials, num_shots, train_features, train_features_unseen,
                             test_features_sparse_unseen, device=None, *, shot_groups=None, seed=0, settings=None,
                             tuned_settings=None, tune_grid=None, validation_fraction=0.1, record=None):
    """run_few_shot_vary_shots for the baselines: each is fit once on the seen users, then every unseen user
    is personalised from the same `shots` examples per trial as LoRe gets (same draws, same skipped users).

    tuned_settings, tune_grid, validation_fraction: a "<name>_tuned" run as in run_baselines.
    Returns {entry: {"label", "method", "settings" (all of them, as run), ["sweep", "tuning"], "accuracies": 4 arrays
    [len(num_shots)], "seconds"}} (entries as in run_baselines): few-shot train accuracy mean and std over
    trials, unseen-user test accuracy mean and std over trials (each trial's value is the mean over users); NaN
    where no user has enough examples.
    """
    _check_names(baselines)
    train, pool, test_u = (as_pairs(x) for x in (train_features, train_features_unseen, test_features_sparse_unseen))
    check_users([("test_features_sparse_unseen", test_u, len(pool))])
    units = shot_units(pool, shot_groups)
    n_units = torch.tensor([len(u) for u in units])
    tuned, tuning = _tuned(baselines, settings, tuned_settings, tune_grid, train, seed, validation_fraction, device)
    out = {}
    for entry, name, full, sweep in _runs(baselines, settings, tuned):
        model, t0 = _start(name, train.num_features, seed, full)
        label = _entry(entry, model, full, sweep, tuning)["label"]
        model.fit(train, device)
        res = np.full((4, len(num_shots)), np.nan)
        for j, shots in enumerate(num_shots):
            users = torch.nonzero(n_units >= shots).flatten().tolist()
            if not users:
                continue
            stacked = stack_trials(pool, units, users, shots, trials, seed)  # the draws LoRe gets
            test = test_u.select_users(users)
            fs, ts = [], []
            for t in range(trials):
                shot_pairs = stacked.select_users(range(t * len(users), (t + 1) * len(users)))
                state = model.personalize(shot_pairs, device)
                fs.append(model.accuracies(shot_pairs, state, device).mean())
                ts.append(model.accuracies(test, state, device).mean())
            res[:, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
            print(f"{label} shots={shots}: few-shot train {res[0, j]:.4f}, unseen test {res[2, j]:.4f} "
                  f"+- {res[3, j]:.4f} ({len(users)} users, {trials} trials)")
        out[entry] = {**_entry(entry, model, full, sweep, tuning), "accuracies": tuple(res),
                      "seconds": time.time() - t0}
        note_finished(record, f"{label} (every shot count)")
        print(f"{label}: {out[entry]['seconds']:.1f}s")
    return out
