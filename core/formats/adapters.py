"""LoRA, LoCon (incl. lora_mid), LyCORIS LoHa and LoKr → exact up/down factors.

Semantics follow ComfyUI (``comfy/weight_adapter/lora.py``, ``loha.py``,
``lokr.py``): ΔW is formed there and reshaped row-major to the weight shape,
so flattening every factor row-major here gives the same d_out × d_in matrix.

* LoRA: ΔW = α/r · up·down, r = lora_down rows. ``lora_mid`` (r×r×kh×kw)
  folds into down: down'[s,(c,k,l)] = Σ_j down[j,c]·mid[s,j,k,l].
* LoHa: ΔW = α/r₁ · (B₁A₁)⊙(B₂A₂) = α/r₁ · (B₁•B₂)(A₁∘A₂): face-splitting
  (row-wise Kronecker) up, Khatri–Rao (column-wise Kronecker) down, rank
  r₁r₂. Tucker (hada_t*): B = w_aᵀ, A[i,(c,k,l)] = Σ_j t[i,j,k,l]·w_b[j,c].
* LoKr: ΔW = scale · kron(W₁, W₂) = scale · kron(B₁,B₂)·kron(A₁,A₂); a full
  W (m×n) is I_m·W or W·I_n, whichever is narrower; a 4-D W₂ flattens to
  c × d·kh·kw, which keeps the kron layout. scale = α/dim with dim the rank
  of w2 if factored, else of w1, and 1 when both are full (ComfyUI's rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LoraError
from .names import LOHA_ROLES, LOKR_ROLES, LORA_ROLES


@dataclass
class ModulePlan:
    """What one module will be, from tensor shapes alone (nothing read yet)."""

    module_key: str
    kind: str                          # lora | loha | lokr
    keys: dict[str, str]               # role -> tensor key in the file
    d_out: int
    d_in: int
    weight_shape: tuple[int, ...]      # 4-D when the factors carry a kernel
    rank: int                          # nominal dim (ComfyUI's alpha divisor when it uses one)
    divisor: int | None                # None: alpha is not used, scale 1
    naming: str = "kohya"
    inner: int = 0                     # inner size of the factors as built (before compression)

    @property
    def first_key(self) -> str:
        return next(iter(self.keys.values()))


def _kind(roles: dict[str, str], path: str) -> str | None:
    kinds = [k for k, names in (("lora", LORA_ROLES), ("loha", LOHA_ROLES), ("lokr", LOKR_ROLES))
             if any(r in roles for r in names)]
    if len(kinds) > 1:
        raise LoraError(f"module mixes {' and '.join(kinds)} factors", path,
                        next(iter(roles.values())))
    return kinds[0] if kinds else None


def _need(roles: dict[str, str], wanted: tuple[str, ...], what: str, path: str) -> None:
    missing = [r for r in wanted if r not in roles]
    if missing:
        have = ", ".join(sorted(r for r in roles if r not in ("alpha", "dora_scale")))
        raise LoraError(f"{what} module has {have} but no {', '.join(missing)}", path,
                        next(iter(roles.values())))


def _flat(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape[1:]))


def plan_module(module_key: str, roles: dict[str, str], shape_of: Callable[[str], tuple],
                path: str, naming: str = "kohya") -> ModulePlan | None:
    """Validate the factor shapes of one module; None when it has no factors."""
    kind = _kind(roles, path)
    if kind is None:
        return None
    keys = {r: k for r, k in roles.items() if r != "alpha" and r != "dora_scale"}
    for key in keys.values():
        if 0 in tuple(shape_of(key)):
            raise LoraError(f"factor has a zero-sized dimension (shape {tuple(shape_of(key))})", path, key)
    planner = {"lora": _plan_lora, "loha": _plan_loha, "lokr": _plan_lokr}[kind]
    d_out, d_in, weight_shape, rank, divisor = planner(keys, shape_of, path)
    inner = _inner_size(kind, keys, shape_of, rank)
    if (d_out + d_in) * inner > MAX_FACTOR_ELEMENTS:
        raise LoraError(f"{kind} module too large to read: its factors for a {d_out}×{d_in} layer need "
                        f"inner size {inner}, {(d_out + d_in) * inner:,} numbers (at most "
                        f"{MAX_FACTOR_ELEMENTS:,} are allowed per module)", path, next(iter(keys.values())))
    return ModulePlan(module_key, kind, keys, d_out, d_in, tuple(weight_shape), rank, divisor, naming, inner)


# Work and memory per module are bounded from the declared shapes before
# anything is read: (d_out + d_in)·inner numbers (512 MB in fp32). The largest
# real module (SDXL ff, 10240×1280, even a full-rank LoKr of it) needs 15 M.
MAX_FACTOR_ELEMENTS = 2 ** 27


def _inner_size(kind: str, keys: dict[str, str], shape_of, rank: int) -> int:
    """Inner size of (up, down) as build_factors makes them, from shapes only."""
    if kind == "lora":
        return rank
    if kind == "loha":
        sizes = []
        for n in ("1", "2"):
            a = shape_of(keys[f"hada_w{n}_a"])
            sizes.append(int(a[0]) if f"hada_t{n}" in keys else int(a[1]))
        return sizes[0] * sizes[1]
    if "lokr_w1" in keys:
        first = int(min(shape_of(keys["lokr_w1"])))
    else:
        first = int(shape_of(keys["lokr_w1_a"])[1])
    if "lokr_w2" in keys:
        w2 = shape_of(keys["lokr_w2"])
        second = int(min(w2[0], _flat(tuple(w2))))
    elif "lokr_t2" in keys:
        second = int(shape_of(keys["lokr_w2_a"])[0])
    else:
        second = int(shape_of(keys["lokr_w2_a"])[1])
    return first * second


def _plan_lora(keys, shape_of, path):
    _need(keys, ("up", "down"), "LoRA", path)
    up, down = shape_of(keys["up"]), shape_of(keys["down"])
    if len(up) not in (2, 4) or (len(up) == 4 and tuple(up[2:]) != (1, 1)):
        raise LoraError(f"up factor must be 2-D or a 1×1 conv, got shape {tuple(up)}", path, keys["up"])
    if len(down) not in (2, 4):
        raise LoraError(f"down factor must be 2-D or 4-D, got shape {tuple(down)}", path, keys["down"])
    rank = int(down[0])
    if "mid" in keys:
        mid = shape_of(keys["mid"])
        if len(mid) != 4 or mid[0] != rank or mid[1] != rank or tuple(down[2:]) not in ((), (1, 1)):
            raise LoraError(f"lora_mid shape {tuple(mid)} does not fit down {tuple(down)} "
                            f"(expected {rank}×{rank}×kh×kw and a 1×1 down)", path, keys["mid"])
        weight_shape = (int(up[0]), int(down[1]), int(mid[2]), int(mid[3]))
    else:
        weight_shape = (int(up[0]), *(int(s) for s in down[1:]))
    if up[1] != rank:
        raise LoraError(f"rank mismatch: up {tuple(up)} has rank {up[1]} but down {tuple(down)} "
                        f"has rank {rank}", path, keys["up"])
    return int(up[0]), _flat(weight_shape), weight_shape, rank, rank


def _plan_loha(keys, shape_of, path):
    _need(keys, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa", path)
    w1a, w1b, w2a, w2b = (shape_of(keys[f"hada_{r}"]) for r in ("w1_a", "w1_b", "w2_a", "w2_b"))
    tucker = "hada_t1" in keys or "hada_t2" in keys
    if tucker:
        _need(keys, ("hada_t1", "hada_t2"), "LoHa (Tucker)", path)
        t1, t2 = shape_of(keys["hada_t1"]), shape_of(keys["hada_t2"])
        for t, a, b, n in ((t1, w1a, w1b, "1"), (t2, w2a, w2b, "2")):
            if len(t) < 2 or len(a) != 2 or len(b) != 2 or not (t[0] == a[0] and t[1] == b[0]):
                raise LoraError(f"Tucker factors do not fit: t{n} {tuple(t)}, w{n}_a {tuple(a)}, "
                                f"w{n}_b {tuple(b)}", path, keys[f"hada_t{n}"])
        if w1a[1] != w2a[1] or w1b[1] != w2b[1] or tuple(t1[2:]) != tuple(t2[2:]):
            raise LoraError("the two Hadamard halves have different shapes", path, keys["hada_w2_a"])
        weight_shape = (int(w1a[1]), int(w1b[1]), *(int(s) for s in t1[2:]))
    else:
        for a, b, n in ((w1a, w1b, "1"), (w2a, w2b, "2")):
            if len(a) != 2 or len(b) < 2 or a[1] != b[0]:
                raise LoraError(f"rank mismatch: hada_w{n}_a {tuple(a)} and hada_w{n}_b {tuple(b)}",
                                path, keys[f"hada_w{n}_a"])
        if w1a[0] != w2a[0] or _flat(tuple(w1b)) != _flat(tuple(w2b)):
            raise LoraError(f"the two Hadamard halves have different shapes: {tuple(w1a[:1])}×"
                            f"{_flat(tuple(w1b))} vs {tuple(w2a[:1])}×{_flat(tuple(w2b))}",
                            path, keys["hada_w2_a"])
        weight_shape = (int(w1a[0]), *(int(s) for s in w1b[1:]))
    rank = int(w1b[0])
    return weight_shape[0], _flat(weight_shape), weight_shape, rank, rank


def _plan_lokr(keys, shape_of, path):
    if "lokr_w1" in keys:
        w1 = shape_of(keys["lokr_w1"])
        if len(w1) != 2:
            raise LoraError(f"lokr_w1 must be 2-D, got {tuple(w1)}", path, keys["lokr_w1"])
        (a, b), r1 = w1, None
    else:
        _need(keys, ("lokr_w1_a", "lokr_w1_b"), "LoKr (w1)", path)
        w1a, w1b = shape_of(keys["lokr_w1_a"]), shape_of(keys["lokr_w1_b"])
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0]:
            raise LoraError(f"rank mismatch: lokr_w1_a {tuple(w1a)} and lokr_w1_b {tuple(w1b)}",
                            path, keys["lokr_w1_a"])
        a, r1, b = w1a[0], w1b[0], w1b[1]
    kernel: tuple[int, ...] = ()
    if "lokr_w2" in keys:
        w2 = shape_of(keys["lokr_w2"])
        if len(w2) < 2:
            raise LoraError(f"lokr_w2 must be at least 2-D, got {tuple(w2)}", path, keys["lokr_w2"])
        c, d, kernel, r2 = w2[0], w2[1], tuple(w2[2:]), None
    elif "lokr_t2" in keys:
        _need(keys, ("lokr_w2_a", "lokr_w2_b"), "LoKr (Tucker w2)", path)
        t2, w2a, w2b = (shape_of(keys[k]) for k in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
        if len(t2) < 2 or len(w2a) != 2 or len(w2b) != 2 or t2[0] != w2a[0] or t2[1] != w2b[0]:
            raise LoraError(f"Tucker factors do not fit: lokr_t2 {tuple(t2)}, lokr_w2_a {tuple(w2a)}, "
                            f"lokr_w2_b {tuple(w2b)}", path, keys["lokr_t2"])
        c, d, kernel, r2 = w2a[1], w2b[1], tuple(t2[2:]), w2b[0]
    else:
        _need(keys, ("lokr_w2_a", "lokr_w2_b"), "LoKr (w2)", path)
        w2a, w2b = shape_of(keys["lokr_w2_a"]), shape_of(keys["lokr_w2_b"])
        if len(w2a) != 2 or len(w2b) < 2 or w2a[1] != w2b[0]:
            raise LoraError(f"rank mismatch: lokr_w2_a {tuple(w2a)} and lokr_w2_b {tuple(w2b)}",
                            path, keys["lokr_w2_a"])
        c, r2, d = w2a[0], w2b[0], _flat(tuple(w2b))
    if kernel:
        weight_shape = (int(a * c), int(b * d), *(int(k) for k in kernel))
    else:
        weight_shape = (int(a * c), int(b * d))
    divisor = r2 if r2 is not None else r1
    rank = int(divisor) if divisor is not None else int(min(a, b) * min(c, _flat((c, d, *kernel))))
    return weight_shape[0], _flat(weight_shape), weight_shape, rank, \
        (int(divisor) if divisor is not None else None)


# ---- materialising factors -------------------------------------------------

def face_splitting(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: (d×r₁, d×r₂) → d×r₁r₂."""
    return (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)


