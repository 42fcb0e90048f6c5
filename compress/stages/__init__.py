"""The stage registry: YAML stage name -> module with NAME, Config and run(). A literal dict, on purpose."""

from compress.stages import cast, train
from compress.stages import eval as eval_stage

STAGES = {
    "cast": cast,
    "train": train,
    "eval": eval_stage,
}
