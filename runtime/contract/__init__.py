"""The bundle contract in one place: LMI parameters and op identity, graph I/O names, sampler
defaults and the typed manifest entries. Export writes through it, the runtime reads through
it; docs/contracts.md is checked against it by the tests."""
from .entries import (DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, DiffusionEntry, EngineEntry,
                      GeneratorEntry, GraphFile, ModelEntry, SamplerDefaults)
from .graphs import (GEN_DOMAIN, GEN_IMAGE, GEN_OUTPUT, GENERATOR_INPUTS, GENERATOR_OUTPUTS, IMAGE,
                     LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS, LMI_OUT, LMI_X, LMI_Y, LMI_Y_AT, SCALAR, STEP_CARRY,
                     STEP_IMAGE_INPUTS, STEP_INPUTS, STEP_LMI_SOURCE, STEP_NOISE, STEP_OUTPUTS, STEP_SCALAR_INPUTS,
                     STEP_SOURCE, STEP_STATE_INPUTS, STEP_X0, STEP_X0_LAST, STEP_X_PREV, STEP_X_T, io_entry)
from .lmi import (DEFAULT_LMI, LMI_DOMAIN, LMI_NODE_OUTPUT_TYPES, LMI_NODE_OUTPUTS, LMI_OP_TYPE, LMI_PARAM_NAMES,
                  LMI_PLUGIN_ID, LMI_PLUGIN_NAMESPACE, LmiParams)

__all__ = [name for name in dir() if not name.startswith("_") and name not in ("entries", "graphs", "lmi")]
