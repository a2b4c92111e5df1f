"""Shapley values of a cooperative game over n players, exact or estimated by sampling.

CopRA (Zhuang et al., 2024) treats every LoRA layer as a player and scores a coalition by the model
with only those layers' adapters switched on; Sec. 3 reads the training as optimizing a cooperative
game and Eq. 3 estimates each layer's Shapley value with Owen's multilinear extension. This module
knows nothing about LoRA: it takes `value(mask) -> float` (mask: one bool per player) or a batched
`values(masks[m, n]) -> [m]`, so the same estimators serve real models and tests on toy games.

Efficiency (sum of values == v(all) - v(empty)): `exact` satisfies it to rounding; `permutation`
satisfies it per sampled permutation, hence exactly (to rounding) for any sample size; `multilinear`
satisfies it only in expectation (the error shrinks like its stderr).

Two choices answer the faults a comparison with shapiq 1.8.0 found (issue 15, 12/24-player games):
- Exact when affordable. A sampler whose budget (the most distinct coalitions it may evaluate) is at
  least the 2^n coalitions of the game returns the exact values instead (`method == "exact"`), unless
  `exact_when_affordable=False`.
- A standard error that is not falsely 0. On 0/1-valued games (accuracy on a small set) a player's
  sampled marginals are often all equal by chance (all 0, or 1 in every sampled order), so their
  sample variance is 0 while the error is not. Each player's per-draw variance is therefore raised
  to at least the Bernoulli bound q (1 - q) d^2, where q = 1 / (m + 2) is Laplace's rule-of-succession
  chance that a draw differs from the m equal ones seen, and d is the spread of all sampled marginals
  (max - min over every player and draw; 1 for a 0/1 game whose marginals reach 0 and 1), or the
  efficiency gap |sum phi - (v(all) - v(empty))| if that is larger. The floor is 0 only when every
  sampled marginal of every player is the same number and efficiency holds. It is conservative for
  an additive game with unequal weights (a sample cannot tell its constant marginals from a rare
  change), and it shrinks like d / m, faster than the sampling error's 1 / sqrt(m). On a 6-player
  0/1 threshold game with 6 samples, +-2 SE covered the exact value in 98% (permutation) and 99.9%
  (multilinear) of player estimates over 300 seeds; with 20 samples, 95% and 92%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from copra.utils.errors import UserError

Value = Callable[[tuple], float]
Values = Callable[[np.ndarray], Sequence[float] | np.ndarray]  # [m] values; Game.evaluate reads either by np.asarray


class Game:
    """A value function with a cache: no coalition is evaluated twice.

    `evaluations` counts distinct coalitions evaluated; `batches` counts calls of `values`.
    Estimators accept a Game in place of `value`, so several estimates can share one cache.
    """

    def __init__(self, value: Value | None = None, values: Values | None = None, *, n: int):
        if value is None and values is None:
            raise UserError("give a value function: value(mask) -> float or values(masks) -> array")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise UserError(f"empty player list: a game needs n >= 1 players, got n={n!r}")
        self.value, self.values, self.n = value, values, int(n)
        self.cache: dict[tuple[bool, ...], float] = {}
        self.batches = 0

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def __call__(self, mask: Sequence[bool]) -> float:
        return float(self.evaluate(np.asarray([mask], dtype=bool))[0])

    def evaluate(self, masks: np.ndarray) -> np.ndarray:
        """v of each row of `masks` [m, n]; uncached coalitions go to `values` in one deduped batch."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n:
            raise UserError(f"coalition masks must have shape [m, {self.n}], got {list(masks.shape)}")
        keys = [tuple(row) for row in masks.tolist()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            if self.values is not None:
                self.batches += 1
                got = np.asarray(self.values(np.array(missing, dtype=bool)), dtype=np.float64).reshape(-1)
                if got.shape[0] != len(missing):
                    raise UserError(f"values(masks) returned {got.shape[0]} values for {len(missing)} coalitions")
            else:
                assert self.value is not None  # __init__ refuses a Game with neither value nor values
                got = np.array([float(self.value(k)) for k in missing], dtype=np.float64)
            for key, v in zip(missing, got.tolist()):
                if not math.isfinite(v):
                    players = [i for i, on in enumerate(key) if on]
                    raise UserError(f"the value function returned {v} for the coalition of players {players}")
                self.cache[key] = v
        return np.array([self.cache[k] for k in keys], dtype=np.float64)


@dataclass
class ShapleyResult:
    values: np.ndarray  # [n] per-player estimate
    stderr: np.ndarray  # [n] standard error of each estimate (zeros for exact)
    v_empty: float
    v_full: float
    evaluations: int  # distinct coalitions evaluated (cumulative when a shared Game is passed)
    method: str
    samples: int = 0  # sampled permutations / coalitions (0 for exact)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["values"] = [float(x) for x in self.values]
        out["stderr"] = [float(x) if math.isfinite(x) else None for x in self.stderr]  # NaN: one draw only
        return out


def _game(value, n: int, values: Values | None) -> Game:
    if isinstance(value, Game):
        if value.n != n:
            raise UserError(f"the Game has {value.n} players but n={n}")
        return value
    return Game(value, values, n=n)


def _check_samples(samples, least: int, what: str) -> int:
    if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < least:
        raise UserError(f"samples must be an integer >= {least} ({what}), got {samples!r}")
    return int(samples)


def affordable(n: int, budget: int, max_players: int = 16) -> bool:
    """Whether the exact values (all 2^n coalitions) cost no more than `budget` distinct evaluations."""
    return n <= max_players and 2**n <= budget


def variance_floor(marginals: np.ndarray, draws: int, gap: float) -> float:
    """The least per-draw variance of a player's marginal: q (1 - q) d^2 (see the module docstring).

    marginals: [draws, n] sampled marginal contributions; gap: sum of estimates - (v(all) - v(empty)).
    """
    spread = max(float(marginals.max() - marginals.min()), abs(gap)) if marginals.size else abs(gap)
    q = 1.0 / (draws + 2)
    return q * (1 - q) * spread**2


def _ends(game: Game) -> tuple[float, float]:
    v = game.evaluate(np.array([[False] * game.n, [True] * game.n]))
    return float(v[0]), float(v[1])


def exact(value, n: int, *, values: Values | None = None, max_players: int = 16) -> ShapleyResult:
    """phi_i = sum over S not containing i of |S|!(n-|S|-1)!/n! * (v(S + i) - v(S)); all 2^n coalitions."""
    game = _game(value, n, values)
    if n > max_players:
        raise UserError(
            f"exact Shapley values enumerate all 2^n coalitions; n={n} players is over the limit of "
            f"max_players={max_players}: estimate them with `multilinear` (or `permutation`) instead"
        )
    index = np.arange(2**n)
    bits = ((index[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)  # bit i of the index = player i
    v = game.evaluate(bits)
    size = bits.sum(1)
    weight = np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])
    phi = np.empty(n)
    for i in range(n):
        without = index[~bits[:, i]]
        phi[i] = np.sum(weight[size[without]] * (v[without | (1 << i)] - v[without]))
    return ShapleyResult(phi, np.zeros(n), float(v[0]), float(v[-1]), game.evaluations, "exact")


def permutation(
    value,
    n: int,
    samples: int,
    seed: int = 0,
    *,
    antithetic: bool = False,
    values: Values | None = None,
    exact_when_affordable: bool = True,
) -> ShapleyResult:
    """Monte Carlo over random player orders: phi_i = mean marginal contribution of i to its predecessors.

    `samples` permutations (with `antithetic`, ceil(samples/2) random ones, each paired with its
    reverse) cost at most samples * (n - 1) + 2 distinct value calls; when that is >= 2^n the exact
    values are returned instead. The stderr comes from the per-permutation (per-pair) marginal
    contributions, with the variance floor above; it is NaN when there is only one of them.
    """
    game = _game(value, n, values)
    samples = _check_samples(samples, 1, "permutations to draw")
    units = math.ceil(samples / 2) if antithetic else samples
    if exact_when_affordable and affordable(n, (2 * units if antithetic else units) * (n - 1) + 2):
        return exact(game, n)
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(units)])
    if antithetic:
        perms = np.stack([perms, perms[:, ::-1]], axis=1).reshape(-1, n)
    rank = np.argsort(perms, axis=1)  # rank[s, j]: position of player j in permutation s
    masks = rank[:, None, :] < np.arange(n + 1)[None, :, None]  # [P, n+1, n]: prefixes of each order
    v = game.evaluate(masks.reshape(-1, n)).reshape(len(perms), n + 1)
    contrib = np.take_along_axis(np.diff(v, axis=1), rank, axis=1)  # [P, n] marginal of each player
    if antithetic:
        contrib = contrib.reshape(units, 2, n).mean(1)
    v_empty, v_full = _ends(game)
    phi = contrib.mean(0)
    if units > 1:
        floor = variance_floor(contrib, units, float(phi.sum()) - (v_full - v_empty))
        stderr = np.sqrt(np.maximum(contrib.var(0, ddof=1), floor) / units)
    else:
        stderr = np.full(n, np.nan)
    return ShapleyResult(phi, stderr, v_empty, v_full, game.evaluations, "permutation", len(perms))


