"""`Recipe`: one frozen, validated, versioned description of a pruning run.

It names the calibration (sources, windows, seed, batch size), the run settings (dtype, device) and one or more
stages, run in order on that one calibration, each calibrated on the model the stages before it left (STUN's
order). A stage is a method, a ratio and the options of the method's grain (`grains`: expert — budget and
scoring order; atom — form and scope; weight — structure). The first stage's fields are the recipe's own
(`method`, `ratio`, the grain part), later ones are in `then`. A recipe validates itself completely when built —
before any model is loaded or any pass is run — and serialises into `pruning.json`, so that
`mumoe prune --recipe run/pruning.json --out DIR` replays a run exactly.

    recipe = Recipe.build("reap", 0.2, calib="domain", nsamples=64).then("wanda", 0.5)
    mumoe.prune(model, recipe, tokenizer=tok)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from .errors import MumoeError
from .grains import GRAINS, get_grain
from .select.experts import check_ratio  # noqa: F401  (re-exported: the one definition lives in select)
from .select.weights import parse_structure  # noqa: F401  (re-exported: the CLI and serve import it from here)

RECIPE_VERSION = 1
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


def _method(name):
    """The registered Method called `name`; a one-line error for anything else."""
    from .criteria import get_method

    if not isinstance(name, str):
        raise MumoeError(f"method must be a name, got {name!r}")
    return get_method(name)


def _check_stage(stage) -> object:
    """Validate one stage (a Recipe or a Stage: method, ratio, part); -> its grain part, normalised."""
    m = _method(stage.method)
    object.__setattr__(stage, "ratio", check_ratio(stage.ratio))
    grain = get_grain(m.grain)
    if stage.part is None:  # the grain's defaults
        object.__setattr__(stage, "part", grain.part())
    elif not isinstance(stage.part, grain.part):
        raise MumoeError(f"method {stage.method!r} is {m.grain}-grain; the options given are "
                         f"{type(stage.part).__name__}")
    return grain.check(stage)


class _Parts:
    """`recipe.expert` / `.atom` / `.weight` (any registered grain's name): the stage's part when the method is of
    that grain, else None."""

    def __getattr__(self, name: str):
        if name in GRAINS:
            return self.part if self.grain == name else None
        raise AttributeError(name)

    @property
    def grain(self) -> str:
        from .criteria import get_method

        return get_method(self.method).grain

    def _part_dict(self) -> dict:
        return {self.grain: asdict(self.part)}


@dataclass(frozen=True)
class Stage(_Parts):
    """A later stage of a recipe: a method, a ratio and its grain's options (`part`; None: the defaults). It runs
    with the recipe's calibration, dtype and device."""

    method: str
    ratio: float
    part: object | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "part", _check_stage(self))

    def to_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, **self._part_dict()}


