"""PreMoe TAER: task library, matching on router logits, partial expert loading, serving."""

from .library import Match, TaskLibrary, build_library, match, model_fingerprint, prompt_key
from .partial import TaskServer, check_library, checkpoint_fingerprint, load_matcher, load_task_model

__all__ = ["Match", "TaskLibrary", "build_library", "match", "model_fingerprint", "prompt_key", "TaskServer",
           "check_library", "checkpoint_fingerprint", "load_matcher", "load_task_model"]
