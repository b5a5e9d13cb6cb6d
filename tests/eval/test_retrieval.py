import json

import pytest
import torch
import torch.nn.functional as F

from mmssl.cli import main
from mmssl.data.manifest import read_manifest
from mmssl.errors import DataError
from mmssl.eval.retrieval import (
    chance_recall,
    distinct_images,
    embed_waveforms,
    first_relevant_rank,
    load_run,
    read_embeddings,
    read_jsonl,
    recall_at_k,
    recall_warnings,
    retrieval_recall,
)


def test_first_relevant_rank_and_recall_on_a_hand_made_score_matrix():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # relevant item 0 is first: rank 0
            [0.9, 0.1, 0.5, 0.3],  # relevant item 3: behind 0.9 and 0.5, rank 2
            [0.2, 0.8, 0.8, 0.1],  # relevant item 2 ties with item 1: the tie counts against it, rank 1
            [0.4, 0.3, 0.2, 0.1],  # relevant items 1 and 3: the best (1) is behind item 0, rank 1
        ]
    )
    relevant = torch.zeros(4, 4, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 3] = relevant[2, 2] = relevant[3, 1] = relevant[3, 3] = True
    assert first_relevant_rank(scores, relevant).tolist() == [0, 2, 1, 1]
    assert recall_at_k(scores, relevant, (1, 2, 3)) == {1: 0.25, 2: 0.75, 3: 1.0}
    with pytest.raises(DataError, match="no relevant"):
        recall_at_k(scores, torch.zeros(4, 4, dtype=torch.bool))


def test_chance_recall_is_the_hypergeometric_miss_probability():
    relevant = torch.tensor([[True, False, False, False], [True, True, False, False]])
    # one relevant of 4: k/4; two of 4: 1 - C(2, k) / C(4, k) = 1/2 (k=1), 5/6 (k=2), 1 (k=3)
    got = chance_recall(relevant, (1, 2, 3))
    assert got[1] == pytest.approx((0.25 + 0.5) / 2)
    assert got[2] == pytest.approx((0.5 + 5 / 6) / 2)
    assert got[3] == pytest.approx((0.75 + 1.0) / 2)


def test_recall_both_ways_with_several_captions_per_image():
    images = torch.eye(3)  # images a, b, c on the axes
    speech = F.normalize(
        torch.tensor(
            [
                [1.0, 0.2, 0.0],  # caption of a, nearest a: speech->image rank 0
                [0.1, 1.0, 0.0],  # caption of a, nearest b: rank 1
                [0.0, 0.9, 0.1],  # caption of b, nearest b: rank 0
                [0.3, 0.2, 1.0],  # caption of c, nearest c: rank 0
                [0.0, 1.0, 0.5],  # caption of c, b then c: rank 1
            ]
        ),
        dim=-1,
    )
    groups = ["a", "a", "b", "c", "c"]
    recall = retrieval_recall(speech, groups, images, ["a", "b", "c"], ks=(1, 2))
    assert recall["speech_to_image"] == {1: pytest.approx(3 / 5), 2: pytest.approx(1.0)}
    # image->speech: a's caption #0 (0.981) is top-1; b's only caption #2 (0.994) is behind #1
    # (0.995), a caption of a: rank 1; c's caption #3 (0.941) is top-1
    assert recall["image_to_speech"] == {1: pytest.approx(2 / 3), 2: pytest.approx(1.0)}
    assert recall["chance_speech_to_image"][1] == pytest.approx(1 / 3)


def test_distinct_images_groups_captions_and_rejects_two_images_per_group():
    records = [
        {"id": "x0", "image": "/p/x.png", "group": "x", "caption": "one"},
        {"id": "y0", "image": "/p/y.png", "group": "y", "caption": "two"},
        {"id": "x1", "image": "/p/x.png", "group": "x", "caption": "three"},
        {"id": "z0", "image": "/p/z.png"},
        {"id": "z1", "image": "/p/z.png", "group": ""},  # as collate writes a missing group
        {"id": "w0", "image": "/p/w.png", "group": 0},  # an integer group is its string, as in training
    ]
    rows, groups = distinct_images(records)
    assert [r["group"] for r in rows] == ["x", "y", "/p/z.png", "0"]
    assert rows[0]["captions"] == ["one", "three"] and groups == ["x", "y", "x", "/p/z.png", "/p/z.png", "0"]
    with pytest.raises(DataError, match="'x1'.*two images"):
        distinct_images([records[0], {**records[2], "image": "/p/other.png"}])


