"""Supervised training of the block predictor on oracle labels (`python train.py mode=supervised`).

    shards (envs.collect) -> ShardDataModule (split by episode) -> SupervisedPredictor(BlockPredictor) -> Trainer
      -> checkpoints (best.ckpt by validation average precision, last.ckpt) + W&B (offline by default)

Labels (policies.data): refresh = the block's cached K/V drifted more than `policy.epsilon` (relative L2, max of keys
and values) from a full recompute in some layer; depth = the first such layer, as an action (j = refresh the top j
layers). Binary mode trains BCE with `pos_weight` (auto = #negatives / #positives of the training labels: refreshes
are the minority), depth mode cross-entropy with every refresh action weighted by the same pos_weight. The decoding
block, padded and never-computed blocks carry no loss.

Budget conditioning (`policy.budget_conditioned: true`): every training row gets an epsilon drawn from
`policy.budget_epsilons`, is labelled at it, and its `budget` feature is set to the FLOP fraction the oracle at that
epsilon spends on the training data (`policies.data.budget_of_epsilon`: recomputed / valid positions, decoding block
included). So `generate(..., budget=b)` asks the network to behave like the oracle whose average spend is b. This is an
average-spend proxy, not a constraint: an episode's actual FLOP fraction can differ, the evaluation reports it.

Validation: loss, AUROC and average precision of P(refresh) against the refresh labels (torchmetrics), precision /
recall / predicted refresh rate at the default threshold, and every `policy.generation_check.every_n_epochs` epochs
(and after the last) exact match, agreement with no-cache and FLOP fraction of the live network in real generation on
a few validation-split prompts (the network wrapped as a `ReusePolicy` in-process, no export).

Checkpoints go to `policy.checkpoint_dir` (the run directory's checkpoints/; in a multirun a directory outside the
job's run directory gets a `job<num>` part); `policy.resume=<earlier run>/checkpoints/last.ckpt` continues an
earlier run. The best checkpoint is exported into the run directory (`predictor.onnx/.json/.safetensors`) and logged
as a W&B artifact; `mode=export` ships a policy elsewhere.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from cache_core.actions import check_action_mode, n_actions, oracle_actions, refresh_probability
from cache_core.bench import tracking
from cache_core.features import TEXT_SCHEMA, FeatureSchema, schema_by_id
from policies.config import LABEL_WEIGHTINGS, PolicyConfig, RootConfig, check_epsilon
from policies.data import ShardDataModule, budget_of_epsilon
from policies.predictor import BlockPredictor, TorchPolicy

log = logging.getLogger(__name__)
ATTENTION_MASS = TEXT_SCHEMA.block_index(TEXT_SCHEMA.attention)  # the text schema's, for existing imports


def check_label_weighting(weighting: str, schema: FeatureSchema) -> None:
    """`attention` weighting reads the schema's attention column: refuse it for a schema without one."""
    if weighting == "attention" and schema.attention is None:
        raise ValueError(f"policy.label_weighting=attention needs an attention-mass feature, and feature schema "
                         f"{schema.id!r} ({schema.family} family) has none; set policy.label_weighting=none")


def label_drift(drift: torch.Tensor, x: torch.Tensor, block_mask: torch.Tensor, weighting: str = "none",
                power: float = 1.0, schema: FeatureSchema = TEXT_SCHEMA) -> torch.Tensor:
    """The drift the labels threshold. `attention` weighting scales it by the block's share of the decoding queries'
    attention relative to uniform, (attention_mass * real blocks) ** power: a stale block the decoding block barely
    reads matters less than one it reads a lot (a cheap stand-in for the block's effect on the predictions; the
    oracle itself thresholds plain drift). schema: the feature schema of x (its attention column)."""
    if weighting == "none":
        return drift
    check_label_weighting(weighting, schema)
    share = x[..., schema.block_index(schema.attention)] * block_mask.sum(-1, keepdim=True)
    return drift * (share.clamp(min=1e-3) ** power)[..., None]


