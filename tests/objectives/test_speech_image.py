import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import mmssl.objectives  # noqa: F401  (registers the objectives)
from mmssl.errors import ConfigError, DataError
from mmssl.nn.contrastive import gather_rows, same_group_mask, symmetric_info_nce
from mmssl.objectives.speech_image import AttentionPool, GroupIds, group_ids
from mmssl.registry import OBJECTIVES
from mmssl.testing import tiny_audio_batch


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _hand_ce(logits, labels):
    """Mean cross-entropy written out: -log(exp(l_y) / sum_j exp(l_j)), -inf entries left out."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels):
        total += -(row[y] - math.log(sum(math.exp(v) for v in row if v != float("-inf"))))
    return total / len(labels)


def test_loss_is_the_hand_computed_clip_loss_and_open_clips():
    # three 3-d unit vectors per side: s = 2, logits = 2 * cosines
    x = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    y = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    loss, acc_xy, acc_yx = symmetric_info_nce(x, y, scale)
    logits = 2.0 * x @ y.T
    expected = 0.5 * (_hand_ce(logits, [0, 1, 2]) + _hand_ce(logits.T, [0, 1, 2]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # x->y: row 1 (1,1,0)/sqrt2 scores y0 (0.83) above its y1 (0.71); y->x: every column right
    assert acc_xy.item() == pytest.approx(2 / 3) and acc_yx.item() == pytest.approx(1.0)
    # open_clip's ClipLoss (image_features, text_features, logit_scale) on the same features
    torch.testing.assert_close(loss, ClipLoss()(y, x, scale))
    big_x, big_y = _unit(8, 16, seed=1), _unit(8, 16, seed=2)
    torch.testing.assert_close(symmetric_info_nce(big_x, big_y, scale)[0], ClipLoss()(big_y, big_x, scale))


def test_same_group_pairs_are_left_out_of_both_directions():
    groups = torch.tensor([7, 7, 3, 7])
    mask = same_group_mask(groups, groups, offset=0)
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    x, y = _unit(4, 5, seed=3), _unit(4, 5, seed=4)
    loss, _, _ = symmetric_info_nce(x, y, torch.tensor(3.0), groups)
    logits = 3.0 * x @ y.T
    masked = logits.masked_fill(expected, float("-inf"))
    ref = 0.5 * (_hand_ce(masked, [0, 1, 2, 3]) + _hand_ce(masked.T, [0, 1, 2, 3]))
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    # row 0's only candidates are its own image and image 2: a sharper check than the mask
    row0 = -(logits[0, 0] - torch.logsumexp(logits[0, [0, 2]], 0))
    assert _hand_ce(masked[:1], [0]) == pytest.approx(row0.item(), rel=1e-6)


def test_captions_of_one_image_are_not_penalised_for_matching_it():
    # two captions of the same image, both embedded exactly on it: a perfect model
    image = _unit(1, 6, seed=5)
    other = _unit(1, 6, seed=6)
    y = torch.cat([image, image, other])  # the batch carries the image once per caption
    x = y.clone()
    masked, acc_xy, acc_yx = symmetric_info_nce(x, y, torch.tensor(50.0), torch.tensor([1, 1, 2]))
    unmasked, _, _ = symmetric_info_nce(x, y, torch.tensor(50.0))
    assert masked.item() < 1e-6 and acc_xy.item() == 1.0 and acc_yx.item() == 1.0
    assert unmasked.item() > 0.4  # without groups the duplicate counts as a negative: about log 2


def test_batch_hook_ids_are_equal_for_equal_groups():
    batch = GroupIds()({"groups": ["img3", "img1", "img3"]})
    ids = batch["group_ids"]
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1]
    assert torch.equal(ids, group_ids(["img3", "img1", "img3"]))


def test_records_without_a_group_are_each_their_own_group():
    # collate writes "" for a record without a group: those must not all become one image
    batch = GroupIds()({"groups": ["", "img1", "", "img1"], "ids": ["r0", "r1", "r2", "r3"]})
    ids = batch["group_ids"].tolist()
    assert ids[0] != ids[2] and ids[1] == ids[3] and len(set(ids)) == 3
    assert not same_group_mask(batch["group_ids"], batch["group_ids"], 0)[0].any()
    assert group_ids(["", ""]).unique().numel() == 2  # no ids: rows apart all the same
    # an ungrouped record keeps its id's group in any batch (the same on every rank)
    assert group_ids(["", "x"], ["r2", "r9"])[0] == group_ids(["", "", ""], ["r0", "r1", "r2"])[2]


def _tiny(**kwargs):
    torch.manual_seed(0)
    return OBJECTIVES.build("speech_image", size="tiny", speech="fbank", **kwargs)


def _batch(objective, groups=("a", "b", "c"), seed=0, lengths=(8000, 5600, 3200)):
    g = torch.Generator().manual_seed(seed)
    batch = tiny_audio_batch(lengths)
    images = torch.randint(0, 256, (len(lengths), 3, 80, 80), dtype=torch.uint8, generator=g)
    batch["image"] = torch.stack([objective.image_transform(im) for im in images])
    batch["groups"] = list(groups)
    return objective.batch_hook()(batch)


def test_speech_embedding_of_a_padded_batch_equals_each_clip_alone():
    for pooling in ("mean", "attention"):
        objective = _tiny(pooling=pooling).eval()
        batch = _batch(objective)
        with torch.no_grad():
            together = objective.embed_speech(batch["audio"], batch["audio_lens"])
            for i, n in enumerate(batch["audio_lens"].tolist()):
                alone = objective.embed_speech(batch["audio"][i : i + 1, :n], batch["audio_lens"][i : i + 1])
                torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.norm(dim=-1), torch.ones(3))


def test_attention_pool_ignores_padded_frames():
    torch.manual_seed(0)
    pool = AttentionPool(4)
    x = torch.randn(2, 5, 4)
    lengths = torch.tensor([5, 2])
    spoiled = x.clone()
    spoiled[1, 2:] = 1e3
    torch.testing.assert_close(pool(x, lengths), pool(spoiled, lengths))
    weights = torch.softmax(pool.score(x[1, :2]).squeeze(-1), 0)
    torch.testing.assert_close(pool(x, lengths)[1], weights @ x[1, :2])
    assert torch.equal(pool(x, torch.tensor([5, 0]))[1], torch.zeros(4))  # no frame: no NaN


def test_forward_metrics_and_overfit_one_batch_to_full_accuracy():
    objective = _tiny().train()
    batch = _batch(objective)
    out = objective(batch)
    for key in ("loss", "image_loss", "speech_image_accuracy", "image_speech_accuracy", "logit_scale"):
        assert torch.isfinite(out[key]), key
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))  # CLIP's initial temperature
    assert abs(out["loss"].item() - math.log(3)) < 1.0  # near chance at initialisation (scale 14.3)
    out["loss"].backward()
    assert not [
        n for n, p in objective.named_parameters() if p.grad is None and n != "encoder.mask_embedding"
    ]
    opt = torch.optim.Adam(objective.parameters(), lr=2e-3)
    for _ in range(25):
        opt.zero_grad()
        objective(batch)["loss"].backward()
        opt.step()
    final = objective.eval()(batch)
    assert final["speech_image_accuracy"].item() == 1.0 and final["image_speech_accuracy"].item() == 1.0
    assert final["loss"].item() < 0.5 * out["loss"].item()


def test_on_step_clamps_the_logit_scales_where_they_still_learn():
    objective = _tiny(caption_weight=0.5)
    scales = (objective.logit_scale, objective.caption_scale)
    opt = torch.optim.SGD([s.log_scale for s in scales], lr=1.0)
    with torch.no_grad():
        for s in scales:
            s.log_scale.fill_(math.log(100) - 0.1)
    opt.zero_grad()
    (-(scales[0]() + scales[1]())).backward()  # a step that pushes both past log 100
    opt.step()
    assert all(s.log_scale.item() > math.log(100) + 1 for s in scales)
    for s in scales:  # clamped only in forward, the gradient there is 0: it would stay stuck
        s.log_scale.grad = None
        s().backward()
        assert s.log_scale.grad.item() == 0
    objective.on_step(1)
    for s in scales:
        assert s.log_scale.item() == pytest.approx(math.log(100))
        s.log_scale.grad = None
        s().backward()
        assert s.log_scale.grad.item() == pytest.approx(100.0)  # d exp(x) / dx at the cap: not 0
    with torch.no_grad():
        scales[0].log_scale.fill_(-1.0)
    objective.on_step(2)
    assert scales[0].log_scale.item() == 0.0  # open_clip's lower bound: scale >= 1


def test_caption_term_gathers_speech_image_and_text_once():
    objective = _tiny(caption_weight=0.5).eval()
    batch = _batch(objective)
    batch["text"], batch["text_lens"] = objective.text_tokenizer.batch(
        ["a red circle", "two stars", "a big cross"]
    )
    calls = []

    def counting_gather(x, rank, world_size):
        calls.append(x.shape)
        return x, [x.shape[0]]

    objective.gather = counting_gather
    out = objective(batch)
    assert calls == [(3, 3 * objective.dim)]  # speech, image and text side by side, one call
    objective.gather = gather_rows
    torch.testing.assert_close(objective(batch)["loss"], out["loss"])


def test_frozen_image_tower_gets_no_gradient():
    objective = _tiny(freeze_image=True)
    objective(_batch(objective))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in objective.image_tower.parameters())
    assert objective.speech_proj.weight.grad is not None
    objective.train()
    assert not objective.image_tower.training


def test_frozen_speech_tower_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    objective = _tiny(freeze_speech=True)
    objective.train()
    assert not objective.encoder.training and objective.image_tower.training
    batch = _batch(objective)
    out = objective(batch)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in objective.encoder.parameters())
    assert objective.speech_proj.weight.grad is not None
    assert any(p.grad is not None for p in objective.image_tower.parameters())
    # the embedding is the eval-mode encoder's (no dropout), so two passes agree
    embed = objective.embed_speech(batch["audio"], batch["audio_lens"])
    torch.testing.assert_close(embed, objective.embed_speech(batch["audio"], batch["audio_lens"]))
    # the unfrozen tower trains: dropout makes two passes differ
    trained = _tiny(freeze_speech=False, encoder={"dropout": 0.5})
    trained.train()
    b = _batch(trained)
    assert not torch.allclose(
        trained.embed_speech(b["audio"], b["audio_lens"]), trained.embed_speech(b["audio"], b["audio_lens"])
    )


def test_caption_term_adds_the_text_tower():
    objective = _tiny(caption_weight=0.5)
    assert objective.modalities == ("audio", "image", "text")
    batch = _batch(objective)
    batch["text"], batch["text_lens"] = objective.text_tokenizer.batch(
        ["a red circle", "two stars", "a big cross"]
    )
    out = objective(batch)
    torch.testing.assert_close(out["loss"], out["image_loss"] + 0.5 * out["caption_loss"])
    assert "speech_text_accuracy" in out
    out["loss"].backward()
    assert objective.text_tower.text.token_embedding.weight.grad is not None
    no_text = _tiny()
    assert no_text.text_tower is None and no_text.modalities == ("audio", "image")
    with pytest.raises(ConfigError, match="caption_weight"):
        no_text.embed_text(batch["text"], batch["text_lens"])


def test_bad_options_and_missing_modalities_are_named():
    objective = _tiny()
    batch = _batch(objective)
    del batch["image"]
    with pytest.raises(DataError, match="image"):
        objective(batch)
    with pytest.raises(ConfigError, match="pooling"):
        _tiny(pooling="max")
    with pytest.raises(ConfigError, match="size"):
        OBJECTIVES.build("speech_image", size="huge")


def test_recipe_builds_and_runs():
    from mmssl.config import builder_kwargs, load_config, resolve

    cfg = resolve(
        load_config("speech_image", ["data.train=m.jsonl", "model.size=tiny", "objective.speech=fbank"])
    )
    assert list(cfg.data.modalities) == ["audio", "image"]
    kwargs = {**builder_kwargs(cfg.objective), **builder_kwargs(cfg.model, drop=())}
    objective = OBJECTIVES.build(cfg.objective.name, **kwargs, rank=0, world_size=1)
    assert torch.isfinite(objective(_batch(objective))["loss"])


def _rank_worker(rank, world_size, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    x, y = _unit(6, 4, seed=10), _unit(6, 4, seed=11)
    groups = torch.tensor([0, 1, 2, 0, 3, 1])  # groups 0 and 1 span both ranks
    a = x[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
    b = y[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
    loss, _, _ = symmetric_info_nce(
        a, b, torch.tensor(5.0), groups[rank * 3 : (rank + 1) * 3], rank, world_size
    )
    loss.backward()
    out[rank, :, :8] = torch.cat([a.grad, b.grad], 1)
    out[rank, :, 8] = loss.detach()
    dist.destroy_process_group()


def _objective_rank_worker(rank, world_size, init, objective, batch, out):
    import torch.distributed as dist

    import mmssl.nn.gather as gather_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    exchanges = []
    real = gather_module.gather_sizes

    def counted(x, world_size):
        exchanges.append(x.shape)
        return real(x, world_size)

    gather_module.gather_sizes = counted
    objective.rank, objective.world_size = rank, world_size
    rows = [2 * rank, 2 * rank + 1]
    n = int(batch["audio_lens"][rows].max())
    t = int(batch["text_lens"][rows].max())
    mine = {
        "audio": batch["audio"][rows, :n],
        "audio_lens": batch["audio_lens"][rows],
        "image": batch["image"][rows],
        "text": batch["text"][rows, :t],
        "text_lens": batch["text_lens"][rows],
        "groups": [batch["groups"][i] for i in rows],
        "ids": [batch["ids"][i] for i in rows],
    }
    with torch.no_grad():
        result = objective(mine)
    out[rank, 0], out[rank, 1] = result["image_loss"], result["caption_loss"]
    out[rank, 2] = len(exchanges)
    dist.destroy_process_group()


def test_two_gloo_ranks_of_the_objective_exchange_sizes_once(tmp_path):
    import torch.multiprocessing as mp

    objective = _tiny(caption_weight=0.5).eval()
    batch = _batch(objective, groups=("a", "b", "a", "c"), lengths=(8000, 5600, 3200, 6400))
    batch.pop("group_ids")
    captions = ["a red circle", "two stars", "a dot", "a cross"]
    batch["text"], batch["text_lens"] = objective.text_tokenizer.batch(captions)
    out = torch.zeros(2, 3).share_memory_()
    mp.start_processes(
        _objective_rank_worker,
        args=(2, f"file://{tmp_path / 'pg'}", objective, batch, out),
        nprocs=2,
        start_method="fork",
    )
    # one size exchange per step: group ids reuse it, the caption term reuses the speech rows
    assert out[:, 2].tolist() == [1.0, 1.0]
    with torch.no_grad():
        whole = objective(batch)  # group "a" spans both ranks: masked across them too
    torch.testing.assert_close(out[:, 0].mean(), whole["image_loss"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 1].mean(), whole["caption_loss"], atol=1e-5, rtol=1e-4)


def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    import torch.multiprocessing as mp

    out = torch.zeros(2, 3, 9).share_memory_()
    mp.start_processes(
        _rank_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, start_method="fork"
    )
    x = _unit(6, 4, seed=10).requires_grad_()
    y = _unit(6, 4, seed=11).requires_grad_()
    loss, _, _ = symmetric_info_nce(x, y, torch.tensor(5.0), torch.tensor([0, 1, 2, 0, 3, 1]))
    loss.backward()
    # DDP averages over ranks: the mean of the ranks' losses and gradients is the whole batch's
    torch.testing.assert_close(out[:, 0, 8].mean(), loss.detach())
    torch.testing.assert_close(out[:, :, :8].reshape(6, 8) / 2, torch.cat([x.grad, y.grad], 1))


def test_speech_tower_starts_from_a_pretraining_run(speech_image_run):
    from mmssl.runs import load_encoder_from_run, resolve_inits

    run, _ = speech_image_run
    pretrained = load_encoder_from_run(run).state_dict()
    objective = OBJECTIVES.build(
        "speech_image", size="tiny", **resolve_inits("speech_image", {"speech_init": str(run)})
    )
    started = objective.encoder.state_dict()
    assert started.keys() == pretrained.keys() and len(started) > 10
    for name, p in started.items():
        torch.testing.assert_close(p, pretrained[name], msg=name)
    assert objective.encoder.training  # fine-tuned, not frozen
    with pytest.raises(ConfigError, match="overrides"):
        OBJECTIVES.build(
            "speech_image", size="tiny", speech_init=load_encoder_from_run(run), encoder={"dropout": 0.0}
        )


def test_an_audio_visual_speech_tower_embeds_its_audio_stream():
    from mmssl.encoders.av import av_tiny
    from mmssl.nn.padding import masked_mean

    torch.manual_seed(0)
    av = av_tiny()  # modality dropout 0.5 as built: the tower must not drop the only stream
    objective = OBJECTIVES.build("speech_image", size="tiny", speech_init=av)
    assert objective.encoder is av and av.fusion.modality_dropout == 0.0
    batch = tiny_audio_batch(seed=1)
    objective.eval()
    got = objective.embed_speech(batch["audio"], batch["audio_lens"])
    out = av.encode({"audio": batch["audio"], "audio_lens": batch["audio_lens"]})
    want = F.normalize(objective.speech_proj(masked_mean(out.hidden, out.lengths)), dim=-1)
    torch.testing.assert_close(got, want)
    assert F.cosine_similarity(got[0], got[1], dim=0) < 0.999  # the clips' audio, not zeros alike
    with pytest.raises(ConfigError, match="without an audio stream"):
        OBJECTIVES.build("speech_image", size="tiny", speech_init=av_tiny(audio=False))


def test_the_small_clip_is_a_resnet_on_64_pixel_images():
    objective = OBJECTIVES.build("speech_image", size="small", speech="fbank")
    tower = objective.image_tower
    assert type(tower.visual).__name__ == "ModifiedResNet" and objective.dim == 128
    image = torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)
    pixels = tower.transform()(image)
    assert tuple(pixels.shape) == (3, 64, 64)
    assert tuple(objective.embed_image(pixels[None]).shape) == (1, 128)
