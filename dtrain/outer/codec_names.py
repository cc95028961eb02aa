"""The outer loop's wire codecs, by name: the one list (torch-free, so config validation stays light).

``dtrain.config`` checks ``outer.codec`` against it and the config reference lists it;
``dtrain.outer.codecs`` maps each name to its class and refuses to import when the two differ.
"""

from typing import Tuple

CODEC_NAMES: Tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")
