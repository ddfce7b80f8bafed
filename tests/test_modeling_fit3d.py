"""transformers' own common model tests (ModelTesterMixin, ConfigTester, BackboneTesterMixin) on FiT3D.

The same pattern as transformers' tests/models/dinov2/test_modeling_dinov2.py, with the common test files
vendored from the pinned transformers version (tests/transformers_common/README.md). Every test transformers
runs on its own models runs here; the few that do not apply are skipped with the reason, as transformers'
model tests skip theirs.
"""

import unittest
from unittest import mock

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_common.test_backbone_common import BackboneTesterMixin
from transformers_common.test_configuration_common import ConfigTester
from transformers_common.test_modeling_common import ModelTesterMixin, floats_tensor

from fit3d_hf import FiT3DBackbone, FiT3DConfig, FiT3DModel, backbones

torch.set_num_threads(1)

# transformers lists its own base models and backbones in these mappings, and the common tests read them to
# leave out the loss-based tests (a base model or backbone has no loss). `AutoModel.register` and
# `AutoBackbone.register` do not reach them, so the tests list FiT3D there as transformers lists its own models.
listed_as_base_model = mock.patch.dict(MODEL_MAPPING_NAMES, {"fit3d": "FiT3DModel"})
listed_as_backbone = mock.patch.dict(MODEL_FOR_BACKBONE_MAPPING_NAMES, {"fit3d": "FiT3DBackbone"})


class FiT3DModelTester:
    """A tiny concat FiT3D model over DINOv2: width 32 per copy, 2 blocks, 2 heads, patch 4, a 4x4 patch grid."""

    def __init__(self, parent, batch_size=3, image_size=16, patch_size=4):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = 3
        self.is_training = True
        # `hidden_states` and `attentions` are the fine-tuned copy's, so the common tests check them against
        # one copy's sizes; CLS + patches tokens.
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.seq_length = 1 + (image_size // patch_size) ** 2
        self.num_hidden_states_types = 2  # hidden_states and original_hidden_states

    def get_config(self) -> FiT3DConfig:
        backbone_config = backbones.tiny_config(
            "dinov2",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
        )
        return FiT3DConfig(backbone_config=backbone_config, assembly="concat", out_indices=[1, 2])

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


@listed_as_base_model
@listed_as_backbone
class FiT3DModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (FiT3DModel, FiT3DBackbone)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = FiT3DModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=FiT3DConfig, has_text_modality=False, assembly="add", out_indices=[6, 12]
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # As transformers' vision model tests: the input embedding is a patch embedding, not an nn.Embedding.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIs(model.get_input_embeddings(), model.finetuned.embeddings.patch_embeddings)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    def _prepare_config_and_inputs_for_retain_grad_hidden_states_attentions(self):
        # The test backpropagates from the output's first element. With concat that is a channel of the frozen
        # original copy, which gets no gradient by design; with "finetuned" it is the fine-tuned copy's, whose
        # hidden states and attentions the output returns.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.assembly = "finetuned"
        return config, inputs

    @unittest.skip(reason="FiT3D does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="FiT3D does not use inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass


@listed_as_base_model
@listed_as_backbone
class FiT3DBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (FiT3DBackbone,)
    config_class = FiT3DConfig

    def setUp(self):
        self.model_tester = FiT3DModelTester(self)

    @unittest.skip(
        reason="It reads the depth as `config.num_hidden_layers`; FiT3DConfig keeps it in `backbone_config`. "
        "Stage names and out_features/out_indices are tested in test_modeling.py::test_backbone_stages_in_the_config"
    )
    def test_config(self):
        pass
