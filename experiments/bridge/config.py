"""The bridge run's config (pydantic, on :class:`experiments.config.RunConfig`): one home for each default.

Stage 1 (``train``) trains the connector (+ style tokens) on captions; stage 2 (``stage2``) trains
the connector and a LoRA adapter of the LM on visual questions built from the scene metadata
(:mod:`experiments.data.vqa`). ``validate`` checks part names and options through the registries.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, StrictBool, field_validator, model_validator

from experiments.config import (ConfigError, DataSection, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, RunConfig,
                                Section, TrainSection, check_kwargs)

#: SmolLM2-Instruct's chat format (ChatML, no system turn) with the image in the user turn.
CHATML_PROMPT = "<|im_start|>user\n{image}\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
#: a short caption prompt (the image, then "Caption:"): 2 tokens after the image instead of ~15
SHORT_PROMPT = "Caption:"
INITS = ("seeded", "random")  # the default inits; "stage1" (a stage-1 Q-Former) applies to the qformer connector
Init = Literal["seeded", "random", "stage1"]


class DataConfig(DataSection):
    """The images and captions: ``name: shapesworld`` (the default: ``n_scenes`` generated scenes, with the scene
    metadata the attribute, hard-negative and VQA evaluations need) or any image–caption set of
    :mod:`experiments.views` with its loader options (``csv``: ``path``, ``img_key``, ``caption_key``, ``sep``,
    ``image_root``; ``karpathy``: ``path``, ``image_root``; splits from the file or seeded 80/10/10).
    ``image_size``: pixels the vision encoder sees; ``seed``: the data seed (ShapesWorld's generator, the seeding
    aligner's pairs, the dialogues)."""

    name: str = "shapesworld"
    image_size: PositiveInt = 128
    seed: NonNegInt = 0

    @model_validator(mode="before")
    @classmethod
    def _shapesworld_defaults(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("name", "shapesworld") == "shapesworld":
            v = {"n_scenes": 600, **v}
        return v

    def views_section(self) -> DataSection:
        """The section :mod:`experiments.views` loads (``seed`` is ShapesWorld's generator seed only)."""
        opts = self.options(exclude=() if self.name == "shapesworld" else ("seed",))
        return DataSection(name=self.name, **opts)


class VisionConfig(Section):
    encoder: str = "mobilenet_v2"  # a registered image encoder with grid features: mobilenet_v2, open_clip_image
    options: dict[str, Any] = Field(default_factory=dict)  # its constructor options
    tokens: Optional[PositiveInt] = 4  # average-pool the square grid to this many image tokens (None: keep all)


class LLMConfig(Section):
    name_or_path: str = "smollm2"  # "smollm2", a model directory, a hub id, or "tiny" (a random tiny Llama)
    prompt: str = CHATML_PROMPT  # caption prompt around the image tokens ({image} marks where)
    max_caption_tokens: PositiveInt = 40
    head_bf16: StrictBool = False  # LM head matmul in bf16 during training (see alignfuse bench bridge)
    # the frozen LM's attention and MLP matmuls in bf16 (align.llm.LowPrecisionLinear): 2.1x faster steps on a CPU
    # with AVX-512 BF16, loss within ~5e-3 of float32 (alignfuse bench bridge); "auto": where bf16 is faster
    # (CUDA; CPUs with AMX / AVX-512 BF16, timed once) — on CPUs without them bf16 is emulated and far slower
    linears_bf16: Union[Literal["auto"], StrictBool] = "auto"


class MethodConfig(Section):
    """What makes stage 1 keep the image: learned style tokens, a lower lr for the seeded connector, and
    extra loss weight on colour/shape words."""

    style_tokens: NonNegInt = 8  # free learned tokens after the image (absorb what every caption shares)
    connector_lr_scale: NonNegFloat = 0.1  # connector lr = train.lr * this (0: the connector stays as initialised)
    style_lr_scale: NonNegFloat = 50.0  # style tokens' lr = train.lr * this (they must move far: caption style)
    style_position: Literal["before", "after"] = "after"  # style tokens before or after the image tokens
    content_weight: NonNegFloat = 1.0  # loss weight of colour/shape word tokens (1: plain mean)


class SeedingConfig(Section):
    aligner: Literal["cca", "clip"] = "cca"
    text: Literal["bow", "minilm"] = "bow"  # the aligner's text view: caption words (bag of words) or MiniLM
    method: Literal["lstsq", "procrustes"] = "procrustes"
    target: Literal["captions", "words"] = "words"
    n_components: PositiveInt = 24
    reg: NonNegFloat = 1.0
    cca_encode_power: NonNegFloat = 0.0
    scales: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0], min_length=1)
    mlp_mode: Literal["auto", "shift", "identity"] = "auto"
    n_calibration_captions: int = Field(32, ge=2)
    aligner_steps: PositiveInt = 300
    resampler_blocks: Literal["pool", "random"] = "pool"
    fit_on: Literal["tokens", "pooled"] = "tokens"


class Stage1Config(Section):
    """The ``stage1`` init (BLIP-2's first stage, :mod:`experiments.qformer_bridge`): a Q-Former aligner trained on
    the run's image tokens and training captions (ITC + ITM + ITG), cached under ``cache_dir/qformer_stage1``; its
    query path + a new projection into the LM is the connector, then trained like the other inits."""

    steps: PositiveInt = 150  # aligner training steps
    options: dict[str, Any] = Field(default_factory=dict)  # QFormerAligner options over STAGE1_DEFAULTS
    train: dict[str, Any] = Field(default_factory=dict)  # batch_size, lr, weight_decay, grad_clip
    negatives_per_image: NonNegInt = 6  # compositional ITM negatives per training scene (ShapesWorld only)
    freeze_qformer: StrictBool = False  # bridge training then moves only the projection (+ style tokens)


