"""One file per architecture, and the registry that says which checkpoint each one serves.

A checkpoint's config.json names its `model_type`; `model_family(model_type)` gives that family's record, which the
engine (config loading, the model's construction), the checkpoint loader, the preprocessor, the modeltest harness
and the benchmark read instead of naming a family's classes themselves. A new family is one model file in this
folder plus one `register(ModelFamily(...))` at the end of this file.

Classes are named by import path ("module:attribute") and imported on first use, so `import atb_models.models`
imports neither the model files nor transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from atb_models.errors import UserError


def _import(path: str):
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelFamily:
    """Everything the kit needs to know about one model_type, besides the model file itself."""

    model_type: str             # config.json's model_type
    display_name: str           # the family as messages name it
    model: str                  # the kit's model class
    config: str                 # transformers' config class reading config.json (a data holder: no compute)
    reference: str              # transformers' implementation: the parity reference, modeltest's hf backend and
    #                             the benchmark's other side
    image_processor: str        # transformers' image processor reading preprocessor_config.json
    special_token_keys: tuple   # config keys of the token ids the prompt builder and the model use (placeholders)
    # (checkpoint prefix, parameter prefix): newer checkpoints of the family nest tensors under other names than
    # the model's parameters; each checkpoint name starting with the first is read as starting with the second.
    checkpoint_prefixes: tuple = ()
    # builder of tiny random checkpoints of the family (tests, the benchmark's presets): off the runtime path
    demo_checkpoint: str | None = None
    # its videos' temporal positions count seconds (Qwen2.5-VL): transformers' model takes each video's seconds per
    # temporal grid step (second_per_grid_ts) beside the grids
    video_seconds: bool = False

    def model_class(self) -> type:
        return _import(self.model)

    def config_class(self) -> type:
        return _import(self.config)

    def reference_class(self) -> type:
        """transformers' implementation of the family; a transformers release without it is one UserError (the
        kit's pin, 4.46, has no Qwen2.5-VL)."""
        try:
            return _import(self.reference)
        except (AttributeError, ImportError):
            import transformers

            raise UserError(f"transformers {transformers.__version__} has no {self.reference.partition(':')[2]}: "
                            f"comparing {self.display_name} with transformers needs a release that has it "
                            "(atb_models.oracle runs one in a venv of its own)") from None

    def image_processor_class(self) -> type:
        return _import(self.image_processor)

    def build_demo_checkpoint(self, out_dir, **settings):
        """A tiny random checkpoint of the family in `out_dir`; `settings` are the family's builder's (its shape,
        pixel bounds, ...)."""
        if self.demo_checkpoint is None:
            raise UserError(f"the kit has no demo checkpoint builder for {self.display_name}: pass --model_path")
        return _import(self.demo_checkpoint)(out_dir, **settings)

    def parameter_name(self, checkpoint_name: str) -> str:
        """The model's parameter name for a checkpoint tensor name (before q/k/v and gate/up packing)."""
        for checkpoint_prefix, parameter_prefix in self.checkpoint_prefixes:
            if checkpoint_name.startswith(checkpoint_prefix):
                return parameter_prefix + checkpoint_name[len(checkpoint_prefix):]
        return checkpoint_name


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` servable: every consumer finds it by its model_type from then on."""
    FAMILIES[family.model_type] = family
    return family


def supported_model_types() -> tuple:
    return tuple(sorted(FAMILIES))


def model_family(model_type, source: str | None = None) -> ModelFamily:
    """The record of `model_type`; an unknown one is a UserError naming `source` (the config file it came from)
    and the types this kit serves."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        where = f" in {source}" if source else ""
        raise UserError(f"unsupported model_type {model_type!r}{where}: this kit serves "
                        f"{', '.join(supported_model_types())}")
    return family


# Both Qwen VL families name their placeholder tokens alike and are saved in the same two layouts: newer
# transformers releases put the language model under model.language_model and the tower under model.visual, where
# the kit's parameters keep the classic layout (model.*, visual.*).
QWEN_VL_SPECIAL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
QWEN_VL_CHECKPOINT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

register(ModelFamily(
    model_type="qwen2_vl",
    display_name="Qwen2-VL",
    model="atb_models.models.qwen2_vl:Qwen2VLForCausalLM",
    config="transformers:Qwen2VLConfig",
    reference="transformers:Qwen2VLForConditionalGeneration",
    image_processor="transformers:Qwen2VLImageProcessor",
    special_token_keys=QWEN_VL_SPECIAL_TOKEN_KEYS,
    checkpoint_prefixes=QWEN_VL_CHECKPOINT_PREFIXES,
    demo_checkpoint="atb_models.demo.checkpoint:build_checkpoint",
))

register(ModelFamily(
    model_type="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model="atb_models.models.qwen2_5_vl:Qwen2_5_VLForCausalLM",
    # transformers 4.46 (the kit's pin) has no Qwen2.5-VL classes: the kit reads the config itself, and
    # transformers' model (4.49 or later) is the reference, run in a venv of its own (atb_models.oracle), which also
    # builds the demo checkpoints of the benchmark's presets.
    config="atb_models.models.qwen2_5_vl:Qwen2_5_VLConfig",
    reference="transformers:Qwen2_5_VLForConditionalGeneration",
    image_processor="transformers:Qwen2VLImageProcessor",  # Qwen2.5-VL's processor is Qwen2-VL's image processor
    special_token_keys=QWEN_VL_SPECIAL_TOKEN_KEYS,
    checkpoint_prefixes=QWEN_VL_CHECKPOINT_PREFIXES,
    demo_checkpoint="atb_models.oracle:build_demo_checkpoint",
    video_seconds=True,
))
