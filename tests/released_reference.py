"""The released VPL and PAL-B training loops written from their equations, in plain torch: this file imports math and
torch only, nothing of lorelib (tests/test_baselines.py reads its imports with ast), and holds its weights in plain
tensors, not in the modules under test.

Sources (read at the repositories' HEAD):
  VPL, github.com/WEIRDLabUW/vpl_llm: hidden_context/vae_utils.py (PairEncoder, SequenceEncoder, Decoder, VAEModel's
  reparameterization and forward, VAETrainer.compute_loss, Annealer, create_scheduler), hidden_context/
  train_llm_vae_preference_model.py (HF Trainer: adamw_hf, weight decay off for biases, max_grad_norm 1.0, gradient
  accumulation), hidden_context/data_utils/add_survey_contexts.py (each copy's contexts drawn once, at preprocessing),
  submit_job_pets.sh (the Pets run's values).
  PAL-B, github.com/RamyaLab/pluralistic-alignment: src/pal_rm_b/learner.py (PrefLearner_angle), userLearner.py (one
  nn.Parameter [K] ~ randn per user in an nn.ParameterDict), itemLearner.py, src/projector.py (mlp2: three Linear
  layers), src/pal_rm_b/lightningmodule.py (torch Adam over parameter groups, zero_grad() before each step; new
  users: AdamW on the users' weights alone), src/loss_function.py (cross-entropy over (s_c, s_r)),
  config/optim_config/vanilla-e1.yaml (the groups' learning rates and weight decays).

Where this code has to choose something the releases leave to their data pipelines (which pairs form a context, the
random streams), it follows the description of the project's protocol (a pair's contexts are other pairs of its user,
every random draw from one torch.Generator in a stated order), written out here, so that a fit can be compared with
the module's to float precision.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------------------- pieces


def linear(x, layer):
    """x W^T + b for layer = (W [out, in], b [out])."""
    return x @ layer[0].T + layer[1]


def mlp(layers, x, act):
    """x through the layers [(W, b), ...], act between them (none after the last)."""
    for i, layer in enumerate(layers):
        x = linear(x, layer)
        if i < len(layers) - 1:
            x = act(x)
    return x


def leaky_relu(x):
    """nn.LeakyReLU(0.2) (VPL's encoder and decoder)."""
    return torch.where(x > 0, x, 0.2 * x)


def gelu(x):
    """nn.GELU, the exact (erf) form (PAL-B's mlp2-gelu projectors)."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def softmax(x):
    """Softmax over the last axis."""
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def softplus(x):
    """log(1 + exp(x)), in its overflow-free form max(x, 0) + log(1 + exp(-|x|))."""
    return torch.where(x > 0, x, torch.zeros_like(x)) + torch.log(1 + torch.exp(-x.abs()))


def cosine(a, b):
    """Cosine of the rows of a and b: the released a / |a| . b / |b|."""
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


class Adam:
    """torch.optim.Adam (decoupled=False: weight decay as an L2 term added to the gradient) and torch.optim.AdamW
    (decoupled=True: p <- p (1 - lr wd) before the step), written out: groups of parameter tensors, each with its lr
    and weight_decay; every tensor its own step count t and moments m, v; m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2)
    g^2, p <- p - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps). A tensor whose gradient is None in a step (its
    gradient set to None by zero_grad and not reached by the loss) is skipped: its t, m and v do not move."""

    def __init__(self, groups, decoupled, betas=(0.9, 0.999), eps=1e-8):
        self.groups, self.decoupled, (self.b1, self.b2), self.eps = groups, decoupled, betas, eps
        self.state = {}

    def zero_grad(self):
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, lr_factor=1.0):
        for group in self.groups:
            lr, wd = group["lr"] * lr_factor, group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                t, m, v = self.state.get(id(p), (0, torch.zeros_like(p), torch.zeros_like(p)))
                if wd and self.decoupled:
                    p.mul_(1 - lr * wd)
                elif wd:
                    g = g + wd * p
                t += 1
                m = self.b1 * m + (1 - self.b1) * g
                v = self.b2 * v + (1 - self.b2) * g * g
                p.sub_(lr / (1 - self.b1 ** t) * m / (v.sqrt() / math.sqrt(1 - self.b2 ** t) + self.eps))
                self.state[id(p)] = (t, m, v)


def clip_grad_norm(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ (the HF Trainer's clipping): every gradient times min(1, max_norm / (|g| +
    1e-6)), |g| the 2-norm of all the gradients together."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([g.norm() for g in grads]).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def warmup_cosine(step, total_steps, warmup_ratio):
    """transformers' get_cosine_schedule_with_warmup as the release's create_scheduler builds it, num_warmup_steps =
    int(0.03 * num_training_steps) (0.03 = warmup_ratio): the learning rate factor of optimizer step `step` (0, 1,
    ...): step / max(1, warmup) in the warm-up (the first step at lr 0), then 0.5 (1 + cos(pi progress))."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def annealer_slope(step, total_steps, baseline=0.1):
    """The release's Annealer(total_steps, shape="cosine", baseline=0.1, cyclical=True): slope after `step` calls of
    step(), y = (cos(pi (t / T - 1)) + 1) / 2 with t = step mod T (the cyclical reset), then y (1 - baseline) +
    baseline."""
    t = step % total_steps
    y = (math.cos(math.pi * (t / total_steps - 1)) + 1) / 2
    return y * (1 - baseline) + baseline


