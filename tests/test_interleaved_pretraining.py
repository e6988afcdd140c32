"""`task: interleaved` end to end at toy size, on the real chain: a speech tokenizer tokenizes
the (small) embedded corpus, a text-to-token model learns from its units, the zoo LLM gets
the unit tokens and pre-trains on interleaved / text / speech-text sequences; the held-out
interleaved loss falls, the saved model reloads with its unit tokens, and interleaved data
made for another LLM is refused."""

import json

import pytest
import torch
from conftest import tiny_zoo_recipe

from speechlm.errors import ConfigError

TOK = {"d_model": 32, "encoder_layers": 3, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
       "num_mel_bins": 80, "max_source_positions": 1500, "decoder_layers": 1,
       "decoder_attention_heads": 2, "decoder_ffn_dim": 32}


@pytest.fixture
def chain(small_corpus, monkeypatch, tmp_path):
    """A random tiny speech tokenizer, a T2U trained briefly on its units of embedded:en/train,
    the tiny zoo (its LLM), and a 60-verse text corpus."""
    from speechlm.data.text_corpus import load_verses
    from speechlm.models.ctc import CharVocab
    from speechlm.models.speech_tokenizer import (
        SpeechTokenizer,
        TokenizerSettings,
        save_speech_tokenizer,
    )
    from speechlm.recipes import load_recipe

    tiny_zoo_recipe(monkeypatch, tmp_path)
    torch.manual_seed(0)
    tok = SpeechTokenizer.build("scratch", CharVocab(list("abcdefghijklmnopqrstuvwxyz'")),
                                TokenizerSettings(vq_layer=2, num_codes=16), scratch_config=TOK)
    tok_dir = save_speech_tokenizer(tok.eval(), tmp_path / "tok")
    t2u_recipe = tmp_path / "t2u.yaml"
    t2u_recipe.write_text(f"""\
task: text_to_token
model: {{decoder: ar, d_model: 32, num_heads: 2, encoder_layers: 1, decoder_layers: 1,
        ff_dim: 64, dropout: 0.0}}
data: {{tokenizer: "{tok_dir}", manifest: "embedded:en/train", dev_items: 1}}
train: {{max_steps: 30, lr: 3.0e-3, warmup_steps: 1, log_every: 10, tensorboard: false,
        output_dir: "{tmp_path / 't2u'}"}}
eval: {{max_items: 1}}
""")
    module, config = load_recipe(t2u_recipe)
    module.run(config)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(v.en + "\n" for v in load_verses()[:60]), encoding="utf-8")
    return {"tok": tok_dir, "t2u": tmp_path / "t2u" / "final", "corpus": corpus,
            "out": tmp_path / "run"}


def _recipe(tmp_path, chain, extra_data="") -> str:
    path = tmp_path / "interleaved.yaml"
    path.write_text(f"""\
task: interleaved
model: {{llm_path: "zoo:llm_en_es"}}
data:
  interleaved: auto
  build: {{corpus: "{chain['corpus']}", t2u: "{chain['t2u']}", speech_share: 0.5,
          span_words: [2, 6], docs_per_shard: 20}}
  seq_len: 32
  mixture: {{interleaved: 1.0, text: 0.5, asr: 0.5}}
  speech_tokenizer: "{chain['tok']}"
  batch_size: 4
{extra_data}eval: {{items: 4, max_new_tokens: 8, batch_size: 4}}
train: {{max_steps: 12, lr: 1.0e-2, warmup_steps: 1, log_every: 1, eval_every: 100,
        tensorboard: false, output_dir: "{chain['out']}"}}
""")
    return str(path)


def test_interleaved_pretraining_learns_the_units_and_saves_an_extended_llm(tmp_path, chain,
                                                                           capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechlm.models.unit_vocab import UnitVocab
    from speechlm.recipes import load_recipe

    module, config = load_recipe(_recipe(tmp_path, chain))
    results = module.run(config)
    before, after = results["before"], results["after"]
    # the unit tokens start as near-mean rows: learning what follows them is most of the gain
    assert after["interleaved_loss"] < before["interleaved_loss"] - 0.5, (before, after)
    assert after["speech_text_loss"] < before["speech_text_loss"], (before, after)
    assert set(results["data"]) == {"interleaved", "text", "asr"}
    assert 0 <= after["asr_cer"] and 0 <= after["repeat_wer"]
    # the control decodes each reference's neighbour's units: the gain is the CER difference
    assert after["asr_units_gain"] == pytest.approx(after["asr_wrong_units_cer"] - after["asr_cer"])
    # spoken QA from the units, and its bound with the transcript as text
    assert {"last_word_acc", "last_word_text_acc"} <= set(after)
    final = chain["out"] / "final"
    vocab = UnitVocab.load(final)
    assert vocab.num_codes == 16 and vocab == UnitVocab(**results["unit_vocab"])
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.convert_tokens_to_ids("<|audio_15|>") == vocab.unit_id(15)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] > vocab.unit_id(15)
    saved = json.loads((chain["out"] / "results.json").read_text())
    assert saved["after"] == after
    out = capsys.readouterr().out
    assert "before" in out and "interleaved with T2U units" in out
    assert "with the next utterance's units" in out and "last word of the units" in out


