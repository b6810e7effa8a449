"""Model configuration: one dataclass per HAN variant that every stage carries along."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from han_edge.errors import HanEdgeError

# ImageNet statistics: the paper trains from scratch, but these are the conventional re-id
# normalisation and keep inputs centred for the INT8 calibration.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HANConfig:
    """Everything needed to rebuild, export and run one HAN model.

    Stored in checkpoints, ONNX ``metadata_props`` and engine side files, so later stages
    never ask the user again for the variant, input size or normalisation.
    """

    variant: str = "small"
    strides: tuple[int, int, int] = (2, 1, 1)          # Table 1: s1, s2, s3 of every global block
    widths: tuple[int, int, int] = (128, 256, 384)     # d1, d2, d3 (Section 4)
    stem_width: int = 32
    input_size: tuple[int, int] = (160, 64)            # (height, width)
    regions: int = 4                                   # T local streams
    crop_sizes: tuple[tuple[int, int], ...] = ((24, 28), (12, 14), (6, 7))  # hard-attention crops (h, w)
    global_dim: int = 512
    local_dim: int = 512
    reduction: int = 16                                # channel-attention bottleneck r
    mean: tuple[float, float, float] = IMAGENET_MEAN   # on RGB in [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD
    paper_flops: float = 3.68e8                        # Table 1, for the profiler's comparison

    @property
    def feature_dim(self) -> int:
        return self.global_dim + self.local_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "HANConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise HanEdgeError(f"unknown HAN config fields {sorted(unknown)}; written by a newer han-edge?")
        # JSON turns tuples into lists; the dataclass is frozen and hashable with tuples.
        fixed = {k: _as_tuple(v) for k, v in data.items()}
        return cls(**fixed)

    @classmethod
    def from_json(cls, text: str) -> "HANConfig":
        return cls.from_dict(json.loads(text))


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


VARIANTS: dict[str, HANConfig] = {
    "small": HANConfig(variant="small", strides=(2, 1, 1), paper_flops=3.68e8),
    "medium": HANConfig(variant="medium", strides=(1, 2, 1), paper_flops=5.33e8),
    "large": HANConfig(variant="large", strides=(1, 1, 2), paper_flops=7.01e8),
}


def get_config(variant: str) -> HANConfig:
    """The paper's configuration of a variant by name (small, medium, large)."""
    try:
        return VARIANTS[variant.lower()]
    except KeyError:
        raise HanEdgeError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}") from None


# -- model metadata: what every exported file says about itself -------------------------------------
FEATURE_LAYOUT = "global[0:512] L2-normalised | local[512:1024] L2-normalised"
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu")


def model_metadata(config: HANConfig, precision: str, **extra) -> dict[str, str]:
    """String key/values stored in ONNX ``metadata_props`` and in an engine's side file."""
    from han_edge import __version__

    if precision not in PRECISIONS:
        raise HanEdgeError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    meta = {
        "han_edge.config": config.to_json(),
        "han_edge.variant": config.variant,
        "han_edge.precision": precision,
        "han_edge.input": f"images float32 [N,3,{config.input_size[0]},{config.input_size[1]}] RGB, "
                          f"(x/255 - mean)/std",
        "han_edge.mean": json.dumps(list(config.mean)),
        "han_edge.std": json.dumps(list(config.std)),
        "han_edge.feature_layout": FEATURE_LAYOUT,
        "han_edge.version": __version__,
    }
    meta.update({f"han_edge.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def config_from_metadata(meta: dict[str, str], source: str) -> tuple[HANConfig, str]:
    """(config, precision) from metadata written by ``model_metadata``, or a clear error."""
    if "han_edge.config" not in meta:
        raise HanEdgeError(f"{source} carries no han-edge metadata; export it with `han-edge export`")
    return HANConfig.from_json(meta["han_edge.config"]), meta.get("han_edge.precision", "fp32")