def pair_rows(user, num_users):
    """Each user's pair indices [n_u], ascending."""
    return [torch.nonzero(user == u).flatten() for u in range(num_users)]


def user_logits(num_users, K, gen):
    """[C, K] users' logits as the released UserLearner.init_weight draws them, torch.randn(K) per user in user order
    (here from the generator `gen`)."""
    return torch.stack([torch.randn(K, generator=gen) for _ in range(num_users)]) if num_users else torch.zeros(0, K)


# -------------------------------------------------------------------------------------------------------------- VPL
# weights: {"encoder": [(W, b)] x 3, "query", "key", "value", "mu", "logvar": (W, b), "decoder": [(W, b)] x 3}


def vpl_params(weights):
    """(every tensor, the weight matrices, the biases) of VPL's weights."""
    layers = weights["encoder"] + [weights[k] for k in ("query", "key", "value", "mu", "logvar")] + weights["decoder"]
    return [t for layer in layers for t in layer], [W for W, _ in layers], [b for _, b in layers]


def vpl_encode(weights, e_chosen, e_rejected):
    """(mu, log sigma^2) [L] of one target pair's context pairs e_chosen, e_rejected [c, F]: PairEncoder on [e_c; e_r],
    SequenceEncoder's attention over the c contexts (softmax(q k^T / sqrt(L)) v, mean over the contexts), the mean and
    log-variance layers, both clamped to [-1, 1] (VAEModel.forward; the KL uses the clamped values). No context at all
    (a user with one pair): h = 0 (the released mean of an empty set is undefined; the module's masked mean gives 0)."""
    h = mlp(weights["encoder"], torch.cat([e_chosen, e_rejected], -1), leaky_relu)  # [c, L]
    if len(h):
        q, k, v = (linear(h, weights[name]) for name in ("query", "key", "value"))
        h = (softmax(q @ k.T / math.sqrt(h.shape[-1])) @ v).mean(0)
    else:
        h = torch.zeros(weights["mu"][0].shape[1])
    return torch.clamp(linear(h, weights["mu"]), -1, 1), torch.clamp(linear(h, weights["logvar"]), -1, 1)


def vpl_reward(weights, e, z):
    """Decoder: r(e, z) = MLP([e; z]) (LeakyReLU 0.2), a scalar per row."""
    return mlp(weights["decoder"], torch.cat([e, z], -1), leaky_relu)[..., 0]