def test_interleaved_data_built_for_another_llm_tokenizer_is_refused(tmp_path, chain):
    from transformers import AutoTokenizer

    from speechlm.models.text_to_token import load_text_to_token
    from speechlm.pipelines.interleave import InterleaveSettings, build_interleave
    from speechlm.recipes import load_recipe
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    other = write_tiny_checkpoint("qwen2", tmp_path / "qwen")
    shards = tmp_path / "other_shards"
    build_interleave(str(chain["corpus"]), shards, t2u=load_text_to_token(chain["t2u"]),
                     tokenizer=AutoTokenizer.from_pretrained(other),
                     settings=InterleaveSettings(seq_len=32, docs_per_shard=20),
                     progress=False)
    module, config = load_recipe(_recipe(tmp_path, chain), [f"data.interleaved={shards}"])
    with pytest.raises(ConfigError, match="not this LLM's|another LLM tokenizer"):
        module.run(config)


def test_more_spoken_verses_as_pairs_that_teach_reading_the_units_alone(tmp_path, chain):
    """data.asr_more_speech speaks more training-book verses into the cache and adds them as
    pairs; with data.asr_learn_units false only the transcripts are learned."""
    from speechlm.recipes import load_recipe

    overrides = ["data.mixture.interleaved=0", "data.mixture.text=0", "data.mixture.asr=1.0",
                 "data.seq_len=128", "data.asr_more_speech=6", "data.asr_learn_units=false"]
    module, config = load_recipe(_recipe(tmp_path, chain), overrides)
    results = module.run(config)
    assert results["asr_pairs"] == 12 + 6  # the small corpus's train split and 6 more
    assert set(results["data"]) == {"asr"}
    # a row of 128 holds about two pairs: units (context only) are most of it
    assert 0 < results["train"]["label_tokens"] < 0.6 * 4 * 128
    assert results["after"]["speech_text_loss"] < results["before"]["speech_text_loss"]
    # a second run reuses the spoken verses and their units (nothing is synthesized again)
    manifests = list((tmp_path / "cache" / "corpus").glob("en-more-train-*/train/manifest.jsonl"))
    assert len(manifests) == 1
    stamp = manifests[0].stat().st_mtime_ns
    module, config = load_recipe(_recipe(tmp_path, chain), overrides + [
        f"train.output_dir={tmp_path / 'run2'}"])
    assert module.run(config)["asr_pairs"] == 18 and manifests[0].stat().st_mtime_ns == stamp


def test_more_spoken_verses_than_the_training_books_hold_are_refused(tmp_path, chain):
    from speechlm.recipes import load_recipe

    module, config = load_recipe(_recipe(tmp_path, chain), ["data.asr_more_speech=40000"])
    with pytest.raises(ConfigError, match=r"data.asr_more_speech: .*only 30077 verses qualify"
                                          r".*ask for fewer"):
        module.run(config)


@pytest.mark.parametrize("recipe", ["recipes/tiny/interleaved.yaml",
                                    "recipes/tiny/interleaved_pairs.yaml",
                                    "recipes/interleaved/whisper_base_smollm2_135m.yaml",
                                    "recipes/interleaved/whisper_large_v3_qwen2.5_7b.yaml"])
def test_shipped_interleaved_recipes_validate(recipe):
    from speechlm import zoo
    from speechlm.recipes import load_recipe

    _, config = load_recipe(recipe)
    assert config.task == "interleaved"
    if "/tiny/" in recipe:  # the zoo's own tokenizer
        assert config.data.speech_tokenizer.startswith("zoo:")
    if recipe.endswith("_pairs.yaml"):  # the many real pairs, their transcripts learned alone
        assert config.data.asr_more_speech == 30077 and not config.data.asr_learn_units
        assert config.data.mixture["asr"] > 0
    if "smollm2" in recipe:  # real models: the Whisper-based tokenizer's zoo chain, chat prompts
        assert config.data.speech_tokenizer == "zoo:speech_tokenizer_whisper_en"
        assert zoo.dependencies("t2u_whisper_en") == {"speech_tokenizer_whisper_en"}
        assert config.model.template == "chat" and config.train.precision == "bf16"
        _, tokenizer_config = load_recipe(zoo.recipe_path("speech_tokenizer_whisper_en"))
        assert tokenizer_config.model.init == "models:whisper-base"
    if "7b" in recipe:  # a whole 7B LLM trains: sharded
        assert config.train.sharding == "fsdp"


