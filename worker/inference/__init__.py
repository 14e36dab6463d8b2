"""The model layer: SAM 2 and DETR-panoptic over onnxruntime, files through huggingface_hub.

- ``registry.ModelRegistry``: the models one process has loaded for one ``Settings``;
- ``sam2.Sam2Model`` and ``detr.DetrPanopticModel``: one session class per model;
- ``hub``: where model files come from (hub cache, revision pin, offline, local dirs);
- ``sessions``: onnxruntime sessions with segq's options and providers;
- ``cache.EmbeddingCache``, ``labels``, ``transforms``: the pieces around them.

Importing this package imports no onnxruntime: ``segq download-models`` works without it.
"""