def vpl_contexts(user, num_users, num_contexts, num_duplicates, min_length, gen):
    """[D, M, C] context pair indices (-1: none) of every pair in each of the D copies, drawn once, before training
    (add_survey_contexts.py draws each copy's contexts at preprocessing and the training reads them in every epoch).
    A pair's contexts: min(C, n - 1) other pairs of its user, or with min_length the first c of them, c uniform in
    min_length..C per pair (random.randint(2, context_length) in the release). Draw order, for each copy, for each
    user in user order: the lengths torch.randint(min_length, C + 1, (n, 1)) (with min_length < C only), then scores
    torch.rand(n, n), row j for the user's pair j, its own entry set to 2 (never picked); a pair's contexts are its
    row's c lowest scores (topk, largest=False, ascending), a uniform sample without replacement. (The module draws a
    user's scores in blocks of rows past 2048 pairs, which may order the stream differently; the tests' users have
    fewer.)"""
    M, C = len(user), num_contexts
    ctx = torch.full((num_duplicates, M, C), -1, dtype=torch.long)
    random_length = min_length is not None and min_length < C
    for d in range(num_duplicates):
        for rows in pair_rows(user, num_users):
            n = len(rows)
            c = min(C, n - 1)
            length = torch.randint(min_length, C + 1, (n, 1), generator=gen) if random_length else torch.full((n, 1), C)
            scores = torch.rand(n, n, generator=gen)
            scores[torch.arange(n), torch.arange(n)] = 2.0
            picked = rows[scores.topk(c, dim=1, largest=False).indices]  # [n, c]
            ctx[d, rows, :c] = torch.where(torch.arange(c) < length, picked, torch.full_like(picked, -1))
    return ctx


def released_vpl_fit(weights, table, chosen, rejected, user, num_users, *, num_contexts, min_length,
                     num_duplicates, num_epochs, batch_size, micro_batch_size, learning_rate, weight_decay,
                     warmup_ratio, max_grad_norm, beta, kl_period, seed):
    """VPL's released training on the pairs (table [R, F], chosen, rejected, user [M]), weights trained in place.

    Per target pair: its contexts (vpl_contexts), (mu, log sigma^2) = vpl_encode, z = mu + sigma eps (eps ~ N(0, I)),
    z <- z / |z| sqrt(L) (reparameterization), rewards r(chosen, z), r(rejected, z). A step of batch_size pairs is
    batch_size / micro_batch_size forward passes (per_device_train_batch_size 4 x gradient_accumulation_steps 8 in
    the release), each with the loss mean -log sigmoid(r_c - r_r) + beta a(t) mean KL(N(mu, sigma^2) || N(0, I)),
    KL = -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2), a(t) = annealer_slope(t, kl_period) with t the passes so far
    (the Annealer steps once per compute_loss call); the step's gradient is that of the mean of its passes' losses
    (HF's accumulation divides each by the accumulation steps: the same where every step has its full number of
    passes, as in the tests). Then clip_grad_norm, then AdamW (HF's Trainer: weight decay on the weight matrices,
    none on biases) at lr learning_rate x warmup_cosine(step). Written as torch's AdamW, as the module steps: the
    release's optim="adamw_hf" (transformers.AdamW) adds eps to sqrt(v) before the bias correction, i.e. eps /
    sqrt(1 - b2^t) in torch's form (3e-7 at the first step), and decays after the step. That is a departure of the
    module, not of this reference: on tests/test_baselines.py's small VPL the two forms part by up to 1e-3 in the
    query weights after 30 steps, beyond the float tolerance of the comparison.

    Random draws, all from torch.Generator().manual_seed(seed), in this order: the contexts of every copy, then per
    epoch the order of the D x M items torch.randperm(D M) (item i: pair i mod M of copy i // M), and per step eps
    torch.randn(B, L), row b for the step's b-th pair."""
    M, D, B = len(user), num_duplicates, batch_size
    params, matrices, biases = vpl_params(weights)
    for p in params:
        p.requires_grad_(True)
    opt = Adam([{"params": matrices, "lr": learning_rate, "weight_decay": weight_decay},
                {"params": biases, "lr": learning_rate, "weight_decay": 0.0}], decoupled=True)
    steps = math.ceil(D * M / B)
    total = num_epochs * steps
    gen = torch.Generator().manual_seed(seed)
    ctx = vpl_contexts(user, num_users, num_contexts, D, min_length, gen)
    L = weights["mu"][0].shape[0]
    passes_so_far, step = 0, 0
    for _ in range(num_epochs):
        order = torch.randperm(D * M, generator=gen)
        for b in range(steps):
            items = order[b * B:(b + 1) * B]
            eps = torch.randn(len(items), L, generator=gen)
            passes = items.split(micro_batch_size)
            loss = 0.0
            for j, part in enumerate(passes):
                bt, kl = [], []
                for i, item in enumerate(part.tolist(), start=j * micro_batch_size):  # i: the pair's row of eps
                    copy, pair = divmod(item, M)
                    c = ctx[copy, pair]
                    c = c[c >= 0]
                    mu, logvar = vpl_encode(weights, table[chosen[c]], table[rejected[c]])
                    z = mu + torch.exp(0.5 * logvar) * eps[i]
                    z = z / torch.clamp(z.norm(), min=1e-12) * math.sqrt(L)
                    r_c = vpl_reward(weights, table[chosen[pair]], z)
                    r_r = vpl_reward(weights, table[rejected[pair]], z)
                    bt.append(softplus(-(r_c - r_r)))  # -log sigmoid(r_c - r_r)
                    kl.append(-0.5 * (1 + logvar - mu ** 2 - torch.exp(logvar)).sum())
                a = annealer_slope(passes_so_far, kl_period)
                passes_so_far += 1
                loss = loss + (torch.stack(bt).mean() + beta * a * torch.stack(kl).mean()) / len(passes)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm(params, max_grad_norm)
            opt.step(warmup_cosine(step, total, warmup_ratio))
            step += 1
    for p in params:
        p.requires_grad_(False)
    return weights


