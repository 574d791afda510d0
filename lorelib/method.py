"""The method interface. Every personalized reward model here is a Method: LoRe at each K (lore.py; K = 0 the
reward model's own head, K = 1 one shared Bradley-Terry reward), per-user BT (bt.py), VPL (vpl.py), PAL (pal.py),
MRM (mrm.py).

    model = SomeMethod(num_features=F, seed=0, **settings)
    model.fit(seen_train)                      # the seen users' training pairs -> model
    state = model.personalize(unseen_fewshot)  # new users' state [C', ...] from their few-shot pairs
    model.margins(unseen_test, state)          # [M] reward(chosen) - reward(rejected) of each pair
    model.scores(table, rows, prompt, user, state)   # [Q, J] reward of each candidate (choice quality)

A state is a tensor with one row per user (LoRe: w [C, K]; VPL: z [C, L]; ...); state=None means the seen users
of the last fit. `accuracies` is the one accuracy of every method (data.accuracy_by_user: per user, the fraction
of pairs with a positive margin, a tie wrong). A subclass sets `label` (its name in tables), `rules` ({setting:
range rule of config.check_value}, one per constructor setting besides num_features, seed and the data inputs it
names in `inputs`, whose defaults are the released values), and may set `tune_grid` (the grid its tuned row
sweeps) and `tuned` ({data key: settings} chosen by that grid on held-out training pairs of that data). The
registry (methods.py) lists every method by name; tests/test_methods.py runs the conformance checks on each.

Imports: config, data.
"""
import abc

import torch
import torch.nn as nn

from .config import InputError, get_device
from .data import accuracy_by_user, as_pairs


class Method(nn.Module, metaclass=abc.ABCMeta):
    """A personalized reward model: fit on seen users, personalize new users, score pairs and candidates."""
    label = None         # the name in tables
    rules = {}           # {setting: range rule}
    tune_grid = {}       # {setting (or "a,b" for two tied settings): [values]}, swept jointly for the tuned row
    fewshot_grid = {}    # {setting: [values]} of the new-user path (its steps, learning rate), chosen on pseudo-new
    #                      users (newusers.py); the settings personalize reads, so a fitted model takes them as set
    tuned = {}           # {data key: {setting: value}} chosen by tune_grid on held-out training pairs of that data
    inputs = ()          # constructor arguments that are data, not settings (LoRe: the reward model's head)
    quick = {}           # settings for small data, where the released budget does not fit (the conformance tests)
    released = {}        # {configuration name: {setting: value}}: the released runs (the first: the defaults)
    released_for = {}    # {dataset: configuration name} where a dataset's run takes another than the first
    departures = []      # how this implementation departs from the released code (printed beside its rows)
    independent_users = False  # personalize fits each user from its own pairs alone, drawing nothing at random:
    #                            users stacked in one call get their own fits (the few-shot trials share one call)

    @property
    def settings(self):
        """{setting: value} of this model (the keys of `rules`)."""
        return {k: getattr(self, k) for k in self.rules}

    @abc.abstractmethod
    def fit(self, pairs, device=None):
        """Fit on the seen users' training pairs (a Pairs of C users) -> self."""

    @abc.abstractmethod
    def personalize(self, pairs, device=None):
        """New users' state [C', ...] from their few-shot pairs; the fitted shared parts stay as they are."""

    @abc.abstractmethod
    def margins(self, pairs, state=None, device=None):
        """[M] reward(chosen) - reward(rejected) of every pair under its user's state (None: the seen users')."""

    @abc.abstractmethod
    def scores(self, table, rows, prompt, user, state=None, device=None):
        """[Q, J] reward of every candidate: query q is user[q]'s prompt prompt[q], whose candidates are the rows
        rows[prompt[q]] of table [R, F] (rows [P, J], -1 pads: any value there)."""

    def accuracies(self, pairs, state=None, device=None):
        """[C] accuracy of each user of `pairs` (a tie is wrong); state: new users' state (None: the seen users)."""
        pairs = as_pairs(pairs)
        return accuracy_by_user(self.margins(pairs, state, device), pairs.user, pairs.num_users)

    def saved(self, unseen_state):
        """{name: tensor} that a model file of this fit holds (LoRe: V, W, W_unseen), or None: nothing is saved."""
        return None

    def posterior_features(self, pairs):
        """[M, K] the features of each pair that a new user's weights act on linearly (the comparisons' d^T V), for
        choosing which comparisons to ask (selection.py); None: this method has no such posterior."""
        return None

    # --- helpers for subclasses ---

    def _cached(self, key, pairs, device, compute):
        """compute() once per (key, pairs object, device) until the next fit: features of the frozen shared
        parts are reused when the same pairs are scored again (the few-shot curves score one test set per trial)."""
        cache = self.__dict__.setdefault("_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] is pairs and hit[1] == device:
            return hit[2]
        cache[key] = (pairs, device, compute())
        return cache[key][2]

    def _check_features(self, pairs):
        if self.num_features is not None and pairs.num_features != self.num_features:
            raise InputError(f"pairs have {pairs.num_features} features, the model expects {self.num_features}")

    def _margin_inputs(self, pairs, state, seen, what, device):
        """(pairs, state, device) for `margins`: state (one row per user) defaults to the seen users' `seen`."""
        pairs = as_pairs(pairs)
        self._check_features(pairs)
        state = seen if state is None else state
        if state is None:
            raise InputError(f"call fit(pairs) first, or pass {what}")
        if len(state) != pairs.num_users:
            raise InputError(f"got {what} for {len(state)} users, but the pairs have {pairs.num_users} users")
        return pairs, state, get_device(device)

    def _score_inputs(self, table, rows, user, state, seen, what, device):
        """(state, device, used [U], pos [P, J]) for `scores`: state (one row per user) defaults to the seen users'
        `seen`; used: the distinct table rows of the candidates rows [P, J] (-1 pads), pos: each one's position in
        `used` (so that per-item features are computed once per row)."""
        if self.num_features is not None and table.shape[1] != self.num_features:
            raise InputError(f"the table has {table.shape[1]} features, the model expects {self.num_features}")
        state = seen if state is None else state
        if state is None:
            raise InputError(f"call fit(pairs) first, or pass {what}")
        if len(user) and int(user.max()) >= len(state):
            raise InputError(f"got {what} for {len(state)} users, but a query belongs to user {int(user.max())}")
        used, pos = torch.unique(rows.clamp(min=0), return_inverse=True)
        return state, get_device(device), used, pos
