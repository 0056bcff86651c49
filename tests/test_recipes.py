"""Each paper script's recipe, field by field, against the reference code's values (read off the reference
scripts, cited per table), so a recipe cannot drift silently; and the command line's way to the recipe and back
from a saved run."""
import dataclasses
import json
import subprocess
import sys

import pytest

from dinomaly import cli, recipes
from dinomaly.recipes import Recipe, SegmentationRecipe

import crr_realiad_stage1
import crr_realiad_stage2
import dinomaly2_2d
import dinomaly2_fewshot
import dinomaly2_mulsen
import dinomaly2_multiview
import dinomaly2_mvtec3d
import dinomaly_mvtec_uni
import dinomaly_sep
import dinomaly_visa_uni
from conftest import ROOT

UNUSED = object()  # a field the method's reference code has no value for (its schedule does not read it)

# guojiajeremy/Dinomaly, dinomaly_mvtec_uni.py: total_iters 10000 (l.72), batch 16 (l.73), 448 -> 392 (l.74-75),
# dinov2reg_vit_base_14 (l.104), 8 taps in two groups of 4 (l.116-118), bMlp(D, 4D, D, drop=0.2) (l.137), 8
# decoder blocks of LinearAttention2 without epsilon (l.144-146), StableAdamW one group lr 2e-3, betas (0.9,
# 0.999), weight decay 1e-4, AMSGrad, eps 1e-10 (l.165-166), WarmCosineScheduler 2e-3 -> 2e-4, warm-up 100
# (l.167-168), hard mining p = min(0.9 it / 1000, 0.9), factor 0.1 (l.184-186), clip_grad_norm 0.1 (l.191).
DINOMALY_MVTEC = dict(
    method="dinomaly", encoder="dinov2reg_vit_base_14", image_size=448, crop_size=392, taps=None, bottleneck="mlp",
    dropout=0.2, decoder_depth=8, attn_eps=0.0, mask_ratio=0.0, test_mask="off", lc=2, cr=0, la=1,
    total_iters=10000, batch_size=16, shot=None, lr=2e-3, bottleneck_in_lr=None, betas=(0.9, 0.999), adam_eps=1e-10,
    weight_decay=1e-4, amsgrad=True, clip_norm=0.1, schedule="cosine", warmup_iters=100, lr_final=2e-4,
    lr_decay_ratio=UNUSED, hm_max_p=0.9, hm_ramp_iters=1000, hm_factor=0.1, modality="rgb")
# dinomaly_visa_uni.py: the same values (l.72-75, 101, 126, 151-153, 168-175)
DINOMALY_VISA = DINOMALY_MVTEC
# dinomaly_{mvtec,visa,mpdd}_sep.py: total_iters 5000 (l.79), eps 1e-8 (l.144-145); else as the uni scripts;
# dinomaly_realiad_sep.py: eps 1e-10 (l.146)
DINOMALY_SEP = dict(DINOMALY_MVTEC, total_iters=5000, adam_eps=1e-8)
DINOMALY_SEP_REALIAD = dict(DINOMALY_SEP, adam_eps=1e-10)
# Qiqigeww/CRR-MUAD, dinomaly_realiad_uni_first.py: total_iters 50000, batch 16, 448 -> 392 (l.69-72), ViT-B
# (l.100), bMlp6(..., drop=0.4, lambda_mgd=0.4) (l.124: bottleneck masking 0.4, also in eval), StableAdamW as
# Dinomaly's (l.149), WarmCosineScheduler 2e-3 -> 2e-4, warm-up 100 (l.150-151), hard mining 0.9 / 0.1
# (l.170-173), clip 0.1 (l.178)
CRR_STAGE1 = dict(DINOMALY_MVTEC, method="crr", dropout=0.4, mask_ratio=0.4, test_mask="on", total_iters=50000)
# dinomaly_realiad_uni_second.py: total_iters 8000, batch 8 (l.74-76), Adam lr 1e-4 (l.153), Seg_model_{it}.pth
# every 4000 iterations (l.198-199)
CRR_STAGE2 = dict(method="crr_stage2", total_iters=8000, batch_size=8, lr=1e-4, checkpoint_every=4000)
# negin-kafee/Dinomaly2 (the preview), dinomaly_2D.py: --backbone dinov2reg_vit_small_14, --dropout 0.4, --la 1,
# --lc 2, --ll_ratio 0.9, --ll_factor 0.1, --cr 1, 448 -> 392, --total_iters 40000, --lr_decay_ratio 1
# (l.261-279), batch 16 (l.67), the two-stage bottleneck (l.151-153), LinearAttention2 eps 1e-8 (l.158-159),
# StableAdamW groups bottleneck[0] at 2e-4 / bottleneck[1] / decoder at 2e-3, no AMSGrad, eps 1e-10, weight decay
# 1e-4 (l.173-176), WarmupCosineScheduler warm-up 100 (l.177-178), clip 0.1 (l.201)
DINOMALY2_2D = dict(
    DINOMALY_MVTEC, method="dinomaly2", encoder="dinov2reg_vit_small_14", bottleneck="two_stage", dropout=0.4,
    attn_eps=1e-8, cr=1, total_iters=40000, bottleneck_in_lr=2e-4, amsgrad=False, schedule="ratio", lr_final=UNUSED,
    lr_decay_ratio=1.0)
