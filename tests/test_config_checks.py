"""``--config`` values that build no model are refused when the arguments are checked, in one
line naming the field (models/configs.py ``check_config``), before any data or weights are read."""

from __future__ import annotations

import pytest

import train
from models.configs import CONFIGS, ConfigOverrideError, apply_overrides, check_config, flat_fields
from utils.cli import run_main
from utils.runtime import distributed as dist

BAD = [
    ("testing", "hidden_size=0", "hidden_size=0: must be a positive integer"),
    ("testing", "hidden_size=-16", "hidden_size=-16: must be a positive integer"),
    ("testing", "transformer.mlp_dim=0", "transformer.mlp_dim=0: must be a positive integer"),
    ("testing", "transformer.num_heads=0", "transformer.num_heads=0: must be a positive"),
    ("testing", "transformer.num_heads=-2", "transformer.num_heads=-2: must be a positive"),
    ("testing", "transformer.num_layers=0", "transformer.num_layers=0: must be a positive"),
    ("testing", "transformer.num_heads=5", "hidden_size 16 is not divisible by"),
    ("testing", "transformer.dropout_rate=1", "transformer.dropout_rate=1.0: must be a rate"),
    ("testing", "transformer.dropout_rate=-0.1", "dropout_rate=-0.1: must be a rate in [0, 1)"),
    ("testing", "transformer.dropout_rate=nan", "transformer.dropout_rate=nan: must be a rate"),
    ("testing", "transformer.attention_dropout_rate=inf", "attention_dropout_rate=inf: must"),
    ("testing", "transformer.attention_dropout_rate=1.5", "attention_dropout_rate=1.5: must"),
    ("testing", "patches.size=0,0", "patches.size=0,0: must be positive integers"),
    ("testing", "patches.size=-4,-4", "patches.size=-4,-4: must be positive integers"),
    ("testing", "patches.size=4,8", "patches.size=4,8: must be square"),
    ("testing", "classifier=gap", "classifier=gap: only 'token'"),
    ("testing", "representation_size=0", "representation_size=0: must be a positive integer"),
    ("testing", "representation_size=-8", "representation_size=-8: must be a positive"),
    ("R50-ViT-B_16", "resnet.width_factor=0", "resnet.width_factor=0: must be a positive"),
    ("R50-ViT-B_16", "resnet.num_layers=3,0,9", "resnet.num_layers=3,0,9: must be positive"),
    ("R26+ViT-S_32", "resnet.num_layers=2,-2", "resnet.num_layers=2,-2: must be positive"),
]


@pytest.mark.parametrize(("model_type", "item", "message"), BAD, ids=[b[1] for b in BAD])
def test_an_override_that_builds_no_model_is_refused(
    model_type: str, item: str, message: str
) -> None:
    with pytest.raises(ConfigOverrideError) as error:
        apply_overrides(CONFIGS[model_type], [item])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_field_of_every_config_has_a_rule_and_passes_it() -> None:
    """check_config asserts a rule for each field; an unchecked new field fails here first."""
    for name, config in CONFIGS.items():
        check_config(config)
        assert flat_fields(config.to_dict()), name
    # the boundaries that do build a model are accepted
    fine = ["transformer.dropout_rate=0", "transformer.num_heads=16", "representation_size=none"]
    assert apply_overrides(CONFIGS["testing"], fine).transformer.num_heads == 16
    assert apply_overrides(CONFIGS["R+ViT-Ti_16"], ["resnet.num_layers="]).resnet.num_layers == ()


def test_train_refuses_it_at_argument_check_time_in_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit code 2 before dist.setup: nothing is downloaded, built or written."""
    monkeypatch.setattr(dist, "setup", lambda *a: pytest.fail("went past check_args"))
    argv = ["--name", "x", "--model_type", "testing", "--img_size", "32", "--pretrained_dir",
            "none", "--config", "transformer.dropout_rate=nan"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: train.main(argv), "train.py")
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert (
        err == "train.py: error: --config transformer.dropout_rate=nan: must be a rate in [0, 1)\n"
    )


def test_an_override_that_makes_too_many_patches_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patch bound counts the config's patches, overrides included: 1-px patches make a
    224 px image 50176 tokens, which the start-up memory measurement would take minutes over."""
    monkeypatch.setattr(dist, "setup", lambda *a: pytest.fail("went past check_args"))
    argv = ["--name", "x", "--model_type", "testing", "--img_size", "224", "--pretrained_dir",
            "none", "--config", "patches.size=1,1"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: train.main(argv), "train.py")
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "--img_size 224 makes 50176 patches of 1 px" in err and "Use --img_size 64" in err
