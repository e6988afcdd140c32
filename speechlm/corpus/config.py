"""The `speechlm build clean-text` config: one section per stage, each with `enabled`.

Filter sections carry the keyword arguments of the datatrove filter they
configure, under the same names and with the same defaults, so datatrove's
documentation of a threshold is ours too. `speechlm.config.load_config`
validates the YAML: an unknown key is an error naming the file, line, the key
and the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..config import config_from_dict, load_config

__all__ = ["CleanTextConfig", "load_clean_text_config"]


@dataclass
class InputConfig:
    # plain text: `file` = one document per file (what the web-page filters are tuned for),
    # `paragraph` = blank-line-separated paragraphs, `line` = one document per line
    text_unit: Literal["file", "paragraph", "line"] = "file"
    text_key: str = "text"  # JSONL field holding the text
    max_line_bytes: int = 1_000_000  # a longer line is skipped (and counted), never loaded


@dataclass
class SlurmConfig:
    partition: str = ""
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    job_name: str = "clean-text"
    venv_path: str | None = None
    sbatch_args: dict[str, str] = field(default_factory=dict)


@dataclass
class RayConfig:
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass
class ExecutorConfig:
    kind: Literal["local", "slurm", "ray"] = "local"
    tasks: int = 1  # shards of the input (by file); fixed for the life of an output directory
    workers: int = 1  # tasks run at once (local)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        if self.tasks < 1 or self.workers < 1:
            raise ValueError("tasks and workers must be >= 1")


@dataclass
class UnicodeConfig:
    enabled: bool = True  # ftfy through datatrove's FTFYFormatter (its defaults)


@dataclass
class LanguageConfig:
    enabled: bool = True
    keep: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes of py3langid
    min_score: float = 0.5  # py3langid's normalised probability of the best language
    max_chars: int = 20_000  # classify the beginning of long documents only (speed)

    def __post_init__(self):
        if not self.keep:
            raise ValueError("language.keep lists no language; name at least one (e.g. [en])")


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = field(
        default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                 (10, 0.10)])


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


@dataclass
class C4Config:
    enabled: bool = True
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclass
class FineWebConfig:
    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclass
class RefineConfig:
    # ProX (arXiv 2409.17115): a program per document (drop_doc, keep_doc, remove_lines,
    # normalize) written by the rules or a local instruct LLM, run under the paper's guard
    enabled: bool = False
    writer: Literal["rules", "llm"] = "rules"
    llm: str = "models:smollm2-135m-instruct"  # the llm writer's model (a dir or a name)
    chunk_lines: int = 24  # the llm writer reads this many non-blank lines at a time
    batch_size: int = 8  # llm writer: chunks generated together
    max_boilerplate_fraction: float = 0.7  # rules: drop_doc() above this share of lines
    max_error_ops: int = 2  # guard: this many malformed operations -> keep the original
    min_words: int = 10  # guard: fewer words left -> drop
    min_kept_fraction: float = 0.05  # guard: less of the words left -> drop

    def __post_init__(self):
        if self.chunk_lines < 1 or self.batch_size < 1 or self.max_error_ops < 1:
            raise ValueError("refine.chunk_lines, batch_size and max_error_ops must be >= 1")
        if not 0 <= self.min_kept_fraction <= 1 or not 0 < self.max_boilerplate_fraction <= 1:
            raise ValueError("refine.min_kept_fraction must be in [0, 1] and "
                             "max_boilerplate_fraction in (0, 1]")


@dataclass
class PerplexityConfig:
    # CCNet-style buckets by a word n-gram LM's perplexity (speechlm.corpus.perplexity)
    enabled: bool = False  # needs a reference: the text you want the corpus to read like
    reference: str | None = None  # text to build the LM from (a file, or embedded:en / es)
    lm: str | None = None  # or an ARPA file (speechlm build lm; KenLM's lmplz)
    order: int = 3  # of the LM built from `reference`
    head_max: float | None = None  # cut-offs; None: terciles of held-out reference lines
    middle_max: float | None = None
    keep: list[str] = field(default_factory=lambda: ["head", "middle", "tail"])
    max_words: int | None = 2000  # score the beginning of long documents only (speed)

    def __post_init__(self):
        unknown = [b for b in self.keep if b not in ("head", "middle", "tail")]
        if unknown or not self.keep:
            raise ValueError(f"perplexity.keep must list buckets of head, middle, tail; got "
                             f"{self.keep}")


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # same text after whitespace is collapsed: keep the first


@dataclass
class NearDedupConfig:
    enabled: bool = True
    n_grams: int = 5  # word shingles (SPECS: 5-gram)
    num_buckets: int = 14  # LSH bands; 14 x 8 keeps a Jaccard-0.8 pair with p = 0.92
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass
class TTSConfig:
    enabled: bool = True
    verbalize: bool = True  # numbers, symbols, abbreviations written out (speechlm.text.verbalize)
    max_sentence_chars: int = 400  # longer sentences are cut at a comma or space for synthesis


@dataclass
class ReportConfig:
    examples: int = 3  # removed documents shown per stage
    example_chars: int = 300


@dataclass
class CleanTextConfig:
    input: InputConfig = field(default_factory=InputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    unicode: UnicodeConfig = field(default_factory=UnicodeConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def main_language(self) -> str:
        """The language whose word tokenizer the filters and MinHash use."""
        return self.language.keep[0]


def filter_kwargs(section) -> dict:
    """A filter section as datatrove keyword arguments (everything but `enabled`)."""
    kwargs = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
              if f.name != "enabled"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def load_clean_text_config(path=None, overrides=()) -> CleanTextConfig:
    """The config in YAML file `path` (defaults if None) with `key.sub=value` overrides."""
    if path is None:
        from ..config import apply_overrides

        return apply_overrides(config_from_dict(CleanTextConfig, {}), overrides)
    return load_config(CleanTextConfig, path, overrides)
