"""What every dataset's train_basis.py and vary_fewshot.py do once their data are loaded, as one call each:
build the runs (LoRe at every (alpha, K), every other registered method at its released settings and, where
settings are stored for this data or tune=True, its tuned row), evaluate them all through the one evaluation path,
save LoRe's models, choose each family's run on held-out training pairs, and report (table, JSON, plot).

    config = configure(globals(), script=__file__, ...)
    experiment.train_basis(config, lambda seed: dataset.load(..., seed=seed), out_dir=..., name="train_basis",
                           title="...", dataset="...", data_key=dataset.data_key(config))

Imports: config, data, report, report_shots, evaluate, compare, fewshot, pipelines, newusers, learned, choice,
methods.
"""
import time

import torch

from .choice import ChoiceRun
from .compare import comparison, plot_comparison, print_comparison
from .config import InputError, get_device, note_finished, set_seed
from .data import as_pairs
from .evaluate import choose, evaluate
from .fewshot import fewshot_curve, shot_units
from .learned import save_models
from .methods import METHODS, baseline_runs
from .methods import tuned_settings as methods_tuned
from .newusers import pseudo_new_split, validate_new_users
from .pipelines import lore_runs, vary_shots, widen_rank
from .report import json_entry, report_run, run_payload, write_report
from .report_shots import report_shots


def method_runs(config, data, data_key, device=None, chosen=None):
    """[Run] of the config's `baselines` on `data`: their released rows (with `baseline_settings`; the released
    configuration a method names for this dataset, the first word of data_key) and tuned rows (config `tuned`:
    stored for data_key, or with `tune` chosen here on held-out seen-user training pairs, or `chosen` (a
    {"seed", "settings": {name: settings}} of an earlier seed's tuning on the same data) reused)."""
    dataset = data_key.split()[0] if data_key else None
    tune_here = config.get("tune", False) and chosen is None
    split = pseudo_new_users(data, config["seed"]) if tune_here else None
    names = list(config.get("baselines") or [])
    overrides = config.get("baseline_settings") or {}
    tuned, tuning = {}, {}
    if names and config.get("tuned", True):
        tuned, tuning = methods_tuned(names, data.seen_train, data_key=data_key, overrides=overrides,
                                       tune_here=tune_here, seed=config["seed"],
                                       validation_fraction=config.get("validation_fraction", 0.1), device=device,
                                       dataset=dataset, groups=data.info.get("train_groups"), newusers=split,
                                       stored=None if chosen is None else chosen["settings"],
                                       provenance=None if chosen is None else
                                       f"chosen here with tune=True on seed {chosen['seed']} of this data")
    return baseline_runs(names, data.seen_train.num_features, seed=config["seed"], overrides=overrides, tuned=tuned,
                         tuning=tuning, dataset=dataset)


def pseudo_new_users(data, seed=0):
    """The pseudo-new users of `data`'s seen users (newusers.pseudo_new_split): as many few-shot examples as an
    unseen user's median, whole groups (PRISM's dialogs) where the data have them."""
    shots = int(torch.tensor([len(u) for u in shot_units(data.unseen_fewshot, data.info.get("shot_groups"))])
                .float().median())
    return pseudo_new_split(data.seen_train, shots, seed=seed, groups=data.info.get("train_groups"))


