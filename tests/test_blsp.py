"""BLSP stage 2: the CE loss covers exactly the continuation (+ EOS), never speech; the KD
teacher reads the transcript and lines up with the student token for token; only the adapter
learns; a tiny end-to-end recipe run (stage 1, encoder cache, training) lowers its loss,
saves a reloadable model and writes the transfer table; bad inputs are refused clearly."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from speechlm.data.instructions import CONTINUE_INSTRUCTION
from speechlm.errors import ConfigError, SpeechLMError
from speechlm.models.adapters import AdapterOutput
from speechlm.models.encoders import EncoderOutput
from speechlm.models.prompts import IGNORE_INDEX, get_template
from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
from speechlm.recipes import load_recipe
from speechlm.recipes.blsp_eval import SpeechSource, alignment_metrics, format_transfer_table
from speechlm.testing.runs import train_losses
from speechlm.testing.tiny_tokenizers import CTC_CHARACTERS
from speechlm.training.objectives.blsp import (
    EMBED_LOSSES,
    BlspObjective,
    batch_speech,
    embedding_loss,
    kd_loss,
    response_logits,
    transcript_token_ids,
)

SR = 16000
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And the earth was without form, and void.",
         "Jesus wept.",
         "And God said, Let there be light: and there was light.",
         "Blessed are the meek: for they shall inherit the earth.",
         "Love is patient, love is kind."]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    config = SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                            llm_path=str(tiny_ckpt("llama")), adapter="blsp",
                            adapter_options={"bottleneck_dim": 16}, template="blsp",
                            instruction=CONTINUE_INSTRUCTION)
    torch.manual_seed(0)
    return SpeechLM.build(config)


def _batch(model, n=3, seed=0, frames=40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, frames, model.encoder.output_dim, generator=gen)
    lengths = torch.tensor([frames, frames * 3 // 4, frames // 2][:n])
    return {"encoder_hidden": hidden, "encoder_lengths": lengths, "texts": TEXTS[:n],
            "continuation": ["and it was good.", "darkness was upon the deep", "amen"][:n]}


def test_ce_labels_cover_the_continuation_and_eos_only(model):
    batch = _batch(model)
    objective = BlspObjective(model, loss="ce")
    inputs, extra = objective.student_inputs(batch, batch["continuation"])
    assert extra == {}  # the BLSP adapter has no count or embedding loss
    tok = model.tokenizer
    for row, response in enumerate(batch["continuation"]):
        learned = inputs.labels[row][inputs.labels[row] != IGNORE_INDEX].tolist()
        assert learned == tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # the BLSP original once put labels on speech positions: never here
        assert bool((inputs.labels[row][inputs.speech_mask[row]] == IGNORE_INDEX).all())
        assert int(inputs.speech_mask[row].sum()) == int(
            model.adapter.output_lengths(batch["encoder_lengths"])[row])
    loss, metrics = objective.loss(batch)
    expected = torch.nn.functional.cross_entropy(
        model.lm_forward(inputs).logits[:, :-1].flatten(0, 1).float(),
        inputs.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert metrics["response_tokens"] == float((inputs.labels != IGNORE_INDEX).sum())


def test_kd_teacher_reads_the_transcript_and_aligns_token_by_token(model):
    batch = _batch(model)
    objective = BlspObjective(model, loss="kd", temperature=2.0)
    teacher = objective.teacher_inputs(batch, batch["continuation"])
    template = get_template("blsp")
    for row, text in enumerate(TEXTS[:3]):
        prompt = template.encode(model.tokenizer, CONTINUE_INSTRUCTION, transcript=text)
        ids = teacher.input_ids[row][teacher.attention_mask[row].bool()].tolist()
        assert ids[: len(prompt.prompt_ids())] == prompt.prompt_ids()
        assert not bool(teacher.speech_mask[row].any())
    student = response_logits(model, objective.student_inputs(batch, batch["continuation"])[0])
    with torch.no_grad():
        taught = response_logits(model, teacher, use_lora=False)
    assert torch.equal(student.targets, taught.targets)  # the same tokens in the same order
    assert torch.equal(student.rows, taught.rows)
    # KL is zero for identical logits and positive otherwise; T scales it down
    assert float(kd_loss(taught.logits, taught.logits)) == pytest.approx(0.0, abs=1e-6)
    kd2 = float(kd_loss(student.logits, taught.logits, 2.0).detach())
    assert kd2 > 0 and float(kd_loss(student.logits, taught.logits, 1.0).detach()) > kd2
    loss, metrics = objective.loss(batch)
    assert float(loss.detach()) == pytest.approx(kd2, rel=1e-4)
    assert 0.0 <= metrics["teacher_agreement"] <= 1.0


@pytest.mark.parametrize("kind", ["ce", "kd", "ce+kd"])
def test_only_the_adapter_gets_gradients(model, kind):
    model.zero_grad(set_to_none=True)
    loss, _ = BlspObjective(model, loss=kind).loss(_batch(model))
    loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"adapter"}
    assert all(p.grad is None for p in model.llm.parameters())
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def cif_model(tiny_ckpt):
    config = SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                            llm_path=str(tiny_ckpt("llama")), adapter="cif",
                            adapter_options={"d_model": 32, "num_heads": 2}, template="blsp",
                            instruction=CONTINUE_INSTRUCTION)
    torch.manual_seed(0)
    return SpeechLM.build(config)


def test_cif_student_fires_one_embedding_per_transcript_token_in_the_teachers_place(cif_model):
    """BLSP-KD with CIF: the speech takes exactly as many positions as the transcript's
    tokens, so every response token sits at the same position in both passes."""
    batch = _batch(cif_model, frames=200)  # CIF fires at most one token per 4 frames
    objective = BlspObjective(cif_model, loss="kd", embed_weight=1.0)
    inputs, extra = objective.student_inputs(batch, batch["continuation"])
    teacher = objective.teacher_inputs(batch, batch["continuation"])
    tokens = transcript_token_ids(cif_model, batch["texts"])
    for row in range(3):
        assert int(inputs.speech_mask[row].sum()) == len(tokens[row])
        student_at = (inputs.labels[row] != IGNORE_INDEX).nonzero()[:, 0]
        teacher_at = (teacher.labels[row] != IGNORE_INDEX).nonzero()[:, 0]
        # the text prompt holds " transcript" as these very tokens (no merge at the join)
        assert torch.equal(student_at, teacher_at)
    speech = cif_model.encode_speech(**batch_speech(batch))
    quantity = speech.quantity.detach()
    target = torch.tensor([len(t) for t in tokens], dtype=torch.float)
    assert float(extra["count"].detach()) == pytest.approx(float((quantity - target).abs().mean()), rel=1e-5)
    loss, metrics = objective.loss(batch)
    assert {"count_loss", "embed_loss", "kd"} <= set(metrics)
    assert float(loss) == pytest.approx(metrics["count_loss"] + metrics["embed_loss"]
                                        + metrics["kd"], rel=1e-4)


def test_embedding_loss_is_least_for_the_tokens_own_embeddings(cif_model):
    embed = cif_model.llm.get_input_embeddings()
    ids = [[5, 9, 17], [30, 2]]
    own = torch.zeros(2, 3, embed.weight.shape[1])
    for row, tokens in enumerate(ids):
        own[row, : len(tokens)] = embed.weight[tokens].detach()
    shuffled = own[:, [2, 0, 1]]
    for kind in EMBED_LOSSES:
        exact = float(embedding_loss(AdapterOutput(own, torch.tensor([3, 2])), ids, embed, kind))
        wrong = float(embedding_loss(AdapterOutput(shuffled, torch.tensor([3, 2])), ids, embed,
                                     kind))
        assert exact < wrong
        if kind == "mse":
            assert exact == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="loss.embed_loss must be one of mse, ce, mse\\+ce"):
        BlspObjective(cif_model, embed_loss="cosine")


def test_the_embedding_loss_needs_a_cif_adapter(model):
    with pytest.raises(ConfigError, match="needs an adapter that emits one embedding per "
                                          "token: set model.adapter: cif"):
        BlspObjective(model, loss="kd", embed_weight=1.0)


def _updates_on_one_batch(model, frames: int, steps: int = 25, **loss_options) -> list[dict]:
    """The metrics of `steps` Adam updates of a copy of `model` on one batch (KD + options)."""
    import copy

    model = copy.deepcopy(model)
    batch = _batch(model, frames=frames)
    objective = BlspObjective(model, loss="kd", **loss_options)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    torch.manual_seed(0)
    for _ in range(steps):
        loss, metrics = objective.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    return history


def test_token_ctc_trains_a_frame_rate_adapter_beside_kd(model):
    """loss.ctc_weight on the BLSP conv adapter: the CTC reads the adapter's outputs (the
    positions the LLM reads) and a few updates on one batch halve it."""
    history = _updates_on_one_batch(model, frames=400, ctc_weight=1.0)  # 50 outputs at 8x
    assert history[-1]["ctc_loss"] < 0.5 * history[0]["ctc_loss"]


def test_cif_adapter_learns_the_count_and_the_embeddings(cif_model):
    """A few updates on one batch lower the count error and the embedding loss."""
    history = _updates_on_one_batch(cif_model, frames=200, embed_weight=1.0)
    assert history[-1]["count_loss"] < 0.5 * history[0]["count_loss"]
    assert history[-1]["embed_loss"] < 0.5 * history[0]["embed_loss"]


def test_alignment_metrics_compare_speech_with_the_transcript(model):
    batch = _batch(model)
    records = [{"id": str(i), "text": t, "continuation": c}
               for i, (t, c) in enumerate(zip(batch["texts"], batch["continuation"], strict=True))]

    class Frames(SpeechSource):
        def batch(self, chunk):
            idx = [int(r["id"]) for r in chunk]
            return {"encoder_output": EncoderOutput(batch["encoder_hidden"][idx],
                                                    batch["encoder_lengths"][idx])}

    metrics = alignment_metrics(model.eval(), Frames(), records, CONTINUE_INSTRUCTION,
                                generate_items=2, max_new_tokens=4, batch_size=2)
    teacher = response_logits(model, model.build_text_inputs(
        batch["texts"], instructions=CONTINUE_INSTRUCTION, responses=batch["continuation"]))
    ce_text = torch.nn.functional.cross_entropy(teacher.logits, teacher.targets)
    assert metrics["align_ce_text"] == pytest.approx(float(ce_text), rel=1e-4)
    assert metrics["align_kl"] > 0 and 0 <= metrics["align_agreement"] <= 1
    assert 0 <= metrics["align_gen_f1"] <= 1 and "align_gen_chrf" in metrics


# -- the recipe end to end ------------------------------------------------------------------


def _manifest(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def speech_data(tmp_path):
    """Six short clips (noise with a per-clip tone) with transcripts; train = dev = test."""
    audio = tmp_path / "audio"
    audio.mkdir()
    records = []
    for i, text in enumerate(TEXTS):
        t = np.arange(int((0.6 + 0.1 * i) * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.01 * np.random.default_rng(i) \
            .standard_normal(t.size)
        sf.write(audio / f"u{i}.wav", wave.astype(np.float32), SR)
        records.append({"id": f"u{i}", "audio": f"audio/u{i}.wav", "duration": t.size / SR,
                        "text": text, "translation": f"es {i}"})
    return _manifest(tmp_path / "train.jsonl", records)


def _llm(tiny_ckpt):
    # Large initial weights: an untrained LLM whose outputs depend on its inputs, so an
    # adapter can steer it (with the default 0.02 init the output barely moves).
    return tiny_ckpt("llama", initializer_range=0.1)


def _overrides(tiny_ckpt, tmp_path, manifest, **more):
    values = {
        "model.encoder_path": str(tiny_ckpt("wav2vec2")), "model.llm_path": str(_llm(tiny_ckpt)),
        "model.adapter_options": "{bottleneck_dim: 16}",
        "data.train": str(manifest), "data.dev": str(manifest),
        "data.encoder_cache": str(tmp_path / "enc_cache"), "data.max_batch_duration": 3.0,
        "continuations.max_new_tokens": 8, "continuations.batch_size": 4,
        "eval.transfer": str(manifest), "eval.transfer_tasks": "[repeat, translate_es]",
        "eval.dev_items": 4, "eval.generate_items": 2, "eval.batch_size": 4,
        "loss.kind": "ce", "train.max_steps": 40, "train.lr": 1.0e-2, "train.warmup_steps": 0,
        "train.eval_every": 40, "train.save_every": 40, "train.log_every": 5,
        "train.output_dir": str(tmp_path / "run"), "train.progress": "false",
        "train.tensorboard": "false", "train.best_metric": "align_kl",
    }
    values.update(more)
    return [f"{k}={v}" for k, v in values.items()]


def _ctc_checkpoint(tiny_ckpt, tmp_path):
    """The tiny wav2vec2 with a character vocabulary, saved as a *ForCTC model (its head
    starts random) like the zoo's ctc_en."""
    import shutil

    out = tmp_path / "ctc_encoder"
    shutil.copytree(tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["Wav2Vec2ForCTC"]}))
    return out


