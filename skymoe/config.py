"""Validated pipeline configuration.

A config is a YAML file (presets live in ``configs/``; ``tiny`` is the default). Every field is
checked before any work starts: unknown keys, duplicate keys, wrong types, out-of-range or infinite
values and URIs no installed filesystem can open fail with a :class:`ConfigError` that names the
file and the dotted path of the field; :func:`check_paths` then finds the files the wanted stages read. Relative paths inside a
config resolve against the config file's own folder, so a preset works from any working directory.
A file may ``extends:`` a preset or another file and set only what differs; ``--set a.b=c`` items
(:func:`parse_set_overrides`) override single fields from the command line. See docs/configuration.md.
"""

from __future__ import annotations

import copy
import glob
import json
import os
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, TypeVar

import fsspec
import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from skymoe import PIPELINE_STAGES

if TYPE_CHECKING:
    from skymoe.storage import Storage

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


class _Strict(BaseModel):
    # No inf or nan anywhere: `capacity_factor: .inf` passes every `gt=0`, then breaks training hours later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _usable_location(value: str) -> str:
    """A path or URI some filesystem here can open: not blank (a blank would resolve to the config's
    folder or the working directory), and a URI's scheme known to fsspec with its package installed."""
    if not value.strip():
        raise ValueError("empty: give a path or URI (or null where the field allows it)")
    if "://" in value:
        for protocol in value.split("://", 1)[0].split("::"):  # "simplecache::s3://..." chains filesystems
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as err:  # fsspec's message names the package: "Install s3fs to access S3"
                raise ValueError(f"scheme {protocol}:// needs a package that is not installed: {err}") from None
            except ValueError:
                raise ValueError(f"unknown URI scheme {protocol}:// (not an fsspec protocol)") from None
    return value


# A local path or an fsspec URI (s3://bucket/key); relative local paths are resolved by load_config.
Location = Annotated[str, AfterValidator(_usable_location)]


# ----------------------------------------------------------------------------------------- storage
class S3Settings(_Strict):
    """Where an ``s3://`` root lives. Credentials are never configured here: they come from the
    standard AWS environment variables (or a profile), so they cannot leak into manifests."""

    endpoint_url: str | None = None
    region: str | None = None


class StorageConfig(_Strict):
    root: Location = Field("./skymoe-out", description="fsspec URI under which every stage writes")
    s3: S3Settings = S3Settings()


# ------------------------------------------------------------------------------------------- clean
class ExecutorConfig(_Strict):
    kind: Literal["datatrove", "beam", "ray"] = "datatrove"
    workers: int = Field(1, ge=1, description="most shard tasks at once (datatrove processes, Ray tasks in flight)")
    min_shards_per_worker: int = Field(
        2, ge=1, description="a worker process takes seconds to start (imports, language models): fewer pending "
                             "shards per worker than this and a phase runs in fewer workers, or in this process")
    beam_options: list[str] = Field(
        default_factory=list,
        description="Beam pipeline options passed through, e.g. --runner=FlinkRunner",
    )
    ray_address: str | None = Field(
        None,
        description="kind ray: the cluster to join (host:port of its GCS, as `ray start --head` prints); "
                    "null = the RAY_ADDRESS environment variable, or else a local Ray started for each phase",
    )


class ReaderConfig(_Strict):
    text_field: str = "text"
    id_field: str | None = "id"
    url_field: str | None = "url"
    max_doc_bytes: int = Field(
        5_000_000, ge=1, description="larger records are rejected (kept aside) instead of processed"
    )
    code_sources: list[str] = Field(
        default_factory=list, description="sources (input sub-folders) holding code: code heuristics apply"
    )
    split_bytes: int = Field(
        256 << 20, ge=1 << 10,
        description="uncompressed JSONL and text files larger than this are read as several shards (byte "
                    "ranges cut at line ends), so that one big file is spread over the workers",
    )
    hidden: Literal["skip", "read"] = Field(
        "skip",
        description="files and folders below an input whose name starts with '.' or '_' (editor and tool "
                    "leftovers such as .ipynb_checkpoints/, _tmp/): 'skip' lists each in the manifest's "
                    "skipped_inputs with the reason; 'read' reads them like any other input",
    )


class ExtractionConfig(_Strict):
    min_chars: int = Field(1, ge=0, description="pages whose main text is shorter are rejected")


class LanguageConfig(_Strict):
    keep: list[Literal["en", "zh"]] = Field(default_factory=lambda: ["en", "zh"], min_length=1)
    min_confidence: float = Field(0.65, ge=0.0, le=1.0)
    max_chars: int = Field(
        2000, ge=100, description="characters of each document the identifier looks at"
    )


class GopherRepetitionConfig(_Strict):
    dup_line_frac: float = Field(0.3, ge=0, le=1)
    dup_para_frac: float = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    top_n_grams: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class GopherQualityConfig(_Strict):
    min_doc_words: int = Field(50, ge=0)
    max_doc_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = Field(3, ge=0)
    max_avg_word_length: float = Field(10, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)


class C4Config(_Strict):
    min_sentences: int = Field(5, ge=0)
    min_words_per_line: int = Field(3, ge=0)
    max_word_length: int = Field(1000, ge=1)


class FineWebConfig(_Strict):
    line_punct_thr: float = Field(0.12, ge=0, le=1)
    short_line_thr: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=1)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1)
    new_line_ratio: float = Field(0.3, ge=0)