def fit_all(config, data, data_key, regularized=False, chosen=None):
    """One seed of a train_basis run: every run (LoRe at every (alpha, K), the other methods) evaluated, each family
    chosen on held-out training pairs, LoRe's choice widened past an edge -> (results, choice run or None, more JSON:
    kept bases, selection edges, the new-user validation with tune)."""
    device, seed = get_device(config.get("device")), config["seed"]

    def lore(K_list, alpha_list):
        return lore_runs(K_list, alpha_list, data.head, data.seen_train.num_features, regularized=regularized,
                         num_iterations=config["num_iterations"], learning_rate=config["learning_rate"],
                         fewshot_iterations=config["fewshot_iterations"],
                         fewshot_learning_rate=config["fewshot_learning_rate"], seed=seed,
                         sweep_alpha=len(config["alpha_list"]) > 1)
    runs = lore(config["K_list"], config["alpha_list"]) + method_runs(config, data, data_key, device, chosen)
    choice = ChoiceRun(data.info["choice"], data.head) if config.get("choice_quality") and "choice" in data.info \
        else None
    results = evaluate(runs, data.features, device, seed=seed, record=config.record, choice=choice)
    groups, fraction = data.info.get("train_groups"), config.get("validation_fraction", 0.1)
    choose(results, data.seen_train, fraction, seed=seed, device=device, groups=groups)
    edges = widen_rank(results, lambda K, alpha: lore([K], [alpha])[0], data.seen_train, fraction, seed=seed,
                       device=device, groups=groups, evaluate_run=lambda run: evaluate(
                           [run], data.features, device, seed=seed, record=config.record, choice=choice)[0])
    if choice:
        choice.finish(results)
    more = {"kept_bases": {f"K={r.run.settings['K']} alpha={r.run.settings['alpha']:g}": r.model["V"].shape[1]
                           for r in results if r.run.name == "lore"}} if regularized else {}
    if edges:
        more["selection_edges"] = edges
    if config.get("tune") and chosen is None:  # every method's new-user path on pseudo-new users (tuned rows: theirs)
        split, rows = pseudo_new_users(data, seed), [r for r in results if r.run.row == "released"
                                                      or (r.run.name == "lore" and r.chosen)]
        more["new_user_validation"] = {r.run.label: validate_new_users(
            r.run.make, METHODS[r.run.name].fewshot_grid, split, seed=seed, device=device,
            rules=METHODS[r.run.name].rules) for r in rows if METHODS[r.run.name].fewshot_grid}
    if choice:
        more["choice"] = choice.payload(results)
    return results, choice, more


def seed_list(config):
    """The seeds a script runs: config `seeds` (a list, or n: 0..n-1), else [seed]."""
    seeds = config.get("seeds")
    if seeds == 0:
        raise InputError("seeds=0 runs nothing: pass a number of seeds >= 1 or a list of them, e.g. seeds=20")
    return [config["seed"]] if seeds is None else list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def train_basis(config, load, *, out_dir, name, title, dataset, data_key, regularized=False, overrides=None,
                extra=None):
    """A train_basis.py run: for each seed s of config `seeds` (None: [seed]), set_seed(s) and data = load(s) (a
    PreferenceData), fit_all, then a comparison of the methods with 95% intervals (compare.py: over users for one
    seed, over seeds for several). config: configure's result (K_list, alpha_list, num_iterations, learning_rate,
    fewshot_iterations, fewshot_learning_rate, seed, seeds, device, validation_fraction, baselines,
    baseline_settings, tuned, tune, choice_quality, save_models); `overrides` of them for the run (e.g. a default
    resolved from None) leave the JSON's config as given. extra: more JSON (or a function of the first seed's data).
    Writes out_dir/name.json and .png (one seed: the tables' JSON with "comparison"; several: "per_seed" and
    "comparison"), name_choice.png (choice quality, one seed) and the first seed's models (out_dir/models*/).
    -> [evaluate's results of each seed]."""
    t0 = time.time()
    json_config, config = config, _with(config, overrides)
    seeds, per_seed, payloads, paths, chosen = seed_list(config), [], [], {}, None
    for i, s in enumerate(seeds):
        cfg = _with(config, {"seed": s})
        set_seed(s)
        data = load(s)
        extra = extra(data) if callable(extra) else extra or {}
        results, choice, more = fit_all(cfg, data, data_key, regularized, chosen)
        if cfg.get("tune") and chosen is None:  # later seeds reuse this seed's choice (the same data key)
            chosen = {"seed": s, "settings": {r.run.name: r.run.info["tuning"]["settings_chosen"] for r in results
                                              if r.run.row == "tuned"}}
        if i == 0 and config.get("save_models", True):
            models = {(r.run.settings["alpha"], r.run.settings["K"]): r.model for r in results if r.run.name == "lore"}
            paths = save_models(out_dir / name.replace("train_basis", "models"), models, data, dataset=dataset,
                                fewshot_iterations=config["fewshot_iterations"],
                                fewshot_learning_rate=config["fewshot_learning_rate"], record=config.record)
        per_seed.append(results)
        if len(seeds) > 1:
            payload, _ = run_payload(results, f"{title}, seed {s}")
            payloads.append({"seed": s, **payload, **more})
    table = comparison(per_seed, seeds)
    print_comparison(table, title)
    if len(seeds) == 1:
        report_run(results, json_config, out_dir, name, title, record=config.record,
                   extra={**extra, "seconds": time.time() - t0, **more, "models": paths, "comparison": table})
        if choice:
            choice.report(more["choice"], out_dir, name, title, record=config.record)
    else:
        write_report(out_dir, name, {"config": json_config, "seeds": seeds, "comparison": table, **extra,
                                     "seconds": time.time() - t0, "models": paths, "per_seed": payloads},
                     lambda p: plot_comparison(p, table, title), config.record)
    print(f"done in {time.time() - t0:.0f}s")
    return per_seed


