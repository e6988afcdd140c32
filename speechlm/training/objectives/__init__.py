"""Training objectives, one module per task: `ctc` (character CTC fine-tuning),
`wav2vec2_pretrain` (self-supervised continued pre-training), ...

An objective has `.model`, `loss(batch) -> (loss, metrics)` and optionally
`evaluate(model) -> dict` (see speechlm.training.trainer). Importing this
package does not import torch; import the submodule you need.
"""

from ..._lazy import lazy_exports

_EXPORTS = {
    "CTCObjective": "ctc",
    "CTCCollator": "ctc",
    "prepare_ctc_records": "ctc",
    "Wav2Vec2PretrainObjective": "wav2vec2_pretrain",
    "GumbelSchedule": "wav2vec2_pretrain",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
