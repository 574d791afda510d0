"""The registry of methods and the runs a script makes of them.

METHODS maps a script's name of each method to its class (a method.Method): adding a method is one module and one
line here; every script then runs it (its released row, and its tuned row where its class stores settings for the
data or tune=True chooses them), scores it with every metric and puts it in every table and JSON.

    from lorelib import methods
    model = methods.make_method("vpl", num_features=F).fit(data.seen_train)

Each method's released settings are its class's defaults; a script's `baseline_settings` ({name: {setting: value}})
overrides them, one setting per method may be a list (a sweep: one run per value, the summary line's value chosen
on held-out training pairs). A tuned row ("<name>_tuned") takes the released settings with their non-sweep
overrides, then the tuned values: those its class stores for this data (`tuned[data key]`) or, with tune=True, the
point of its `tune_grid` chosen on held-out pairs of the seen users' training data (tuning.tune; never test pairs).

Imports: config, bt, lore, vpl, pal, mrm, evaluate, tuning, newusers.
"""
import inspect

from .bt import PerUserBT
from .config import InputError, check_values
from .evaluate import Run
from .lore import LoReMethod
from .mrm import MRM
from .newusers import validate_new_users
from .pal import PAL
from .tuning import grid_points, tune
from .vpl import VPL

METHODS = {"lore": LoReMethod, "per_user_bt": PerUserBT, "vpl": VPL, "pal": PAL, "mrm": MRM}  # a script's name -> class


def baseline_names():
    """Every registered method besides LoRe (a script's default `baselines`)."""
    return [name for name in METHODS if name != "lore"]


def _check_names(names):
    unknown = [n for n in names if n not in METHODS or n == "lore"]
    if unknown:
        raise InputError(f"unknown method(s) {unknown}; choose from {baseline_names()} (baselines=[] skips them)")


def full_settings(name, overrides=None, dataset=None):
    """{setting: value} that method `name` runs with: the defaults of its class with its released configuration
    (`config`: overrides["config"], else the one its class names for `dataset`, else its first) and `overrides`
    ({setting: value}) applied; "config" is one of the settings when the class has released configurations. One
    setting may be a list of values, a sweep (e.g. PAL's K = [2, 5, 10], or several configurations): each value
    is a run of its own. InputError for an unknown name, setting or configuration, or a value out of range."""
    _check_names([name])
    cls = METHODS[name]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cls.rules) - ({"config"} if cls.released else set()))
    if unknown:
        raise InputError(f"baseline_settings[{name!r}]: {unknown} are no {cls.__name__} setting; it has "
                         f"{sorted(cls.rules) + (['config'] if cls.released else [])}")
    swept = [k for k, v in overrides.items() if isinstance(v, (list, tuple))]
    if len(swept) > 1 or any(len(overrides[k]) == 0 for k in swept):
        raise InputError(f"baseline_settings[{name!r}]: {swept} are lists; one setting at most can take a "
                         "non-empty list of values (a sweep)")
    defaults = inspect.signature(cls).parameters
    settings = {k: defaults[k].default for k in cls.rules}
    if cls.released:
        config = overrides.get("config", cls.released_for.get(dataset, next(iter(cls.released))))
        bad = [c for c in (config if isinstance(config, (list, tuple)) else [config]) if c not in cls.released]
        if bad:
            raise InputError(f"baseline_settings[{name!r}]: config {bad[0]!r} is no released configuration of "
                             f"{cls.__name__}; it has {list(cls.released)}")
        settings = {"config": config, **settings, **({} if isinstance(config, (list, tuple)) else
                                                        cls.released[config])}
    settings |= overrides
    try:
        check_values(settings, {k: ("each " if k in swept else "") + r for k, r in cls.rules.items()})
    except InputError as e:
        raise InputError(f"baseline_settings[{name!r}]: {e}") from None
    return settings


