"""Data: manifests (JSONL), datasets, duration-bucketing samplers, collators, text corpora.

Kept light: names are imported from their modules on first use, so
`import speechlm.data` does not load torch.

    from speechlm.data import iter_manifest, AudioDataset, DurationBucketSampler, AudioCollator
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AUDIO_PATH_KEY": "manifest",
    "iter_manifest": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "validate_manifest": "manifest",
    "ValidationReport": "manifest",
    "fill_durations": "manifest",
    "resolve_audio": "manifest",
    "manifest_stats": "stats",
    "ManifestStats": "stats",
    "AudioDataset": "dataset",
    "SkipReport": "dataset",
    "AudioCollator": "collate",
    "SkippedItem": "collate",
    "DurationBucketSampler": "sampler",
    "RandomBatchSampler": "sampler",
    "padding_fraction": "sampler",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
