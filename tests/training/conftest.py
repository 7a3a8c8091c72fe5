"""Fixtures of the training tests (helpers are in training_support.py)."""

import os

import pytest

from training_support import STORED, STORED_EAGLE, EagleWorkspace, Workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    from meteor_plugin import MeteorConfig
    from meteor_plugin.testing import workspace as tiny
    from meteor_plugin.training import convert

    root = str(tmp_path_factory.mktemp("meteor-train"))
    tiny.prepare(root)
    config = os.path.join(root, "meteor.json")
    MeteorConfig(**STORED).save(config)
    convert.convert(os.path.join(root, "models", "tiny-llava-v1"), os.path.join(root, "models", "tiny-llava-v1-meteor"),
                    config)
    return Workspace(root)


@pytest.fixture(scope="session")
def eagle_workspace(tmp_path_factory) -> EagleWorkspace:
    """A tiny EAGLE-like checkpoint (three encoders), its converted copy, data, and the config file the run
    from the unconverted checkpoint is given."""
    from meteor_plugin import MeteorConfig
    from meteor_plugin.testing import workspace as tiny
    from meteor_plugin.training import convert

    root = str(tmp_path_factory.mktemp("meteor-train-eagle"))
    tiny.prepare_eagle(root)
    workspace = EagleWorkspace(root)
    MeteorConfig(**STORED_EAGLE).save(workspace.config_file)
    convert.convert(workspace.original, workspace.model, workspace.config_file)
    return workspace
