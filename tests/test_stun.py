"""STUN's expert stage as pure functions (criteria/stun.py): the greedy clustering with its reject rule on a
hand-worked matrix, the threshold search's trajectory, the representatives against a brute-force distance to the
mean, the co-selection counts and the weight Gram against loops. The equality with the authors' script is
`benchmarks/stun_authors.py` (BENCHMARKS.md)."""

import pytest
import torch

from conftest import make
from mumoe import MumoeError
from mumoe.criteria import stun
from mumoe.models import moe_adapter_for


def sym(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_clusters_reject_a_mixed_join():
    # 0-1 at 0.1 join; 2-3 at 0.2 join; 1-2 at 0.3 is the closest open pair, but 0 is 0.9 from 2: rejected
    # (τ = 0.5); 0-3 at 0.95 is over τ: the loop ends with {0, 1}, {2, 3}
    d = sym([[0, .1, .9, .95], [.1, 0, .3, .8], [.9, .3, 0, .2], [.95, .8, .2, 0]])
    assert stun.cluster(d, 0.5, max_removed=3) == [(0, 1), (2, 3)]
    assert stun.cluster(d, 0.15, max_removed=3) == [(0, 1), (2,), (3,)]
    assert stun.cluster(d, 0.5, max_removed=1) == [(0, 1), (2,), (3,)]  # at least E − 1 clusters left
    assert stun.cluster(d, 2.0, max_removed=3) == [(0, 1, 2, 3)]  # every cross distance under τ


def test_threshold_search_follows_the_doubling_then_halving_steps():
    """Two layers of the matrix above, target 6 of 8: from τ = 0.5 (4 kept) the step doubles while the total
    stays under the target and halves once it has turned, as a loop written here does; a target the totals jump
    over (7: each layer moves by one cluster at a time, both together) is a one-line error."""
    d = sym([[0, .1, .9, .95], [.1, 0, .3, .8], [.9, .3, 0, .2], [.95, .8, .2, 0]])
    tau, clusters = stun.search([d, d], 6, [3, 3])
    assert sum(len(c) for c in clusters) == 6 and clusters == [[(0, 1), (2,), (3,)]] * 2
    # the same loop by hand
    t, step, last, turned = 0.5, 0.1, 0, False
    while True:
        n = 2 * len(stun.cluster(d, t, 3))
        if n == 6:
            break
        direction = -1 if n < 6 else 1
        turned = turned or last * direction < 0
        step = step / 2 if turned else step * 2
        t, last = t + step * direction, direction
    assert tau == t
    with pytest.raises(MumoeError, match="no τ keeping exactly 7"):  # totals move in steps of 2 here
        stun.search([d, d], 7, [3, 3])


def test_representatives_equal_the_distance_to_the_mean():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g, dtype=torch.float64)
    gram = w @ w.T
    clusters = [(0, 2, 5), (1, 3, 4)]
    want = [c[int(torch.argmin((w[list(c)] - w[list(c)].mean(0)).norm(dim=1)))] for c in clusters]
    assert stun.representatives(clusters, gram) == want
    assert stun.representatives([(3, 4), (5,)], gram) == [3, 5]  # a pair ties: the lower id


def test_coselect_counts_and_gram_equal_loops():
    idx = torch.tensor([[0, 2], [2, 0], [1, 3], [0, 2], [3, 1]])
    c = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in idx.tolist():
        c[a, b] += 1
        c[b, a] += 1
    assert torch.equal(stun.coselect_counts(idx, 4), c)
    d = stun.coselect_distance(c)
    assert torch.allclose(d, (-c / c.mean()).float())
    with pytest.raises(MumoeError, match="undefined"):
        stun.coselect_distance(torch.zeros(4, 4))
    layer = moe_adapter_for(make("qwen3_moe")).moe_layers()[0]
    flat = torch.stack([torch.cat([layer.experts.gate_up_proj[e].flatten(), layer.experts.down_proj[e].flatten()])
                        for e in range(layer.num_experts)]).double()
    assert torch.allclose(stun.expert_gram(layer, chunk=3), flat @ flat.T)
    r = layer.router_weight.detach().float()
    assert torch.allclose(stun.router_distance(r), torch.cdist(r, r) / r.norm())
