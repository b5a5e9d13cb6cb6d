import json

import pytest
import torch

import mmssl.eval.noisy as noisy
from mmssl.cli import main
from mmssl.data.manifest import read_manifest, write_manifest
from mmssl.data.ngram import arpa_words
from mmssl.data.units import normalize_text
from mmssl.eval.asr import load_asr_model, load_clips, transcribe, word_errors
from mmssl.eval.decoders import decoding_settings, make_decoder


def finetune(out, manifest, encoder):
    """A one-step CTC run of a fresh tiny ``encoder`` (the evaluation only needs a run folder)."""
    code = main(
        [
            "finetune-asr",
            "--init",
            "none",
            f"objective.encoder={encoder}",
            "model.size=tiny",
            f"data.train={manifest}",
            "train.max_steps=1",
            f"train.out_dir={out}",
            "train.device=cpu",
            "data.num_workers=0",
            "train.progress=false",
            "train.accum_steps=1",
            "objective.freeze_steps=0",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def setup(synth_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("noisy")
    test = synth_tiny / "av" / "test.jsonl"
    return {
        "av": finetune(folder / "av", test, "av"),
        "audio": finetune(folder / "audio", test, "fbank"),
        "test": test,
        "noise": synth_tiny / "noise" / "test",
    }


def evaluate(setup, out, **kw):
    args = dict(
        noise_types=["babble", "music"], snrs=["clean", "10", "-5"], device_name="cpu", progress=False
    )
    return noisy.evaluate(setup["av"], setup["test"], [str(setup["noise"])], out, **{**args, **kw})


def test_grid_table_plot_and_resume(setup, tmp_path, monkeypatch):
    calls = []
    decode = noisy._decode_cell
    monkeypatch.setattr(noisy, "_decode_cell", lambda *a, **k: calls.append(a[-1]) or decode(*a, **k))
    results = evaluate(setup, tmp_path)
    header, *rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert set(header) == {"fingerprint"}
    # one clean row and 2 noises x 2 SNRs, each under 3 modality conditions
    assert len(rows) == len(results) == 5 * 3
    assert {(r["noise"], r["snr"]) for r in rows} == {("none", "clean")} | {
        (n, s) for n in ("babble", "music") for s in ("10", "-5")
    }
    assert all(
        r["words"] == sum(len(normalize_text(x["transcript"]).split()) for x in read_manifest(setup["test"]))
        for r in rows
    )
    # video alone hears no noise: decoded once (11 decodings: 5 audio, 5 audio+video, 1 video)
    assert len(calls) == 11
    assert len({r["wer"] for r in rows if r["modality"] == "video"}) == 1
    table = (tmp_path / "wer.md").read_text()
    assert table.count("\n| ") == 1 + 5 and "WER % audio+video" in table
    png = (tmp_path / "wer_vs_snr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # a rerun finds every cell done; with one line lost (a killed run) it redoes only that one
    calls.clear()
    evaluate(setup, tmp_path)
    assert calls == []
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    evaluate(setup, tmp_path)
    assert len(calls) == 1 and len((tmp_path / "results.jsonl").read_text().splitlines()) == 1 + 15


def test_every_modality_hears_the_same_noise_and_clean_is_no_noise(setup, tmp_path, monkeypatch):
    heard = {}
    real = noisy.transcribe

    def spy(objective, clips, keys, device, batch_seconds, audios, progress, desc, *rest):
        heard[desc] = audios
        return real(objective, clips, keys, device, batch_seconds, audios, progress, desc, *rest)

    monkeypatch.setattr(noisy, "transcribe", spy)
    results = evaluate(setup, tmp_path, noise_types=["babble"], snrs=["clean", "0"])
    assert heard["audio none clean"] is None and heard["audio+video none clean"] is None
    a, av = heard["audio babble 0"], heard["audio+video babble 0"]
    assert all(torch.equal(x, y) for x, y in zip(a, av))
    # the mix is at the asked SNR and differs from the clean audio
    model = load_asr_model(setup["av"], torch.device("cpu"))
    clips = load_clips(setup["test"], ["audio", "video"], progress=False)
    for clip, mixed in zip(clips, a):
        noise = mixed - clip.audio
        snr = 20 * torch.log10(clip.audio.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt())
        assert float(snr) == pytest.approx(0.0, abs=1e-3)
    # the clean cell equals decoding the untouched recordings
    hyps = transcribe(model, clips, ["audio"], torch.device("cpu"), 60.0, progress=False)
    expected = word_errors([c.transcript for c in clips], hyps)
    assert results[("none", "clean", "audio")]["errors"] == expected["errors"]


def test_bad_requests_are_named(setup, tmp_path, synth_tiny):
    from mmssl.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="no video stream"):
        noisy.evaluate(
            setup["audio"],
            setup["test"],
            [str(setup["noise"])],
            tmp_path,
            snrs=["clean"],
            modalities_text="audio,video",
            device_name="cpu",
            progress=False,
        )
    with pytest.raises(ConfigError, match="'traffic'.*babble"):
        evaluate(setup, tmp_path, noise_types=["traffic"])
    records = read_manifest(setup["test"])
    records[1] = {k: v for k, v in records[1].items() if k != "transcript"}
    bad = write_manifest(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=repr(records[1]["id"])):
        noisy.evaluate(setup["av"], bad, [], tmp_path, snrs=["clean"], device_name="cpu", progress=False)
    # and through the command line, as one line on stderr
    assert (
        main(
            [
                "eval-noisy",
                "--run",
                str(setup["audio"]),
                "--manifest",
                str(setup["test"]),
                "--snrs",
                "clean",
                "--modalities",
                "video",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_default_conditions_are_what_the_run_reads(setup, tmp_path):
    assert noisy.parse_modalities(None, ("audio", "video")) == ["audio", "video", "audio+video"]
    assert noisy.parse_modalities(None, ("audio",)) == ["audio"]
    results = noisy.evaluate(
        setup["audio"],
        setup["test"],
        [],
        tmp_path,
        snrs=["clean"],
        device_name="cpu",
        progress=False,
        limit=2,
    )
    assert {modality for _, _, modality in results} == {"audio"}  # not an error asking for video


def test_cells_are_reused_only_under_the_same_fingerprint(setup, tmp_path, monkeypatch, capsys):
    calls = []
    decode = noisy._decode_cell
    monkeypatch.setattr(noisy, "_decode_cell", lambda *a, **k: calls.append(a[-1]) or decode(*a, **k))
    small = dict(noise_types=["babble"], snrs=["clean", "10"], modalities_text="audio", limit=2)
    evaluate(setup, tmp_path, **small)
    assert len(calls) == 2
    header = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["limit"] == 2 and header["checkpoint"].endswith("step_00000001")
    # the same request, SNRs spelt otherwise: nothing is decoded again
    calls.clear()
    evaluate(setup, tmp_path, **{**small, "snrs": ["clean", "10.0"]})
    assert calls == []
    # another --limit, another seed, another manifest: the grid starts afresh, and says so
    for change in ({"limit": 3}, {"seed": 1}):
        calls.clear()
        results = evaluate(setup, tmp_path, **{**small, **change})
        assert len(calls) == 2 and "starting the grid afresh" in capsys.readouterr().out
        rows = (tmp_path / "results.jsonl").read_text().splitlines()
        limit = change.get("limit", small["limit"])
        assert len(rows) == 1 + 2 and all(r["utterances"] == limit for r in results.values())
    records = read_manifest(setup["test"])[:3]
    other = write_manifest(tmp_path / "other.jsonl", records[::-1])
    calls.clear()
    noisy.evaluate(
        setup["av"],
        other,
        [str(setup["noise"])],
        tmp_path,
        device_name="cpu",
        progress=False,
        **{**small, "seed": 1},
    )
    assert len(calls) == 2 and "manifest" in capsys.readouterr().out


def test_a_silent_noise_file_is_named_not_scored_as_noisy(setup, tmp_path, capsys):
    """Issue 16: an all-zero noise file made its noisy cells equal the clean one."""
    import shutil

    import numpy as np

    from tests.data.media import write_wav

    noise = tmp_path / "noise"
    shutil.copytree(setup["noise"], noise)
    write_wav(noise / "music_silent.wav", np.zeros(16000, np.float32))
    out = tmp_path / "out"
    argv = [
        "eval-noisy",
        "--run",
        str(setup["audio"]),
        "--manifest",
        str(setup["test"]),
        "--noise",
        str(noise),
    ]
    assert (
        main([*argv, "--snrs", "clean,0", "--modalities", "audio", "--device", "cpu", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "music_silent.wav: the noise is silent" in err
    assert not (out / "results.jsonl").exists()


def test_beam_search_with_a_language_model_is_part_of_the_grid_fingerprint(setup, tmp_path, capsys):
    arpa = tmp_path / "lm.arpa"
    assert main(["lm", "--manifest", str(setup["test"]), "--order", "2", "--out", str(arpa)]) == 0
    words = set(arpa_words(arpa))
    out = tmp_path / "beam"
    beam = {"kind": "beam", "lm": str(arpa), "beam": 8}
    results = evaluate(setup, out, snrs=["clean"], modalities_text="audio", decoding=beam)
    header = json.loads((out / "results.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["decoding"]["kind"] == "beam" and header["decoding"]["beam"] == 8
    assert header["decoding"]["lm"][0] == str(arpa.resolve())
    assert "beam search of 8, LM" in (out / "wer.md").read_text()
    assert results[("none", "clean", "audio")]["words"] > 0
    # the search only spells words of the language model
    model = load_asr_model(setup["av"], torch.device("cpu"))
    clips = load_clips(setup["test"], ["audio"], progress=False)
    decoder = make_decoder(model.units, **decoding_settings(beam))
    hyps = transcribe(model, clips, ["audio"], torch.device("cpu"), 60.0, progress=False, decoder=decoder)
    assert set(" ".join(hyps).split()) <= words
    # greedy decoding in the same folder is another grid
    capsys.readouterr()
    evaluate(setup, out, snrs=["clean"], modalities_text="audio")
    assert "starting the grid afresh" in capsys.readouterr().out
    header = json.loads((out / "results.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["decoding"] is None