def _with(config, overrides):
    """A copy of configure's result with `overrides` applied (its run record kept)."""
    out = type(config)({**config, **(overrides or {})})
    out.record = getattr(config, "record", None)
    return out


def baseline_curves(runs, train, pool, test, num_shots, trials, units, *, seed=0, device=None, record=None):
    """The few-shot curves of every run (fewshot.fewshot_curve, the draws LoRe gets) -> {entry: {"label", "method",
    "settings", ..., "accuracies": [4, S] (few-shot train and unseen-test mean and std over trials), "user_acc" [S, C],
    "seconds"}}."""
    out = {}
    for run in runs:
        set_seed(seed)
        t0 = time.time()
        model = run.make()
        model.fit(train, device)
        curve = fewshot_curve(model, pool, test, units, num_shots, trials, seed, device, label=run.label,
                              record=record)
        out[run.entry] = {**run.fields(), "accuracies": tuple(curve.acc), "user_acc": curve.user_acc,
                          "seconds": time.time() - t0}
        note_finished(record, f"{run.label} (every shot count)")
        print(f"{run.label}: {out[run.entry]['seconds']:.1f}s")
    return out


def run_methods(names, features, device=None, *, seed=0, settings=None, tuned_settings=None, tune_grid=None,
                validation_fraction=0.1, record=None, choice=None):
    """The methods `names` (registry names) on the four pair sets `features` (seen train, seen test, unseen few-shot,
    unseen test), as a script runs them (settings: overrides of their released settings; tuned_settings {name:
    settings} or tune_grid {name: grid}: a tuned row each) -> {entry: the results JSON's entry ("label", "method",
    "settings", ..., each pair set's {"mean", "std", metrics...}, "seconds")}."""
    train = as_pairs(features[0])
    tuned, tuning = ({}, {}) if tuned_settings is None and tune_grid is None else methods_tuned(
        names, train, overrides=settings, tune_here=tune_grid is not None, tune_grid=tune_grid, stored=tuned_settings,
        seed=seed, validation_fraction=validation_fraction, device=device)
    runs = baseline_runs(names, train.num_features, seed=seed, overrides=settings, tuned=tuned, tuning=tuning)
    results = evaluate(runs, features, device, seed=seed, record=record, choice=choice)
    choose(results, train, validation_fraction, seed=seed, device=device)
    return {r.run.entry: json_entry(r) for r in results}