class ChineseConfig(_Strict):
    """Character-based equivalents of the English rules: Chinese has no spaces, so lengths count
    Han characters and "words" are single characters."""

    min_doc_chars: int = Field(200, ge=0)
    max_doc_chars: int = Field(500_000, ge=1)
    min_han_ratio: float = Field(0.3, ge=0, le=1, description="Han chars / non-space chars")
    max_symbol_ratio: float = Field(0.1, ge=0)
    min_sentences: int = Field(3, ge=0)
    min_chars_per_line: int = Field(5, ge=0)
    top_char_ngram: dict[int, float] = Field(default_factory=lambda: {4: 0.2, 6: 0.18, 8: 0.16})
    dup_char_ngram: dict[int, float] = Field(default_factory=lambda: {10: 0.15, 20: 0.12})


class CodeConfig(_Strict):
    """SkyPile's code heuristics, applied to documents that look like source code."""

    max_line_length: int = Field(1000, ge=1)
    max_mean_line_length: float = Field(100, ge=1)
    min_alnum_frac: float = Field(0.25, ge=0, le=1)


class BlocklistConfig(_Strict):
    """Spam-term lists per language (gambling, adult, pills): the vocabulary of SEO spam pages."""

    enabled: bool = True
    files: dict[str, Location] = Field(
        default_factory=lambda: {lang: str(CONFIGS_DIR / "blocklists" / f"{lang}.txt") for lang in ("en", "zh")}
    )
    min_hits: int = Field(2, ge=1, description="term occurrences (all terms together) that reject a page")


class HeuristicsConfig(_Strict):
    enabled: bool = True
    blocklist: BlocklistConfig = BlocklistConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()
    chinese: ChineseConfig = ChineseConfig()
    code: CodeConfig = CodeConfig()


class QualityExamples(_Strict):
    """One language's example files (JSONL with a ``text`` field, or plain text one document per
    line): pages a corpus should keep (``positive``) and pages it should not (``negative``), both
    in that language, so the model learns quality rather than language."""

    positive: list[Location] = Field(min_length=1)
    negative: list[Location] = Field(min_length=1)
    threshold: float | None = Field(
        None, gt=0, lt=1,
        description="keep documents scoring at least this; unset: calibrated on the held-out split at target_recall")


class ClassifierConfig(_Strict):
    """SkyPile's quality classifier, one model per language, each with an absolute score threshold.

    Each model is trained on its language's examples minus a stratified held-out share, on which
    the threshold is calibrated (the highest score that still keeps ``target_recall`` of the
    held-out positives) and the model's ROC AUC measured; both go into the manifest. A document
    whose language has no model is not scored. The threshold is a property of the model, not of
    the corpus: a corpus of good pages keeps almost all of them, a corpus of junk little.
    """

    enabled: bool = True
    languages: dict[str, QualityExamples] = Field(default_factory=dict)
    target_recall: float = Field(0.9, gt=0, le=1, description="share of held-out positives the threshold keeps")
    held_out: float = Field(0.2, gt=0, lt=1, description="share of each class kept out of training for calibration")
    n_features: int = Field(2**18, ge=2**10, le=2**24)
    features: Literal["auto", "char1-3", "char2-5", "char2-5+word1-2"] = Field(
        "auto",
        description="n-gram features of each model; auto: per language, the set with the best 5-fold "
                    "cross-validated ROC AUC on the training split (never on the held-out share)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "ClassifierConfig":
        if self.enabled and not self.languages:
            raise ValueError("an enabled classifier needs example files for at least one language "
                             "(classifier.languages.<lang>.positive / .negative)")
        return self


class StructuredTextConfig(_Strict):
    """SkyPile keeps JSON/XML/YAML/HTML-like documents in a controlled proportion: they are
    detected, spared the prose filters (they go the code path), and each is kept with the
    probability that caps their share of the documents reaching dedup at ``max_share``."""

    enabled: bool = True
    max_share: float = Field(0.05, ge=0, lt=1, description="most structured documents may make up of the kept ones")


class MinHashConfig(_Strict):
    enabled: bool = True
    ngram: int = Field(5, ge=1, description="word n-grams (Latin) / character n-grams (CJK)")
    num_bands: int = Field(14, ge=1)
    rows_per_band: int = Field(8, ge=1)
    seed: int = 1


class RecurringTextConfig(_Strict):
    """SkyPile's distribution filtering: lines that recur across many documents are cut out."""

    enabled: bool = True
    min_docs: int = Field(3, ge=2, description="a line is recurring when at least this many docs hold it")
    min_line_chars: int = Field(10, ge=1, description="shorter lines are never counted")
    min_chars_after: int = Field(100, ge=0, description="documents left shorter are rejected")


class DedupConfig(_Strict):
    exact: bool = True
    partitions: int = Field(
        16, ge=1, le=4096,
        description="hash partitions of the global dedup phases (exact groups, MinHash buckets, line counts): "
                    "one task each, so a task holds about 1/partitions of the corpus's keys; kept fixed across "
                    "the generations of an incremental run (their dedup history is partitioned the same way)")
    minhash: MinHashConfig = MinHashConfig()
    recurring: RecurringTextConfig = RecurringTextConfig()


class CleanConfig(_Strict):
    inputs: list[Location] = Field(default_factory=list, description="files, folders or globs")
    executor: ExecutorConfig = ExecutorConfig()
    reader: ReaderConfig = ReaderConfig()
    extraction: ExtractionConfig = ExtractionConfig()
    language: LanguageConfig = LanguageConfig()
    heuristics: HeuristicsConfig = HeuristicsConfig()
    classifier: ClassifierConfig = ClassifierConfig(enabled=False)
    structured: StructuredTextConfig = StructuredTextConfig()
    dedup: DedupConfig = DedupConfig()
    docs_per_output_shard: int = Field(20_000, ge=1)

    @model_validator(mode="after")
    def _classified_languages_are_kept(self) -> "CleanConfig":
        if self.classifier.enabled:
            unknown = sorted(set(self.classifier.languages) - {*self.language.keep, "code"})
            if unknown:
                raise ValueError(f"classifier.languages {unknown}: not among the kept languages "
                                 f"{self.language.keep} (language.keep) or 'code'")
        return self


# ---------------------------------------------------------------------------------------- tokenize
class TokenizerConfig(_Strict):
    """Train a byte-level BPE on the cleaned corpus, or load one given by ``path`` (a
    ``tokenizer.json``, or a Hugging Face tokenizer folder used as it is, special tokens read from
    its config; never a hub name)."""

    path: Location | None = None
    vocab_size: int = Field(4096, ge=259, le=2**32)
    min_frequency: int = Field(2, ge=1)
    train_docs: int = Field(50_000, ge=1, description="cleaned documents the tokenizer is trained on")


class MixtureConfig(_Strict):
    """Sampling weights per language ("en") or per language and source ("zh/zhwiki"); the report
    trains on about en : zh : code = 7 : 2 : 1.

    Empty weights keep the corpus's natural proportions. Training sequences are repeated (or
    subsampled) so each share of tokens matches its weight, never more than ``max_repeats`` times.
    """

    weights: dict[str, float] = Field(default_factory=dict)
    max_repeats: float = Field(5.0, ge=1.0)

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [lang for lang, weight in value.items() if not weight > 0]
        if bad:
            raise ValueError(f"weights must be > 0 (got {bad})")
        return value


class TokenizeConfig(_Strict):
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(256, ge=8, description="tokens a training sequence predicts (rows hold seq_len + 1)")
    token_dtype: Literal["uint16", "uint32"] | None = Field(None, description="None = the narrowest that fits")
    validation_permille: int = Field(20, ge=0, le=500, description="documents (by hash) held out, per mille")
    seed: int = 0
    mixture: MixtureConfig = MixtureConfig()
    sequences_per_file: int = Field(8192, ge=1)
    encode_batch: int = Field(512, ge=1, description="documents per tokenizers encode_batch call")
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig,
        description="where the per-shard encode phase runs (datatrove, beam or ray, as clean.executor); the "
                    "default runs it in this process, where the encoder already uses every core. Not fingerprinted: "
                    "every executor writes the same bytes")