@dataclass(frozen=True)
class Recipe(_Parts):
    """A whole pruning run. Build with `Recipe.build(...)` (flat options) or `Recipe.from_dict` (pruning.json);
    `.then(method, ratio, **options)` adds a stage."""

    method: str
    ratio: float
    calib: CalibSpec = field(default_factory=CalibSpec)
    part: object | None = None  # the first stage's grain options (ExpertPart, AtomPart, ...); None: defaults
    dtype: str = "auto"  # auto = the checkpoint's own (fp32 on the CPU for bf16/fp16); exports keep the source's
    device: str | None = None  # cpu | cuda | cuda:N | auto; None = where the model already is (CLI: cpu)
    version: int = RECIPE_VERSION
    later: tuple[Stage, ...] = ()  # the stages after the first, in order
    # one budget over an expert stage and a weight stage: the share of routed-expert weights removed in all, the
    # expert stage's part of it (`select.split`); the stage ratios follow from them
    expert_params: float | None = None
    expert_share: float | None = None

    def __post_init__(self) -> None:
        from .criteria import get_method

        if self.expert_params is not None or self.expert_share is not None:
            self._split_budget()
        object.__setattr__(self, "part", _check_stage(self))
        if self.version != RECIPE_VERSION:
            raise MumoeError(f"recipe version {self.version} is not readable by this mumoe (reads {RECIPE_VERSION})")
        if self.dtype not in DTYPES:
            raise MumoeError(f"unknown dtype {self.dtype!r}; use {', '.join(DTYPES)}")
        if not (self.device is None or self.device in DEVICES or str(self.device).startswith("cuda:")):
            raise MumoeError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N or auto")
        object.__setattr__(self, "later", tuple(self.later))
        for st in self.later:
            if not isinstance(st, Stage):
                raise MumoeError(f"a later stage must be a Stage, got {type(st).__name__}")
        for st in (self, *self.later):
            if get_method(st.method).needs_calib and not self.calib.sources:
                raise MumoeError(f"method {st.method!r} needs calibration data: pass --calib PATH (a .txt file or "
                                 "folder, 'domain' for the bundled splits)")
        stages = (self, *self.later)
        for i, st in enumerate(stages[:-1]):
            after = [s for s in stages[i + 1:] if not get_grain(s.grain).keeps_shapes]
            if after and not get_grain(st.grain).leaves_hf(st):
                raise MumoeError(f"stage {i + 1} ({get_grain(st.grain).describe(st)}) leaves per-layer shapes that "
                                 f"only mumoe.load reads; a later {after[0].grain} stage needs a standard model: use "
                                 "the uniform budget / form there, make it the last stage, or follow it with weight "
                                 "stages only (they keep the shapes)")
        self.calib.per_source()

    def _split_budget(self) -> None:
        """`expert_params`: exactly an expert stage then a weight stage; their ratios set from the target (the
        weight stage's planned ratio assumes the expert stage removes exactly its part; the run corrects it)."""
        from .select.split import SHARE, check_target, expert_ratio, weight_ratio

        if self.expert_params is None:
            raise MumoeError("--expert-share splits a combined budget: give --expert-params too")
        x, share = check_target(self.expert_params, SHARE if self.expert_share is None else self.expert_share)
        grains = [_method(self.method).grain] + [_method(st.method).grain for st in self.later]
        if len(grains) != 2 or not (get_grain(grains[0]).whole_experts and get_grain(grains[1]).keeps_shapes):
            raise MumoeError("--expert-params splits one budget between an expert stage and a weight stage (e.g. "
                             "--method stun --then wanda --expert-params 0.4); this recipe's stages are "
                             + (" then ".join(grains) or "none"))
        first = expert_ratio(x, share)
        object.__setattr__(self, "expert_params", x)
        object.__setattr__(self, "expert_share", share)
        object.__setattr__(self, "ratio", first)
        object.__setattr__(self, "later", (replace(self.later[0], ratio=round(weight_ratio(x, first), 6)),))

    # -- views -------------------------------------------------------------------------------------------
    @cached_property
    def stages(self) -> tuple["Recipe", ...]:
        """Every stage as a one-stage Recipe (with this recipe's calibration, dtype and device), in order; built
        (and validated) once per recipe."""
        first = replace(self, later=(), expert_params=None, expert_share=None) if self.later else self
        return (first, *(Recipe(st.method, st.ratio, self.calib, st.part, self.dtype, self.device)
                         for st in self.later))

    def describe(self) -> str:
        """What is pruned, in words (for the CLI's first line)."""
        return ", then ".join(get_grain(st.grain).describe(st) for st in self.stages)

    def then(self, method: str, ratio: float, **options) -> "Recipe":
        """This recipe with one more stage: `method` at `ratio`, with its grain's options (budget, order, form,
        scope, structure, width_multiple)."""
        return replace(self, later=self.later + (make_stage(method, ratio, options),))

    def split(self, expert_params: float, expert_share: float | None = None) -> "Recipe":
        """This expert-then-weight recipe under one combined budget: `expert_params` of the routed-expert weights
        removed in all, the expert stage taking `expert_share` of it (default 0.5, STUN's split); the stage
        ratios are set from them (`select.split`)."""
        return replace(self, expert_params=expert_params, expert_share=expert_share)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def build(cls, method: str, ratio: float, calib=None, nsamples: int = 128, seqlen: int = 512,
              seed: int | None = None, batch_size: int | None = None, dtype: str = "auto",
              device: str | None = None, **options) -> "Recipe":
        """From flat options (the CLI's flags); the grain part is chosen by the method from `options` (budget,
        order: expert; form, scope, width_multiple: atom; structure, order: weight). calib: a source, a list of
        sources, or None."""
        m = _method(method)
        grain = get_grain(m.grain)
        unknown = set(options) - {f for g in GRAINS.values() for f in g.flags}
        if unknown:
            raise MumoeError(f"unknown option(s) {', '.join(sorted(unknown))}")
        sources = () if calib is None else (calib,) if isinstance(calib, (str, Path)) else tuple(calib)
        bs = batch_size if batch_size is not None else grain.batch_size
        return cls(method, ratio, CalibSpec(sources, nsamples, seqlen, seed, bs), grain.build_part(options),
                   dtype=dtype, device=device)

    def to_dict(self) -> dict:
        """The recipe as pruning.json holds it: method, ratio, calib, the grain's options under the grain's name,
        dtype, device, version, and the later stages (`then`) when there are any."""
        d = {"method": self.method, "ratio": self.ratio, "calib": {**asdict(self.calib),
                                                                    "sources": list(self.calib.sources)},
             **self._part_dict(), "dtype": self.dtype, "device": self.device, "version": self.version}
        if self.later:
            d["then"] = [st.to_dict() for st in self.later]
        if self.expert_params is not None:
            d["expert_params"], d["expert_share"] = self.expert_params, self.expert_share
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "method" not in d or "ratio" not in d:
            raise MumoeError("not a mumoe recipe (needs at least 'method' and 'ratio')")
        known = {f.name for f in fields(cls)} - {"part", "later"} | set(GRAINS) | {"then"}
        unknown = set(d) - known
        if unknown:
            raise MumoeError(f"recipe has unknown fields: {', '.join(sorted(unknown))}")
        try:
            kw = {k: v for k, v in d.items() if k not in GRAINS and k != "then"}
            calib = kw.get("calib") or {}
            if not isinstance(calib, dict):
                raise MumoeError(f"malformed recipe: calib must be an object, got {type(calib).__name__}")
            sources = calib.get("sources", ())
            if isinstance(sources, str):
                sources = [sources]  # one source written as a string (not split into characters)
            if not isinstance(sources, (list, tuple)) or not all(isinstance(x, str) for x in sources):
                raise MumoeError("malformed recipe: calib.sources must be a list of paths (or 'domain')")
            kw["calib"] = CalibSpec(**{**calib, "sources": tuple(sources)})
            kw["part"] = _part_from_dict(d)
            then = d.get("then") or []
            if not isinstance(then, list) or not all(isinstance(x, dict) for x in then):
                raise MumoeError("malformed recipe: then must be a list of stages")
            stages = []
            for x in then:
                bad = set(x) - {"method", "ratio"} - set(GRAINS)
                if bad or "method" not in x or "ratio" not in x:
                    raise MumoeError(f"malformed recipe stage {x}: needs method and ratio"
                                     + (f", has unknown fields {', '.join(sorted(bad))}" if bad else ""))
                stages.append(Stage(x["method"], x["ratio"], _part_from_dict(x)))
            kw["later"] = tuple(stages)
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

    def check_config(self, config) -> None:
        """The checks that need the model's config but not its weights (run before loading them), for every
        stage: what its grain needs of the model (routed experts, widths an N:M block divides, expert budgets
        that leave top_k experts, ...) and a calibration that fits the model's context. A later stage's checks
        run on the original config (its own shapes are checked again when it runs)."""
        from .models.base import config_experts

        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

        def get(key):
            return getattr(cfg, key, None)

        E, _ = config_experts(config)
        for i, st in enumerate(self.stages):
            grain = get_grain(st.grain)
            if grain.needs_experts and E is None:
                raise MumoeError(f"{get('model_type')} is a dense model with no routed experts; {st.method} prunes "
                                 f"{st.grain}s of routed experts (dense models: "
                                 f"{' or '.join(n for n, _ in _dense_methods())})")
            if i == 0:
                grain.check_config(st, config)
        ctx = get("max_position_embeddings")
        texts = [s for s in self.calib.sources if s not in ("tensor", "text")]
        if texts and _is_int(ctx) and self.calib.seqlen > ctx:
            raise MumoeError(f"calibration seqlen {self.calib.seqlen} exceeds the model's context ({ctx} tokens); "
                             "pass --seqlen")


