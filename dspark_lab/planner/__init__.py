"""The layout planner: predict step time, MFU and memory of a training layout, and search layouts.

``predict.predict(config)`` answers for one layout; ``search.search(...)`` enumerates valid layouts and ranks them.
The pieces of the model are in ``model/`` (FLOPs, memory, communication, efficiency); device figures come from the
registered backends (``hardware.py``). Pure Python: nothing here imports torch.
"""

# What can run a job (``layout.framework``), here so the CLI's parser names them without loading the model code.
FRAMEWORKS = ("megatron", "torchtitan")
