"""The stage registry: YAML stage name -> module with NAME, Config and run(). A literal dict, on purpose."""

from compress.stages import cast, distill, export, gptq, int8, lora, prune, train
from compress.stages import eval as eval_stage

STAGES = {
    "cast": cast,
    "prune": prune,
    "train": train,
    "distill": distill,
    "gptq": gptq,
    "int8": int8,
    "lora": lora,
    "eval": eval_stage,
    "export": export,
}
