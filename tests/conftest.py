"""Shared pytest fixtures. Keep this file small: one fixture, one reason each."""

import dataclasses
import os

# Nothing in the test suite may reach a model hub; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A function `(kind, **options) -> Path` returning a tiny checkpoint directory.

    Each distinct (kind, options) is written once per session, e.g.
    `tiny_ckpt("qwen2")` or `tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS)`;
    options are those of `speechlm.testing.tiny_checkpoints.write_tiny_checkpoint`.
    Treat the directory as read-only: other tests share it.
    """
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    written: dict[tuple, os.PathLike] = {}

    def get(kind: str, **options):
        key = (kind, tuple(sorted((name, repr(value)) for name, value in options.items())))
        if key not in written:
            out_dir = tmp_path_factory.mktemp(f"tiny-{kind}")
            written[key] = write_tiny_checkpoint(kind, out_dir, **options)
        return written[key]

    return get


@pytest.fixture(scope="session")
def tiny_speech_lm(tiny_ckpt, tmp_path_factory):
    """A saved SpeechLM: tiny wav2vec2 + Llama (BLSP template, 512 positions), random adapter.
    Its answers are arbitrary but deterministic and not empty (the tiny Qwen2 answers only
    newlines), so a served answer can be compared with the model's own."""
    import torch

    from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig

    torch.manual_seed(0)
    config = SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                            llm_path=str(tiny_ckpt("llama", max_position_embeddings=512)),
                            adapter="stack", template="blsp")
    return SpeechLM.build(config).eval().save_pretrained(tmp_path_factory.mktemp("slm") / "m")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_corpus(monkeypatch, tmp_path):
    """The real English recipe with 12/4/4 utterances, cached under tmp_path."""
    from speechlm.pipelines import embedded_corpus

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    spec = embedded_corpus.EMBEDDED["en"]
    splits = {name: dataclasses.replace(s, size=n)
              for (name, s), n in zip(spec.splits.items(), (12, 4, 4), strict=True)}
    small = dataclasses.replace(spec, splits=splits)
    monkeypatch.setitem(embedded_corpus.EMBEDDED, "en", small)
    return small


TINY_RECIPE = """\
task: ctc
model:
  init: scratch
  scratch: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
            intermediate_size: 64, conv_dim: [16, 16, 16, 16], conv_kernel: [10, 8, 4, 4],
            conv_stride: [5, 4, 4, 4], num_conv_pos_embeddings: 16,
            num_conv_pos_embedding_groups: 4}
  freeze_feature_encoder: false
  mask_time_prob: 0.0
data:
  train: [{manifest: "embedded:en/train", lang: en}]
  dev: "embedded:en/dev"
  test: "embedded:en/test"
  lang: en
  max_batch_duration: 30.0
train: {max_steps: STEPS, lr: 3.0e-3, warmup_steps: 1, save_every: 2, eval_every: 100,
        log_every: 1, tensorboard: false, output_dir: runs/unused}
"""


TINY_LLM_RECIPE = """\
task: text_lm
tokenizer: {vocab_size: 400, every: 40}
model:
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
           num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true}
data: {mixture: {text: 1.0, repeat: 1.0}, num_examples: 40, max_seq_len: 128,
       max_batch_tokens: 1024}
train: {max_steps: 2, lr: 3.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        output_dir: runs/unused}
eval: {max_items: 2, dev_items: 2, batch_size: 2, tasks: [repeat], paraphrases: false,
       examples: 0}
"""


TINY_BLSP_RECIPE = """\
task: blsp
model: {encoder_path: "zoo:ctc_en", llm_path: "zoo:llm_en_es", adapter: blsp,
        adapter_options: {bottleneck_dim: 16}, template: blsp,
        instruction: "Continue the following text in a coherent and engaging style with less than 40 words."}
data: {train: "embedded:en/train", dev: "embedded:en/dev", max_batch_duration: 30.0}
continuations: {max_new_tokens: 8, batch_size: 8}
train: {max_steps: 2, lr: 1.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false, best_metric: align_kl,
        output_dir: runs/unused}
eval: {dev_items: 2, generate_items: 1, transfer_items: 2, batch_size: 2}
"""


