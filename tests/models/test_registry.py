"""Registry API; every registered model is built and run in test_model_smoke.py."""

import pytest

from fastlt.models import create_model, list_models, register_model


def test_list_models_filters_by_pattern_and_create_model_refuses_unknown_names():
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    assert list_models("ride_*") == [name for name in names if name.startswith("ride_")]
    assert list_models("ride_*") and list_models("nothing_*") == []
    with pytest.raises(KeyError, match="unknown model 'resnet33'"):
        create_model("resnet33", num_classes=10)


def test_registering_a_name_twice_fails():
    def resnet32(num_classes):
        return None

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet32)
