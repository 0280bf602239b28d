"""The shared hyperparameter groups and the table of old flat keys."""

from dataclasses import asdict

import pytest

from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs, as_args, check_renamed, register_renamed


def test_as_args_reads_the_dataclass_a_checkpoint_dict_and_none():
    lora = LoRAArgs(r=4, targets=["query"])
    assert as_args(LoRAArgs, lora) is lora
    assert as_args(LoRAArgs, asdict(lora)) == lora  # hyperparameters saved as plain dicts come back equal
    assert as_args(LoRAArgs, None) == LoRAArgs()
    assert as_args(OptimizerArgs, {"learning_rate": 1e-3}) == OptimizerArgs(1e-3, 0.01, 0.06, None)


def test_as_args_refuses_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="LoRAArgs has no field 'rank'"):
        as_args(LoRAArgs, {"rank": 4})
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        OptimizerArgs(learning_rate=0.0)
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        OptimizerArgs(warmup_ratio=1.0)


def test_an_old_flat_key_is_one_error_naming_its_new_dotted_key():
    with pytest.raises(ValueError, match=r"^model\.init_args\.lora_r is now model\.init_args\.lora\.r$"):
        check_renamed({"task": "mrpc", "lora_r": 4})
    with pytest.raises(ValueError, match=r"^model\.init_args\.export_dir is now model\.init_args\.export\.dir$"):
        check_renamed({"export_dir": "out"})
    # `export` is both an old key (a bool) and the new group (a mapping).
    with pytest.raises(ValueError, match=r"export is now model\.init_args\.export\.enabled"):
        check_renamed({"export": False})
    check_renamed({"export": {"enabled": False}, "lora": {"r": 4}, "optimizer": asdict(OptimizerArgs())})


def test_a_module_s_own_entries_apply_to_that_module_only():
    register_renamed({"old_weight_for_test": "group.weight"}, module="SomeModuleForTest", meaning={"old_weight_for_test": "what it weighs"})
    check_renamed({"old_weight_for_test": 1.0}, module="OtherModule")
    with pytest.raises(ValueError, match=r"old_weight_for_test is now model\.init_args\.group\.weight \(what it weighs\)"):
        check_renamed({"old_weight_for_test": 1.0}, module="pkg.SomeModuleForTest")


def test_export_args_default_writes_beside_the_run():
    assert ExportArgs() == ExportArgs(enabled=True, dir=None)


def test_flat_hyperparameters_of_an_older_checkpoint_read_as_groups():
    from kdlora.training.args import nested_hparams

    old = {"model_name_or_path": "m", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "export": False, "export_dir": "e"}
    assert nested_hparams(old) == {"model_name_or_path": "m", "lora": {"r": 4, "alpha": 8},
                                   "optimizer": {"learning_rate": 1e-3}, "export": {"enabled": False, "dir": "e"}}
    assert as_args(LoRAArgs, nested_hparams(old)["lora"]) == LoRAArgs(r=4, alpha=8)
    new = {"lora": asdict(LoRAArgs()), "export": asdict(ExportArgs())}
    assert nested_hparams(new) == new