class SupervisedPredictor(L.LightningModule):
    """BlockPredictor + the oracle-label loss and the validation metrics."""

    def __init__(self, n_layers: int, action_mode: str = "binary", arch: str = "mlp", hidden: int = 64,
                 n_layers_attn: int = 1, n_heads: int = 2, dropout: float = 0.0, epsilon: float = 0.05,
                 lr: float = 3e-3, weight_decay: float = 1e-4, pos_weight: float | None = None,
                 threshold: float = 0.5, budget_conditioned: bool = False,
                 budget_epsilons: list[float] | None = None, budgets: list[float] | None = None,
                 nominal_budget: float = 1.0, ignore_features: list[str] | None = None,
                 label_weighting: str = "none", attention_power: float = 1.0, schema_id: str = TEXT_SCHEMA.id):
        super().__init__()
        check_action_mode(action_mode)
        check_epsilon("policy.epsilon", epsilon)
        if label_weighting not in LABEL_WEIGHTINGS:
            raise ValueError(f"policy.label_weighting={label_weighting!r}; choose one of {list(LABEL_WEIGHTINGS)}")
        schema = schema_by_id(schema_id)  # the shards' schema: the network's input and the role columns
        check_label_weighting(label_weighting, schema)
        if budget_conditioned and (not budget_epsilons or not budgets or len(budget_epsilons) != len(budgets)):
            raise ValueError("a budget-conditioned predictor needs policy.budget_epsilons and their budgets")
        self.save_hyperparameters()
        n_outputs = 1 if action_mode == "binary" else n_actions(action_mode, n_layers)
        self.net = BlockPredictor(hidden=hidden, arch=arch, n_outputs=n_outputs, n_layers_attn=n_layers_attn,
                                  n_heads=n_heads, dropout=dropout, ignore_features=tuple(ignore_features or ()),
                                  schema_id=schema.id)
        self.budget_column = schema.input_index(schema.budget)
        self.output = "refresh_logit" if action_mode == "binary" else "action_logits"
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

        self.val_auroc = BinaryAUROC()
        self.val_ap = BinaryAveragePrecision()
        self.last_val_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, block_mask)

    # --- labels and loss ------------------------------------------------------------------------------------------
    def _condition(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The input with its budget column set and the epsilon(s) to label with."""
        hp = self.hparams
        if not hp.budget_conditioned:
            return x, hp.epsilon
        x = x.clone()
        if train:
            index = torch.randint(len(hp.budget_epsilons), (x.shape[0],), device=x.device)
            eps = torch.tensor(hp.budget_epsilons, device=x.device, dtype=x.dtype)[index]
            x[..., self.budget_column] = torch.tensor(hp.budgets, device=x.device, dtype=x.dtype)[index][:, None]
            return x, eps
        x[..., self.budget_column] = hp.nominal_budget
        return x, hp.epsilon

    def label_drift(self, drift: torch.Tensor, x: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        return label_drift(drift, x, block_mask, self.hparams.label_weighting, self.hparams.attention_power,
                           self.net.schema)

    def _step(self, batch: list[torch.Tensor], train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
        x, block_mask, loss_mask, drift = batch
        x, eps = self._condition(x, train)
        out = self(x, block_mask)
        drift = self.label_drift(drift, x, block_mask)
        refresh = oracle_actions(drift, eps, "binary").float()
        keep = loss_mask.bool()
        n = keep.sum().clamp(min=1)
        if self.hparams.action_mode == "binary":
            pos_weight = None if self.hparams.pos_weight is None else out.new_tensor(self.hparams.pos_weight)
            loss = F.binary_cross_entropy_with_logits(out, refresh, pos_weight=pos_weight, reduction="none")
        else:  # pos_weight weighs every refresh action against reuse, as in binary mode
            weight = None
            if self.hparams.pos_weight is not None:
                weight = out.new_full((out.shape[-1],), float(self.hparams.pos_weight))
                weight[0] = 1.0
            loss = F.cross_entropy(out.flatten(0, 1), oracle_actions(drift, eps, "depth").flatten(), weight=weight,
                                   reduction="none")
            loss = loss.view(keep.shape)
        loss = (loss * keep).sum() / n
        return loss, refresh_probability(out.detach(), self.output)[keep], refresh[keep], out.detach()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _, _ = self._step(batch, train=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(5, dtype=torch.float64)  # tp, fp, fn, labelled positives, blocks

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss, prob, label, _ = self._step(batch, train=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True)
        if label.numel() == 0:
            return
        self.val_auroc.update(prob, label.long())
        self.val_ap.update(prob, label.long())
        pred = prob >= self.hparams.threshold
        lab = label.bool()
        self._val_counts += torch.tensor([float((pred & lab).sum()), float((pred & ~lab).sum()),
                                          float((~pred & lab).sum()), float(lab.sum()), float(lab.numel())],
                                         dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        counts = self.all_gather(self._val_counts.to(self.device)).reshape(-1, 5).sum(0).double().cpu()
        tp, fp, fn, pos, total = counts.tolist()
        metrics = {
            "val/auroc": self.val_auroc.compute(), "val/ap": self.val_ap.compute(),
            "val/precision": tp / max(tp + fp, 1.0), "val/recall": tp / max(tp + fn, 1.0),
            "val/refresh_rate": (tp + fp) / max(total, 1.0), "val/label_rate": pos / max(total, 1.0),
        }
        self.val_auroc.reset()
        self.val_ap.reset()
        # Already global (all_gather / torchmetrics sync): sync_dist only averages equal values across ranks.
        self.log_dict({k: float(v) for k, v in metrics.items() if k != "val/ap"}, sync_dist=True)
        self.log("val/ap", float(metrics["val/ap"]), prog_bar=True, sync_dist=True)
        self.last_val_metrics = {k: float(v) for k, v in metrics.items()}

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs and self.trainer.max_epochs > 0 \
            else 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=self.hparams.lr * 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["blockreuse"] = {"val_metrics": dict(self.last_val_metrics), "net_config": self.net.config()}

    def policy(self, threshold: float | None = None) -> TorchPolicy:
        """The live network as a ReusePolicy (decisions as the exported file makes them)."""
        policy = TorchPolicy(self.net, self.hparams.action_mode, self.output,
                             refresh_threshold=self.hparams.threshold if threshold is None else threshold)
        if self.hparams.budget_conditioned:  # as exported: given no budget, run at the training epsilon's budget
            policy.budget_conditioned = True
            policy.default_budget = float(self.hparams.nominal_budget)
        return policy


class GenerationCheck(L.Callback):
    """Every few epochs: exact match and FLOP fraction of the live network in real generation on validation prompts.

    Runs on global rank 0 only (the same prompts on every rank would give the same numbers), with the no-cache
    reference computed once."""

    def __init__(self, model_path: str | Path, examples: list[Any], gen_kwargs: dict[str, Any], every_n_epochs: int,
                 batch_size: int, threshold: float | None = None, budget: float | None = None):
        super().__init__()
        self.model_path, self.examples, self.gen = Path(model_path), examples, dict(gen_kwargs)
        self.every = max(1, int(every_n_epochs))
        self.batch_size, self.threshold, self.budget = max(1, int(batch_size)), threshold, budget
        self._model = self._tokenizer = None
        self._reference: dict[str, Any] | None = None

    def _generate(self, policy: Any) -> dict[str, Any]:
        from cache_core.bench.tasks import encode_prompt, score
        from cache_core.generate import generate

        answers, flops = [], 0.0
        for i in range(0, len(self.examples), self.batch_size):
            batch = self.examples[i:i + self.batch_size]
            prompts = [encode_prompt(self._tokenizer, e) for e in batch]
            budget = self.budget if policy.budget_conditioned else None  # the no-cache reference reads no budget
            result = generate(self._model, prompts, policy=policy, budget=budget, **self.gen)
            flops += result.stats.flops
            answers += [self._tokenizer.decode(row.tolist()) for row in result.tokens]
        em = sum(score(a, e) for a, e in zip(answers, self.examples)) / len(self.examples)
        return {"answers": answers, "flops": flops, "exact_match": em}

    def measure(self, module: SupervisedPredictor) -> dict[str, float]:
        from cache_core.checkpoint import load_model, load_tokenizer
        from cache_core.registry import make_policy

        if self._model is None:
            self._model, self._tokenizer = load_model(self.model_path), load_tokenizer(self.model_path)
        if self._reference is None:
            self._reference = self._generate(make_policy("full"))
        t0 = time.perf_counter()
        run = self._generate(module.policy(self.threshold))
        ref = self._reference
        return {
            "gen/exact_match": run["exact_match"], "gen/full_exact_match": ref["exact_match"],
            "gen/agreement": sum(a == r for a, r in zip(run["answers"], ref["answers"])) / len(self.examples),
            "gen/flop_fraction": run["flops"] / ref["flops"], "gen/seconds": time.perf_counter() - t0,
        }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: SupervisedPredictor) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        last = bool(trainer.max_epochs and trainer.max_epochs > 0 and epoch >= trainer.max_epochs)
        if epoch % self.every and not last:
            return
        if not trainer.is_global_zero:
            return
        metrics = self.measure(pl_module)
        for key, value in metrics.items():
            pl_module.log(key, float(value), rank_zero_only=True)
        pl_module.last_val_metrics.update(metrics)
        log.info("epoch %d generation check on %d validation prompts: exact match %.3f (no-cache %.3f), FLOP "
                 "fraction %.3f", epoch, len(self.examples), metrics["gen/exact_match"],
                 metrics["gen/full_exact_match"], metrics["gen/flop_fraction"])


# --- the job -------------------------------------------------------------------------------------------------------
def atomic_checkpoint(**kwargs: Any) -> L.Callback:
    """Lightning's ModelCheckpoint, writing each file under a temporary name and renaming it into place: a kill while
    saving leaves the previous last.ckpt / best.ckpt whole."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class AtomicModelCheckpoint(ModelCheckpoint):
        @property
        def state_key(self) -> str:  # as ModelCheckpoint's, so checkpoints written before keep their callback state
            return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

        def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
            partial = filepath + ".partial"
            super()._save_checkpoint(trainer, partial)
            if trainer.is_global_zero and os.path.exists(partial):
                os.replace(partial, filepath)
            self._last_checkpoint_saved = filepath

    return AtomicModelCheckpoint(**kwargs)


def build_module(pcfg: PolicyConfig, dm: ShardDataModule) -> SupervisedPredictor:
    """The LightningModule for these shards: pos_weight and budgets measured on the training rows."""
    train = dm.subset(dm.train_index)
    schema = dm.schema
    weighting, power = pcfg.label_weighting, float(pcfg.attention_power)
    drift = label_drift(train["drift"], train["x"], train["block_mask"], weighting, power, schema)
    pos_weight = pcfg.pos_weight
    if pos_weight == "auto":
        labels = oracle_actions(drift, float(pcfg.epsilon), "binary").float()[train["loss_mask"]]
        pos, neg = float(labels.sum()), float((1 - labels).sum())
        # Refreshes are the minority; clamp so that an almost label-free shard cannot blow the loss up.
        pos_weight = min(max(neg / max(pos, 1.0), 0.1), 100.0) if labels.numel() else 1.0
        log.info("refresh labels at epsilon=%g: %.1f%% positive -> pos_weight %.2f", float(pcfg.epsilon),
                 100 * pos / max(pos + neg, 1.0), pos_weight)
    epsilons, budgets, nominal = None, None, 1.0
    if pcfg.budget_conditioned:
        epsilons = [float(e) for e in pcfg.budget_epsilons]
        budgets = budget_of_epsilon(drift, train["x"], train["loss_mask"], train["block_mask"], epsilons, schema)
        nominal = budget_of_epsilon(drift, train["x"], train["loss_mask"], train["block_mask"],
                                    [float(pcfg.epsilon)], schema)[0]
        log.info("budget conditioning: epsilon -> oracle FLOP fraction %s",
                 {e: round(b, 3) for e, b in zip(epsilons, budgets)})
    ignore = list(pcfg.ignore_features)
    if not pcfg.budget_conditioned and schema.budget not in ignore:
        ignore.append(schema.budget)  # constant in the data; ignored, generate(budget=...) cannot steer the net
    return SupervisedPredictor(
        n_layers=dm.n_layers, ignore_features=ignore, action_mode=pcfg.action_mode, arch=pcfg.arch,
        hidden=pcfg.hidden, n_layers_attn=pcfg.n_layers_attn, n_heads=pcfg.n_heads, dropout=float(pcfg.dropout),
        epsilon=float(pcfg.epsilon), lr=float(pcfg.lr), weight_decay=float(pcfg.weight_decay),
        pos_weight=None if pos_weight is None else float(pos_weight), threshold=float(pcfg.threshold),
        budget_conditioned=pcfg.budget_conditioned, budget_epsilons=epsilons, budgets=budgets,
        nominal_budget=nominal, label_weighting=weighting, attention_power=power, schema_id=schema.id,
    )


def generation_check(cfg: RootConfig) -> GenerationCheck | None:
    """The callback of policy.generation_check, or None when it is off or there is no model to generate with."""
    gcfg = cfg.policy.generation_check
    if not gcfg.enabled or gcfg.n_prompts < 1:
        return None
    model_path = Path(cfg.paths.model)
    if not (model_path / "config.json").is_file():
        log.warning("generation check skipped: no model checkpoint at %s (train it with `python train.py "
                    "mode=pretrain`)", model_path)
        return None
    from cache_core.bench.config import make_task

    examples = make_task(cfg.task).split(gcfg.split, gcfg.n_prompts)
    return GenerationCheck(model_path, examples, cfg.generation.kwargs(), gcfg.every_n_epochs, gcfg.batch_size,
                           budget=gcfg.budget)


def run(cfg: RootConfig) -> dict[str, Any]:
    """`mode=supervised`: train the predictor on data.shards_dir, export its best checkpoint into the run directory;
    returns checkpoint paths and final metrics."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from policies.export import export_checkpoint

    pcfg, tcfg = cfg.policy, cfg.trainer
    if tcfg.strategy.startswith("ddp") and cfg.mode == "main" and "LOCAL_RANK" not in os.environ:
        raise ValueError("trainer=ddp relaunches this script once per process, which in the main job would re-run "
                         "collection in every process: collect first, then `python train.py mode=supervised "
                         "trainer=ddp data.shards_dir=<shards>` (see conf/trainer/ddp.yaml)")
    if tcfg.matmul_precision:
        torch.set_float32_matmul_precision(tcfg.matmul_precision)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dcfg = cfg.data
    dm = ShardDataModule(dcfg.directories if len(dcfg.directories) > 1 else dcfg.directories[0],
                         batch_size=dcfg.batch_size, val_fraction=float(dcfg.val_fraction), group_by=dcfg.group_by,
                         seed=cfg.seed, num_workers=dcfg.num_workers, max_rows=dcfg.max_rows).prepare()
    module = build_module(pcfg, dm)
    has_val = len(dm.val_index) > 0
    episodes = int(dm.rows["episode"].unique().numel())
    if not has_val:
        log.warning("the shards hold %d episode(s): too few for a validation split, so best.ckpt is the last epoch's "
                    "and no val/* metric is measured; collect more (collect.episodes)", episodes)
    if len(dm.train_index) < dcfg.batch_size:
        log.warning("only %d training rows (%d episodes), fewer than one batch of data.batch_size=%d: the predictor "
                    "will barely train; collect more (collect.episodes)", len(dm.train_index), episodes,
                    dcfg.batch_size)

    ckpt_dir = tracking.per_job(pcfg.checkpoint_dir)
    if pcfg.resume is not None:
        from policies.predictor import read_predictor

        read_predictor(pcfg.resume)  # a truncated or foreign file is named here, not deep inside Lightning
    if pcfg.resume is None and (ckpt_dir / "last.ckpt").exists():
        log.warning("%s holds checkpoints of an earlier run; they will be overwritten (policy.resume=%s continues "
                    "that run instead)", ckpt_dir, ckpt_dir / "last.ckpt")
    checkpoint = atomic_checkpoint(dirpath=str(ckpt_dir), filename="best", monitor="val/ap" if has_val else None,
                                   mode="max", save_top_k=1, enable_version_counter=False)
    # last.ckpt at every epoch's end (and every N training steps when asked), whether or not val/ap improved: a kill
    # loses at most that much training.
    last = atomic_checkpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                             save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks: list[L.Callback] = [checkpoint, last]
    if pcfg.checkpoint_every_n_steps:  # Lightning takes steps or epochs per callback: a second one for the steps
        callbacks.append(atomic_checkpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1,
                                           every_n_train_steps=pcfg.checkpoint_every_n_steps,
                                           enable_version_counter=False))
    check = generation_check(cfg)
    if check is not None:
        callbacks.append(check)

    logger = tracking.lightning_logger(cfg.logger, "supervised", cfg)
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    try:
        trainer = L.Trainer(**tcfg.kwargs(), callbacks=callbacks, logger=logger if logger else False,
                            default_root_dir=cfg.paths.output)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=pcfg.resume, weights_only=True)  # tensors, never code
        seconds = time.perf_counter() - t0
        best = checkpoint.best_model_path or str(ckpt_dir / "last.ckpt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        result: dict[str, Any] = {
            "best_ckpt": best, "last_ckpt": str(ckpt_dir / "last.ckpt"), "checkpoint_dir": str(ckpt_dir),
            "best_score": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
            "metrics": metrics, "seconds": seconds, "rows": len(dm.rows["x"]),
        }
        if trainer.is_global_zero and pcfg.log_export:
            # The run's own exported file; shipping it elsewhere is `mode=export` with a path.
            exported = export_checkpoint(best, tracking.per_job(Path(cfg.paths.output) / "predictor", file=True),
                                         source={"shards_dir": [tracking.portable_path(d) for d in dm.shards_dirs]})
            result["exported"] = str(exported)
            run = tracking.Run.of_lightning(logger)
            run.log_artifact([exported, exported.with_suffix(".json"), exported.with_suffix(".safetensors")],
                             "block-predictor", metadata={"epsilon": float(pcfg.epsilon), "arch": pcfg.arch,
                                                          "best_score": result["best_score"]})
            if run.active:
                result["wandb_dir"] = run.directory
        log.info("supervised: best %s (val/ap %s), %d rows, %.0fs", best, result["best_score"], result["rows"],
                 seconds)
        return result
    finally:
        tracking.finish_lightning(logger)