def test_tiny_blsp_run_learns_saves_and_reports(tiny_ckpt, tmp_path, speech_data):
    # a CTC checkpoint as the encoder: the table gets the cascade through its own transcripts
    encoder = _ctc_checkpoint(tiny_ckpt, tmp_path)
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **{"model.encoder_path": str(encoder)}))
    results = module.run(config)
    run = tmp_path / "run"
    losses = train_losses(run)
    assert losses[-1] < 0.92 * losses[0], losses  # an untrained LLM: the adapter steers it a little
    # stage 1 wrote the continuations; the cache holds every clip once
    conts = [json.loads(line) for line in (run / "continuations" / "train.jsonl").open()]
    assert [c["id"] for c in conts] == [f"u{i}" for i in range(6)]
    assert all(c["continuation"] for c in conts)
    # the transfer table: four systems, both tasks, the cascades read the reference text and
    # the encoder's own CTC transcripts
    table = results["transfer"]
    heard = "cascade (the encoder's CTC transcript)"
    assert set(table) == {"untrained adapter", "BLSP (ce)", "cascade (reference text)", heard}
    assert set(table["BLSP (ce)"]) == {"repeat", "translate_es"}
    assert "cascade (reference text)" in format_transfer_table(table)
    assert {"align_kl", "align_agreement", "align_gen_chrf"} <= set(results["alignment"])
    hyps = [json.loads(line) for line in (run / "transfer_hyps.jsonl").open()]
    assert len(hyps) == 4 * 2 * 6
    # the saved model holds the adapter only and reloads to the same continuation
    saved = SpeechLM.from_pretrained(run / "final")
    assert set(saved.trainable_state_dict()) == {
        n for n, _ in saved.named_parameters() if n.startswith("adapter.")}
    from speechlm.pipelines.encoder_cache import EncoderCache

    cache = EncoderCache.for_encoder(tmp_path / "enc_cache", saved.encoder)
    source = SpeechSource(cache)
    record = dict(conts[0], audio=str(tmp_path / "audio" / "u0.wav"))
    from speechlm.data.instructions import TASKS

    repeat = TASKS["repeat"]
    again = saved.generate(instructions=repeat.instructions[0],
                           max_new_tokens=repeat.max_new_tokens, **source.batch([record]))
    trained = next(h for h in hyps if h["system"] == "BLSP (ce)" and h["task"] == "repeat"
                   and h["id"] == "u0")
    assert again == [trained["hypothesis"]]  # the reloaded model answers as the trained one


