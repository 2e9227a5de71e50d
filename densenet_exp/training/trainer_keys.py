"""The keys a `+trainer.<key>=...` override may add: lightning.Trainer's arguments. The config
checks (validate.check_added_keys) take them from here, so validate.py imports no Lightning; this
module imports it only when asked (seconds of import), so `--help` and bad input stay fast."""

from __future__ import annotations

import inspect


def trainer_arguments() -> set[str]:
    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
