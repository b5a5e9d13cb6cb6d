import json
import shutil

import pytest
import torch
from PIL import Image

from mmssl.cli import main
from mmssl.data.manifest import read_manifest
from mmssl.eval.query import LABEL, THUMB, top_images
from mmssl.train.checkpoint import load_weights, resolve_weights, save_weights


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
    assert main(["retrieve", "--index", str(out), "--audio", records[0]["audio"], records[3]["audio"],
                 "--top", "2", "--out", str(sheet_dir)]) == 0
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
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--checkpoint", str(other),
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert "other weights" in captured.err
    assert len(json.loads(captured.out)) == 8
    # the index's own weights: no note
    assert main(["retrieve", "--index", str(out), "--manifest", str(manifest), "--json"]) == 0
    assert "note" not in capsys.readouterr().err