def test_augmentation_turns_the_cache_off_with_a_message(tiny_ckpt, tmp_path, speech_data,
                                                         capsys):
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **{"data.noise_snr_db": 20, "train.max_steps": 3,
                                             "train.progress": "true", "eval.transfer": "null"}))
    module.run(config)
    out = capsys.readouterr().out
    assert "data.noise_snr_db changes the audio" in out and "cache is off" in out
    assert not (tmp_path / "enc_cache").exists()


def test_continuations_of_another_manifest_are_refused(tiny_ckpt, tmp_path, speech_data):
    from speechlm.pipelines.continuations import build_continuations

    other = _manifest(tmp_path / "other.jsonl",
                      [json.loads(line) for line in speech_data.open()][:3])
    build_continuations(str(_llm(tiny_ckpt)), other, tmp_path / "other_cont.jsonl",
                        max_new_tokens=4)
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data,
        **{"data.train_continuations": str(tmp_path / "other_cont.jsonl")}))
    with pytest.raises(SpeechLMError, match="other.jsonl"):
        module.run(config)


def test_init_from_starts_a_run_from_a_trained_adapter(tiny_ckpt, tmp_path, speech_data):
    quick = {"train.max_steps": 3, "train.eval_every": 3, "train.save_every": 3,
             "eval.transfer": "null", "eval.generate_items": 0}
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick))
    module.run(config)
    first = SpeechLM.from_pretrained(tmp_path / "run" / "final").trainable_state_dict()
    # a second run from it, at a learning rate too small to move anything: it ends where the
    # first ended, not at a fresh initialisation
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **{
            **quick, "init_from": str(tmp_path / "run" / "final"), "train.lr": 1e-12,
            "train.max_steps": 1, "train.output_dir": str(tmp_path / "second")}))
    module.run(config)
    second = SpeechLM.from_pretrained(tmp_path / "second" / "final").trainable_state_dict()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick, **{
            "init_from": str(tmp_path), "train.output_dir": str(tmp_path / "third")}))
    with pytest.raises(ConfigError, match="is not a SpeechLM checkpoint"):
        module.run(config)


