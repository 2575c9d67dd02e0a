"""Losses vs independent per-element float formulas, stability at extreme inputs, KTO edge cases."""

import math

import pytest
import torch

from cso_dist import losses as L


def t(*xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def softplus(x):  # log(1 + e^x) in plain floats, stable
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def neg_log_sigmoid(x):  # -log(1 / (1 + e^-x))
    return softplus(-x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


PC, PR = [-12.0, -30.5, -7.25, -55.0], [-14.0, -28.0, -9.5, -61.0]
RC, RR = [-13.0, -29.0, -8.0, -56.5], [-13.5, -29.5, -9.0, -60.0]
LC, LR = [4, 11, 3, 20], [5, 9, 4, 23]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (1.0, 0.45)])
def test_dpo_matches_formula(beta, eps):
    out = L.dpo(t(*PC), t(*PR), t(*RC), t(*RR), beta=beta, label_smoothing=eps)
    for i in range(len(PC)):
        h = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
        want = (1 - eps) * -math.log(sigmoid(h)) + eps * -math.log(sigmoid(-h))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]))
    assert out.losses.shape == (4,) and not out.chosen_rewards.requires_grad and out.nll is None


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_dpo_zero_margin_is_ln2(eps):
    x = torch.tensor([-5.0, -100.0, 0.0])
    out = L.dpo(x, x + 1.0, x - 2.0, x - 1.0, beta=0.7, label_smoothing=eps)
    assert torch.allclose(out.losses.double(), torch.full((3,), math.log(2.0), dtype=torch.float64), atol=1e-7, rtol=0)


def test_gradient_signs():
    c, r = t(-10.0, -20.0, grad=True), t(-11.0, -19.0, grad=True)
    L.dpo(c, r, t(-10.5, -20.0), t(-10.0, -19.5)).losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    n = t(3.0, 5.0)
    for fn in (
        lambda c, r: L.simpo(c, r, n, n),
        lambda c, r: L.orpo(c, r, n, n),
        lambda c, r: L.ipo(c, r, t(-10.0, -20.0), t(-10.0, -20.0), n, n),
    ):
        c, r = t(-10.0, -20.0, grad=True), t(-11.0, -19.0, grad=True)
        fn(c, r).losses.sum().backward()
        assert (c.grad < 0).all() and (r.grad > 0).all()


def test_ipo_matches_formula():
    beta = 0.2
    out = L.ipo(t(*PC), t(*PR), t(*RC), t(*RR), torch.tensor(LC), torch.tensor(LR), beta=beta)
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) / LC[i] - (PR[i] - RR[i]) / LR[i]
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]) / LC[i])


def test_simpo_matches_formula():
    beta, ratio = 2.5, 0.55
    out = L.simpo(t(*PC), t(*PR), torch.tensor(LC), torch.tensor(LR), beta=beta, gamma_beta_ratio=ratio)
    for i in range(len(PC)):
        margin = beta * PC[i] / LC[i] - beta * PR[i] / LR[i] - ratio * beta
        assert out.losses[i].item() == pytest.approx(neg_log_sigmoid(margin), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * PC[i] / LC[i])
        assert out.rejected_rewards[i].item() == pytest.approx(beta * PR[i] / LR[i])
    assert out.nll is None


def test_orpo_matches_formula():
    beta = 0.1
    pc, pr = [-2.0, -0.3, -9.0, -0.05], [-4.0, -0.2, -1.5, -3.0]
    lc, lr = [4, 1, 3, 2], [2, 1, 5, 6]
    out = L.orpo(t(*pc), t(*pr), torch.tensor(lc), torch.tensor(lr), beta=beta)
    for i in range(4):
        ac, ar = pc[i] / lc[i], pr[i] / lr[i]
        odds_c, odds_r = math.exp(ac) / (1 - math.exp(ac)), math.exp(ar) / (1 - math.exp(ar))
        lo = math.log(odds_c / odds_r)
        assert out.log_odds[i].item() == pytest.approx(lo, rel=1e-10)
        assert out.losses[i].item() == pytest.approx(-beta * math.log(sigmoid(lo)), rel=1e-10)
        assert out.nll[i].item() == pytest.approx(-ac, rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * ac)


def test_log1mexp_precision():
    xs = [-20.0, -5.0, -1.0, -0.7, -0.69, -0.5, -0.1, -1e-3]
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        got = L.log1mexp(torch.tensor(xs, dtype=dtype))
        for x, g in zip(xs, got.tolist()):
            assert g == pytest.approx(math.log(1.0 - math.exp(x)), rel=tol)
    # near 0 the naive form loses digits; compare against expm1 in float64
    for x in (-1e-6, -1e-9):
        g = L.log1mexp(torch.tensor([x], dtype=torch.float32)).item()
        assert g == pytest.approx(math.log(-math.expm1(x)), rel=1e-6)
    x = torch.tensor([-1e-7, -0.5, -0.7, -30.0], requires_grad=True)
    L.log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sft_nll():
    got = L.sft_nll(t(*PC), torch.tensor(LC))
    assert got.tolist() == pytest.approx([-p / n for p, n in zip(PC, LC)])
    assert L.sft_nll(t(-3.0), torch.tensor([0])).item() == 3.0  # empty completion: len clamped to 1


