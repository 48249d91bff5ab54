"""Typed run configuration, loaded from TOML, overridable with ``--set section.key=value``.

Every section is a dataclass whose fields carry a docstring; validation lives next to the field it checks and raises
``ConfigError`` (a ``ValueError``) naming the field as the user writes it in TOML and what would be valid. All
validation runs in the launcher, before any worker process starts.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from elastic.errors import ConfigError
from elastic.fault_plan import parse_plan

BUNDLED_CONFIGS_PACKAGE = "configs"
"""The package whose ``*.toml`` files ship with ecpt: the repository's ``configs/`` folder."""
DEFAULT_CONFIG_NAME = "tiny-cpu"
"""The bundled config ``ecpt train`` and the launch backends use without ``--config``."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def bundled_config_names() -> list[str]:
    """Names of the configs that ship with ecpt, e.g. ['cpt-experiment', 'cpt-mini', 'tiny-cpu', ...]."""
    files = resources.files(BUNDLED_CONFIGS_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def bundled_config(name: str) -> Traversable:
    """The bundled config called ``name``; works the same from a source checkout and from an installed wheel."""
    names = bundled_config_names()
    _require(name in names, f"no bundled config named {name!r}; bundled configs: {', '.join(names)}")
    return resources.files(BUNDLED_CONFIGS_PACKAGE) / f"{name}.toml"


def resolve_config(config: str | Path | None, default: str = DEFAULT_CONFIG_NAME) -> Path | Traversable:
    """What ``--config`` names: a file that exists, else a bundled config by name ('tiny-cpu', 'tiny-cpu.toml' or
    'configs/tiny-cpu.toml', as the README writes it, from any directory); None means the bundled ``default``."""
    if not config:
        return bundled_config(default)
    path = Path(config)
    if path.is_file():
        return path
    if path.parent in (Path(), Path(BUNDLED_CONFIGS_PACKAGE)) and path.suffix in ("", ".toml"):
        name = path.name.removesuffix(".toml")
        if name in bundled_config_names():
            return bundled_config(name)
    raise ConfigError(
        f"config file {config} does not exist and is not the name of a bundled config; pass --config "
        f"with an existing TOML file or one of: {', '.join(bundled_config_names())}"
    )


@dataclass
class ModelConfig:
    dim: int = 256
    """Hidden size of the decoder (hidden_size in Hugging Face Llama terms)."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Attention heads; dim must be divisible by n_heads."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means n_heads (plain multi-head attention)."""
    ffn_dim: int = 0
    """SwiGLU inner size; 0 picks the Llama rule 8/3*dim rounded up to a multiple of 64."""
    vocab_size: int = 256
    """Vocabulary size; 256 for the byte-level tokenizer of the embedded corpus."""
    seq_len: int = 128
    """Tokens per training sequence (context length)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection weights."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    init: str = ""
    """Start from a Hugging Face model: "hf:/path/to/dir" written by save_pretrained (config.json + safetensors).
    Its config.json decides the architecture and sizes (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size,
    rope_theta, norm_eps, tie_embeddings are overwritten from it; seq_len stays yours); its weights are the state at
    step 0 (a resumed run restores its own checkpoint instead). Empty: ecpt's own byte-level Llama-style model."""

    def validate(self) -> None:
        if self.init:
            self._adopt_init_architecture()
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "seq_len"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.dim % self.n_heads == 0, f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
        )
        _require(
            (self.dim // self.n_heads) % 2 == 0,
            f"model.dim / model.n_heads must be even for rotary embeddings, got {self.dim // self.n_heads}",
        )
        kv = self.kv_heads
        _require(
            kv >= 1 and self.n_heads % kv == 0,
            f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads}); 0 means n_heads",
        )
        _require(self.ffn_dim >= 0, f"model.ffn_dim must be >= 0 (0 = automatic), got {self.ffn_dim}")

    def _adopt_init_architecture(self) -> None:
        from elastic.hf_checkpoint import architecture_fields, init_directory, inspect_directory

        hf = inspect_directory(init_directory(self.init))
        for name, value in architecture_fields(hf.config).items():
            setattr(self, name, value)
        max_positions = hf.config.get("max_position_embeddings")
        _require(
            max_positions is None or self.seq_len <= max_positions,
            f"model.seq_len ({self.seq_len}) exceeds max_position_embeddings ({max_positions}) of {self.init}; "
            f"lower model.seq_len",
        )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 64 * -(-(8 * self.dim // 3) // 64)


@dataclass
class PhaseConfig:
    name: str = ""
    """Label used in logs, metrics and evaluation tables."""
    tokens: int = 0
    """Token budget of the phase; it becomes ceil(tokens / (global_batch * seq_len)) optimizer steps."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Domain name -> sampling weight. Replay of earlier domains is just a small weight on them."""

    def validate(self, where: str, domains: list[str]) -> None:
        _require(bool(self.name), f"{where}.name must be set")
        _require(self.tokens > 0, f"{where}.tokens must be > 0, got {self.tokens}")
        _require(bool(self.mixture), f"{where}.mixture must name at least one domain from {domains}")
        for domain, weight in self.mixture.items():
            _require(
                domain in domains,
                f"{where}.mixture names unknown domain {domain!r}; known domains: {domains} (add it to data.sources)",
            )
            _require(weight >= 0, f"{where}.mixture.{domain} must be >= 0, got {weight}")
        _require(sum(self.mixture.values()) > 0, f"{where}.mixture weights must not all be 0")


@dataclass
class DataConfig:
    sources: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {"prose": ["builtin:prose"], "python": ["builtin:python"], "c": ["builtin:c"]}
    )
    """Domain name -> list of sources: 'builtin:prose|python|c' (the embedded corpus), or paths and globs of text
    files (one document per file), JSONL files (.jsonl, one document per line in data.field), parquet files
    (.parquet, one document per row of the string column data.field) or pre-tokenized token arrays (.npy of
    uint8/uint16/uint32, or a zarr array directory ending in .zarr). A source matching no file, or holding only
    empty documents, is an error."""
    tokenizer: str = "auto"
    """'bytes' (byte-level, vocabulary 256), 'hf:DIR' (the fast tokenizer, tokenizer.json, of a directory written
    by save_pretrained; never downloaded), or 'auto': model.init's directory when it is given, else bytes. The
    model's vocab_size must cover the tokenizer's ids."""
    # From here on the class body spells dataclasses.field out: the attribute below shadows the name `field`.
    field: str = "text"
    """The JSONL field or parquet column that holds each document's text."""
    tokenize_workers: int = 0
    """Processes that tokenize text with an 'hf:' tokenizer the first time (0 = one per CPU core)."""
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)
    """Data phases in training order (domain shifts)."""
    cache_dir: str = "~/.cache/ecpt"
    """Where the tokenized corpus is cached as flat token arrays (keyed by the tokenizer and the sources)."""
    val_fraction: float = 0.05
    """Fraction of each domain's documents held out for validation (chosen by a hash of the document name)."""
    seed: int = 1234
    """Seed of the data order: each domain's windows are consumed in seeded permutations (one per epoch) and the
    mixture's domain order is seeded per phase; sample i of phase p depends only on (seed, p, i) and the config."""

    def validate(self, model: "ModelConfig | None" = None) -> None:
        from elastic.data_sources import check_source
        from elastic.text_tokenizer import resolve_spec, tokenizer_info

        _require(bool(self.sources), "data.sources must name at least one domain")
        for domain, items in self.sources.items():
            _require(
                isinstance(items, list) and bool(items) and all(isinstance(s, str) for s in items),
                f"data.sources.{domain} must be a non-empty list of paths, globs or 'builtin:NAME'",
            )
            for src in items:
                check_source(src, f"data.sources.{domain}", self.field)
        _require(bool(self.field), "data.field must name the JSONL field / parquet column of the text, e.g. 'text'")
        _require(self.tokenize_workers >= 0, f"data.tokenize_workers must be >= 0, got {self.tokenize_workers}")
        _require(0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _require(bool(self.phases), "data.phases must list at least one phase ([[data.phases]] in TOML)")
        for i, phase in enumerate(self.phases):
            phase.validate(f"data.phases[{i}]", list(self.sources))
        spec = resolve_spec(self.tokenizer, getattr(model, "init", None))
        auto = self.tokenizer == "auto" and spec != "bytes"
        info = tokenizer_info(spec, "data.tokenizer ('auto': model.init's tokenizer)" if auto else "data.tokenizer")
        if model is not None:
            _require(
                model.vocab_size >= info.id_bound,
                f"model.vocab_size ({model.vocab_size}) is smaller than the vocabulary of data.tokenizer "
                f"({info.spec}: token ids up to {info.id_bound - 1}); raise model.vocab_size to at least "
                f"{info.id_bound} or use the model's own tokenizer",
            )


@dataclass
class OptimConfig:
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""

    def validate(self) -> None:
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


SCHEDULE_KINDS = ("constant", "cosine", "wsd", "infinite")
DECAY_SHAPES = ("cosine", "linear", "inverse_sqrt")


@dataclass
class ScheduleConfig:
    kind: str = "infinite"
    """One of constant, cosine (re-warmed at every phase start), wsd (warmup-stable-decay), infinite."""
    lr_max: float = 3e-3
    """Peak learning rate reached at the end of warmup."""
    lr_min: float = 3e-4
    """Floor: end of every cosine cycle, end of the WSD decay and of the infinite schedule's anneal."""
    warmup_steps: int = 10
    """Linear warmup length. For cosine it is repeated at every phase start (re-warming from lr_min)."""
    lr_const: float = 1.65e-3
    """infinite: the constant level reached after the cooldown and kept across data phases."""
    cooldown_steps: int = 50
    """infinite: steps after warmup spent cooling from lr_max down to lr_const."""
    cooldown_shape: str = "cosine"
    """infinite: cooldown shape g(u): cosine, linear or inverse_sqrt."""
    anneal_steps: int = 0
    """infinite: final exponential anneal lr_const -> lr_min over the last N steps of the run (0 = none)."""
    decay_steps: int = 0
    """wsd: length of the final decay lr_max -> lr_min; 0 means 10% of the run."""
    decay_shape: str = "linear"
    """wsd: decay shape: linear, cosine or inverse_sqrt."""

    def validate(self) -> None:
        _require(self.kind in SCHEDULE_KINDS, f"schedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        _require(self.lr_max > 0, f"schedule.lr_max must be > 0, got {self.lr_max}")
        _require(0 <= self.lr_min <= self.lr_max, f"schedule.lr_min must be in [0, lr_max], got {self.lr_min}")
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("cooldown_steps", "anneal_steps", "decay_steps"):
            _require(getattr(self, name) >= 0, f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        _require(
            self.cooldown_shape in DECAY_SHAPES,
            f"schedule.cooldown_shape must be one of {DECAY_SHAPES}, got {self.cooldown_shape!r}",
        )
        _require(
            self.decay_shape in DECAY_SHAPES,
            f"schedule.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}",
        )
        if self.kind == "infinite":
            _require(
                self.lr_min <= self.lr_const <= self.lr_max,
                f"schedule.lr_const ({self.lr_const}) must lie in [lr_min, lr_max]",
            )
            _require(
                self.lr_min > 0 or self.anneal_steps == 0,
                "schedule.lr_min must be > 0 for the infinite schedule's exponential anneal",
            )


ENGINES = ("ddp", "deepspeed")
FAULT_TOLERANCE_MODES = ("restart", "replicas")


@dataclass
class TrainConfig:
    global_batch: int = 16
    """Sequences per optimizer step, identical for every world size (the global-batch invariant)."""
    micro_batch: int = 8
    """Largest number of sequences one rank runs through forward/backward at once (gradient accumulation above)."""
    seed: int = 0
    """Seed of the model initialisation and of every training-time random draw."""
    eval_interval: int = 50
    """Steps between per-domain validation evaluations (also run at every phase end); 0 = phase ends only."""
    eval_batches: int = 4
    """Validation sequences per domain = eval_batches * micro_batch."""
    log_interval: int = 1
    """Steps between metric log lines in metrics.jsonl."""
    run_dir: str = "runs/tiny-cpu"
    """Where metrics.jsonl, the resolved config and local checkpoints go."""
    max_steps: int = 0
    """Stop after this many steps (0 = run all phases). Useful for smoke tests."""
    threads_per_worker: int = 0
    """torch intra-op threads per worker; 0 = cores / local workers (at least 1)."""
    engine: str = "ddp"
    """Training engine: ddp (plain torch DDP) or deepspeed (ZeRO stage from the [deepspeed] section)."""
    deterministic: bool = True
    """Use deterministic kernels so same-seed runs are bit-identical on CPU."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    hang_timeout: float = 0.0
    """Seconds without a completed step after which a worker exits so the agent restarts the group (0 = off)."""
    log_samples: bool = False
    """Each rank appends the global sample ids it trained on to <run_dir>/samples/rank-<r>.jsonl (cursor audits)."""

    def validate(self) -> None:
        _require(self.global_batch >= 1, f"train.global_batch must be >= 1, got {self.global_batch}")
        _require(self.micro_batch >= 1, f"train.micro_batch must be >= 1, got {self.micro_batch}")
        _require(self.eval_interval >= 0, f"train.eval_interval must be >= 0, got {self.eval_interval}")
        _require(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        _require(self.log_interval >= 1, f"train.log_interval must be >= 1, got {self.log_interval}")
        _require(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _require(self.hang_timeout >= 0, f"train.hang_timeout must be >= 0 (0 = off), got {self.hang_timeout}")
        _require(self.engine in ENGINES, f"train.engine must be one of {ENGINES}, got {self.engine!r}")


@dataclass
class DeepSpeedConfig:
    """Used when train.engine = "deepspeed". The DeepSpeed JSON is generated from the rest of this config (batch
    sizes from the global-batch invariant, AdamW from [optim], clipping) so the two can never disagree silently."""

    zero_stage: int = 2
    """ZeRO stage: 0 plain data parallel, 1 partitions optimizer states and fp32 master weights, 2 also gradients,
    3 also the parameters themselves."""
    config_json: str = ""
    """Path of a DeepSpeed JSON merged into the generated one (bucket sizes, overlap_comm, stage-3 thresholds, ...).
    Keys that contradict this config (batch sizes, optimizer betas/eps/weight decay, gradient_clipping, ZeRO stage,
    bf16) are errors that name both fields; an "optimizer" or "scheduler" section is refused because ecpt owns AdamW
    and the learning-rate schedule."""
    bf16: bool = False
    """bf16 mixed precision with fp32 master weights (GPUs; ZeRO stage >= 1). CPU runs stay fp32."""

    def validate(self, train: "TrainConfig | None" = None, optim: "OptimConfig | None" = None) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(
            not (self.bf16 and self.zero_stage == 0),
            "deepspeed.bf16 needs deepspeed.zero_stage >= 1 (stage 0 bf16 keeps its fp32 masters in a "
            "separate optimizer wrapper that ecpt checkpoints do not map); raise zero_stage or set bf16 = false",
        )
        if self.config_json:
            check_deepspeed_json(self.user_json(), self, train or TrainConfig(), optim or OptimConfig())

    def user_json(self) -> dict:
        """The user's DeepSpeed JSON as a dict ({} when config_json is empty)."""
        if not self.config_json:
            return {}
        path = Path(self.config_json).expanduser()
        _require(path.is_file(), f"deepspeed.config_json: {path} does not exist")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config_json: {path} is not valid JSON: {exc}") from exc
        _require(isinstance(raw, dict), f"deepspeed.config_json: {path} must hold a JSON object")
        return raw


def check_deepspeed_json(user: dict, ds: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig) -> None:
    """Raise ConfigError naming both fields when the user's DeepSpeed JSON contradicts ecpt's config."""
    where = f"deepspeed.config_json ({ds.config_json})"

    def same(key: str, theirs, ours, our_field: str) -> None:
        _require(
            theirs == ours
            or (isinstance(theirs, (int, float)) and isinstance(ours, (int, float)) and float(theirs) == float(ours)),
            f"{where} sets {key} = {theirs!r} but {our_field} = {ours!r}; remove {key} from the JSON "
            f"(ecpt generates it) or change {our_field}",
        )

    if "train_batch_size" in user:
        same("train_batch_size", user["train_batch_size"], train.global_batch, "train.global_batch")
    if "train_micro_batch_size_per_gpu" in user:
        same(
            "train_micro_batch_size_per_gpu",
            user["train_micro_batch_size_per_gpu"],
            train.micro_batch,
            "train.micro_batch",
        )
    _require(
        "gradient_accumulation_steps" not in user,
        f"{where} sets gradient_accumulation_steps but ecpt derives it from train.global_batch and "
        f"train.micro_batch for each world size; remove it and set train.micro_batch instead",
    )
    if "gradient_clipping" in user:
        same("gradient_clipping", user["gradient_clipping"], optim.grad_clip, "optim.grad_clip")
    params = (user.get("optimizer") or {}).get("params", {})
    if "betas" in params:
        same("optimizer.params.betas", list(params["betas"]), [optim.beta1, optim.beta2], "[optim.beta1, optim.beta2]")
    for key, ours in (("eps", "eps"), ("weight_decay", "weight_decay")):
        if key in params:
            same(f"optimizer.params.{key}", params[key], getattr(optim, ours), f"optim.{ours}")
    _require(
        "optimizer" not in user,
        f"{where} has an optimizer section; ecpt passes its own AdamW (optim.* with decay on matrices only): "
        f"remove the section and set optim.beta1/beta2/eps/weight_decay",
    )
    _require(
        "scheduler" not in user,
        f"{where} has a scheduler section; ecpt sets the learning rate every step from [schedule]: remove it",
    )
    zero = user.get("zero_optimization") or {}
    if "stage" in zero:
        same("zero_optimization.stage", zero["stage"], ds.zero_stage, "deepspeed.zero_stage")
    _require(
        not (user.get("fp16") or {}).get("enabled", False),
        f"{where} enables fp16; ecpt supports fp32 and bf16 (deepspeed.bf16), which need no loss scaling",
    )
    if "enabled" in (user.get("bf16") or {}):
        same("bf16.enabled", bool(user["bf16"]["enabled"]), ds.bf16, "deepspeed.bf16")


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Root of L1 (local disk). Relative paths resolve against train.run_dir."""
    interval: int = 0
    """Steps between L1 checkpoints; 0 disables checkpointing entirely."""
    keep_last: int = 3
    """Committed checkpoints kept per level; older ones are deleted only after a newer one commits."""
    l1_node_local: bool = False
    """True when checkpoint.dir is a node's own disk: every node then writes a complete copy under dir/<node id>.
    False (default) when it is shared by all ranks (e.g. the run directory on shared storage)."""
    l0_interval: int = 0
    """Steps between in-memory (L0, /dev/shm) snapshots; 0 disables L0."""
    l0_dir: str = "/dev/shm/ecpt"
    """Root of L0 (node memory); each run identity gets <run key>-<run id>/<node id> under it."""
    l0_keep_last: int = 2
    """Committed L0 checkpoints kept."""
    l0_stale_after_s: float = 86400.0
    """Memory checkpoints whose owner's liveness cannot be checked (no owner record, another host or pid namespace)
    are freed by the next run on the node once unchanged this long; see elastic/memory_levels.py."""
    l2_dir: str = ""
    """Root of L2 (shared or persistent storage); empty disables L2. A path (a mounted shared file system) or an
    object-store URL `s3://bucket/prefix`: credentials and region come from the usual AWS environment variables
    and config files (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...). L2 is the only level that may be a URL: L0 is
    node memory and L1 is written from the staging buffers on the save's critical path."""
    l2_run_name: str = ""
    """This run's directory (or key prefix) under l2_dir. Everything that should find this run's durable
    checkpoints (a restarted job, a new node, another cluster with every local level gone) uses the same name, so it
    must not depend on the machine. Empty: the run directory's own name (`train.run_dir = "runs/tiny-cpu"` ->
    `<l2_dir>/tiny-cpu`). Two runs that share l2_dir need different names."""
    s3_endpoint: str = ""
    """Endpoint of an S3-compatible service for an s3:// l2_dir, e.g. http://127.0.0.1:8333 (MinIO, SeaweedFS,
    Ceph). Empty: AWS_ENDPOINT_URL if set, else AWS S3 itself."""
    l2_interval: int = 0
    """Steps between L2 checkpoints."""
    l2_keep_last: int = 2
    """Committed L2 checkpoints kept."""
    on_busy: str = "wait"
    """When a save is due while the previous one is still being written to its first level. "wait": stage it into
    a second host buffer (two saves in flight: two copies of the state in memory), and when both are busy block
    until one is free (never longer than one persist). "skip": skip it (counted in ecpt_checkpoint_skipped_total),
    so at most one save is in flight and staging holds one copy of the state."""
    direct_io: str = "auto"
    """Disk levels (L1, a path L2) write chunk files with O_DIRECT, bypassing the page cache: far less CPU taken
    from training (checkpointing/direct_io.py). "auto": where the file system accepts it (probed at the level's
    first write and logged); "on": required, a save fails naming the level if the file system refuses; "off": never
    (e.g. to keep the newest checkpoint in the page cache for a fast reload)."""
    resume: bool = True
    """Resume from the newest valid checkpoint at start if one exists."""

    @property
    def direct_io_setting(self) -> bool | None:
        """direct_io as LevelSpec.direct_io takes it (None: detect)."""
        return {"auto": None, "on": True, "off": False}[self.direct_io]

    def validate(self) -> None:
        _require(
            self.direct_io in ("auto", "on", "off"),
            f"checkpoint.direct_io must be 'auto', 'on' or 'off', got {self.direct_io!r}",
        )
        for name in ("interval", "l0_interval", "l2_interval"):
            _require(getattr(self, name) >= 0, f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("keep_last", "l0_keep_last", "l2_keep_last"):
            _require(getattr(self, name) >= 1, f"checkpoint.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.l0_stale_after_s > 0, f"checkpoint.l0_stale_after_s must be > 0 seconds, got {self.l0_stale_after_s}"
        )
        _require(self.on_busy in ("wait", "skip"), f"checkpoint.on_busy must be 'wait' or 'skip', got {self.on_busy!r}")
        _require(
            not (self.l2_interval and not self.l2_dir),
            "checkpoint.l2_interval is set but checkpoint.l2_dir is empty; set l2_dir or l2_interval = 0",
        )
        for name in ("dir", "l0_dir", "l2_dir"):
            # A URL is not a path: taken as one, "s3://ckpt/run" silently became a local directory named "s3:".
            value = getattr(self, name)
            scheme, sep, rest = value.partition("://")
            if not sep:
                continue
            _require(
                name == "l2_dir" and scheme == "s3",
                f"checkpoint.{name} = {value!r}: {scheme}:// URLs are not supported here; "
                + (
                    "checkpoint.l2_dir takes a path or s3://bucket/prefix"
                    if name == "l2_dir"
                    else f"checkpoint.{name} is a file system path (only checkpoint.l2_dir may be an s3:// URL)"
                ),
            )
            _require(
                bool(rest.split("/", 1)[0]),
                f"checkpoint.l2_dir = {value!r} names no bucket; write s3://bucket/prefix",
            )
        _require(
            "/" not in self.l2_run_name and self.l2_run_name not in (".", ".."),
            f"checkpoint.l2_run_name = {self.l2_run_name!r} must be one name (no '/'): the run's directory or key "
            f"prefix under checkpoint.l2_dir",
        )
        _require(
            not self.s3_endpoint or self.s3_endpoint.startswith(("http://", "https://")),
            f"checkpoint.s3_endpoint = {self.s3_endpoint!r} must be an http:// or https:// URL (or empty: "
            f"AWS_ENDPOINT_URL or AWS S3 itself)",
        )


@dataclass
class MetricsConfig:
    port: int = 0
    """Base port of each rank's Prometheus endpoint on metrics.host; rank port = port + local_rank; 0 = any free port."""
    host: str = "127.0.0.1"
    """Address the metrics endpoints bind to (0.0.0.0 on a cluster so Prometheus can scrape)."""
    enabled: bool = True
    """Serve Prometheus metrics from every rank."""

    def validate(self) -> None:
        _require(0 <= self.port <= 65535, f"metrics.port must be in [0, 65535], got {self.port}")


@dataclass
class LaunchConfig:
    nproc_per_node: int = 2
    """Worker processes per node (local `ecpt train` starts them through torchrun's elastic agent)."""
    nnodes: str = "1"
    """Node count, or MIN:MAX for an elastic job."""
    rdzv_endpoint: str = "127.0.0.1:0"
    """c10d rendezvous host:port; port 0 picks a free port for a single-node run."""
    max_restarts: int = 3
    """Worker-group restarts torchrun allows before the job fails."""
    monitor_interval: float = 0.5
    """Seconds between the agent's worker-health checks."""
    fault_tolerance: str = "restart"
    """restart: a failure restarts the whole worker group from the newest checkpoint (torchrun's elastic agent).
    replicas: per-step fault tolerance (elastic/ft/): each replica group is its own job, a quorum is formed every
    step, survivors discard only the step in flight and go on at once, a returning replica heals from a live peer."""
    replicas: int = 0
    """replicas mode: replica groups in the whole job, one worker each; 0 = launch.nproc_per_node x the largest
    launch.nnodes (one replica per worker the restart mode would start). A plain `ecpt train` starts them all on
    this machine; with --node-rank N (a cluster node, or a node joining a running job) it starts this node's share,
    launch.replicas / nnodes MAX of them, numbered from N x that share."""
    min_replicas: int = 1
    """replicas mode: fewest replicas a step commits with (the quorum coordinator's --min_replicas too)."""
    lighthouse: str = ""
    """replicas mode: the quorum coordinator's address, http://host:port. Empty: `ecpt train` starts one on this
    machine. Clusters run `ecpt lighthouse` on a host that outlives the training nodes and set this."""
    ft_heartbeat_timeout_ms: int = 500
    """replicas mode: a replica whose heartbeats (every 100 ms) stop for this long leaves the quorum; one survivor of
    two cannot form a quorum before. Survivors overlap that wait with recomputing the dead replica's samples, so
    300 ms measured no shorter pause than 500 ms here (README), and 500 keeps more margin against dropping a live
    replica whose heartbeats are late (none was at 200 or 300 ms in the fault-free runs). torchft's default: 5000."""
    ft_join_timeout_ms: int = 1000
    """replicas mode: how long the coordinator waits for heartbeating replicas that have not asked to join yet."""
    ft_timeout_s: float = 10.0
    """replicas mode: timeout of the cross-replica all-reduce, the commit vote and a heal transfer. A stalled
    (SIGSTOPped) replica holds the survivors for this long before the step is discarded."""
    ft_quorum_timeout_s: float = 60.0
    """replicas mode: how long a replica waits for a quorum (e.g. for min_replicas peers, or the coordinator)."""
    ft_connect_timeout_s: float = 5.0
    """replicas mode: timeout for connecting to the coordinator and to peers' managers."""
    ft_start_timeout_s: float = 30.0
    """replicas mode: a run at step 0 (fresh, or every replica restarted) waits this long for all replica groups
    to join before it starts with those present (later ones heal from them)."""
    ft_bucket_mb: float = 25.0
    """replicas mode: the cross-replica gradient all-reduce starts in buckets of up to this many MiB while the
    backward pass still runs (DDP's bucket_cap_mb and its default; elastic/ft/overlap.py). 0: one all-reduce of
    all gradients after the backward. On 2 CPU cores overlap gains nothing (the reduction competes with the
    backward for the same cores: 4 MiB buckets measured the same step time as 0, README); it pays where the
    reduction runs on its own engine (nccl on GPUs, other hosts' NICs)."""
    ft_reuse_partial_step: bool = True
    """replicas mode: when a step is discarded because members left mid-step, the survivors retry it computing
    only the departed members' samples, adding them to the gradients they already computed (kept in the
    parameters' .grad, which the all-reduce of a flat copy leaves untouched: no extra memory). All members agree
    with one tiny all-reduce when the quorum changed. false: every retry recomputes the whole step."""

    def validate(self) -> None:
        _require(self.nproc_per_node >= 1, f"launch.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        _require(
            self.fault_tolerance in FAULT_TOLERANCE_MODES,
            f"launch.fault_tolerance must be one of {FAULT_TOLERANCE_MODES}, got {self.fault_tolerance!r}",
        )
        _require(self.replicas >= 0, f"launch.replicas must be >= 0 (0 = one per worker), got {self.replicas}")
        _require(self.min_replicas >= 1, f"launch.min_replicas must be >= 1, got {self.min_replicas}")
        _require(
            self.replica_groups >= self.min_replicas or self.fault_tolerance != "replicas",
            f"launch.min_replicas ({self.min_replicas}) exceeds the replica groups started "
            f"({self.replica_groups}); lower launch.min_replicas or raise launch.replicas",
        )
        _require(
            self.fault_tolerance != "replicas" or self.replica_groups % self.max_nodes == 0,
            f"launch.replicas ({self.replicas}) must be a multiple of launch.nnodes MAX ({self.max_nodes}): every "
            f"node starts the same number of replica groups",
        )
        _require(
            not self.lighthouse or self.lighthouse.startswith(("http://", "https://")),
            f"launch.lighthouse must be an http://host:port address (or empty), got {self.lighthouse!r}",
        )
        _require(self.ft_bucket_mb >= 0, f"launch.ft_bucket_mb must be >= 0 (0 = no overlap), got {self.ft_bucket_mb}")
        for name in ("ft_heartbeat_timeout_ms", "ft_join_timeout_ms"):
            _require(getattr(self, name) >= 1, f"launch.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ft_timeout_s", "ft_quorum_timeout_s", "ft_connect_timeout_s", "ft_start_timeout_s"):
            _require(getattr(self, name) > 0, f"launch.{name} must be > 0 seconds, got {getattr(self, name)}")
        parts = self.nnodes.split(":")
        _require(
            len(parts) in (1, 2) and all(p.isdigit() and int(p) >= 1 for p in parts),
            f"launch.nnodes must be N or MIN:MAX with positive integers, got {self.nnodes!r}",
        )
        _require(int(parts[0]) <= int(parts[-1]), f"launch.nnodes MIN must be <= MAX, got {self.nnodes!r}")
        _require(":" in self.rdzv_endpoint, f"launch.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        _require(self.max_restarts >= 0, f"launch.max_restarts must be >= 0, got {self.max_restarts}")

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])

    @property
    def min_nodes(self) -> int:
        return int(self.nnodes.split(":")[0])

    @property
    def replica_groups(self) -> int:
        """Replica groups a local `ecpt train` starts in replicas mode (launch.replicas, or one per worker)."""
        return self.replicas or self.nproc_per_node * self.max_nodes

    @property
    def replica_groups_per_node(self) -> int:
        """Replica groups each node of a cluster job starts (``ecpt train --node-rank``) in replicas mode."""
        return max(1, self.replica_groups // self.max_nodes)


@dataclass
class FaultsConfig:
    plan: list[str] = field(default_factory=list)
    """Fault sentences, e.g. 'kill rank 1 at step 30' (see elastic/fault_plan.py); each fires once per run."""

    def validate(self) -> None:
        parse_plan(self.plan)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            if section.name not in ("deepspeed", "data"):
                getattr(self, section.name).validate()
        self.data.validate(self.model)  # after model: the tokenizer's vocabulary must fit model.vocab_size
        self.deepspeed.validate(self.train, self.optim)
        _require(
            not (self.launch.fault_tolerance == "replicas" and self.train.engine == "deepspeed"),
            'launch.fault_tolerance = "replicas" works with train.engine = "ddp" only: DeepSpeed ZeRO partitions '
            "the optimizer state across ranks, so a replica cannot heal from one peer; use the restart mode "
            '(launch.fault_tolerance = "restart") with DeepSpeed',
        )
        self.validate_faults()
        max_world = self.launch.max_nodes * self.launch.nproc_per_node
        if self.launch.fault_tolerance == "replicas":
            max_world = max(max_world, self.launch.replica_groups)
        _require(
            self.train.global_batch >= max_world,
            f"train.global_batch ({self.train.global_batch}) cannot be covered by up to {max_world} ranks "
            f"(launch.nnodes max {self.launch.max_nodes} x launch.nproc_per_node {self.launch.nproc_per_node}): "
            f"every rank needs at least one sequence; raise train.global_batch or lower the world size",
        )
        return self

    def validate_faults(self) -> None:
        """The fault plan, and what it needs of the launch mode (also run when ``--fault`` extends the plan)."""
        for fault in parse_plan(self.faults.plan):
            _require(
                fault.until is None or self.launch.fault_tolerance == "replicas",
                f"faults.plan[{fault.index}] {fault.describe()!r}: 'until step' needs launch.fault_tolerance = "
                '"replicas"; in the restart mode every worker restarts with the killed one, so holding its '
                f"replacement back would stall the whole job. Drop 'until step {fault.until}' or use replicas mode",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Loading: TOML -> dict -> typed dataclasses, refusing unknown keys and wrong types with the field's name.


def _coerce(value, annotation, where: str):
    """Check ``value`` against a field's type annotation and convert where TOML is looser (int for float)."""
    origin = typing.get_origin(annotation)
    if annotation is float:
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number, got {value!r}"
        )
        return float(value)
    if annotation in (int, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        _require(ok, f"{where} must be of type {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        _require(isinstance(value, list), f"{where} must be a list, got {type(value).__name__}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = typing.get_args(annotation)
        _require(isinstance(value, dict), f"{where} must be a table, got {type(value).__name__}")
        return {k: _coerce(v, item_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict), f"{where} must be a table, got {type(value).__name__}")
        return _build(annotation, value, where)
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(
        not unknown,
        f"unknown key(s) {[f'{where}.{k}' if where else k for k in unknown]}; "
        f"valid keys{' of ' + where if where else ''}: {sorted(known)}",
    )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.max_steps=5' -> (['train', 'max_steps'], 5). The value is parsed as TOML, falling back to a string."""
    key, sep, raw = text.partition("=")
    _require(bool(sep) and "." in key, f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict) -> Config:
    return _build(Config, raw, "").validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or a resolved config.json; a bundled config by name; the bundled default if ``path`` is
    None, see ``resolve_config``), apply overrides and validate everything."""
    path = resolve_config(path)
    if path.name.endswith(".json"):  # a resolved config written by a previous run (<run_dir>/config.json)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    else:
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return config_from_dict(apply_overrides(raw, overrides or []))


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2))


def config_from_json(path: str | Path) -> Config:
    return config_from_dict(json.loads(Path(path).read_text()))
