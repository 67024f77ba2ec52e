"""Every supported MoE family, on a tiny model built offline from its HF config class: the normalized view,
routing against the family's own formula (re-derived here from its modelling code, written independently of
the adapter), the block output recomposed from per-expert outputs, ratio 0 leaving logits identical, removed
experts re-routed by the formula over the kept ones, and exports (expert, atom and weight grains) that reload
with plain transformers to the same logits."""

from functools import lru_cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids, recompose, safetensors_of
import mumoe
import mumoe.api
from mumoe import MumoeError
from mumoe.apply import remove_experts, save_pruned
from mumoe.apply.masking import apply_masks, restore
from mumoe.drivers.layerwise import prune_layerwise
from mumoe.models import ADAPTERS, MOE_TYPES, moe_adapter_for
from mumoe.models.families import NoWidthKeyAdapter
from mumoe.models.prunable import prunable_names
from mumoe.models.tiny import TINY_CONFIGS, tiny_model
from mumoe.observe import MoEObserver
from mumoe.observe.layerwise import LayerwiseCheckpoint
from mumoe.recipe import Recipe
from mumoe.testtime import prompt_masks
from mumoe.testtime.experts import check_experts, experts_kept

FAMILIES = sorted(t for t in TINY_CONFIGS if t in MOE_TYPES)


def spec(**kw):
    """How a family routes. act: softmax | sigmoid | sparsemixer; bias: a selection-only per-expert bias;
    choose: what top-k ranks (scores = act(logits) [+ bias], or logits [+ bias]); renorm: True / False / a
    config key; scale: config key of a factor on the weights; block_scale: a factor the block puts on the routed
    sum; softcap: config key of tanh logit capping; groups: DeepSeek-V3 group-limited top-k from n_group."""
    return {"act": "softmax", "bias": False, "choose": "scores", "renorm": "norm_topk_prob", "scale": None,
            "block_scale": None, "softcap": None, "groups": False, **kw}


_DSV3 = spec(act="sigmoid", bias=True, groups=True, scale="routed_scaling_factor")
ROUTING = {
    "mixtral": spec(renorm=True), "qwen2_moe": spec(), "qwen3_moe": spec(), "olmoe": spec(),
    "deepseek_v3": _DSV3, "deepseek_v32": _DSV3, "dots1": _DSV3, "exaone_moe": _DSV3, "glm4_moe": _DSV3,
    "glm4_moe_lite": _DSV3, "glm_moe_dsa": _DSV3, "kimi_linear": _DSV3, "mimo_v2_flash": _DSV3,
    "minicpm5_moe": _DSV3, "solar_open": _DSV3, "nemotron_h": _DSV3,
    "cohere2_moe": spec(renorm=True),  # top-k of the logits, softmax over those k
    "deepseek_v2": spec(renorm=False, scale="routed_scaling_factor"),  # greedy top-k, never renormalized
    "ernie4_5_moe": spec(bias=True, renorm=True),  # softmax, + moe_statics bias for the choice
    "flex_olmo": spec(), "granitemoe": spec(renorm=True), "granitemoe_swa": spec(renorm=True),
    "granitemoeshared": spec(renorm=True), "granitemoehybrid": spec(renorm=True), "hunyuan_v1_moe": spec(renorm=True),
    "jamba": spec(renorm=False),
    "jetmoe": spec(renorm=True),  # softmax over the top-k logits
    # √softplus scores (+ bias to choose), renormalized, × the scale; its hash layers: `assert_routing`
    "deepseek_v4": spec(act="sqrtsoftplus", bias=True, renorm=True, scale="routed_scaling_factor"),
    "lara_mini": spec(), "mellum": spec(), "minimax": spec(renorm=True), "qwen3_next": spec(),
    "qwen3_5_moe_text": spec(), "phimoe": spec(act="sparsemixer"),
    "afmoe": spec(act="sigmoid", bias=True, renorm=True, scale="route_scale"),
    "hy_v3": spec(act="sigmoid", bias=True, renorm=True, scale="router_scaling_factor"),
    "kolibri1": spec(act="sigmoid", bias=True, choose="logits"),
    "laguna": spec(act="sigmoid", bias=True, renorm=True, softcap="moe_router_logit_softcapping",
                   block_scale="moe_routed_scaling_factor"),
    "minimax_m2": spec(act="sigmoid", bias=True, renorm=True),
    "flint": spec(act="sigmoid"),  # sigmoid top-k, renormalized; shared expert added in full
    "beam": spec(act="sigmoid", bias=True, groups=True, block_scale="routed_scaling_factor"),
    "bailing_hybrid": _DSV3,
    "kolibri1_1": spec(act="sigmoid", bias=True, choose="logits"),
    "axk2": _DSV3,
    "hy_v4": _DSV3,  # (+ hyper-connection streams around the blocks)
    "lfm2_moe": spec(act="sigmoid", bias=True, scale="routed_scaling_factor"),  # + expert_bias on the block
    # softmax over the 8 routed + 2 identity experts, top-k of scores + bias, never renormalized, x the scale
    "longcat_flash": spec(bias=True, renorm=False, scale="routed_scaling_factor"),
    "gpt_oss": spec(renorm=True),  # softmax over the top-k logits (router with a bias)
    "llama4_text": spec(act="sigmoid", choose="logits", renorm=False),  # σ(top-k logits), scaling the expert's input
}