def _part_from_dict(d: dict):
    """The grain part a recipe (or stage) dict gives, None when it gives none; refused when it gives options of
    another grain than its method's."""
    from .criteria import get_method

    given = [g for g in GRAINS if d.get(g) is not None]
    if not given:
        return None
    grain = get_method(d["method"]).grain if isinstance(d["method"], str) else None
    if given != [grain]:
        raise MumoeError(f"method {d['method']!r} is {grain}-grain; the recipe gives options for {', '.join(given)}")
    if not isinstance(d[grain], dict):
        raise MumoeError(f"malformed recipe: {grain} must be an object")
    return get_grain(grain).part_from_dict(d[grain])


def make_stage(method: str, ratio: float, options: dict | None = None) -> Stage:
    """A later stage from flat options (its grain's flags only)."""
    options = options or {}
    m = _method(method)
    grain = get_grain(m.grain)
    wrong = set(options) - set(grain.flags)
    if wrong:
        raise MumoeError(f"{', '.join(sorted(wrong))} {'does' if len(wrong) == 1 else 'do'} not apply to {method} "
                         f"({m.grain} grain; its options: {', '.join(grain.flags)})")
    return Stage(method, ratio, grain.build_part(options))


def _dense_methods():
    from .criteria import METHODS

    return [(n, m) for n, m in METHODS.items() if not get_grain(m.grain).needs_experts]


