"""LoRe: personalized low-rank reward modeling (Bose et al. 2025, arXiv 2504.14439): the published interface.

A user's reward is r_i(x, y) = e(x, y)^T V w_i, with e(x, y) [F] a frozen reward-model embedding, V [F, K] K shared
basis rewards and w_i [K] on the simplex. A comparison is stored as d = e(x, chosen) - e(x, rejected) and trained
with the Bradley-Terry likelihood sigmoid(d^T V w_i / 100).

This file is what notebooks written for the published code import (`import utils`, `from utils import *`): every
name the published utils.py defines, with its parameters, defaults and return layouts (each a thin wrapper of the
package `lorelib` beside it, where the code lives), and the names the README documents (PUBLISHED and DOCUMENTED
below; tests/test_layout.py pins them). Inputs are lists of per-user tensors [m_i, F] (or Pairs). Scripts import
lorelib directly.
"""
import random  # published name

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F  # published name (inside lorelib, F is a feature count)
import torch.optim as optim  # published name

from lorelib.bt import PerUserBT, fit_bt
from lorelib.config import InputError, MissingFileError, check_value, configure, get_device, set_seed
from lorelib.data import (
    Pairs,
    PreferenceData,
    accuracy_by_user,
    as_pairs,
    generate_population,
    sample_population_pairs,
    user_accuracies,
)
from lorelib.export import export_reward_model
from lorelib.extract import extract_embeddings
from lorelib.learned import PersonalizedReward, load_lore_model, read_comparisons, save_lore_model
from lorelib.model import LOGIT_SCALE, LoRe, LoRe_regularized, PersonalizeBatch, personalize_users
from lorelib.pipelines import fit_ranks, select_rank, vary_shots

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # published name, decided at import

# every name the published utils.py defines (../shared/docs/published-api.md) and those the README documents
PUBLISHED = ["torch", "nn", "optim", "F", "np", "random", "device", "simulate_user", "simulate_population",
             "generate_popupulation", "create_sparse_tensor", "sample_shots", "evaluate_model", "eval_multiple",
             "create_dataset_prism", "create_dataset_prism_shots", "learn_multiple", "learn_multiple_few_shot",
             "learn_multiple_few_shot_weighted", "solve", "solve_regularized", "solve_regularized_simplex",
             "solve_multi_reward", "learn_single_reward", "learn_single_reward_regularized", "run", "run_regularized",
             "run_few_shot_vary_shots", "LoRe", "LoRe_regularized", "PersonalizeBatch"]
DOCUMENTED = ["Pairs", "PreferenceData", "InputError", "MissingFileError", "configure", "set_seed", "get_device",
              "generate_population", "sample_population_pairs", "personalize_users", "LOGIT_SCALE", "fit_ranks",
              "select_rank", "vary_shots", "PersonalizedReward", "read_comparisons", "save_lore_model",
              "load_lore_model", "export_reward_model", "extract_embeddings"]
__all__ = PUBLISHED + DOCUMENTED


# --- the pipelines, in their published return layouts ---

def run(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
        test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=1000, learning_rate=0.5,
        fewshot_iterations=500, fewshot_learning_rate=0.1, seed=0, return_models=False):
    """The LoRe pipeline for every alpha and K (lorelib.pipelines.fit_ranks): fit the basis on seen users, evaluate
    them on their train pairs and on unseen prompts, fit few-shot weights of unseen users, evaluate them.

    K = 0: reference head V_final [F, 1], w = [1]; K = 1: one Bradley-Terry reward, w = [1],
    no few-shot step; K >= 2: LoRe. Features: lists of per-user tensors [m_i, F] or Pairs.
    Returns 8 one-dimensional arrays [len(alpha_list) * len(K_list)], alpha-major (all K of the
    first alpha, then the next), as published: mean accuracy over users for (seen train, seen test,
    unseen few-shot train, unseen test), then their std over users (the true std; the published
    code multiplied it by 0.25); with return_models=True also {(alpha, K): {"V", "W", "W_unseen"}}.
    """
    result = fit_ranks(K_list, alpha_list, V_final, (train_features, test_features_sparse, train_features_unseen,
                                                     test_features_sparse_unseen), N, N_unseen, device,
                       num_iterations=num_iterations, learning_rate=learning_rate,
                       fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate, seed=seed)
    return result.published() + (result.models,) if return_models else result.published()