def test_a_run_reads_a_zoo_members_continuations_or_writes_its_own(tiny_ckpt, tmp_path,
                                                                   speech_data, monkeypatch):
    from speechlm import zoo

    quick = {"train.max_steps": 2, "train.eval_every": 2, "train.save_every": 2,
             "eval.transfer": "null", "eval.generate_items": 0}
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick))
    module.run(config)  # "the member": a finished run with its stage-1 files
    member_dir = {"run": tmp_path / "run"}
    monkeypatch.setattr(zoo, "ensure", lambda name, **kw: zoo.ZooModel(
        name, member_dir["run"] / "final", member_dir["run"], {}, False, 0.0))
    spec = {"data.train_continuations": "zoo:blsp_en", "data.dev_continuations": "zoo:blsp_en"}
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick, **spec,
        **{"train.output_dir": str(tmp_path / "second")}))
    module.run(config)
    assert not (tmp_path / "second" / "continuations").exists()  # read the member's

    member_dir["run"] = tmp_path / "empty"  # a member without them (a shipped install)
    (tmp_path / "empty").mkdir()
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick, **spec,
        **{"train.output_dir": str(tmp_path / "third")}))
    module.run(config)
    assert (tmp_path / "third" / "continuations" / "train.jsonl").is_file()


