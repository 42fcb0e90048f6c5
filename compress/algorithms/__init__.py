"""Algorithm cores in plain torch: no files, no YAML, no pipeline. Stages in compress/stages/ are the glue.

gptq.py  GPTQ (Frantar et al. 2022) and RTN weight quantization, GPTQ v1 packing, QuantLinear, prepare_for_load.
"""