EXTREME = [-1e4, -1e-9, 0.0, -1e4, -3.0, 0.0]
EXTREME_R = [0.0, -1e4, -1e-9, -1e4, 0.0, 0.0]
EXTREME_REF = [0.0, 0.0, -1e4, -1e4, -1e4, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo", "kto", "sft"])
def test_extreme_inputs_finite(method, dtype):
    n = len(EXTREME)
    c = torch.tensor(EXTREME, dtype=dtype, requires_grad=True)
    r = torch.tensor(EXTREME_R, dtype=dtype, requires_grad=True)
    ref = torch.tensor(EXTREME_REF, dtype=dtype)
    ones = torch.ones(n, dtype=torch.long)
    if method == "dpo":
        out = L.dpo(c, r, ref, ref.flip(0), beta=1.0, label_smoothing=0.1)
    elif method == "ipo":
        out = L.ipo(c, r, ref, ref.flip(0), ones, ones)
    elif method == "simpo":
        out = L.simpo(c, r, ones, ones)
    elif method == "orpo":
        out = L.orpo(c, r, ones, ones)
    elif method == "kto":
        out = L.kto(c, ref, torch.tensor([True, False] * 3), r, ref.flip(0))
    else:
        loss = L.sft_nll(c, ones)
        out = L.LossOutput(loss, loss.detach(), loss.detach())
    total = out.losses + (out.nll if out.nll is not None else 0.0)
    assert total.dtype == torch.float32 and torch.isfinite(total).all(), total
    total.sum().backward()
    assert torch.isfinite(c.grad).all() and c.grad.dtype == dtype
    assert r.grad is None or torch.isfinite(r.grad).all()
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()


def test_orpo_near_zero_avg_logp():
    c = torch.tensor([0.0, -1e-9, -1e-7, -1e-4], requires_grad=True)
    r = torch.tensor([0.0, -1e-9, -2.0, -1e-12], requires_grad=True)
    out = L.orpo(c, r, torch.ones(4), torch.ones(4))
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.log_odds).all()
    (out.losses + out.nll).sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert out.losses[0].item() == pytest.approx(0.1 * math.log(2.0), rel=1e-6)  # both clamped: equal odds


def test_orpo_bf16_computed_in_fp32():
    out = L.orpo(
        torch.tensor([-0.3], dtype=torch.bfloat16),
        torch.tensor([-1.0], dtype=torch.bfloat16),
        torch.tensor([1]),
        torch.tensor([1]),
    )
    assert out.losses.dtype == torch.float32 and out.nll.dtype == torch.float32
    ac, ar = torch.tensor(-0.3, dtype=torch.bfloat16).item(), -1.0  # bf16-rounded input
    lo = (ac - ar) - (math.log(-math.expm1(ac)) - math.log(-math.expm1(ar)))
    assert out.losses.item() == pytest.approx(-0.1 * math.log(sigmoid(lo)), rel=1e-6)


def kto_ref(p, r, d, z, beta, wd, wu):
    return [
        wd * (1 - sigmoid(beta * (pi - ri - z))) if di else wu * (1 - sigmoid(beta * (z - (pi - ri))))
        for pi, ri, di in zip(p, r, d)
    ]