def test_more_speech_is_spoken_continued_and_trained_on_beside_train(tiny_ckpt, tmp_path,
                                                                   speech_data, small_corpus):
    quick = {"train.max_steps": 2, "train.eval_every": 2, "train.save_every": 2,
             "eval.transfer": "null", "eval.generate_items": 0,
             "data.train": "embedded:en/train", "data.dev": "embedded:en/dev",
             "data.max_batch_duration": 20.0}
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick, **{"data.more_speech": 5}))
    results = module.run(config)
    more = [json.loads(line) for line in
            (tmp_path / "run" / "continuations" / "more_train.jsonl").open()]
    assert len(more) == 5 and all(c["continuation"] for c in more)
    assert all(c["id"].startswith("en-more-train-") for c in more)
    assert results["data"]["train_items"] == 12 + 5  # the split's 12 and 5 more
    # bad settings name the field and the fix
    with pytest.raises(ConfigError, match="data.train must be an embedded split"):
        load_recipe("recipes/tiny/blsp.yaml", _overrides(
            tiny_ckpt, tmp_path, speech_data, **{"data.more_speech": 5}))
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **quick, **{
            "data.more_speech": 40000, "train.output_dir": str(tmp_path / "second")}))
    with pytest.raises(ConfigError, match=r"data.more_speech: .*only 30077 verses qualify"):
        module.run(config)