# ------------------------------------------------------------------------------------------- train
class ModelShapeConfig(_Strict):
    """A model shape: a preset from ``training/presets.py`` with any field overridden."""

    preset: Literal["tiny", "small", "skywork-moe-146b"] = "tiny"
    dim: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_dim: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=2, description="None = the tokenizer's vocabulary size")
    rope_theta: float | None = Field(None, gt=0)


class MoELayerConfig(_Strict):
    """The MoE layers (Skywork-MoE section 2-4)."""

    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    moe_every: int = Field(1, ge=1, description="every n-th layer is an MoE layer (1 = all, as Skywork-MoE)")
    capacity_factor: float | None = Field(1.25, gt=0, description="training capacity; null = never drop")
    eval_capacity_factor: float | None = Field(None, gt=0, description="null = no dropping at evaluation")
    min_capacity: int = Field(4, ge=0)
    gate_norm_lambda: float | None = Field(1.0, gt=0, description="gating logit normalization; null = off")
    balance_loss: Literal["skywork", "switch"] = Field(
        "skywork", description="auxiliary load-balancing loss: skywork = sum_j (1/n - mean g_j)^2 (the report's), "
                               "switch = n * sum_j f_j * P_j (Switch Transformer)")
    balance_scope: Literal["micro_batch", "global_batch"] = Field(
        "micro_batch", description="the tokens the balance loss averages over: one rank's micro-batch, or the "
                                   "step's global batch (statistics all-reduced over ranks, held over micro-batches)")

    @model_validator(mode="after")
    def _k_fits(self) -> "MoELayerConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self


class AuxLossConfig(_Strict):
    """Per-layer aux-loss coefficients: adaptive (alpha_hat = min(xi * drop_rate, alpha_max),
    alpha <- beta * alpha + (1 - beta) * alpha_hat) or fixed at ``alpha``."""

    mode: Literal["adaptive", "fixed"] = "adaptive"
    alpha: float = Field(0.01, ge=0, description="the fixed coefficient, or the adaptive start value")
    xi: float = Field(0.2, ge=0)
    alpha_max: float = Field(0.01, ge=0)
    beta: float = Field(0.99, ge=0, le=1)


class PhaseConfig(_Strict):
    """One training run: its length and learning-rate schedule (linear warmup, cosine to min_lr)."""

    steps: int = Field(100, ge=0)
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    constant: bool = Field(False, description="hold lr at its peak after warmup (no decay)")

    @model_validator(mode="after")
    def _lr_order(self) -> "PhaseConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        return self


