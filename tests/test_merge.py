"""copra.adapters.merge / copra.adapters.align: hand-computed merges, LoRA Align invariants, refusals, PEFT round trip."""

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from copra.adapters.align import align, align_many, bound
from copra.adapters.merge import (
    MERGERS,
    check_compatible,
    check_weights,
    delta_weights,
    fusion,
    mixture,
    mixture_config,
    module_pairs,
)
from copra.utils.errors import UserError

P = "base_model.model.l"


def hand(a, b, bias):
    return {
        f"{P}.lora_A.weight": torch.tensor(a),
        f"{P}.lora_B.weight": torch.tensor(b),
        f"{P}.bias": torch.tensor(bias),
    }


# B1 A1 = [[1, 2], [3, 6]],  B2 A2 = [[0, 2], [0, -1]]
A1 = hand([[1.0, 2.0]], [[1.0], [3.0]], [1.0, 2.0])
A2 = hand([[0.0, 1.0]], [[2.0], [-1.0]], [3.0, 4.0])


def rand_adapter(seed, r=3, modules=("q", "v"), out=7, inn=5):
    g = torch.Generator().manual_seed(seed)
    d = {}
    for m in modules:
        d[f"base_model.model.enc.{m}.lora_A.weight"] = torch.randn(r, inn, generator=g)  # [r, in]
        d[f"base_model.model.enc.{m}.lora_B.weight"] = torch.randn(out, r, generator=g)  # [out, r]
    d["base_model.model.enc.bias"] = torch.randn(out, generator=g)
    return d


def refactor(adapter, q):
    """The same adapter written as (B Q, Q^-1 A) in every module."""
    out = dict(adapter)
    for _, a, b in module_pairs(adapter):
        out[b] = adapter[b] @ q
        out[a] = torch.linalg.solve(q, adapter[a])
    return out


def assert_same(x, y, atol=1e-5):
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-5)


# ---- fusion / mixture -------------------------------------------------------------------------


def test_module_pairs():
    assert module_pairs(A1) == [(P, f"{P}.lora_A.weight", f"{P}.lora_B.weight")]


def test_fusion_at_corner_weights_returns_an_input():
    for w, want in (((1, 0), A1), ((0, 1), A2)):
        got = fusion([A1, A2], w)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_hand_computed_fusion_mixture_bound():
    w = (0.25, 0.75)
    f = fusion([A1, A2], w)
    assert torch.equal(f[f"{P}.lora_B.weight"], torch.tensor([[1.75], [0.0]]))
    assert torch.equal(f[f"{P}.lora_A.weight"], torch.tensor([[0.25, 1.25]]))
    assert torch.equal(f[f"{P}.bias"], torch.tensor([2.5, 3.5]))
    assert torch.equal(delta_weights(f)[P], torch.tensor([[0.4375, 2.1875], [0.0, 0.0]]))
    m = mixture([A1, A2], w)
    assert torch.equal(m[f"{P}.lora_B.weight"], torch.tensor([[0.25, 1.5], [0.75, -0.75]]))  # [out, 2r]
    assert torch.equal(m[f"{P}.lora_A.weight"], torch.tensor([[1.0, 2.0], [0.0, 1.0]]))  # [2r, in]
    assert torch.equal(m[f"{P}.bias"], torch.tensor([2.5, 3.5]))
    assert torch.equal(delta_weights(m)[P], torch.tensor([[0.25, 2.0], [0.75, 0.75]]))
    # ||B1 - B2||_2 = ||[-1, 4]|| = sqrt(17), ||A1 - A2||_2 = ||[1, 1]|| = sqrt(2)
    assert bound(A1, A2) == pytest.approx(0.25 * (math.sqrt(17) + math.sqrt(2)))
    assert bound(A1, A2, alpha=0.1) == pytest.approx(0.09 * (math.sqrt(17) + math.sqrt(2)))
    assert MERGERS == {"fusion": fusion, "mixture": mixture}


def test_identical_adapters_merge_to_themselves():
    a = rand_adapter(0)
    assert_same(fusion([a, a, a]), a)
    assert_same(delta_weights(mixture([a, a])), delta_weights(a))
    assert bound(a, a) == 0.0


def test_mixture_is_weighted_sum_of_updates():
    ads, w = [rand_adapter(s) for s in (1, 2, 3)], [0.2, -0.5, 1.3]
    want = {k: sum(wi * delta_weights(a)[k] for wi, a in zip(w, ads)) for k in delta_weights(ads[0])}
    m = mixture(ads, w)
    assert m["base_model.model.enc.q.lora_A.weight"].shape == (9, 5)
    assert m["base_model.model.enc.q.lora_B.weight"].shape == (7, 9)
    assert_same(delta_weights(m), want)