def test_kto_matches_formula():
    p, r, d = [-10.0, -20.0, -5.0, -8.0], [-11.0, -18.0, -5.5, -9.0], [True, False, True, False]
    kp, kr = [-12.0, -19.0, -7.0, -6.0], [-13.0, -19.5, -6.0, -8.0]
    z = max(0.0, sum(a - b for a, b in zip(kp, kr)) / 4)
    assert z > 0
    out = L.kto(t(*p), t(*r), torch.tensor(d), t(*kp), t(*kr), beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)
    assert out.losses.tolist() == pytest.approx(kto_ref(p, r, d, z, 0.3, 1.33, 0.8), rel=1e-12)
    assert out.kl.item() == pytest.approx(z)
    assert out.rewards.tolist() == pytest.approx([0.3 * (a - b) for a, b in zip(p, r)])
    assert out.chosen_rewards.tolist() == pytest.approx([0.3 * 1.0, 0.3 * 0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([0.3 * -2.0, 0.3 * 1.0])
    # a negative KL estimate is clamped to 0; an explicit (e.g. all-reduced) kl overrides the tensors
    neg = L.kto(t(*p), t(*r), torch.tensor(d), t(*kr), t(*kp))
    assert neg.kl.item() == 0.0 and neg.losses.tolist() == pytest.approx(kto_ref(p, r, d, 0.0, 0.1, 1, 1))
    given = L.kto(t(*p), t(*r), torch.tensor(d), t(*kp), t(*kr), kl=torch.tensor(2.5))
    assert given.losses.tolist() == pytest.approx(kto_ref(p, r, d, 2.5, 0.1, 1, 1))
    assert L.kto(t(*p), t(*r), torch.tensor(d), None, None, kl=-1.0).kl.item() == 0.0


def test_kto_kl_is_detached():
    kp = t(-3.0, -1.0, grad=True)
    pol = t(-2.0, -4.0, grad=True)
    L.kto(pol, t(-2.5, -3.0), torch.tensor([True, False]), kp, t(-4.0, -2.5)).losses.sum().backward()
    assert kp.grad is None and pol.grad is not None


@pytest.mark.parametrize("mask", [[True, True, True], [False, False, False], [True], [False]])
def test_kto_single_group_and_batch_one(mask):
    n = len(mask)
    pol = torch.linspace(-10, -5, n, dtype=torch.float64).requires_grad_()
    ref = torch.full((n,), -7.0, dtype=torch.float64)
    empty = torch.empty(0, dtype=torch.float64)
    for kp, kr in ((empty, empty), (None, None), (ref - 1.0, ref)):
        out = L.kto(pol, ref, torch.tensor(mask), kp, kr)
        assert out.losses.shape == (n,) and torch.isfinite(out.losses).all()
        z = 0.0
        assert out.kl.item() == z
        assert out.losses.tolist() == pytest.approx(kto_ref(pol.tolist(), ref.tolist(), mask, z, 0.1, 1, 1))
        assert out.chosen_rewards.numel() == sum(mask) and out.rejected_rewards.numel() == n - sum(mask)
        pol.grad = None
        out.losses.mean().backward()
        assert torch.isfinite(pol.grad).all()


def test_kto_kl_helper():
    assert L.kto_kl(torch.empty(0), torch.empty(0)).item() == 0.0
    assert L.kto_kl(None, None).item() == 0.0
    assert L.kto_kl(t(-1.0, -2.0), t(-3.0, -1.0)).item() == pytest.approx(0.5)
    assert L.kto_kl(t(-3.0), t(-1.0)).item() == pytest.approx(-2.0)  # raw: clamping happens in kto()


def test_methods_and_reference():
    assert L.METHODS == {"dpo", "ipo", "simpo", "orpo", "kto", "sft"}
    assert {m for m in L.METHODS if L.needs_reference(m)} == {"dpo", "ipo", "kto"}
    with pytest.raises(ValueError):
        L.needs_reference("ppo")


def test_the_registry_is_the_one_list_of_methods():
    """config's choices, reference needs, layouts and default betas all come from losses.REGISTRY."""
    from typing import get_args, get_type_hints

    from cso_dist.config import TrainConfig, load_config
    from cso_dist.losses.batch import hyperparameters

    assert set(get_args(get_type_hints(TrainConfig)["method"])) == L.METHODS == set(L.REGISTRY)
    assert {m.name for m in L.REGISTRY.values() if m.pair_layout} == {"dpo", "ipo", "simpo", "orpo"}
    assert {k: m.beta for k, m in L.REGISTRY.items()} == {
        "dpo": 0.1,
        "ipo": 0.1,
        "simpo": 2.5,
        "orpo": 0.1,
        "kto": 0.1,
        "sft": None,
    }
    assert L.resolved_beta("simpo", -1.0) == 2.5 and L.resolved_beta("simpo", 0.3) == 0.3
    cfg = load_config(None, {"train.method": "dpo", "train.label_smoothing": 0.2}).train
    assert hyperparameters(L.REGISTRY["dpo"], cfg, 0.1) == {"beta": 0.1, "label_smoothing": 0.2}
    kto = load_config(None, {"train.method": "kto", "train.desirable_weight": 1.33}).train
    assert hyperparameters(L.REGISTRY["kto"], kto, 0.1) == {
        "beta": 0.1,
        "desirable_weight": 1.33,
        "undesirable_weight": 1.0,
    }
    simpo = load_config(None, {"train.method": "simpo"}).train
    assert hyperparameters(L.REGISTRY["simpo"], simpo, 2.5) == {"beta": 2.5, "gamma_beta_ratio": 0.55}


def test_shape_and_dtype_checks():
    with pytest.raises(ValueError):
        L.dpo(t(-1.0, -2.0), t(-1.0), t(-1.0), t(-1.0))
    with pytest.raises(ValueError):
        L.kto(t(-1.0), t(-1.0), torch.tensor([1]), None, None)
    x = torch.tensor([-3.0, -4.0], dtype=torch.bfloat16)
    for out in (L.dpo(x, x, x, x), L.simpo(x, x, torch.tensor([2, 2]), torch.tensor([2, 2]))):
        assert out.losses.dtype == torch.float32