@torch.no_grad()
def vpl_latents(weights, table, chosen, rejected, user, num_users, num_contexts, seed):
    """[C, L] each user's latent at evaluation: z = mu (VAEModel.forward when not training), encoded from at most C of
    the user's pairs: all of them where it has at most C, else those of torch.randperm(n)[:C], users in order, from
    torch.Generator().manual_seed(seed + 1) (the project's protocol: the user's own pairs are its context)."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for rows in pair_rows(user, num_users):
        pick = rows[torch.randperm(len(rows), generator=gen)[:num_contexts]] if len(rows) > num_contexts else rows
        out.append(vpl_encode(weights, table[chosen[pick]], table[rejected[pick]])[0])
    return torch.stack(out)


@torch.no_grad()
def vpl_margins(weights, table, chosen, rejected, user, z):
    """[M] r(chosen, z_user) - r(rejected, z_user)."""
    zu = z[user]
    return vpl_reward(weights, table[chosen], zu) - vpl_reward(weights, table[rejected], zu)


# ------------------------------------------------------------------------------------------------------------ PAL-B
# weights: {"f": [(W, b)] x 3, "g": K x [(W, b)] x 3, "tau": scalar tensor}; users' logits: a list of C tensors [K]


def released_pal_b_margin(weights, W_rows, e_chosen, e_rejected):
    """PAL-B's margin [B] (PrefLearner_angle): item map f(x), prompt maps g_k of the prompt, user ideal point a_u =
    sum_k softmax(w_u)_k g_k(prompt) (UserLearner.forward), score s(x) = min(exp(tau), 100) cos(a_u, f(x)); margin
    s(chosen) - s(rejected). The prompt: the mean of the pair's two rows (the project has one embedding per whole
    conversation and no prompt-only embedding; its stated proxy)."""
    w, prompt = softmax(W_rows), (e_chosen + e_rejected) / 2
    a = sum(w[:, k:k + 1] * mlp(g, prompt, gelu) for k, g in enumerate(weights["g"]))
    scale = torch.clamp(torch.exp(weights["tau"]), max=100.0)
    return scale * (cosine(a, mlp(weights["f"], e_chosen, gelu)) - cosine(a, mlp(weights["f"], e_rejected, gelu)))


def released_pal_b_loss(weights, W_rows, e_chosen, e_rejected):
    """The released loss: cross-entropy over the scores (s_c, s_r) with the chosen side the label, averaged over the
    batch: mean log(1 + exp(-(s_c - s_r)))."""
    return softplus(-released_pal_b_margin(weights, W_rows, e_chosen, e_rejected)).mean()


def pal_a_margin(weights, P, W_rows, e_chosen, e_rejected):
    """PAL-A's margin [B] (PrefLearner_dist with UserLearner_FPw): a_u = f(softmax(w_u) P), margin |f(x_r) - a_u| -
    |f(x_c) - a_u| (ReLU MLP f; the project's plain MLP in place of the released residual one)."""
    a = mlp(weights["f"], softmax(W_rows) @ P, relu)
    return (mlp(weights["f"], e_rejected, relu) - a).norm(dim=-1) - (mlp(weights["f"], e_chosen, relu) - a).norm(dim=-1)


def released_pal_fit(weights, table, chosen, rejected, user, num_users, *, K, learning_rate, weight_decay,
                     user_learning_rate, tau_learning_rate, batch_size, num_epochs, seed):
    """PAL-B's released training (LearnerWrapLightning.training_step, configure_optimizers in "new_pair" mode) on the
    pairs; weights trained in place -> the users' logits [C, K].

    One tensor [K] ~ randn per user (user_logits, from torch.Generator().manual_seed(seed)); one Adam (coupled L2
    weight decay) over the groups: projectors f and g_k, every parameter biases included (lr learning_rate,
    weight_decay), the users' logits (user_learning_rate, no decay), tau (tau_learning_rate, no decay); gradients
    set to None before each step, so a user's logits and Adam state move only in the steps where it has a pair in the
    batch. Per epoch the pairs in the order torch.randperm(M) of the same generator, batches of batch_size."""
    gen = torch.Generator().manual_seed(seed)
    W = [w.clone().requires_grad_(True) for w in user_logits(num_users, K, gen)]
    projectors = [t for layer in weights["f"] + [layer for g in weights["g"] for layer in g] for t in layer]
    for p in projectors + [weights["tau"]]:
        p.requires_grad_(True)
    opt = Adam([{"params": projectors, "lr": learning_rate, "weight_decay": weight_decay},
                {"params": W, "lr": user_learning_rate, "weight_decay": 0.0},
                {"params": [weights["tau"]], "lr": tau_learning_rate, "weight_decay": 0.0}], decoupled=False)
    M = len(user)
    for _ in range(num_epochs):
        order = torch.randperm(M, generator=gen)
        for s in range(0, M, batch_size):
            idx = order[s:s + batch_size]
            opt.zero_grad()
            W_rows = torch.stack([W[u] for u in user[idx].tolist()])
            released_pal_b_loss(weights, W_rows, table[chosen[idx]], table[rejected[idx]]).backward()
            opt.step()
    for p in projectors + [weights["tau"]]:
        p.requires_grad_(False)
    return torch.stack([w.detach() for w in W]) if W else torch.zeros(0, K)


def released_pal_new_users(weights, table, chosen, rejected, user, num_users, *, K, fewshot_learning_rate,
                           fewshot_epochs, fewshot_batch_size, seed):
    """PAL-B's released new-user fit (main_pal_b_unseen.py: the projectors and tau frozen, fresh users' weights,
    "new_user" mode: AdamW on the users' weights alone, no weight decay, gradients set to None before each step) ->
    the new users' logits [C', K]. Fresh logits user_logits from torch.Generator().manual_seed(seed + 1), then per
    epoch torch.randperm(M) of the same generator, batches of fewshot_batch_size, fewshot_epochs epochs."""
    gen = torch.Generator().manual_seed(seed + 1)
    W = [w.clone().requires_grad_(True) for w in user_logits(num_users, K, gen)]
    opt = Adam([{"params": W, "lr": fewshot_learning_rate, "weight_decay": 0.0}], decoupled=True)
    M = len(user)
    for _ in range(fewshot_epochs):
        order = torch.randperm(M, generator=gen)
        for s in range(0, M, fewshot_batch_size):
            idx = order[s:s + fewshot_batch_size]
            opt.zero_grad()
            W_rows = torch.stack([W[u] for u in user[idx].tolist()])
            released_pal_b_loss(weights, W_rows, table[chosen[idx]], table[rejected[idx]]).backward()
            opt.step()
    return torch.stack([w.detach() for w in W]) if W else torch.zeros(0, K)
