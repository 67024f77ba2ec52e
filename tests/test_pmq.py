"""MC#'s PMQ building blocks: the exact bit allocation against the authors' own allocations (their shipped Mixtral
factors and Gurobi results, tests/data/mcmoe_mixtral_factors.json: 96 of 96 layers) and against a brute force;
round-to-nearest quantization and bit packing on hand-worked values."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from mumoe import MumoeError
from mumoe.apply.quant import pack, rtn, unpack
from mumoe.select.bits import allocate, expert_costs, normalised

DATA = Path(__file__).parent / "data" / "mcmoe_mixtral_factors.json"


def test_allocation_equals_the_authors_solver_on_their_mixtral_factors():
    d = json.loads(DATA.read_text())
    for budget, want in d["allocations"].items():
        for layer in range(32):
            costs = expert_costs(normalised(d["frequency"][layer]), normalised(d["weight"][layer]),
                                 [dict(zip((1, 2, 3), losses)) for losses in d["loss"][layer]])
            assert allocate(costs, int(budget)) == want[layer], (budget, layer)


def test_allocation_equals_a_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        E = 5
        costs = [{b: float(c) for b, c in zip((1, 2, 3), torch.rand(3, generator=g).sort(descending=True).values)}
                 for _ in range(E)]
        for budget in range(1 * 3 + 2 + 3, 3 * E + 1):
            best = min((sum(costs[i][c[i]] for i in range(E)), c) for c in itertools.product((1, 2, 3), repeat=E)
                       if sum(c) <= budget and 3 in c and 2 in c)
            got = allocate(costs, budget)
            assert sum(got) <= budget and 3 in got and 2 in got
            assert math.isclose(sum(costs[i][b] for i, b in enumerate(got)), best[0], rel_tol=1e-12)
    with pytest.raises(MumoeError, match="cannot hold"):
        allocate(costs, 7)  # 3 + 2 + 1·3 = 8 is the least for 5 experts
    with pytest.raises(MumoeError, match="sum to zero"):
        normalised([0, 0])


def test_rtn_by_hand_and_within_half_a_step():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 2.0]])
    q = rtn(w, 2, group=4)
    assert q.q.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]] and q.zero.tolist() == [[0.0], [1.0]]
    assert torch.equal(q.dequantize(), w)
    q = rtn(torch.tensor([[5.0, 5.0, 5.0]]), 3, group=2)  # constant groups (one padded): exact
    assert torch.equal(q.dequantize(), torch.tensor([[5.0, 5.0, 5.0]]))
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    for bits in (1, 2, 3, 4, 8):
        q = rtn(x, bits, group=128)
        assert q.scale.shape == (16, 3) and int(q.q.max()) <= 2 ** bits - 1
        step = q.scale.repeat_interleave(128, 1)[:, :300]
        assert ((q.dequantize() - x).abs() <= step / 2 + 1e-6).all()


def test_pack_by_hand_and_round_trip():
    # 1 = 01, 2 = 10, 3 = 11, low bit first: bits 1,0, 0,1, 1,1 -> 0b00111001 = 57
    assert pack(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    g = torch.Generator().manual_seed(2)
    for bits in range(1, 9):
        q = torch.randint(0, 2 ** bits, (7, 13), generator=g)
        data = pack(q, bits)
        assert data.numel() == -(-7 * 13 * bits // 8)
        assert torch.equal(unpack(data, bits, (7, 13)), q.to(torch.uint8))
    with pytest.raises(MumoeError, match="does not fit"):
        pack(torch.tensor([4]), 2)
