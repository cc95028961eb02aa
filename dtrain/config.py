"""Typed configuration: the dataclasses behind the Hydra tree in ``conf/``.

Every key a user can set lives here with its type and its default. Hydra merges
``conf/*.yaml`` and the shell overrides onto these schemas, so an unknown key or
a value of the wrong type fails at composition. Value checks (ranges, allowed
names) live in ``__post_init__`` and raise :class:`ConfigError` with one line
naming the key, the bad value and what is allowed.

Every default is stated once, here:

- A dataclass field holds the default of its key: what a console script gives
  when nothing chooses otherwise. Where a nested block needs other values than
  its class gives, the parent's field says so in its ``default_factory``
  (``ExportConfig.eval``, ``WanConfig.local``, ``SimConfig.chaos``): still
  once, still here.
- A console script's primary config (``conf/<app>.yaml``) holds its defaults
  list (the schema, the default option of each group), Hydra's settings and the
  values a dataclass cannot hold: interpolations (``runs/${now:...}``,
  ``${oc.env:DTRAIN_TOKEN,""}``). No other value.
- A group option (``conf/<group>/<option>.yaml``) or a preset
  (``conf/experiment/``) states only what that choice changes (``optim/sgd``:
  its lr, ``model/mbv3_tiny``: its size), never a value it would have anyway;
  the default option of a group the dataclass has a default for (``optim:
  adamw``, ``outer: none``, ...) changes nothing.
- Choice lists come from one registry each: search spaces from
  :data:`MODEL_CONFIGS`, data sources from :data:`DATA_CONFIGS` (each keyed by
  its config's ``space`` / ``name``), outer codecs from
  :data:`CODEC_NAMES`. The checks here, the builders
  (``dtrain.supernet.SUPERNETS``, ``dtrain.data.DATA_SOURCES``,
  ``dtrain.outer.codecs``) and the README's configuration reference (a field's
  ``metadata["choices"]``) derive from them.

``tests/test_config_defaults.py`` composes every console script's default
config and fails on a YAML value that disagrees with its dataclass default or
restates a default.

``OmegaConf.to_object(cfg)`` turns a composed config into these objects (that
is what runs the checks); :func:`model_config_from` and friends accept plain
dicts for notebook use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING

from .errors import ConfigError  # noqa: F401  (re-exported: raised here)

# the outer loop's wire codecs, by name: the one list (``dtrain.outer.codecs`` maps each to its class and
# refuses to import when the two differ)
CODEC_NAMES: Tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_choice(key: str, value: Any, choices) -> None:
    _check(value in choices, key, value, "choose one of " + ", ".join(map(str, choices)))


def _check_list(key: str, values, pred, allowed: str) -> None:
    _check(len(values) > 0, key, list(values), "must not be empty")
    for v in values:
        _check(pred(v), key, list(values), allowed)


# --------------------------------------------------------------------------- model


@dataclass
class StageConfig:
    """One stage of the MobileNetV3-style space: blocks with the same width."""

    channels: int = MISSING  # output channels before the width multiplier
    stride: int = 1  # stride of the first block of the stage
    act: str = "relu"  # relu | hswish
    se: bool = False  # squeeze-and-excite in every block

    def __post_init__(self) -> None:
        _check(self.channels > 0, "stage.channels", self.channels, "must be > 0")
        _check_choice("stage.stride", self.stride, (1, 2))
        _check_choice("stage.act", self.act, ("relu", "hswish"))


MBV3_DIMS = ("resolution", "kernel", "depth", "expand")
GPT_DIMS = ("depth", "embed", "heads", "mlp_ratio")


@dataclass
class MBV3Config:
    """Once-for-All MobileNetV3 space: elastic kernel, expand ratio, depth, resolution."""

    space: str = "mbv3"
    in_channels: int = 3
    num_classes: int = 1000
    width_mult: float = 1.0
    stem_channels: int = 16  # stem conv + the fixed first block (expand 1, kernel 3)
    stem_stride: int = 2
    stem_act: str = "hswish"
    stages: List[StageConfig] = field(default_factory=list)
    final_expand: int = 6  # 1x1 conv to final_expand x last stage width
    feature_dim: int = 1280  # feature-mix layer after global pooling
    kernel_sizes: List[int] = field(default_factory=lambda: [3, 5, 7])
    expand_ratios: List[int] = field(default_factory=lambda: [3, 4, 6])
    depths: List[int] = field(default_factory=lambda: [2, 3, 4])
    resolutions: List[int] = field(default_factory=lambda: [224])
    se_reduction: int = 4
    kernel_transform: bool = True  # OFA's learned kernel-transform matrices
    dropout: float = 0.1  # before the classifier; largest subnet only
    drop_path: float = 0.0  # stochastic depth (max rate, last block); largest subnet only
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    progressive_order: List[str] = field(default_factory=lambda: ["kernel", "depth", "expand"])

    def __post_init__(self) -> None:
        _check_choice("model.space", self.space, (MBV3Config.space,))
        _check(self.in_channels > 0, "model.in_channels", self.in_channels, "must be > 0")
        _check(self.num_classes > 1, "model.num_classes", self.num_classes, "must be > 1")
        _check(self.width_mult > 0, "model.width_mult", self.width_mult, "must be > 0")
        _check(self.stem_channels > 0, "model.stem_channels", self.stem_channels, "must be > 0")
        _check_choice("model.stem_stride", self.stem_stride, (1, 2))
        _check_choice("model.stem_act", self.stem_act, ("relu", "hswish"))
        _check(len(self.stages) > 0, "model.stages", self.stages, "must list at least one stage")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        _check(self.final_expand > 0, "model.final_expand", self.final_expand, "must be > 0")
        _check(self.feature_dim > 0, "model.feature_dim", self.feature_dim, "must be > 0")
        odd = "odd integers >= 1"
        _check_list("model.kernel_sizes", self.kernel_sizes, lambda k: k >= 1 and k % 2 == 1, odd)
        _check_list("model.expand_ratios", self.expand_ratios, lambda e: e >= 1, "integers >= 1")
        _check_list("model.depths", self.depths, lambda d: d >= 1, "integers >= 1")
        _check_list("model.resolutions", self.resolutions, lambda r: r >= 1, "integers >= 1")
        for key in ("kernel_sizes", "expand_ratios", "depths", "resolutions"):
            vals = list(getattr(self, key))
            _check(vals == sorted(set(vals)), f"model.{key}", vals, "must be strictly increasing")
        _check(self.se_reduction >= 1, "model.se_reduction", self.se_reduction, "must be >= 1")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(0 <= self.drop_path < 1, "model.drop_path", self.drop_path, "must be in [0, 1)")
        _check(0 < self.bn_momentum <= 1, "model.bn_momentum", self.bn_momentum, "must be in (0, 1]")
        _check(self.bn_eps > 0, "model.bn_eps", self.bn_eps, "must be > 0")
        _check_list(
            "model.progressive_order",
            self.progressive_order,
            lambda d: d in MBV3_DIMS,
            "dimensions among " + ", ".join(MBV3_DIMS),
        )


@dataclass
class GPTConfig:
    """Decoder-only byte-level transformer: elastic depth, width, heads, MLP ratio."""

    space: str = "gpt"
    vocab_size: int = 256
    block_size: int = 128  # context length in tokens
    depths: List[int] = field(default_factory=lambda: [2, 3, 4])
    embed_dims: List[int] = field(default_factory=lambda: [96, 128])
    heads: List[int] = field(default_factory=lambda: [2, 4])
    head_dim: int = 32  # attention width is heads x head_dim
    mlp_ratios: List[int] = field(default_factory=lambda: [2, 3, 4])
    dropout: float = 0.0  # largest subnet only
    drop_path: float = 0.0  # largest subnet only
    bias: bool = True
    ln_eps: float = 1e-5
    progressive_order: List[str] = field(default_factory=lambda: ["mlp_ratio", "heads", "depth", "embed"])

    def __post_init__(self) -> None:
        _check_choice("model.space", self.space, (GPTConfig.space,))
        _check(self.vocab_size > 1, "model.vocab_size", self.vocab_size, "must be > 1")
        _check(self.block_size > 0, "model.block_size", self.block_size, "must be > 0")
        for key in ("depths", "embed_dims", "heads", "mlp_ratios"):
            vals = list(getattr(self, key))
            _check_list(f"model.{key}", vals, lambda v: v >= 1, "integers >= 1")
            _check(vals == sorted(set(vals)), f"model.{key}", vals, "must be strictly increasing")
        _check(self.head_dim > 0, "model.head_dim", self.head_dim, "must be > 0")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(0 <= self.drop_path < 1, "model.drop_path", self.drop_path, "must be in [0, 1)")
        _check(self.ln_eps > 0, "model.ln_eps", self.ln_eps, "must be > 0")
        _check_list(
            "model.progressive_order",
            self.progressive_order,
            lambda d: d in GPT_DIMS,
            "dimensions among " + ", ".join(GPT_DIMS),
        )


# the search spaces, by name: model.space -> its config (dtrain.supernet.SUPERNETS builds each)
MODEL_CONFIGS = {cls.space: cls for cls in (MBV3Config, GPTConfig)}


# --------------------------------------------------------------------------- data


@dataclass
class DigitsConfig:
    """scikit-learn's 8x8 handwritten digits, shipped inside the package."""

    name: str = "digits"
    split_seed: int = 0  # fixes the train / val / test split
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, (DigitsConfig.name,))
        _check_fractions(self.val_fraction, self.test_fraction)