def test_index_writes_embeddings_metadata_and_recall(speech_image_run, tmp_path, capsys):
    run, manifest = speech_image_run
    out = tmp_path / "index"
    assert (
        main(
            [
                "index",
                "--run",
                str(run),
                "--manifest",
                str(manifest),
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "speech → image" in printed and "R@1 (%)" in printed
    records = read_manifest(manifest)
    images, speech = read_jsonl(out / "images.jsonl"), read_jsonl(out / "speech.jsonl")
    assert [r["id"] for r in speech] == [r["id"] for r in records]
    assert len(images) == 4 and all(len(r["captions"]) == 2 for r in images)
    image_emb, speech_emb = (
        read_embeddings(out / "images.safetensors"),
        read_embeddings(out / "speech.safetensors"),
    )
    assert image_emb.shape == (4, 64) and speech_emb.shape == (8, 64)
    torch.testing.assert_close(speech_emb.norm(dim=-1), torch.ones(8))
    meta = json.loads((out / "index.json").read_text())
    assert meta["step"] == 30 and meta["weights"].endswith("step_00000030/model.safetensors")
    recall = json.loads((out / "recall.json").read_text())
    assert recall["images"] == 4 and recall["captions"] == 8
    # the run memorised these captions: far above chance (1/4) in both directions
    assert recall["speech_to_image"]["R@1"] >= 0.75 and recall["image_to_speech"]["R@1"] >= 0.75
    assert recall["chance_speech_to_image"]["R@1"] == pytest.approx(0.25)
    assert "| speech → image |" in (out / "recall.md").read_text()
    assert (out / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    # the stored speech embeddings are the run's, recomputed here one clip at a time
    loaded = load_run(run)
    from mmssl.data.io import load_audio

    waves = [load_audio(r["audio"]) for r in records[:3]]
    alone = torch.cat(
        [embed_waveforms(loaded.objective, [w], 1, torch.device("cpu"), progress=False) for w in waves]
    )
    torch.testing.assert_close(speech_emb[:3], alone, atol=1e-5, rtol=1e-4)


def test_recall_warns_about_a_single_image_and_k_beyond_the_candidates(speech_image_run, tmp_path, capsys):
    assert recall_warnings(4, 8, (1, 5, 10)) == [
        "speech -> image: K = 5, 10 >= the 4 candidates: recall is 100 % there, as chance",
        "image -> speech: K = 10 >= the 8 candidates: recall is 100 % there, as chance",
    ]
    assert recall_warnings(100, 500, (1, 5, 10)) == []
    run, manifest = speech_image_run
    one = tmp_path / "one.jsonl"  # the two captions of one image, as the tiny corpus's test split
    one.write_text("".join(json.dumps(r) + "\n" for r in read_manifest(manifest)[:2]))
    out = tmp_path / "index"
    assert (
        main(
            ["index", "--run", str(run), "--manifest", str(one), "--out", str(out), "--quiet", "--ks", "1,2"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: the manifest has a single image" in err and "image -> speech: K = 2 >= the 2" in err
    recall = json.loads((out / "recall.json").read_text())
    assert recall["speech_to_image"] == {"R@1": 1.0, "R@2": 1.0} and len(recall["warnings"]) == 2
    assert "single image" in recall["warnings"][0]


def test_clips_too_short_for_a_frame_are_named_alone_and_in_a_batch(speech_image_run, tmp_path, capsys):
    from mmssl.data.io import load_audio
    from mmssl.data.synth.writers import write_wav

    run, manifest = speech_image_run
    records = read_manifest(manifest)
    short = tmp_path / "short.wav"
    clip = (load_audio(records[0]["audio"])[:300] * 32767).round().short().numpy()
    write_wav(short, clip)  # 300 samples: shorter than the 400-sample window of one frame
    bad = {**records[1], "id": "tiny_clip", "audio": str(short), "audio_samples": 300}
    for batch in ([bad], [records[0], bad, records[2]]):  # alone, and padded among longer clips
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in batch))
        assert (
            main(
                [
                    "index",
                    "--run",
                    str(run),
                    "--manifest",
                    str(path),
                    "--out",
                    str(tmp_path / "i"),
                    "--quiet",
                    "--batch-size",
                    "3",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert f"record 'tiny_clip' ({short}) (300 samples): too short for one frame" in err, err
    loaded = load_run(run)
    with pytest.raises(DataError, match=f"{short} \\(300 samples\\): too short"):
        embed_waveforms(
            loaded.objective,
            [load_audio(records[0]["audio"]), load_audio(short)],
            2,
            torch.device("cpu"),
            progress=False,
            names=["long.wav", str(short)],
        )


def test_index_errors_name_what_is_wrong(speech_image_run, tmp_path, capsys):
    run, manifest = speech_image_run
    assert (
        main(["index", "--run", str(tmp_path / "nope"), "--manifest", str(manifest), "--out", str(tmp_path)])
        == 2
    )
    assert "nope" in capsys.readouterr().err
    assert (
        main(["index", "--run", str(run), "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path)])
        == 2
    )
    assert "m.jsonl: manifest not found" in capsys.readouterr().err