def make_method(name, num_features, seed=0, **settings):
    """A method by its script name ("per_user_bt", "vpl", "pal", ...) with its settings (keyword arguments; a
    released configuration's name, "config", is not passed on: its values are among the settings)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {list(METHODS)}")
    return METHODS[name](num_features, seed=seed, **{k: v for k, v in settings.items() if k != "config"})


def label(name, settings):
    """The table name of a released row: "<label> (<configuration> config)" where the class has several, else
    its label."""
    cls = METHODS[name]
    return f"{cls.label} ({settings['config']} config)" if cls.released and "config" in settings else cls.label


def check_methods(config):
    """A script's check before any work (config.configure(..., checks=[check_methods])): its `baselines` name
    registered methods and its `baseline_settings` ({name: {setting: value}}) override their settings within their
    ranges."""
    _check_names(list(config.get("baselines") or []))
    overrides = config.get("baseline_settings") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError(f"baseline_settings={overrides!r}: must be a dict {{method: {{setting: value}}}}, "
                         'e.g. baseline_settings={"vpl": {"beta": 0.0}}')
    _check_names(list(overrides))
    for name, kw in overrides.items():
        full_settings(name, kw)
    if config.get("tune") and config.get("validation_fraction", 0.1) == 0:
        raise InputError("tune=True chooses on held-out seen-user training pairs: validation_fraction must be > 0")


def check_grid(name, grid):
    """InputError unless every point of `grid` is a valid setting of method `name`."""
    for point in grid_points(grid):
        try:
            full_settings(name, point)
        except InputError as e:
            raise InputError(f"tune_grid: {e}") from None


def tuned_settings(names, train, *, data_key=None, overrides=None, tune_here=False, tune_grid=None, stored=None,
                   seed=0, validation_fraction=0.1, device=None, dataset=None, groups=None, newusers=None,
                   provenance="given: tuned_settings", log=print):
    """({name: settings of its tuned row}, {name: how they were chosen}) for the methods of `names`: with tune_here,
    the point of its grid (tune_grid[name], default its class's `tune_grid`) chosen here on held-out pairs of
    `train` (the seen users' training pairs); else the settings stored for `data_key` (stored[name], default its
    class's `tuned[data_key]`). A method with neither gets no tuned row. Settings: the released ones with the
    non-sweep overrides, then the tuned values. newusers (a newusers.PseudoNewSplit of `train`): with tune_here,
    the new-user path's settings (the class's fewshot_grid) are then chosen on those pseudo-new users."""
    settings, tuning = {}, {}
    missing = []
    for name in names:
        base = {k: v for k, v in ((overrides or {}).get(name) or {}).items() if not isinstance(v, (list, tuple))}
        grid = (tune_grid or {}).get(name, METHODS[name].tune_grid)
        stored_here = (stored or {}).get(name, METHODS[name].tuned.get(data_key))
        if tune_here and grid:
            check_grid(name, grid)
            log(f"tuning {METHODS[name].label} on held-out pairs of the seen users' training data "
                f"({len(grid_points(grid))} points)")
            start = full_settings(name, base, dataset)
            tuning[name] = {"provenance": "chosen here: tune_grid on held-out seen-user training pairs", **tune(
                lambda s: _make(name, train.num_features, seed, {**start, **s}), grid, train,
                validation_fraction=validation_fraction, seed=seed, device=device, rules=METHODS[name].rules,
                groups=groups)}
            chosen = dict(tuning[name]["chosen"])
            if newusers is not None and METHODS[name].fewshot_grid:
                log(f"choosing {METHODS[name].label}'s new-user path on pseudo-new users ({len(newusers.users)} seen "
                    "users)")
                tuning[name]["new_users"] = validate_new_users(
                    lambda: _make(name, train.num_features, seed, {**start, **chosen}), METHODS[name].fewshot_grid,
                    newusers, seed=seed, device=device, rules=METHODS[name].rules, log=log)
                chosen.update(tuning[name]["new_users"]["chosen"])
            tuning[name]["settings_chosen"] = chosen
        elif stored_here is not None:
            chosen = dict(stored_here)
            tuning[name] = {"provenance": f"stored: {METHODS[name].__name__}.tuned[{data_key!r}] (chosen by tune=True "
                                          "on that data, README)" if stored is None or name not in stored else
                            provenance, "chosen": chosen, "data": data_key}
        else:
            missing += [METHODS[name].label] if grid else []
            continue
        settings[name] = full_settings(name, {**base, **chosen}, dataset)
    if missing and not tune_here:
        log(f"no tuned settings stored for this data ({data_key}): {', '.join(missing)} run their released rows "
            "only (tune=True chooses them here)")
    return settings, tuning


def _make(name, num_features, seed, settings):
    return make_method(name, num_features, seed=seed, **settings)


def baseline_runs(names, num_features, *, seed=0, overrides=None, tuned=None, tuning=None, dataset=None):
    """[Run] of the methods of `names`: the released row of each ("<label> (<configuration> config)"), or one per
    value of its swept setting (entry "pal_K5", label "PAL (TLDR config, K = 5)", sweep {"K": 5}; a sweep over
    configurations: entry "vpl_UF-P-2"), then a tuned row "<name>_tuned" ("<label> (tuned)") for each method in
    tuned ({name: settings}, tuned_settings' first value; tuning: its second). Each run's info lists the method's
    departures from its released code."""
    _check_names(names)
    runs = []
    for name in names:
        cls = METHODS[name]
        settings = full_settings(name, (overrides or {}).get(name), dataset)
        info = {"departures": list(cls.departures)} if cls.departures else {}
        swept = [k for k, v in settings.items() if isinstance(v, (list, tuple))]
        if not swept:
            runs.append(Run(name, name, label(name, settings), _maker(name, num_features, seed, settings),
                            settings=settings, info=info))
        for k in swept:
            for v in settings[k]:
                s = {**settings, k: v, **(cls.released[v] if k == "config" else {})}
                s = {**s, **{o: w for o, w in ((overrides or {}).get(name) or {}).items() if o != k}}
                entry, lab = (f"{name}_{v}", label(name, s)) if k == "config" else (
                    f"{name}_{k}{v}", label(name, s)[:-1] + f", {k} = {v})" if cls.released else
                    f"{cls.label} ({k} = {v})")
                runs.append(Run(entry, name, lab, _maker(name, num_features, seed, s), family=cls.label,
                                sweep={k: v}, settings=s, info=info))
    for name, settings in (tuned or {}).items():
        cls = METHODS[name]
        runs.append(Run(f"{name}_tuned", name, f"{cls.label} (tuned)", _maker(name, num_features, seed, settings),
                        row="tuned", settings=settings, info={"tuning": (tuning or {}).get(name),
                                                              **({"departures": list(cls.departures)}
                                                                 if cls.departures else {})}))
    return runs


def _maker(name, num_features, seed, settings):
    return lambda: _make(name, num_features, seed, settings)