@dataclass
class TextConfig:
    """Byte-level language modelling on local text files."""

    name: str = "text"
    paths: List[str] = field(default_factory=list)  # empty: a fixed set of files of the Python stdlib
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_bytes: int = 0  # 0: the whole corpus

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, (TextConfig.name,))
        _check_fractions(self.val_fraction, self.test_fraction)
        _check(self.max_bytes >= 0, "data.max_bytes", self.max_bytes, "must be >= 0")


@dataclass
class CIFAR10Config:
    """CIFAR-10 in its binary format (data_batch_*.bin, test_batch.bin) in a local directory."""

    name: str = "cifar10"
    root: str = MISSING
    val_fraction: float = 0.1  # of the training batches
    split_seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, (CIFAR10Config.name,))
        _check_fractions(self.val_fraction, 0.0)


@dataclass
class SyntheticConfig:
    """Random tensors, for throughput benchmarks."""

    name: str = "synthetic"
    task: str = "classification"  # classification | lm
    num_samples: int = 4096
    shape: List[int] = field(default_factory=lambda: [3, 32, 32])  # per sample (lm: [sequence_length])
    num_classes: int = 10  # lm: vocabulary size
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, (SyntheticConfig.name,))
        _check_choice("data.task", self.task, ("classification", "lm"))
        _check(self.num_samples > 0, "data.num_samples", self.num_samples, "must be > 0")
        _check_list("data.shape", self.shape, lambda s: s > 0, "positive integers")
        _check(self.num_classes > 1, "data.num_classes", self.num_classes, "must be > 1")


def _check_fractions(val: float, test: float) -> None:
    _check(0 <= val < 1, "data.val_fraction", val, "must be in [0, 1)")
    _check(0 <= test < 1, "data.test_fraction", test, "must be in [0, 1)")
    _check(val + test < 1, "data.val_fraction+data.test_fraction", val + test, "must be < 1")


# the data sources, by name: data.name -> its config (dtrain.data.DATA_SOURCES loads each)
DATA_CONFIGS = {cls.name: cls for cls in (DigitsConfig, TextConfig, CIFAR10Config, SyntheticConfig)}


# --------------------------------------------------------------------------- training


