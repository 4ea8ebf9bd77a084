"""Home page (app.py) under AppTest: empty database, the demo button, the runs list, import."""

from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.config import RunConfig, WorkloadSpec
from store import RunReader, export_run
from ui import session

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30


def tiny_config(**knobs) -> RunConfig:
    """A run of the tiny random model that takes a few seconds on a CPU."""
    knobs.setdefault("workload", WorkloadSpec(
        kind="synthetic", num_requests=4, prompt_len_min=16, prompt_len_max=40,
        output_len_min=4, output_len_max=8, num_prefix_groups=1, shared_prefix_len=24))
    return RunConfig(model="tiny", device="cpu", block_size=8, num_blocks=32,
                     max_model_len=128, keyframe_interval=5, **knobs)


def wait_for_live_run(at: AppTest, timeout: float = 120) -> None:
    live = at.session_state[session.LIVE_KEY]
    assert live is not None, "no run was started"
    assert live.join(timeout), f"the run did not end within {timeout} s (phase {live.phase})"


def test_empty_database_leads_to_the_demo(store):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert at.title[0].value == "KV Cache Lab"
    demo = [b for b in at.button if b.label == "Run the demo"]
    assert demo and not demo[0].disabled
    assert any("No runs yet" in i.value for i in at.info)


def test_demo_button_runs_and_opens_the_replay(store, monkeypatch):
    # The real demo loads SmolLM2 (the browser test covers it); the flow is the same.
    monkeypatch.setattr(session, "demo_config", tiny_config)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    next(b for b in at.button if b.label == "Run the demo").click().run()
    assert not at.exception
    wait_for_live_run(at)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    runs = RunReader(store).list_runs()
    assert runs["status"].tolist() == ["finished"]
    assert "demo" in runs["tags"].iloc[0]
    # switched to the Replay page on the demo's run
    assert at.title[0].value == "Replay"
    assert at.selectbox(key="replay_run").value == int(runs["run_id"].iloc[0])
    assert at.get("vega_lite_chart")


def test_latest_runs_are_listed_and_a_trace_file_imports(store, tmp_path):
    from engine.run import run
    from store import RunWriter

    writer = RunWriter(store, tiny_config(), name="seeded")
    writer.close(summary=run(tiny_config(), writer).summary.to_dict())
    path = export_run(store, writer.run_id, tmp_path / "seeded.kvtrace.zip")

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert table["name"].tolist() == ["seeded"]
    at.file_uploader(key="home_import").upload(path.name, path.read_bytes(), "application/zip")
    at.run()
    assert not at.exception
    assert any("Imported" in s.value for s in at.success)
    assert len(RunReader(store).list_runs()) == 2
    at.run()  # a rerun must not import the same upload again
    assert len(RunReader(store).list_runs()) == 2


def test_a_file_imported_before_is_not_imported_again_unless_asked(store, tmp_path):
    from engine.run import run
    from store import RunWriter, import_run

    writer = RunWriter(store, tiny_config(), name="seeded")
    writer.close(summary=run(tiny_config(), writer).summary.to_dict())
    path = export_run(store, writer.run_id, tmp_path / "seeded.kvtrace.zip")
    first = import_run(store, path)

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    table = at.dataframe[0].value.set_index("run_id")
    assert table.loc[[first, writer.run_id], "imported"].tolist() == [True, False]
    at.file_uploader(key="home_import").upload(path.name, path.read_bytes(), "application/zip")
    at.run()
    assert not at.exception and not at.error and not at.success
    assert [w.value for w in at.warning] == [
        f"seeded.kvtrace.zip is already imported as run #{first}; nothing was added."]
    assert len(RunReader(store).list_runs()) == 2
    at.run()  # a rerun neither imports nor loses the offer
    assert len(RunReader(store).list_runs()) == 2 and at.warning
    at.button(key="home_import_copy").click().run()
    assert not at.exception
    runs = RunReader(store).list_runs()
    assert len(runs) == 3 and runs["imported"].tolist() == [True, True, False]
    copy = int(runs["run_id"].iloc[0])
    assert [s.value for s in at.success] == [f"Imported seeded.kvtrace.zip as run #{copy}."]
    at.run()  # the copy is made once
    assert len(RunReader(store).list_runs()) == 3


def test_the_demo_settings_shown_are_the_settings_it_runs(store, monkeypatch):
    monkeypatch.setattr(session, "demo_config", tiny_config)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    shown = next(j.value for j in at.json)
    next(b for b in at.button if b.label == "Run the demo").click().run()
    wait_for_live_run(at)
    info = RunReader(store).run_info(int(RunReader(store).list_runs()["run_id"].iloc[0]))
    assert json.loads(shown) == tiny_config().to_dict() == info.config.to_dict()


def test_the_demo_config_itself_is_what_the_home_page_describes(store):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    config = session.demo_config()
    assert json.loads(next(j.value for j in at.json)) == config.to_dict()
    caption = next(c.value for c in at.caption if "The demo serves" in c.value)
    assert f"in {config.num_blocks} blocks of {config.block_size} tokens" in caption
    assert f"{config.max_num_seqs} running at most" in caption


def test_a_reload_during_the_demo_reattaches_to_it(store, monkeypatch):
    long = tiny_config(sampling={"ignore_eos": True}, workload=WorkloadSpec(
        kind="synthetic", num_requests=8, output_len_min=300, output_len_max=300))
    monkeypatch.setattr(session, "demo_config", lambda: long)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    next(b for b in at.button if b.label == "Run the demo").click().run()
    live = at.session_state[session.LIVE_KEY]
    reloaded = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
    assert not reloaded.exception
    assert reloaded.session_state[session.LIVE_KEY] is live
    assert next(b for b in reloaded.button if b.label == "Run the demo").disabled
    reloaded.button(key="demo_stop").click().run()
    assert live.join(60) and live.phase == "interrupted"
