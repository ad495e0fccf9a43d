"""Where every stage reads and writes, relative to one work directory (`artifacts/<dataset>`).

This is the one place in the code that names the artifact layout; dvc.yaml repeats the same names
because DVC needs them statically (`${workdir}/features.zarr`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArtifactPaths:
    workdir: Path

    @property
    def teacher(self) -> Path:  # fit-teacher's trained teacher parts (the LiT demo teacher's heads)
        return self.workdir / "teacher"

    @property
    def cross_encoder(self) -> Path:  # fit-cross-encoder's fusion head over the LiT teacher (the demo's ablation)
        return self.workdir / "cross_encoder"

    @property
    def index_dir(self) -> Path:  # dataset index (parquet) + fingerprint + bad-image report
        return self.workdir / "index"

    @property
    def file_stats(self) -> Path:  # prepare's size+mtime -> sha256 cache of the image files (not an output)
        return self.workdir / ".kdpipe" / "file_stats.json"

    @property
    def images(self) -> Path:  # prepare's uint8 student-resolution image cache
        return self.workdir / "images.zarr"

    @property
    def features(self) -> Path:  # extract's teacher feature store (format v1)
        return self.workdir / "features.zarr"

    @property
    def mined(self) -> Path:  # mine's teacher neighbours and cross-encoder scores (pipeline/store/mined.py)
        return self.workdir / "mined.zarr"

    @property
    def views(self) -> Path:  # views' teacher features of several views of each training image (extract/views.py)
        return self.workdir / "views.zarr"

    @property
    def student(self) -> Path:  # distill's outputs: the exported student, its training logs
        return self.workdir / "student"

    def model(self, run: str) -> Path:  # one run of `distill.runs` (variant-sSEED): what `student` is for one run
        return self.workdir / "models" / run

    def checkpoints(self, run: str) -> Path:  # distill's training state of a run (student, baseline, variant-sSEED)
        return self.workdir / "checkpoints" / run  # outside every DVC output: `dvc repro` never removes it

    @property
    def text_features(self) -> Path:  # frozen text towers' caption features, shared by runs (not an output)
        return self.workdir / ".kdpipe" / "text_features"

    def training_curves(self, run: str) -> dict[str, Path]:  # its train/val logs, copied out for `dvc plots`
        return {log: self.workdir / "curves" / log / f"{run}.csv" for log in ("train", "val")}

    def search_index(self, gallery: str, kind: str) -> Path:  # `kdpipe index`: one directory per gallery and kind
        return self.workdir / "search" / f"{gallery}-{kind}"

    @property
    def metrics(self) -> Path:  # the headline metrics (`dvc metrics show`: each model's RSUM)
        return self.workdir / "metrics.json"

    @property
    def metrics_detail(self) -> Path:  # the whole record of evaluate's metrics; how they were measured: run_info
        return self.workdir / "metrics_detail.json"

    @property
    def run_info(self) -> Path:  # environment, timings, latency method notes of the evaluate run
        return self.workdir / "run_info.json"

    @property
    def plots(self) -> Path:
        return self.workdir / "plots"

    def resolved_config(self, stage: str) -> Path:
        return self.workdir / "config" / f"{stage}.yaml"
