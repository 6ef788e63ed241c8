"""--capture-video: after each stage (and, with --video-every-eval, at every periodic evaluation)
one recorded episode per task, as videos/*.mp4 in the run folder and as TensorBoard videos,
without changing anything the run computes (its metrics, a resumed run's too).

Meta-World renders with MuJoCo offscreen, MUJOCO_GL=egl, which needs EGL and Mesa's software
renderer (`.ci/run --install-gl`); without them the Meta-World recordings are skipped with the
reason, and with NBSP_REQUIRE_GL=1 (CI) they fail. Atari records the emulator's screen."""

import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nbsp_sac_atari as atari
import nbsp_sac_metaworld as mw
import protocol
from conftest import ATARI_TINY, MW_TINY, ROOT, kill_after_stage

VIDEO = dict(capture_video=True, video_size=64, video_steps=30)
# plain SAC (no identification rollouts), one evaluation episode; a periodic evaluation at step 200
MW_RUN = {**MW_TINY, "tasks": ["reach"], "cycles": 2, "method": "sac", "eval_every": 200}
ATARI_RUN = {**ATARI_TINY, "games": ["Pong"], "cycles": 2, "method": "sac", "eval_every": 200}


def gl_missing() -> str | None:
    """Why MuJoCo cannot render offscreen with EGL here (a fresh process), or None."""
    probe = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MUJOCO_GL": "egl"},
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        return None
    return f"MuJoCo cannot render with MUJOCO_GL=egl (install {mw.GL_PACKAGES}: .ci/run --install-gl)"


@pytest.fixture(scope="module")
def egl():
    why = gl_missing()
    if why:
        if os.environ.get("NBSP_REQUIRE_GL") == "1":
            pytest.fail(f"NBSP_REQUIRE_GL=1 but {why}")
        pytest.skip(why)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUJOCO_GL", "egl")  # as the script sets it when unset; put back after the module
        yield


def only_run(runs_dir) -> str:
    (name,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, name)


def without_wall_time(metrics: dict) -> dict:
    return metrics | {"run_name": None, "stages": [{k: v for k, v in stage.items() if k != "wall_seconds"}
                                                   for stage in metrics["stages"]]}


def read_video(path) -> np.ndarray:
    return np.stack(imageio.mimread(path, memtest=False))


def tensorboard_videos(run_dir) -> dict:
    """TensorBoard's videos (GIFs): tag -> [(step, width, height)]."""
    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}


# --------------------------------------------------------------------------------------------
# Meta-World
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mw_runs(egl, tmp_path_factory):
    """Two stages of reach, without and with videos (every evaluation), and the video run killed
    after stage 1 and resumed."""
    tmp = tmp_path_factory.mktemp("mw")
    plain = mw.main(mw.Args(**MW_RUN, runs_dir=str(tmp / "plain")))
    video = mw.main(mw.Args(**MW_RUN, **VIDEO, video_every_eval=True, runs_dir=str(tmp / "video")))
    killed = kill_after_stage(mw, mw.Args(**MW_RUN, **VIDEO, video_every_eval=True, runs_dir=str(tmp / "killed")), 1)
    resumed = mw.main(mw.Args(resume=killed, cuda=False))
    return {"plain": plain, "video": video, "video_dir": only_run(tmp / "video"), "resumed": resumed}


@pytest.mark.e2e
def test_metaworld_videos_leave_the_metrics_unchanged_and_resume_exactly(mw_runs):
    assert without_wall_time(mw_runs["video"]) == without_wall_time(mw_runs["plain"])
    assert without_wall_time(mw_runs["resumed"]) == without_wall_time(mw_runs["plain"])


@pytest.mark.e2e
def test_metaworld_videos_are_written_upright_and_to_tensorboard(mw_runs):
    run_dir = mw_runs["video_dir"]
    # the stage ends at global steps 150 and 300, the periodic evaluation at 200
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["stage1_reach.mp4", "stage2_reach.mp4", "step200_reach.mp4"]
    frames = read_video(os.path.join(run_dir, "videos", "stage1_reach.mp4"))
    assert frames.shape == (1 + VIDEO["video_steps"], 64, 64, 3)
    first = frames[0].astype(float)  # the arm's start pose: the light wall above, the table below
    assert first[:12].mean() > first[-12:].mean() + 10
    # TensorBoard: every 4th frame of the 80 frames/s episode (a GIF)
    assert tensorboard_videos(run_dir) == {"videos/reach": [(150, 64, 64), (200, 64, 64), (300, 64, 64)]}


