"""compress: a model compression workbench.

Point `compress run` at a Hugging Face model and a YAML pipeline of stages (cast, prune, train, distill,
gptq, int8, eval); every stage writes a deployable safetensors checkpoint and a manifest.json that
records size, memory, accuracy and provenance. See README.md.
"""

__version__ = "0.1.0"
