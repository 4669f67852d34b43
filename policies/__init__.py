"""blockreuse learning: the block predictor network, supervised training, export to the deployable policy format, and
the evaluation of learned policies against the heuristics.

    policies.predictor   BlockPredictor (mlp | transformer), TorchPolicy (a live network as a ReusePolicy)
    policies.data        rollout shards -> training rows, labels from the oracle drift, split by episode
    policies.supervised  LightningModule + `run(cfg)` (mode=supervised), W&B logger helpers
    policies.export      export_onnx(net, path, ...) -> <path>.onnx + <path>.json (mode=export)
    policies.evaluate    heuristics + oracle + learned policy files on the test split (mode=evaluate)

Importing the package loads nothing heavy; Lightning is imported by the modules that train.
"""
