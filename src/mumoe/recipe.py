"""`Recipe`: one frozen, validated, versioned description of a pruning run.

It names the method, the ratio, the calibration (sources, windows, seed, batch size), exactly one grain part
(expert: budget + scoring order; atom: form + scope; weight: structure) and the run settings (dtype, device).
It validates itself completely when built — before any model is loaded or any pass is run — and serialises
into `pruning.json`, so that `mumoe prune --recipe run/pruning.json --out DIR` replays a run exactly.

    recipe = Recipe.build("reap", 0.5, calib="domain", nsamples=64)
    mumoe.prune(model, recipe, tokenizer=tok)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import MumoeError
from .select.experts import check_ratio  # noqa: F401  (re-exported: the one definition lives in select)
from .select.weights import parse_structure  # noqa: F401

RECIPE_VERSION = 1
BUDGETS = ("uniform", "global")
ORDERS = ("one-shot", "progressive")
FORMS = ("uniform", "global")
SCOPES = ("global", "layer")
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda", "auto")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration windows. sources: paths of .txt files/folders, 'domain' (every bundled calib split, one
    source each) or 'domain:NAME'; 'tensor' when token ids were passed in directly. nsamples windows in all,
    split evenly over the sources (in order); seed None = the first windows of each source, consecutive and
    non-overlapping; an int = windows at seeded random offsets (Wanda style)."""

    sources: tuple[str, ...] = ()
    nsamples: int = 128
    seqlen: int = 512
    seed: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, Path)):
            object.__setattr__(self, "sources", (str(self.sources),))
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        for name, low in (("nsamples", 1), ("seqlen", 2), ("batch_size", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise MumoeError(f"calibration {name} must be an integer >= {low}, got {v!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise MumoeError(f"seed must be an integer, got {self.seed!r}")
        if any(not s.strip() for s in self.sources):
            raise MumoeError("empty calibration source")

    def per_source(self) -> list[int]:
        """Windows drawn from each source: nsamples split evenly, the first sources taking the remainder."""
        n = len(self.sources)
        if n == 0:
            return []
        if self.nsamples < n:
            raise MumoeError(f"nsamples={self.nsamples} is fewer than the {n} calibration sources (one window each)")
        return [self.nsamples // n + (i < self.nsamples % n) for i in range(n)]


@dataclass(frozen=True)
class ExpertPart:
    budget: str = "uniform"  # uniform: round(ratio·E) per layer; global: one normalized ranking, floor top_k
    order: str = "one-shot"  # one-shot: every layer on the unpruned model; progressive: on the pruned earlier layers


@dataclass(frozen=True)
class AtomPart:
    form: str = "uniform"  # uniform: one width for every expert (HF loadable); global: HEAPr's ranking
    scope: str = "global"  # global form: rank over all layers (HEAPr) or per layer
    # uniform form: kept widths are multiples of this (GPU kernels tile by 64/128; llama.cpp's k-quants need
    # 256 for the down projection's rows); recipes written before it existed used 8
    width_multiple: int = 64


@dataclass(frozen=True)
class WeightPart:
    structure: str = "row"  # row | N:M | column
    order: str = "one-shot"  # Wanda: one-shot (every layer on the dense model) or progressive (the Wanda authors'
    #                          order: layer ℓ calibrated on the already-pruned layers < ℓ; layer-sequential only)


GRAIN_PARTS = {"expert": ExpertPart, "atom": AtomPart, "weight": WeightPart}


@dataclass(frozen=True)
class Recipe:
    """A whole pruning run. Build with `Recipe.build(...)` (flat options) or `Recipe.from_dict` (pruning.json)."""

    method: str
    ratio: float
    calib: CalibSpec = field(default_factory=CalibSpec)
    expert: ExpertPart | None = None
    atom: AtomPart | None = None
    weight: WeightPart | None = None
    dtype: str = "auto"  # auto = the checkpoint's own (fp32 on the CPU for bf16/fp16); exports keep the source's
    device: str | None = None  # cpu | cuda | cuda:N | auto; None = where the model already is (CLI: cpu)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        from .criteria import get_method

        m = get_method(self.method) if isinstance(self.method, str) else None
        if m is None:
            raise MumoeError(f"method must be a name, got {self.method!r}")
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.version != RECIPE_VERSION:
            raise MumoeError(f"recipe version {self.version} is not readable by this mumoe (reads {RECIPE_VERSION})")
        parts = {g: getattr(self, g) for g in GRAIN_PARTS if getattr(self, g) is not None}
        if not parts:  # the grain's defaults
            object.__setattr__(self, m.grain, GRAIN_PARTS[m.grain]())
        elif list(parts) != [m.grain]:
            raise MumoeError(f"method {self.method!r} is {m.grain}-grain; the recipe gives options for "
                             f"{', '.join(parts)}")
        if self.atom is not None and (not _is_int(self.atom.width_multiple) or self.atom.width_multiple < 1):
            raise MumoeError(f"width_multiple must be a positive integer, got {self.atom.width_multiple!r}")
        if self.dtype not in DTYPES:
            raise MumoeError(f"unknown dtype {self.dtype!r}; use {', '.join(DTYPES)}")
        if not (self.device is None or self.device in DEVICES or str(self.device).startswith("cuda:")):
            raise MumoeError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N or auto")
        if m.needs_calib and not self.calib.sources:
            raise MumoeError(f"method {self.method!r} needs calibration data: pass --calib PATH (a .txt file or "
                             "folder, 'domain' for the bundled splits)")
        self.calib.per_source()
        part = self.part
        if m.grain == "expert":
            if part.budget not in BUDGETS:
                raise MumoeError(f"unknown budget {part.budget!r}; available: {', '.join(BUDGETS)}")
            if part.order not in ORDERS:
                raise MumoeError(f"unknown scoring order {part.order!r}; available: {', '.join(ORDERS)}")
            if not m.needs_calib and part.order != "one-shot":  # data-free scores do not depend on earlier layers
                object.__setattr__(self, "expert", replace(part, order="one-shot"))
            if self.part.order == "progressive" and part.budget != "uniform":
                raise MumoeError("progressive scoring needs the uniform budget")
        elif m.grain == "atom":
            if part.form not in FORMS:
                raise MumoeError(f"unknown form {part.form!r}; use uniform or global")
            if part.scope not in SCOPES:
                raise MumoeError(f"unknown scope {part.scope!r}; use global or layer")
        else:
            nm = parse_structure(part.structure)
            if part.order not in ORDERS:
                raise MumoeError(f"unknown scoring order {part.order!r}; available: {', '.join(ORDERS)}")
            if self.method != "wanda" and part.order != "one-shot":
                object.__setattr__(self, "weight", replace(part, order="one-shot"))
            if self.method == "magnitude" and part.structure != "row":
                raise MumoeError("magnitude pruning has one threshold per matrix; --structure applies to wanda")
            if nm is not None and not math.isclose(self.ratio, 1 - nm[0] / nm[1], abs_tol=1e-9):
                raise MumoeError(f"--structure {part.structure} removes {1 - nm[0] / nm[1]:.0%} of the weights, but "
                                 f"--ratio says {self.ratio:.0%}; pass --ratio {1 - nm[0] / nm[1]:g}")

    # -- views -------------------------------------------------------------------------------------------
    @property
    def grain(self) -> str:
        from .criteria import get_method

        return get_method(self.method).grain

    @property
    def part(self):
        return getattr(self, self.grain)

    def describe(self) -> str:
        """What is pruned, in words (for the CLI's first line)."""
        if self.grain == "expert":
            what = f"experts (budget {self.expert.budget}, scoring {self.expert.order})"
        elif self.grain == "atom":
            what = f"atoms ({self.atom.form} form)" + ("" if self.atom.form == "uniform" else
                                                        " ranked over all layers" if self.atom.scope == "global"
                                                        else " ranked per layer")
        else:
            what = f"weights ({self.weight.structure}" + (
                ", progressive order)" if self.weight.order == "progressive" else ")")
        return f"{self.ratio:.0%} of {what} with {self.method}"

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def build(cls, method: str, ratio: float, calib=None, nsamples: int = 128, seqlen: int = 512,
              seed: int | None = None, batch_size: int | None = None, budget: str = "uniform",
              order: str = "one-shot", form: str = "uniform", scope: str = "global", structure: str = "row",
              dtype: str = "auto", device: str | None = None, width_multiple: int = 64) -> "Recipe":
        """From flat options (the CLI's flags); the grain part is chosen by the method. calib: a source, a
        list of sources, or None."""
        from .criteria import get_method

        m = get_method(method) if isinstance(method, str) else None
        if m is None:
            raise MumoeError(f"method must be a name, got {method!r}")
        sources = () if calib is None else (calib,) if isinstance(calib, (str, Path)) else tuple(calib)
        bs = batch_size if batch_size is not None else (4 if m.grain == "atom" else 8)
        part = {"expert": {"expert": ExpertPart(budget, order)}, "atom": {"atom": AtomPart(form, scope, width_multiple)},
                "weight": {"weight": WeightPart(structure, order)}}[m.grain]
        return cls(method, ratio, CalibSpec(sources, nsamples, seqlen, seed, bs), dtype=dtype, device=device, **part)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calib"]["sources"] = list(self.calib.sources)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "method" not in d or "ratio" not in d:
            raise MumoeError("not a mumoe recipe (needs at least 'method' and 'ratio')")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise MumoeError(f"recipe has unknown fields: {', '.join(sorted(unknown))}")
        try:
            kw = dict(d)
            calib = kw.get("calib") or {}
            if not isinstance(calib, dict):
                raise MumoeError(f"malformed recipe: calib must be an object, got {type(calib).__name__}")
            sources = calib.get("sources", ())
            if isinstance(sources, str):
                sources = [sources]  # one source written as a string (not split into characters)
            if not isinstance(sources, (list, tuple)) or not all(isinstance(x, str) for x in sources):
                raise MumoeError("malformed recipe: calib.sources must be a list of paths (or 'domain')")
            kw["calib"] = CalibSpec(**{**calib, "sources": tuple(sources)})
            if isinstance(kw.get("atom"), dict):
                kw["atom"] = {"width_multiple": 8, **kw["atom"]}  # what a recipe without the field ran with
            for g, cls_part in GRAIN_PARTS.items():
                if kw.get(g) is not None:
                    kw[g] = cls_part(**kw[g])
            return cls(**kw)
        except TypeError as e:
            raise MumoeError(f"malformed recipe: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe JSON, or the pruning.json of an earlier run (its "recipe" entry); a folder means its
        pruning.json."""
        p = Path(path)
        if p.is_dir():
            p = p / "pruning.json"
        try:
            d = json.loads(p.read_text("utf-8"))
        except FileNotFoundError as e:
            raise MumoeError(f"recipe not found: {p}") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MumoeError(f"cannot read recipe {p}: {e}") from e
        if isinstance(d, dict) and "recipe" in d:
            d = d["recipe"]
        elif isinstance(d, dict) and "mumoe_version" in d:
            raise MumoeError(f"{p} was written by a mumoe without recipes; it cannot be replayed")
        return cls.from_dict(d)

    @staticmethod
    def expert_width(config) -> int | None:
        """The routed experts' intermediate width from a config (None when it has none)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in ("moe_intermediate_size", "intermediate_size"):
            v = getattr(cfg, key, None)
            if _is_int(v) and v > 0:
                return v
        return None

    def check_config(self, config) -> None:
        """The checks that need the model's config but not its weights (run before loading them): N:M blocks
        must divide every prunable input width; expert budgets must leave top_k experts."""
        from .models.base import config_experts

        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

        def get(key):
            return getattr(cfg, key, None)

        E, k = config_experts(config)
        if self.grain in ("expert", "atom") and E is None:
            raise MumoeError(f"{get('model_type')} is a dense model with no routed experts; {self.method} prunes "
                             f"{self.grain}s of routed experts (dense models: wanda or magnitude)")

        if self.grain == "weight":
            nm = parse_structure(self.weight.structure)
            if nm is not None:
                widths = {get(k) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size",
                                            "shared_expert_intermediate_size", "ffn_dim")}
                heads, head_dim = get("num_attention_heads"), get("head_dim")
                if heads and head_dim:
                    widths.add(heads * head_dim)
                bad = sorted(w for w in widths if _is_int(w) and w % nm[1])
                if bad:
                    raise MumoeError(f"N:M structure {self.weight.structure} needs M={nm[1]} to divide every input "
                                     f"width; this model has width(s) {', '.join(map(str, bad))}")
        if self.grain == "atom" and self.atom.form == "uniform":
            width = self.expert_width(config)
            if width:
                from .select.atoms import uniform_width

                multiple = self.atom.width_multiple
                step = multiple if width >= multiple else 1
                if round((1 - self.ratio) * width / step) == 0:
                    kept = uniform_width(width, self.ratio, multiple)
                    raise MumoeError(f"--ratio {self.ratio:g} would keep {(1 - self.ratio) * width:.1f} of {width} atoms "
                                     f"per expert; the uniform form keeps a multiple of {step} (at most "
                                     f"{1 - kept / width:.1%} removed): lower --ratio, a smaller --width-multiple, "
                                     "or --form global")
                if self.ratio > 0 and uniform_width(width, self.ratio, multiple) == width:
                    raise MumoeError(f"--ratio {self.ratio:g} removes nothing from experts {width} wide when widths "
                                     f"are multiples of {step}: raise --ratio or lower --width-multiple")
        if self.grain == "expert" and E is not None and self.ratio > 0:
            layers = get("num_hidden_layers") if self.expert.budget == "global" else 1
            pool = E * (layers if _is_int(layers) else 1)  # the global budget ranks every layer's experts at once
            if round(self.ratio * pool) == 0:
                raise MumoeError(f"--ratio {self.ratio:g} removes nothing: round({self.ratio:g} x {pool} experts) = 0"
                                 f"{'' if pool == E else ' over all layers'}; the smallest ratio that removes one "
                                 f"is {1 / pool:.3g}")
        if self.grain == "expert" and self.expert.budget == "uniform":
            if E is not None and k is not None and E - round(self.ratio * E) < k:
                raise MumoeError(f"ratio {self.ratio} keeps {E - round(self.ratio * E)} of {E} experts, fewer than "
                                 f"top_k={k}")
        ctx = get("max_position_embeddings")
        texts = [s for s in self.calib.sources if s not in ("tensor", "text")]
        if texts and _is_int(ctx) and self.calib.seqlen > ctx:
            raise MumoeError(f"calibration seqlen {self.calib.seqlen} exceeds the model's context ({ctx} tokens); "
                             "pass --seqlen")
