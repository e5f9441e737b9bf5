"""SSUL and SSUL-M (Cha et al., NeurIPS 2021): an 'unknown' class carved out of the background,
pseudo-labels from the old model, sigmoid + BCE, a frozen network after step 0 whose new classifiers
start from the unknown classifier; SSUL-M adds a tiny class-balanced exemplar memory.

The unknown class is the extra output after the real classes (`num_extra_outputs() = 1`). Its
pixels are background pixels that a saliency detector marks salient (objects of no current class:
future or old classes) or, on densely labelled data (ADE20K), every background pixel (unlabelled
or of another step). They are marked in the relabelled mask with UNKNOWN_MARK *before* the
augmentation, so they follow its geometry exactly; `make_targets` turns the mark into the unknown
label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler

from ciss.data.base import SegDataset
from ciss.data.errors import DataError
from ciss.data.memory import SAMPLINGS, ExemplarMemory, with_memory
from ciss.data.transforms import unaugmented
from ciss.losses import binary_cross_entropy_one_hot, cross_entropy
from ciss.methods.base import Method, Phase
from ciss.models.fusion import inference_copy
from ciss.models.segmenter import set_bn_eval
from ciss.saliency import SaliencyMaps, list_detectors, source_key
from ciss.scenario import Scenario, StepDataset
from ciss.types import BACKGROUND, IGNORE, Batch, SegOutput, StepContext, Targets

# A label value no class uses: TrainTransform resizes labels with nearest and pads with IGNORE, so
# the mark lands exactly where the unknown pixels go.
UNKNOWN_MARK = 254

UNKNOWN_SOURCES = ("auto", "saliency", "unlabelled")
LOSS_TYPES = ("bce", "ce")
TRANSFER_SOURCES = ("unknown", "background")
# utils/memory.py: the pseudo-label threshold of memory selection (fixed, not --pseudo_thresh).
MEMORY_PSEUDO_THRESHOLD = 0.7


def mark_unknown(label: np.ndarray, unknown: np.ndarray | bool) -> np.ndarray:
    """(H, W) uint8 model labels -> the same, background pixels where `unknown` set to UNKNOWN_MARK.

    unknown: (H, W) bool (salient pixels) or True (every background pixel is unknown).
    """
    return np.where((label == BACKGROUND) & unknown, np.uint8(UNKNOWN_MARK), label).astype(np.uint8)


class UnknownMarkedDataset(Dataset):
    """Items (image, label, index) as StepDataset's, the unknown pixels marked before augmentation.

    saliency: per-image salient pixels, or None to make every background pixel unknown.
    """

    def __init__(self, data: SegDataset, indices: np.ndarray, lut: np.ndarray, transform: Callable,
                 saliency: Optional[SaliencyMaps]) -> None:
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lut = lut
        self.transform = transform
        self.saliency = saliency

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Any, Any, int]:
        i = int(self.indices[k])
        image, mask = self.data[i]
        label = self.lut[mask]  # (H, W) uint8, model label space
        unknown = True if self.saliency is None else self.saliency(i, image)  # (H, W) bool
        img, lbl = self.transform(image, mark_unknown(label, unknown))
        return img, lbl, i


def pseudo_label(label: torch.Tensor, old_logits: torch.Tensor, num_old: int, threshold: float,
                 unknown_label: Optional[int] = None, softmax: bool = False) -> torch.Tensor:
    """SSUL's pseudo-labels: a background (or unknown) pixel takes the old model's most confident
    sigmoid output (softmax with the CE loss) when that is an old foreground class scoring >=
    threshold.

    label (B, H, W); old_logits (B, C, H, W) with C = num_old (+ the old unknown output after them),
    channel 0 the background. Returns (B, H, W); a pixel of a current class is never changed.
    """
    # main.py: max over every old output (unknown and background included) of the sigmoid ...
    probs = torch.softmax(old_logits.float(), 1) if softmax else torch.sigmoid(old_logits.float())
    score, pred = probs.max(dim=1)  # (B, H, W)
    # ... accepted only when it names an old object class (pred_labels > fg_idx), score >= 0.7.
    old_object = (pred >= 1) & (pred < num_old)
    free = label == BACKGROUND  # main.py: labels <= fg_idx, i.e. background or unknown
    if unknown_label is not None:
        free |= label == unknown_label
    return torch.where(free & old_object & (score >= threshold), pred, label)


@dataclass
class SSUL(Method):
    """BCE over sigmoids with unknown and pseudo-labels; after step 0 only the new classifier and
    the unknown classifier train (network, old classifiers and BatchNorm frozen)."""

    name = "ssul"
    needs_old_model = True

    # main.py --pseudo_thresh 0.7 (run.sh THRESH=0.7); None turns pseudo-labelling off (Table 3 "PL").
    pseudo_threshold: Optional[float] = 0.7
    # run.sh --unknown: from step 0 on (main.py builds [unknown, background, ...] heads at every step).
    unknown: bool = True
    # "auto": saliency, or every background pixel where the dataset's raw 0 means unlabelled
    # (datasets/ade.py: unknown_area = target == background, no saliency map).
    unknown_source: str = "auto"
    # A classical detector instead of DSS (paper Table 4: classical DRFI within 1.6 mIoU of DSS).
    detector: str = "fine_grained"
    # A folder of <id>.png maps (uint8, > 127 salient), e.g. DSS maps; wins over the detector.
    saliency_dir: Optional[str] = None
    # Saliency cache root; None = $CISS_CACHE or ~/.cache/ciss.
    cache_dir: Optional[str] = None
    # run.sh --freeze --bn_freeze --w_transfer.
    freeze: bool = True
    bn_freeze: bool = True
    weight_transfer: bool = True
    # Table 4's ablation: new classifiers start from the background classifier instead.
    transfer_from: str = "unknown"
    # Table 3's ablation: "ce", softmax + cross-entropy (main.py --loss_type ce_loss).
    loss_type: str = "bce"
    # main.py training_params without freeze (step 0): backbone lr 0.001, ASPP + heads 0.01 (= lr).
    backbone_lr_scale: float = 0.1
    # Paper Sec. 4.1 / run.sh: lr 0.01 at every step; the recipe's lr_next is MiB's 0.001, hence x10.
    lr_next_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.unknown_source not in UNKNOWN_SOURCES:
            raise ValueError(f"unknown_source must be one of {', '.join(UNKNOWN_SOURCES)}, "
                             f"got {self.unknown_source!r}")
        if self.detector not in list_detectors():
            raise ValueError(f"unknown saliency detector {self.detector!r}; valid: "
                             f"{', '.join(list_detectors())}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.transfer_from not in TRANSFER_SOURCES:
            raise ValueError(f"transfer_from must be one of {', '.join(TRANSFER_SOURCES)}, "
                             f"got {self.transfer_from!r}")
        if self.pseudo_threshold is not None and not 0.0 <= self.pseudo_threshold <= 1.0:
            raise ValueError(f"pseudo_threshold must be in [0, 1] or None, got {self.pseudo_threshold}")

    # ---- identity -------------------------------------------------------------------------
    def base_step_key(self) -> str:
        # Step 0 differs from CE fine-tuning: BCE, the unknown output and its source, lr split.
        if not self.unknown:
            return f"ssul-{self.loss_type}-nounknown-bb{self.backbone_lr_scale:g}"
        src = "unlabelled" if self.unknown_source == "unlabelled" else \
            f"{self.unknown_source}-{source_key(self.detector, saliency_dir=self.saliency_dir)}"
        return f"ssul-{self.loss_type}-unknown-{src}-bb{self.backbone_lr_scale:g}"

    def num_extra_outputs(self) -> int:
        return 1 if self.unknown else 0

    # ---- data -----------------------------------------------------------------------------
    def train_data(self, data: Dataset, scenario: Scenario, step: int, transform: Callable,
                   batch_size: int, seed: int, old_model: Optional[nn.Module] = None
                   ) -> tuple[Dataset, Optional[Sampler]]:
        # the images and labels `data` holds (the step's, or a calibrator's part of them), unknown marked
        if not isinstance(data, StepDataset):
            raise TypeError(f"SSUL marks the unknown on a StepDataset's images, got {type(data).__name__}")
        return self.marked_dataset(scenario, data.indices, data.lut, transform), None

    def marked_dataset(self, scenario: Scenario, indices: np.ndarray, lut: np.ndarray,
                       transform: Callable) -> Dataset:
        """Images `indices` of the scenario's train set relabelled with `lut`, unknown marked."""
        if scenario.train_data is None:
            raise DataError("SSUL needs the scenario's train dataset; build it with build_scenario")
        if not self.unknown:
            return StepDataset(scenario.train_data, indices, lut, transform)
        if scenario.num_classes >= UNKNOWN_MARK:
            raise DataError(f"SSUL marks unknown pixels with label {UNKNOWN_MARK}, but this scenario "
                            f"has {scenario.num_classes} classes; at most {UNKNOWN_MARK - 1} fit")
        saliency = None
        if not self.unknown_from_unlabelled(scenario):
            saliency = SaliencyMaps(scenario.train_data, self.detector, self.cache_dir,
                                    self.saliency_dir)
        return UnknownMarkedDataset(scenario.train_data, indices, lut, transform, saliency)

    def unknown_from_unlabelled(self, scenario: Scenario) -> bool:
        if self.unknown_source == "auto":
            return bool(scenario.background_is_void)
        return self.unknown_source == "unlabelled"

    # ---- step life cycle ----------------------------------------------------------------
    def init_new_classifiers(self, model: nn.Module, old_model: nn.Module, ctx: StepContext) -> None:
        # main.py --w_transfer (only with --unknown): every new class starts as the old unknown;
        # Table 4 compares with a start from the background classifier (not in main.py).
        if not self.weight_transfer or self.transfer_from == "unknown" and not self.unknown:
            return
        src = old_model.classifier.extra if self.transfer_from == "unknown" else old_model.classifier.convs[0]
        new = model.classifier.convs[-1]
        with torch.no_grad():
            new.weight.copy_(src.weight[:1].expand_as(new.weight))
            new.bias.copy_(src.bias[:1].expand_as(new.bias))

    def trained_modules(self, model: nn.Module, ctx: StepContext) -> list[nn.Module]:
        """What trains after step 0 with freeze: main.py head[-1] (new) and head[0] (unknown)."""
        # main.py also trains the background head at lr x 1e-4; here the background shares step 0's
        # conv with the base classes, so it stays frozen with them (a ~1e-6 lr changes nothing).
        mods = [model.classifier.convs[-1]]
        if model.classifier.extra is not None:
            mods.append(model.classifier.extra)
        return mods

    def on_step_start(self, model: nn.Module, old_model: Optional[nn.Module],
                      loader: Iterable[Batch], ctx: StepContext) -> None:
        if ctx.step == 0 or not self.freeze:
            return
        # main.py --freeze: requires_grad off everywhere but the trained heads, so no backward runs
        # through the network; done here, before the engine may wrap the model in DDP.
        for p in model.parameters():
            p.requires_grad_(False)
        for m in self.trained_modules(model, ctx):
            for p in m.parameters():
                p.requires_grad_(True)

    # ---- per batch ------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, ctx: StepContext, phase: Phase) -> list[dict[str, Any]]:
        scale = 1.0 if ctx.step == 0 else self.lr_next_scale
        if ctx.step > 0 and self.freeze:
            return [{"params": list(m.parameters()), "lr_scale": scale}
                    for m in self.trained_modules(model, ctx)]
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in model.backbone.parameters()}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr_scale": scale * self.backbone_lr_scale},
                {"params": rest, "lr_scale": scale}]

    def train_mode(self, model: nn.Module, ctx: StepContext, phase: Phase) -> None:
        model.train()
        # main.py: bn_freeze only when curr_step > 0; every BatchNorm (network and heads) in eval.
        if ctx.step > 0 and self.bn_freeze:
            set_bn_eval(model)

    def make_targets(self, batch: Batch, out: SegOutput, old: Optional[SegOutput],
                     ctx: StepContext) -> Targets:
        label = batch.label
        unknown_label = ctx.num_seen if self.unknown else None  # the extra output after the classes
        label = torch.where(label == UNKNOWN_MARK,
                            torch.full_like(label, BACKGROUND if unknown_label is None else unknown_label),
                            label)
        if ctx.step > 0 and old is not None and self.pseudo_threshold is not None:
            old_logits = old.logits[:, : ctx.num_old + self.num_extra_outputs()]
            label = pseudo_label(label, old_logits, ctx.num_old, self.pseudo_threshold, unknown_label,
                                 softmax=self.loss_type == "ce")
        return Targets(label=label)

    def loss(self, out: SegOutput, targets: Targets, old: Optional[SegOutput], batch: Batch,
             ctx: StepContext) -> dict[str, torch.Tensor]:
        # main.py criterion(outputs, labels): every output, old classes and unknown included.
        logits = out.logits[:, : ctx.num_seen + self.num_extra_outputs()]
        if self.loss_type == "ce":  # nn.CrossEntropyLoss(ignore_index=255): mean over labelled pixels
            ce = cross_entropy(logits.float(), targets.label, targets.weight)
            return {"loss": ce, "ce": ce}
        bce = binary_cross_entropy_one_hot(logits, targets.label, targets.weight)
        return {"loss": bce, "bce": bce}

    # ---- evaluation -----------------------------------------------------------------------
    def eval_logits(self, out: SegOutput, ctx: StepContext) -> torch.Tensor:
        """Log of SSUL's scores: per-class sigmoids (a softmax with the CE loss), the unknown's added
        to the background's
        (main.py validate: outputs[:, bg] += outputs[:, unknown]). Argmax-identical, no saturation."""
        logits = out.logits.float()[:, : ctx.num_seen + self.num_extra_outputs()]
        log_all = F.log_softmax(logits, 1) if self.loss_type == "ce" else F.logsigmoid(logits)
        log_p = log_all[:, : ctx.num_seen]  # (B, num_seen, H, W)
        if not self.unknown:
            return log_p
        bg = torch.logaddexp(log_p[:, 0], log_all[:, ctx.num_seen])  # (B, H, W)
        return torch.cat([bg[:, None], log_p[:, 1:]], dim=1)


