"""Models: backbones (registry), the DeepLabV3 head, the incremental classifier and the segmenter."""

from .backbones import Backbone, build_backbone, check_state_dict, list_backbones, load_weights
from .classifier import IncrementalClassifier
from .deeplab import ASPPHead
from .parallel import ParallelConvBN, add_parallel_branches, fold_parallel_branches, merge_parallel_branches
from .efficientnet_lite import EfficientNetLite0, EfficientNetLite0Classifier
from .resnet import ResNet
from .fusion import fold_bn, inference_copy
from .segmenter import Segmenter, build_segmenter, freeze_early, set_bn_eval
from .tiny import TinyBackbone

__all__ = [
    "ASPPHead",
    "Backbone",
    "EfficientNetLite0",
    "EfficientNetLite0Classifier",
    "IncrementalClassifier",
    "ParallelConvBN",
    "ResNet",
    "Segmenter",
    "TinyBackbone",
    "add_parallel_branches",
    "build_backbone",
    "build_segmenter",
    "check_state_dict",
    "fold_bn",
    "fold_parallel_branches",
    "freeze_early",
    "inference_copy",
    "list_backbones",
    "load_weights",
    "merge_parallel_branches",
    "set_bn_eval",
]
