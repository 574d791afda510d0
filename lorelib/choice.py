"""Choice quality, beside pairwise accuracy: does a personalized reward pick, among a prompt's candidate responses,
the one its user wants (best-of-N)?

A query is one user's prompt with its J candidate responses (rows of an embedding table) and the user's truth for
each: a known true reward (kind "reward": PersonalLLM's simulated users) or the user's own ratings (kind "rating":
PRISM's first turns, 1-100). A scorer gives every candidate a reward for the query's user; its pick is the
candidate of highest reward (a tie goes to the first). Metrics, per query:

  kind "reward"  regret       (best - picked) / (best - worst) true reward: 0 = the user's favourite, 1 = its worst
                 win_vs_ref   1 when the pick's true reward beats the reference head's pick, 1/2 on a tie, else 0
                 win_vs_BT    the same against the pick of one Bradley-Terry reward shared by everyone (K = 1)
  kind "rating"  top          1 when the pick has the user's highest rating (every response tied for it counts)
                 gain         the pick's rating minus the mean rating of the candidates
                 spearman     rank correlation of the rewards with the ratings (average ranks for ties; a query with
                              all ratings equal has none)

Each is averaged over a user's queries, then given as the mean and std over users, with its chance level: the
same for a uniformly random pick (Spearman: 0). Each metric is one value function and one chance function,
registered in CHOICE_METRICS: every method gets every metric of its data's kind.

    from lorelib.choice import choice_quality, lore_scorer, method_scorer
    ref = choice_quality(lore_scorer(data.head, torch.ones(1)), sets["seen"])
    choice_quality(method_scorer(model), sets["seen"], against={"ref": ref["picks"]})["summary"]

Imports: config, files, lore, report (every method is scored through its `scores`).
"""
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from .config import InputError, note_written
from .files import atomic_path, save_or_fallback
from .lore import linear_scores
from .report import print_table

LOWER_IS_BETTER = {"regret"}
GROUPS = ["seen", "unseen"]  # the candidate sets of a run: seen users (their fit), unseen users (their few-shot fit)
CHUNK = 2**15  # queries per block


@dataclasses.dataclass
class Candidates:
    """Q queries (a user's prompt) and their candidate responses.

    table [R, F]: embeddings; rows [P, J] long: the candidates of each prompt (rows of `table`, -1 pads: a prompt
    may have fewer than J); prompt [Q], user [Q] long: each query's prompt and user (0..num_users-1); truth [Q, J]
    float64: the user's true reward or rating of each candidate (finite where a candidate is, NaN at pads);
    kind: "reward" or "rating" (which metrics apply)."""
    table: torch.Tensor
    rows: torch.Tensor
    prompt: torch.Tensor
    user: torch.Tensor
    truth: torch.Tensor
    num_users: int
    kind: str

    def __post_init__(self):
        if self.kind not in METRICS:
            raise InputError(f"kind={self.kind!r}: must be one of {list(METRICS)}")
        self.rows, self.prompt, self.user = (torch.as_tensor(x, dtype=torch.long)
                                             for x in (self.rows, self.prompt, self.user))
        self.truth = torch.as_tensor(self.truth, dtype=torch.float64)
        Q, (P, J) = len(self.prompt), self.rows.shape
        if self.user.shape != (Q,) or self.truth.shape != (Q, J):
            raise InputError(f"prompt [{Q}], user {list(self.user.shape)}, truth {list(self.truth.shape)}: expected "
                             f"user [Q] and truth [Q, J] for rows [P, J] = [{P}, {J}]")
        if len(self.rows) and (self.rows.max() >= len(self.table) or (self.rows >= 0).sum(1).min() < 2):
            raise InputError(f"rows must index the {len(self.table)} table rows, at least 2 candidates per prompt")
        if Q and not (0 <= self.prompt.min() and self.prompt.max() < P and 0 <= self.user.min()
                      and self.user.max() < self.num_users):
            raise InputError(f"prompt must lie in [0, {P}) and user in [0, {self.num_users})")
        if not torch.equal(torch.isfinite(self.truth), self.valid):
            raise InputError("truth must be finite exactly where a candidate is (NaN at the pads)")

    @property
    def valid(self):
        """[Q, J] bool: a candidate (not a pad)."""
        return self.rows[self.prompt] >= 0