TINY_INSERTER_RECIPE = """\
task: inserter
model: {encoder_path: "zoo:ctc_en", llm_path: "zoo:llm_en_es", adapter: blsp,
        adapter_options: {bottleneck_dim: 16}, template: blsp}
data: {build: {num_samples: 16, speech_words: [2, 4], max_after_words: 3}, dev_items: 2,
       max_batch_duration: 30.0}
train: {max_steps: 2, lr: 1.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        output_dir: runs/unused}
eval: {generate_items: 1, transfer_items: 2, speech_instruct_items: 2, batch_size: 2}
"""


TINY_TOKENIZER_RECIPE = """\
task: speech_tokenizer
model:
  scratch: {d_model: 32, encoder_layers: 3, encoder_attention_heads: 2, encoder_ffn_dim: 64,
            num_mel_bins: 80, decoder_layers: 1, decoder_attention_heads: 2,
            decoder_ffn_dim: 32}
  vq_layer: 2
  num_codes: 16
  vq_start_step: 1
data:
  train: [{manifest: "embedded:en/train", lang: en}]
  dev: "embedded:en/dev"
  lang: en
  max_batch_duration: 30.0
eval: {usage_items: 4}
train: {max_steps: 3, lr: 3.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        output_dir: runs/unused}
"""


TINY_T2U_RECIPE = """\
task: text_to_token
model: {decoder: ar, d_model: 32, num_heads: 2, encoder_layers: 1, decoder_layers: 1,
        ff_dim: 64, dropout: 0.0}
data: {tokenizer: "zoo:speech_tokenizer_en", manifest: "embedded:en/train", dev_items: 1}
train: {max_steps: 3, lr: 3.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        output_dir: runs/unused}
eval: {max_items: 1}
"""


def tiny_zoo_recipe(monkeypatch, tmp_path, steps=4):
    """Point the zoo at tiny recipes: ctc_en a 1-layer CTC model of `steps` updates,
    llm_en_es a 1-layer LLM of 2 updates, blsp_en and inserter_en 2 updates on them,
    blsp_inserter_en 2 InSerter updates from blsp_en, speech_tokenizer_en a 3-update
    tokenizer, t2u_en a 3-update text-to-token model on its units."""
    from speechlm import zoo

    paths = {"ctc_en": tmp_path / f"ctc_en_{steps}.yaml", "llm_en_es": tmp_path / "llm.yaml",
             "blsp_en": tmp_path / "blsp.yaml", "inserter_en": tmp_path / "inserter.yaml",
             "blsp_inserter_en": tmp_path / "blsp_inserter.yaml",
             "speech_tokenizer_en": tmp_path / "speech_tokenizer.yaml",
             "t2u_en": tmp_path / "t2u.yaml"}
    paths["ctc_en"].write_text(TINY_RECIPE.replace("STEPS", str(steps)))
    paths["llm_en_es"].write_text(TINY_LLM_RECIPE)
    paths["blsp_en"].write_text(TINY_BLSP_RECIPE)
    paths["inserter_en"].write_text(TINY_INSERTER_RECIPE)
    paths["blsp_inserter_en"].write_text(TINY_INSERTER_RECIPE.replace(
        "task: inserter\n", 'task: inserter\ninit_from: "zoo:blsp_en"\n'))
    paths["speech_tokenizer_en"].write_text(TINY_TOKENIZER_RECIPE)
    paths["t2u_en"].write_text(TINY_T2U_RECIPE)
    real_recipe = zoo.recipe_path
    monkeypatch.setattr(zoo, "recipe_path",
                        lambda name: paths[name] if name in paths else real_recipe(name))
    return paths


@pytest.fixture
def tiny_zoo(small_corpus, monkeypatch, tmp_path):
    """The small corpus, and the zoo's ctc_en member shrunk to a 4-update, 1-layer model."""
    return tiny_zoo_recipe(monkeypatch, tmp_path)


TINY_SKILLS_RECIPE = """\
task: text_skills
model: {{init: "{llm}", template: chat,
        lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}}}
data: {{mixture: {{repeat: 1.0, last_word: 1.0, mentions_god: 1.0}}, num_examples: 12,
       replay_continuations: 2, max_input_words: 10, max_seq_len: 128, max_batch_tokens: 512}}
train: {{max_steps: 2, lr: 1.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        eval_every: 2, output_dir: runs/unused}}
eval: {{max_items: 2, dev_items: 2, batch_size: 4}}
"""