def parse_stage(text: str, split: bool = False) -> Stage:
    """A stage from the CLI's `METHOD:RATIO[:OPTION=VALUE...]` (`--then`): wanda:0.5, wanda:0.5:structure=2:4
    (a part without '=' continues the value before it), heapr:0.25:form=global:scope=layer. split: the ratio
    comes from a combined budget (--expert-params): `METHOD[:OPTION=VALUE...]`, no ratio."""
    parts = text.split(":")
    if split:
        if len(parts) > 1 and "=" not in parts[1]:
            raise MumoeError(f"--then {text}: --expert-params sets the stage's ratio; give METHOD[:OPTION=VALUE]")
        return make_stage(parts[0], 0.0, parse_options(parts[1:], f"--then {text}"))
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise MumoeError(f"--then {text}: give METHOD:RATIO (e.g. wanda:0.5), options as :OPTION=VALUE")
    try:
        ratio = float(parts[1])
    except ValueError:
        raise MumoeError(f"--then {text}: ratio {parts[1]!r} is not a number") from None
    options = parse_options(parts[2:], f"--then {text}")
    return make_stage(parts[0], ratio, options)


def parse_method(text: str) -> tuple[str, dict]:
    """`METHOD[:OPTION=VALUE...]` (`mumoe compare --methods`): hc-smoe:router=bound -> ("hc-smoe", {...})."""
    parts = text.split(":")
    return parts[0], parse_options(parts[1:], f"--methods {text}")


def parse_options(parts: list[str], where: str) -> dict:
    """OPTION=VALUE parts (a part without '=' continues the value before it: structure=2:4); the options a
    grain's CLI flag types as int or float (width_multiple, rank, owl_m, alpha) converted."""
    options: dict = {}
    last = None
    for part in parts:
        if "=" in part:
            last, value = part.split("=", 1)
            last = last.replace("-", "_")
            options[last] = value
        elif last is not None:
            options[last] += ":" + part
        else:
            raise MumoeError(f"{where}: {part!r} is not OPTION=VALUE")
    for k, v in options.items():
        kind = next((g.cli[k]["type"] for g in GRAINS.values() if g.cli.get(k, {}).get("type") in (int, float)), None)
        if kind is not None:
            try:
                options[k] = kind(v)
            except ValueError:
                raise MumoeError(f"{where}: {k} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {v!r}") from None
    return options
