import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmssl.cli import main
from mmssl.data.manifest import read_manifest
from mmssl.eval.query import LABEL, THUMB, top_images
from mmssl.runs import load_weights, resolve_weights, save_weights


@pytest.fixture(scope="module")
def index(speech_image_run, tmp_path_factory):
    run, manifest = speech_image_run
    out = tmp_path_factory.mktemp("query") / "index"
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--quiet"]) == 0
    return out, run, manifest


def test_top_images_ranks_by_cosine():
    images = torch.eye(3)
    rows = [{"group": g, "image": f"{g}.png", "captions": [g]} for g in "abc"]
    hits = top_images(torch.tensor([[0.1, 0.7, 0.5]]), images, rows, top=2)[0]
    assert [(h["rank"], h["group"], h["score"]) for h in hits] == [(1, "b", 0.7), (2, "c", 0.5)]
    assert len(top_images(torch.tensor([[1.0, 0, 0]]), images, rows, top=10)[0]) == 3


def test_indexed_captions_retrieve_their_own_image_as_json(index, capsys):
    out, _, manifest = index
    capsys.readouterr()
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--top", "3", "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # notes, if any, went to stderr
    records = read_manifest(manifest)
    assert [r["query"] for r in results] == [r["id"] for r in records]
    assert all(len(r["results"]) == 3 for r in results)
    scores = [[h["score"] for h in r["results"]] for r in results]
    assert all(s == sorted(s, reverse=True) for s in scores)
    # the run memorised these captions: the top image of (almost) every query is its own
    hits = [r["results"][0]["group"] == rec["group"] for r, rec in zip(results, records)]
    assert [r["hit"] for r in results] == hits
    assert sum(hits) >= 6, hits
    # and each top-1 row carries its image's captions, one of which is the query's own when it hits
    for r, rec, hit in zip(results, records, hits):
        assert (rec["caption"] in r["results"][0]["captions"]) == hit


