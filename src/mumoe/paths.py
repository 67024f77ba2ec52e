"""Where the bundled assets live (the model, its tokenizer, the per-domain calib/eval splits)."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "model"
DATA = ASSETS / "data"  # per-domain calib.txt / eval.txt splits of the bundled corpus


def bundled_domains() -> list[str]:
    """Names of the bundled domains with a calibration split, sorted."""
    return sorted(p.parent.name for p in DATA.glob("*/calib.txt"))
