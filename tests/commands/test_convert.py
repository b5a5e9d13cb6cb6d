"""``mmssl convert`` and ``mmssl export``: a Hugging Face folder or fairseq file becomes a run
folder the other commands read (its encoder gives the source's outputs; a CTC checkpoint a
``ctc`` run with units), written whole or not at all; a run exports back to a folder
``transformers.AutoModel`` loads with the original outputs."""

from __future__ import annotations

import json

import pytest
import torch

from mmssl import cli
from mmssl.runs import load_encoder_from_run, load_objective_from_run, load_weights
from mmssl.train.finetune import init_checkpoint
from tests.convert.test_fairseq import fairseq_state, model_cfg, torchaudio_model
from tests.convert.test_hf import batch, hf_layers, hf_model, mmssl_layers

transformers = pytest.importorskip("transformers")


def _close(ours, theirs) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() < 1e-4, f"layer {i + 1}"


def test_hf_folder_to_run_and_back(tmp_path, capsys):
    model = hf_model("hubert_large")
    model.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "converted.json").read_text())
    assert summary["objective"] == "hubert" and not summary["ctc_head"]
    audio = batch()[0][:1]
    encoder = load_encoder_from_run(run)
    _close(mmssl_layers(encoder, audio, torch.tensor([audio.shape[1]]))[0], hf_layers(model, audio))
    assert init_checkpoint(run).endswith("step_00000000")  # what finetune-asr --init reads
    # an existing folder is kept unless --overwrite
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(run), "--overwrite", "--kind", "hf"]) == 0

    assert cli.main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModel.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "HubertModel"
    _close(hf_layers(back, audio), hf_layers(model, audio))
    assert not transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "back").do_normalize
    # a model trained on normalised waveforms keeps saying so
    (tmp_path / "hf" / "preprocessor_config.json").write_text('{"do_normalize": true}')
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "norm")]) == 0
    assert cli.main(["export", str(tmp_path / "norm"), "--to", "hf", "--out", str(tmp_path / "norm_hf")]) == 0
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "norm_hf")
    assert extractor.do_normalize and extractor.return_attention_mask  # a layer-norm (large) model


@pytest.mark.parametrize("case", ["wav2vec2_base", "wavlm_base", "data2vec"])
def test_every_family_becomes_a_run_of_its_objective(case, tmp_path):
    model = hf_model(case)
    model.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    objective, _ = load_objective_from_run(tmp_path / "run", expect=case.split("_")[0])
    audio = batch()[0][:1]
    _close(mmssl_layers(objective.encoder, audio, torch.tensor([audio.shape[1]]))[0], hf_layers(model, audio))
    teacher = getattr(objective, "teacher", None)
    if teacher is not None:  # data2vec's teacher starts as the imported transformer
        for key, value in objective.encoder.transformer.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value)


def test_hf_ctc_folder_becomes_a_ctc_run(tmp_path):
    model = hf_model("wav2vec2_base", "Wav2Vec2ForCTC")
    model.save_pretrained(tmp_path / "hf")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5, "B": 6, "'": 7}
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    objective, _ = load_objective_from_run(tmp_path / "run", expect="ctc")
    assert objective.units.size == 1 + 5  # blank + <unk> a b ' space
    audio, lengths, _ = batch()
    with torch.no_grad():
        log_probs, _ = objective.logits({"audio": audio[:1, : lengths[0]], "audio_lens": lengths[:1]})
        reference = model(audio[:1, : lengths[0]]).logits
    ours = log_probs.argmax(-1)[0]
    pieces = ["<blank>"] + [objective.units.sp.id_to_piece(i) for i in range(objective.units.size - 1)]
    names = {0: "<blank>", 3: "<unk>", 4: "\u2581", 5: "a", 6: "b", 7: "'"}
    kept = reference[0][:, [0, 3, 4, 5, 6, 7]].argmax(-1)  # the source's classes mmssl keeps
    assert [pieces[i] for i in ours] == [names[[0, 3, 4, 5, 6, 7][j]] for j in kept]


def test_fairseq_file_to_run(tmp_path):
    model = torchaudio_model(large=False)
    state = fairseq_state(model, False, finetuned=False)
    torch.save({"model": state, "cfg": {"model": model_cfg("wav2vec2", False)}}, tmp_path / "w.pt")
    assert cli.main(["convert", str(tmp_path / "w.pt"), "--out", str(tmp_path / "run")]) == 0
    encoder = load_encoder_from_run(tmp_path / "run")
    audio = batch()[0][:1]
    with torch.no_grad():
        ours = encoder(audio, torch.tensor([audio.shape[1]])).layers
        theirs, _ = model.extract_features(audio)
    _close(ours, theirs)


def test_a_failed_conversion_leaves_no_folder(tmp_path, capsys):
    model = hf_model("wav2vec2_base")
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 10)
    capsys.readouterr()  # transformers' own progress bar
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0]
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_pretraining_continues_from_a_converted_run(tmp_path, synth_tiny, capsys):
    """``mmssl pretrain RUN/config.yaml --init RUN``: a new run whose encoder starts as the
    converted checkpoint's (at lr 0 it stays so) and whose own heads start as converted."""
    hf_model("wav2vec2_base").save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert cli.main(["convert", str(tmp_path / "hf"), "--out", str(run)]) == 0
    argv = [
        "pretrain",
        str(run / "config.yaml"),
        f"data.train={synth_tiny / 'av' / 'train.jsonl'}",
        "data.num_workers=0",
        "data.max_seconds_per_batch=8",
        "train.max_steps=1",
        "train.lr=0",
        "train.progress=false",
        "train.device=cpu",
        f"train.out_dir={tmp_path / 'more'}",
    ]
    assert cli.main([*argv, "--init", str(run)]) == 0
    assert "starting from" in capsys.readouterr().out
    converted, continued = load_weights(run), load_weights(tmp_path / "more")
    assert converted.keys() == continued.keys()
    assert all(torch.equal(converted[k], continued[k]) for k in converted if k.startswith("encoder."))
    # the same command without --init starts from random weights
    assert cli.main([*argv[:-1], f"train.out_dir={tmp_path / 'fresh'}"]) == 0
    fresh = load_weights(tmp_path / "fresh")
    assert not all(torch.equal(converted[k], fresh[k]) for k in converted if k.startswith("encoder."))
