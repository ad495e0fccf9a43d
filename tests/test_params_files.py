"""Every shipped params file (the demo's params.yaml and configs/*.yaml) parses into the stage configs."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import from_dict
from pipeline.data.prepare import PrepareConfig
from pipeline.distill.config import DistillConfig
from pipeline.evaluate.run import EvaluateConfig
from pipeline.extract.config import ExtractConfig
from pipeline.extract.views import ViewsConfig
from pipeline.mine.run import MineConfig
from pipeline.runs import split_runs, variant_section
from pipeline.runtime import RuntimeConfig
from pipeline.store.verify import StoreConfig
from pipeline.teachers.fit_fusion import FitCrossEncoderConfig
from pipeline.teachers.fit_teacher import FitTeacherConfig
from stages._common import TOP_LEVEL_KEYS

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "fit_teacher": FitTeacherConfig,  # only where the teacher has trained parts (the emoji demo)
    "fit_cross_encoder": FitCrossEncoderConfig,  # only where a cross-encoder is fitted (the emoji demo's ablation)
    "prepare": PrepareConfig,
    "extract": ExtractConfig,
    "mine": MineConfig,  # only where something uses mined candidates (the emoji demo)
    "views": ViewsConfig,  # only where something uses view-matched targets (the emoji demo's ablation)
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "runtime": RuntimeConfig,  # every stage's CPU threads; its defaults fit any machine
    "store": StoreConfig,  # how distill and evaluate read the feature store (default: no full verification)
}
OPTIONAL = {"fit_teacher", "fit_cross_encoder", "mine", "views", "runtime", "store"}
FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_params_file_parses(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(TOP_LEVEL_KEYS)
    assert set(SECTIONS) | {"workdir"} == set(TOP_LEVEL_KEYS)
    for section, cls in SECTIONS.items():
        assert section in raw or section in OPTIONAL, f"{path.name} has no {section} section"
        if section in raw:
            data = split_runs(raw[section])[1] if section == "distill" else raw[section]
            from_dict(cls, data, section)
    runs = split_runs(raw["distill"])[0]
    for variant in runs.variants if runs else ():  # every run's merged section is a valid distill config
        from_dict(DistillConfig, variant_section(raw["distill"], variant, runs.seeds[0])[0], "distill")
    if runs:  # dvc.yaml's recall plots draw evaluate.plot_models: the teacher, every variant, chance
        assert raw["evaluate"]["plot_models"] == ["teacher", *runs.variants, "chance"]