def lore_scorer(V, W):
    """Scorer of r_user(e) = e^T V w_user: V [F, K], W [C, K] (or [K], everyone's)."""
    return lambda c: linear_scores(c.table, c.rows, c.prompt, c.user, V, W)


def method_scorer(model, state=None, device=None):
    """Scorer of a Method (LoRe, PerUserBT, VPL, PAL, ...) through its `scores`; state: new users' state from its
    `personalize` (None: the seen users' fit)."""
    return lambda c: model.scores(c.table, c.rows, c.prompt, c.user, state, device)


def pick(scores, valid):
    """[Q] the position of the best-rewarded candidate (the first on a tie): scores, valid [Q, J]."""
    scores = torch.as_tensor(scores).double()
    if not torch.isfinite(scores[valid]).all():
        raise ValueError("the scorer gave a NaN or infinite reward to a candidate")
    return scores.masked_fill(~valid, -np.inf).argmax(1)


def _ranks(x, valid):
    """[Q, J] average ranks (1..n) of x among the valid entries of each row; 0 at pads."""
    less = ((x[:, None, :] < x[:, :, None]) & valid[:, None, :]).sum(-1).double()
    equal = ((x[:, None, :] == x[:, :, None]) & valid[:, None, :]).sum(-1).double()
    return torch.where(valid, less + (equal + 1) / 2, torch.zeros((), dtype=torch.float64))


def spearman(scores, truth, valid):
    """[Q] Spearman correlation of scores with truth over each row's valid entries (NaN when either is constant)."""
    out = []
    for s in range(0, len(valid), CHUNK):
        v = valid[s:s + CHUNK]
        n = v.sum(1, keepdim=True)
        a, b = (_ranks(x[s:s + CHUNK].double(), v) for x in (scores, truth))
        a, b = (torch.where(v, r - r.sum(1, keepdim=True) / n, torch.zeros((), dtype=torch.float64)) for r in (a, b))
        den = ((a * a).sum(1) * (b * b).sum(1)).sqrt()
        out.append(torch.where(den > 0, (a * b).sum(1) / den.clamp(min=1e-300), torch.tensor(float("nan"))))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# --- the metrics: each is (value of a pick, its chance level) on a query's candidates, registered in CHOICE_METRICS.
# A value function takes (cands, picked [Q], scores [Q, J], against {name: other picks [Q]}) -> [Q] (None when a
# pick it compares with is not known), a chance function (cands, against) -> [Q]: its expectation for a uniformly
# random pick. To add a metric: two functions and one entry below.

def _best(cands):
    return cands.truth.masked_fill(~cands.valid, -np.inf).max(1).values


def _spread_ratio(num, cands):
    spread = _best(cands) - cands.truth.masked_fill(~cands.valid, np.inf).min(1).values
    return torch.where(spread > 0, num / spread.clamp(min=1e-300), torch.tensor(float("nan")))


def _got(cands, picked):
    return cands.truth.gather(1, picked[:, None])[:, 0]


def _mean_truth(cands):
    return cands.truth.nan_to_num().sum(1) / cands.valid.sum(1)


def regret(cands, picked, scores, against):
    return _spread_ratio(_best(cands) - _got(cands, picked), cands)


def regret_chance(cands, against):
    return _spread_ratio(_best(cands) - _mean_truth(cands), cands)


def win_against(name):
    """win_vs_<name>: 1 when the pick's true reward beats the pick of scorer `name`, 1/2 on a tie, else 0."""
    def win(cands, picked, scores, against):
        if name not in against:
            return None
        got, theirs = _got(cands, picked), _got(cands, against[name])
        return (got > theirs).double() + 0.5 * (got == theirs).double()

    def chance(cands, against):
        if name not in against:
            return None
        truth, valid, theirs = cands.truth, cands.valid, _got(cands, against[name])[:, None]
        return (((truth > theirs) & valid).sum(1) + 0.5 * ((truth == theirs) & valid).sum(1)) / valid.sum(1)
    return win, chance


