"""Shared test fixtures."""

import os

import pytest


@pytest.fixture
def kill_after_stage_1(monkeypatch):
    """A function that runs `script.main(args)` until stage 1's checkpoint and metrics.json are
    written, then stops it as a kill would, and returns the run folder (for `--resume` tests)."""

    def run(script, args):
        written = []
        original = script.atomic_write_json

        def killed_after_first_metrics(path, data):
            original(path, data)
            if path.endswith("metrics.json"):
                written.append(path)
                raise KeyboardInterrupt

        monkeypatch.setattr(script, "atomic_write_json", killed_after_first_metrics)
        with pytest.raises(KeyboardInterrupt):
            script.main(args)
        monkeypatch.setattr(script, "atomic_write_json", original)
        return os.path.dirname(written[0])

    return run