def test_equal_weight_fusion_is_the_mean():
    ads = [rand_adapter(s) for s in (4, 5, 6, 7)]
    want = {k: torch.stack([a[k] for a in ads]).mean(0) for k in ads[0]}
    assert_same(fusion(ads), want)
    assert check_weights(None, 4) == [0.25] * 4


# ---- align -------------------------------------------------------------------------------------


def test_align_keeps_update_and_lowers_bound():
    ref, other = rand_adapter(10), rand_adapter(11)
    aligned = align(ref, other, steps=100)
    assert_same(delta_weights(aligned), delta_weights(other), atol=1e-4)
    assert torch.equal(aligned["base_model.model.enc.bias"], other["base_model.model.enc.bias"])
    assert bound(ref, aligned) < bound(ref, other)


@pytest.mark.parametrize("kind", ["orthogonal", "permutation", "invertible"])
def test_align_recovers_a_refactored_copy(kind):
    ref = rand_adapter(12, r=4)
    g = torch.Generator().manual_seed(1)
    q = {
        "orthogonal": torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0],
        "permutation": torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]],
        "invertible": torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4),
    }[kind]
    other = {k: v.float() for k, v in refactor({k: v.double() for k, v in ref.items()}, q).items()}
    assert bound(ref, other) > 1.0
    aligned = align(ref, other, steps=20)
    assert bound(ref, aligned) < 1e-4
    assert_same(delta_weights(aligned), delta_weights(other), atol=1e-4)


def test_align_never_worse_than_identity_and_align_many():
    ref = rand_adapter(13)
    others = [rand_adapter(14), copy.deepcopy(ref)]
    out = align_many(ref, others, steps=10, lr=0.05)
    assert len(out) == 2 and bound(ref, out[0]) <= bound(ref, others[0]) + 1e-6
    assert_same(out[1], ref)  # already aligned: left as it is
    assert_same(delta_weights(out[0]), delta_weights(others[0]), atol=1e-4)
    assert bound(ref, align(ref, others[0], steps=0)) <= bound(ref, others[0]) + 1e-6


def test_align_dtype_and_args():
    ref, other = rand_adapter(15), rand_adapter(16)
    half = {k: v.to(torch.bfloat16) for k, v in other.items()}
    assert all(t.dtype == torch.bfloat16 for t in align(ref, half, steps=5).values())
    for kw, word in (({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"alpha": 1.5}, "alpha")):
        with pytest.raises(UserError, match=word):
            align(ref, other, **kw)


# ---- refusals ----------------------------------------------------------------------------------


def test_refuses_mismatched_keys_shapes_ranks():
    a = rand_adapter(20)
    b = dict(a)
    del b["base_model.model.enc.bias"]
    with pytest.raises(UserError, match=r"adapter 1 lacks key 'base_model\.model\.enc\.bias'"):
        fusion([a, b])
    with pytest.raises(UserError, match=r"adapter 1 has key .*enc\.bias.* adapter 0 lacks"):
        mixture([b, a])
    c = dict(a, **{"base_model.model.enc.bias": torch.zeros(3)})
    with pytest.raises(UserError, match=r"adapter 1: 'base_model\.model\.enc\.bias' has shape \(3,\)"):
        check_compatible([a, c])
    with pytest.raises(UserError, match=r"adapter 1: 'base_model\.model\.enc\.q\.lora_A\.weight'.*rank"):
        align(a, rand_adapter(21, r=2))
    bad = dict(a, **{"base_model.model.enc.v.lora_B.weight": torch.zeros(7, 2)})
    with pytest.raises(UserError, match=r"'base_model\.model\.enc\.v' has rank 3 in lora_A but 2"):
        check_compatible([bad])
    lone = {k: v for k, v in a.items() if "q.lora_B" not in k}
    with pytest.raises(UserError, match=r"enc\.q\.lora_A\.weight.*no matching"):
        fusion([lone, lone])
    with pytest.raises(UserError, match="no LoRA"):
        fusion([{"x": torch.ones(1)}])
    with pytest.raises(UserError, match="no adapters"):
        fusion([])


