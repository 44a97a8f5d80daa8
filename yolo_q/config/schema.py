"""Typed experiment schema: every YAML config is validated against these dataclasses.

Sections: ``model``, ``data``, ``train`` (with ``loss``), ``quant`` (with ``qat``, ``distill``)
and ``export``. Unknown keys and wrong types are rejected by OmegaConf when a YAML file is
merged onto the structured config (see :mod:`yolo_q.config.loader`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class BackboneConfig:
    type: str = "EfficientRep"  # EfficientRep | CSPBepBackbone
    num_repeats: List[int] = field(default_factory=lambda: [1, 6, 12, 18, 6])
    out_channels: List[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    fuse_p2: bool = True
    cspsppf: bool = True
    csp_e: float = 0.5


@dataclass
class NeckConfig:
    type: str = "RepBiFPANNeck"  # RepBiFPANNeck | CSPRepBiFPANNeck
    num_repeats: List[int] = field(default_factory=lambda: [12, 12, 12, 12])
    out_channels: List[int] = field(default_factory=lambda: [256, 128, 128, 256, 256, 512])
    csp_e: float = 0.5


@dataclass
class HeadConfig:
    type: str = "EffiDeHead"
    strides: List[int] = field(default_factory=lambda: [8, 16, 32])
    use_dfl: bool = False
    reg_max: int = 16
    prior_prob: float = 0.01
    grid_cell_offset: float = 0.5
    grid_cell_size: float = 5.0


@dataclass
class ModelConfig:
    name: str = "yolov6n"
    nc: int = 80
    depth_multiple: float = 0.33
    width_multiple: float = 0.25
    # repvgg (multi-branch) | realvgg (plain 3x3, RepOptimizer) | linearadd (hyper-search)
    # | conv_relu | conv_silu
    block: str = "repvgg"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    scales: Optional[str] = None  # RepOpt branch-scales file (from hyper-search)
    # every BatchNorm of the model: the official YOLOv6 recipe (PyTorch's defaults are 1e-5 / 0.1).
    # eps changes the function of a trained model (it is a property of its weights: checkpoints
    # keep it; configs stored before these keys existed mean 1e-5 / 0.1, see LEGACY_DEFAULTS)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.03


@dataclass
class AugmentConfig:
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0
    # mosaic + mixup off for the last N epochs (others stay on); only in runs longer than N
    # epochs, so it never covers a whole run
    close_mosaic_epochs: int = 15


@dataclass
class DataConfig:
    dataset: str = "datasets/coco128.yaml"  # data YAML: train, val, nc, names, ...
    root: Optional[str] = None  # replaces the data YAML's `path` (dataset root folder)
    img_size: int = 640
    workers: int = 2
    cache_labels: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    iou_type: str = "giou"  # giou | ciou | siou
    use_dfl: Optional[bool] = None  # None: follow model.head.use_dfl
    cls_weight: float = 1.0
    iou_weight: float = 2.5
    dfl_weight: float = 0.5
    assigner: str = "tal"  # tal | atss
    atss_warmup_epochs: int = 0  # ATSS for epoch < N, then the assigner above
    atss_topk: int = 9  # ATSS candidates per pyramid level
    tal_topk: int = 13
    tal_alpha: float = 1.0
    tal_beta: float = 6.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 32  # per process (per GPU); DDP total = batch_size * world size
    nominal_batch: int = 64  # gradient accumulation target
    # ramp the accumulation count from 1 to nominal_batch / batch over the warm-up (YOLOv6);
    # false: nominal_batch / batch from the first step
    accumulate_warmup: bool = True
    optimizer: str = "sgd"  # sgd | adamw | repopt
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    nesterov: bool = True
    weight_decay: float = 0.0005
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_epochs: float = 3.0
    warmup_min_iters: int = 1000
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    ema: bool = True
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    # EMA of the BN buffers: average (with the weights, as YOLOv6 / Ultralytics) | copy (from the
    # live model); QAT always copies (quantizer ranges)
    ema_buffers: str = "average"
    amp: bool = True  # only takes effect on CUDA
    grad_clip: float = 0.0  # 0 disables
    eval_interval: int = 10
    eval_final_epochs: int = 0  # also evaluate every epoch for the last N epochs
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    max_bad_steps: int = 10  # consecutive non-finite losses before stopping
    log_interval: int = 10
    progress_bar: bool = True  # tqdm bar per epoch (rank 0, only when stderr is a terminal)
    tensorboard: bool = True  # SummaryWriter under <run dir>/tensorboard (rank 0)
    channels_last: bool = False  # NHWC tensors; crashed in CPU (oneDNN) backward, so opt-in
    sync_bn: bool = False  # SyncBatchNorm under DDP
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class QATConfig:
    epochs_ratio: float = 0.1  # fraction of train.epochs
    epochs: Optional[int] = None  # explicit override
    lr_ratio: float = 0.01  # start LR = lr_ratio * train.lr0
    lrf: float = 0.01
    freeze_scales: bool = True  # False: EMA-updated activation ranges
    range_ema: float = 0.99
    # activation ranges trained with the weights (LSQ step-size gradient), from the calibrated
    # values; tied (concat) scales stay one parameter. Needs freeze_scales=true (no EMA ranges)
    learn_scales: bool = False
    scale_lr_ratio: float = 100.0  # learned ranges' LR = this x the weights' QAT LR
    ema: bool = True  # model EMA during QAT (weights averaged, quantizer ranges copied)
    # QAT trains with the augmentation the float recipe ends with: mosaic and mixup off (on the
    # reference models 3 QAT epochs with mosaic lost 0.1 point against PTQ on 1000 val
    # images, without it they kept float within 0.07; benchmarks/reference/README.md)
    close_mosaic: bool = True
    # QAT-aware partial quantization after QAT (yolo_q.quant.qat_partial): the fewest layers,
    # ranked on the trained model (head levels, backbone / neck blocks), made float so that it
    # is within max_drop mAP50-95 points of float on the selection set (quant.select_data,
    # quant.sensitivity_images); no retraining. Writes weights/partial.pt beside best.pt.
    # null: off
    max_drop: Optional[float] = None
    max_search_steps: int = 6  # evaluations of the search along the ranking (groups made float)
    output_dir: str = "runs/qat"  # QAT runs go to <output_dir>/<train.name>


@dataclass
class DistillConfig:
    enabled: bool = True
    tau: float = 1.0
    weight: float = 1.0
    layers: List[str] = field(default_factory=lambda: ["neck"])


@dataclass
class QuantConfig:
    num_bits: int = 8
    calib: str = "percentile"  # max | percentile | mse | entropy
    percentile: float = 99.99
    calib_batches: int = 16
    calib_batch_size: int = 8
    num_histogram_bins: int = 2048
    per_channel_weights: bool = True
    # weight ranges: max (max |w| per channel / tensor) | mse (the clip of max |w| with the least
    # squared rounding + clipping error, searched per channel; helps most with per-tensor weights)
    weight_calib: str = "max"
    skip_dfl: bool = True
    high_precision_outputs: bool = True
    # onnxruntime flavour: a conv whose activation ONNX Runtime cannot fuse into QLinearConv
    # (SiLU, ...) quantizes its PRE-activation output, so the conv runs integer; the activation
    # runs in float and its readers quantize its output. false: quantize after the activation
    # (one Q/DQ pair less; the conv stays float in ONNX Runtime, OpenVINO fuses either way)
    preact_output: bool = True
    share_concat_scales: bool = True
    # tensorrt | onnxruntime (Q/DQ placement, see yolo_q.quant.convert); null: follow
    # export.flavour when that is a QDQ flavour, else tensorrt
    flavour: Optional[str] = None
    skip_layers: List[str] = field(default_factory=list)
    sensitivity_images: int = 64  # val images per exact sensitivity / max-drop evaluation
    sensitivity_proxy_images: int = 32  # calibration images for the sensitivity proxy
    # proxy score: agreement (1 - mAP vs the float model's detections) | output (raw output error)
    sensitivity_proxy: str = "agreement"
    # sensitivity analysis only: the probed layer's quantization error x this (1 = plain INT8;
    # > 1 lifts single-layer mAP changes above the val subset's noise, see quant/sensitivity.py)
    sensitivity_gain: float = 1.0
    # data YAML whose val split quantization's own choices are measured on: the sensitivity /
    # max-drop subset (its first sensitivity_images) and QAT's best epoch. A held-out split
    # keeps the reported val mAP free of that selection. null: data.dataset's val split
    select_data: Optional[str] = None
    qat: QATConfig = field(default_factory=QATConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class ExportConfig:
    opset: int = 13
    dynamic_batch: bool = False
    simplify: bool = True
    flavour: str = "onnxruntime"  # float | tensorrt | onnxruntime
    # onnxruntime flavour: weight storage, auto | int8 | uint8 (yolo_q.export.qdq.resolve_ort_weights)
    ort_weights: str = "auto"
    # onnxruntime flavour: storage of SIGNED activation grids (same values either way):
    # uint8 (zero point 128; ONNX Runtime's QLinear kernels) | int8 (zero point 0; OpenVINO folds
    # every Q/DQ into the convolutions, no requantize passes) (yolo_q.export.qdq)
    act_storage: str = "uint8"
    end2end: bool = False
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 100


@dataclass
class EvalConfig:
    conf_thres: float = 0.001
    iou_thres: float = 0.65
    max_det: int = 300
    batch_size: int = 8


@dataclass
class SyntheticConfig:
    """Synthetic benchmark data generated by tools/pipeline.py when missing."""
    out: str = "data/synthetic"
    train: int = 2000
    val: int = 200
    size: int = 320
    seed: int = 0
    spec: Dict[str, Any] = field(default_factory=dict)  # SyntheticSpec overrides (min_size, ...)


@dataclass
class PipelineConfig:
    name: str = "demo"
    output_dir: str = "runs/pipeline"
    synthetic: Optional[SyntheticConfig] = None  # generate data.dataset with these settings
    # calibrators compared at the PTQ stage besides quant.calib (the main one, always run first)
    calib_methods: List[str] = field(default_factory=lambda: ["percentile"])
    sensitivity: bool = True
    sensitivity_mode: str = "proxy"  # proxy | exact | both
    max_drop: Optional[float] = 0.3  # partial quantization target (mAP points)
    skip_top: Optional[int] = None
    qat: bool = True
    qat_distill: bool = True
    flavours: List[str] = field(default_factory=lambda: ["onnxruntime", "tensorrt"])
    speed_batches: List[int] = field(default_factory=lambda: [1])
    speed_iters: int = 20
    threads: int = 2
    eval_batch: int = 16
    eval_images: Optional[int] = None  # evaluate on the first N validation images (None: all)
    speed_img_size: Optional[int] = None  # latency table input size (None: data.img_size)
    qat_compare_no_distill: bool = False  # also run QAT without distillation (one more row)
    # "base": the config as written; "repopt": the same network as plain RealVGG blocks trained
    # with RepOptimizer from the scales of a hyper-search (LinearAdd) run of repopt_hs_epochs.
    variants: List[str] = field(default_factory=lambda: ["base"])
    repopt_hs_epochs: Optional[int] = None  # None: train.epochs
    # an existing float checkpoint (yolo_q, official YOLOv6 or state dict): the base variant
    # skips float training and quantizes this model
    float_weights: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# Values that keys added later had before they existed: a config stored in an older checkpoint
# (which lacks the key) means this value, not today's default (yolo_q.config.config_from_dict).
LEGACY_DEFAULTS = {
    "model.bn_eps": 1e-5,
    "model.bn_momentum": 0.1,
    "quant.qat.close_mosaic": False,
}

# Allowed values of string options, checked when a config is loaded (key -> choices).
CHOICES = {
    "model.block": ("repvgg", "realvgg", "linearadd", "conv_relu", "conv_silu"),
    "model.backbone.type": ("EfficientRep", "CSPBepBackbone"),
    "model.neck.type": ("RepBiFPANNeck", "CSPRepBiFPANNeck"),
    "train.optimizer": ("sgd", "adamw", "repopt"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.ema_buffers": ("average", "copy"),
    "train.loss.iou_type": ("giou", "ciou", "siou"),
    "train.loss.assigner": ("tal", "atss"),
    "quant.calib": ("max", "percentile", "mse", "entropy"),
    "quant.weight_calib": ("max", "mse"),
    "export.flavour": ("float", "tensorrt", "onnxruntime"),
    "export.ort_weights": ("auto", "int8", "uint8"),
    "export.act_storage": ("uint8", "int8"),
    "quant.sensitivity_proxy": ("agreement", "output"),
    "pipeline.sensitivity_mode": ("proxy", "exact", "both"),
    "pipeline.calib_methods": ("max", "percentile", "mse", "entropy"),
    "pipeline.flavours": ("tensorrt", "onnxruntime"),
    "pipeline.variants": ("base", "repopt"),
}