@dataclass
class SandwichConfig:
    """Sandwich rule + in-place distillation (BigNAS / AttentiveNAS / AlphaNet)."""

    num_random: int = 2  # random subnets per step, besides the largest and the smallest
    distill: str = "kd"  # kd | alpha | none (none: small subnets learn from hard labels)
    temperature: float = 1.0
    hard_label_weight: float = 0.0  # small subnets: (1-w) * distillation + w * cross-entropy
    alpha_min: float = -1.0  # alpha-divergence (AlphaNet): the two alphas and the
    alpha_max: float = 1.0  # clip of the importance weights
    iw_clip: float = 5.0
    label_smoothing: float = 0.1  # largest subnet's hard-label loss
    schedule: str = "uniform"  # uniform | delayed | progressive
    delay_fraction: float = 0.5  # delayed: share of training with the largest subnet alone
    ramp_fraction: float = 0.1  # delayed: share over which small-subnet weights ramp 0 -> 1
    progressive_fractions: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])

    def __post_init__(self) -> None:
        _check(self.num_random >= 0, "sandwich.num_random", self.num_random, "must be >= 0")
        _check_choice("sandwich.distill", self.distill, ("kd", "alpha", "none"))
        _check(self.temperature > 0, "sandwich.temperature", self.temperature, "must be > 0")
        _check(
            0 <= self.hard_label_weight <= 1, "sandwich.hard_label_weight", self.hard_label_weight, "must be in [0, 1]"
        )
        _check(self.alpha_min <= self.alpha_max, "sandwich.alpha_min", self.alpha_min, "must be <= sandwich.alpha_max")
        _check(self.iw_clip > 0, "sandwich.iw_clip", self.iw_clip, "must be > 0")
        _check(0 <= self.label_smoothing < 1, "sandwich.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check_choice("sandwich.schedule", self.schedule, ("uniform", "delayed", "progressive"))
        _check(0 <= self.delay_fraction < 1, "sandwich.delay_fraction", self.delay_fraction, "must be in [0, 1)")
        _check(0 <= self.ramp_fraction <= 1, "sandwich.ramp_fraction", self.ramp_fraction, "must be in [0, 1]")
        fr = list(self.progressive_fractions)
        _check_list("sandwich.progressive_fractions", fr, lambda f: f >= 0, "non-negative numbers")
        _check(abs(sum(fr) - 1.0) < 1e-6, "sandwich.progressive_fractions", fr, "must sum to 1")


@dataclass
class OptimConfig:
    """Inner optimizer and its learning-rate schedule (linear warm-up, then cosine)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05  # decoupled, applied once per step; never on norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    warmup_steps: int = 30
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # global norm; 0 disables

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("adamw", "sgd"))
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            list(self.betas),
            "two numbers in [0, 1)",
        )
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")


@dataclass
class WandbConfig:
    project: str = "dtrain"
    entity: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_choice("logger.wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggerConfig:
    """Where records go besides ``metrics.jsonl`` (always written)."""

    name: str = "jsonl"  # jsonl | wandb
    progress: str = "auto"  # auto (bar when stdout is a terminal) | on | off
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _check_choice("logger.name", self.name, ("jsonl", "wandb"))
        _check_choice("logger.progress", self.progress, ("auto", "on", "off"))


# --------------------------------------------------------------------------- control plane


@dataclass
class TLSConfig:
    """TLS for gRPC. Servers use cert/key (+ client_ca for mutual TLS); clients use
    ca to verify the server (+ cert/key as their identity under mutual TLS: its
    ``dtrain-peer:<id>`` URI SAN is the peer id the servers bind its calls to)."""

    cert: str = ""  # PEM certificate of this endpoint (a peer: its own, from dtrain-certs clients=[<id>])
    key: str = ""  # PEM private key of this endpoint
    client_ca: str = ""  # server: require client certificates signed by this CA (mutual TLS; binds peer ids)
    ca: str = ""  # client: CA that signed the server certificate
    server_name: str = ""  # client: expected name in the server certificate (default: the host)

    def __post_init__(self) -> None:
        _check(bool(self.cert) == bool(self.key), "tls.cert/tls.key", (self.cert, self.key), "give both or neither")

    @property
    def server_enabled(self) -> bool:
        return bool(self.cert)

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca)


@dataclass
class AuthConfig:
    """The token this endpoint sends as ``authorization: Bearer <token>``; empty: no auth. Either the
    run's shared token, or this peer's (tool's) own identity token (``dtrain-certs secret=...``)."""

    token: str = ""  # the shared token, or this endpoint's own identity token (binds a peer's id); or $DTRAIN_TOKEN


@dataclass
class CoordinatorAuthConfig:
    """The coordinator's authentication: identity tokens of the cluster secret, or a shared token."""

    token: str = ""  # the shared token (ignored when secret is set); or $DTRAIN_TOKEN
    secret: str = ""  # cluster secret: accept per-peer identity tokens made from it; or $DTRAIN_SECRET


@dataclass
class CoordinatorControlConfig:
    """Whom the coordinator trusts: revoked peer ids, and how accusations are judged
    (``dtrain.control.quorum``'s docstring, "Accusations need evidence")."""

    revoked: str = ""  # revocation list: a file of peer ids (one a line, # comments), read at start and on SIGHUP
    max_unconfirmed_reports: int = 3  # an accuser with this many unconfirmed accusations in a row is excluded

    def __post_init__(self) -> None:
        _check(
            self.max_unconfirmed_reports >= 1,
            "control.max_unconfirmed_reports",
            self.max_unconfirmed_reports,
            "must be >= 1",
        )


@dataclass
class CoordinatorConfig:
    """``dtrain-coordinator``: membership leases, quorum rounds, commits."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks; the first stdout line says which
    state_dir: str = MISSING
    min_peers: int = 1
    lease_timeout_s: float = 5.0
    heartbeat_interval_s: float = 1.0  # told to peers at join
    grace_s: float = 1.0  # quorum forms this long after a round's first sync with those present
    adaptive_grace: bool = True  # ... or longer, as late as members have been arriving (up to grace_cap_s)
    grace_cap_s: float = 30.0  # (never below grace_s)
    heal_grace_s: float = 10.0  # ... or this long while a peer that healed (joined) to this round is missing
    commit_timeout_s: float = 30.0  # votes must arrive this long after the quorum formed
    max_wait_s: float = 10.0  # longest a Sync or Commit call is held before answering WAIT
    max_message_mb: float = 4.0
    history: int = 1000  # commits kept in state.json
    schema_hash: str = ""  # pin the accepted schema; empty: adopt the first joiner's
    reflection: bool = True
    gloo_store: bool = False  # serve a torch.distributed TCPStore for outer.backend=gloo peers (no auth!)
    gloo_store_port: int = 0  # 0: the OS picks
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: CoordinatorAuthConfig = field(default_factory=CoordinatorAuthConfig)
    control: CoordinatorControlConfig = field(default_factory=CoordinatorControlConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", self.port, "0..65535")
        _check(0 <= self.gloo_store_port <= 65535, "gloo_store_port", self.gloo_store_port, "0..65535")
        _check(self.min_peers >= 1, "min_peers", self.min_peers, "must be >= 1")
        _check(self.heal_grace_s >= 0, "heal_grace_s", self.heal_grace_s, "must be >= 0")
        for key in (
            "lease_timeout_s",
            "heartbeat_interval_s",
            "grace_s",
            "commit_timeout_s",
            "max_wait_s",
            "max_message_mb",
        ):
            _check(getattr(self, key) > 0, key, getattr(self, key), "must be > 0")
        _check(
            self.heartbeat_interval_s < self.lease_timeout_s,
            "heartbeat_interval_s",
            self.heartbeat_interval_s,
            "must be shorter than lease_timeout_s",
        )
        _check(self.history >= 1, "history", self.history, "must be >= 1")
        _check(self.grace_cap_s > 0, "grace_cap_s", self.grace_cap_s, "must be > 0")


@dataclass
class StatusConfig:
    """``dtrain-status``: print a coordinator's members, round, quorum and commits."""

    coordinator: str = MISSING  # host:port
    timeout_s: float = 5.0
    json: bool = False
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        _check(":" in self.coordinator, "coordinator", self.coordinator, "host:port")
        _check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")


@dataclass
class CertsConfig:
    """``dtrain-certs``: a self-signed CA, the coordinator's certificate, one certificate (and, with a
    secret, one identity token) per peer id and per tool."""

    out_dir: str = MISSING
    hosts: List[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])  # the coordinator's names
    clients: List[str] = field(default_factory=list)  # peer ids: <id>.pem / .key (URI SAN dtrain-peer:<id>)
    tools: List[str] = field(default_factory=lambda: ["status"])  # tools (dtrain-status): may call Status only
    peer_hosts: List[str] = field(default_factory=list)  # SANs of every peer certificate (its Peer service's TLS)
    secret: str = ""  # cluster secret: also write <name>.token, each one's identity token; or $DTRAIN_SECRET
    certificates: bool = True  # false: identity tokens only (needs the secret)
    days: int = 365
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.certificates:
            _check(len(self.hosts) > 0, "hosts", list(self.hosts), "name at least one host")
        _check(self.days > 0, "days", self.days, "must be > 0")


# --------------------------------------------------------------------------- outer loop (multi-peer)


@dataclass
class OuterConfig:
    """How peers combine their work: alone (none), DiLoCo rounds, or a synchronous baseline."""

    name: str = "none"  # none (one peer) | diloco | ddp (gradient all-reduce across peers every step)
    sync_every: int = 50  # H: inner steps per round (per fragment cycle with streaming)
    local_steps: str = "fixed"  # fixed (every member trains H) | balanced (H_i from measured step rates)
    min_local_steps: int = 1  # balanced: a member assigned fewer sits the round out (weight 0)
    balance_tolerance: float = 0.1  # balanced: rates within this fraction of the fastest count as equal
    weighting: str = "samples"  # samples (a member counts by the samples it trained) | uniform
    lr: float = 0.7  # outer Nesterov SGD (DiLoCo defaults)
    momentum: float = 0.9
    nesterov: bool = True
    lr_schedule: str = "constant"  # constant | cosine (over the run's rounds)
    codec: str = field(default="fp32", metadata={"choices": CODEC_NAMES})
    block_size: int = 128  # int8 / int4 scale blocks
    error_feedback: bool = False  # add what quantisation dropped to the next round's pseudo-gradient
    backend: str = "grpc"  # grpc | gloo
    streams: int = 2  # parallel gRPC streams per link
    chunk_mb: float = 1.0  # gRPC message size (at most 4)
    fragments: int = 1  # streaming DiLoCo: F fragments synced at staggered steps
    overlap_steps: int = 0  # tau: apply a round's result this many inner steps later (0: blocking)
    alpha: float = 0.5  # with overlap: local <- alpha * local + (1 - alpha) * global
    deadline_s: float = 30.0  # the outer collective's deadline: at most this ...
    deadline_min_s: float = 5.0  # ... at least this; in between, 4x the measured collective time
    sync_timeout_s: float = 600.0  # how long a peer waits for a quorum before giving up
    checkpoint_every_rounds: int = 1  # checkpoint after every K-th committed round (0: only checkpoint_every)
    durable_commit: bool = True  # diloco: write S_{r+1} to disk before voting on round r

    def __post_init__(self) -> None:
        _check_choice("outer.name", self.name, ("none", "diloco", "ddp"))
        _check(self.sync_every >= 1, "outer.sync_every", self.sync_every, "must be >= 1")
        _check_choice("outer.local_steps", self.local_steps, ("fixed", "balanced"))
        _check(
            0 <= self.min_local_steps <= self.sync_every,
            "outer.min_local_steps",
            self.min_local_steps,
            f"must be in [0, outer.sync_every={self.sync_every}]",
        )
        _check(0 <= self.balance_tolerance < 1, "outer.balance_tolerance", self.balance_tolerance, "must be in [0, 1)")
        _check_choice("outer.weighting", self.weighting, ("samples", "uniform"))
        _check(
            self.local_steps == "fixed" or (self.fragments == 1 and self.overlap_steps == 0),
            "outer.local_steps",
            self.local_steps,
            "balanced needs outer.fragments=1 and outer.overlap_steps=0 (streaming and overlap schedule "
            "rounds by a shared step count, which balanced members do not have)",
        )
        _check(self.lr > 0, "outer.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "outer.momentum", self.momentum, "must be in [0, 1)")
        _check_choice("outer.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_choice("outer.codec", self.codec, CODEC_NAMES)
        _check(self.block_size >= 1, "outer.block_size", self.block_size, "must be >= 1")
        _check_choice("outer.backend", self.backend, ("grpc", "gloo"))
        _check(self.streams >= 1, "outer.streams", self.streams, "must be >= 1")
        _check(0 < self.chunk_mb <= 4, "outer.chunk_mb", self.chunk_mb, "must be in (0, 4]")
        _check(self.fragments >= 1, "outer.fragments", self.fragments, "must be >= 1")
        _check(
            self.sync_every % self.fragments == 0,
            "outer.sync_every",
            self.sync_every,
            f"must be a multiple of outer.fragments={self.fragments}",
        )
        _check(
            0 <= self.overlap_steps < self.sync_every // self.fragments,
            "outer.overlap_steps",
            self.overlap_steps,
            f"must be in [0, sync_every/fragments={self.sync_every // self.fragments})",
        )
        _check(0 <= self.alpha <= 1, "outer.alpha", self.alpha, "must be in [0, 1]")
        _check(self.deadline_s > 0, "outer.deadline_s", self.deadline_s, "must be > 0")
        _check(self.deadline_min_s > 0, "outer.deadline_min_s", self.deadline_min_s, "must be > 0")
        _check(self.sync_timeout_s > 0, "outer.sync_timeout_s", self.sync_timeout_s, "must be > 0")
        _check(
            self.checkpoint_every_rounds >= 0,
            "outer.checkpoint_every_rounds",
            self.checkpoint_every_rounds,
            "must be >= 0",
        )


@dataclass
class ControlConfig:
    """How a peer reaches the coordinator, and where it serves its data plane."""

    coordinator: str = ""  # host:port; required when outer.name != none
    host: str = "127.0.0.1"  # data-plane bind address
    port: int = 0  # data-plane port; 0: the OS picks
    advertise: str = ""  # address other peers use to reach this one (default host:port)
    region: str = ""
    join_timeout_s: float = 120.0
    rpc_timeout_s: float = 10.0
    transfer_timeout_s: float = 300.0
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        _check(not self.coordinator or ":" in self.coordinator, "control.coordinator", self.coordinator, "host:port")
        _check(0 <= self.port <= 65535, "control.port", self.port, "0..65535")
        for key in ("join_timeout_s", "rpc_timeout_s", "transfer_timeout_s"):
            _check(getattr(self, key) > 0, f"control.{key}", getattr(self, key), "must be > 0")


# --------------------------------------------------------------------------- one peer


@dataclass
class CapacityConfig:
    """What this peer can train: the whole supernet (every limit null), or the subnets within its budgets.

    The peer derives its top arch, the largest arch within the budgets (``dtrain.supernet.capacity``), and
    trains only archs inside it: its sandwich is the top arch, the space's smallest subnet and random archs
    below the top; its outer pseudo-gradient covers the top arch's slice of the supernet."""

    max_macs: Optional[int] = None  # multiply-accumulates of one sample's forward pass
    max_params: Optional[int] = None
    max_latency_ms: Optional[float] = None  # predicted from a dtrain-latency table
    latency_table: str = ""  # the dtrain-latency JSON; required with max_latency_ms
    auto: bool = False  # balanced rounds: step down a ladder of MAC budgets rather than sit rounds out

    def __post_init__(self) -> None:
        for key in ("max_macs", "max_params", "max_latency_ms"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"capacity.{key}", v, "must be > 0, or null for the whole supernet")
        _check(
            self.max_latency_ms is None or bool(self.latency_table),
            "capacity.latency_table",
            self.latency_table,
            "give a dtrain-latency table with capacity.max_latency_ms",
        )

    @property
    def capped(self) -> bool:
        """A budget is set, or the peer may pick one (``auto``): it may train a slice."""
        return self.auto or any(v is not None for v in (self.max_macs, self.max_params, self.max_latency_ms))


@dataclass
class TrainConfig:
    """``dtrain-train``: one peer training the supernet (one process or torchrun ranks)."""

    model: Any = field(default=MISSING, metadata={"choices": tuple(MODEL_CONFIGS)})  # model.space
    data: Any = field(default=MISSING, metadata={"choices": tuple(DATA_CONFIGS)})  # data.name
    sandwich: SandwichConfig = field(default_factory=SandwichConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)  # group outer
    control: ControlConfig = field(default_factory=ControlConfig)  # group control
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    seed: int = 0
    peer_id: str = "peer0"
    run_dir: str = MISSING
    resume: bool = False  # continue from ${run_dir}/checkpoints/latest.pt
    steps: int = 300  # optimizer steps; the LR and shrinking schedules span them
    stop_at: int = 0  # stop early at this step (e.g. a time-limited allocation); 0: run all steps
    batch_size: int = 64  # samples per step for the whole peer (split across ranks)
    grad_accum: int = 1  # micro-batches per rank and step
    eval_every: int = 150  # 0: only at the end
    eval_batch_size: int = 512
    eval_archs: List[str] = field(default_factory=lambda: ["max", "min"])
    log_every: int = 20  # step records in metrics.jsonl
    checkpoint_every: int = 150  # 0: only at the end
    calib_batches: int = 8  # BN recalibration: batches of the cached calibration set
    calib_batch_size: int = 64
    bucket_mb: float = 25.0  # gradient all-reduce bucket size (several ranks)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    emulated_speed: float = 1.0  # < 1: every inner step lasts 1/speed of its natural time (sleeps; sim.speed)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config_from(self.model)
        if isinstance(self.data, dict):
            self.data = data_config_from(self.data)
        if isinstance(self.outer, dict):
            self.outer = OuterConfig(**self.outer)
        if isinstance(self.control, dict):
            self.control = ControlConfig(**self.control)
        if isinstance(self.capacity, dict):
            self.capacity = CapacityConfig(**self.capacity)
        _check(
            self.outer.name == "none" or bool(self.control.coordinator),
            "control.coordinator",
            self.control.coordinator,
            f"give the coordinator's host:port (outer.name={self.outer.name})",
        )
        _check(
            bool(self.peer_id) and all(c.isalnum() or c in "-_." for c in self.peer_id),
            "peer_id",
            self.peer_id,
            "letters, digits, '-', '_' and '.' only",
        )
        _check(self.steps > 0, "steps", self.steps, "must be > 0")
        _check(self.stop_at >= 0, "stop_at", self.stop_at, "must be >= 0")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(self.grad_accum > 0, "grad_accum", self.grad_accum, "must be > 0")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        _check(self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "must be > 0")
        _check(len(self.eval_archs) > 0, "eval_archs", self.eval_archs, "name at least one arch")
        _check(self.log_every > 0, "log_every", self.log_every, "must be > 0")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.calib_batches > 0, "calib_batches", self.calib_batches, "must be > 0")
        _check(self.calib_batch_size > 0, "calib_batch_size", self.calib_batch_size, "must be > 0")
        _check(self.bucket_mb > 0, "bucket_mb", self.bucket_mb, "must be > 0")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        _check(self.threads >= 0, "threads", self.threads, "must be >= 0")
        _check(0 < self.emulated_speed <= 1, "emulated_speed", self.emulated_speed, "must be in (0, 1]")
        _check(
            not self.capacity.auto or self.outer.local_steps == "balanced",
            "capacity.auto",
            True,
            "it needs outer.local_steps=balanced (the capacity follows the steps the coordinator assigns)",
        )
        if self.capacity.capped:  # ddp exchanges whole gradients every step; streaming and overlap: not sliced yet
            why = "a capped peer (capacity.max_*) needs "
            _check(self.outer.name != "ddp", "outer.name", self.outer.name, why + "outer.name=diloco or none")
            _check(self.outer.fragments == 1, "outer.fragments", self.outer.fragments, why + "outer.fragments=1")
            _check(self.outer.overlap_steps == 0, "outer.overlap_steps", self.outer.overlap_steps, why + "0")


# --------------------------------------------------------------------------- local simulation


@dataclass
class WanLinkConfig:
    """One emulated link: one-way latency, jitter and bandwidth (0: unlimited)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float = 0.0

    def __post_init__(self) -> None:
        for key in ("latency_ms", "jitter_ms", "bandwidth_mbit"):
            _check(getattr(self, key) >= 0, f"wan.*.{key}", getattr(self, key), "must be >= 0")


@dataclass
class WanConfig:
    """The user-space WAN emulator between simulated nodes (dtrain.sim.wan)."""

    enabled: bool = True
    latency_ms: float = 80.0  # one-way, between regions (on every link when sim.regions is empty)
    jitter_ms: float = 5.0
    bandwidth_mbit: float = 100.0  # 0: unlimited
    local: WanLinkConfig = field(  # inside one region
        default_factory=lambda: WanLinkConfig(latency_ms=1.0, bandwidth_mbit=1000.0)
    )
    pairs: Dict[str, List[float]] = field(default_factory=dict)  # "eu-us": [latency_ms, jitter_ms, bandwidth_mbit]
    reset_every_s: List[float] = field(default_factory=list)  # [X, Y]: reset a random link every X-Y s
    stall_every_s: List[float] = field(default_factory=list)  # [X, Y]: stall a random link every X-Y s
    stall_s: float = 2.0
    buffer_mb: float = 8.0  # bytes in flight per connection and direction

    def __post_init__(self) -> None:
        for key in ("latency_ms", "jitter_ms", "bandwidth_mbit"):
            _check(getattr(self, key) >= 0, f"wan.{key}", getattr(self, key), "must be >= 0")
        for key in ("reset_every_s", "stall_every_s"):
            _check_interval(f"wan.{key}", getattr(self, key))
        _check(self.stall_s > 0, "wan.stall_s", self.stall_s, "must be > 0")
        _check(self.buffer_mb > 0, "wan.buffer_mb", self.buffer_mb, "must be > 0")
        for name, link in self.pairs.items():
            _check(name.count("-") == 1 and all(name.split("-")), "wan.pairs", name, "keys are region pairs like eu-us")
            _check(
                len(link) == 3 and all(x >= 0 for x in link),
                f"wan.pairs.{name}",
                list(link),
                "[latency_ms, jitter_ms, bandwidth_mbit], each >= 0",
            )


def _check_interval(key: str, v) -> None:
    _check(
        len(v) in (0, 2) and all(x > 0 for x in v) and (not v or v[0] <= v[1]),
        key,
        list(v),
        "[] (never) or [X, Y] with 0 < X <= Y seconds",
    )


@dataclass
class ChaosConfig:
    """A seeded fault schedule; times are seconds after the first round commits."""

    seed: int = 0
    kill_every_s: List[float] = field(default_factory=list)  # [X, Y]: a random peer every X-Y s
    kill_at_s: List[float] = field(default_factory=list)  # and/or at these times
    signal: str = "KILL"  # KILL | TERM | STOP
    restart_after_s: Optional[float] = None  # restart (KILL, TERM) or resume (STOP) it after this; null: never
    join_at_s: List[float] = field(default_factory=list)  # a new peer joins at each of these times
    coordinator_restart_at_s: List[float] = field(default_factory=list)  # SIGKILL + restart the coordinator
    coordinator_down_s: float = 1.0
    cluster_restart_at_s: List[float] = field(default_factory=list)  # SIGKILL everything, restart from checkpoints
    min_alive: int = 1  # never take the live peers below this
    slowdown_at_s: List[float] = field(default_factory=list)  # a seeded random peer runs at chaos.slowdown from then
    slowdown: float = 0.25  # its speed from then on: SIGSTOP/SIGCONT duty cycle, (1 - s) of every 50 ms stopped

    def __post_init__(self) -> None:
        _check_interval("chaos.kill_every_s", self.kill_every_s)
        _check_choice("chaos.signal", self.signal, ("KILL", "TERM", "STOP"))
        _check(
            self.restart_after_s is None or self.restart_after_s >= 0,
            "chaos.restart_after_s",
            self.restart_after_s,
            "null or >= 0",
        )
        for key in ("kill_at_s", "join_at_s", "coordinator_restart_at_s", "cluster_restart_at_s", "slowdown_at_s"):
            _check(
                all(x >= 0 for x in getattr(self, key)), f"chaos.{key}", list(getattr(self, key)), "times >= 0 seconds"
            )
        _check(self.coordinator_down_s >= 0, "chaos.coordinator_down_s", self.coordinator_down_s, "must be >= 0")
        _check(self.min_alive >= 1, "chaos.min_alive", self.min_alive, "must be >= 1")
        _check(0 < self.slowdown < 1, "chaos.slowdown", self.slowdown, "must be in (0, 1): the slowed peer's speed")


@dataclass
class SimSizeConfig:
    """How many peers, how long, and what each peer runs."""

    peers: int = 3
    rounds: int = 15  # committed rounds to run to
    inner_steps: int = 10  # H: every peer's outer.sync_every
    nproc_per_peer: List[int] = field(default_factory=lambda: [1])  # ranks of peer i: entry i mod len
    regions: List[str] = field(default_factory=lambda: ["eu", "us"])  # region of peer i: entry i mod len
    # < 1: the peer's every inner step lasts 1/speed of its natural time (dtrain-train's emulated_speed)
    speed: List[float] = field(default_factory=lambda: [1.0])  # emulated speed of peer i: entry i mod len, in (0, 1]
    capacity: List[Any] = field(default_factory=lambda: [None])  # peer i: entry i mod len, null or {max_params: N}
    coordinator_region: str = ""  # default: the first region
    peer: str = "train"  # train (dtrain-train) | model_free (dtrain.sim.model_free_peer, tests)
    peer_args: List[str] = field(  # extra overrides for every dtrain-train
        default_factory=lambda: [
            "batch_size=32",
            "eval_every=0",
            "log_every=5",
            "checkpoint_every=0",
            "calib_batches=4",
        ]
    )
    # peer i's own extra overrides (entry i mod len, after peer_args), e.g. [[], [], [], ["optim.lr=0.3"]]
    peer_overrides: List[Any] = field(default_factory=lambda: [[]])
    coordinator_args: List[str] = field(default_factory=list)  # extra overrides for dtrain-coordinator
    numel: int = 100000  # model_free: parameters
    step_s: float = 0.2  # model_free: seconds of "inner steps" per round
    duration_s: float = 0.0  # > 0: after this long every peer is sent SIGTERM and the run is judged (soak)
    finish_grace_s: float = 30.0  # after the last round, peers still running get this long, then SIGTERM
    timeout_s: float = 900.0  # the whole run fails after this

    def __post_init__(self) -> None:
        _check(self.peers >= 1, "sim.peers", self.peers, "must be >= 1")
        _check(self.rounds >= 1, "sim.rounds", self.rounds, "must be >= 1")
        _check(self.inner_steps >= 1, "sim.inner_steps", self.inner_steps, "must be >= 1")
        _check(
            len(self.nproc_per_peer) > 0 and all(n >= 1 for n in self.nproc_per_peer),
            "sim.nproc_per_peer",
            list(self.nproc_per_peer),
            "a list of positive rank counts, e.g. [2, 1]",
        )
        _check_list("sim.speed", self.speed, lambda v: 0 < v <= 1, "a list of speeds in (0, 1], e.g. [1.0, 0.5]")
        _check(len(self.capacity) > 0, "sim.capacity", list(self.capacity), "a list of capacities, e.g. [null]")
        for i, entry in enumerate(self.capacity):
            if entry is not None:
                _check(isinstance(entry, dict), f"sim.capacity[{i}]", entry, "null or {max_macs: N, max_params: N}")
                try:
                    CapacityConfig(**dict(entry))
                except ConfigError as e:
                    raise ConfigError(str(e).replace("capacity.", f"sim.capacity[{i}].", 1)) from None
                except TypeError:
                    keys = ", ".join(f.name for f in dataclasses.fields(CapacityConfig))
                    raise ConfigError(f"sim.capacity[{i}]={dict(entry)!r} is not allowed: keys are {keys}") from None
        _check(
            len(self.peer_overrides) > 0
            and all(
                isinstance(e, (list, tuple)) and all(isinstance(a, str) and "=" in a for a in e)
                for e in self.peer_overrides
            ),
            "sim.peer_overrides",
            list(self.peer_overrides),
            'a list of override lists, one per peer (entry i mod len), e.g. [[], ["optim.lr=0.3"]]',
        )
        _check_choice("sim.peer", self.peer, ("train", "model_free"))
        _check(self.numel >= 1, "sim.numel", self.numel, "must be >= 1")
        _check(self.step_s >= 0, "sim.step_s", self.step_s, "must be >= 0")
        _check(self.timeout_s > 0, "sim.timeout_s", self.timeout_s, "must be > 0")
        _check(self.duration_s >= 0, "sim.duration_s", self.duration_s, "must be >= 0 (0: run to sim.rounds)")
        _check(self.finish_grace_s >= 0, "sim.finish_grace_s", self.finish_grace_s, "must be >= 0")


@dataclass
class SimConfig:
    """``dtrain-sim``: a coordinator and N peers on loopback over an emulated WAN, with chaos."""

    run_dir: str = MISSING
    resume: bool = False  # start again on run_dir (whole-cluster restart)
    sim: SimSizeConfig = field(default_factory=SimSizeConfig)
    wan: WanConfig = field(default_factory=WanConfig)
    # `make demo`: one peer SIGKILLed 15 s after the first commit, a new one joining 10 s later
    chaos: ChaosConfig = field(default_factory=lambda: ChaosConfig(kill_at_s=[15.0], join_at_s=[25.0]))


# --------------------------------------------------------------------------- search, export, latency, report


@dataclass
class EvolutionConfig:
    """Evolutionary search: a population, parents chosen by Pareto rank, mutation and crossover."""

    population: int = 24  # candidates evaluated per generation
    generations: int = 8
    parents: int = 8  # best candidates (by Pareto rank on accuracy x cost, then accuracy) kept as parents
    mutate_prob: float = 0.25  # per gene, when a child is made by mutation
    crossover_fraction: float = 0.5  # share of children made by crossover of two parents (the rest: mutation)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.population >= 2, "evolution.population", self.population, "must be >= 2")
        _check(self.generations >= 1, "evolution.generations", self.generations, "must be >= 1")
        _check(
            1 <= self.parents <= self.population,
            "evolution.parents",
            self.parents,
            f"must be between 1 and evolution.population={self.population}",
        )
        _check(0.0 < self.mutate_prob <= 1.0, "evolution.mutate_prob", self.mutate_prob, "must be in (0, 1]")
        _check(
            0.0 <= self.crossover_fraction <= 1.0,
            "evolution.crossover_fraction",
            self.crossover_fraction,
            "must be in [0, 1]",
        )


@dataclass
class ConstraintsConfig:
    """Budgets a subnet must meet; null: no limit."""

    max_macs: Optional[int] = None  # multiply-accumulates of one sample's forward pass
    max_params: Optional[int] = None
    max_latency_ms: Optional[float] = None  # predicted from a dtrain-latency table
    latency_table: str = ""  # the dtrain-latency JSON; required with max_latency_ms, else optional (adds latency)

    def __post_init__(self) -> None:
        for key in ("max_macs", "max_params", "max_latency_ms"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"constraints.{key}", v, "must be > 0, or null for no limit")
        _check(
            self.max_latency_ms is None or bool(self.latency_table),
            "constraints.latency_table",
            self.latency_table,
            "must name a dtrain-latency table when constraints.max_latency_ms is set",
        )


@dataclass
class PredictorConfig:
    """Accuracy predictor: an MLP on the arch encoding, trained on the evaluated candidates."""

    enabled: bool = False
    hidden: int = 64
    epochs: int = 300
    lr: float = 0.01
    warmup: int = 24  # evaluated candidates before the predictor starts choosing
    oversample: int = 4  # children proposed per candidate evaluated; the predictor keeps the best
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.hidden >= 1, "predictor.hidden", self.hidden, "must be >= 1")
        _check(self.epochs >= 1, "predictor.epochs", self.epochs, "must be >= 1")
        _check(self.lr > 0, "predictor.lr", self.lr, "must be > 0")
        _check(self.warmup >= 4, "predictor.warmup", self.warmup, "must be >= 4")
        _check(self.oversample >= 1, "predictor.oversample", self.oversample, "must be >= 1")


@dataclass
class SubnetEvalConfig:
    """How a candidate subnet is scored: BN recalibration, then one split."""

    split: str = "val"  # val | test
    calib_batches: int = 8
    calib_batch_size: int = 64
    batch_size: int = 512

    def __post_init__(self) -> None:
        _check_choice("eval.split", self.split, ("val", "test"))
        for key in ("calib_batches", "calib_batch_size", "batch_size"):
            _check(getattr(self, key) >= 1, f"eval.{key}", getattr(self, key), "must be >= 1")


@dataclass
class SearchConfig:
    """``dtrain-search``: the best subnets of a trained supernet under budgets."""

    checkpoint: str = MISSING  # a checkpoint .pt, a dtrain-train run dir or a dtrain-sim run dir
    out_dir: str = MISSING
    data: Any = None  # null: the data config the checkpoint's run used (its config.json)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    eval: SubnetEvalConfig = field(default_factory=SubnetEvalConfig)
    show: int = 10  # rows of the printed table
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        _check(self.show >= 0, "show", self.show, "must be >= 0")


@dataclass
class ExportConfig:
    """``dtrain-export``: one subnet as a standalone model."""

    checkpoint: str = MISSING  # as for dtrain-search
    out_dir: str = MISSING
    arch: str = ""  # a JSON file holding an arch (or {"arch": {...}})
    pareto: str = ""  # ... or a dtrain-search pareto.json and the index of the point to export
    index: Optional[int] = None  # negative counts from the end: -1 is the most accurate point
    weights: str = "safetensors"  # safetensors | torch (weights-only torch.save)
    torchscript: bool = True
    onnx: str = "auto"  # auto (when the onnx package is installed) | on | off
    data: Any = None  # null: the checkpoint run's data config
    eval: SubnetEvalConfig = field(default_factory=lambda: SubnetEvalConfig(split="test"))
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        _check(
            bool(self.arch) != bool(self.pareto),
            "arch",
            self.arch,
            "give exactly one of arch=FILE.json or pareto=pareto.json index=K",
        )
        _check(
            not self.pareto or self.index is not None,
            "index",
            self.index,
            "must name a point of the pareto.json when pareto= is given (0 the cheapest, -1 the most accurate)",
        )
        _check_choice("weights", self.weights, ("safetensors", "torch"))
        _check_choice("onnx", self.onnx, ("auto", "on", "off"))


@dataclass
class LatencyConfig:
    """``dtrain-latency``: a latency table of a space's blocks on this machine."""

    model: Any = MISSING  # the model group (mbv3_tiny, ...), unless checkpoint= is given
    checkpoint: str = ""  # take the model config from this checkpoint or run dir instead
    out: str = "latency.json"
    device: str = "cpu"  # cpu | cuda | cuda:N
    batch_size: int = 1
    warmup: int = 5
    repeats: int = 30  # the median of this many timed runs per entry
    check: int = 4  # whole subnets (largest, smallest, random) timed against the table's prediction; 0: none
    threads: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "repeats"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        _check(self.warmup >= 0, "warmup", self.warmup, "must be >= 0")
        _check(self.check >= 0, "check", self.check, "must be >= 0")


@dataclass
class ReportConfig:
    """``dtrain-report``: plots and report.md of a run directory."""

    run_dir: str = MISSING  # a dtrain-train run dir or a dtrain-sim run dir
    out_dir: str = ""  # default: ${run_dir}/report
    dpi: int = 110

    def __post_init__(self) -> None:
        _check(self.dpi >= 30, "dpi", self.dpi, "must be >= 30")


# --------------------------------------------------------------------------- helpers


def _from_dict(cls, d: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}.{unknown[0]} is not a known key: allowed keys are " + ", ".join(sorted(names)))
    return cls(**d)


def model_config_from(cfg: Any):
    """A model config dataclass from a dataclass, a dict or an OmegaConf node."""
    if dataclasses.is_dataclass(cfg):
        return cfg
    d = _plain(cfg)
    space = d.get("space")
    if space not in MODEL_CONFIGS:
        raise ConfigError(f"model.space={space!r} is not allowed: choose one of " + ", ".join(MODEL_CONFIGS))
    return _from_dict(MODEL_CONFIGS[space], d, "model")


def data_config_from(cfg: Any):
    """A data config dataclass from a dataclass, a dict or an OmegaConf node."""
    if dataclasses.is_dataclass(cfg):
        return cfg
    d = _plain(cfg)
    name = d.get("name")
    if name not in DATA_CONFIGS:
        raise ConfigError(f"data.name={name!r} is not allowed: choose one of " + ", ".join(DATA_CONFIGS))
    return _from_dict(DATA_CONFIGS[name], d, "data")


def _plain(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return dict(cfg)
    raise ConfigError(f"expected a config dict, got {type(cfg).__name__}")


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (under the ``schema`` group)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    for name, cls in MODEL_CONFIGS.items():
        cs.store(group="schema/model", name=name, node=cls)
    for name, cls in DATA_CONFIGS.items():
        cs.store(group="schema/data", name=name, node=cls)
    cs.store(group="schema/sandwich", name="sandwich", node=SandwichConfig)
    cs.store(group="schema/optim", name="optim", node=OptimConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
    cs.store(group="schema", name="coordinator", node=CoordinatorConfig)
    cs.store(group="schema/outer", name="outer", node=OuterConfig)
    cs.store(group="schema/control", name="control", node=ControlConfig)
    cs.store(group="schema/capacity", name="capacity", node=CapacityConfig)
    cs.store(group="schema", name="status", node=StatusConfig)
    cs.store(group="schema", name="certs", node=CertsConfig)
    cs.store(group="schema", name="sim", node=SimConfig)
    cs.store(group="schema", name="search", node=SearchConfig)
    cs.store(group="schema", name="export", node=ExportConfig)
    cs.store(group="schema", name="latency", node=LatencyConfig)
    cs.store(group="schema", name="report", node=ReportConfig)
