"""An offline model zoo: a small CLIP base pretrained on generated captions and one expert per task.

The Hugging Face Hub's CLIP checkpoints cannot be downloaded everywhere; this zoo stands in for them in
the demo, the tests and the merge-quality benchmark. Everything comes from packages that install from
PyPI or Debian (see ``hf_merge.zoo.data``), so the zoo builds anywhere, deterministically.

    from hf_merge.zoo import build_zoo, push_zoo
    paths = build_zoo()              # cached under ~/.cache/hf-merge/zoo/<config hash>/
    paths.base, paths.experts["mnist"]
"""

from hf_merge.zoo.build import ZooConfig, ZooPaths, build_zoo, push_zoo, repo_names
from hf_merge.zoo.data import TASKS, load_task
from hf_merge.zoo.finetune import FinetuneConfig
from hf_merge.zoo.modeling import ModelShape
from hf_merge.zoo.pretrain import PretrainConfig
from hf_merge.zoo.tasks import register_offline_tasks, task_name

__all__ = [
    "TASKS",
    "FinetuneConfig",
    "ModelShape",
    "PretrainConfig",
    "ZooConfig",
    "ZooPaths",
    "build_zoo",
    "load_task",
    "push_zoo",
    "register_offline_tasks",
    "repo_names",
    "task_name",
]
