"""blockreuse learning: the block predictor network, supervised training, the RL agent, export to the deployable
policy format, the evaluation of learned policies against the heuristics, and the typed configs of every job.

    policies.config      one dataclass per config group (Hydra ConfigStore schemas) and RootConfig
    policies.predictor   BlockPredictor (mlp | transformer), TorchPolicy (a live network as a ReusePolicy),
                         read_predictor / load_predictor (a trained predictor back, without Lightning)
    policies.data        rollout shards -> training rows (labels: cache_core.actions.oracle_actions), split by episode
    policies.supervised  LightningModule + `run(cfg)` (mode=supervised)
    policies.rl*         the SB3 agent (mode=rl): per-block actor-critic, callbacks, training
    policies.export      export_onnx(net, path, ...) -> <path>.onnx + <path>.json; `run(cfg)` ships (mode=export)
    policies.evaluate    heuristics + oracle + learned policy files on the test split (mode=evaluate)

Importing the package loads nothing heavy; Lightning and SB3 are imported by the modules that train.
"""