def method_curves(names, trials, num_shots, train, pool, test, device=None, *, shot_groups=None, seed=0, settings=None,
                  tuned_settings=None, tune_grid=None, validation_fraction=0.1, record=None):
    """The few-shot curves (fewshot.fewshot_curve) of the methods `names`, as run_methods runs them -> baseline_curves'
    {entry: {..., "accuracies": [4, S], "user_acc": [S, C], "seconds"}}."""
    train = as_pairs(train)
    tuned, tuning = ({}, {}) if tuned_settings is None and tune_grid is None else methods_tuned(
        names, train, overrides=settings, tune_here=tune_grid is not None, tune_grid=tune_grid, stored=tuned_settings,
        seed=seed, validation_fraction=validation_fraction, device=device)
    runs = baseline_runs(names, train.num_features, seed=seed, overrides=settings, tuned=tuned, tuning=tuning)
    pool, test = as_pairs(pool), as_pairs(test)
    return baseline_curves(runs, train, pool, test, num_shots, trials, shot_units(pool, shot_groups), seed=seed,
                           device=device, record=record)


def vary_fewshot(config, load, *, out_dir, name, title, data_key, regularized=False, overrides=None, extra=None,
                 xlabel="few-shot pairs per user"):
    """A vary_fewshot.py run: for each seed of config `seeds` (None: [seed]), set_seed(s) and data = load(s), LoRe's
    few-shot curves at one (alpha, K) (pipelines.vary_shots: the paper's random draws and the `shot_selection`
    rules), then every other method's curve on the same draws; report (table, JSON, plot; several seeds: intervals
    over users with the seeds as strata). Examples are
    pairs, or the groups of data.info["shot_groups"] (PRISM's dialogs); num_shots None: 1 .. the most any unseen user
    has (from the first seed's data). overrides: as in train_basis."""
    t0 = time.time()
    json_config, config = config, _with(config, overrides)
    device, num_shots = get_device(config.get("device")), config["num_shots"]
    results, data, by_seed, chosen = [], None, [], None
    for s in seed_list(config):
        set_seed(s)
        data = load(s)
        groups = data.info.get("shot_groups")
        if num_shots is None:
            num_shots = list(range(1, max(len(u) for u in shot_units(data.unseen_fewshot, groups)) + 1))
        results.append(vary_shots(
            config["trials"], [config["alpha"]], [config["K"]], num_shots, data.seen_train, data.unseen_fewshot,
            data.unseen_test, data.head, data.N, data.N_unseen, device, regularized=regularized, shot_groups=groups,
            num_iterations=config["num_iterations"], learning_rate=config["learning_rate"],
            fewshot_iterations=config["fewshot_iterations"], fewshot_learning_rate=config["fewshot_learning_rate"],
            seed=s, shot_selection=config["shot_selection"], full_pool=True,
            stop_thresholds=config.get("stop_thresholds"), pair_budgets=config.get("pair_budgets"),
            record=config.record))
        runs = method_runs(_with(config, {"seed": s}), data, data_key, device, chosen)
        if config.get("tune") and chosen is None:  # later seeds reuse this seed's choice (the same data key)
            chosen = {"seed": s, "settings": {r.name: r.info["tuning"]["settings_chosen"] for r in runs
                                              if r.row == "tuned"}}
        by_seed.append(baseline_curves(runs, data.seen_train, data.unseen_fewshot, data.unseen_test, num_shots,
                                       config["trials"], shot_units(data.unseen_fewshot, groups), seed=s,
                                       device=device, record=config.record))
    curves = by_seed[0] if len(by_seed) == 1 else {
        entry: {**by_seed[0][entry], "user_acc_by_seed": [c[entry]["user_acc"] for c in by_seed],
                "seconds": sum(c[entry]["seconds"] for c in by_seed)} for entry in by_seed[0]}
    report_shots(results if len(results) > 1 else results[0], json_config, out_dir, name, title,
                 extra={**(extra(data) if callable(extra) else extra or {}), "seconds": time.time() - t0},
                 xlabel=xlabel, baselines=curves,
                 record=config.record)
    print(f"done in {time.time() - t0:.0f}s")
    return results, curves
