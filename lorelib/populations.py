"""Synthetic populations: C users' reward functions over embeddings e [n, F], one family per method's own
assumptions, and hard users. The datasets' generators (make_synthetic) take their users' rewards from here.

    lowrank            LoRe's model: r_u(e) = e^T h_u, the h_u in a rank-K subspace (Linear; the datasets draw
                       it themselves, in their own order, so that their data stay as they were)
    ideal_points       PAL's model: r_u(e) = -||P e - a_u||, a_u = sum_k w_uk c_k, w_u on the simplex
    latent             VPL's model: r_u(e) = MLP([e, z_u]), z_u ~ N(0, I_L) per user
    nonlinear_mixture  PersonalLLM's structure: r_u(e) = sum_k w_uk MLP_k(e), w_u on the simplex

Every embedding a generator makes is a prompt's context plus noise, e = c + n with c, n ~ N(0, I_F) (so e ~
N(0, 2 I) and two responses to one prompt differ by N(0, 2 I)). The families' parameters are scaled for that: a
projection or a first layer maps e to unit-variance coordinates. Each user's reward (not lowrank's: as drawn) is
then divided by a constant, so that its margin between two responses to one prompt, r_u(e1) - r_u(e2), has root
mean square sqrt(2), as a unit-norm linear reward's has (measured on PROBE_PAIRS probe pairs): a dataset's choice
noise then meets every family with margins of one size.

Hard users (MRM's hardest users): round(hard_users * C) users drawn at random, of kind "opposite" (their reward
negated: Population.negate) or "noise" (each of their choices made at random with probability hard_noise, a pair's
label so flipped with probability hard_noise / 2: flip_labels; default 1: labels flipped with probability 1/2).

Imports: config.
"""
import math

import numpy as np
import torch

from .config import InputError, check_value

POPULATIONS = ("lowrank", "ideal_points", "latent", "nonlinear_mixture")
# the range of the population settings (config.check_value rules; every dataset module adds them to its RULES)
RULES = {"population": "one of " + " ".join(POPULATIONS), "hard_users": "in [0, 1)",
         "hard_kind": "one of noise opposite", "hard_noise": "in (0, 1]"}
HIDDEN = 32          # hidden units of the families' MLPs
PROBE_PAIRS = 2048   # probe pairs of responses (one context each) on which each user's margin scale is measured
_STREAM = 1729       # the populations' own generator: seeded from (seed, _STREAM), apart from the datasets' own


