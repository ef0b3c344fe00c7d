"""Methods on top of the models and the engine: stage-1 loss wiring (CE, LDAM-DRW, Balanced Softmax, RIDE, ResLT,
BalPoE, SADE), stage 2 (Decoupling's cRT, LWS, tau-norm, NCM; RIDE's expert router; post-hoc logit adjustment;
SADE's test-time aggregation), the recipe configs and the pipeline behind `fastlt train`.

Each method is one file that declares its options and registers itself (fastlt/methods/registry.py); the import
below is its one registration line. `fastlt methods [NAME]` lists them and their options.
"""

from fastlt.methods import balpoe, ce, decoupling, ldam_drw, logit_adjust, reslt, ride, router, sade  # noqa: F401
from fastlt.methods.config import load_config
from fastlt.methods.pipeline import load_stage1, train
from fastlt.methods.registry import method_names, register_method
from fastlt.methods.stage1 import Method, build_method
from fastlt.methods.stage2 import run_stage2

__all__ = ["Method", "build_method", "load_config", "load_stage1", "method_names", "register_method", "run_stage2",
           "train"]