# dinomaly_fewshot.py: --shot 4 (l.257), else as dinomaly_2D.py (l.153-203, 265-283)
DINOMALY2_FEWSHOT = dict(DINOMALY2_2D, shot=4)
# dinomaly_multiview.py: --backbone dinov2reg_vit_base_14, --total_iters 100000 (l.277-290), the whole bottleneck
# at 2e-3 (l.184-186: one group; ours: its first layer's group at the same rate), final_ratio 1 (l.187); its
# default data (Real-IAD Variety) at 280 px (l.288-289), our Real-IAD default keeps 448 -> 392
DINOMALY2_MULTIVIEW = dict(DINOMALY2_2D, encoder="dinov2reg_vit_base_14", total_iters=100000, bottleneck_in_lr=2e-3)
# dinomaly_mvtec3d.py: --backbone dinov2reg_vit_base_14, --dropout 0.4, --total_iters 40000 (l.256-269), batch 16
# (l.67), DinomalyRGBD with rgb_ratio 0.5 (l.162-168), the whole bottleneck at 2e-3 (l.174-176: two groups; ours:
# its first layer's group at the same rate), final_ratio 1 (l.177), hard mining 0.9 / 0.1 (l.192-194); 448 -> 392 as
# the preview's README runs it (its argparse default: 392 -> 392, l.267-268)
DINOMALY2_MVTEC3D = dict(DINOMALY2_MULTIVIEW, total_iters=40000, modality="rgbd")
# dinomaly_mulsen.py: --backbone dinov2reg_vit_large_14, --dropout 0.2, 448 -> 392, --total_iters 20000,
# --lr_decay_ratio 1 (l.275-293), batch 8 pairs (l.67), the 2D groups (l.170-173), the plain model on
# cat([rgb, infrared]) (l.188)
DINOMALY2_MULSEN = dict(DINOMALY2_2D, encoder="dinov2reg_vit_large_14", dropout=0.2, total_iters=20000,
                        batch_size=8, modality="rgbir")

SCRIPTS = [(dinomaly_mvtec_uni, [], DINOMALY_MVTEC), (dinomaly_visa_uni, [], DINOMALY_VISA),
           (dinomaly_sep, [], DINOMALY_SEP), (dinomaly_sep, ["--dataset", "visa"], DINOMALY_SEP),
           (dinomaly_sep, ["--dataset", "realiad"], DINOMALY_SEP_REALIAD), (crr_realiad_stage1, [], CRR_STAGE1),
           (crr_realiad_stage2, [], CRR_STAGE2), (dinomaly2_2d, [], DINOMALY2_2D),
           (dinomaly2_fewshot, [], DINOMALY2_FEWSHOT), (dinomaly2_multiview, [], DINOMALY2_MULTIVIEW),
           (dinomaly2_mvtec3d, [], DINOMALY2_MVTEC3D), (dinomaly2_mulsen, [], DINOMALY2_MULSEN)]


def parse(module, argv=()):
    return cli.parse(module.__doc__, module.RECIPE, module.DEFAULTS, getattr(module, "DATASETS", None), list(argv))


@pytest.mark.parametrize("module, argv, reference", SCRIPTS, ids=[f"{m.__name__} {' '.join(a)}" for m, a, _ in SCRIPTS])
def test_each_scripts_recipe_is_the_reference_codes(module, argv, reference):
    recipe = parse(module, argv).recipe
    names = [f.name for f in dataclasses.fields(recipe)]
    assert sorted(reference) == sorted(names)  # every field is in the table: a new one must be checked too
    differ = {k: (getattr(recipe, k), v) for k, v in reference.items() if v is not UNUSED and getattr(recipe, k) != v}
    assert not differ, f"(ours, reference): {differ}"


def test_the_unused_fields_are_unused():
    """lr_final only shapes Dinomaly's cosine schedule, lr_decay_ratio only Dinomaly2's: changing them does not
    change the other schedule."""
    from dinomaly.train import reconstruction_schedule
    for recipe, unused in ((recipes.DINOMALY, "lr_decay_ratio"), (recipes.DINOMALY2, "lr_final")):
        a, b = (reconstruction_schedule(recipe.replace(**{unused: v})) for v in (0.5, 0.01))
        assert [a(i) for i in range(0, 10000, 97)] == [b(i) for i in range(0, 10000, 97)]