def test_every_family_has_a_routing_formula_and_there_are_30():
    assert set(ROUTING) == set(FAMILIES)
    assert len(FAMILIES) >= 30


@lru_cache(maxsize=None)
def _model(family):
    return tiny_model(family)


def fresh(family):
    model = tiny_model(family)
    return model


def reference(family, cfg, logits, bias, keep=None):
    """Combine weights [T, k] and experts [T, k] from the family's formula; keep: only these experts exist."""
    s = spec_of(family)
    E = logits.shape[-1]
    keep = list(range(E)) if keep is None else keep
    lg = logits.double()[:, keep]  # [T, E']
    b = None if bias is None else bias.double()[keep]
    k = cfg.num_experts_per_tok if hasattr(cfg, "num_experts_per_tok") else cfg.moe_k
    if s["softcap"]:
        cap = getattr(cfg, s["softcap"])
        lg = torch.tanh(lg / cap) * cap
    T = lg.shape[0]
    if s["act"] == "sparsemixer":  # PhiMoE at inference: argmax, then the next, each softmax-weighted over the
        eps = cfg.router_jitter_noise  # logits within a relative band of it
        w, idx = torch.zeros(T, 2, dtype=torch.float64), torch.zeros(T, 2, dtype=torch.long)
        for t in range(T):
            row = lg[t].clone()
            for slot in range(2):
                m, j = row.max(0)
                band = ((m - lg[t]) / lg[t].abs().clamp(min=m)) > 2 * eps
                masked = row.masked_fill(band, float("-inf"))
                w[t, slot] = torch.softmax(masked, 0)[j]
                idx[t, slot] = j
                row = row.clone()
                row[j] = float("-inf")
        return w, torch.tensor(keep)[idx]
    scores = {"softmax": lambda: torch.softmax(lg, -1), "sigmoid": lambda: torch.sigmoid(lg),
              "sqrtsoftplus": lambda: torch.sqrt(torch.nn.functional.softplus(lg))}[s["act"]]()
    choice = (scores if s["choose"] == "scores" else lg) + (b if s["bias"] else 0)
    w, idx = torch.zeros(T, k, dtype=torch.float64), torch.zeros(T, k, dtype=torch.long)
    G = getattr(cfg, "n_group", None) or 1
    for t in range(T):
        allowed = list(range(len(keep)))
        if s["groups"] and G > 1:
            per = len(keep) // G
            top2 = [sorted(choice[t, g * per:(g + 1) * per].tolist())[-2:] for g in range(G)]
            chosen_groups = sorted(range(G), key=lambda g: -sum(top2[g]))[: cfg.topk_group]
            allowed = [e for e in allowed if e // per in chosen_groups]
        chosen = sorted(allowed, key=lambda e: -choice[t, e].item())[:k]
        if s["choose"] == "logits":
            wt = torch.sigmoid(lg[t, chosen])
        else:
            wt = scores[t, chosen]
        renorm = s["renorm"] if isinstance(s["renorm"], bool) else bool(getattr(cfg, s["renorm"], True))
        if renorm:
            wt = wt / wt.sum()
        if s["scale"]:
            wt = wt * getattr(cfg, s["scale"])
        w[t], idx[t] = wt, torch.tensor(chosen)
    return w, torch.tensor(keep)[idx]


def spec_of(family):
    return ROUTING[family]


def observe(model, x):
    routes, experts, blocks = {}, {}, {}
    layers = moe_adapter_for(model).moe_layers()
    def keep(i, o):  # GPT-OSS's block returns (output, router scores)
        o = o[0] if isinstance(o, tuple) else o
        blocks[i] = o.reshape(-1, o.shape[-1])

    hooks = [l.block.register_forward_hook(lambda m, a, o, i=l.index: keep(i, o)) for l in layers]
    try:
        with torch.no_grad(), MoEObserver(model, on_route=lambda ev: routes.__setitem__(ev.layer.index, ev),
                                          on_expert=lambda ev: experts.setdefault(ev.layer.index, []).append(ev)):
            logits = model(x).logits
    finally:
        for h in hooks:
            h.remove()
    return layers, routes, experts, blocks, logits


def assert_routing(family, model, layer, ev, keep=None, tokens=None):
    """The observed routing equals the family's formula over `keep` (the original expert ids). tokens: the input
    ids, for a layer that picks experts from a fixed token table (DeepSeek-V4's hash layers)."""
    W = layer.router_weight.double()
    logits = ev.hidden.double() @ W.T  # [T, E'] from the block input and the (sliced) router rows (and bias)
    if layer.router_bias is not None:
        logits = logits + layer.router_bias.double()
    if layer.fixed_routing:  # the table's experts, weighted by the family's scores there (renormalized, scaled)
        idx = layer.router.tid2eid[tokens.reshape(-1)]  # [T, k]
        scores = torch.sqrt(torch.nn.functional.softplus(logits)).gather(-1, idx)
        w = scores / scores.sum(-1, keepdim=True) * model.config.routed_scaling_factor
        assert torch.equal(ev.indices, idx), family
        torch.testing.assert_close(ev.weights.double(), w, rtol=1e-5, atol=1e-6)
        return
    bias = layer.correction_bias
    if spec_of(family)["bias"]:
        assert bias is not None, "the family's selection bias was not found"
    full = torch.arange(W.shape[0]).tolist()
    w, idx = reference(family, model.config, logits, None if bias is None else bias.detach(), full)
    order_ev, order_ref = ev.indices.sort(-1), idx.sort(-1)
    assert torch.equal(order_ev.values, order_ref.values), family
    torch.testing.assert_close(ev.weights.gather(-1, order_ev.indices).double(), w.gather(-1, order_ref.indices),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_view_routing_and_block_recomposition(family):
    model = _model(family)
    cfg = model.config
    x = ids()
    layers, routes, experts, blocks, _ = observe(model, x)
    assert layers, family
    for layer in layers:
        assert layer.num_experts == 8 and layer.top_k == 2 and layer.intermediate_size == 16
        assert layer.router_weight.shape == (8 + layer.identity_experts, cfg.hidden_size)
        assert layer.gate_proj(3).data_ptr() == layer.experts.gate_up_proj[3].data_ptr()
        ev = routes[layer.index]
        # routing: the model's router output equals the family's formula
        assert_routing(family, model, layer, ev, tokens=x)
        # the block input is the residual stream through the norm the adapter names
        if layer.residual_norm is not None:
            torch.testing.assert_close(layer.residual_norm(ev.residual), ev.hidden)
        # block output = block_scale · Σ_i g_i f_i(x) (+ shared expert), token by token from the expert events
        block_scale = spec_of(family)["block_scale"]
        scale = getattr(cfg, block_scale) if block_scale else 1.0
        assert layer.routed_scale == pytest.approx(scale)
        total, seen = recompose(layer, ev, experts[layer.index], scale)
        assert torch.equal(seen, torch.full((ev.hidden.shape[0],), 2))
        torch.testing.assert_close(total, blocks[layer.index], rtol=1e-5, atol=1e-5)


def _drop_two(layer):
    """Two experts to remove, one per group where the router has groups (equal kept per group)."""
    if layer.n_group and layer.n_group > 1:
        per = layer.num_experts // layer.n_group
        return [g * per + 1 for g in range(layer.n_group)][:2] if layer.n_group == 2 else None
    return [1, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_and_removed_experts_follow_the_formula(family):
    model, x = fresh(family), ids()
    with torch.no_grad():
        before = model(x).logits
    report = mumoe.prune(model, "random", 0.0)
    assert all(len(e["kept"]) == 8 for e in report.layers)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    # remove two experts per layer: the pruned router picks among the kept ones by the same formula
    layers = moe_adapter_for(model).moe_layers()
    keep = {l.index: sorted(set(range(8)) - set(_drop_two(l))) for l in layers}
    if any(l.fixed_routing for l in layers):  # a hash layer's table has no rule for removed experts: refused
        with pytest.raises(MumoeError) as e:
            remove_experts(model, keep)
        assert "hash routing" in str(e.value) and "\n" not in str(e.value)
        with torch.no_grad():
            assert torch.equal(model(x).logits, before)
        return
    remove_experts(model, keep)
    layers, routes, *_ = observe(model, x)
    for layer in layers:
        assert layer.num_experts == 6 and all(rt.tensor.shape[rt.dim] == 6 + rt.tail for rt in layer.router_tensors)
        assert_routing(family, model, layer, routes[layer.index])


@pytest.mark.parametrize("family", FAMILIES)
def test_exports_reload_with_plain_transformers(family, tmp_path):
    x = ids()
    for method, ratio, opts in (("random", 0.25, {}), ("heapr", 0.5, {"form": "uniform"}), ("wanda", 0.5, {})):
        if family in ("deepseek_v3", "deepseek_v32", "dots1", "glm4_moe", "mimo_v2_flash") and method == "random":
            ratio = 0.5  # group-limited routers drop equally in every group
        model = fresh(family)
        calib = ids(4, 16, seed=1) if method != "random" else None
        try:
            report = mumoe.prune(model, method, ratio, calib=calib, batch_size=4, **opts)
        except MumoeError as e:  # a family whose config cannot hold a narrower expert width (or fewer experts: JetMoE)
            assert "\n" not in str(e), (family, str(e))  # says so in one line
            assert (method == "heapr" and "global form" in str(e)) or (method == "random" and _removal_gap(family)), e
            continue
        with torch.no_grad():
            expected = model(x).logits
        out = save_pruned(model, tmp_path / method, report)
        if report.form == "mumoe":  # hash layers kept whole (DeepSeek-V4): per-layer counts, mumoe's own form
            assert method == "random" and _whole_layers(family)
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                                              trust_remote_code=report.form == "mumoe")
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        with torch.no_grad():
            got = reloaded.eval()(x).logits
        assert (got - expected).abs().max() <= 1e-5, (family, method)


LAYERWISE = [f for f in FAMILIES if ADAPTERS[f].layerwise_gap is None]
GAPS = [f for f in FAMILIES if ADAPTERS[f].layerwise_gap is not None]


@pytest.mark.parametrize("family", LAYERWISE)
def test_layer_sequential_streamed_export_equals_in_memory(family, tmp_path):
    """A checkpoint as save_pretrained writes it, pruned layer by layer and written tensor by tensor, equals the
    loaded model pruned in memory and saved: same scores and kept sets, bit-identical tensors, same logits."""
    src = tmp_path / "src"
    tiny_model(family).save_pretrained(src)
    wins = ids(6, 16, seed=1)
    x = ids(2, 12, seed=3)
    for method, opts in (("reap", {}), ("heapr", {"form": "uniform"}), ("wanda", {})):
        recipe = Recipe.build(method, 0.5, calib="tensor", nsamples=6, seqlen=16, **opts)
        out = tmp_path / method
        try:
            report = prune_layerwise(src, recipe, out, (wins, None, {"source": "tensor"}), verbose=False)
        except MumoeError as e:  # the family's config cannot hold a narrower width (or fewer experts): refused
            assert (method == "heapr" and isinstance(ADAPTERS[family](tiny_model(family)), NoWidthKeyAdapter)) or (
                method == "reap" and _removal_gap(family)), e  # before any work
            assert not out.exists()
            continue
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ref = mumoe.api.prune(model, recipe, calib=wins)
        save_pruned(model, tmp_path / f"{method}-memory", ref)
        if report.grain != "weight":
            assert report.layers == ref.layers, (family, method)
        a, b = safetensors_of(out), safetensors_of(tmp_path / f"{method}-memory")
        assert set(a) == set(b), (family, method, set(a) ^ set(b))
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (family, method, k)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                        trust_remote_code=report.form == "mumoe").eval()
        with torch.no_grad():
            assert (reloaded(x).logits - model(x).logits).abs().max() <= 1e-5, (family, method)


def test_layerwise_gaps_are_refused_in_one_line(tmp_path):
    """Every family reads layer by layer but Kolibri 1.1 (its layers read other layers' keys and values within one
    forward, which a layer-by-layer sweep does not carry): refused in one line naming it, before any weight."""
    assert GAPS == ["kolibri1_1"]
    for family in GAPS:
        tiny_model(family).save_pretrained(tmp_path / family)
        with pytest.raises(MumoeError) as e:
            LayerwiseCheckpoint(tmp_path / family, torch.float32)
        assert "not supported yet" in str(e.value) and "\n" not in str(e.value) and family in str(e.value)
        assert ADAPTERS[family].layerwise_gap in str(e.value)


def _whole_layers(family):
    """The family has layers that pick experts from a fixed token table (DeepSeek-V4): expert methods and merges
    keep them whole."""
    return any(l.fixed_routing for l in moe_adapter_for(_model(family)).moe_layers())


def _removal_gap(family):
    """The family's config cannot hold fewer routed experts (JetMoE): expert removal and merging are refused."""
    return ADAPTERS[family].expert_removal_gap is not None


def _grouped(model):
    return any(l.n_group and l.n_group > 1 for l in moe_adapter_for(model).moe_layers())


@pytest.mark.parametrize("family", FAMILIES)
def test_per_prompt_and_merge_grains(family, tmp_path):
    """Per-prompt μ-MoE masks (Wanda on the prompt) reverse exactly; per-prompt experts equal offline removal and
    reverse; an HC-SMoE merge exports and reloads to the same logits. Group-limited routers refuse the last two
    in one line."""
    model, x = fresh(family), ids(1, 10)
    with torch.no_grad():
        dense = model(x).logits
    masks = prompt_masks(model, x, 0.5, "row")
    names = set(prunable_names(model))
    # every prunable weight a forward reads through its module (Mamba's dt_proj is read as a tensor: no inputs seen)
    assert set(masks) <= names and {n for n in names if ".experts." in n or "mamba" not in n} <= set(masks)
    for name, m in masks.items():  # each output row keeps half of its inputs
        assert bool((m.sum(-1) == m.shape[-1] // 2).all()), name
    saved = apply_masks(model, masks)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, dense)
    restore(model, saved)
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
    layers = moe_adapter_for(model).moe_layers()
    if _grouped(model):
        with pytest.raises(MumoeError) as e:
            check_experts(model, 3)
        assert "group-limited" in str(e.value)
        with pytest.raises(MumoeError) as e:
            mumoe.prune(model, "hc-smoe", 0.25, calib=ids(4, 12))
        assert "\n" not in str(e.value)
        return
    keep = {l.index: [0, 2, 5] for l in layers}
    if any(l.fixed_routing for l in layers):  # hash-routed layers: per-prompt experts refused, the model untouched
        with pytest.raises(MumoeError) as e:
            check_experts(model, 3)
        assert "hash routing" in str(e.value)
        with pytest.raises(MumoeError):
            with experts_kept(model, keep):
                pass
        with torch.no_grad():
            assert torch.equal(model(x).logits, dense)
    else:
        offline = fresh(family)
        remove_experts(offline, keep)
        with torch.no_grad():
            want = offline(x).logits
            with experts_kept(model, keep):
                got = model(x).logits
            assert torch.equal(got, want)
            assert torch.equal(model(x).logits, dense)
    if _removal_gap(family):  # removing or merging experts is refused in one line, the model untouched
        with pytest.raises(MumoeError) as e:
            mumoe.prune(model, "hc-smoe", 0.25, calib=ids(4, 12))
        assert "\n" not in str(e.value) and ADAPTERS[family].expert_removal_gap in str(e.value)
        with torch.no_grad():
            assert torch.equal(model(x).logits, dense)
        return
    report = mumoe.prune(model, "hc-smoe", 0.25, calib=ids(4, 12))
    fixed = {l.index for l in layers if l.fixed_routing}  # (kept whole: DeepSeek-V4's hash layers)
    assert all(len(e["groups"]) == (8 if e["layer"] in fixed else 6) for e in report.layers)
    with torch.no_grad():
        expected = model(x).logits
    out = save_pruned(model, tmp_path / "merged", report)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                    trust_remote_code=report.form == "mumoe").eval()
    with torch.no_grad():
        assert (reloaded(x).logits - expected).abs().max() <= 1e-5


def test_readme_table_is_the_registry(capsys):
    from pathlib import Path

    from mumoe.cli import main
    from mumoe.models.support import markdown, support_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- architectures:")
    section = readme[readme.index("\n", start) + 1: readme.index("<!-- /architectures -->")].strip()
    assert section == markdown()
    rows = support_table()
    assert len(rows) >= 30 and sum(r.tiny for r in rows) >= 30
    assert main(["info", "--architectures"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{r.model_type} " in out for r in rows)


def test_every_causal_lm_family_with_routed_experts_is_supported_or_refused_with_a_reason():
    """The installed transformers' causal-LM families whose modelling code has routed experts (transformers'
    experts decorator, the v5 convention): each is supported or in NOT_YET with why and the nearest family, so a
    new transformers cannot add a family that mumoe meets with a generic error."""
    import importlib.util
    from pathlib import Path

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mumoe.models.families import NOT_YET

    root = Path(importlib.util.find_spec("transformers.models").submodule_search_locations[0])
    routed = {t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
              if (f := root / t / f"modeling_{t}.py").exists() and "use_experts_implementation" in f.read_text()}
    assert len(routed) >= 40
    missing = sorted(t for t in routed if t not in ADAPTERS and t not in NOT_YET)
    assert missing == []
    assert all(nearest in ADAPTERS for _, nearest in NOT_YET.values())


def test_unsupported_family_names_the_nearest():
    from transformers import AutoConfig

    class Fake:
        config = AutoConfig.for_model("dbrx")

    with pytest.raises(MumoeError) as e:
        mumoe.models.adapter_for(Fake())
    assert "dbrx is not supported yet" in str(e.value) and "mixtral" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", LAYERWISE)
def test_aimer_from_the_files_equals_in_memory(family, tmp_path):
    """AIMER scored straight from the safetensors files (the model never loaded) equals AIMER on the loaded
    model, whatever names the family's checkpoint gives its expert tensors."""
    from mumoe.criteria import score_methods
    from mumoe.criteria.aimer_stream import stream_aimer

    tiny_model(family).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = score_methods(model, ["aimer"], None)["aimer"]
    got = stream_aimer(tmp_path, progress=False)
    layers = moe_adapter_for(model).moe_layers()
    assert list(got) == [l.index for l in layers]
    for a, b in zip(got.values(), ref):
        assert torch.equal(a.double(), b.double()), family


@pytest.mark.parametrize("family", FAMILIES)
def test_task_library_partial_load_and_match(family, tmp_path):
    """PreMoe TAER on every family: a task library built on the model matches the checkpoint files (router rows
    found where the family keeps them), a task's model read from the files with only its experts equals the loaded
    model with the others removed, and a prompt of a task's token matches that task. Group-limited routers refuse
    in one line."""
    from mumoe.retrieval import TaskLibrary, build_library, load_task_model, match
    from mumoe.retrieval.partial import checkpoint_fingerprint, load_matcher

    model = fresh(family)
    model.save_pretrained(tmp_path / "m")
    tasks = {"five": torch.full((3, 12), 5), "hundred": torch.full((3, 12), 100)}
    if _grouped(model) or _removal_gap(family) or _whole_layers(family):
        with pytest.raises(MumoeError) as e:
            build_library(model, tasks, keep=4, progress=False)
        assert "\n" not in str(e.value)
        return
    build_library(model, tasks, keep=4, progress=False).save(tmp_path / "lib")
    lib = TaskLibrary.load(tmp_path / "lib")
    assert checkpoint_fingerprint(tmp_path / "m") == lib.fingerprint  # the routers read from the files agree
    part = load_task_model(tmp_path / "m", lib, "hundred")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    remove_experts(full, lib.tasks["hundred"]["kept"])
    x = ids(2, 10, seed=4)
    with torch.no_grad():
        assert (part(x).logits - full(x).logits).abs().max() <= 1e-6
    matcher = load_matcher(tmp_path / "m", lib)  # the decoder up to the first router, read from the files
    assert match(matcher, lib, torch.full((7,), 100)).task == "hundred"