@dataclass
class SSULM(SSUL):
    """SSUL + a tiny class-balanced exemplar memory; every batch is half memory images."""

    name = "ssul_m"
    uses_memory = True

    # Paper Sec. 4.1: |M| = 100 for VOC (300 for ADE20K: set memory_size=300 there).
    memory_size: int = 100
    # "random": Table 4's memory drawn at random instead of class-balanced.
    memory_sampling: str = "balanced"

    # State, not hyperparameters: the memory and the last step it was refilled after.
    memory: Optional[ExemplarMemory] = field(default=None, init=False, repr=False, compare=False)
    memory_step: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_sampling not in SAMPLINGS:
            raise ValueError(f"memory_sampling must be one of {', '.join(SAMPLINGS)}, "
                             f"got {self.memory_sampling!r}")

    def train_data(self, data: Dataset, scenario: Scenario, step: int, transform: Callable,
                   batch_size: int, seed: int, old_model: Optional[nn.Module] = None
                   ) -> tuple[Dataset, Optional[Sampler]]:
        current, _ = super().train_data(data, scenario, step, transform, batch_size, seed)
        if step == 0 or self.memory_size == 0:
            return current, None
        memory = self.refresh_memory(scenario, step, seed, old_model, transform)
        # datasets/voc.py image_set='memory': labels of every class seen so far (test_lut). The
        # unknown is marked as on current images; SSUL's code skips its label shift for memory images.
        mem = self.marked_dataset(scenario, memory.indices, scenario.test_lut(step), transform)
        if len(mem) == 0:
            return current, None
        # main.py: half of every batch replaced by memory images.
        return with_memory(current, mem, batch_size, drop_last=len(current) > batch_size,
                           seed=seed * 1000 + step)

    def refresh_memory(self, scenario: Scenario, step: int, seed: int,
                       old_model: Optional[nn.Module], transform: Callable) -> ExemplarMemory:
        """The memory for training `step`: refilled after every earlier step not yet folded in,
        with the previous step's model `old_model` (main.py: memory_sampling_balanced(model_prev)
        at the start of the step)."""
        if self.memory is None:
            self.memory = ExemplarMemory(self.memory_size, seed, self.memory_sampling)
        if scenario.train_data is not None:
            self.memory.check_ids(scenario.train_data.ids)
        pending = range(self.memory_step + 1, step)
        if len(pending) and old_model is None:
            raise ValueError("SSUL-M chooses its memory with the previous step's model; "
                             "train_data needs old_model after step 0")
        # Normally one update, after step-1. Updates a checkpoint lacks (a model continued from
        # another method's run) are made with the previous step's model, the only one at hand.
        for s in pending:
            self.memory.update(self.memory_candidates(scenario, s, old_model, step - 1, transform),
                               range(1, len(scenario.seen_classes(s))), s,
                               scenario.train_data.ids if scenario.train_data is not None else None)
        self.memory_step = max(self.memory_step, step - 1)
        return self.memory

    def memory_candidates(self, scenario: Scenario, s: int, model: nn.Module, model_step: int,
                          transform: Callable) -> list[tuple[int, list[int]]]:
        """Step s's training images, each with the labels it is known to hold: step s's own labels
        plus, after step 0, the pseudo-labels of `model` (trained up to `model_step`) on its
        background (utils/memory.py: threshold 0.7 whatever --pseudo_thresh; no step's ground
        truth beyond what step s trained on)."""
        if scenario.train_data is None:
            raise DataError("SSUL-M needs the scenario's train dataset; build it with build_scenario")
        data = StepDataset(scenario.train_data, scenario.train_indices(s), scenario.train_lut(s),
                           unaugmented(transform))
        num_model = len(scenario.seen_classes(model_step))
        net = inference_copy(model) if s > 0 else None
        device = next(model.parameters()).device
        found: list[tuple[int, list[int]]] = []
        with torch.inference_mode():
            for k in range(len(data)):
                image, label, index = data[k]
                if net is not None:
                    logits = net(image[None].to(device)).logits[:, : num_model + self.num_extra_outputs()]
                    label = pseudo_label(label[None].to(device), logits, num_model,
                                         MEMORY_PSEUDO_THRESHOLD, softmax=self.loss_type == "ce")[0]
                held = [int(c) for c in torch.unique(label).tolist() if c not in (BACKGROUND, IGNORE)]
                found.append((int(index), held))
        return found

    def state_dict(self) -> dict[str, Any]:
        if self.memory is None or self.memory_step < 0:
            return {}  # no memory yet (step 0): a state SSUL can share
        return {"memory": self.memory.state_dict(), "memory_step": int(self.memory_step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        foreign = set(state) - {"memory", "memory_step"}
        if foreign:
            raise ValueError(f"method 'ssul_m': unknown state keys {sorted(foreign)}")
        if not state:  # a checkpoint from before any memory: start over
            self.memory, self.memory_step = None, -1
            return
        memory = ExemplarMemory(self.memory_size, sampling=self.memory_sampling)
        memory.load_state_dict(state["memory"])
        self.memory, self.memory_step = memory, int(state["memory_step"])