class ParallelConfig(_Strict):
    """Ranks and where they run. ``nodes > 1``: this machine is node 0 and each other machine runs
    ``skymoe train-node --node-rank i`` with the same config (``training/nodes.py``)."""

    world_size: int = Field(2, ge=1, description="DeepSpeed ranks in all, over every node")
    ep_size: int = Field(2, ge=1, description="expert-parallel group size; divides world_size and num_experts")
    zero_stage: int = Field(1, ge=0, le=2)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    nodes: int = Field(1, ge=1, description="machines the ranks are spread over, world_size / nodes on each")
    master_addr: str = Field("127.0.0.1", min_length=1,
                             description="node 0's address as the other nodes reach it (nodes > 1)")
    master_port: int | None = Field(None, ge=1, le=65535,
                                    description="node 0's rendezvous port; required with nodes > 1, "
                                                "null = any free port on one node")
    join_timeout_s: int = Field(600, ge=1, description="how long ranks wait for every node to join a run")

    @model_validator(mode="after")
    def _placement(self) -> "ParallelConfig":
        if self.world_size % self.nodes:
            raise ValueError(f"nodes ({self.nodes}) must divide world_size ({self.world_size}): the same number "
                             "of ranks on every node")
        if self.nodes > 1 and self.master_port is None:
            raise ValueError("master_port is required with nodes > 1: every node must know where to meet node 0")
        if self.nodes > 1 and self.launcher != "torchrun":
            raise ValueError("launcher 'deepspeed' runs on one node here (its multi-node path starts ranks over "
                             "ssh/pdsh); use launcher: torchrun with nodes > 1")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes


# Where the ranks run, not what they compute: left out of the train stage's fingerprint.
PLACEMENT_FIELDS = frozenset({"launcher", "nodes", "master_addr", "master_port", "join_timeout_s"})


class TrainConfig(_Strict):
    """Dense pretrain (or import) -> MoE runs. ``upcycled`` starts from the dense run's final weights,
    ``scratch`` from random weights with the same budget (null skips it); ``export`` names the run
    whose final weights become the stage's Hugging Face checkpoint."""

    model: ModelShapeConfig = ModelShapeConfig()
    moe: MoELayerConfig = MoELayerConfig()
    aux_loss: AuxLossConfig = AuxLossConfig()
    dense_source: Location | None = Field(
        None, description="a Hugging Face Llama, Mistral or Qwen2 checkpoint folder (safetensors); null = train dense")
    dense: PhaseConfig = PhaseConfig()
    upcycled: PhaseConfig | None = PhaseConfig(lr=1.8e-3)
    scratch: PhaseConfig | None = PhaseConfig()
    export: Literal["upcycled", "scratch"] = "upcycled"
    parallel: ParallelConfig = ParallelConfig()
    micro_batch_size: int = Field(4, ge=1, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (the last step always saves)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept per run; older ones are deleted "
                                                       "unless the evaluate stage evaluates them")
    eval_every: int = Field(50, ge=1, description="steps between validation-loss evaluations")
    eval_batches: int = Field(4, ge=1, description="validation micro-batches per language and source")
    similarity_every: int = Field(25, ge=1, description="steps between expert-similarity measurements")
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        # A run of 0 steps would hand its starting weights on as its result: only an import may do that.
        if self.dense.steps == 0 and not self.dense_source:
            raise ValueError("dense.steps must be >= 1 unless dense_source imports the dense model")
        for name in ("upcycled", "scratch"):
            if getattr(self, name) is not None and getattr(self, name).steps == 0:
                raise ValueError(f"{name}.steps must be >= 1 (or set {name}: null to skip the run)")
        if getattr(self, self.export) is None:
            raise ValueError(f"export names the '{self.export}' run, which is disabled (null)")
        if self.parallel.world_size % self.parallel.ep_size:
            raise ValueError(f"parallel.ep_size ({self.parallel.ep_size}) must divide parallel.world_size "
                             f"({self.parallel.world_size})")
        if self.moe.num_experts % self.parallel.ep_size:
            raise ValueError(f"parallel.ep_size ({self.parallel.ep_size}) must divide moe.num_experts "
                             f"({self.moe.num_experts})")
        return self


# ---------------------------------------------------------------------------------------- evaluate
SUITES = ("ceval", "cmmlu", "mmlu", "gsm8k", "math", "humaneval", "hellaswag", "piqa")


class SuiteConfig(_Strict):
    """One benchmark suite: few-shot examples and how many test items per task (null = all)."""

    num_fewshot: int | None = Field(None, ge=0, description="null = the suite's usual count")
    limit: int | None = Field(None, ge=1, description="items per task (per subject for the MMLU family)")