class EvalConfig(Section):
    n_eval_images: int = Field(24, ge=2)
    captions_per_image: PositiveInt = 2
    max_new_tokens: PositiveInt = 16
    n_val_captions: PositiveInt = 24
    batch_size: int = Field(32, ge=2)
    n_examples: PositiveInt = 8  # example captions (and distinct count) in the report
    step0_controls: StrictBool = True  # step-0 evaluation with the no-image/shuffled controls and hard negatives
    #                                    (false: caption NLL and generated captions only, a third of the time)


class Stage2Config(Section):
    """Visual instruction tuning: LoRA on the LM + the connector, answer loss on generated dialogues."""

    enabled: StrictBool = True
    inits: list[Init] = Field(default_factory=lambda: list(INITS))
    connector: Optional[str] = None  # which stage-1 connector continues (default: the first listed)
    dialogues_per_scene: PositiveInt = 2
    max_turns: PositiveInt = 3
    lora_r: PositiveInt = 8
    lora_alpha: PositiveFloat = 16.0
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    questions_per_type: PositiveInt = 1  # evaluation questions of each type per held-out scene
    n_eval_scenes: PositiveInt = 48
    n_examples: PositiveInt = 8
    train: TrainSection = TrainSection(max_steps=120, batch_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=5,
                                       min_lr_ratio=0.1, grad_clip=1.0, eval_every=None, log_every=10,
                                       monitor="loss", mode="min", save_every=None)


class Config(RunConfig):
    experiment: Literal["bridge"] = "bridge"
    out_dir: str = "runs/bridge_shapesworld"
    seeds: list[NonNegInt] = Field(default_factory=lambda: [0], min_length=1, max_length=1)
    data: DataConfig = DataConfig()
    llm: LLMConfig = LLMConfig()
    vision: VisionConfig = VisionConfig()
    connectors: list[str] = Field(default_factory=lambda: ["mlp2x_gelu"], min_length=1)
    connector_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    inits: list[Init] = Field(default_factory=lambda: list(INITS), min_length=1)
    method: MethodConfig = MethodConfig()
    seeding: SeedingConfig = SeedingConfig()
    stage1: Stage1Config = Stage1Config()
    train: TrainSection = TrainSection(max_steps=150, batch_size=8, lr=6e-4, weight_decay=0.0, warmup_steps=3,
                                       min_lr_ratio=0.1, grad_clip=1.0, eval_every=10, log_every=5,
                                       monitor="val_caption_nll", mode="min", save_every=None)
    eval: EvalConfig = EvalConfig()
    stage2: Stage2Config = Stage2Config()

    @field_validator("train")
    @classmethod
    def _monitor(cls, v: TrainSection) -> TrainSection:
        if v.monitor != "val_caption_nll" or v.mode != "min":
            raise ValueError(f"monitor must be 'val_caption_nll' with mode 'min' (the bridge evaluator's metric), "
                             f"got {v.monitor!r}/{v.mode!r}")
        return v


def validate(cfg: Config, where: str) -> Config:
    """Registry checks: connector names and options (names, types and values, :mod:`experiments.part_options`),
    the vision encoder (an image encoder with grid features)."""
    from align.connectors import CONNECTORS
    from experiments.features import ENCODERS

    if cfg.vision.encoder not in ENCODERS.names():
        raise ConfigError(f"{where}: unknown vision.encoder {cfg.vision.encoder!r}; known encoders: "
                          f"{', '.join(ENCODERS.names())}")
    enc = ENCODERS.get(cfg.vision.encoder)
    if getattr(enc, "modality", None) != "image":
        raise ConfigError(f"{where}: vision.encoder {cfg.vision.encoder!r} encodes {enc.modality}, not images")
    check_kwargs(enc, cfg.vision.options, f"{where}.vision.options")
    known = CONNECTORS.names()
    for key, names in (("connectors", cfg.connectors), ("connector_options", list(cfg.connector_options))):
        for name in names:
            if name not in known:
                raise ConfigError(f"{where}: unknown connector {name!r} in {key}; known connectors: {', '.join(known)}")
    from experiments.part_options import check_connector_options

    for name in dict.fromkeys([*cfg.connectors, *cfg.connector_options]):  # names, types and values (dry build)
        check_connector_options(name, cfg.connector_options.get(name) or {}, f"connector_options.{name}",
                                source=where)
    if cfg.stage2.connector is not None and cfg.stage2.connector not in cfg.connectors:
        raise ConfigError(f"{where}: stage2.connector {cfg.stage2.connector!r} is not in connectors {cfg.connectors}")
    from experiments.bridge.stages import check_inits

    check_inits(cfg, where)  # each listed init applies to a listed connector; stage1's options
    if cfg.data.name != "shapesworld":  # an image–caption set: its loader, options and paths; no scene metadata
        from experiments.views import check_data_section

        check_data_section(cfg.data.views_section(), where)
        if cfg.stage2.enabled:
            raise ConfigError(f"{where}: stage2.enabled: stage 2 (visual questions) is built from ShapesWorld scene "
                              f"metadata, which data.name={cfg.data.name!r} does not have; set stage2.enabled=false")
    if cfg.vision.tokens is not None and round(cfg.vision.tokens ** 0.5) ** 2 != cfg.vision.tokens:
        raise ConfigError(f"{where}: vision.tokens must be a square number (a pooled square grid), "
                          f"got {cfg.vision.tokens}")
    return cfg
