"""iterative-llm: train your own small modern GPT as a Hugging Face transformers model.

Importing the package registers the model with transformers' Auto classes, so
`AutoConfig`, `AutoModel` and `AutoModelForCausalLM` build and load it by its model type
("iterative_llm"). Saved folders also carry `auto_map` and the model's source files, so a process
that never imports this package loads them with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_iterative_llm import PRESETS, IterativeLLMConfig
from .modeling_iterative_llm import IterativeLLMForCausalLM, IterativeLLMModel, IterativeLLMPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(IterativeLLMConfig.model_type, IterativeLLMConfig, exist_ok=True)
AutoModel.register(IterativeLLMConfig, IterativeLLMModel, exist_ok=True)
AutoModelForCausalLM.register(IterativeLLMConfig, IterativeLLMForCausalLM, exist_ok=True)
# Makes save_pretrained copy the configuration and modeling files into the folder.
IterativeLLMConfig.register_for_auto_class()
IterativeLLMModel.register_for_auto_class("AutoModel")
IterativeLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def build_model(preset: str = "tiny", **overrides) -> IterativeLLMForCausalLM:
    """A freshly initialised causal LM of a named size, with any config field overridden."""
    return IterativeLLMForCausalLM(IterativeLLMConfig.from_preset(preset, **overrides))


__all__ = [
    "PRESETS",
    "IterativeLLMConfig",
    "IterativeLLMModel",
    "IterativeLLMForCausalLM",
    "IterativeLLMPreTrainedModel",
    "build_model",
]