class EvaluateConfig(_Strict):
    """lm-evaluation-harness on local data. ``data_dir`` follows the layout of ../shared/data/bench
    (mmlu/, cmmlu/data/, ceval/, gsm8k/, math/jsonl/, humaneval/, hellaswag/, piqa/)."""

    model: Literal["skymoe", "hf"] = Field("skymoe", description="skymoe's lm-eval model class or lm-eval's hf")
    data_dir: Location = str(CONFIGS_DIR.parent / "examples" / "bench")
    suites: dict[str, SuiteConfig] = Field(default_factory=lambda: {name: SuiteConfig() for name in
                                                                    ("mmlu", "gsm8k", "hellaswag", "piqa")})
    run_code: bool = Field(False, description="execute model-written code for HumanEval (sandboxed subprocess)")
    unsafe_code_execution: bool = Field(
        False, description="HumanEval: where no OS sandbox can be made, run model-written code with the in-process "
                           "audit hook alone (a deliberate program escapes it); disposable machines only")
    batch_size: int = Field(16, ge=1)
    max_gen_tokens: int = Field(256, ge=1, description="a generation that never stops is cut here")
    checkpoint_every: int | None = Field(None, ge=1, description="also evaluate every n-th saved checkpoint")
    seed: int = 1234

    @field_validator("suites")
    @classmethod
    def _known(cls, value: dict[str, SuiteConfig]) -> dict[str, SuiteConfig]:
        unknown = sorted(set(value) - set(SUITES))
        if unknown:
            raise ValueError(f"unknown suites {unknown}: expected some of {', '.join(SUITES)}")
        if not value:
            raise ValueError("at least one suite is needed")
        return value

    @model_validator(mode="after")
    def _code_opt_in(self) -> "EvaluateConfig":
        if "humaneval" in self.suites and not self.run_code:
            raise ValueError("suite humaneval executes model-written code: set evaluate.run_code: true to opt in "
                             "(it runs sandboxed), or leave humaneval out")
        if self.unsafe_code_execution and not self.run_code:
            raise ValueError("evaluate.unsafe_code_execution needs evaluate.run_code: true")
        return self


