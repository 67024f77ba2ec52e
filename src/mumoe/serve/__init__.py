"""`mumoe serve`: an OpenAI-compatible HTTP server where every request is pruned for itself (optional extra
`mumoe[serve]`: FastAPI, uvicorn, prometheus-client).

    engine     one model + tokenizer; per-request pruning (dense, μ-MoE, per-prompt experts, TAER task) and
               decoding, as `mumoe generate` does it
    protocol   the OpenAI request bodies (validated) and error object
    app        the FastAPI app: endpoints, the bounded queue and its worker, metrics
"""

from .engine import Engine, Finished, Pruning, Sampling

__all__ = ["Engine", "Finished", "Pruning", "Sampling", "create_app", "ServerConfig", "require_extra"]


def require_extra() -> None:
    """A one-line error when the serve extra is not installed."""
    from ..errors import MumoeError

    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise MumoeError(f"mumoe serve needs {', '.join(missing)}: pip install 'mumoe[serve]'")


def create_app(*args, **kwargs):
    from .app import create_app as make

    return make(*args, **kwargs)


def __getattr__(name):
    if name == "ServerConfig":
        from .app import ServerConfig

        return ServerConfig
    raise AttributeError(name)