def test_instruction_replay_is_a_source_and_bad_settings_name_the_field(tmp_path, chain):
    from speechlm.recipes import load_recipe

    module, config = load_recipe(_recipe(tmp_path, chain), [
        "data.mixture.interleaved=0", "data.mixture.text=0", "data.mixture.asr=0",
        "data.mixture.instruct=1.0", "data.instruct_tasks={last_word: 1.0, repeat: 1.0}",
        "data.instruct_examples=40", "data.seq_len=320"])
    results = module.run(config)
    assert set(results["data"]) == {"instruct"} and results["data"]["instruct"] >= 30
    assert results["after"]["last_word_text_acc"] >= 0
    # prompts are masked, as the LLM learned the tasks: only the answers are learned
    from transformers import AutoTokenizer

    items = module._instruct_items(config.data, AutoTokenizer.from_pretrained(
        chain["out"] / "final"), 0, print)
    for item in items:
        learned = sum(label != -100 for label in item["labels"])
        assert 0 < learned < len(item["input_ids"]) / 2
    with pytest.raises(ConfigError, match="data.mixture.instruct > 0 needs data.instruct_tasks"):
        load_recipe(_recipe(tmp_path, chain), ["data.mixture.instruct=1.0"])
    with pytest.raises(ConfigError, match="data.instruct_tasks: unknown task.*sing"):
        load_recipe(_recipe(tmp_path, chain), ["data.mixture.instruct=1.0",
                                               "data.instruct_tasks={sing: 1.0}"])


@pytest.mark.parametrize("template", ["blsp", "chat"])
def test_held_out_instruction_prompts_use_the_recipe_template(tmp_path, template):
    """model.template decides how the held-out "repeat" / "last word" prompts wrap the units
    (an instruct LLM such as SmolLM2 is asked in its own chat template) and what ends an
    answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechlm.models.unit_vocab import add_unit_tokens
    from speechlm.recipes.interleaved import Config, HeldOut, ModelConfig
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    path = write_tiny_checkpoint("qwen2", tmp_path / "qwen")
    llm, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    vocab = add_unit_tokens(llm, tokenizer, 8, tokenizer_identity="t", seed=0)
    records = [{"id": "a", "text": "in the beginning", "units": [1, 2, 3]}]
    held = HeldOut(Config(model=ModelConfig(template=template)), vocab, tokenizer, records,
                   [], [])
    prompt = tokenizer.decode(held.repeat_prompts[0])
    assert "<|audio_1|><|audio_2|><|audio_3|>" in prompt
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if template == "chat":
        assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("assistant")
        assert held.stop_ids == [im_end]
    else:
        assert prompt.startswith("###[Human]:") and "<|im_start|>" not in prompt
    assert "in the beginning" in tokenizer.decode(held.qa_prompts["last_word_text"][0])
    with pytest.raises(ConfigError, match="model.template: unknown template 'chatml'"):
        ModelConfig(template="chatml")


def test_sharded_interleaved_pretraining_gathers_a_model_that_reloads(tmp_path, chain):
    """train.sharding=fsdp (GLM-4-Voice trains the whole LLM): two gloo processes under torchrun
    pre-train with the parameters sharded, evaluate the losses during training, and rank 0
    gathers the weights, evaluates and saves a final/ that reloads with its unit tokens."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from speechlm.models.unit_vocab import UnitVocab
    from speechlm.pipelines.tokenize import cached_units
    from speechlm.pretrained.resolve import resolve_model_dir
    from speechlm.training.metrics_log import read_metrics

    # the subprocesses see none of this process's patches: give them directories and files
    llm = resolve_model_dir("zoo:llm_en_es", progress=False, say=lambda m: None)
    units = {split: cached_units(str(chain["tok"]), f"embedded:en/{split}", progress=False,
                                 say=lambda m: None) for split in ("train", "dev")}
    recipe = _recipe(tmp_path, chain, extra_data=f'  asr_units: "{units["train"]}"\n')
    recipe_text = open(recipe).read().replace('"zoo:llm_en_es"', f'"{llm}"').replace(
        "eval: {items: 4,", f'eval: {{units: "{units["dev"]}", items: 4,').replace(
        "eval_every: 100", "eval_every: 6, save_every: 6")
    open(recipe, "w").write(recipe_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "speechlm.cli", "train", recipe, "train.sharding=fsdp", "train.progress=false"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((chain["out"] / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert after["interleaved_loss"] < before["interleaved_loss"] - 0.5, (before, after)
    assert "asr_cer" in after and "last_word_acc" in after  # rank 0 decodes after gathering
    evals = read_metrics(chain["out"], split="eval")
    assert evals and "interleaved_loss" in evals[0] and "asr_cer" not in evals[0]
    final = chain["out"] / "final"
    vocab = UnitVocab.load(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] > vocab.unit_id(15)
    # the sharded step checkpoint gathers into the same model, with the extended tokenizer
    from transformers import AutoTokenizer

    from speechlm.cli import main as cli_main

    assert cli_main(["convert", "fsdp", str(chain["out"] / "step_000012"),
                     str(tmp_path / "gathered")]) == 0
    assert UnitVocab.load(tmp_path / "gathered") == vocab
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gathered")
    assert tokenizer.convert_tokens_to_ids("<|audio_15|>") == vocab.unit_id(15)
    gathered = AutoModelForCausalLM.from_pretrained(tmp_path / "gathered")
    for key, value in model.state_dict().items():
        assert torch.equal(gathered.state_dict()[key], value), key