def test_a_flag_per_field_with_its_default_and_help():
    """Every recipe field with a help text is a flag of the scripts of the methods that use it, with the
    script's value as its default in --help; the fields without one are fixed by the method."""
    text = subprocess.run([sys.executable, "dinomaly2_2d.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120).stdout
    flat = " ".join(text.split())
    for f in recipes.flags(Recipe):
        assert (f"--{f.name} " in text) == (f in recipes.flags(Recipe, "dinomaly2")), f.name
    assert {f.name for f in recipes.flags(Recipe)} - {f.name for f in recipes.flags(Recipe, "dinomaly2")} == \
        {"mask_ratio", "test_mask", "lr_final"}
    assert "--bottleneck_in_lr BOTTLENECK_IN_LR learning rate of the first bottleneck layer" in flat
    assert "(default: 0.0002)" in flat and "(default: per --dataset: mvtec 448," in flat
    fixed = {f.name for f in dataclasses.fields(Recipe)} - {f.name for f in recipes.flags(Recipe)}
    assert fixed == {"method", "bottleneck", "betas", "amsgrad", "schedule", "modality"}
    for name in fixed:
        assert f"--{name} " not in text
    assert [f.name for f in recipes.flags(SegmentationRecipe)] == ["total_iters", "batch_size", "lr"]


def test_the_command_line_changes_the_recipe_and_records_what_it_gave():
    s = parse(dinomaly_mvtec_uni, ["--lr", "1e-3", "--hm_factor", "0.2", "--dropout", "0.3", "--save_name", "x"])
    assert (s.recipe.lr, s.recipe.hm_factor, s.recipe.dropout) == (1e-3, 0.2, 0.3)
    assert s.recipe == recipes.DINOMALY.replace(lr=1e-3, hm_factor=0.2, dropout=0.3)
    assert s.given == dict(lr=1e-3, hm_factor=0.2, dropout=0.3)  # recipe fields only; options are not in it
    assert s.run.save_name == "x" and s.run.save_name_given
    assert not parse(dinomaly_mvtec_uni).run.save_name_given
    # the --dataset table of a script: its values where the command line leaves them, the run name formatted
    s = parse(dinomaly2_2d, ["--dataset", "btad"])
    assert (s.recipe.image_size, s.recipe.crop_size, s.data.data_path, s.run.save_name) == \
        (392, 392, "../BTech_Dataset_transformed", "dinomaly2_btad_uni")
    s = parse(dinomaly2_2d, ["--dataset", "btad", "--image_size", "448", "--save_name", "{dataset}"])
    assert s.recipe.image_size == 448 and s.run.save_name == "{dataset}"  # a given name is taken as it is
    s = parse(dinomaly2_2d, ["--dataset", "realiad"])  # outside the table: no default
    assert (s.recipe.image_size, s.data.data_path) == (None, None)
    with pytest.raises(SystemExit):
        parse(dinomaly_mvtec_uni, ["--warmup_iters", "-1"])


def test_an_unknown_flag_is_named_with_the_closest_or_where_it_is(capsys):
    for argv, hint in ((["--totl_iters", "5"], "(did you mean --total_iters?)"),
                       (["--mask_ratio", "0.3"], "(--mask_ratio is a flag of the CRR scripts, not of this script)"),
                       (["--lc", "1"], "(--lc is a flag of the Dinomaly2 scripts, not of this script)")):
        with pytest.raises(SystemExit) as e:
            parse(dinomaly_mvtec_uni, argv)
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"unrecognized arguments: {' '.join(argv)} {hint}" in line


def test_bottleneck_in_lr_needs_dinomalys2_schedule(capsys):
    """A flag of Dinomaly2's scripts only (the error says where it is); a recipe built in Python that asks for
    it with Dinomaly's one-rate schedule is refused."""
    from dinomaly.errors import UserError
    with pytest.raises(SystemExit):
        parse(dinomaly_mvtec_uni, ["--bottleneck_in_lr", "1e-4"])
    assert "(--bottleneck_in_lr is a flag of the Dinomaly2 scripts, not of this script)" in capsys.readouterr().err
    with pytest.raises(UserError, match="--bottleneck_in_lr needs Dinomaly2's schedule"):
        recipes.check(recipes.DINOMALY.replace(bottleneck_in_lr=1e-4))
    recipes.check(recipes.DINOMALY2)


def test_config_json_is_the_recipe_and_loads_back(tmp_path):
    """A run's config.json holds its recipe ("model": the architecture, "training": the rest); a saved recipe
    comes back as it was, the given fields override it (logged), and an older run's "model" entry alone (or none:
    an official checkpoint) falls back to the recipe of its method."""
    from dinomaly import checkpoints
    recipe = recipes.DINOMALY2.replace(encoder="dinov2reg_vit_small_14", lr=1e-3, hm_factor=0.2, image_size=280,
                                       crop_size=224)
    settings = parse(dinomaly2_2d)
    config = settings.config(model=recipe, training=recipe, setting="multi-class")
    assert set(config["model"]) == {f.name for f in dataclasses.fields(Recipe)
                                    if f.metadata["part"] == "model"} | {"setting"}
    assert set(config["model"]) | set(config["training"]) == {f.name for f in dataclasses.fields(Recipe)} | \
        {"setting"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = str(tmp_path / "model.pth")
    assert checkpoints.saved_recipe(path, "dinomaly")[0] == recipe
    assert checkpoints.followed(recipe, {"image_size": 320}, set(config["model"])) == recipe.replace(image_size=320)
    (tmp_path / "config.json").write_text(json.dumps({"model": dict(method="crr", image_size=64, crop_size=56)}))
    assert checkpoints.saved_recipe(path, "dinomaly")[0] == recipes.CRR_STAGE1.replace(encoder="", image_size=64,
                                                                                     crop_size=56)
    (tmp_path / "config.json").unlink()
    assert checkpoints.saved_recipe(path, "dinomaly2")[0] == recipes.DINOMALY2.replace(encoder="")


def test_recipes_and_options_import_without_torch():
    code = ("import sys; import dinomaly.recipes, dinomaly.options, dinomaly.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_default_taps_are_the_reference_codes():
    """taps None: the encoder's own, which are the reference scripts' target_layers (dinomaly_mvtec_uni.py
    l.116 and l.130: blocks 2-9 of ViT-S/B, 4, 6, ..., 18 of ViT-L)."""
    from dinomaly import models
    for name in ("dinov2reg_vit_small_14", "dinov2reg_vit_base_14"):
        assert models.ENCODERS[name].taps == (2, 3, 4, 5, 6, 7, 8, 9)
    assert models.ENCODERS["dinov2reg_vit_large_14"].taps == (4, 6, 8, 10, 12, 14, 16, 18)


def test_taps_given_are_trained_saved_and_reloaded(monkeypatch, tmp_path, capsys):
    """--taps chooses other encoder blocks: the model taps them (their outputs are those blocks' outputs in an
    encoder with the standard taps), config.json records them, and every later use rebuilds the model with them;
    impossible taps are one line."""
    import torch

    from dinomaly import checkpoints, models
    from dinomaly.models.vitill import ViTill

    from conftest import TINY_CFG
    from prepare_data.make_demo_data import make_demo_data
    deep = dataclasses.replace(TINY_CFG, depth=10)
    monkeypatch.setitem(models.ENCODERS, "tiny10", deep)
    demo = make_demo_data(str(tmp_path / "data"), size=32, seed=0, n_train=4, n_test_good=1, n_test_bad=1)
    taps = ["1", "2", "3", "4", "6", "7", "8", "9"]
    argv = ["--data_path", demo["mvtec"], "--classes", "nut", "--encoder", "tiny10", "--encoder_weights", "random",
            "--image_size", "32", "--crop_size", "28", "--total_iters", "1", "--batch_size", "2", "--num_workers",
            "0", "--device", "cpu", "--save_dir", str(tmp_path), "--save_name", "taps", "--taps", *taps]
    cli.run_script(dinomaly_mvtec_uni, argv)
    run = tmp_path / "taps"
    assert json.loads((run / "config.json").read_text())["model"]["taps"] == [int(t) for t in taps]
    model, recipe = checkpoints.load_trained(str(run), {}, "dinomaly")
    assert recipe.taps == model.encoder.cfg.taps == (1, 2, 3, 4, 6, 7, 8, 9)
    standard = ViTill(deep).eval()  # the same blocks tapped at 0, 1, ..., 7
    standard.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 28, 28)
    ours, blocks = model.encoder(x), standard.encoder(x)
    for i, block in enumerate((1, 2, 3, 4, 6, 7)):
        torch.testing.assert_close(ours[i], blocks[block], rtol=0, atol=0)
    with pytest.raises(SystemExit) as e:
        cli.run_script(dinomaly_mvtec_uni, [*argv[:-8], "0", "1", "2", "3", "4", "5", "6", "12", "--overwrite"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --taps 0 1 2 3 4 5 6 12: give 8 different blocks in increasing order, from 0 to 9 (this encoder "
        "has 10)")