def test_audio_queries_print_scores_and_write_a_contact_sheet(index, tmp_path, capsys):
    out, _, manifest = index
    records = read_manifest(manifest)
    sheet_dir = tmp_path / "sheet"
    capsys.readouterr()
    assert (
        main(
            [
                "retrieve",
                "--index",
                str(out),
                "--audio",
                records[0]["audio"],
                records[3]["audio"],
                "--top",
                "2",
                "--out",
                str(sheet_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"query: {records[0]['audio']}" in printed and printed.count("   1. ") == 2
    saved = json.loads((sheet_dir / "results.json").read_text())
    assert [len(r["results"]) for r in saved] == [2, 2]
    with Image.open(sheet_dir / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * THUMB, 2 * (THUMB + LABEL))
        # the first thumbnail is the first query's top image
        top = Image.open(saved[0]["results"][0]["image"]).convert("RGB").resize((THUMB, THUMB))
        assert sheet.crop((0, 0, THUMB, THUMB)).tobytes() == top.tobytes()


def test_text_query_needs_the_caption_term(index, capsys):
    out, _, _ = index
    assert main(["retrieve", "--index", str(out), "--text", "a red circle"]) == 2
    assert "caption_weight" in capsys.readouterr().err


def test_missing_index_file_is_a_clear_error(index, tmp_path, capsys):
    out, _, manifest = index
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "images.safetensors").unlink()
    assert main(["retrieve", "--index", str(broken), "--manifest", str(manifest)]) == 2
    assert f"{broken / 'images.safetensors'}: not found" in capsys.readouterr().err


def test_queries_with_other_weights_than_the_index_say_so(index, tmp_path, capsys):
    out, run, manifest = index
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    weights = resolve_weights(other)
    state = load_weights(weights)
    state["speech_proj.weight"] = state["speech_proj.weight"] * 2 + 0.01
    save_weights(state, weights)
    capsys.readouterr()
    assert (
        main(
            [
                "retrieve",
                "--index",
                str(out),
                "--manifest",
                str(manifest),
                "--checkpoint",
                str(other),
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "other weights" in captured.err
    assert len(json.loads(captured.out)) == 8
    # the index's own weights: no note
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--json"]) == 0
    assert "note" not in capsys.readouterr().err


def test_contact_sheet_of_moved_images_gets_grey_tiles_and_a_note(index, tmp_path, capsys):
    out, _, manifest = index
    moved = tmp_path / "moved_index"
    shutil.copytree(out, moved)
    rows = [json.loads(line) for line in (moved / "images.jsonl").read_text().splitlines()]
    gone = str(tmp_path / "gone.png")
    rows[0]["image"] = gone  # as if the corpus had moved after indexing
    (moved / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_manifest(manifest)
    sheet_dir = tmp_path / "sheet"
    capsys.readouterr()
    assert (
        main(
            [
                "retrieve",
                "--index",
                str(moved),
                "--audio",
                records[0]["audio"],
                "--top",
                "4",
                "--out",
                str(sheet_dir),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"note: {gone} (image of index {moved}) cannot be read" in err
    saved = json.loads((sheet_dir / "results.json").read_text())[0]["results"]
    col = [h["image"] for h in saved].index(gone)
    with Image.open(sheet_dir / "contact_sheet.png") as sheet:
        tile = sheet.convert("RGB").crop((col * THUMB, 0, (col + 1) * THUMB, THUMB))
        assert {tuple(p) for p in np.asarray(tile).reshape(-1, 3)} == {(128, 128, 128)}


def test_index_and_retrieve_a_run_started_from_a_deleted_pretraining_run(speech_image_run, tmp_path, capsys):
    # a speech_image run whose speech tower starts from a tiny masked-reconstruction run
    _, manifest = speech_image_run
    common = [
        f"data.train={manifest}",
        "model.size=tiny",
        "train.max_steps=1",
        "train.progress=false",
        "data.num_workers=0",
        "train.valid_every=0",
    ]
    ssl = tmp_path / "ssl"
    assert main(["pretrain", "mockingjay", *common, f"train.out_dir={ssl}"]) == 0
    run = tmp_path / "speech_image"
    assert (
        main(["pretrain", "speech_image", *common, f"objective.speech_init={ssl}", f"train.out_dir={run}"])
        == 0
    )
    shutil.rmtree(ssl)  # the run now rebuilds its speech tower from its own copy of the config
    out = tmp_path / "index"
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--quiet"]) == 0
    from mmssl.data.io import load_audio
    from mmssl.eval.retrieval import embed_waveforms, load_run, read_embeddings

    records = read_manifest(manifest)
    loaded = load_run(run)
    # the loaded speech tower is the checkpoint's (not a fresh preset): the indexed embeddings match
    alone = embed_waveforms(
        loaded.objective, [load_audio(records[0]["audio"])], 1, torch.device("cpu"), progress=False
    )
    torch.testing.assert_close(read_embeddings(out / "speech.safetensors")[:1], alone, atol=1e-5, rtol=1e-4)
    state = load_weights(resolve_weights(run))
    for name, p in loaded.objective.encoder.state_dict().items():
        torch.testing.assert_close(p, state[f"encoder.{name}"], msg=name)
    capsys.readouterr()
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--top", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert [r["query"] for r in json.loads(captured.out)] == [r["id"] for r in records]
    assert "note" not in captured.err  # the index's own weights, found after the source run was deleted


def test_long_queries_are_cut_and_silent_ones_named(index, tmp_path, capsys):
    from mmssl.data.io import load_audio
    from tests.data.media import write_wav

    out, _, manifest = index
    speech = load_audio(read_manifest(manifest)[0]["audio"])
    long = tmp_path / "long.wav"
    write_wav(long, np.tile(speech.numpy(), 30))  # many times the clip
    head = tmp_path / "head.wav"
    write_wav(head, np.tile(speech.numpy(), 30)[: 2 * 16000])
    silent = tmp_path / "silent.wav"
    write_wav(silent, np.zeros(16000, np.float32))
    capsys.readouterr()
    argv = ["retrieve", "--index", str(out), "--json", "--max-seconds", "2", "--audio"]
    assert main([*argv, str(long), str(head), str(silent)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {long} lasts {30 * speech.shape[0] / 16000:.1f} s: only its first 2 s" in captured.err
    assert f"warning: {silent} is silent" in captured.err and str(head) not in captured.err
    results = json.loads(captured.out)
    assert [h["score"] for h in results[0]["results"]] == [h["score"] for h in results[1]["results"]]
    assert main(["retrieve", "--index", str(out), "--audio", str(head), "--max-seconds", "0"]) == 2