def run_regularized(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
                    test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=20000, learning_rate=0.5,
                    fewshot_iterations=500, fewshot_learning_rate=0.5, seed=0, return_models=False):
    """`run` with LoRe_regularized (pooled loss, cosine pull to V_final, alternating steps)."""
    result = fit_ranks(K_list, alpha_list, V_final, (train_features, test_features_sparse, train_features_unseen,
                                                     test_features_sparse_unseen), N, N_unseen, device,
                       regularized=True, num_iterations=num_iterations, learning_rate=learning_rate,
                       fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate, seed=seed)
    return result.published() + (result.models,) if return_models else result.published()


def run_few_shot_vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
                            test_features_sparse_unseen, V_final, N, N_unseen, device, *, regularized=False,
                            shot_groups=None, num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
                            fewshot_learning_rate=None, seed=0, return_skipped=False, shot_selection="random"):
    """Unseen-user accuracy against the number of few-shot examples (lorelib.pipelines.vary_shots: its docstring
    has the protocol; num_iterations None: 20000 if regularized else 500, as published).

    Returns 4 flat arrays [len(alpha_list) * len(K_list) * len(num_shots)] (alpha-major, then K,
    then shots: for one alpha and one K, the published sequences over num_shots): few-shot train
    accuracy mean and std over trials, unseen-user test accuracy mean and std over trials (each
    trial's value is the mean over users); with return_skipped=True also skipped counts [len(num_shots)].
    With a list of rules for shot_selection: {rule: those 4 arrays} and "full_pool": 4 arrays
    [len(alpha_list) * len(K_list)], the accuracies with w fit on each user's whole pool (mean and std over users).
    """
    many = not isinstance(shot_selection, str)
    result = vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
                        test_features_sparse_unseen, V_final, N, N_unseen, device, regularized=regularized,
                        shot_groups=shot_groups, num_iterations=num_iterations, learning_rate=learning_rate,
                        fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate,
                        seed=seed, shot_selection=shot_selection, full_pool=many)
    if many:
        out = {rule: tuple(acc.reshape(4, -1)) for rule, acc in result.acc.items()}
        out["full_pool"] = tuple(result.full_pool.reshape(4, -1))
        return (out, result.skipped) if return_skipped else out
    out = tuple(result.acc[shot_selection].reshape(4, -1))
    return out + (result.skipped,) if return_skipped else out


# --- population simulation (the PersonalLLM seed functions; sample_population_pairs is the lean one) ---

generate_popupulation = generate_population  # the published name


