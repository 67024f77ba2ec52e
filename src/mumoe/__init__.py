"""mumoe: prune Mixture-of-Experts (and dense) language models without retraining.

    import mumoe
    model, tok = mumoe.load_default()
    report = mumoe.prune(model, "random", ratio=0.25)          # or mumoe.prune(model, mumoe.Recipe.build(...))
    mumoe.save_pruned(model, "out/", report, tok)
"""

from .files import tidy_torch_cache_dir

tidy_torch_cache_dir()  # before torch is imported: the empty cache folder it makes is removed at exit

from .api import prune, quantize, score  # noqa: E402
from .apply.export import PruneReport, save_pruned
from .errors import MumoeError
from .loading import load, load_default, load_tokenizer
from .recipe import Recipe
from .version import __version__

__all__ = ["prune", "quantize", "score", "Recipe", "PruneReport", "save_pruned", "MumoeError", "load", "load_default",
           "load_tokenizer", "__version__"]
