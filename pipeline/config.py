"""The one typed build config, parsed strictly from a build YAML.

Every section is a dataclass; unknown keys and wrong types fail with a
``ConfigError`` that names the file and the dotted key, so a typo such as
``crawl.timout`` never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# train.worker_priority: the loader workers' CPU priority (training.data.set_worker_priority);
# auto = idle when training on the CPU, normal with a GPU
WORKER_PRIORITIES = ("normal", "low", "idle")
WORKER_PRIORITY_CHOICES = ("auto", *WORKER_PRIORITIES)


class ConfigError(ValueError):
    """A build file is missing, malformed, or names an unknown or mistyped key."""


@dataclass
class Source:
    path: str  # a file or a glob, relative to the build file's folder
    format: str = "auto"  # auto | csv | tsv | json | jsonl | parquet (.gz allowed)
    url_col: str = "url"
    caption_col: str = "caption"
    tag: str = ""  # a short source name recorded on every row; defaults to the file stem
    header: bool = True  # csv/tsv only; without a header, columns are column0, column1, ...


@dataclass
class IngestConfig:
    max_url_length: int = 2048
    ftfy: bool = True  # repair mojibake; only captions with non-ASCII characters can need it


@dataclass
class TextFilterConfig:
    # shipped filter names (pipeline/sql/filters/) or .sql paths relative to the build file;
    # every other key of this section is visible to the SQL as getvariable('<key>')
    filters: list[str] = field(default_factory=list)
    max_caption_repeats: int = 1000  # frequent_caption: captions on more distinct urls drop


@dataclass
class UrlDedupConfig:
    enabled: bool = True
    strip_params: list[str] = field(
        default_factory=lambda: [
            "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
            "gclid", "fbclid", "mc_cid", "mc_eid", "ref",
        ]
    )


@dataclass
class BalanceConfig:
    enabled: bool = False
    metadata: str = ""  # metadata.parquet or a JSON list of strings (MetaCLIP's metadata.json)
    t: int = 0  # per-entry cap; 0 = derive it from target_size
    target_size: int = 0
    seed: int = 0
    method: str = "auto"  # auto | duckdb | ahocorasick
    workers: int = 0  # matching processes for the ahocorasick method; 0 = CPU count


# Settings that change how a stage runs, never what it writes: left out of its fingerprint,
# so changing one reruns nothing.
RUN_ONLY_SETTINGS: dict[str, tuple[str, ...]] = {
    "crawl": ("min_free_mb", "stall_minutes", "guard_processes")}


@dataclass
class CrawlConfig:
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # no | border | keep_ratio | keep_ratio_largest | center_crop
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")
    timeout: int = 5
    retries: int = 0
    processes_count: int = 2
    thread_count: int = 16
    number_sample_per_shard: int = 1000
    user_agent_token: str = "witforge"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    distributor: str = "multiprocessing"  # multiprocessing | pyspark
    # Safe-crawl guard (forward proxy on loopback, see pipeline/guard)
    guard: bool = True
    request_deadline: float = 20.0  # seconds for connect + headers + body, per request
    max_body_bytes: int = 20 * 1024 * 1024
    allow_hosts: list[str] = field(default_factory=list)  # host:port let through the address guard
    robots: bool = True
    per_domain_concurrency: int = 8
    per_domain_rps: float = 0.0  # 0 = unlimited
    # guard processes on one port sharing the per-domain limits: one caps near its
    # requests/s per core (docs/guard.md#ceiling); raise it on a node that crawls faster
    guard_processes: int = 1
    max_crawl_delay: float = 10.0  # honour robots.txt Crawl-delay up to this (s); 0 = ignore
    min_free_mb: float = 256  # stop the crawl, resumable, before its disk fills; 0 = no check
    stall_minutes: float = 30  # stop a crawl that writes nothing this long; 0 = wait forever


def crawl_silent_seconds(c: CrawlConfig) -> float:
    """The longest a healthy crawl writes nothing: a shard whose URLs all time out (failures
    reach img2dataset's parquet when the shard closes; its tar gets successes only). Behind
    the guard every request ends within its deadline; alone, img2dataset's timeout bounds it."""
    per_request = c.request_deadline if c.guard else c.timeout
    return math.ceil(c.number_sample_per_shard / c.thread_count) * per_request


@dataclass
class ImageFilterConfig:
    filters: list[str] = field(default_factory=list)  # as text_filter.filters
    min_side: int = 200  # min_image_side: shorter original side in pixels
    max_aspect_ratio: float = 3.0  # aspect_ratio: longer side / shorter side


@dataclass
class ImageDedupConfig:
    enabled: bool = True
    sha256: bool = True
    phash: bool = True
    phash_max_distance: int = 4
    # exact = the imagehash algorithm; draft = JPEGs decoded at 1/2-1/8 scale, 3.6-6x faster,
    # not bit-identical (docs/stages.md#08-image_dedup has its agreement with exact)
    phash_decode: str = "exact"
    # LSH blocks B (dedup/lsh.py); 0 = chosen from the row count. B > phash_max_distance finds
    # every pair (pigeonhole); fewer blocks may miss pairs
    phash_bands: int = 0
    # a band bucket with more rows meets only its this many smallest ids; 0 = no cap
    lsh_max_bucket: int = 1000
    workers: int = 2  # processes computing pHashes (one tar at a time each)


@dataclass
class DecontaminateConfig:
    enabled: bool = True
    eval_sets: list[str] = field(default_factory=list)  # folders of eval webdataset tars
    max_distance: int = 6


@dataclass
class BootstrapConfig:
    """embed.checkpoint: bootstrap — the pool scores itself (training/bootstrap.py): K models,
    each trained on K-1 folds of the pairs, each pair scored by the one that never saw it."""

    folds: int = 3
    model: str = "witforge-tiny"
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 15
    seed: int = 0
    # another build's run folder (e.g. runs/demo) whose K fold models score these pairs instead
    # of training new ones; every pair is still out of fold (its fold model never saw it). Set
    # by `witforge compare` for ablation arms, so an ablation changes the data, not the scorer.
    models_from: str = ""


@dataclass
class EmbedConfig:
    # any open_clip architecture name, or a model config JSON path
    model: str = "ViT-B-32"
    # a local file (open_clip / OpenAI / LAION weights, or our runs/<b>/train/model.pt), or
    # `bootstrap`; empty = no embed stage (and no clip_filter / semantic_dedup)
    checkpoint: str = ""
    batch_size: int = 256
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # cpu | cuda | auto
    workers: int = 2  # image-decoding threads
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


@dataclass
class ClipFilterConfig:
    # named SQL filters over the embed stage's output (clip_score, caption, sizes...), as
    # text_filter.filters; shipped: clip_score_min, clip_score_top
    filters: list[str] = field(default_factory=list)
    min_clip_score: float = 0.28  # clip_score_min (LAION's rule for OpenAI ViT-B/32)
    fraction: float = 0.3  # clip_score_top: keep this top fraction (DataComp's best baseline)


@dataclass
class SemanticDedupConfig:
    enabled: bool = False
    eps: float = 0.0  # drop a member whose cosine to a kept one is >= 1 - eps
    target_fraction: float = 0.0  # or: remove this fraction, eps found by search
    clusters: int = 0  # spherical k-means clusters; 0 = about sqrt(rows)
    exact_below: int = 10000  # fewer rows: one cluster, exact all pairs
    kmeans_iterations: int = 20
    seed: int = 0


@dataclass
class ShardConfig:
    samples_per_shard: int = 1000
    seed: int = 0
    upsample: int = 1
    workers: int = 2  # threads writing shards side by side (same bytes for any number)


@dataclass
class TrainConfig:
    model: str = "witforge-tiny"
    batch_size: int = 64
    epochs: int = 1
    steps: int = 0  # 0 = derived from epochs
    lr: float = 5e-4
    warmup: int = 10
    weight_decay: float = 0.2
    accum_freq: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"
    loss: str = "clip"  # clip | siglip
    workers: int = 2  # loader processes (0 = in the training process, same batches as 1)
    worker_priority: str = "auto"  # auto | normal | low | idle (auto: idle on the CPU)
    save_every: int = 100
    seed: int = 0
    keep: int = 2  # step checkpoints kept in runs/<build>/train/checkpoints/
    resampled: bool = True  # rounds of all shards per loader process; false = shared passes
    shuffle_buffer: int = 1000
    eval_every: int = 0  # 0 = only at the end when eval sets are configured
    threads: int = 0  # torch threads per process (0 = torch's default)
    grad_checkpointing: bool = False  # recompute transformer blocks in backward (less memory)
    patch_dropout: float = 0.0  # FLIP: fraction of image patches dropped while training


@dataclass
class EvalConfig:
    zeroshot: list[str] = field(default_factory=list)  # eval sets in CLIP_benchmark layout
    retrieval: list[str] = field(default_factory=list)
    # dataset = each set's own zeroshot_classification_templates.txt (as CLIP_benchmark; OpenAI's 80
    # ImageNet templates where a set has none) | openai | simple
    templates: str = "dataset"


def parse_size(text: str) -> int:
    """A DuckDB size in bytes: a memory_limit ('4GB', '4GiB', '512MB') or what DuckDB
    reports of it ('3.7 GiB')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"cannot read the size {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class DuckDBConfig:
    memory_limit: str = "4GB"
    threads: int = 0  # 0 = all cores
    temp_directory: str = ""  # default: runs/<build>/_duckdb_tmp


@dataclass
class BuildConfig:
    name: str
    sources: list[Source]
    runs_dir: str = "runs"
    demo_web: bool = False  # start the local demo web for the crawl (demo builds only)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    text_filter: TextFilterConfig = field(default_factory=TextFilterConfig)
    url_dedup: UrlDedupConfig = field(default_factory=UrlDedupConfig)
    precrawl_balance: BalanceConfig = field(default_factory=BalanceConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    image_filter: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    image_dedup: ImageDedupConfig = field(default_factory=ImageDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    clip_filter: ClipFilterConfig = field(default_factory=ClipFilterConfig)
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    duckdb: DuckDBConfig = field(default_factory=DuckDBConfig)
    # Set by the loader, not by the YAML:
    path: Path = field(default=Path("."), metadata={"internal": True})

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        runs = Path(self.runs_dir)
        if not runs.is_absolute():
            runs = Path.cwd() / runs
        return runs / self.name

    def resolve(self, p: str) -> Path:
        """A path from the YAML, relative to the build file's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.base_dir / q)

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "infinity"):
            return float("inf")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**kwargs)


