"""Methods on top of the models and the engine: stage-1 loss wiring (CE, LDAM-DRW, Balanced Softmax, RIDE, ResLT),
Decoupling stage 2 (cRT, LWS, tau-norm, NCM), RIDE's expert router, and the recipe pipeline behind `fastlt train`."""

from fastlt.methods.config import load_config
from fastlt.methods.pipeline import load_stage1, train
from fastlt.methods.stage1 import METHODS, Method, build_method
from fastlt.methods.stage2 import STAGE2_METHODS, run_stage2

__all__ = ["METHODS", "Method", "STAGE2_METHODS", "build_method", "load_config", "load_stage1", "run_stage2", "train"]