def khatri_rao(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: (r₁×n, r₂×n) → r₁r₂×n."""
    return (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])


def _split_full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full m×n matrix as B·A with the smaller inner size: I_m·W or W·I_n."""
    m, n = w.shape
    eye = torch.eye(min(m, n), dtype=w.dtype)
    return (eye, w) if m <= n else (w, eye)


def _tucker_down(t: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """A[i,(c,k,l)] = Σ_j t[i,j,k,l]·w_b[j,c], flattened row-major."""
    t3 = t.reshape(t.shape[0], t.shape[1], -1)
    return torch.einsum("ijs,jc->ics", t3, w_b).reshape(t.shape[0], -1)


def compress_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly re-factor when the inner size exceeds min(d_out, d_in) (large
    LoHa/LoKr products), through a QR of the narrower side in float64."""
    d_out, inner, d_in = up.shape[0], up.shape[1], down.shape[1]
    if inner <= min(d_out, d_in):
        return up, down
    dt = up.dtype
    if d_out <= d_in:
        q, r = torch.linalg.qr(up.double())
        return q.to(dt), (r @ down.double()).to(dt)
    q, r = torch.linalg.qr(down.double().T)
    return (up.double() @ r.T).to(dt), q.T.to(dt)


def build_factors(plan: ModulePlan, get: Callable[..., torch.Tensor],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up d_out×R, down R×d_in) with ΔW = scale·up·down, in ``dtype``."""
    t = {role: get(key, dtype).to(dtype) for role, key in plan.keys.items()}
    if plan.kind == "lora":
        up = t["up"].reshape(plan.d_out, -1)
        down = t["down"]
        if "mid" in t:
            down = torch.einsum("jc,sjkl->sckl", down.reshape(down.shape[0], -1), t["mid"])
        return up, down.reshape(down.shape[0], -1)
    if plan.kind == "loha":
        halves = []
        for n in ("1", "2"):
            if f"hada_t{n}" in t:
                halves.append((t[f"hada_w{n}_a"].T, _tucker_down(t[f"hada_t{n}"], t[f"hada_w{n}_b"])))
            else:
                halves.append((t[f"hada_w{n}_a"], t[f"hada_w{n}_b"].reshape(t[f"hada_w{n}_b"].shape[0], -1)))
        (b1, a1), (b2, a2) = halves
        return compress_factors(face_splitting(b1, b2), khatri_rao(a1, a2))
    # lokr
    b1, a1 = _split_full(t["lokr_w1"]) if "lokr_w1" in t else (t["lokr_w1_a"], t["lokr_w1_b"])
    if "lokr_w2" in t:
        b2, a2 = _split_full(t["lokr_w2"].reshape(t["lokr_w2"].shape[0], -1))
    elif "lokr_t2" in t:
        b2, a2 = t["lokr_w2_a"].T, _tucker_down(t["lokr_t2"], t["lokr_w2_b"])
    else:
        b2, a2 = t["lokr_w2_a"], t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)
    # contiguous: torch.kron fails on transposed (strided) inputs
    return compress_factors(torch.kron(b1.contiguous(), b2.contiguous()),
                            torch.kron(a1.contiguous(), a2.contiguous()))
