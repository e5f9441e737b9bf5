"""Models: backbones (registry), the DeepLabV3 head, the incremental classifier and the segmenter."""

from .backbones import Backbone, build_backbone, check_state_dict, list_backbones, load_weights
from .classifier import IncrementalClassifier
from .deeplab import ASPPHead
from .efficientnet_lite import EfficientNetLite0, EfficientNetLite0Classifier
from .resnet import ResNet
from .segmenter import Segmenter, build_segmenter, set_bn_eval
from .tiny import TinyBackbone

__all__ = [
    "ASPPHead",
    "Backbone",
    "EfficientNetLite0",
    "EfficientNetLite0Classifier",
    "IncrementalClassifier",
    "ResNet",
    "Segmenter",
    "TinyBackbone",
    "build_backbone",
    "build_segmenter",
    "check_state_dict",
    "list_backbones",
    "load_weights",
    "set_bn_eval",
]
