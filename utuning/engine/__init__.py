"""The training engine (🤗 accelerate): ``train(recipe)``, ``evaluate(recipe, checkpoint)``.

``loop.py`` trains, ``evaluate.py`` evaluates (and holds what both share), ``run.py`` owns the run
folder, ``optim.py``/``ema.py`` optimise tuner parameters, ``cached.py`` trains on cached frozen
features, ``log.py`` logs, ``state.py`` keeps RNG state. Models and data come from ``utuning.build``.
"""

from utuning.build import build_model, model_and_data
from utuning.engine.evaluate import evaluate, run_eval
from utuning.engine.loop import train

__all__ = ["build_model", "evaluate", "model_and_data", "run_eval", "train"]