# ------------------------------------------------------------------------------------------ whole
# ------------------------------------------------------------------------------------- incremental
class IncrementalConfig(_Strict):
    """Reruns on new data (the scheduled ``incremental`` deployment): files that appeared under
    ``clean.inputs`` are cleaned and deduplicated against everything kept before, tokenized onto
    the earlier shards, and the exported MoE trains on for ``train_tokens`` more tokens."""

    train_tokens: int = Field(102_400, ge=1, description="continued-training tokens per new generation")
    lr: float = Field(6e-4, gt=0, description="peak lr of continued training (a decayed peak, as for upcycling)")
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(5, ge=0, description="the optimizer restarts, so it warms up again")

    @model_validator(mode="after")
    def _lr_order(self) -> "IncrementalConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        return self

    def phase(self, train: TrainConfig, seq_len: int) -> PhaseConfig:
        """The continued run: as many steps as ``train_tokens`` needs at the train batch size."""
        per_step = train.micro_batch_size * train.grad_accum * train.parallel.world_size * seq_len
        return PhaseConfig(steps=-(-self.train_tokens // per_step), lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps)


class _PathOrigin(NamedTuple):
    """A path field's value as written, who wrote it (a file, a ``--set`` item, overrides, defaults)
    and what a relative value resolved against (None: nothing was resolved)."""

    value: Any
    source: str
    base: str | None


class PipelineConfig(_Strict):
    name: str = "skymoe"
    storage: StorageConfig = StorageConfig()
    clean: CleanConfig = CleanConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    incremental: IncrementalConfig = IncrementalConfig()
    # Set by load_config for describe_path; private, so never part of a dump or fingerprint.
    _path_origins: dict[str, _PathOrigin] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError("name must be non-empty and contain no '/'")
        return value


def run_overrides(root: str | None = None, inputs: list[str] | None = None,
                  executor: str | None = None) -> dict[str, Any]:
    """The nested overrides for the knobs a run exposes (CLI flags, deployment parameters); None (or no
    inputs) keeps the config's value, an empty string is refused."""
    overrides: dict[str, Any] = {}
    if root is not None:
        if not root.strip():  # an empty flag is a mistake (an unset variable?), not a request for the default
            raise ConfigError("--root (storage.root): empty; give a folder or URI, or leave --root out to use "
                              "the config's storage.root")
        overrides["storage"] = {"root": root}
    clean: dict[str, Any] = {}
    if inputs:
        blank = [uri for uri in inputs if not uri.strip()]
        if blank:
            raise ConfigError(f"--input (clean.inputs): empty input {blank[0]!r}; give a file, folder or glob")
        clean["inputs"] = list(inputs)
    if executor:
        clean["executor"] = {"kind": executor}
    if clean:
        overrides["clean"] = clean
    return overrides


# ----------------------------------------------------------------------------------------- overrides
_OVERRIDES = "overrides"  # who set a field when an override came from a plain dict (CLI flag, deployment)


class _Overrides(dict):
    """Overrides that remember which ``--set`` item set each field (dotted key -> ``--set a.b=c``), so a
    validation error blames that item instead of the config file."""

    def __init__(self, values: dict[str, Any] | None = None, sources: dict[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.sources: dict[str, str] = dict(sources or {})


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``--set`` items (``train.dense.steps=20``) into nested overrides for :func:`load_config`.

    A value is YAML, as it would be in the file: ``20`` is an int, ``true`` a bool, ``null`` None,
    ``[a.jsonl, b.jsonl]`` a list. Later items win; mappings merge, as between config files.
    Unknown fields are left for validation, which then names the item.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for item in items:
        keys, value = _parse_set_item(item)
        nested: dict[str, Any] = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            nested = {key: nested}
        values = _deep_merge(values, nested)
        for leaf in _leaf_keys(nested):
            _claim(sources, leaf, f"--set {item}")
    return _Overrides(values, sources)


def _parse_set_item(item: str) -> tuple[list[str], Any]:
    key, equals, text = item.partition("=")
    if not equals:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.dense.steps=20")
    keys = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"--set {item}: empty key before '='")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"--set {item}: empty segment in the dotted key '{key.strip()}'")
    try:
        value = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: value is not valid YAML: {_one_line(err)}") from None
    return [k.strip() for k in keys], value


def merge_overrides(*overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge override dicts, later ones winning (mappings merge, anything else replaces).

    Use it to combine :func:`run_overrides` with :func:`parse_set_overrides`: unlike a plain merge it
    keeps which ``--set`` item set which field, for :func:`load_config`'s error messages.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for extra in overrides:
        values = _deep_merge(values, copy.deepcopy(extra))
        for leaf in _leaf_keys(extra):
            _claim(sources, leaf, _blame(leaf, getattr(extra, "sources", {}), _OVERRIDES))
    return _Overrides(values, sources)


# ------------------------------------------------------------------------------------------- loading
def preset_path(name: str) -> Path:
    """The YAML file of a preset shipped in ``configs/``."""
    return CONFIGS_DIR / f"{name}.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a config file (the ``tiny`` preset when ``path`` is None).

    The file may ``extends:`` a preset or another file, whose settings it deep-merges over.
    ``overrides`` is a nested dict merged over the result (CLI flags such as ``--root``, ``--set``
    items). Raises :class:`ConfigError` naming the file (or ``--set`` item) and field on any problem.
    """
    config_file = Path(path) if path is not None else preset_path(DEFAULT_PRESET)
    if path is not None and not config_file.exists() and preset_path(str(path)).exists():
        config_file = preset_path(str(path))  # a preset name such as "tiny"
    config_file = Path(os.path.abspath(config_file))  # messages then say where relative paths resolved from
    cwd = Path.cwd()
    here = f"the working directory {cwd}"
    merged = _Merged()
    for file, raw in _file_chain(config_file):
        merged.add(raw, _resolve_file_paths(raw, file, cwd), {}, str(file), base=str(file), root_base=here)
    merged.add(overrides or {}, _resolve_paths(overrides or {}, cwd), getattr(overrides, "sources", {}), _OVERRIDES,
               base=here, root_base=here)
    storage = merged.values.setdefault("storage", {})
    if isinstance(storage, dict) and "root" not in storage:
        storage["root"] = _resolve(StorageConfig().root, cwd)
        merged.origins["storage.root"] = _PathOrigin(StorageConfig().root, "defaults", here)
    try:
        config = PipelineConfig.model_validate(merged.values)
    except ValidationError as err:
        raise _validation_error(err, merged.sources, str(config_file)) from None
    config._path_origins = merged.origins
    _add_default_origins(config)
    return config


def _file_chain(config_file: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """``config_file`` and the files it extends, base first, each with its mapping (``extends`` removed)."""
    raw = _read_mapping(config_file)
    if "extends" not in raw:
        return [(config_file, raw)]
    chain = (*chain, config_file.resolve())
    target = _extends_target(raw.pop("extends"), config_file)
    if target in chain:
        cycle = " -> ".join(str(p) for p in (*chain, target))
        raise ConfigError(f"{config_file}: field 'extends': cycle of extends: {cycle}")
    return [*_file_chain(target, chain), (config_file, raw)]


def _read_mapping(config_file: Path) -> dict:
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: config file not found")
    try:
        raw = _load_yaml(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_file}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: top level must be a mapping, got {type(raw).__name__}")
    return raw


class _DuplicateKey(yaml.YAMLError):
    """A mapping that names a key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error. PyYAML keeps the
    last value, so a second ``train:`` section would silently replace the first one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" merges, and may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable):  # an unhashable key is the base loader's error to report
                if key in first_line:
                    raise _DuplicateKey(f"duplicate key {key!r} on line {line} (first on line {first_line[key]})")
                first_line[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def _extends_target(value: Any, config_file: Path) -> Path:
    """The file ``extends:`` names: a bare name is a preset, anything with a '/' or a .yaml suffix a
    path relative to the extending file's folder (so a config and its base move together)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{config_file}: field 'extends': expected a preset name or a path to a YAML file, "
                          f"got {value!r}")
    if "/" not in value and os.sep not in value and not value.endswith((".yaml", ".yml")):
        if preset_path(value).is_file():
            return preset_path(value).resolve()
        presets = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(f"{config_file}: field 'extends': no preset '{value}' (presets: {presets}; "
                          f"a file needs a path such as ./{value}.yaml)")
    target = (config_file.resolve().parent / value).resolve()
    if not target.is_file():
        raise ConfigError(f"{config_file}: field 'extends': {value} not found (resolved relative to "
                          f"{config_file} to {target})")
    return target


def _resolve_file_paths(raw: dict, config_file: Path, cwd: Path) -> dict:
    """A file's paths resolve against its folder, except the output root: like any path given on a
    command line, the root is the user's, relative to the working directory."""
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("storage"), dict) and isinstance(raw["storage"].get("root"), str):
        raw["storage"]["root"] = _resolve(raw["storage"]["root"], cwd)
    return _resolve_paths(raw, config_file.resolve().parent)


def _validation_error(err: ValidationError, sources: dict[str, str], config_file: str) -> ConfigError:
    """One line; each problem under the file or ``--set`` item that set the field (the loaded file
    when none did, e.g. a check across fields), so the user knows what to fix."""
    grouped: dict[str, list[str]] = {}
    for error in err.errors():
        field = ".".join(str(p) for p in error["loc"])
        problem = f"field '{field or '<top>'}': {error['msg']}"
        grouped.setdefault(_blame(field, sources, config_file), []).append(problem)
    return ConfigError("; ".join(f"{source}: {'; '.join(problems)}" for source, problems in grouped.items()))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaf_keys(values: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys of the values a mapping sets; non-empty mappings are descended since they merge."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


_T = TypeVar("_T")


def _claim(table: dict[str, _T], key: str, entry: _T) -> None:
    """Record ``entry`` for dotted ``key``, dropping entries at, above or below it: the new value replaced them."""
    for old in [k for k in table if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")]:
        del table[old]
    table[key] = entry


def _blame(field: str, sources: dict[str, str], default: str) -> str:
    """Who set ``field`` or the nearest setting above it: the file or ``--set`` item to fix."""
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in sources:
            return sources[".".join(parts[:n])]
    return default


def _is_relative_local(path: str) -> bool:
    """A blank is not a path: left alone, validation names it rather than resolving it to a folder."""
    return bool(path.strip()) and "://" not in path and not os.path.isabs(path)


def _resolve(path: str, base: Path) -> str:
    return str((base / path).resolve()) if _is_relative_local(path) else path


# Fields holding local paths: (section path, kind) where kind says how the value holds them; a "*"
# stands for every key of the mapping there (see _path_fields).
_PATH_FIELDS = (
    (("clean", "inputs"), "list"),
    (("clean", "classifier", "languages", "*", "positive"), "list"),
    (("clean", "classifier", "languages", "*", "negative"), "list"),
    (("clean", "heuristics", "blocklist", "files"), "dict"),
    (("tokenize", "tokenizer", "path"), "str"),
    (("train", "dense_source"), "str"),
    (("evaluate", "data_dir"), "str"),
    (("storage", "root"), "str"),
)


def _path_fields(tree: Any) -> Iterator[tuple[tuple[str, ...], str]]:
    """``_PATH_FIELDS`` with each "*" replaced by the keys ``tree`` (a raw dict or a config) has there."""
    for keys, kind in _PATH_FIELDS:
        if "*" not in keys:
            yield keys, kind
            continue
        star = keys.index("*")
        node: Any = tree
        for key in keys[:star]:
            node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
        if isinstance(node, dict):
            yield from ((keys[:star] + (str(name),) + keys[star + 1:], kind) for name in node)


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make relative local paths in a raw config dict absolute against ``base``.

    A config file's paths resolve against the file's folder (a preset works from anywhere);
    overrides from the command line or a deployment resolve against the working directory.
    Values of the wrong type are left alone for validation to report.
    """
    resolved = copy.deepcopy(raw)
    for keys, kind in _path_fields(resolved):
        parent = resolved
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        value = parent[keys[-1]]
        if kind == "list" and isinstance(value, list):
            parent[keys[-1]] = [_resolve(v, base) if isinstance(v, str) else v for v in value]
        elif kind == "dict" and isinstance(value, dict):
            parent[keys[-1]] = {k: _resolve(v, base) if isinstance(v, str) else v for k, v in value.items()}
        elif kind == "str" and isinstance(value, str):
            parent[keys[-1]] = _resolve(value, base)
    return resolved


# ------------------------------------------------------------------------------------- path checks
# The files a stage reads through a path field, named here so that a missing one is reported before
# any work, naming the field, instead of by the stage that opens it hours later.
_TOKENIZER_FILE = "tokenizer.json"  # in a tokenizer folder (pipelines/tokenize/tokenizer.py)
_HF_CONFIG, _HF_WEIGHTS = "config.json", "*.safetensors"  # in a Hugging Face checkpoint (training/hf_import.py)


def check_paths(config: PipelineConfig, stages: Sequence[str] = PIPELINE_STAGES) -> None:
    """Raise one :class:`ConfigError` naming each path field whose files a stage in ``stages`` reads
    but that do not exist, with what was written there and where it resolved from.

    Not part of :func:`load_config`: ``skymoe show`` and a run of some stages need only some paths.
    No path field names what an earlier stage of the same run makes (stages hand their outputs on as
    references, not config paths), so every path a wanted stage reads must exist already.
    """
    from skymoe.storage import Storage  # here: storage imports this module

    storage = Storage.from_config(config.storage)
    problems = []
    for keys, kind in _path_fields(config):
        field, stage = ".".join(keys), keys[0]
        if stage not in stages or not _is_read(config, field):
            continue
        value: Any = config
        for key in keys:
            value = value[key] if isinstance(value, dict) else getattr(value, key)
        entries = value.items() if kind == "dict" else enumerate(value) if kind == "list" else [(None, value)]
        for name, uri in entries:
            if uri is None:
                continue
            try:
                missing = _missing(storage, field, uri)
            except Exception as err:  # an unreachable store, bad credentials, ...
                missing = f"cannot check {uri}: {_one_line(err)}"
            if missing:
                key = f"{field}.{name}" if kind == "dict" else field
                origin = config._path_origins.get(key)
                if kind == "list" and origin is not None and isinstance(origin.value, list) \
                        and len(origin.value) == len(value):
                    origin = origin._replace(value=origin.value[name])  # the entry, not the whole list
                problems.append(f"{key}: {missing}; written as {_describe(uri, origin)}")
    if problems:
        raise ConfigError("; ".join(problems))


def _is_read(config: PipelineConfig, field: str) -> bool:
    """storage.root is written, not read; the files of a step turned off are never opened."""
    clean = config.clean
    if field.startswith("clean.classifier."):
        return clean.classifier.enabled
    if field.startswith("clean.heuristics.blocklist."):
        return clean.heuristics.enabled and clean.heuristics.blocklist.enabled
    return field != "storage.root"


def _missing(storage: Storage, field: str, uri: str) -> str | None:
    """What the stage reading ``field`` would not find at ``uri``; None when everything is there."""
    fs, path = storage.fs(uri)
    folder = path.rstrip("/")
    if field == "clean.inputs":
        if glob.has_magic(path):
            return None if fs.glob(path) else f"no file matches {uri}"
        return None if fs.exists(path) else f"no such file or folder: {uri}"
    if field == "tokenize.tokenizer.path":
        inside = "" if path.endswith(".json") else f"/{_TOKENIZER_FILE}"
        return None if fs.isfile(folder + inside) else f"no such file: {uri.rstrip('/')}{inside}"
    if field == "evaluate.data_dir":  # the suites' folders in it: the evaluate stage's check parses them
        return None if fs.isdir(path) else f"no such folder: {uri}"
    if field == "train.dense_source":
        if not fs.isdir(path):
            return f"no such folder: {uri}"
        if not fs.isfile(f"{folder}/{_HF_CONFIG}"):
            return f"no {_HF_CONFIG} in {uri}: not a Hugging Face checkpoint folder"
        return None if fs.glob(f"{folder}/{_HF_WEIGHTS}") else f"no {_HF_WEIGHTS} weights in {uri}"
    return None if fs.isfile(path) else f"no such file: {uri}"  # a resource file: examples, a blocklist


# ---------------------------------------------------------------------------------------- provenance
class _Merged:
    """Settings merged layer by layer (base files, the loaded file, overrides), with who set each
    field (for error messages) and each path field's value as written (for :func:`describe_path`)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.origins: dict[str, _PathOrigin] = {}

    def add(self, raw: dict, resolved: dict, sources: dict[str, str], source: str, base: str, root_base: str) -> None:
        """Merge one layer: ``raw`` as written, ``resolved`` with its paths absolute. ``sources`` names
        who set a dotted key (``--set`` items), ``source`` everything else; relative path fields resolved
        against ``base``, ``storage.root`` against ``root_base``."""
        self.values = _deep_merge(self.values, resolved)
        for leaf in _leaf_keys(raw):
            _claim(self.sources, leaf, _blame(leaf, sources, source))
        for key, field, value in _path_entries(raw):
            resolved_against = root_base if field == "storage.root" else base
            _claim(self.origins, key, _PathOrigin(value, _blame(key, sources, source), resolved_against))


def _path_entries(raw: dict) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, path field, value as written) for each path field ``raw`` sets; a dict field
    entry by entry, since its entries merge across layers and may come from different files."""
    for keys, kind in _path_fields(raw):
        value: Any = raw
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            field = ".".join(keys)
            if kind == "dict" and isinstance(value, dict):
                yield from ((f"{field}.{k}", field, v) for k, v in value.items())
            else:
                yield field, field, value


def _add_default_origins(config: PipelineConfig) -> None:
    """Path fields no layer set hold their defaults: say so rather than nothing."""
    for key, value in _path_values(config).items():
        config._path_origins.setdefault(key, _PathOrigin(value, "defaults", None))


def _path_values(config: PipelineConfig) -> dict[str, Any]:
    """Each path field's validated value by dotted key, a dict field entry by entry."""
    values: dict[str, Any] = {}
    for keys, kind in _path_fields(config):
        value: Any = config
        for key in keys:
            value = value[key] if isinstance(value, dict) else getattr(value, key)
        field = ".".join(keys)
        values.update({f"{field}.{k}": v for k, v in value.items()} if kind == "dict" else {field: value})
    return values


def describe_path(config: PipelineConfig, field: str) -> str:
    """Where a path field's value came from, e.g. ``"../corpus" (relative to /x/configs/tiny.yaml)``.

    Values are absolute once loaded; an error about a missing file should also show what the user
    wrote and where, since a relative path resolves against the folder of the file that holds it
    (the working directory for ``--set``, other overrides and ``storage.root``).
    """
    fields = {".".join(keys): kind for keys, kind in _path_fields(config)}
    if fields.get(field) is None:
        raise ValueError(f"{field!r} is not a path field: expected one of {', '.join(fields)}")
    values = {k: v for k, v in _path_values(config).items() if k == field or k.startswith(f"{field}.")}
    if fields[field] != "dict":
        return _describe(values[field], config._path_origins.get(field))
    entries = [f"{k[len(field) + 1:]}: {_describe(v, config._path_origins.get(k))}" for k, v in values.items()]
    return ", ".join(entries) or "{}"


def _describe(value: Any, origin: _PathOrigin | None) -> str:
    if origin is None:  # built in code, not by load_config
        return _show(value)
    written = origin.value if isinstance(origin.value, list) else [origin.value]
    relative = any(isinstance(v, str) and _is_relative_local(v) for v in written)
    if origin.base is None or not relative:
        return f"{_show(origin.value)} (from {origin.source})"
    if origin.base == origin.source:
        return f"{_show(origin.value)} (relative to {origin.source})"
    return f"{_show(origin.value)} (from {origin.source}, relative to {origin.base})"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(json.dumps(v, ensure_ascii=False, default=str) for v in value) or "[]"
    return json.dumps(value, ensure_ascii=False, default=str)
