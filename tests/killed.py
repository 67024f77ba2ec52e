"""`python tests/killed.py STAGE:LAYER ARGS...`: `mumoe ARGS...` SIGKILLed right after the layer-sequential sweep
has saved the state STAGE:LAYER in its --work-dir (the hook is injected here; production code reads no
environment variable for it)."""

import os
import signal
import sys

from mumoe.cli import main
from mumoe.observe import sequential


def kill_at(at: str):
    def hook(state: dict) -> None:
        if at == f"{state.get('stage')}:{state.get('done')}":
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    sequential.SAVE_HOOKS.append(kill_at(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