def top(cands, picked, scores, against):
    return (_got(cands, picked) == _best(cands)).double()


def top_chance(cands, against):
    return ((cands.truth == _best(cands)[:, None]) & cands.valid).sum(1) / cands.valid.sum(1)


def gain(cands, picked, scores, against):
    return _got(cands, picked) - _mean_truth(cands)


def spearman_metric(cands, picked, scores, against):
    return spearman(scores, cands.truth, cands.valid)


def zero_chance(cands, against):
    return torch.zeros(len(cands.prompt), dtype=torch.float64)


CHOICE_METRICS = {"reward": {"regret": (regret, regret_chance), "win_vs_ref": win_against("ref"),
                             "win_vs_BT": win_against("BT")},
                  "rating": {"top": (top, top_chance), "gain": (gain, zero_chance),
                             "spearman": (spearman_metric, zero_chance)}}
METRICS = {kind: list(m) for kind, m in CHOICE_METRICS.items()}


def query_metrics(cands, picked, scores=None, against=None):
    """{metric: [Q] value of each query} of the picks `picked` [Q] for every metric of cands.kind that applies
    (a win rate needs the other scorer's picks in against = {"ref": picks [Q], "BT": picks [Q]})."""
    out = {m: fn(cands, picked, scores, against or {}) for m, (fn, _) in CHOICE_METRICS[cands.kind].items()}
    return {m: v for m, v in out.items() if v is not None}


def chance_metrics(cands, against=None):
    """{metric: [Q]} expected value of each metric for a uniformly random pick (Spearman: 0)."""
    out = {m: fn(cands, against or {}) for m, (_, fn) in CHOICE_METRICS[cands.kind].items()}
    return {m: v for m, v in out.items() if v is not None}


def per_user(values, user, num_users):
    """[C] mean of each user's non-NaN query values `values` [Q] (NaN for a user without one)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    ok = ~torch.isnan(values)
    total = torch.zeros(num_users, dtype=torch.float64).index_add_(0, user[ok], values[ok])
    count = torch.bincount(user[ok], minlength=num_users).double()
    return (total / count).numpy()  # 0 / 0 = NaN


def _stats(u):
    """{"mean", "std", "users"} over the users with a value of per-user values u [C] (NaN: none)."""
    u = u[~np.isnan(u)]
    return {"mean": float(u.mean()) if len(u) else None, "std": float(u.std()) if len(u) else None,
            "users": int(len(u))}


def summarize(metrics, cands):
    """{metric: {"mean", "std", "users"}} over users (users without a value left out) of {metric: [Q]}."""
    return {name: _stats(per_user(values, cands.user, cands.num_users)) for name, values in metrics.items()}


def choice_quality(scorer, cands, against=None):
    """Choice quality of any scorer (scorer(cands) -> [Q, J] rewards; pads ignored) on candidate sets `cands`.

    against: {"ref": picks [Q], "BT": picks [Q]}: other scorers' picks for the win rates (kind "reward").
    Returns {"picks": [Q] position of each pick, "per_query": {metric: [Q]}, "summary": {metric: {"mean", "std",
    "users"}} over users, "chance": the same for a uniformly random pick}."""
    scores = torch.as_tensor(scorer(cands))
    if scores.shape != cands.truth.shape:
        raise ValueError(f"the scorer returned shape {tuple(scores.shape)}, expected {tuple(cands.truth.shape)}")
    picked = pick(scores, cands.valid)
    per_query = query_metrics(cands, picked, scores, against)
    return {"picks": picked, "per_query": per_query, "summary": summarize(per_query, cands),
            "chance": summarize(chance_metrics(cands, against), cands)}


def kendall_tau(x, y):
    """Kendall's tau-b of two score lists (ties counted as in tau-b); NaN when either is constant or has a None."""
    x, y = (np.array([np.nan if v is None else v for v in z], float) for z in (x, y))
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    den = np.sqrt((dx != 0).sum() * (dy != 0).sum())
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


