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
    def from_dict(cls, data: dict, source: str = "the model file") -> "HANConfig":
        """A config from stored data; wrong types, values out of range or unknown fields are one sentence.

        Missing fields take the defaults (files written before a field existed); ``source`` names the file.
        """
        if not isinstance(data, dict):
            raise HanEdgeError(f"{source}: the HAN config must be an object, not {type(data).__name__}")
        unknown = set(data) - set(_FIELD_RULES)
        if unknown:
            raise HanEdgeError(f"{source}: unknown HAN config fields {sorted(map(str, unknown))}; "
                               f"written by a newer han-edge?")
        fixed = {}
        for key, value in data.items():
            check, expected = _FIELD_RULES[key]
            # JSON turns tuples into lists; the dataclass is frozen and hashable with tuples.
            value = _as_tuple(value)
            if not check(value):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise HanEdgeError(f"{source}: HAN config field {key!r} must be {expected}, not {shown}")
            fixed[key] = value
        config = cls(**fixed)
        table = VARIANTS[config.variant].strides   # Table 1: the variants differ in their strides alone
        if config.strides != table:
            raise HanEdgeError(f"{source}: HAN config says HAN({config.variant}), whose strides are {list(table)}, "
                               f"but holds {list(config.strides)}")
        # crops are resampled from feature maps no larger than the input: a larger crop only costs memory
        if any(h > config.input_size[0] or w > config.input_size[1] for h, w in config.crop_sizes):
            raise HanEdgeError(f"{source}: HAN config crop_sizes {[list(c) for c in config.crop_sizes]} exceed "
                               f"the input size {list(config.input_size)}")
        return config

    @classmethod
    def from_json(cls, text: str, source: str = "the model file") -> "HANConfig":
        """``from_dict`` of a JSON text; text that is not JSON (or has NaN/Infinity) is one sentence."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise HanEdgeError(f"{source}: the HAN config must be JSON text, not {type(text).__name__}")
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as err:   # JSONDecodeError, bad UTF-8, NaN
            reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
            raise HanEdgeError(f"{source}: the HAN config is not valid JSON ({reason})") from None
        return cls.from_dict(data, source)


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value, low: float = -1e300, high: float = 1e300) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high  # False for NaN


def _ints(count: int, low: int, high: int):
    return lambda v: isinstance(v, tuple) and len(v) == count and all(_int(x, low, high) for x in v)


# field -> (check, what it must be); bounds are generous sanity limits, not the paper's values
_FIELD_RULES = {
    "variant": (lambda v: isinstance(v, str) and v in ("small", "medium", "large"), "'small', 'medium' or 'large'"),
    "strides": (lambda v: isinstance(v, tuple) and len(v) == 3 and all(_int(x, 1, 2) for x in v),
                "three strides of 1 or 2"),
    "widths": (_ints(3, 1, 8192), "three whole numbers from 1 to 8192"),
    "stem_width": (lambda v: _int(v, 1, 8192), "a whole number from 1 to 8192"),
    "input_size": (_ints(2, 16, 1024), "[height, width], whole numbers from 16 to 1024"),
    "regions": (lambda v: _int(v, 1, 64), "a whole number from 1 to 64"),
    "crop_sizes": (lambda v: isinstance(v, tuple) and len(v) == 3 and all(_ints(2, 1, 1024)(x) for x in v),
                   "three [height, width] pairs of whole numbers from 1 to 1024"),
    "global_dim": (lambda v: _int(v, 1, 65536), "a whole number from 1 to 65536"),
    "local_dim": (lambda v: _int(v, 1, 65536), "a whole number from 1 to 65536"),
    "reduction": (lambda v: _int(v, 1, 8192), "a whole number from 1 to 8192"),
    "mean": (lambda v: isinstance(v, tuple) and len(v) == 3 and all(_real(x, -1e3, 1e3) for x in v),
             "three finite numbers"),
    "std": (lambda v: isinstance(v, tuple) and len(v) == 3 and all(_real(x, 1e-6, 1e3) for x in v),
            "three positive finite numbers"),
    "paper_flops": (lambda v: _real(v, 0.0, 1e30), "a finite number >= 0"),
}


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
    from han_edge._version import __version__

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


NORMALIZATION_KEY = "han_edge.normalization"
FOLDED, EXTERNAL = "folded", "external"


def normalization_of(meta: dict[str, str], source: str = "the model") -> str:
    """'folded' (takes RGB 0..255) or 'external' (takes normalised input; the default for older files)."""
    value = meta.get(NORMALIZATION_KEY, EXTERNAL)
    if value not in (FOLDED, EXTERNAL):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise HanEdgeError(f"{source}: unknown {NORMALIZATION_KEY} {shown} in its metadata; "
                           f"expected '{FOLDED}' or '{EXTERNAL}'")
    return value


def config_from_metadata(meta: dict[str, str], source: str) -> tuple[HANConfig, str]:
    """(config, precision) from metadata written by ``model_metadata``, or a clear error."""
    if not isinstance(meta, dict):
        raise HanEdgeError(f"{source}: the han-edge metadata must be an object, not {type(meta).__name__}")
    if "han_edge.config" not in meta:
        raise HanEdgeError(f"{source} carries no han-edge metadata; export it with `han-edge export`")
    config = HANConfig.from_json(meta["han_edge.config"], str(source))
    order = meta.get("han_edge.color_order", "RGB")
    if order != "RGB":   # every han-edge model takes RGB; the runtime would not swap channels for another value
        raise HanEdgeError(f"{source}: han_edge.color_order {str(order)[:20]!r} in its metadata; han-edge models take RGB")
    precision = meta.get("han_edge.precision", "fp32")
    if precision not in PRECISIONS:
        shown = repr(precision) if len(repr(precision)) <= 30 else repr(precision)[:27] + "..."
        raise HanEdgeError(f"{source}: unknown precision {shown} in the han-edge metadata; "
                           f"one of {', '.join(PRECISIONS)}")
    return config, precision