def load_build(path: str | Path) -> BuildConfig:
    """Parse and validate a build YAML; every error names the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: build file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        cfg = _build(BuildConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    cfg.path = p.resolve()
    _validate(cfg)
    return cfg


def _validate(cfg: BuildConfig) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{cfg.path}: {key}: {msg}")

    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        fail("name", "must be a non-empty name without slashes or spaces")
    if not cfg.sources:
        fail("sources", "at least one source is required")
    formats = {"auto", "csv", "tsv", "json", "jsonl", "parquet"}
    for i, s in enumerate(cfg.sources):
        if s.format not in formats:
            fail(f"sources[{i}].format", f"{s.format!r} is not one of {sorted(formats)}")
    modes = {"no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"}
    if cfg.crawl.resize_mode not in modes:
        fail("crawl.resize_mode", f"{cfg.crawl.resize_mode!r} is not one of {sorted(modes)}")
    if cfg.crawl.distributor not in ("multiprocessing", "pyspark"):
        fail("crawl.distributor", "must be multiprocessing or pyspark")
    if cfg.crawl.encode_format not in ("jpg", "png", "webp"):
        fail("crawl.encode_format", "must be jpg, png or webp")
    for key in ("timeout", "processes_count", "thread_count", "number_sample_per_shard"):
        if getattr(cfg.crawl, key) <= 0:
            fail(f"crawl.{key}", "must be positive")
    # Safe-crawl guard (pipeline/guard)
    for key in ("request_deadline", "max_body_bytes", "per_domain_concurrency",
                "guard_processes"):
        if not getattr(cfg.crawl, key) > 0:
            fail(f"crawl.{key}", "must be positive")
    if not cfg.crawl.per_domain_rps >= 0:
        fail("crawl.per_domain_rps", "must be >= 0 (0 = unlimited)")
    if cfg.crawl.stall_minutes < 0:
        fail("crawl.stall_minutes", "must be >= 0 minutes (0 = no stall check)")
    silent = crawl_silent_seconds(cfg.crawl)
    if 0 < cfg.crawl.stall_minutes * 60 < silent:
        fail("crawl.stall_minutes", f"{cfg.crawl.stall_minutes:g} is shorter than a healthy "
             f"crawl can stay silent: a shard whose URLs all time out writes nothing for "
             f"{silent:g} s (number_sample_per_shard / thread_count x request_deadline, or "
             "timeout without the guard); raise it, or 0 for no stall check")
    if cfg.crawl.min_free_mb < 0:
        fail("crawl.min_free_mb", "must be >= 0 MB (0 = no free-space check)")
    if not 0 <= cfg.crawl.max_crawl_delay < float("inf"):
        fail("crawl.max_crawl_delay", "must be >= 0 seconds (0 = ignore Crawl-delay)")
    for i, entry in enumerate(cfg.crawl.allow_hosts):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            fail(f"crawl.allow_hosts[{i}]", f"{entry!r} is not host:port (e.g. 127.0.0.1:8000)")
    if cfg.shard.samples_per_shard <= 0:
        fail("shard.samples_per_shard", "must be positive")
    if cfg.shard.upsample < 1:
        fail("shard.upsample", "must be >= 1")
    if not 0 <= cfg.image_dedup.phash_max_distance <= 63:
        fail("image_dedup.phash_max_distance", "must be between 0 and 63 (bits of a 64-bit hash)")
    if not 0 <= cfg.image_dedup.phash_bands <= 64:
        fail("image_dedup.phash_bands", "must be between 1 and 64 (0 = chosen from the rows)")
    if cfg.image_dedup.phash_decode not in ("exact", "draft"):
        fail("image_dedup.phash_decode", f"must be exact or draft, got "
             f"{cfg.image_dedup.phash_decode!r}")
    if cfg.image_dedup.lsh_max_bucket < 0 or 0 < cfg.image_dedup.lsh_max_bucket < 2:
        fail("image_dedup.lsh_max_bucket", "must be >= 2 rows (0 = no cap)")
    if cfg.image_dedup.workers < 1:
        fail("image_dedup.workers", "must be >= 1")
    if cfg.shard.workers < 1:
        fail("shard.workers", "must be >= 1")
    if not 0 <= cfg.decontaminate.max_distance <= 63:
        fail("decontaminate.max_distance", "must be between 0 and 63")
    if cfg.train.workers < 0:
        fail("train.workers", "must be >= 0")
    if cfg.train.worker_priority not in WORKER_PRIORITY_CHOICES:
        fail("train.worker_priority", f"must be one of {', '.join(WORKER_PRIORITY_CHOICES)}")
    if cfg.train.loss not in ("clip", "siglip"):
        fail("train.loss", "must be clip or siglip")
    if cfg.train.precision not in ("fp32", "bf16", "fp16", "amp", "amp_bf16"):
        fail("train.precision", "must be fp32, bf16 or fp16 (fp16 needs a CUDA device)")
    if not 0 <= cfg.train.patch_dropout < 1:
        fail("train.patch_dropout", f"must be in [0, 1) (the fraction of image patches "
             f"dropped), not {cfg.train.patch_dropout:g}")
    if cfg.eval.templates not in ("openai", "simple", "dataset"):
        fail("eval.templates", "must be openai, simple or dataset")
    e = cfg.embed
    if e.precision not in ("fp32", "bf16"):
        fail("embed.precision", "must be fp32 or bf16")
    if e.device not in ("auto", "cpu", "cuda"):
        fail("embed.device", "must be auto, cpu or cuda")
    for key in ("batch_size", "workers"):
        if getattr(e, key) < 1:
            fail(f"embed.{key}", "must be >= 1")
    if e.bootstrap.folds < 2:
        fail("embed.bootstrap.folds", "must be >= 2 (each pair is scored by a model trained on "
             "the other folds)")
    if e.bootstrap.steps < 1 or e.bootstrap.batch_size < 2:
        fail("embed.bootstrap.steps", "steps must be >= 1 and batch_size >= 2")
    if cfg.clip_filter.filters and not e.checkpoint:
        fail("clip_filter.filters", "needs the embed stage: set embed.checkpoint (a local "
             "checkpoint file, or bootstrap)")
    if not 0 < cfg.clip_filter.fraction <= 1:
        fail("clip_filter.fraction", "must be in (0, 1]")
    sd = cfg.semantic_dedup
    if sd.enabled:
        if not e.checkpoint:
            fail("semantic_dedup.enabled", "needs the embed stage: set embed.checkpoint")
        if (sd.eps > 0) == (sd.target_fraction > 0):
            fail("semantic_dedup.eps", "set exactly one of eps (> 0) and target_fraction (> 0)")
    if not 0 <= sd.eps < 1 or not 0 <= sd.target_fraction < 1:
        fail("semantic_dedup.eps", "eps and target_fraction must be in [0, 1)")
    if sd.clusters < 0 or sd.exact_below < 0 or sd.kmeans_iterations < 1:
        fail("semantic_dedup.clusters", "clusters and exact_below must be >= 0, "
             "kmeans_iterations >= 1")
    for sec in ("precrawl_balance", "balance"):
        b = getattr(cfg, sec)
        if b.method not in ("auto", "duckdb", "ahocorasick"):
            fail(f"{sec}.method", f"{b.method!r} is not one of auto, duckdb, ahocorasick")
        for key in ("t", "target_size", "workers"):
            if getattr(b, key) < 0:
                fail(f"{sec}.{key}", "must be >= 0")
        if b.enabled and not b.metadata:
            fail(f"{sec}.metadata", "required when enabled (build one with `witforge metadata`)")
        if b.enabled and not b.t and not b.target_size:
            fail(f"{sec}.t", "set t (the per-entry cap) or target_size")
