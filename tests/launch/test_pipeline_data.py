"""The sanity pipeline hands the data flags (--dataset_columns, --chat_template) to every step that reads the data:
SFT, DPO and the comparison (checked on the steps' command lines; nothing is run)."""

from __future__ import annotations

import launch.pipeline as pipeline


def test_data_flags_reach_sft_dpo_and_compare(tmp_path, monkeypatch):
    steps: dict = {}
    monkeypatch.setattr(pipeline.Pipeline, "step", lambda self, name, argv: steps.__setitem__(name, [str(a) for a in argv]))
    monkeypatch.setattr(pipeline.shutil, "copyfile", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "summary", lambda *a, **k: None)
    columns, template = "prompt=question,chosen=response_j,rejected=response_k", "llama3"
    rc = pipeline.run_pipeline(pipeline.PipelineArguments(
        model="m", dataset_name="lvwerra/stack-exchange-paired", hardware="cpu", out_dir=str(tmp_path / "sanity"),
        dataset_columns=columns, chat_template=template))
    assert rc == 0 and set(steps) == {"sft", "dpo", "compare", "generation test"}
    for name in ("sft", "dpo", "compare"):
        argv = steps[name]
        assert argv[argv.index("--dataset_columns") + 1] == columns, name
        assert argv[argv.index("--chat_template") + 1] == template, name
        assert argv[argv.index("--dataset_name") + 1] == "lvwerra/stack-exchange-paired", name