def generator(seed):
    """The torch.Generator a generator draws populations and hard users from: seeded from (seed, a fixed stream
    number) through NumPy's SeedSequence, so that it shares no draws with the dataset's own generators seeded
    with `seed` (whose data, lowrank's included, stay as they were)."""
    state = np.random.SeedSequence([int(seed), _STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Population:
    """C users' rewards over embeddings. A family (subclass) defines _rewards(e [n, F]) -> [n, C] and
    _reward(e [n, F], user [n]) -> [n] (user[i]'s reward of row i), raw; the population multiplies them by
    sign / scale ([C] each: -1 for opposite users; the margin scale)."""

    def __init__(self, name, num_users):
        self.name, self.num_users = name, int(num_users)
        self.sign = torch.ones(self.num_users, dtype=torch.float64)
        self.scale = torch.ones(self.num_users, dtype=torch.float64)

    def _factor(self, dtype):
        return (self.sign / self.scale).to(dtype)

    def reward(self, e, user):
        """[n] the reward of row i of e [n, F] for user[i] ([n] long)."""
        user = torch.as_tensor(user, dtype=torch.long)
        return self._reward(e, user) * self._factor(e.dtype)[user]

    def rewards(self, e):
        """[n, C] every user's reward of every row of e [n, F]."""
        return self._rewards(e) * self._factor(e.dtype)

    def margin(self, e1, e2, user):
        """[n] r_user(e1) - r_user(e2) for rows e1, e2 [n, F]."""
        return self.reward(e1, user) - self.reward(e2, user)

    def negate(self, users):
        """The users' rewards negated (hard users of kind "opposite"); returns self."""
        self.sign[torch.as_tensor(users, dtype=torch.long)] = -1.0
        return self

    def calibrate(self, num_features, g):
        """Scale each user's reward so that its margin between two responses to one prompt (context c and the
        responses' noise ~ N(0, I), PROBE_PAIRS pairs drawn from g) has root mean square sqrt(2); returns self."""
        c = torch.randn(PROBE_PAIRS, 1, num_features, generator=g, dtype=torch.float64)
        e = c + torch.randn(PROBE_PAIRS, 2, num_features, generator=g, dtype=torch.float64)
        m = self._rewards(e[:, 0]) - self._rewards(e[:, 1])  # [n, C] raw margins
        self.scale = m.pow(2).mean(0).sqrt() / math.sqrt(2)
        return self

    def linear_direction(self, num_features, g, n=1024):
        """[F] float32: the least-squares linear direction of the mean user's reward (with signs as they are now)
        over e ~ N(0, 2 I), as the mean of its gradient at n points drawn from g (Stein's lemma); for a Linear
        population, the mean of the users' directions."""
        e = (math.sqrt(2) * torch.randn(n, num_features, generator=g, dtype=torch.float64)).requires_grad_()
        with torch.enable_grad():
            self.rewards(e).mean(1).sum().backward()
        return e.grad.mean(0).float()


class Linear(Population):
    """lowrank: r_u(e) = e^T d_u, directions d [C, F] (drawn by the dataset in its own order)."""

    def __init__(self, directions, name="lowrank"):
        super().__init__(name, len(directions))
        self.directions = directions

    def _reward(self, e, user):
        return (e * self.directions.to(e.dtype)[user]).sum(1)

    def _rewards(self, e):
        return e @ self.directions.to(e.dtype).T

    def margin(self, e1, e2, user):
        """((e1 - e2) * d[user]).sum(1), signs applied (x 1 and / 1 are exact): the Reddit TLDR generator's own
        expression."""
        d = self.directions * self.sign[:, None].to(self.directions.dtype)
        return ((e1 - e2) * d[user]).sum(1) / self.scale.to(e1.dtype)[user]

    def linear_direction(self, num_features=None, g=None):
        return (self.directions * self.sign[:, None].to(self.directions.dtype)).mean(0)


def dirichlet(alpha, num_components, num_users, g):
    """[C, K] float32 Dirichlet(alpha * ones(K)) rows, from a NumPy generator seeded by one draw of g."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    return torch.as_tensor(rng.dirichlet(alpha * np.ones(num_components), num_users), dtype=torch.float32)


class IdealPoints(Population):
    """PAL (Chen et al. 2025): r_u(e) = -||P e - a_u||, P [d, F] a fixed random projection (Pe ~ N(0, I_d) for
    e ~ N(0, 2 I)), a_u = w_u @ C the user's ideal point, prototypes C [K, d] ~ N(0, I), w_u [K] on the simplex."""

    def __init__(self, P, prototypes, weights):
        super().__init__("ideal_points", len(weights))
        self.P, self.prototypes, self.weights = P, prototypes, weights
        self.ideal = weights @ prototypes  # [C, d]

    def _reward(self, e, user):
        return -(e @ self.P.to(e.dtype).T - self.ideal.to(e.dtype)[user]).norm(dim=1)

    def _rewards(self, e):
        return -((e @ self.P.to(e.dtype).T)[:, None] - self.ideal.to(e.dtype)).norm(dim=-1)


class Latent(Population):
    """VPL (Poddar et al. 2024): r_u(e) = v^T relu(A e + B z_u), z_u [L] ~ N(0, I) per user; A [H, F] and B [H, L]
    scaled to unit-variance pre-activations (each half from e, half from z), v [H] ~ N(0, I / H)."""

    def __init__(self, A, B, v, z):
        super().__init__("latent", len(z))
        self.A, self.B, self.v, self.z = A, B, v, z

    def _reward(self, e, user):
        pre = e @ self.A.to(e.dtype).T + (self.z[user] @ self.B.T).to(e.dtype)
        return pre.relu() @ self.v.to(e.dtype)

    def _rewards(self, e, users_per_block=64):
        pre_e, pre_z = e @ self.A.to(e.dtype).T, (self.z @ self.B.T).to(e.dtype)  # [n, H], [C, H]
        return torch.cat([(pre_e[:, None] + pre_z[None, u:u + users_per_block]).relu() @ self.v.to(e.dtype)
                          for u in range(0, self.num_users, users_per_block)], dim=1)


class NonlinearMixture(Population):
    """PersonalLLM's structure: M reward models MLP_k(e) = v_k^T relu(A_k e + b_k) (A_k [H, F] scaled to unit-
    variance pre-activations, b_k ~ N(0, I / 4), v_k ~ N(0, I / H)); r_u(e) = sum_k w_uk MLP_k(e), w_u on the
    simplex."""

    def __init__(self, A, b, v, weights):
        super().__init__("nonlinear_mixture", len(weights))
        self.A, self.b, self.v, self.weights = A, b, v, weights

    def models(self, e):
        """[n, M] every reward model's score of every row of e [n, F]."""
        pre = torch.einsum("nf,khf->nkh", e, self.A.to(e.dtype)) + self.b.to(e.dtype)
        return (pre.relu() * self.v.to(e.dtype)).sum(-1)

    def _reward(self, e, user):
        return (self.models(e) * self.weights.to(e.dtype)[user]).sum(1)

    def _rewards(self, e):
        return self.models(e) @ self.weights.to(e.dtype).T


def make_population(name, num_users, num_features, g, rank=4, dirichlet_alpha=0.3, prototypes=False):
    """C = num_users users' rewards of family `name` (not lowrank: the datasets draw it themselves), parameters
    drawn from the torch.Generator g, each user's margin scaled by calibrate -> Population.

    rank: K, the prototypes of ideal_points (their dimension d too) and the reward models of nonlinear_mixture,
    mixed by Dirichlet(dirichlet_alpha) users; L, the latent size of latent. prototypes=True: the users are the
    num_users prototypes / reward models themselves (weights = identity; K = num_users), as PersonalLLM's reward
    model columns, which its users then mix."""
    check_value("population", name, RULES["population"])
    F, C, H = num_features, num_users, HIDDEN
    K = C if prototypes else rank
    weights = None if name == "latent" else (torch.eye(C) if prototypes else dirichlet(dirichlet_alpha, K, C, g))
    if name == "ideal_points":
        P = torch.randn(rank, F, generator=g) / math.sqrt(2 * F)
        pop = IdealPoints(P, torch.randn(K, rank, generator=g), weights)
    elif name == "latent":
        A = torch.randn(H, F, generator=g) / math.sqrt(2 * F)
        B = torch.randn(H, rank, generator=g) / math.sqrt(rank)
        pop = Latent(A, B, torch.randn(H, generator=g) / math.sqrt(H), torch.randn(C, rank, generator=g))
    elif name == "nonlinear_mixture":
        A = torch.randn(K, H, F, generator=g) / math.sqrt(2 * F)
        pop = NonlinearMixture(A, torch.randn(K, H, generator=g) / 2, torch.randn(K, H, generator=g) / math.sqrt(H),
                               weights)
    else:
        raise InputError(f"population={name!r}: lowrank is drawn by each dataset's own generator; "
                         f"make_population makes {', '.join(POPULATIONS[1:])}")
    return pop.calibrate(F, g)


def choose_hard(num_users, fraction, g):
    """[h] sorted long: round(fraction * num_users) users drawn at random from g (none when fraction is 0)."""
    check_value("hard_users", fraction, RULES["hard_users"])
    h = round(fraction * num_users)
    return torch.randperm(num_users, generator=g)[:h].sort().values if h else torch.zeros(0, dtype=torch.long)


def flip_labels(is_hard, rate, g):
    """[n] bool: which of n labels to flip, is_hard [n] bool (the label's user is a "noise" hard user): each hard
    user's label is made at random with probability rate (drawn from g for every label), flipped so with
    probability rate / 2."""
    check_value("hard_noise", rate, RULES["hard_noise"])
    return is_hard & (torch.rand(len(is_hard), generator=g) < rate / 2)


def check_population(config):
    """A script's check (configure(..., checks=[...])): a population other than lowrank, or hard users, only on
    synthetic data."""
    population, hard = config.get("population", "lowrank"), config.get("hard_users", 0)
    if not config.get("synthetic") and (population != "lowrank" or hard):
        what, default = (f"population={population}", "population=lowrank") if population != "lowrank" else \
            (f"hard_users={hard}", "hard_users=0")
        raise InputError(f"{what}: only synthetic data have populations and hard users; pass synthetic=True, or "
                         f"{default} for the prepared data")


def key(config):
    """The population part of a dataset's data_key: its name, and the hard users when there are any."""
    out = config.get("population", "lowrank")
    if config.get("hard_users", 0):
        kind = config.get("hard_kind", "noise")
        out += f" hard_users={config['hard_users']:g} hard_kind={kind}"
        if kind == "noise" and config.get("hard_noise", 1.0) != 1:
            out += f" hard_noise={config['hard_noise']:g}"
    return out


def suffix(config, sep="_"):
    """What a script adds to its synthetic results' file name (sep "_") or title (sep ", "): nothing for lowrank
    without hard users (the names as they were), else sep + the words of key(config), e.g. "_latent"."""
    words = key(config).split()
    return "" if words == ["lowrank"] else sep + sep.join(words)