@pytest.mark.parametrize("recipe", ["recipes/tiny/blsp.yaml",
                                    "recipes/blsp/whisper_small_qwen2.5_1.5b.yaml",
                                    "recipes/blsp/whisper_large_v3_qwen2.5_7b_lora.yaml",
                                    "recipes/blsp/whisper_large_v3_qwen2.5_7b_cformer.yaml"])
def test_shipped_recipes_validate(recipe):
    from speechlm.models.adapters import build_adapter

    _, config = load_recipe(recipe)
    assert config.model.adapter in ("blsp", "cif") and config.loss.kind in ("ce", "kd")
    if "7b" in recipe:
        lora = config.model.lora or config.model.plora
        assert lora.r == 16 and config.loss.temperature == 2.0
    # the adapter options build (small stand-in widths; the real ones are the models')
    build_adapter(config.model.adapter, 64, 96, **config.model.adapter_options)


def test_unknown_loss_is_rejected_with_the_choices():
    from speechlm.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.kind must be one of ce, kd, ce\\+kd"):
        load_recipe("recipes/tiny/blsp.yaml", ["loss.kind=mse"])


def test_noise_augmentation_has_the_asked_snr_and_is_repeatable(speech_data):
    from speechlm.data.dataset import AudioDataset
    from speechlm.recipes.blsp import NoisyAudioDataset

    clean = AudioDataset(speech_data)
    noisy = NoisyAudioDataset(clean, snr_db=10.0, seed=3)
    for i in range(3):
        signal = clean[i]["audio"]
        noise = noisy[i]["audio"] - signal
        snr = 10 * torch.log10(signal.pow(2).mean() / noise.pow(2).mean())
        assert abs(float(snr) - 10.0) < 0.5
        assert torch.equal(noisy[i]["audio"], noisy[i]["audio"])  # the same noise again
    assert not torch.equal(noisy[0]["audio"] - clean[0]["audio"],
                           NoisyAudioDataset(clean, 10.0, seed=4)[0]["audio"] - clean[0]["audio"])