def multilinear(
    value,
    n: int,
    samples: int,
    seed: int = 0,
    *,
    q_points: int | None = None,
    antithetic: bool = True,
    values: Values | None = None,
    exact_when_affordable: bool = True,
) -> ShapleyResult:
    """Owen's multilinear extension (paper Eq. 3): phi_i = int_0^1 e_i(q) dq, e_i(q) = E[v(E_i + i) - v(E_i)].

    E_i holds each other player with probability q. One sampled coalition S gives every player a
    marginal v(S + i) - v(S - i) (the law of S without i is that of E_i), from the n + 1 coalitions S
    and S with one player toggled. So `samples` (the number of sampled S) costs at most
    samples * (n + 1) + 2 distinct value calls, fewer when coalitions repeat (the cache dedupes).

    Quadrature: the range of q is cut into `q_points` equal strata and each draw takes its own q
    uniformly inside its stratum (stratified sampling: unbiased, no grid bias). With `antithetic`
    (Okhrati & Lipani's "halved" estimator) that range is [0, 1/2] and each S = {j : U_j < q} is
    paired with its complement {j : U_j >= q}, a draw at 1 - q; a pair counts as two samples (an odd
    `samples` is rounded up). Every stratum needs at least two independent draws (pairs) for the
    stratified stderr, so q_points defaults to, and may not exceed, half the number of them. When the
    budget samples * (n + 1) + 2 is >= 2^n the exact values are returned instead.
    """
    game = _game(value, n, values)
    least = 4 if antithetic else 2
    samples = _check_samples(samples, least, "two independent draws; an antithetic pair counts twice")
    units = math.ceil(samples / 2) if antithetic else samples
    most = units // 2
    if q_points is None:
        q_points = max(1, most)
    elif not isinstance(q_points, (int, np.integer)) or not 1 <= q_points <= most:
        raise UserError(
            f"q_points must be an integer in [1, {most}] (each q stratum needs two draws for the stderr; "
            f"{units} independent draws from samples={samples}), got {q_points!r}"
        )
    q_points = int(q_points)
    if exact_when_affordable and affordable(n, (2 * units if antithetic else units) * (n + 1) + 2):
        return exact(game, n)
    counts = np.full(q_points, units // q_points) + (np.arange(q_points) < units % q_points)
    stratum = np.repeat(np.arange(q_points), counts)
    width = (0.5 if antithetic else 1.0) / q_points
    rng = np.random.default_rng(seed)
    q = (stratum + rng.random(units)) * width
    coalitions = rng.random((units, n)) < q[:, None]  # [U, n]
    draws = [coalitions, ~coalitions] if antithetic else [coalitions]
    eye = np.eye(n, dtype=bool)
    marginals = []
    for s in draws:
        with_i = s[:, None, :] | eye[None]  # [U, n, n]: S + i for each player i
        without_i = s[:, None, :] & ~eye[None]
        v = game.evaluate(np.concatenate([with_i, without_i]).reshape(-1, n)).reshape(2, units, n)
        marginals.append(v[0] - v[1])
    unit = np.mean(marginals, axis=0)  # [U, n]: one marginal per player (pair-averaged if antithetic)
    phi = np.zeros(n)
    variance = np.zeros(n)
    for k in range(q_points):
        rows = unit[stratum == k]
        phi += rows.mean(0) / q_points
        variance += rows.var(0, ddof=1) / len(rows) / q_points**2
    v_empty, v_full = _ends(game)
    floor = variance_floor(unit, units, float(phi.sum()) - (v_full - v_empty))
    used = 2 * units if antithetic else units
    stderr = np.sqrt(np.maximum(variance, floor / units))
    return ShapleyResult(phi, stderr, v_empty, v_full, game.evaluations, "multilinear", used)


# their signatures differ past (value, n): exact takes no samples or seed
ESTIMATORS: dict[str, Callable[..., ShapleyResult]] = {
    "exact": exact,
    "permutation": permutation,
    "multilinear": multilinear,
}

__all__ = [
    "ESTIMATORS",
    "Game",
    "ShapleyResult",
    "affordable",
    "exact",
    "multilinear",
    "permutation",
    "variance_floor",
]