@pytest.mark.parametrize("backend", [
    {"MUJOCO_GL": "glfw"},  # GLFW without a display
    {"MUJOCO_GL": "egl", "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"},  # EGL without Mesa's EGL
])
def test_metaworld_without_a_gl_backend_stops_with_one_line(backend, tmp_path):
    """A backend that cannot render: one `error:` line naming it and the packages (no traceback,
    no finalizer's error at exit), nothing written."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")} | backend | {
        "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "nbsp_sac_metaworld.py"), "--tasks", "reach",
                             "--hidden", "8", "--buffer-size", "1000", "--batch-size", "8", "--eval-episodes", "1",
                             "--identify-episodes", "1", "--no-cuda", "--capture-video", "--runs-dir", str(tmp_path / "runs")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --capture-video: MuJoCo cannot render with MUJOCO_GL={backend['MUJOCO_GL']} (")
    assert mw.GL_PACKAGES in line
    assert not os.path.exists(tmp_path / "runs")


# --------------------------------------------------------------------------------------------
# Atari
# --------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_atari_videos_are_the_screen_and_leave_the_metrics_unchanged(tmp_path):
    plain = atari.main(atari.Args(**ATARI_RUN, runs_dir=str(tmp_path / "plain")))
    video = atari.main(atari.Args(**ATARI_RUN, **VIDEO, runs_dir=str(tmp_path / "video")))
    assert without_wall_time(video) == without_wall_time(plain)
    run_dir = only_run(tmp_path / "video")
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["stage1_Pong.mp4", "stage2_Pong.mp4"]
    frames = read_video(os.path.join(run_dir, "videos", "stage1_Pong.mp4"))
    assert frames.shape == (1 + VIDEO["video_steps"], 64, 48, 3)  # 210 x 160 scaled to 64 rows
    # the first frame is the screen after the evaluation copy's reset, upright (H.264 blurs it a little)
    env = atari.make_env("Pong", ATARI_RUN.get("seed", 1) + protocol.EVAL_SEED_OFFSET, False, render=True)
    env.reset(seed=ATARI_RUN.get("seed", 1))
    screen = env.render()[np.arange(64) * 210 // 64][:, np.arange(48) * 160 // 48].astype(float)
    env.close()
    assert np.abs(frames[0] - screen).mean() < np.abs(frames[0] - screen[::-1]).mean() / 2
    assert tensorboard_videos(run_dir) == {"videos/Pong": [(240, 48, 64), (480, 48, 64)]}


@pytest.mark.parametrize("flags, says", [
    (["--video-every-eval"], "--video-every-eval records at the periodic evaluations of --capture-video"),
    (["--capture-video", "--video-every-eval", "--eval-every", "0"], "but --eval-every 0 turns them off"),
    (["--capture-video", "--video-size", "15"], "--video-size must be an even number of pixels in [16, 1024], got 15"),
    (["--capture-video", "--video-size", "2000"], "--video-size must be an even number of pixels in [16, 1024]"),
    (["--capture-video", "--video-steps", "0"], "--video-steps must be a positive integer, got 0"),
])
@pytest.mark.parametrize("script", [mw, atari])
def test_bad_video_flags_stop_with_one_line(script, flags, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.validate(protocol.parse_args(script.Args, script.__doc__, flags))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_a_stage_checkpoint_replays_the_video_of_its_stage(mw_runs, tmp_path, capsys):
    # scripts/record_video.py: stage 1's actor, after the run, records what --capture-video recorded after stage 1
    import record_video

    run_dir, out = mw_runs["video_dir"], str(tmp_path / "out")
    written = record_video.main([run_dir, "--stage", "1", "--out", out, "--frame", "10"])
    assert written == [os.path.join(out, "stage1_reach.mp4"), os.path.join(out, "stage1_reach_frame10.png")]
    replayed, recorded = (read_video(os.path.join(folder, "stage1_reach.mp4"))
                          for folder in (out, os.path.join(run_dir, "videos")))
    assert replayed.shape == recorded.shape == (1 + VIDEO["video_steps"], 64, 64, 3)
    assert np.array_equal(replayed, recorded)
    assert imageio.imread(written[1]).shape == (64, 64, 3)
    with pytest.raises(SystemExit) as stopped:  # bad input: one line
        record_video.main([run_dir, "--stage", "7"])
    assert stopped.value.code == 2
    atari_run = tmp_path / "atari_run"
    atari_run.mkdir()
    (atari_run / "config.json").write_text('{"args": {"games": ["Pong"], "method": "sac"}}')
    with pytest.raises(SystemExit) as stopped:
        record_video.main([str(atari_run)])
    assert stopped.value.code == 2 and "is an Atari run" in capsys.readouterr().err