def _as_array(x):
    """A float64 NumPy array from nested lists / tuples / object arrays of numbers, arrays or tensors
    (the published inputs: a list of P lists of R tensors [F], a NumPy object array of scores)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object and x.ndim > 0):
        return np.stack([_as_array(e) for e in x])
    return np.asarray(x, dtype=np.float64)


def simulate_user(reward_tensor, features, w):
    """One user's pair per prompt, highest- minus lowest-scored response: [P, F].

    reward_tensor: [P, R, M] scores of R responses by M reward models (also a NumPy object array);
    features: [P, R, F] embeddings (also a list of P lists of R tensors [F], as published);
    w: [M] the user's weights over the reward models.
    """
    scores = _as_array(reward_tensor) @ np.asarray(w, dtype=np.float64)  # [P, R]
    best, worst = scores.argmax(1), scores.argmin(1)
    feats = features if isinstance(features, torch.Tensor) else torch.from_numpy(_as_array(features))
    feats = feats.float()
    rows = torch.arange(len(best))
    return feats[rows, torch.as_tensor(best)] - feats[rows, torch.as_tensor(worst)]


def simulate_population(reward_tensor, features, W):
    """[N, P, F] differences for N users (small inputs only: see sample_population_pairs)."""
    if not isinstance(features, torch.Tensor):  # convert the published nested list once, not per user
        features = torch.from_numpy(_as_array(features)).float()
    reward_tensor = _as_array(reward_tensor)
    return torch.stack([simulate_user(reward_tensor, features, w) for w in W])


def create_sparse_tensor(dense_tensor, sample_percentage):
    """Keep int(sample_percentage * P) random prompts of each user: list of N tensors [m, F]."""
    N, P = dense_tensor.shape[:2]
    m = int(sample_percentage * P)
    return [torch.as_tensor(dense_tensor[i][np.random.choice(P, m, replace=False)], dtype=torch.float32)
            for i in range(N)]


def sample_shots(train_features_unseen, shots, rng=None):
    """`shots` random pairs of each user (without replacement).

    train_features_unseen: list of tensors [m_i, F] (returns a list of [shots, F]) or Pairs (returns Pairs).
    A user with fewer than `shots` pairs is an error.
    """
    check_value("shots", shots)
    rng = np.random if rng is None else rng
    pairs = as_pairs(train_features_unseen)
    counts = pairs.counts().tolist()
    short = [i for i, c in enumerate(counts) if c < shots]
    if short:
        raise InputError(f"sample_shots: {len(short)} user(s) have fewer than shots={shots} pairs "
                         f"(user {short[0]} has {counts[short[0]]}); drop them or ask for fewer shots")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.concatenate([s + rng.choice(c, shots, replace=False) for s, c in zip(starts, counts)])
    out = pairs.select(idx)
    return out if isinstance(train_features_unseen, Pairs) else out.to_list()


# --- the PRISM nested-dict format ---

def _dialog_diffs(dialog):
    """[m, F] differences of one published PRISM dialog {"chosen": [...], "rejected": [...]}: entry j of
    chosen (an [F] embedding) against entry j of rejected (an [F] embedding, or [r, F]: each row its own pair)."""
    chosen, rejected = dialog["chosen"], dialog["rejected"]
    if len(chosen) != len(rejected):
        raise InputError(f"a dialog has {len(chosen)} chosen but {len(rejected)} rejected entries")
    rows = []
    for c, r in zip(chosen, rejected):
        c, r = torch.as_tensor(c, dtype=torch.float32).reshape(-1), torch.as_tensor(r, dtype=torch.float32)
        rows.append(c[None] - r.reshape(-1, c.shape[0]))
    if not rows:
        raise InputError("a dialog has no chosen / rejected embeddings")
    return torch.cat(rows)


def create_dataset_prism(embeddings):
    """The published PRISM builder: {user: {dialog: {"chosen": [e [F], ...], "rejected": [e [F] or [r, F], ...]}}}
    -> list of per-user tensors [m_i, F] of chosen - rejected differences (users and dialogs in dict order)."""
    return [torch.cat([_dialog_diffs(d) for d in dialogs.values()]) for dialogs in embeddings.values()]


def create_dataset_prism_shots(embeddings, shots):
    """As create_dataset_prism, from `shots` random dialogs of each user (np.random.choice without
    replacement). A user with fewer than `shots` dialogs is an error."""
    out = []
    for user, dialogs in embeddings.items():
        dialogs = list(dialogs.values())
        if len(dialogs) < shots:
            raise InputError(f"create_dataset_prism_shots: user {user!r} has {len(dialogs)} dialogs, "
                             f"fewer than shots={shots}")
        out.append(torch.cat([_dialog_diffs(dialogs[j]) for j in np.random.choice(len(dialogs), shots, replace=False)]))
    return out


# --- fits ---

def solve_regularized(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01,
                      device=None):
    """Fit LoRe (alpha * sum_j ||V_j - V_sft||^2) -> (W [C, K], V [F, K])."""
    pairs = as_pairs(train_features)
    model = LoRe(V_sft, alpha, len(pairs), pairs.num_features, num_basis_vectors, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def solve_regularized_simplex(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000,
                              learning_rate=0.01, device=None):
    """Fit LoRe_regularized -> (W [C, K'], V [F, K']) with unused bases dropped."""
    pairs = as_pairs(train_features)
    model = LoRe_regularized(V_sft, alpha, len(pairs), pairs.num_features, num_basis_vectors, num_iterations,
                             learning_rate)
    return model.train(pairs, device=device)


def solve(train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01, device=None):
    """Fit LoRe without the regulariser (alpha = 0) -> (W [C, K], V [F, K])."""
    return solve_regularized(None, 0.0, train_features, num_basis_vectors, num_iterations, learning_rate, device)


def solve_multi_reward(train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01, device=None):
    """Fit K basis rewards jointly with the users' weights (LoRe, alpha = 0) -> the fitted LoRe model
    (.V [F, K], .weights() [C, K], .losses)."""
    pairs = as_pairs(train_features)
    model = LoRe(None, 0.0, len(pairs), pairs.num_features, num_basis_vectors, num_iterations, learning_rate)
    model.train(pairs, device=device)
    return model


def learn_multiple_few_shot(train_features, V, num_iterations=1000, learning_rate=0.01, device=None):
    """Few-shot weights of new users on a frozen V [F, K] -> list of C simplex vectors [K] (personalize_users)."""
    return list(personalize_users(train_features, V, num_iterations, learning_rate, device))


def learn_multiple_few_shot_weighted(alpha, train_features, current_dialog_features, V, num_iterations=1000,
                                     learning_rate=0.01, device=None):
    """Few-shot weights of new users on a frozen V [F, K] from two sets of pairs per user, the current dialog's
    weighted by alpha: user i minimises mean_train_i(-log sigmoid) + alpha * mean_current_i(-log sigmoid)
    (a user with no pairs in one set gets only the other term; alpha = 0 is learn_multiple_few_shot).
    -> list of C simplex vectors [K]."""
    train, current = as_pairs(train_features), as_pairs(current_dialog_features)
    if len(train) != len(current):
        raise InputError(f"train_features has {len(train)} users, current_dialog_features {len(current)}")
    V = torch.as_tensor(V, dtype=torch.float32)
    model = PersonalizeBatch(len(train), V.shape[0], V.shape[1], num_iterations, learning_rate)
    (_, XV_t), (_, XV_c) = model.project(train, V), model.project(current, V)
    n_t, n_c = train.counts(), current.counts()
    if ((n_t == 0) & (n_c == 0)).any():
        raise InputError("a user has no pairs in either set")
    pw = torch.cat([1.0 / n_t.clamp(min=1)[train.user].float(), alpha / n_c.clamp(min=1)[current.user].float()])
    return model.fit_projected(torch.cat([XV_t, XV_c]), torch.cat([train.user, current.user]), pw, device)


def learn_multiple(train_features, num_iterations=1000, learning_rate=0.01, device=None):
    """One independent Bradley-Terry reward per user (a per-user baseline) -> (W_list, V_list): C weights [1]
    (ones) and C rewards [F, 1], usable with eval_multiple(W_list, V_list, test_features). User i's reward
    minimises its mean -log sigmoid(d^T v_i / 100), from v_i = 0: lorelib.bt.PerUserBT."""
    model = PerUserBT(num_iterations=num_iterations, learning_rate=learning_rate)
    return model.fit(as_pairs(train_features), device).weights_and_bases()


def learn_single_reward(train_features, num_iterations=1000, learning_rate=0.01, device=None):
    """One Bradley-Terry reward for everyone: the mean -log sigmoid(d^T v / 100) over all pairs pooled,
    from v = 0 -> V [F, 1]."""
    return fit_bt(as_pairs(train_features), num_iterations=num_iterations, learning_rate=learning_rate,
                   device=device)


def learn_single_reward_regularized(V_ref, alpha, train_features, num_iterations=1000, learning_rate=0.01,
                                    device=None):
    """learn_single_reward pulled towards V_ref [F, 1]: plus alpha * ||v - V_ref||^2 -> V [F, 1]."""
    return fit_bt(as_pairs(train_features), V_ref, alpha, num_iterations, learning_rate, device)


# --- evaluation ---

def evaluate_model(X, V, w):
    """Fraction of rows of X [m, F] with X @ V @ w > 0 (a tie counts as wrong)."""
    V = torch.as_tensor(V, dtype=torch.float32)
    w = torch.as_tensor(w, dtype=torch.float32).to(V.device).reshape(-1)
    X = torch.as_tensor(X, dtype=torch.float32).to(V.device)
    return float(accuracy_by_user(X @ V @ w, torch.zeros(len(X), dtype=torch.long), 1)[0])


def eval_multiple(W_list, V_list, test_features, verbose=True):
    """Per-user accuracies [C] (list of floats); prints the mean and std over users.

    W_list: C weight vectors [K] (or a [C, K] tensor); V_list: one V [F, K] shared by all
    users, or a list of C of them; test_features: list of C tensors [m_i, F] or Pairs.
    """
    pairs = as_pairs(test_features)
    W = torch.stack([torch.as_tensor(w, dtype=torch.float32).cpu().reshape(-1) for w in W_list])
    if isinstance(V_list, (list, tuple)):
        accs = [user_accuracies(pairs.select_users([i]), V_list[i], W[i:i + 1])[0] for i in range(len(pairs))]
    else:
        accs = user_accuracies(pairs, V_list, W).tolist()
    if verbose:
        print(f"accuracy: mean {np.mean(accs):.4f}, std {np.std(accs):.4f} over {len(accs)} users")
    return list(accs)
