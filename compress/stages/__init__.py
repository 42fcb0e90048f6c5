"""The stage registry: YAML stage name -> module with NAME, Config and run(). A literal dict, on purpose."""

from compress.stages import cast
from compress.stages import eval as eval_stage

STAGES = {
    "cast": cast,
    "eval": eval_stage,
}