class ChoiceRun:
    """Choice quality of every method of a train_basis run (evaluate.evaluate's `choice`), on the seen and unseen
    users' candidate sets (sets = {"seen": Candidates, "unseen": Candidates}, a dataset's
    load(..., choice=True).info["choice"]).

    Seen users are scored with their fit, unseen users with their few-shot state, as for accuracy. The win rates
    compare with the picks of the reference head `head` [F, 1] and of the first run labelled "BT" (K = 1 of the
    first alpha); a run measured before that one gets its win rate against it in `finish`."""

    def __init__(self, sets, head):
        t0 = time.time()
        self.sets, self.kind = sets, sets["seen"].kind
        self.metrics = list(METRICS[self.kind])
        self.against = {g: {} for g in GROUPS}
        if self.kind == "reward":
            ref = lore_scorer(head, torch.ones(1))
            for g in GROUPS:
                self.against[g]["ref"] = choice_quality(ref, sets[g])["picks"]
        self.chance = {g: summarize(chance_metrics(sets[g], self.against[g]), sets[g]) for g in GROUPS}
        self.measured, self.ranks, self.baselines, self.seconds = {}, [], {}, time.time() - t0

    def measure(self, entry, model, state, label=None):
        """Choice quality of a fitted Method (seen users: its fit; unseen users: `state`) -> {"seen", "unseen":
        {metric: {"mean", "std", "users"}}} (a win rate against a pick not yet known comes in `finish`)."""
        t0 = time.time()
        picks, users = {}, {}
        for g, st in zip(GROUPS, (None, state)):
            c = self.sets[g]
            scores = torch.as_tensor(method_scorer(model, st)(c))
            if scores.shape != c.truth.shape:
                raise ValueError(f"the scorer returned shape {tuple(scores.shape)}, expected {tuple(c.truth.shape)}")
            picks[g] = pick(scores, c.valid)
            users[g] = {m: per_user(v, c.user, c.num_users)
                        for m, v in query_metrics(c, picks[g], scores, self.against[g]).items()}
        if self.kind == "reward" and (label or model.label) == "BT" and "BT" not in self.against["seen"]:
            for g in GROUPS:
                self.against[g]["BT"] = picks[g]
        self.measured[entry] = {"picks": picks, "users": users}
        self.seconds += time.time() - t0
        return self._summary(entry)

    def _summary(self, entry):
        users = self.measured[entry]["users"]
        return {g: {m: _stats(users[g][m]) for m in self.metrics if m in users[g]} for g in GROUPS}

    def finish(self, results):
        """After every run of `results` (evaluate's MethodResults) is measured: the win rates against picks that came
        later, the chance levels, each result's `.choice`, and the rows of the table (LoRe's by alpha and K)."""
        if self.kind == "reward" and "BT" not in self.against["seen"]:
            if "win_vs_BT" in self.metrics:
                self.metrics.remove("win_vs_BT")
                print("choice quality: no K = 1 in K_list, so no win rate against the shared BT reward")
        for m in self.measured.values():
            for g in GROUPS:
                c = self.sets[g]
                for name, (fn, _) in CHOICE_METRICS[self.kind].items():
                    if name in self.metrics and name not in m["users"][g]:
                        m["users"][g][name] = per_user(fn(c, m["picks"][g], None, self.against[g]), c.user,
                                                       c.num_users)
        self.chance = {g: summarize(chance_metrics(self.sets[g], self.against[g]), self.sets[g]) for g in GROUPS}
        self.ranks, self.baselines = [], {}
        for r in results:
            if r.run.entry not in self.measured:
                continue
            r.choice = self._summary(r.run.entry)
            r.choice_users = self.measured[r.run.entry]["users"]
            if r.run.name == "lore":
                self.ranks.append({"alpha": r.run.settings["alpha"], "K": r.run.settings["K"], **r.choice})
            else:
                self.baselines[r.run.entry] = {"label": r.run.label, **r.choice}

    def payload(self, results):
        """The results JSON's "choice": kind, metrics, chance, "results" (LoRe: one per alpha, K), "baselines" (the
        other methods by entry) and "rank_agreement": Kendall's tau, per group, between the test accuracy and each
        metric (negated where lower is better) over the measured methods of `results` (1 when choice quality orders
        the methods as accuracy does)."""
        out = {"kind": self.kind, "metrics": self.metrics,
               "lower_is_better": sorted(LOWER_IS_BETTER & set(self.metrics)), "std_over": "users",
               "chance": self.chance, "results": self.ranks, "baselines": self.baselines, "seconds": self.seconds}
        rows = [r for r in results if r.choice is not None]
        if rows:
            out["rank_agreement"] = {g: {m: kendall_tau([r.mean(f"{g}_test") for r in rows],
                                                        [(-1 if m in LOWER_IS_BETTER else 1) * r.choice[g][m]["mean"]
                                                         for r in rows])
                                         for m in self.metrics} for g in GROUPS}
        return out

    def report(self, payload, out_dir, name, title, record=None):
        """Print the choice table (mean ± std over users, chance first) and write `name`_choice.png."""
        cols = [(g, m) for g in GROUPS for m in self.metrics]

        def cells(r):
            return [f"{r[g][m]['mean']:.4f} ± {r[g][m]['std']:.4f}" if r[g][m]["mean"] is not None else "-"
                    for g, m in cols]
        rows = [["chance", "", ""] + cells(self.chance)]
        rows += [["ref" if r["K"] == 0 else "BT" if r["K"] == 1 else "LoRe", f"{r['alpha']:g}", r["K"]] + cells(r)
                 for r in self.ranks]
        rows += [[b["label"], "", ""] + cells(b) for b in self.baselines.values()]
        lower = sorted(LOWER_IS_BETTER & set(self.metrics))
        print(f"\n{title}: choice quality (best of each prompt's candidates), mean ± std over users; "
              + (f"{', '.join(lower)}: lower is better, the rest higher" if lower else "higher is better")
              + "; chance: a random pick")
        print_table(["method", "alpha", "K"] + [f"{g} {m}" for g, m in cols], rows)
        print(f"choice quality took {self.seconds:.1f}s")
        for g, taus in payload.get("rank_agreement", {}).items():
            print(f"{g} users: Kendall's tau between test accuracy and choice quality over the methods: "
                  + ", ".join(f"{m} {t:+.2f}" for m, t in taus.items()))
        path = save_or_fallback(Path(out_dir) / f"{name}_choice.png", lambda p: self._plot(p, title))
        note_written(record, path)
        print(f"wrote {path}")

    def _plot(self, path, title):
        """One panel per metric: LoRe against K (seen users solid, unseen dashed), baselines and chance as lines."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        K_list = list(dict.fromkeys(r["K"] for r in self.ranks))
        fig, axes = plt.subplots(1, len(self.metrics), figsize=(4.5 * len(self.metrics), 4), squeeze=False)
        for ax, m in zip(axes[0], self.metrics):
            for a, alpha in enumerate(dict.fromkeys(r["alpha"] for r in self.ranks)):
                rs = [r for r in self.ranks if r["alpha"] == alpha]
                for g, style in zip(GROUPS, ("-", "--")):
                    ax.plot(range(len(rs)), [r[g][m]["mean"] for r in rs], style, marker="o", color=f"C{a}",
                            label=f"LoRe, {g} users (alpha={alpha:g})")
            for i, b in enumerate(self.baselines.values()):
                for g, style in zip(GROUPS, (":", "--")):
                    ax.axhline(b[g][m]["mean"], color=f"C{i + 3}", linestyle=style, linewidth=1.2,
                               label=f"{b['label']}, {g} users")
            ax.axhline(self.chance["seen"][m]["mean"], color="grey", linewidth=1, label="chance (seen users)")
            ax.set_xticks(range(len(K_list)))
            ax.set_xticklabels([str(k) for k in K_list])
            ax.set_xlabel("K (0 = reference head, 1 = BT)")
            ax.set_ylabel(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize="small", frameon=False)
        fig.suptitle(f"{title}: choice quality vs rank")
        fig.tight_layout(rect=(0, 0.02 + 0.045 * -(-len(labels) // 4), 1, 1))
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=120)
        finally:
            plt.close(fig)
        return Path(path)