def test_encoder_transcripts_only_for_asr_checkpoints(tiny_ckpt, tmp_path, speech_data):
    """A CTC or a whole Whisper checkpoint transcribes (its cascade row); a bare encoder
    (a wav2vec2 model without a CTC head) has no transcript to offer."""
    from speechlm.recipes.blsp import _manifest_records
    from speechlm.recipes.blsp_eval import encoder_transcripts

    records = _manifest_records(speech_data)
    encoder = _ctc_checkpoint(tiny_ckpt, tmp_path)
    torch.manual_seed(0)  # the CTC head is initialised at load
    heard = encoder_transcripts(encoder, records)
    assert isinstance(heard, list) and len(heard) == len(records)
    assert all(isinstance(text, str) for text in heard)
    assert encoder_transcripts(tiny_ckpt("wav2vec2"), records) is None  # no CTC head
    whisper_heard = encoder_transcripts(tiny_ckpt("whisper"), records)
    assert isinstance(whisper_heard, list) and len(whisper_heard) == len(records)

    from types import SimpleNamespace

    from speechlm.recipes.blsp_eval import (
        HEARD_CASCADE,
        REFERENCE_CASCADE,
        WHISPER_CASCADE,
        cascade_texts,
    )

    def model(encoder):
        return SimpleNamespace(config=SimpleNamespace(encoder_path=str(encoder)))

    torch.manual_seed(0)
    both = cascade_texts(model(encoder), records)
    assert list(both) == [REFERENCE_CASCADE, HEARD_CASCADE]
    assert both[REFERENCE_CASCADE] == [r["text"] for r in records] and both[HEARD_CASCADE] == heard
    assert list(cascade_texts(model(tiny_ckpt("wav2vec2")), records)) == [REFERENCE_CASCADE]
    assert list(cascade_texts(model(tiny_ckpt("whisper")), records)) == [REFERENCE_CASCADE,
                                                                       WHISPER_CASCADE]


def test_token_ctc_loss_is_least_for_frames_that_spell_the_tokens_in_order(cif_model):
    from speechlm.training.objectives.blsp import token_ctc_loss

    embed = cif_model.llm.get_input_embeddings()
    blank = cif_model.adapter.ctc_blank
    ids = [[5, 9, 17], [30, 2]]

    def frames(rows):  # token, blank, token, blank, ... padded to 6 frames
        out = torch.zeros(2, 6, embed.weight.shape[1])
        lengths = []
        for r, tokens in enumerate(rows):
            seq = [v for t in tokens for v in (embed.weight[t].detach(), blank)]
            out[r, : len(seq)] = torch.stack(seq)
            lengths.append(len(seq))
        return AdapterOutput(out, torch.tensor(lengths), frames=out,
                             frame_lengths=torch.tensor(lengths))

    spelled = float(token_ctc_loss(frames(ids), ids, embed, blank))
    reordered = float(token_ctc_loss(frames([row[::-1] for row in ids]), ids, embed, blank))
    assert spelled < reordered


def test_transfer_command_tables_saved_models_with_both_cascades(tiny_ckpt, tmp_path,
                                                                 speech_data, capsys):
    from speechlm.cli import main

    config = SpeechLMConfig(encoder_path=str(_ctc_checkpoint(tiny_ckpt, tmp_path)),
                            llm_path=str(_llm(tiny_ckpt)), adapter="blsp",
                            adapter_options={"bottleneck_dim": 16}, template="blsp")
    torch.manual_seed(0)
    saved = SpeechLM.build(config).save_pretrained(tmp_path / "model")
    hyps = tmp_path / "hyps.jsonl"
    rc = main(["transfer", "--model", f"mine={saved}", "--manifest", str(speech_data),
               "--tasks", "repeat,translate_es", "--untrained", "--items", "4",
               "--out", str(hyps), "--json"])
    assert rc == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["untrained adapter", "mine", "cascade (reference text)",
                           "cascade (the encoder's CTC transcript)"]
    assert all(set(scores) == {"repeat", "translate_es"} for scores in table.values())
    assert table["mine"]["repeat"]["n"] == 4
    rows = [json.loads(line) for line in hyps.open()]
    assert len(rows) == 4 * 2 * 4
    # the untrained adapter is the first model's, freshly initialised: the same weights
    assert table["untrained adapter"] == table["mine"]



