import pytest

from fastlt.models import create_model, list_models, register_model


def test_registry_lists_and_builds_every_family():
    names = list_models()
    for name in ("resnet32", "ride_resnet32", "reslt_resnet32", "small_cnn", "ride_resnext50_32x4d",
                 "reslt_resnext50_32x4d", "reslt_resnet152", "resnext50_32x4d"):
        assert name in names
    assert list_models("ride_*") == [name for name in names if name.startswith("ride_")]
    with pytest.raises(KeyError, match="unknown model 'resnet33'"):
        create_model("resnet33", num_classes=10)


def test_registering_a_name_twice_fails():
    def resnet32(num_classes):
        return None

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet32)