TINY_REAL_BLSP_RECIPE = """\
task: blsp
model: {{encoder_path: "{encoder}", llm_path: "zoo:smollm2_verses", adapter: stack,
        adapter_options: {{stack_factor: 4}}, template: chat,
        instruction: "Continue the following text in a coherent and engaging style with less than 40 words."}}
data: {{train: "embedded:en/train", dev: "embedded:en/dev", max_batch_duration: 30.0{data}}}
continuations: {{max_new_tokens: 6, batch_size: 8}}
loss: {{kind: {loss}}}
train: {{max_steps: 2, lr: 1.0e-3, warmup_steps: 1, log_every: 1, tensorboard: false,
        best_metric: align_kl, output_dir: runs/unused}}
eval: {{dev_items: 2, generate_items: 1, transfer_items: 2, batch_size: 2,
       transfer_tasks: [repeat, last_word]}}
"""


@pytest.fixture
def tiny_real_zoo(small_corpus, monkeypatch, tmp_path, tiny_ckpt):
    """The demo's zoo members (smollm2_verses, blsp_whisper_smollm2_kd/_ce/_kd_long/_kd_more) as
    2-update recipes on a tiny ChatML LLM and a tiny Whisper, over the small corpus."""
    from speechlm import zoo
    from speechlm.testing.tiny_gguf import write_tiny_gguf

    _, llm = write_tiny_gguf(tmp_path / "llm" / "tiny.gguf")
    paths = {"smollm2_verses": tmp_path / "skills.yaml",
             "blsp_whisper_smollm2_kd": tmp_path / "blsp_kd.yaml",
             "blsp_whisper_smollm2_ce": tmp_path / "blsp_ce.yaml",
             "blsp_whisper_smollm2_kd_long": tmp_path / "blsp_kd_long.yaml",
             "blsp_whisper_smollm2_kd_more": tmp_path / "blsp_kd_more.yaml"}
    paths["smollm2_verses"].write_text(TINY_SKILLS_RECIPE.format(llm=llm))
    for loss in ("kd", "ce"):
        paths[f"blsp_whisper_smollm2_{loss}"].write_text(TINY_REAL_BLSP_RECIPE.format(
            encoder=tiny_ckpt("whisper"), loss=loss, data=""))
    # the KD member trained on: from its adapter, on its own stage-1 continuations
    kd = "zoo:blsp_whisper_smollm2_kd"
    paths["blsp_whisper_smollm2_kd_long"].write_text(f"init_from: {kd}\n" + TINY_REAL_BLSP_RECIPE.format(
        encoder=tiny_ckpt("whisper"), loss="kd",
        data=f", train_continuations: {kd}, dev_continuations: {kd}"))
    # ... and trained on again with more speech
    paths["blsp_whisper_smollm2_kd_more"].write_text(
        "init_from: zoo:blsp_whisper_smollm2_kd_long\n" + TINY_REAL_BLSP_RECIPE.format(
            encoder=tiny_ckpt("whisper"), loss="kd",
            data=f", train_continuations: {kd}, dev_continuations: {kd}, more_speech: 3"))
    real = zoo.recipe_path
    monkeypatch.setattr(zoo, "recipe_path", lambda name: paths.get(name) or real(name))
    return paths


@pytest.fixture(scope="session")
def es_speech_corpus(tmp_path_factory):
    """eSpeak Spanish for the Whisper-decoder recipes: train (4 utterances, voice es) and dev
    (2, voice es+m3) manifests, and their root."""
    from speechlm.pipelines.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("es-corpus")
    train = ["uno dos tres", "cuatro cinco seis", "siete ocho nueve", "el gato y el perro"]
    items = [{"id": f"tr{i}", "text": t, "voice": "es", "lang": "es"} for i, t in enumerate(train)]
    synthesize_corpus(items, root / "train", rate=170, progress=False, strict=True)
    dev = [{"id": f"dev{i}", "text": t, "voice": "es+m3", "lang": "es"}
           for i, t in enumerate(["un gato", "dos perros"])]
    synthesize_corpus(dev, root / "dev", rate=170, progress=False, strict=True)
    return {"train": root / "train" / "manifest.jsonl", "dev": root / "dev" / "manifest.jsonl",
            "root": root}