def test_transfer_command_loads_models_in_the_dtype_asked(tiny_ckpt, tmp_path, speech_data,
                                                          capsys, monkeypatch):
    from speechlm.cli import main

    config = SpeechLMConfig(encoder_path=str(_ctc_checkpoint(tiny_ckpt, tmp_path)),
                            llm_path=str(_llm(tiny_ckpt)), adapter="blsp",
                            adapter_options={"bottleneck_dim": 16}, template="blsp")
    saved = SpeechLM.build(config).save_pretrained(tmp_path / "model")
    llm_dtypes = []
    load = SpeechLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        llm_dtypes.append(model.llm.dtype)
        return model

    monkeypatch.setattr(SpeechLM, "from_pretrained", classmethod(spy))
    rc = main(["transfer", "--model", f"mine={saved}", "--manifest", str(speech_data),
               "--tasks", "repeat", "--items", "2", "--dtype", "bfloat16", "--json"])
    assert rc == 0 and llm_dtypes == [torch.bfloat16]
    assert json.loads(capsys.readouterr().out)["mine"]["repeat"]["n"] == 2


def test_transfer_command_rejects_a_name_given_twice(tmp_path, speech_data, capsys):
    from speechlm.cli import main

    rc = main(["transfer", "--model", "a=x", "--model", "a=y", "--manifest", str(speech_data)])
    assert rc != 0
    assert "the name 'a' is given twice" in capsys.readouterr().err


def test_stage1_continues_only_the_train_items_used_and_the_curve_is_logged(tiny_ckpt, tmp_path,
                                                                            speech_data):
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **{
            "data.max_train_items": 3, "train.max_steps": 2, "train.eval_every": 2,
            "eval.curve_tasks": "[repeat, last_word]", "eval.curve_items": 2,
            "eval.transfer": "null"}))
    module.run(config)
    run = tmp_path / "run"
    conts = [json.loads(line) for line in (run / "continuations" / "train.jsonl").open()]
    assert [c["id"] for c in conts] == ["u0", "u1", "u2"]  # not all six
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["split"] == "eval"]
    assert {"dev_repeat_wer", "dev_repeat_cer", "dev_last_word_accuracy"} <= evals[-1].keys()
    saved = json.loads((run / "final" / "speechlm_config.json").read_text())["config"]
    assert saved["encoder_path"] == str(tiny_ckpt("wav2vec2").resolve())  # a path stays a path
    with pytest.raises(ConfigError, match="eval.curve_tasks: unknown task"):
        load_recipe("recipes/tiny/blsp.yaml", ["eval.curve_tasks=[recite]"])


@pytest.mark.parametrize("kind", ["sltrain", "spdf"])
def test_sparse_lowrank_adapter_trains_and_saves_a_plain_adapter(tiny_ckpt, tmp_path,
                                                                 speech_data, kind):
    """sparse_lowrank on the adapter's linear layers: the loss falls, fewer parameters train
    (SLTrain) or half of each weight stays zero (SPDF without its dense phase), and final/
    holds plain nn.Linear layers that load with the ordinary model code."""
    sparse = ("{kind: sltrain, rank: 4, alpha: 4, density: 0.05}" if kind == "sltrain"
              else "{kind: spdf, sparsity: 0.5}")
    module, config = load_recipe("recipes/tiny/blsp.yaml", _overrides(
        tiny_ckpt, tmp_path, speech_data, **{"sparse_lowrank": sparse, "eval.transfer": "null",
                                             "eval.generate_items": 0}))
    results = module.run(config)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.95 * losses[0], losses
    report = results["sparse_lowrank"]
    saved = SpeechLM.from_pretrained(tmp_path / "run" / "final")
    linears = {n: m for n, m in saved.adapter.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) == {"fc1", "fc2"} and all(type(m) is nn.Linear for m in linears.values())
    dense = sum(p.numel() for m in linears.values() for p in m.parameters())
    other = saved.num_parameters(True) - dense
    if kind == "sltrain":
        assert report["trainable"] - other < 0.8 * dense  # B·A + S against W
    else:
        assert report["spdf_masked"] == dense // 2
        for m in linears.values():
            assert float((m.weight == 0).float().mean()) == 0.5
