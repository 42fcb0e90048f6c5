"""The stage registry: YAML stage name -> module with NAME, Config and run(). A literal dict, on purpose."""

from compress.stages import cast

STAGES = {
    "cast": cast,
}
