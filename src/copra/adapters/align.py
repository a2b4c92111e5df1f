"""LoRA Align (CopRA paper, Sec. 3.1): re-factor one adapter so that fusing it approaches mixing it.

B A = (B P)(P^-1 A) for any invertible P [r, r], so each module of `other` may be rewritten with
P chosen to shrink the bound on the fusion-vs-mixture gap

    ||dW_f - dW_m||_2 <= D_upper = a(1-a) (||B1 - B2 P||_2 + ||A1 - P^-1 A2||_2)

(1 = reference, 2 = other, ||.||_2 the spectral norm). The factor a(1-a) does not move the minimiser.

Initialisation (SVD-based). Candidates, all in float64, each kept only if finite and
cond(P) <= MAX_COND:
  * identity (the bound before alignment);
  * joint orthogonal Procrustes: over orthogonal P (P^-1 = P^T) the squared Frobenius version of the
    bound is const - 2 tr(P^T M) with M = B2^T B1 + A2 A1^T, minimised by P = U V^T from the SVD
    M = U S V^T. Perfectly conditioned; recovers P exactly when other = (B1 Q, Q^T A1), Q orthogonal;
  * least squares of each factor by SVD pseudo-inverse: P = pinv(B2) B1 (fits B2 P ~ B1) and
    P = A2 pinv(A1) (fits P A1 ~ A2); these recover any invertible Q in other = (B1 Q, Q^-1 A1).
The candidate with the smallest spectral objective starts Adam on P = P0 (I + X), X = 0 (so lr is
relative to P0's scale), minimising the spectral objective itself (via singular values, in float64:
it beat a Frobenius surrogate in our trials); a step whose spectral gradient is not finite uses the
Frobenius version instead. Every iterate's spectral objective is measured and the best well-conditioned
P seen is kept, so the result is never worse than identity or the initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from copra.adapters.merge import Adapter, check_compatible, module_pairs
from copra.utils.errors import UserError

MAX_COND = 1e6  # largest condition number of P accepted (P^-1 A must stay numerically sane)


def _factors(adapter: Adapter, a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = adapter[b_key].detach().to("cpu", torch.float64).flatten(1)  # [out, r]
    a = adapter[a_key].detach().to("cpu", torch.float64).flatten(1)  # [r, in]
    if b.shape[1] != a.shape[0]:
        raise UserError(f"cannot align {b_key!r}: flattened lora_B has {b.shape[1]} columns, rank is {a.shape[0]}")
    return b, a


def _gap(p, b1, a1, b2, a2, ord) -> torch.Tensor:
    """||B1 - B2 P|| + ||A1 - P^-1 A2|| in the given matrix norm (2 = spectral, 'fro')."""
    return torch.linalg.matrix_norm(b1 - b2 @ p, ord=ord) + torch.linalg.matrix_norm(
        a1 - torch.linalg.solve(p, a2), ord=ord
    )


def _usable(p: torch.Tensor) -> bool:
    return bool(torch.isfinite(p).all()) and float(torch.linalg.cond(p)) <= MAX_COND


def _initial_candidates(b1, a1, b2, a2) -> list[torch.Tensor]:
    r = b1.shape[1]
    cands = [torch.eye(r, dtype=torch.float64)]
    u, _, vh = torch.linalg.svd(b2.T @ b1 + a2 @ a1.T)  # joint orthogonal Procrustes
    cands.append(u @ vh)
    cands.append(torch.linalg.pinv(b2) @ b1)  # least squares B2 P ~ B1
    cands.append(a2 @ torch.linalg.pinv(a1))  # least squares P A1 ~ A2
    return [p for p in cands if _usable(p)]


def _best_p(b1, a1, b2, a2, steps: int, lr: float) -> torch.Tensor:
    """The P [r, r] with the smallest spectral objective among the SVD inits and the Adam iterates."""
    with torch.no_grad():
        scored = [(float(_gap(p, b1, a1, b2, a2, 2)), p) for p in _initial_candidates(b1, a1, b2, a2)]
    best_val, p0 = min(scored, key=lambda s: s[0])
    best = p0
    if steps == 0 or best_val <= 1e-12 * (1 + float(b1.norm() + a1.norm())):
        return best
    eye = torch.eye(p0.shape[0], dtype=torch.float64)
    x = torch.zeros_like(p0, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    for step in range(steps + 1):  # measure each iterate (the last one too), step `steps` times
        opt.zero_grad()
        p = p0 @ (eye + x)
        if not _usable(p.detach()):
            break  # drifting towards singular: stop, keep the best seen
        loss = _gap(p, b1, a1, b2, a2, 2)
        if not torch.isfinite(loss):
            break
        if step and float(loss.detach()) < best_val:
            best_val, best = float(loss.detach()), p.detach().clone()
        if step == steps:
            break
        loss.backward()
        assert x.grad is not None  # backward() has just filled it: loss depends on x, which requires grad
        if not torch.isfinite(x.grad).all():  # spectral gradient broke down: smooth surrogate
            opt.zero_grad()
            _gap(p0 @ (eye + x), b1, a1, b2, a2, "fro").backward()
        opt.step()
    return best


def align(reference: Adapter, other: Adapter, steps: int = 200, lr: float = 1e-2, alpha: float = 0.5) -> Adapter:
    """`other` re-factored module by module as (B P, P^-1 A) to lower its bound against `reference`.

    B A of every module of `other` is unchanged (up to float rounding; computed in float64, cast back
    to the input dtype); other keys are copied. Fuse the result with `reference` afterwards.
    `alpha` only scales the bound by a(1-a), which does not move the best P; it is validated, not used.
    """
    check_compatible([reference, other])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"align steps must be a non-negative integer, got {steps!r}")
    if not lr > 0:
        raise UserError(f"align lr must be positive, got {lr!r}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"align alpha must be in [0, 1], got {alpha!r}")
    out = {key: t.detach().clone() for key, t in other.items()}
    for _, a_key, b_key in module_pairs(reference):
        b1, a1 = _factors(reference, a_key, b_key)
        b2, a2 = _factors(other, a_key, b_key)
        p = _best_p(b1, a1, b2, a2, steps, lr)
        if torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype)):
            continue  # nothing beat identity: keep `other` bit for bit
        b_t, a_t = other[b_key], other[a_key]
        out[b_key] = (b2 @ p).reshape(b_t.shape).to(b_t.device, b_t.dtype)  # [out, r]
        out[a_key] = torch.linalg.solve(p, a2).reshape(a_t.shape).to(a_t.device, a_t.dtype)  # [r, in]
    return out


def align_many(reference: Adapter, others: Sequence[Adapter], **kw) -> list[Adapter]:
    """Align every adapter in `others` to `reference` (before an N-way fusion)."""
    check_compatible([reference, *others])
    return [align(reference, other, **kw) for other in others]


def bound(a1: Adapter, a2: Adapter, alpha: float = 0.5) -> float:
    """D_upper with P = I: a(1-a) sum over modules of (||B1 - B2||_2 + ||A1 - A2||_2)."""
    check_compatible([a1, a2])
    total = 0.0
    for _, a_key, b_key in module_pairs(a1):
        b1, f1 = _factors(a1, a_key, b_key)
        b2, f2 = _factors(a2, a_key, b_key)
        total += float(torch.linalg.matrix_norm(b1 - b2, ord=2) + torch.linalg.matrix_norm(f1 - f2, ord=2))
    return alpha * (1.0 - alpha) * total