def test_refuses_nonfinite_tensors_and_bad_weights():
    a = rand_adapter(22)
    nan = dict(a, **{"base_model.model.enc.v.lora_A.weight": torch.full((3, 5), float("nan"))})
    with pytest.raises(UserError, match=r"adapter 1: 'base_model\.model\.enc\.v\.lora_A\.weight' contains NaN"):
        bound(a, nan)
    with pytest.raises(UserError, match="merge weight 1 is nan"):
        fusion([a, a], [0.5, float("nan")])
    with pytest.raises(UserError, match="merge weight 0 is inf"):
        check_weights([math.inf], 1)
    with pytest.raises(UserError, match="3 merge weights for 2 adapters"):
        mixture([a, a], [0.3, 0.3, 0.4])
    with pytest.raises(UserError, match="numbers"):
        check_weights(["x", 1], 2)
    assert check_weights([2, -1], 2) == [2.0, -1.0]  # need not sum to 1


def test_refuses_mismatched_configs():
    a = rand_adapter(23)
    base = {"r": 3, "lora_alpha": 6, "use_rslora": False, "target_modules": ["q", "v"]}
    check_compatible([a, a], [base, dict(base, target_modules=["v", "q"])])  # order does not matter
    for field, value in (("r", 4), ("lora_alpha", 3), ("use_rslora", True), ("target_modules", ["q"])):
        with pytest.raises(UserError, match=rf"adapter 1: config field '{field}'"):
            check_compatible([a, a], [base, dict(base, **{field: value})])
    with pytest.raises(UserError, match="1 adapter configs for 2"):
        check_compatible([a, a], [base])


# ---- mixture_config ----------------------------------------------------------------------------


def test_mixture_config_keeps_scaling():
    plain = {"r": 4, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {"q": 2}, "alpha_pattern": {"q": 4}}
    m = mixture_config(plain, 3)
    assert (m["r"], m["lora_alpha"], m["rank_pattern"], m["alpha_pattern"]) == (12, 24, {"q": 6}, {"q": 12})
    assert m["lora_alpha"] / m["r"] == plain["lora_alpha"] / plain["r"] and plain["r"] == 4  # copy
    rs = mixture_config({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4)
    assert (rs["r"], rs["lora_alpha"]) == (16, 16)  # 8/sqrt(4) == 16/sqrt(16)
    for n in (0, 2.0, True):
        with pytest.raises(UserError, match="positive integer"):
            mixture_config(plain, n)
    with pytest.raises(UserError, match="lora_alpha"):
        mixture_config({"r": 4}, 2)


# ---- PEFT round trip ---------------------------------------------------------------------------


def base_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def peft_adapter(base, seed, rslora=False):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False, use_rslora=rslora)
    return get_peft_model(copy.deepcopy(base), cfg)


def with_deltas(base, deltas, scaling, x):
    """The base model's output with W_l + scaling * dW_l in each LoRA layer."""
    model = copy.deepcopy(base)
    for prefix, d in deltas.items():
        model.get_submodule(prefix.removeprefix("base_model.model.")).weight.data += scaling * d
    return model(x)


def test_peft_round_trip_fusion(tmp_path):
    base, x = base_model(), torch.randn(5, 6)
    m1, m2 = peft_adapter(base, 1), peft_adapter(base, 2)
    s1, s2 = get_peft_model_state_dict(m1), get_peft_model_state_dict(m2)
    check_compatible([s1, s2], [m1.peft_config["default"].to_dict(), m2.peft_config["default"].to_dict()])
    merged = fusion([s1, align(s1, s2, steps=20)], [0.3, 0.7])
    set_peft_model_state_dict(m1, merged)
    m1.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want = with_deltas(base, delta_weights(merged), 4 / 2, x)
        torch.testing.assert_close(m1(x), want)
        torch.testing.assert_close(loaded(x), want)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_round_trip_mixture(tmp_path, rslora):
    base, x, w = base_model(), torch.randn(5, 6), [0.4, 0.6]
    m1, m2 = peft_adapter(base, 3, rslora), peft_adapter(base, 4, rslora)
    s1, s2 = get_peft_model_state_dict(m1), get_peft_model_state_dict(m2)
    m1.save_pretrained(tmp_path)  # writes adapter_config.json for rank r; replace both files
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(mixture_config(cfg, 2)))
    save_file(mixture([s1, s2], w), tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    scaling = 4 / math.sqrt(2) if rslora else 4 / 2
    d1, d2 = delta_weights(s1), delta_weights(s2)
    with torch.no_grad():
        want = with_deltas(base, {k: w[0] * d1[k] + w[1] * d2[k] for k in d1}, scaling, x)
        torch.testing.assert_close(loaded(x), want)
